"""The vLLM sampling backend (`sampling.backend: vllm`): the rollout engine's `sample`, answered by a vLLM server
(`rlhfkit vllm-serve`, rlhfkit.vllm_serve) running in its own virtualenv, with the policy pushed to it after every
update.

What comes back is recorded as the engine records it: the sampled token ids and log pi(a_t) under the distribution
sampled from (vLLM's processed log-probs: after temperature, top-k and top-p), in a `Rollout` of the same shapes.
vLLM gives no per-token entropy; -log pi(a_t) stands in for it (its expectation under pi is H(pi), so means over
tokens estimate the entropy without bias).

The policy reaches the server as a PEFT adapter directory (LoRA) or a safetensors file of full weights, tagged with
the trainer's update count. A policy whose updates never reach the sampler trains on its own stale samples and
learns nothing while looking fine; two checks stop it: every answer says which version it was sampled with, which
must be the trainer's, and the recorded log-probs must stay within `sampling.vllm_max_logprob_gap` of the trainer's
forward on average (`check_gap`: a reload that silently kept the old weights passes the first check, not this one).
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rlhfkit.errors import RlhfkitError
from rlhfkit.rollout.batch import Rollout, truncate_after_stop
from rlhfkit.rollout.distribution import Sampling

START_HINT = "start it with `rlhfkit vllm-serve --model MODEL` (after `make vllm-env`; see docs/scale.md)"


class SamplerError(RlhfkitError):
    """The vLLM server is unreachable, refused a request, or sampled with another policy than the trainer's."""


class VLLMClient:
    """JSON over HTTP to a `rlhfkit vllm-serve` server at `url`."""

    def __init__(self, url: str, timeout: float = 600.0):
        self.url, self.timeout = url.rstrip("/"), timeout

    def call(self, route: str, payload: dict | None = None) -> dict:
        """GET (no payload) or POST `route`; a dead server or a refused request is one clear SamplerError."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + route, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            raise SamplerError(f"the vLLM server at {self.url} refused {route}: {e.code} {e.read().decode()[:2000]}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise SamplerError(f"no vLLM server answers at {self.url} ({reason}): {START_HINT}, or set "
                               "sampling.vllm_url to where it runs") from None

    def health(self) -> dict:
        return self.call("/health")

    def generate(self, prompts: list[list[int]], sampling: Sampling, stop_ids: Sequence[int],
                 seed: int | None = None) -> tuple[list[list[dict]], int]:
        """(per prompt its K samples {"token_ids", "logprobs"}, the policy version they were sampled with)."""
        answer = self.call("/generate", {
            "prompts": prompts, "n": sampling.num_samples, "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "stop_token_ids": list(stop_ids), "seed": seed})
        return answer["samples"], answer["version"]

    def load_adapter(self, path: Path, version: int) -> dict:
        return self.call("/load_adapter", {"path": str(Path(path).resolve()), "version": version})

    def load_weights(self, path: Path, version: int) -> dict:
        return self.call("/load_weights", {"path": str(Path(path).resolve()), "version": version})


class ColocatedClient(VLLMClient):
    """The server's routes answered by a vLLM engine in this process (`sampling.vllm_mode: colocate`), where vllm
    imports beside the trainer's packages: no HTTP, the same requests and answers, the same checks."""

    def __init__(self, model: str, max_lora_rank: int, kv_cache_gib: float = 1.0):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise SamplerError("sampling.vllm_mode: colocate needs vllm importable in the trainer's environment, and "
                               "vLLM pins its own torch and transformers; use vllm_mode: server with "
                               f"{START_HINT}") from None
        from rlhfkit import vllm_serve

        self.engine = vllm_serve.Sampler(model, "float32", max_lora_rank, 2048, kv_cache_gib, seed=0)
        self.routes = {"/health": (self.engine.health, None),
                       "/generate": (self.engine.generate, vllm_serve.GenerateRequest),
                       "/load_adapter": (self.engine.load_adapter, vllm_serve.LoadRequest),
                       "/load_weights": (self.engine.load_weights, vllm_serve.LoadRequest)}
        self.url = "the colocated vLLM engine"

    def call(self, route: str, payload: dict | None = None) -> dict:
        method, request = self.routes[route]
        try:
            answer = method() if request is None else method(request(**payload))
        except Exception as e:  # as the server reports it: what failed, in one line
            raise SamplerError(f"{self.url} failed {route}: {type(e).__name__}: {e}") from e
        return answer.model_dump()


def to_rollout(samples: list[list[dict]], query_ids: torch.Tensor, query_mask: torch.Tensor,
               stop_ids: Sequence[int], pad_id: int) -> Rollout:
    """The server's samples as the engine's `Rollout`: rows prompt-major, responses right-padded and cut after the
    first stop token, log pi(a_t) recorded (0 where masked), -log pi(a_t) as the entropy estimate."""
    rows = [s for per_prompt in samples for s in per_prompt]
    k = len(samples[0])
    width = max(1, max(len(s["token_ids"]) for s in rows))
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    logprobs = torch.zeros((len(rows), width))
    for i, s in enumerate(rows):
        tokens[i, :len(s["token_ids"])] = torch.tensor(s["token_ids"], dtype=torch.long)
        logprobs[i, :len(s["logprobs"])] = torch.tensor(s["logprobs"])
    response, response_mask, ended = truncate_after_stop(tokens, stop_ids, pad_id)
    logprobs = logprobs * response_mask
    group = torch.arange(len(samples)).repeat_interleave(k)
    device = query_ids.device
    return Rollout(query_ids[group.to(device)], query_mask[group.to(device)], response.to(device),
                   response_mask.to(device), ended.to(device), group.to(device), logprobs=logprobs.to(device),
                   entropy=(-logprobs).to(device))


