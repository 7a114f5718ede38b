"""rlhfkit's side of benchmarks/ppo_vs_trl.py: one PPO run on a workload, one JSON line of figures on stdout.

Run by the driver in its own process (so that peak memory is this run's alone), with rlhfkit's venv:

    .venv/bin/python benchmarks/rlhfkit_ppo.py --workload '{"model_dir": ..., "batch_size": 8, ...}' [--lora] [--critic value_head]

The reward model is built the way TRL's side builds its own: the same backbone with a seeded random scalar head.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from bench_common import peak_memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True, help="the workload as JSON (see ppo_vs_trl.py)")
    p.add_argument("--lora", action="store_true", help="LoRA r=16 on all linear layers of policy and critic")
    p.add_argument("--critic", choices=["separate", "value_head"], default="separate")
    args = p.parse_args()
    w = json.loads(args.workload)

    from rlhfkit.config import PPOConfig
    from rlhfkit.online import train_ppo
    from rlhfkit.reward.model import RewardModel

    torch.manual_seed(w["seed"])
    device = "cuda" if w["device"] == "cuda" else "cpu"
    reward_model = RewardModel.from_base(w["model_dir"]).to(device)
    if w["dtype"] == "bfloat16":
        reward_model.to(torch.bfloat16)

    class RandomHeadReward:
        name = "reward"

        def score(self, prompts, responses):
            return reward_model.raw_scores(list(prompts), list(responses), batch_size=w["batch_size"]).float()

    steps = w["warmup_iterations"] + w["iterations"]
    with tempfile.TemporaryDirectory() as out:
        cfg = PPOConfig.model_validate({
            "model": w["model_dir"], "prompts_file": w["prompts"], "output_dir": out, "overwrite": True,
            "rewards": [{"scorer": "toxicity"}],  # replaced by the reward model above
            "sampling": {"max_new_tokens": w["response_length"], "temperature": w["temperature"],
                         "stop_token_ids": None if w["stop_token"] == "eos" else []},
            "missing_eos_penalty": 1.0 if w["stop_token"] == "eos" else None,
            "steps": steps, "batch_size": w["batch_size"], "mini_batch_size": w["batch_size"] // w["num_mini_batches"],
            "ppo_epochs": w["ppo_epochs"], "lora": {"enabled": args.lora}, "critic": args.critic,
            "mixed_precision": "bf16" if w["dtype"] == "bfloat16" else "no", "seed": w["seed"],
            "save_every": None, "preview": {"num_prompts": 0},
        })
        result = train_ppo(cfg, rewards=RandomHeadReward())
    timed = result.history[w["warmup_iterations"]:]
    seconds = sum(h["time/step"] for h in timed)
    episodes = w["batch_size"] * len(timed)
    peak, kind = peak_memory(device)
    import rlhfkit

    variant = ("LoRA r16" if args.lora else "full fine-tuning") + (", value head" if args.critic == "value_head" else ", separate critic")
    print(json.dumps({
        "framework": "rlhfkit", "version": rlhfkit.__version__, "variant": variant, "episodes": episodes,
        "seconds": round(seconds, 3), "episodes_per_s": episodes / seconds, "peak_memory_gib": round(peak, 3),
        "memory_kind": kind, "mean_response_tokens": sum(h["response/length"] for h in timed) / len(timed),
        "time_split": {k: round(sum(h[f"time/{k}"] for h in timed) / len(timed), 3)
                       for k in ("generation", "scoring", "training")},
        "device": w["device"], "threads": torch.get_num_threads(), "pid": os.getpid(),
    }))


if __name__ == "__main__":
    main()
