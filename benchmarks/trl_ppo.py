"""TRL's side of benchmarks/ppo_vs_trl.py: PPO throughput of `trl.experimental.ppo.PPOTrainer` (trl 1.12.0).

Runs in its own virtualenv with trl==1.12.0 (benchmarks/ppo_vs_trl.py creates it); it never imports rlhfkit.
Policy, reference, value and reward models are all loaded from one local HF causal-LM directory; value and reward are
`AutoModelForSequenceClassification(num_labels=1)`, whose score head is randomly initialised under a fixed seed.

One PPO iteration (TRL's "update") = `--batch-size` rollouts: TRL's config gets per_device_train_batch_size=B and
gradient_accumulation_steps=1, so that each of the `--num-mini-batches` mini-batches is one forward/backward and one
optimizer step (with gradient_accumulation_steps>1 TRL's accelerator.accumulate would merge optimizer steps across
mini-batches). total_episodes = (warm-up + timed iterations) * B. Iterations are timed between TRL's
`on_train_begin` / `on_step_end` callbacks, which it fires before its loop and at the end of each update.

Prints one JSON line to stdout (all else goes to stderr). Reproduce, from the repo root, in the TRL venv:

    HF_HUB_OFFLINE=1 ~/.cache/rlhfkit/benchmarks/venv-trl-1.12.0/bin/python benchmarks/trl_ppo.py \
        --model ~/.cache/rlhfkit/models/smollm2-135m-instruct --prompts data/company/train.jsonl \
        --batch-size 8 --num-mini-batches 2 --ppo-epochs 1 --response-length 24 --iterations 3 --device cpu
"""

from __future__ import annotations

import os

# Before any HF import: nothing is to be fetched from the hub.
for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

import trl  # noqa: E402
import trl.experimental.ppo.ppo_trainer as ppo_module  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

