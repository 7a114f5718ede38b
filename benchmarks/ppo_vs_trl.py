"""PPO throughput: rlhfkit's PPO trainer against TRL 1.12.0's `trl.experimental.ppo.PPOTrainer`, same workload.

What is measured, per framework: PPO episodes (rollouts) per second over the timed iterations (warm-up iterations
excluded), the peak memory of the run (resident set on CPU, `torch.cuda.max_memory_allocated` on GPU), and the mean
number of response tokens per episode. One PPO iteration = `--batch-size` rollouts of at most `--response-length`
sampled tokens (temperature 0.7, no top-k/top-p, stopping at EOS unless --stop-token none), scored by a reward model, with reference and value
forwards, then `--ppo-epochs` x `--num-mini-batches` optimizer steps. Policy, reference, value and reward models are
all built from the bundled SmolLM2-135M-Instruct (value/reward: a randomly initialised, seeded scalar head).

TRL runs in its own virtualenv (it must not share rlhfkit's dependency pins), created on first use outside the repo
at ${RLHFKIT_CACHE:-~/.cache/rlhfkit}/benchmarks/venv-trl-1.12.0, through benchmarks/trl_ppo.py.

Reproduce (CPU, default workload: batch 8, 2 mini-batches, 1 PPO epoch, 24 new tokens, 1 warm-up + 3 timed
iterations, float32), with rlhfkit's venv (`make test` creates it):

    .venv/bin/python benchmarks/ppo_vs_trl.py --only trl               # TRL only
    .venv/bin/python benchmarks/ppo_vs_trl.py --out runs/bench.json    # both, results to JSON

On an offline GPU machine whose Python already has torch/transformers/peft/accelerate: on a machine with network,

    .venv/bin/python benchmarks/ppo_vs_trl.py --download-wheels /tmp/trl-wheels [--wheels-python 3.12]
    .venv/bin/python benchmarks/ppo_vs_trl.py --export-tokenizer /tmp/smollm2-tokenizer

(trl, datasets, pandas, a pyarrow wheel stripped of its Flight/S3 libraries...: about 48 MiB; the bundled model's
tokenizer: 2 MiB), carry both over and run the GPU workload on randomly initialised weights of the SmolLM2-135M
shape and of a 1.07B Llama shape (bf16, batch 64, 4 minibatches, 1 epoch, 128 new tokens, no stop token):

    python benchmarks/ppo_vs_trl.py --gpu-workload --random-init smollm2-135m --tokenizer /tmp/smollm2-tokenizer --wheels /tmp/trl-wheels
    python benchmarks/ppo_vs_trl.py --gpu-workload --random-init llama-1b --tokenizer /tmp/smollm2-tokenizer --wheels /tmp/trl-wheels
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_common import (add_shared_args, device_and_model, ensure_trl_venv, log, run_json_script,
                          setup_only, warn_if_busy, write_report)

TRL_VERSION = "1.12.0"
TRL_SCRIPT = Path(__file__).resolve().parent / "trl_ppo.py"


def run_trl(workload: dict, python: Path) -> dict:
    cmd = [
        str(python), str(TRL_SCRIPT),
        "--model", workload["model_dir"],
        "--prompts", workload["prompts"],
        "--batch-size", str(workload["batch_size"]),
        "--num-mini-batches", str(workload["num_mini_batches"]),
        "--ppo-epochs", str(workload["ppo_epochs"]),
        "--response-length", str(workload["response_length"]),
        "--temperature", str(workload["temperature"]),
        "--stop-token", workload["stop_token"],
        "--iterations", str(workload["iterations"]),
        "--warmup-iterations", str(workload["warmup_iterations"]),
        "--device", workload["device"],
        "--dtype", workload["dtype"],
        "--seed", str(workload["seed"]),
    ]
    return run_json_script(cmd, "TRL", drop_env=("PYTHONPATH", "VIRTUAL_ENV"))


RLHFKIT_SCRIPT = Path(__file__).resolve().parent / "rlhfkit_ppo.py"
# rlhfkit configurations run on each workload: TRL's design (full fine-tuning, a separate critic), then the
# cheap one rlhfkit recommends (LoRA adapters; the reference is the policy with its adapter off).
RLHFKIT_VARIANTS = (["--critic", "separate"], ["--lora", "--critic", "separate"], ["--lora", "--critic", "value_head"])


def run_rlhfkit(workload: dict, variant: list[str]) -> dict:
    """rlhfkit's PPO on `workload` in its own process (peak memory is then this run's alone)."""
    cmd = [sys.executable, str(RLHFKIT_SCRIPT), "--workload", json.dumps(workload), *variant]
    return run_json_script(cmd, "rlhfkit")


def markdown_table(results: list[dict]) -> str:
    rows = [
        "| framework | episodes/s | peak memory (GiB) | mean response tokens |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in results:
        name = f"{r['framework']} {r.get('version', '')}".strip() + (f" ({r['variant']})" if r.get("variant") else "")
        rows.append(f"| {name} | {r['episodes_per_s']:.3f} | {r['peak_memory_gib']:.2f} ({r['memory_kind']}) "
                    f"| {r['mean_response_tokens']:.1f} |")
    trl = next((r for r in results if r["framework"] == "trl"), None)
    for r in results:
        if trl is not None and r is not trl:
            rows.append(f"| ratio: {r['variant']} / TRL | {r['episodes_per_s'] / trl['episodes_per_s']:.2f}x "
                        f"| {r['peak_memory_gib'] / trl['peak_memory_gib']:.2f}x | |")
    return "\n".join(rows)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_shared_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="rollouts (episodes) per PPO iteration")
    p.add_argument("--num-mini-batches", type=int, default=2)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--response-length", type=int, default=24, help="max new tokens per rollout")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (TRL's default)")
    p.add_argument("--stop-token", choices=["eos", "none"], default="eos",
                   help="eos: rollouts stop at EOS (TRL's stop_token='eos'); none: always --response-length tokens")
    p.add_argument("--gpu-workload", action="store_true",
                   help="batch 64, 4 mini-batches, 128 new tokens, no stop token, bf16 on cuda (the GPU table)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if setup_only(args, TRL_VERSION):
        return
    if args.gpu_workload:
        args.batch_size, args.num_mini_batches, args.response_length, args.stop_token = 64, 4, 128, "none"
        args.device, args.dtype = args.device or "cuda", args.dtype or "bfloat16"
    where = device_and_model(args)
    workload = {
        "model": where["model"],
        "model_dir": where["model_dir"],
        "prompts": str(Path(args.prompts).resolve()),
        "batch_size": args.batch_size,
        "num_mini_batches": args.num_mini_batches,
        "ppo_epochs": args.ppo_epochs,
        "response_length": args.response_length,
        "temperature": args.temperature,
        "stop_token": args.stop_token,
        "iterations": args.iterations,
        "warmup_iterations": args.warmup_iterations,
        "device": where["device"],
        "dtype": where["dtype"],
        "seed": args.seed,
    }
    log("workload: " + json.dumps(workload))
    warn_if_busy(workload["device"])

    results: list[dict] = []
    if args.only in ("trl", "both"):
        python = ensure_trl_venv(args.wheels, TRL_VERSION, "import trl.experimental.ppo")
        results.append(run_trl(workload, python))
    if args.only in ("rlhfkit", "both"):
        for variant in RLHFKIT_VARIANTS:
            results.append(run_rlhfkit(workload, variant))

    print(markdown_table(results))
    write_report({"workload": workload, "results": results}, args.out)


if __name__ == "__main__":
    main()
