"""Sampling alone: tokens/s of rlhfkit's rollout engine against Hugging Face `generate`, same model, batch, length.

Both sample exactly `--new-tokens` tokens per row (no stop token), temperature 0.7, from the same left-padded batch
of chat-formatted company prompts; each is timed `--repeats` times, interleaved (engine, generate, engine, ...),
and the best time of each is reported, which on a shared machine is the least disturbed one. With `--lora` the
model carries a LoRA adapter (r=16, all linear layers, non-zero weights) as the policy does during PPO: `generate`
runs it unmerged, as TRL's and rlhfkit's earlier rollouts did; the engine folds it into the weights.

    .venv/bin/python benchmarks/sampling.py                        # bundled model, batch 8, 48 new tokens
    .venv/bin/python benchmarks/sampling.py --lora --batch-size 32
    python benchmarks/sampling.py --device cuda --dtype bfloat16 --model DIR --batch-size 64 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def build(args):
    from rlhfkit.config import LoraSettings
    from rlhfkit.models.loading import apply_lora, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, dtype=args.dtype)
    if args.lora:
        model = apply_lora(model, LoraSettings(r=16, alpha=32, dropout=0.0))
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.01)  # as after some training: the adapter changes the function
    return model.to(args.device).eval(), tokenizer


def prompts(args) -> list[str]:
    from rlhfkit.data.records import load_prompts

    rows = [r.prompt for r in load_prompts(REPO / "data" / "company" / "train.jsonl")]
    return [rows[i % len(rows)] for i in range(args.batch_size)]


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rlhfkit.rollout import Sampling, encode_prompts, sample

    model, tokenizer = build(args)
    query_ids, query_mask = encode_prompts(tokenizer, prompts(args))
    query_ids, query_mask = query_ids.to(args.device), query_mask.to(args.device)
    n = args.new_tokens
    sampling = Sampling(max_new_tokens=n, temperature=0.7)

    def engine():
        sample(model, query_ids, query_mask, sampling, stop_ids=[], pad_id=tokenizer.pad_token_id)

    def generate():
        with torch.no_grad():
            model.generate(input_ids=query_ids, attention_mask=query_mask, do_sample=True, temperature=0.7, top_k=0,
                           top_p=1.0, max_new_tokens=n, min_new_tokens=n, pad_token_id=tokenizer.pad_token_id)

    engine(), generate()  # warm-up
    times = {"engine": [], "hf_generate": []}
    for _ in range(args.repeats):
        times["engine"].append(timed(engine, args.device))
        times["hf_generate"].append(timed(generate, args.device))
    tokens = args.batch_size * n
    result = {
        "model": args.model, "lora": args.lora, "batch_size": args.batch_size, "prompt_width": query_ids.shape[1],
        "new_tokens": n, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
        **{f"{k}_tokens_per_s": round(tokens / min(v), 1) for k, v in times.items()},
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }
    result["speedup"] = round(min(times["hf_generate"]) / min(times["engine"]), 2)
    print(f"| sampler | tokens/s | best of {args.repeats} (s) |\n| --- | ---: | ---: |")
    for k, v in times.items():
        print(f"| {k} | {tokens / min(v):.1f} | {min(v):.2f} |")
    print(f"engine / generate: {result['speedup']}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
