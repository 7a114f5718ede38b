"""GRPO and RLOO throughput: rlhfkit's online trainer against TRL 1.16's `GRPOTrainer` and `RLOOTrainer`, same workload.

What is measured, per framework and algorithm: episodes (completions) per second over the timed iterations (warm-up
excluded), the peak memory of the run (resident set on CPU, `torch.cuda.max_memory_allocated` on GPU; each run in
its own process) and the mean completion tokens. One iteration = `--num-prompts` prompts x K=`--num-generations`
completions of at most `--max-new-tokens` sampled tokens (temperature 0.7, no top-k/top-p, stopping at EOS), scored
by the same length reward (`bench_common.length_reward`), a reference forward (the policy with its LoRA adapter off)
for the KL (coefficient `--kl-coef`: GRPO's k3 loss term, RLOO's KL in the reward), then `--epochs` x
`--num-mini-batches` optimizer steps. Both sides: LoRA r16 (alpha 32, dropout off: both disable dropout) on all
linear layers, learning rate 1e-5 constant, Adam eps 1e-5, gradients clipped to 1, float32 on CPU. GRPO: rewards
scaled by the group's std, loss = mean over responses of each one's token mean (TRL's loss_type "grpo"); RLOO:
advantages not whitened. Prompts: data/company/train.jsonl, chat template with the generation prompt; the longest
is far under rlhfkit's max_prompt_length (TRL 1.16 has no prompt limit), so neither side cuts one.

TRL runs in its own virtualenv, created on first use outside the repo at
${RLHFKIT_CACHE:-~/.cache/rlhfkit}/benchmarks/venv-trl-1.16.0 (torch 2.13.0 first, then trl 1.16.0 with this venv's
transformers, accelerate and peft), through benchmarks/trl_grpo.py; rlhfkit's side is benchmarks/rlhfkit_grpo.py.

Reproduce (CPU, default workload: 4 prompts x 4 completions, 2 mini-batches, 1 epoch, 32 new tokens, 1 warm-up + 3
timed iterations, float32), with rlhfkit's venv:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/grpo_vs_trl.py --out runs/bench/grpo_vs_trl.json

GPU (unmeasured so far): carry wheels and the tokenizer as for ppo_vs_trl.py (--download-wheels, --export-tokenizer),
then per shape, without and with vLLM (colocated on both sides; vllm must import in both environments):

    python benchmarks/grpo_vs_trl.py --gpu-workload --random-init smollm2-135m --tokenizer DIR --wheels DIR [--vllm]
    python benchmarks/grpo_vs_trl.py --gpu-workload --random-init llama-1b --tokenizer DIR --wheels DIR [--vllm]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_common import (add_shared_args, device_and_model, ensure_trl_venv, log, run_json_script, setup_only,
                          warn_if_busy, write_report)

TRL_VERSION = "1.16.0"
HERE = Path(__file__).resolve().parent
ALGORITHMS = ("grpo", "rloo")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_shared_args(p)
    p.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    p.add_argument("--num-prompts", type=int, default=4, help="prompts per iteration")
    p.add_argument("--num-generations", type=int, default=4, help="K: completions per prompt")
    p.add_argument("--num-mini-batches", type=int, default=2, help="optimizer steps per epoch over an iteration's batch")
    p.add_argument("--epochs", type=int, default=1, help="passes over each iteration's batch (TRL: num_iterations)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="max completion tokens")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--kl-coef", type=float, default=0.05, help="beta (TRL 1.16 RLOO's default; rlhfkit's)")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--vllm", action="store_true", help="sample with vLLM colocated in the trainer's process, both sides")
    p.add_argument("--gpu-workload", action="store_true",
                   help="16 prompts x 4, 4 mini-batches, 128 new tokens, bf16 on cuda (the GPU table)")
    return p.parse_args()


def workload_of(args: argparse.Namespace) -> dict:
    if args.gpu_workload:
        args.num_prompts, args.num_mini_batches, args.max_new_tokens = 16, 4, 128
        args.device, args.dtype = args.device or "cuda", args.dtype or "bfloat16"
    if (args.num_prompts * args.num_generations) % args.num_mini_batches:
        sys.exit("--num-prompts x --num-generations must be a multiple of --num-mini-batches")
    return device_and_model(args) | {
        "prompts": str(Path(args.prompts).resolve()),
        "num_prompts": args.num_prompts, "num_generations": args.num_generations,
        "num_mini_batches": args.num_mini_batches, "epochs": args.epochs,
        "max_new_tokens": args.max_new_tokens, "max_prompt_length": 256, "temperature": args.temperature,
        "kl_coef": args.kl_coef, "learning_rate": args.learning_rate,
        "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
        "vllm": args.vllm, "iterations": args.iterations, "warmup_iterations": args.warmup_iterations,
        "seed": args.seed,
    }


def longest_prompt_tokens(workload: dict) -> int:
    """The longest prompt, chat-formatted, in tokens: checked against max_prompt_length (TRL 1.16 cuts none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workload["model_dir"])
    with open(workload["prompts"]) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return max(len(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]) for p in prompts)


def markdown_table(results: list[dict]) -> str:
    rows = ["| algorithm | framework | episodes/s | peak memory (GiB) | mean completion tokens |",
            "| --- | --- | ---: | ---: | ---: |"]
    for r in results:
        rows.append(f"| {r['algorithm']} | {r['framework']} {r['version']} ({r['variant']}) | "
                    f"{r['episodes_per_s']:.3f} | {r['peak_memory_gib']:.2f} ({r['memory_kind']}) | "
                    f"{r['mean_response_tokens']:.1f} |")
    for algorithm in ALGORITHMS:
        ours = next((r for r in results if r["algorithm"] == algorithm and r["framework"] == "rlhfkit"), None)
        trl = next((r for r in results if r["algorithm"] == algorithm and r["framework"] == "trl"), None)
        if ours and trl:
            rows.append(f"| {algorithm} | ratio rlhfkit / TRL | {ours['episodes_per_s'] / trl['episodes_per_s']:.2f}x | "
                        f"{ours['peak_memory_gib'] / trl['peak_memory_gib']:.2f}x | |")
    return "\n".join(rows)


def main() -> None:
    args = parse_args()
    if setup_only(args, TRL_VERSION):
        return
    workload = workload_of(args)
    longest = longest_prompt_tokens(workload)
    if longest > workload["max_prompt_length"]:
        sys.exit(f"a prompt of {longest} tokens: rlhfkit would cut it, TRL would not; the workloads would differ")
    workload["longest_prompt_tokens"] = longest
    log("workload: " + json.dumps(workload))
    warn_if_busy(workload["device"])
    python = ensure_trl_venv(args.wheels, TRL_VERSION, "from trl import GRPOTrainer, RLOOTrainer",
                             same_as_here=("transformers", "accelerate", "peft")) if args.only != "rlhfkit" else None
    results: list[dict] = []
    for algorithm in args.algorithms:
        w = json.dumps(workload | {"algorithm": algorithm})
        if python is not None:
            results.append(run_json_script([str(python), str(HERE / "trl_grpo.py"), "--workload", w], "TRL",
                                           drop_env=("PYTHONPATH", "VIRTUAL_ENV")))
        if args.only != "trl":
            results.append(run_json_script([sys.executable, str(HERE / "rlhfkit_grpo.py"), "--workload", w], "rlhfkit"))
    print(markdown_table(results))
    write_report({"workload": workload, "results": results}, args.out)


if __name__ == "__main__":
    main()
