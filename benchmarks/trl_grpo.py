"""TRL's side of benchmarks/grpo_vs_trl.py: GRPO or RLOO throughput of TRL 1.16's `GRPOTrainer` / `RLOOTrainer`.

Runs in its own virtualenv with trl==1.16.0 (benchmarks/grpo_vs_trl.py creates it); it never imports rlhfkit.
The workload comes as the driver's JSON (the same dict rlhfkit's side gets). One iteration = `num_prompts` prompts x
`num_generations` completions (generation_batch_size), then `epochs` x `num_mini_batches` optimizer steps: TRL's
config gets per_device_train_batch_size = the mini-batch, gradient_accumulation_steps=1,
steps_per_generation = num_mini_batches and num_iterations = epochs. Iterations are timed between TRL's
`on_train_begin` and every (epochs x num_mini_batches)-th `on_step_end`.

Prints one JSON line to stdout (all else goes to stderr). Reproduce, from the repo root, in the TRL venv:

    ~/.cache/rlhfkit/benchmarks/venv-trl-1.16.0/bin/python benchmarks/trl_grpo.py --workload '{...}'
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
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import trl  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from bench_common import iteration_timer, length_reward, peak_memory  # noqa: E402  (benchmarks/, this script's directory)


class LengthReward:
    """`length_reward` of each completion's text, as a TRL reward function; records the completions' token counts."""

    __name__ = "length"

    def __init__(self):
        self.tokens: list[list[int]] = []  # per generation batch

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        if completion_ids is not None:
            self.tokens.append([len(ids) for ids in completion_ids])
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [length_reward(t) for t in texts]


def trl_config(w: dict, output_dir: str):
    """TRL's GRPOConfig or RLOOConfig for the workload `w`."""
    mini = w["num_prompts"] * w["num_generations"] // w["num_mini_batches"]
    steps = (w["warmup_iterations"] + w["iterations"]) * w["epochs"] * w["num_mini_batches"]
    common = dict(
        output_dir=output_dir, per_device_train_batch_size=mini, gradient_accumulation_steps=1,
        steps_per_generation=w["num_mini_batches"], num_iterations=w["epochs"], num_generations=w["num_generations"],
        max_completion_length=w["max_new_tokens"], temperature=w["temperature"], top_p=1.0, top_k=0,
        beta=w["kl_coef"], learning_rate=w["learning_rate"], lr_scheduler_type="constant", adam_epsilon=1e-5,
        max_grad_norm=1.0, max_steps=steps, disable_dropout=True, gradient_checkpointing=False,
        use_vllm=w["vllm"], vllm_mode="colocate", use_cpu=w["device"] == "cpu", bf16=w["dtype"] == "bfloat16",
        fp16=False, report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="no",
        log_completions=False, push_to_hub=False, disable_tqdm=True, seed=w["seed"], data_seed=w["seed"],
        dataloader_num_workers=0,
    )
    if w["algorithm"] == "grpo":
        # rlhfkit's grpo: rewards scaled by the group's std, each response's token mean, then their mean (TRL's
        # loss_type "grpo"), KL (k3) as a loss term
        return GRPOConfig(**common, loss_type="grpo", scale_rewards="group")
    # rlhfkit's rloo: leave-one-out baseline on the reward with the KL in it, advantages not whitened
    return RLOOConfig(**common, normalize_advantages=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True, help="the workload as JSON (see grpo_vs_trl.py)")
    w = json.loads(p.parse_args().workload)
    load_start = os.getloadavg()[0]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[w["dtype"]]
    transformers.set_seed(w["seed"])
    with open(w["prompts"]) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    # conversational prompts: TRL applies the chat template with the generation prompt, as rlhfkit does
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in prompts]})
    tokenizer = AutoTokenizer.from_pretrained(w["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(w["model_dir"], dtype=dtype)
    lora = LoraConfig(r=w["lora_r"], lora_alpha=w["lora_alpha"], lora_dropout=w["lora_dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    output_dir = tempfile.mkdtemp(prefix=f"trl-{w['algorithm']}-bench-")
    config = trl_config(w, output_dir)
    timer = iteration_timer(w["device"], w["epochs"] * w["num_mini_batches"])
    reward = LengthReward()
    if w["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer_cls = GRPOTrainer if w["algorithm"] == "grpo" else RLOOTrainer
    with contextlib.redirect_stdout(sys.stderr):
        trainer = trainer_cls(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=lora, callbacks=[timer])
        t0 = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - t0
    shutil.rmtree(output_dir, ignore_errors=True)
    print(json.dumps(summary(w, config, timer.marks, reward.tokens, train_seconds, load_start), default=str),
          flush=True)


def summary(w: dict, config, marks: list[float], tokens: list[list[int]], train_seconds: float,
            load_start: float) -> dict:
    total = w["warmup_iterations"] + w["iterations"]
    per_iter = [b - a for a, b in zip(marks, marks[1:])]
    if len(per_iter) != total or len(tokens) != total:
        sys.exit(f"expected {total} iterations, timed {len(per_iter)}, generated {len(tokens)} batches")
    timed = slice(w["warmup_iterations"], None)
    seconds = sum(per_iter[timed])
    episodes = w["iterations"] * w["num_prompts"] * w["num_generations"]
    lengths = [n for batch in tokens[timed] for n in batch]
    peak_gib, memory_kind = peak_memory(w["device"])
    return {
        "framework": "trl", "version": trl.__version__, "algorithm": w["algorithm"],
        "variant": f"{type(config).__name__.replace('Config', 'Trainer')}, LoRA r{w['lora_r']}",
        "episodes": episodes, "seconds": round(seconds, 3), "episodes_per_s": round(episodes / seconds, 4),
        "peak_memory_gib": round(peak_gib, 3), "memory_kind": memory_kind,
        "mean_response_tokens": round(sum(lengths) / len(lengths), 2),
        "iteration_seconds": [round(s, 3) for s in per_iter],  # warm-up included, first
        "train_seconds_total": round(train_seconds, 3), "torch_threads": torch.get_num_threads(),
        "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "trl_config": {k: getattr(config, k, None) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
            "generation_batch_size", "num_generations", "num_iterations", "max_completion_length", "temperature",
            "beta", "learning_rate", "loss_type", "scale_rewards", "normalize_advantages", "use_vllm", "max_steps")},
    }


if __name__ == "__main__":
    main()
