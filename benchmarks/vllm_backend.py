"""The vLLM sampling backend against the engine, in one run on one machine: the server's start time, GRPO seconds
per step with each backend on the same tiny workload (bundled model, LoRA, fp32), and the log-prob gap between
what vLLM recorded and the trainer's forward (`rollout/logprob_gap_*`), in the server's dtype.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vllm_backend.py                 # after `make vllm-env`
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vllm_backend.py --server-dtype bfloat16 --backends vllm
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vllm_backend.py --server-dtype bfloat16 --trainer-precision bf16

The server runs with one thread (VLLM_CPU_OMP_THREADS_BIND=nobind, OMP_NUM_THREADS=1), as the trainer does, so
that neither backend gets more cores than the other. Steps after the first are timed (the first warms up).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from rlhfkit.config import PPOConfig  # noqa: E402
from rlhfkit.models import DEFAULT_MODEL  # noqa: E402
from rlhfkit.models.registry import resolve_model  # noqa: E402
from rlhfkit.online import train_ppo  # noqa: E402
from rlhfkit.reward.scorers import FunctionReward  # noqa: E402
from rlhfkit.rollout.vllm_backend import SamplerError, VLLMClient  # noqa: E402


def start_server(port: int, dtype: str, log: Path) -> tuple[subprocess.Popen, float]:
    """(the server process, seconds until /health answered)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    started = time.perf_counter()
    process = subprocess.Popen([str(REPO / ".venv-vllm" / "bin" / "python"), str(REPO / "src/rlhfkit/vllm_serve.py"),
                                "--model", resolve_model(DEFAULT_MODEL), "--port", str(port), "--dtype", dtype,
                                "--max-lora-rank", "8"], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    while True:
        try:
            VLLMClient(f"http://127.0.0.1:{port}", timeout=5).health()
            return process, time.perf_counter() - started
        except SamplerError:
            if process.poll() is not None:
                sys.exit(f"the server died:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def grpo(backend: str, url: str, out: Path, args) -> list[dict]:
    """The logged metrics of a GRPO run with `backend`."""
    cfg = PPOConfig.model_validate(dict(
        model=DEFAULT_MODEL, prompts_file=str(REPO / "data/company/train.jsonl"), output_dir=str(out),
        algorithm="grpo", rewards=[{"scorer": "toxicity"}], steps=args.steps, batch_size=args.prompts * 2,
        mini_batch_size=args.prompts * 2, ppo_epochs=1, learning_rate=1e-4, lora={"r": 8}, preview={"num_prompts": 0},
        mixed_precision=args.trainer_precision,
        sampling={"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "num_samples": 2, "backend": backend,
                  "vllm_url": url}))
    return train_ppo(cfg, FunctionReward(lambda p, r: r.count("e") / max(len(r), 1), "frac_e")).history


def pieces(url: str, sync_dir: Path, args, repeats: int = 5) -> dict[str, float]:
    """Median seconds of a generation's parts on the same batch: pushing a LoRA adapter, vLLM sampling, the engine
    sampling (adapter folded)."""
    import torch

    from rlhfkit.config import LoraSettings
    from rlhfkit.data.records import load_prompts
    from rlhfkit.models import apply_lora, load_causal_lm, load_tokenizer
    from rlhfkit.rollout import Sampling, encode_prompts, sample, stop_token_ids
    from rlhfkit.rollout.vllm_backend import VLLMSampler

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    policy = apply_lora(load_causal_lm(DEFAULT_MODEL, dtype="float32"), LoraSettings(r=8, dropout=0.0)).eval()
    prompts = [r.prompt for r in load_prompts(REPO / "data/company/train.jsonl")][:args.prompts]
    query_ids, query_mask = encode_prompts(tokenizer, prompts)
    sampling = Sampling(args.max_new_tokens, temperature=1.0, num_samples=2)
    stop_ids, pad = stop_token_ids(tokenizer, policy), tokenizer.pad_token_id
    sampler = VLLMSampler(url, sync_dir)
    times: dict[str, list[float]] = {"push adapter": [], "vllm sample": [], "engine sample": []}
    for version in range(repeats):
        for name, run in (("push adapter", lambda: sampler.push(policy, version)),
                          ("vllm sample", lambda: sampler.sample(query_ids, query_mask, sampling, stop_ids, pad)),
                          ("engine sample", lambda: sample(policy, query_ids, query_mask, sampling, stop_ids, pad))):
            started = time.perf_counter()
            with torch.no_grad():
                run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (2 samples each)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--server-dtype", default="float32")
    parser.add_argument("--trainer-precision", default="no", help="the trainer's mixed_precision: no, bf16")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--backends", default="engine,vllm", help="comma-separated; the ratio needs both")
    parser.add_argument("--pieces", action="store_true", help="also time a generation's parts on their own")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server, start_s = start_server(args.port, args.server_dtype, tmp / "server.log")
        try:
            url = f"http://127.0.0.1:{args.port}"
            runs = {b: grpo(b, url, tmp / b, args) for b in args.backends.split(",")}
            parts = pieces(url, tmp / "pieces", args) if args.pieces else {}
        finally:
            server.terminate()
            server.wait(30)
    print(f"server start (engine ready, /health answering): {start_s:.1f} s ({args.server_dtype})")
    timed = {b: [h for h in history[1:]] for b, history in runs.items()}
    for backend, rows in timed.items():
        step = statistics.median(h["time/step"] for h in rows)
        gen = statistics.median(h["time/generation"] for h in rows)
        gaps = [(h["rollout/logprob_gap_max"], h["rollout/logprob_gap_mean"]) for h in runs[backend]]
        print(f"{backend:6s} step {step:.2f} s (generation {gen:.2f} s); log-prob gap max "
              f"{max(g[0] for g in gaps):.2e}, mean {statistics.mean(g[1] for g in gaps):.2e}")
    for name, seconds in parts.items():
        print(f"{name}: {seconds:.2f} s (median of 5)")
    if set(timed) != {"engine", "vllm"}:
        return
    ratio = statistics.median(h["time/step"] for h in timed["vllm"]) / statistics.median(
        h["time/step"] for h in timed["engine"])
    print(f"vllm / engine seconds per GRPO step: {ratio:.2f} ({args.prompts} prompts x 2 samples, "
          f"{args.max_new_tokens} new tokens, {args.steps - 1} timed steps each)")


if __name__ == "__main__":
    main()
