"""The vLLM sampling server: vLLM's engine behind four HTTP routes, run in a virtualenv of its own (`make vllm-env`).

    .venv-vllm/bin/python src/rlhfkit/vllm_serve.py --model PATH [--port 8000] [--max-lora-rank 16]
    rlhfkit vllm-serve --model smollm2-135m-instruct     (the same, launched from the project's environment)

vLLM pins its own transformers and torch builds, so it cannot share the trainer's environment; the trainer
(rlhfkit.rollout.vllm_backend) talks to this process over HTTP instead, as TRL's `trl vllm-serve` does:

  GET  /health        what is served: the model, the policy version, the LoRA rank limit
  POST /generate      token ids in; K samples of each, their token ids and log pi(a_t), and the policy version
  POST /load_adapter  a PEFT adapter directory, served under a new LoRA id from now on (vLLM caches by id)
  POST /load_weights  a safetensors file of full weights (HF names), loaded into the served model in place

The log-probs are those of the distribution sampled from (after temperature, top-k and top-p): the engine runs with
`logprobs_mode="processed_logprobs"`. This file imports nothing from rlhfkit (the vLLM virtualenv has none of its
dependencies): run it as a script by its path.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

# One process: the engine core in this one, so that weights can be loaded into its model in place.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from pydantic import BaseModel, Field  # noqa: E402  (vLLM depends on both)


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


class GenerateRequest(BaseModel):
    """K samples of each prompt (token ids, no padding) under temperature / top-k / top-p."""

    prompts: list[list[int]] = Field(min_length=1)
    n: int = Field(1, ge=1)
    max_tokens: int = Field(ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: off
    stop_token_ids: list[int] = []  # the only tokens that end a sample (EOS included only if listed)
    seed: int | None = None


class Sample(BaseModel):
    token_ids: list[int]  # up to and including the stop token
    logprobs: list[float]  # log pi(a_t) of each, under the distribution sampled from


class GenerateResponse(BaseModel):
    samples: list[list[Sample]]  # per prompt, its n samples
    version: int  # the policy version these were sampled with (-1: the served model as started)


class LoadRequest(BaseModel):
    path: str  # an adapter directory (load_adapter) or a .safetensors file (load_weights)
    version: int = Field(ge=0)  # the trainer's update count: reported back by /generate from now on


class Health(BaseModel):
    model: str  # what the server was started with
    weights: str  # where the weights served come from: the model, or the last file pushed to /load_weights
    version: int
    adapter: str | None  # the adapter directory served, if any
    max_lora_rank: int
    dtype: str


class Sampler:
    """vLLM's engine and the policy version it serves; one request at a time (the engine is not re-entrant)."""

    def __init__(self, model: str, dtype: str, max_lora_rank: int, max_model_len: int, kv_cache_gib: float,
                 seed: int):
        from vllm import LLM

        # vLLM takes only some ranks: the smallest of them that holds the trainer's
        max_lora_rank = min((r for r in LORA_RANKS if r >= max_lora_rank), default=max_lora_rank)
        self.model, self.dtype, self.max_lora_rank = model, dtype, max_lora_rank
        self.llm = LLM(model=model, dtype=dtype, enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1,
                       max_model_len=max_model_len, logprobs_mode="processed_logprobs", seed=seed,
                       kv_cache_memory_bytes=int(kv_cache_gib * 2**30), enforce_eager=True)
        self.lock = threading.Lock()
        self.version = -1
        self.weights = model
        self.lora = None  # the LoRARequest served, None: the base weights alone
        self.loads = 0  # adapters loaded so far: each gets the next LoRA id, never one used before

    def health(self) -> Health:
        return Health(model=self.model, weights=self.weights, version=self.version,
                      adapter=self.lora.lora_path if self.lora else None, max_lora_rank=self.max_lora_rank,
                      dtype=self.dtype)

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        """Sample; every sampled token comes back with its log-prob (logprobs=0: the sampled token's only)."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(n=request.n, max_tokens=request.max_tokens, temperature=request.temperature,
                                top_p=request.top_p, top_k=request.top_k if request.top_k > 0 else -1,
                                stop_token_ids=request.stop_token_ids, ignore_eos=True, logprobs=0,
                                seed=request.seed, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request.prompts]
        with self.lock:
            outputs = self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
            version = self.version
        samples = [[Sample(token_ids=list(c.token_ids),
                           logprobs=[step[token].logprob for step, token in zip(c.logprobs, c.token_ids)])
                    for c in out.outputs] for out in outputs]
        return GenerateResponse(samples=samples, version=version)

    def load_adapter(self, request: LoadRequest) -> Health:
        """Serve the adapter at `path` from now on, under a LoRA id never used before: vLLM keeps adapters by id, so
        reusing one (a second run pushing its version 1 too) could serve the cached weights of another adapter."""
        from vllm.lora.request import LoRARequest

        with self.lock:
            self.loads += 1
            lora = LoRARequest(f"policy-{request.version}-{self.loads}", self.loads, request.path)
            self.llm.llm_engine.add_lora(lora)  # load now: a bad adapter fails this request, not the next sample
            self.lora, self.version = lora, request.version
        return self.health()

    def load_weights(self, request: LoadRequest) -> Health:
        """Load full weights (HF parameter names) into the served model in place; the prefix cache is dropped, as
        it holds keys and values computed with the old weights. Any adapter is dropped too."""
        from safetensors.torch import load_file

        weights = load_file(request.path)
        with self.lock:
            # vLLM's in-place reload (the layers wrapped for LoRA included), then the state derived from the old weights
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items())})
            self.llm.apply_model(repack_kept_weights)
            self.llm.reset_prefix_cache()
            self.lora, self.version, self.weights = None, request.version, request.path
        return self.health()


def repack_kept_weights(model) -> None:
    """Pack again the kernel copies of the weights of layers that keep their weight tensor (vLLM's CPU kernels pack
    a copy at load): the in-place reload updates an LM head tied to the embedding but not its packed copy, so it
    would go on computing logits with the first weights (measured: log-prob gaps of 0.9 after a pushed update)."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and hasattr(module, "quant_method") and weight is not None and weight.numel():
            module.quant_method.process_weights_after_loading(module)


def build_app(sampler: Sampler):
    """The HTTP routes over `sampler` (FastAPI: typed requests and responses)."""
    from fastapi import FastAPI

    from fastapi.responses import JSONResponse

    app = FastAPI(title="rlhfkit vLLM sampler")

    @app.exception_handler(Exception)
    async def failed(request, error: Exception):  # the trainer's error line says what went wrong here
        return JSONResponse(status_code=500, content={"detail": f"{type(error).__name__}: {error}"})

    app.get("/health")(sampler.health)
    app.post("/generate")(sampler.generate)
    app.post("/load_adapter")(sampler.load_adapter)
    app.post("/load_weights")(sampler.load_weights)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model directory (HF format; the trainer's base model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="float32", help="float32 (exact log-probs on CPU), bfloat16, ...")
    parser.add_argument("--max-lora-rank", type=int, default=16, help="at least the trainer's lora.r")
    parser.add_argument("--max-model-len", type=int, default=2048, help="prompt + response tokens at most")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0,
                        help="memory for the KV cache (vLLM's CPU default takes most of the machine's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import uvicorn

    started = time.perf_counter()
    sampler = Sampler(args.model, args.dtype, args.max_lora_rank, args.max_model_len, args.kv_cache_gib,
                      args.seed)
    print(f"vLLM engine ready in {time.perf_counter() - started:.1f} s; serving {args.model} on "
          f"http://{args.host}:{args.port}", flush=True)
    uvicorn.run(build_app(sampler), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
