"""Fixtures: a tiny randomly initialised Llama with a small BPE tokenizer and a ChatML template, saved as a
local HF directory, so unit tests exercise the real loading path in milliseconds and never touch a hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests judge correctness, not speed: no per-example deadline on a loaded 2-core machine.
settings.register_profile("rlhfkit", deadline=None)
settings.load_profile("rlhfkit")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub; fail fast if one tries
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
COMPANY_TRAIN = REPO / "data" / "company" / "train.jsonl"
COMPANY_VALIDATION = REPO / "data" / "company" / "validation.jsonl"
COMPANY_TEST = REPO / "data" / "company" / "test.jsonl"
CHROMIUM = "/usr/bin/chromium"


def require_chromium():
    """Playwright's sync API, with Debian's chromium at CHROMIUM to drive. Without them the test is skipped here, and
    fails under CI (`.ci/run` installs both), as the PostgreSQL tests do: a browser test must never pass unrun."""
    missing = None
    if not os.path.exists(CHROMIUM):
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api as sync_api
        except ImportError:
            missing = "playwright is not installed (pip install -e '.[test]')"
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {missing}: .ci/run installs chromium and the test extras")
        pytest.skip(missing)
    return sync_api


def build_tiny_model(path: Path, seed: int = 0, vocab_size: int = 512) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rlhfkit.data.chat import DEFAULT_CHAT_TEMPLATE

    # the training questions in id order, wherever the validation split has put them: moving records between the
    # two files leaves the tokenizer (and every seeded tiny-model test) as it was
    records = sorted((json.loads(line) for path in (COMPANY_TRAIN, COMPANY_VALIDATION)
                      for line in path.read_text().splitlines()), key=lambda r: r["id"])
    texts = [text for record in records for text in (record["prompt"], record["response"])]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny Llama (2 layers, width 32, 512-token BPE vocabulary) with a ChatML tokenizer."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture
def sft_files(tmp_path) -> tuple[Path, Path]:
    """Small train and eval JSONL files cut from the bundled company data."""
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join(COMPANY_TRAIN.read_text().splitlines()[:16]) + "\n")
    evaluation.write_text("\n".join(COMPANY_TEST.read_text().splitlines()[:8]) + "\n")
    return train, evaluation


@pytest.fixture
def fp16_scalers(monkeypatch) -> list:
    """fp16 loss scaling on a CPU: accelerate gives a GradScaler only on GPUs, so the run skeleton's accelerator gets
    one here, with a first scale (2^20) that overflows the first updates. The list collects each run's scaler."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    import rlhfkit.runs as runs_module

    scalers = []

    def fp16_on_cpu(mixed_precision, output_dir, report_to):
        AcceleratorState._reset_state(True)
        accelerator = Accelerator(cpu=True, mixed_precision="fp16", log_with=report_to, project_dir=str(output_dir))
        accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**20), True
        scalers.append(accelerator.scaler)
        return accelerator

    monkeypatch.setattr(runs_module, "make_accelerator", fp16_on_cpu)  # the run skeleton makes the accelerator
    yield scalers
    AcceleratorState._reset_state(True)