from bench_common import iteration_timer, peak_memory, sync  # noqa: E402  (benchmarks/, this script's directory)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local HF causal-LM directory")
    p.add_argument("--prompts", required=True, help='JSONL, one {"prompt": ...} per line')
    p.add_argument("--batch-size", type=int, default=8, help="rollouts (episodes) per PPO iteration")
    p.add_argument("--num-mini-batches", type=int, default=2)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--response-length", type=int, default=24, help="max new tokens")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--stop-token", choices=["eos", "none"], default="eos")
    p.add_argument("--iterations", type=int, default=3, help="timed PPO iterations")
    p.add_argument("--warmup-iterations", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class GenerationRecorder:
    """Wraps TRL's module-level `batch_generation` (called once per update) to record rollout lengths and time.

    Records, per update: the response tensor width (decode steps of the batched generate, the same for all rows)
    and per rollout the tokens up to and including the first EOS (all of them if none), which is what TRL keeps
    after its stop-token truncation and, with stop_token='eos', what each row sampled before HF padded it."""

    def __init__(self, device: str, eos_token_id: int):
        self.device, self.eos = device, eos_token_id
        self.widths: list[int] = []
        self.lengths: list[list[int]] = []
        self.has_eos: list[list[bool]] = []
        self.after_eos: list[int] = []  # rows that went on sampling text after their first EOS
        self.seconds: list[float] = []
        self.original = ppo_module.batch_generation
        ppo_module.batch_generation = self

    def __call__(self, model, queries, local_rollout_forward_batch_size, pad_token_id, generation_config):
        sync(self.device)
        t0 = time.perf_counter()
        query_responses, logits = self.original(
            model, queries, local_rollout_forward_batch_size, pad_token_id, generation_config
        )
        sync(self.device)
        self.seconds.append(time.perf_counter() - t0)
        responses = query_responses[:, queries.shape[1]:]
        is_eos = responses == self.eos
        has = is_eos.any(dim=1)
        first = is_eos.int().argmax(dim=1)
        width = responses.shape[1]
        self.widths.append(width)
        self.lengths.append(torch.where(has, first + 1, torch.full_like(first, width)).tolist())
        self.has_eos.append(has.tolist())
        idx = torch.arange(width, device=responses.device)
        text_after = (idx > first[:, None]) & has[:, None] & (responses != pad_token_id) & ~is_eos
        self.after_eos.append(int(text_after.any(dim=1).sum()))
        return query_responses, logits


def load_tokenizer(model: str):
    """The model's tokenizer, left-padding, with a pad token that never occurs in text.

    TRL generates from left-padded queries and finds prompt/response padding by `token == pad_token_id`. SmolLM2
    ships pad == eos == <|im_end|>, which would mask every <|im_end|> of the chat-formatted prompt and make the
    response's EOS count as padding; a pad token that never occurs in text avoids both (same as TRL's example,
    which adds one, but an existing token needs no embedding resize)."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.unk_token
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    return tokenizer


def prompt_dataset(args: argparse.Namespace, tokenizer) -> tuple[list[str], Dataset]:
    """The prompts, and the dataset of their chat-formatted token ids that TRL trains on."""
    with open(args.prompts) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    if len(prompts) < args.batch_size:
        sys.exit(f"{len(prompts)} prompts are fewer than --batch-size {args.batch_size} (TRL drops ragged batches)")
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    # The template already holds the special tokens; only input_ids, so that TRL's padding collator can batch them.
    return prompts, Dataset.from_dict({"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]})


def load_models(args: argparse.Namespace, dtype: torch.dtype, tokenizer):
    """Policy, reference, value and reward models, all from the one model directory."""
    def load_lm():
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)

    def load_scalar(seed: int):
        transformers.set_seed(seed)  # the score head is fresh: seed it so runs are repeatable
        m = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=dtype)
        m.config.pad_token_id = tokenizer.pad_token_id
        return m

    policy, ref_policy = load_lm(), load_lm()
    value_model, reward_model = load_scalar(args.seed), load_scalar(args.seed + 1)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    return policy, ref_policy, value_model, reward_model


def ppo_config(args: argparse.Namespace, output_dir: str, total_iterations: int) -> PPOConfig:
    return PPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=args.num_mini_batches,
        num_ppo_epochs=args.ppo_epochs,
        total_episodes=total_iterations * args.batch_size,
        response_length=args.response_length,
        temperature=args.temperature,
        stop_token=None if args.stop_token == "none" else "eos",
        local_rollout_forward_batch_size=64,  # TRL's default, spelled out: rollouts of <= 64 go in one chunk
        num_sample_generations=0,
        use_cpu=args.device == "cpu",
        bf16=args.dtype == "bfloat16",
        fp16=False,
        gradient_checkpointing=False,  # TRL's config default is True (PPOTrainer never applies it): be explicit
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        push_to_hub=False,
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
    )


def main() -> None:
    args = parse_args()
    load_start = os.getloadavg()[0]  # other work on the machine skews CPU timings badly: record it
    total_iterations = args.warmup_iterations + args.iterations
    if args.batch_size % args.num_mini_batches:
        sys.exit("--batch-size must be a multiple of --num-mini-batches")
    if args.iterations < 1:
        sys.exit("--iterations must be at least 1")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    transformers.set_seed(args.seed)

    tokenizer = load_tokenizer(args.model)
    prompts, train_dataset = prompt_dataset(args, tokenizer)
    policy, ref_policy, value_model, reward_model = load_models(args, dtype, tokenizer)
    output_dir = tempfile.mkdtemp(prefix="trl-ppo-bench-")  # TRL creates it; nothing is saved into it
    config = ppo_config(args, output_dir, total_iterations)
    timer = iteration_timer(args.device)
    recorder = GenerationRecorder(args.device, tokenizer.eos_token_id)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # TRL prints its per-update metrics to stdout; keep stdout for the result line.
    with contextlib.redirect_stdout(sys.stderr):
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref_policy,
            reward_model=reward_model,
            value_model=value_model,
            train_dataset=train_dataset,
            callbacks=[timer],
        )
        t0 = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - t0
    shutil.rmtree(output_dir, ignore_errors=True)
    result = summary(args, config, timer, recorder, len(prompts), train_seconds, load_start)
    print(json.dumps(result, default=str), flush=True)


def summary(args: argparse.Namespace, config: PPOConfig, timer, recorder: GenerationRecorder,
            num_prompts: int, train_seconds: float, load_start: float) -> dict:
    """The result line: throughput, memory and rollout lengths over the timed iterations, the workload and TRL's
    resolved settings."""
    total_iterations = args.warmup_iterations + args.iterations
    per_iter = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    if len(per_iter) != total_iterations or len(recorder.widths) != total_iterations:
        sys.exit(f"expected {total_iterations} updates, timed {len(per_iter)}, generated {len(recorder.widths)}")
    timed = slice(args.warmup_iterations, None)
    seconds = sum(per_iter[timed])
    episodes = args.iterations * args.batch_size
    lengths = [n for it in recorder.lengths[timed] for n in it]
    has_eos = [h for it in recorder.has_eos[timed] for h in it]
    peak_gib, memory_kind = peak_memory(args.device)
    result = {
        "framework": "trl",
        "version": trl.__version__,
        "episodes": episodes,
        "seconds": round(seconds, 3),
        "episodes_per_s": round(episodes / seconds, 4),
        "peak_memory_gib": round(peak_gib, 3),
        "memory_kind": memory_kind,
        # Tokens TRL keeps per rollout after its stop-token truncation (up to and including the first EOS).
        "mean_response_tokens": round(sum(lengths) / len(lengths), 2),
        "mean_response_tokens_basis": "after stop-token truncation, EOS included",
        "mean_generated_width": round(sum(recorder.widths[timed]) / args.iterations, 2),  # batched decode steps
        "eos_fraction": round(sum(has_eos) / len(has_eos), 3),
        # 0 when generation stops each row at EOS (stop_token eos); rows keep sampling past it with stop_token none
        "rows_sampling_past_eos": sum(recorder.after_eos[timed]),
        "generation_seconds": round(sum(recorder.seconds[timed]), 3),
        "iteration_seconds": [round(s, 3) for s in per_iter],  # warm-up included, first
        "train_seconds_total": round(train_seconds, 3),
        "device": args.device,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],  # at start, at end
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "workload": {
            "batch_size": args.batch_size,
            "num_mini_batches": args.num_mini_batches,
            "ppo_epochs": args.ppo_epochs,
            "response_length": args.response_length,
            "temperature": args.temperature,
            "stop_token": args.stop_token,
            "iterations": args.iterations,
            "warmup_iterations": args.warmup_iterations,
            "seed": args.seed,
            "model": args.model,
            "prompts": args.prompts,
            "num_prompts": num_prompts,
        },
        "trl_config": {
            k: getattr(config, k)
            for k in (
                "per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches", "num_ppo_epochs",
                "total_episodes", "num_total_batches", "batch_size", "mini_batch_size", "local_mini_batch_size",
                "response_length", "temperature", "stop_token", "local_rollout_forward_batch_size",
                "num_sample_generations", "learning_rate", "kl_coef", "vf_coef", "cliprange", "cliprange_value",
                "gamma", "lam", "bf16", "gradient_checkpointing", "optim", "lr_scheduler_type",
            )
        },
    }
    return result




if __name__ == "__main__":
    main()