class VLLMSampler:
    """The trainer's side of the backend: pushes the policy after each update, samples, checks the version."""

    def __init__(self, client: VLLMClient | str, sync_dir: Path):
        self.client = VLLMClient(client) if isinstance(client, str) else client
        self.sync_dir = Path(sync_dir)
        self.pushed: int | None = None  # the version last pushed
        self.client.health()  # fails fast, with the fix, when no server runs

    def push(self, lm: nn.Module, version: int) -> None:
        """Make the server sample from `lm` as it is at update `version`: its adapter when it is a peft model (after
        the base weights, the first time, if the server was started with another model), else its full weights."""
        if self.pushed == version:
            return
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        if hasattr(lm, "peft_config"):
            if self.pushed is None and not self._serves_base(lm):
                self._push_weights(base_state_dict(lm), version)
            target = self.sync_dir / f"adapter-{version}"
            lm.save_pretrained(target, save_embedding_layers=False)
            self.client.load_adapter(target, version)
            self._remove_older(target)
        else:
            self._push_weights(lm.state_dict(), version)
        self.pushed = version

    def _serves_base(self, lm: nn.Module) -> bool:
        """Whether the server serves the peft model's base weights as they are in its directory (started with it,
        and no full weights pushed since, by this run or another)."""
        base = lm.get_base_model().config._name_or_path
        try:
            return Path(base).resolve() == Path(self.client.health()["weights"]).resolve()
        except (OSError, TypeError):
            return False

    def _push_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        from safetensors.torch import save_file

        target = self.sync_dir / f"weights-{version}.safetensors"
        save_file(untied(state), str(target))
        try:
            self.client.load_weights(target, version)
        finally:
            target.unlink()  # loaded into the served model (the model's size on disk)

    def close(self) -> None:
        """Remove the pushed files (the server has loaded them; full weights are the model's size)."""
        shutil.rmtree(self.sync_dir, ignore_errors=True)

    def _remove_older(self, keep: Path) -> None:
        """Earlier adapters: the server has loaded `keep` and needs none of them."""
        for old in self.sync_dir.glob("adapter-*"):
            if old != keep:
                shutil.rmtree(old)

    def sample(self, query_ids: torch.Tensor, query_mask: torch.Tensor, sampling: Sampling,
               stop_ids: Sequence[int], pad_id: int, seed: int | None = None) -> Rollout:
        """`rlhfkit.rollout.sample`'s result, drawn by the server from the policy last pushed."""
        prompts = [row[mask.bool()].tolist() for row, mask in zip(query_ids.cpu(), query_mask.cpu())]
        samples, version = self.client.generate(prompts, sampling, stop_ids, seed)
        if self.pushed is not None and version != self.pushed:
            raise SamplerError(
                f"the vLLM server at {self.client.url} sampled with policy version {version}, not {self.pushed} (the "
                "trainer's update count): its updates do not reach the sampler, so training would go on with a stale "
                "policy. Is another trainer pushing to the same server? Give each run a server of its own.")
        return to_rollout(samples, query_ids, query_mask, stop_ids, pad_id)


def connect(settings, sync_dir: Path, model: str, max_lora_rank: int) -> VLLMSampler:
    """The sampler for `settings` (a SamplingConfig with backend vllm): the server at `vllm_url`, or with
    `vllm_mode: colocate` an engine in this process started on `model` (see `engine_model`)."""
    if settings.vllm_mode == "colocate":
        return VLLMSampler(ColocatedClient(engine_model(model), max_lora_rank), sync_dir)
    return VLLMSampler(settings.vllm_url, sync_dir)


def engine_model(name: str) -> str:
    """A full model directory to start a colocated engine on: `name` resolved, or an adapter's base (the trainer
    pushes the weights it actually starts from at its first rollout)."""
    from rlhfkit.models.registry import resolve_model

    path = Path(resolve_model(name))
    adapter = path / "adapter_config.json"
    if not (path / "config.json").is_file() and adapter.is_file():
        return engine_model(json.loads(adapter.read_text())["base_model_name_or_path"])
    return str(path)


def check_gap(gap_mean: float, limit: float | None, sampler: str) -> None:
    """Stop when the sampler's recorded log-probs are further from the trainer's forward than `limit` on average:
    then it samples from another policy than the one trained (an update that did not reach it, another model, a
    lower precision than assumed), whatever version it reports."""
    if limit is not None and gap_mean > limit:
        raise SamplerError(
            f"the log-probs recorded by {sampler} are {gap_mean:.3g} from the trainer's forward on average (limit: "
            f"sampling.vllm_max_logprob_gap = {limit}): it samples from another policy than the one trained. Check "
            "that the server was started on the trainer's base model and dtype; a bfloat16 server needs a higher limit")


def base_state_dict(lm: nn.Module) -> dict[str, torch.Tensor]:
    """A peft model's base weights under the plain model's names (no `base_layer`, no adapter tensors)."""
    state = {}
    for name, tensor in lm.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    return state


def untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 copies of `state`, each shared tensor once (a tied output embedding is its input embedding's: vLLM
    ties them itself, and safetensors refuses to save one tensor under two names)."""
    seen, out = set(), {}
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.detach().float().contiguous()
    return out
