"""On the real bundled model: SmolLM2-135M-Instruct from its GGUF file, converted once, then a few SFT steps."""

import pytest

from conftest import COMPANY_TEST, COMPANY_TRAIN
from rlhfkit.config import SFTConfig, load_config
from rlhfkit.rollout import generate_responses
from rlhfkit.models import load_causal_lm, load_tokenizer, resolve_model
from rlhfkit.sft import train_sft

pytestmark = pytest.mark.integration

ALIAS = "smollm2-135m-instruct"


def test_bundled_model_is_a_real_llama_that_answers():
    path = resolve_model(ALIAS)
    model, tokenizer = load_causal_lm(ALIAS), load_tokenizer(ALIAS)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert str(path).endswith(ALIAS) and not hasattr(model.config, "quantization_config")
    [answer] = generate_responses(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in answer


@pytest.mark.slow
def test_a_few_sft_steps_lower_training_and_held_out_loss(tmp_path):
    train, held_out = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    # 8 training examples, batch 4, 8 steps: 4 epochs, so the first and last logged windows (2 steps, one epoch
    # each) see the same examples and their losses compare.
    train.write_text("\n".join(COMPANY_TRAIN.read_text().splitlines()[:8]) + "\n")
    held_out.write_text("\n".join(COMPANY_TEST.read_text().splitlines()[:16]) + "\n")
    cfg = load_config(SFTConfig, None, [
        f"model={ALIAS}", f"train_file={train}", f"eval_file={held_out}", f"output_dir={tmp_path / 'run'}",
        "batch_size=4", "max_steps=8", "learning_rate=5e-4", "warmup_ratio=0", "log_every=2", "preview.num_prompts=0",
    ])
    result = train_sft(cfg)
    assert result.train_loss_last < result.train_loss_first
    assert result.eval_loss_after < result.eval_loss_before - 0.1
