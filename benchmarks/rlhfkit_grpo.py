"""rlhfkit's side of benchmarks/grpo_vs_trl.py: one GRPO or RLOO run on a workload, one JSON line on stdout.

Run by the driver in its own process (so that peak memory is this run's alone), with rlhfkit's venv:

    .venv/bin/python benchmarks/rlhfkit_grpo.py --workload '{"algorithm": "grpo", "model_dir": ..., ...}'

The reward is `bench_common.length_reward`, as on TRL's side.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from bench_common import length_reward, peak_memory


def rlhfkit_config(w: dict, output_dir: str):
    from rlhfkit.config import PPOConfig

    episodes = w["num_prompts"] * w["num_generations"]
    sampling = {"max_new_tokens": w["max_new_tokens"], "temperature": w["temperature"], "top_p": 1.0, "top_k": 0,
                "num_samples": w["num_generations"]}
    if w["vllm"]:
        sampling |= {"backend": "vllm", "vllm_mode": "colocate"}
    return PPOConfig.model_validate({
        "model": w["model_dir"], "prompts_file": w["prompts"], "output_dir": output_dir, "overwrite": True,
        "algorithm": w["algorithm"], "rewards": [{"scorer": "toxicity"}],  # replaced by the length reward
        "sampling": sampling, "max_prompt_length": w["max_prompt_length"],
        "missing_eos_penalty": None,  # TRL has none
        "kl_coef": w["kl_coef"], "learning_rate": w["learning_rate"], "lr_scheduler": "constant",
        "warmup_ratio": 0.0, "max_grad_norm": 1.0,
        "steps": w["warmup_iterations"] + w["iterations"], "batch_size": episodes,
        "mini_batch_size": episodes // w["num_mini_batches"], "ppo_epochs": w["epochs"],
        "lora": {"enabled": True, "r": w["lora_r"], "alpha": w["lora_alpha"], "dropout": w["lora_dropout"],
                 "target_modules": "all-linear"},
        "mixed_precision": "bf16" if w["dtype"] == "bfloat16" else "no", "seed": w["seed"],
        "save_every": None, "log_every": 1, "report_to": "none", "preview": {"num_prompts": 0},
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True, help="the workload as JSON (see grpo_vs_trl.py)")
    w = json.loads(p.parse_args().workload)

    from rlhfkit.online import train_ppo
    from rlhfkit.reward.scorers import FunctionReward

    torch.manual_seed(w["seed"])
    with tempfile.TemporaryDirectory() as out:
        cfg = rlhfkit_config(w, out)
        result = train_ppo(cfg, rewards=FunctionReward(lambda prompt, response: length_reward(response), "length"))
    timed = result.history[w["warmup_iterations"]:]
    seconds = sum(h["time/step"] for h in timed)
    episodes = w["num_prompts"] * w["num_generations"] * len(timed)
    peak, kind = peak_memory(w["device"])
    import rlhfkit

    print(json.dumps({
        "framework": "rlhfkit", "version": rlhfkit.__version__, "algorithm": w["algorithm"],
        "variant": f"{w['algorithm']}, LoRA r{w['lora_r']}", "episodes": episodes, "seconds": round(seconds, 3),
        "episodes_per_s": round(episodes / seconds, 4), "peak_memory_gib": round(peak, 3), "memory_kind": kind,
        "mean_response_tokens": round(sum(h["response/length"] for h in timed) / len(timed), 2),
        "iteration_seconds": [round(h["time/step"], 3) for h in result.history],  # warm-up included, first
        "time_split": {k: round(sum(h[f"time/{k}"] for h in timed) / len(timed), 3)
                       for k in ("generation", "scoring", "training")},
        "torch_threads": torch.get_num_threads(), "pid": os.getpid(),
    }))


if __name__ == "__main__":
    main()
