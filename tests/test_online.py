"""The online trainer (PPO, RLOO, GRPO) on the tiny model: rollout and log-probabilities, the reference, the critic,
learning a toy reward under a KL bound, kill and resume, NaN guards, two processes, and the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import COMPANY_TEST, COMPANY_TRAIN, build_tiny_model
from rlhfkit.config import PPOConfig, load_config
from rlhfkit.data.jsonl import read_jsonl
from rlhfkit.errors import ConfigError
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
from rlhfkit.models.policy import PolicyModel
from rlhfkit.online import NonFiniteError, core, train_ppo
from rlhfkit.online.networks import build_critic, build_policy
from rlhfkit.online.trainer import OnlineTrainer, Scores
from rlhfkit.reward.model import RewardModel
from rlhfkit.reward.scorers import FunctionReward
from rlhfkit.rollout import Rollout, Sampling, encode_prompts, sample, sampling_logits, token_logprobs

PROMPTS = ["Hi", "What does Marrowby & Finch make, and where are the factories?", "Who is Wren?"]


def ppo_config(model, out, **settings) -> PPOConfig:
    base = dict(
        model=model, prompts_file=str(COMPANY_TRAIN), output_dir=str(out), rewards=[{"scorer": "toxicity"}],
        steps=2, batch_size=4, mini_batch_size=2, ppo_epochs=1, sampling={"max_new_tokens": 6, "temperature": 1.0},
        preview={"num_prompts": 0},
    )
    for key, value in settings.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return PPOConfig.model_validate(base)


def frac_e(prompt: str, response: str) -> float:
    """Toy reward: the share of the letter e in the response."""
    return response.count("e") / max(len(response), 1)


def rollout_logprobs(policy, rollout, temperature):
    logits, _ = policy(**rollout.tokens())
    return token_logprobs(logits, rollout.response_ids, Sampling(8, temperature))


@torch.no_grad()
def test_the_reference_is_the_policy_with_its_adapter_disabled(tiny_model, tmp_path):
    cfg = ppo_config(tiny_model, tmp_path)
    policy, reference = build_policy(cfg)
    assert reference is None  # LoRA: no second copy of the weights
    tokenizer = load_tokenizer(tiny_model)
    query_ids, query_mask = encode_prompts(tokenizer, PROMPTS, max_length=64)
    rollout = sample(policy.lm, query_ids, query_mask, Sampling(8), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    start = PolicyModel(load_causal_lm(tiny_model, dtype="float32"))
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.add_(0.5)  # move the policy away from the start
    with policy.as_reference():
        torch.testing.assert_close(rollout_logprobs(policy, rollout, 1.0), rollout_logprobs(start, rollout, 1.0))
    assert not torch.allclose(rollout_logprobs(policy, rollout, 1.0), rollout_logprobs(start, rollout, 1.0))
    full, frozen = build_policy(ppo_config(tiny_model, tmp_path, lora={"enabled": False}))
    assert frozen is not None and not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in full.parameters())


def test_critic_starts_from_a_compatible_reward_model_else_from_the_policy(tiny_model, tmp_path):
    tokenizer = load_tokenizer(tiny_model)
    same_vocab = tmp_path / "rm"
    rm = RewardModel.from_base(tiny_model)
    rm.set_normalization(torch.tensor([3.0, 7.0, 5.0]))  # as training ends: gain 1/2, shift -5/2
    rm.save_pretrained(same_vocab)
    critic = build_critic(ppo_config(tiny_model, tmp_path), tokenizer, str(same_vocab))
    assert any("lora_A" in n for n, _ in critic.named_parameters())  # the critic trains adapters too
    # at the last token the critic's first values are the reward model's normalised scores, the scale of the returns
    enc = rm.tokenize(PROMPTS, ["Hello.", "Instruments.", "The assistant."])
    with torch.no_grad():
        hidden = critic.backbone(**enc).last_hidden_state[torch.arange(3), enc["attention_mask"].sum(-1) - 1]
        torch.testing.assert_close(critic.head(hidden).squeeze(-1), rm.score(PROMPTS, ["Hello.", "Instruments.", "The assistant."]))

    other = build_tiny_model(tmp_path / "other-vocab", vocab_size=300)
    RewardModel.from_base(str(other)).save_pretrained(tmp_path / "rm-other")
    critic = build_critic(ppo_config(tiny_model, tmp_path), tokenizer, str(tmp_path / "rm-other"))
    assert torch.count_nonzero(critic.head.weight) == 0  # a fresh head on the policy's backbone
    with pytest.raises(Exception, match="different vocabulary"):
        build_critic(ppo_config(tiny_model, tmp_path, critic_init="reward_model"), tokenizer, str(tmp_path / "rm-other"))


def test_ppo_raises_a_toy_reward_and_the_kl_penalty_bounds_the_drift(tiny_model, tmp_path):
    """Full fine-tuning with a value head: the share of e's in the answers must rise within 16 steps; with a KL
    penalty the policy must stay within a bound that the unpenalised run leaves far behind."""
    settings = dict(steps=16, batch_size=16, mini_batch_size=8, ppo_epochs=2, learning_rate=1e-2, critic="value_head",
                    lora={"enabled": False}, lr_scheduler="constant", missing_eos_penalty=None,
                    sampling={"max_new_tokens": 8})
    free = train_ppo(ppo_config(tiny_model, tmp_path / "free", kl_coef=0.0, **settings), FunctionReward(frac_e))
    first, last = free.history[0], free.history[-3:]
    assert sum(h["reward/score"] for h in last) / 3 > first["reward/score"] + 0.05
    assert last[-1]["policy/entropy"] < first["policy/entropy"]
    bound = train_ppo(ppo_config(tiny_model, tmp_path / "bound", kl_coef=2.0, kl_estimator="k3", **settings),
                      FunctionReward(frac_e))
    kl_free = sum(h["kl/ref"] for h in free.history[-4:]) / 4
    kl_bound = sum(h["kl/ref"] for h in bound.history[-4:]) / 4
    # (levels vary with the random stream and with the CPU's float kernels: with beta 1 the last four steps averaged
    # 5.7-11.0 nats on different seeds and machines against ~19-20 unpenalised, too close to half; with beta 2,
    # 6.6 against 18.8 on the machine where beta 1 gave 11.0)
    assert kl_bound < 0.5 * kl_free and max(h["kl/ref"] for h in bound.history) < 0.6 * kl_free


@pytest.mark.parametrize("algorithm", [{"algorithm": "rloo"}, {"algorithm": "grpo"},
                                       {"algorithm": "grpo", "dr_grpo": True}], ids=["rloo", "grpo", "dr_grpo"])
def test_critic_free_algorithms_raise_a_toy_reward_and_the_kl_penalty_bounds_the_drift(tiny_model, tmp_path,
                                                                                       algorithm):
    """4 samples of each of 4 prompts per step, no critic: without a KL penalty the share of e's rises within 12
    steps; with one (in the reward for rloo, a loss term for grpo) the policy stays far closer to the start."""
    settings = dict(steps=12, batch_size=16, mini_batch_size=8, ppo_epochs=2, learning_rate=1e-2,
                    lora={"enabled": False}, lr_scheduler="constant", missing_eos_penalty=None,
                    sampling={"max_new_tokens": 8, "num_samples": 4}, **algorithm)
    free = train_ppo(ppo_config(tiny_model, tmp_path / "free", kl_coef=0.0, **settings), FunctionReward(frac_e))
    first, last = free.history[0], free.history[-3:]
    assert sum(h["reward/score"] for h in last) / 3 > first["reward/score"] + 0.05
    assert "value/mean" not in first and "loss/value" not in first  # no critic
    bound = train_ppo(ppo_config(tiny_model, tmp_path / "bound", kl_coef=0.5, **settings), FunctionReward(frac_e))
    kl_free = sum(h["kl/ref"] for h in free.history[-4:]) / 4
    assert sum(h["kl/ref"] for h in bound.history[-4:]) / 4 < 0.5 * kl_free
    assert ("loss/kl" in bound.history[0]) == (algorithm["algorithm"] == "grpo")


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_a_killed_critic_free_run_resumes_to_the_same_result(tiny_model, tmp_path, monkeypatch, algorithm):
    settings = dict(steps=4, save_every=2, algorithm=algorithm, batch_size=6, mini_batch_size=3, learning_rate=1e-3,
                    sampling={"max_new_tokens": 6, "temperature": 1.0, "num_samples": 3})
    whole = train_ppo(ppo_config(tiny_model, tmp_path / "whole", **settings), FunctionReward(frac_e))
    kill_in_step_4(tiny_model, tmp_path / "killed", settings, monkeypatch)
    resumed = train_ppo(ppo_config(tiny_model, tmp_path / "killed", resume_from="latest", **settings),
                        FunctionReward(frac_e))
    for key, value in adapter(tmp_path / "whole").items():
        torch.testing.assert_close(adapter(tmp_path / "killed")[key], value)
    tail = {h["step"]: h for h in whole.history}
    for h in resumed.history:
        for key in ("reward/score", "kl/ref", "loss/policy"):
            assert h[key] == pytest.approx(tail[h["step"]][key], rel=1e-4, abs=1e-6), key


def test_algorithm_settings_are_checked():
    base = dict(model="m", prompts_file="p.jsonl", output_dir="o", rewards=[{"scorer": "toxicity"}])
    with pytest.raises(ValueError, match="num_samples to 2 or more"):
        PPOConfig.model_validate({**base, "algorithm": "rloo"})
    with pytest.raises(ValueError, match="uses no critic"):
        PPOConfig.model_validate({**base, "algorithm": "grpo", "critic": "value_head", "sampling": {"num_samples": 4}})
    with pytest.raises(ValueError, match="multiple of sampling.num_samples"):
        PPOConfig.model_validate({**base, "algorithm": "grpo", "batch_size": 6, "mini_batch_size": 2,
                                  "sampling": {"num_samples": 4}})
    with pytest.raises(ValueError, match="dr_grpo is a variant"):
        PPOConfig.model_validate({**base, "dr_grpo": True})
    ppo = PPOConfig.model_validate(base)
    assert (ppo.critic, ppo.whiten_advantages, ppo.loss_aggregation) == ("separate", True, "token_mean")
    grpo = PPOConfig.model_validate({**base, "algorithm": "grpo", "sampling": {"num_samples": 4}})
    assert (grpo.critic, grpo.whiten_advantages, grpo.loss_aggregation) == ("none", False, "sequence_mean")
    dr = PPOConfig.model_validate({**base, "algorithm": "grpo", "dr_grpo": True, "sampling": {"num_samples": 4}})
    assert dr.loss_aggregation == "constant"


def adapter(path):
    return load_file(path / "adapter_model.safetensors")


def kill_in_step_4(tiny_model, out, settings, monkeypatch):
    """A run of `settings` into `out` killed in its fourth step (two minibatches x one epoch per step)."""
    import rlhfkit.losses as losses_module

    real, calls = losses_module.clipped_policy_loss, {"n": 0}

    def dies_in_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 6:  # the seventh policy loss is in step 4
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(losses_module, "clipped_policy_loss", dies_in_step_4)
        with pytest.raises(KeyboardInterrupt):
            train_ppo(ppo_config(tiny_model, out, **settings), FunctionReward(frac_e))


def test_a_killed_run_resumes_to_the_same_result_as_an_uninterrupted_one(tiny_model, tmp_path, monkeypatch):
    """LoRA policy and critic, adaptive KL, reward normalisation: everything must come back from the checkpoint."""
    settings = dict(steps=4, save_every=2, kl_controller="adaptive", kl_horizon=100, normalize_reward=True,
                    learning_rate=1e-3, rewards=[{"scorer": "toxicity", "weight": -1.0}])
    whole = train_ppo(ppo_config(tiny_model, tmp_path / "whole", **settings), FunctionReward(frac_e))
    kill_in_step_4(tiny_model, tmp_path / "killed", settings, monkeypatch)
    killed = tmp_path / "killed"
    assert [p.name for p in killed.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (killed / "adapter_model.safetensors").exists()

    resumed = train_ppo(ppo_config(tiny_model, killed, resume_from="latest", **settings), FunctionReward(frac_e))
    assert resumed.steps == 4
    for key, value in adapter(tmp_path / "whole").items():
        torch.testing.assert_close(adapter(killed)[key], value)
    critic_whole = load_file(tmp_path / "whole" / "checkpoint-4" / "model_1.safetensors")
    critic_resumed = load_file(killed / "checkpoint-4" / "model_1.safetensors")
    assert critic_whole.keys() == critic_resumed.keys() and any("head" in k for k in critic_whole)
    for key, value in critic_whole.items():
        torch.testing.assert_close(critic_resumed[key], value)
    tail = {h["step"]: h for h in whole.history}
    for h in resumed.history:
        for key in ("reward/score", "kl/ref", "kl/coef", "loss/value", "reward/normalized"):
            assert h[key] == pytest.approx(tail[h["step"]][key], rel=1e-4, abs=1e-6), key
    logged = [r["step"] for _, r in read_jsonl(killed / "metrics.jsonl")]
    assert logged == [1, 2, 3, 4]  # step 3, logged by the killed run after its last checkpoint, appears once


def test_the_samplers_log_probs_are_the_training_forwards(tiny_model, tmp_path):
    """pi_old recorded while sampling (adapter folded into the weights) and pi_old recomputed by a forward pass
    (adapter applied layer by layer) are the same numbers: the logged gap is float error, and a run that
    recomputes them trains to the same adapter. Under top-k, where the log-probs are the truncated ones."""
    settings = dict(steps=3, learning_rate=1e-2, critic="value_head",
                    sampling={"max_new_tokens": 6, "temperature": 0.9, "top_k": 40})
    recorded = train_ppo(ppo_config(tiny_model, tmp_path / "recorded", **settings), FunctionReward(frac_e))
    recomputed = train_ppo(ppo_config(tiny_model, tmp_path / "recomputed", recompute_logprobs=True, **settings),
                           FunctionReward(frac_e))
    for h in recorded.history + recomputed.history:
        assert 0 <= h["rollout/logprob_gap_mean"] <= h["rollout/logprob_gap_max"] < 1e-4
    assert any(h["policy/clipfrac"] > 0 or h["policy/approx_kl"] > 1e-6 for h in recorded.history)  # it did move
    for key, value in adapter(tmp_path / "recorded").items():
        torch.testing.assert_close(adapter(tmp_path / "recomputed")[key], value, atol=1e-5, rtol=1e-3)


@torch.no_grad()
def test_the_scoring_forwards_give_the_same_numbers_in_chunks_as_in_one_batch(tiny_model, tmp_path):
    """Reference log-probs, k3's reference mass outside the top-k, a separate critic's values and recomputed
    log-probs, `rollout_forward_batch_size` rows at a time (prompts of different lengths, so chunks are padded
    differently)."""
    trainer = OnlineTrainer(ppo_config(tiny_model, tmp_path / "run", critic="separate", recompute_logprobs=True,
                                       kl_estimator="k3", sampling={"top_k": 40}), FunctionReward(frac_e))
    trainer.critic.head.weight.normal_(generator=torch.Generator().manual_seed(0))  # starts at zero: make it read
    rollout = trainer.rollout(PROMPTS + PROMPTS[:1])
    whole = trainer.reference(rollout)
    trainer.cfg = trainer.cfg.model_copy(update={"rollout_forward_batch_size": 1})
    chunked = trainer.reference(rollout)
    for a, b in zip(whole, chunked):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_nan_rewards_skip_updates_then_stop_the_run_leaving_checkpoints_whole(tiny_model, tmp_path):
    calls = {"n": 0}

    def breaks_at_step_2(prompt, response):
        calls["n"] += 1
        return float("nan") if calls["n"] > 4 else 0.5  # batch_size 4: the 5th score is in step 2

    cfg = ppo_config(tiny_model, tmp_path, steps=4, save_every=1, max_nonfinite_updates=1)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(NonFiniteError, match="Saved checkpoints are untouched"):
        warnings.simplefilter("always")
        train_ppo(cfg, FunctionReward(breaks_at_step_2))
    assert sum("NaN or Inf" in str(w.message) for w in caught) == 2
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-1"]
    weights = load_file(tmp_path / "checkpoint-1" / "model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def test_fp16_overflow_goes_through_the_grad_scaler_and_is_not_a_failure(tiny_model, tmp_path, fp16_scalers):
    """A GradScaler whose first scale overflows the gradients: the scaler skips those updates and lowers its scale,
    which is loss scaling at work, not a NaN; with no NaN tolerated the run must still finish."""
    result = train_ppo(ppo_config(tiny_model, tmp_path, steps=3, max_nonfinite_updates=0), FunctionReward(frac_e))
    assert result.steps == 3
    assert fp16_scalers[0].get_scale() < 2.0**20  # an update did overflow, and the scaler lowered its scale


def test_stop_tokens_end_responses_and_missing_eos_is_penalised(tiny_model, tmp_path):
    result = train_ppo(ppo_config(tiny_model, tmp_path, steps=1, missing_eos_penalty=2.0, sampling={"max_new_tokens": 3}),
                       FunctionReward(lambda p, r: 0.0, name="zero"))
    h = result.history[0]
    # the untrained tiny model almost never stops within 3 tokens: the normalised score is about -2 * (1 - eos_rate)
    assert h["reward/normalized"] == pytest.approx(-2.0 * (1 - h["response/eos_rate"]))
    assert h["response/length"] <= 3
    for key in ("kl/ref", "policy/entropy", "policy/clipfrac", "policy/approx_kl", "loss/value", "loss/policy",
                "value/explained_variance", "response/eos_rate", "time/generation", "time/scoring", "time/training",
                "throughput/tokens_per_s", "reward/zero"):
        assert key in h


def test_reward_clipping_and_the_approx_kl_early_stop(tiny_model, tmp_path):
    """A score of 5 clipped to 1; an approx-KL bound that the first update passes stops the iteration's remaining
    updates (fewer scheduler steps leave a higher linearly decaying learning rate)."""
    settings = dict(steps=1, batch_size=8, mini_batch_size=2, ppo_epochs=4, learning_rate=1e-2, lora={"enabled": False},
                    missing_eos_penalty=None, reward_clip=1.0)
    five = FunctionReward(lambda p, r: 5.0, name="five")
    stopped = train_ppo(ppo_config(tiny_model, tmp_path / "stopped", target_approx_kl=1e-6, **settings), five).history[0]
    full = train_ppo(ppo_config(tiny_model, tmp_path / "full", **settings), five).history[0]
    assert stopped["reward/five"] == 5.0 and stopped["reward/normalized"] == pytest.approx(1.0)
    assert stopped["train/early_stopped"] == 1.0 and full["train/early_stopped"] == 0.0
    assert stopped["train/lr"] > full["train/lr"]


def test_two_processes_run_ppo(tiny_model, tmp_path):
    torchrun = [shutil.which("torchrun", path=os.path.dirname(sys.executable)), "--nproc_per_node", "2"]
    out = tmp_path / "two"
    settings = [f"model={tiny_model}", f"prompts_file={COMPANY_TRAIN}", f"eval_prompts_file={COMPANY_TEST}",
                f"output_dir={out}", "steps=2", "batch_size=2", "mini_batch_size=1", "sampling.max_new_tokens=4",
                "preview.num_prompts=1", "preview.max_new_tokens=4", "rewards=[{scorer: toxicity, weight: -1}]"]
    proc = subprocess.run([*torchrun, "-m", "rlhfkit.cli", "ppo", "--config", os.devnull, *settings], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("policy saved in") == 1  # one process reports
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    rows = [r for _, r in read_jsonl(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    # episodes per step count both processes' rollouts: 2 processes x batch 2
    assert rows[0]["throughput/episodes_per_s"] * rows[0]["time/step"] == pytest.approx(4.0, rel=1e-3)


def test_cli_ppo_with_the_shipped_config_and_overrides(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    cfg = load_config(PPOConfig, "configs/ppo.yaml", [f"model={tiny_model}", f"output_dir={tmp_path}"])
    assert cfg.rewards  # the shipped recipe parses
    runner = CliRunner()
    args = ["ppo", "--config", "configs/ppo.yaml", f"model={tiny_model}", f"output_dir={tmp_path / 'run'}", "steps=1",
            "batch_size=2", "mini_batch_size=2", "ppo_epochs=1", "sampling.max_new_tokens=4", "preview.num_prompts=1",
            "preview.max_new_tokens=4", "rewards=[{scorer: toxicity, weight: -1}]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "KL to the reference" in result.output and "policy saved in" in result.output
    samples = [r for _, r in read_jsonl(tmp_path / "run" / "samples.jsonl")]
    assert {s["model"] for s in samples} == {"before", "after"} and "toxicity" in samples[0]["scores"]
    bad = runner.invoke(app, ["ppo", "--config", "configs/ppo.yaml", "batch_size=3", "mini_batch_size=2"])
    assert isinstance(bad.exception, ConfigError) and "multiple of mini_batch_size" in str(bad.exception)
    assert not math.isnan(json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["kl/ref"])


def test_a_run_refused_for_bad_input_leaves_nothing_behind(tiny_model, tmp_path):
    from rlhfkit.errors import DataError

    out = tmp_path / "run"
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "Hi"}\n{"prompt": ""}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:2: prompt: the prompt is empty"):
        train_ppo(ppo_config(tiny_model, out, prompts_file=str(bad)))
    with pytest.raises(ConfigError, match="hf:.*needs a label"):
        train_ppo(ppo_config(tiny_model, out, rewards=[{"scorer": f"hf:{tiny_model}"}]))
    assert not out.exists()
    bad.write_text('{"prompt": "Hi"}\n{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]}\n')
    result = train_ppo(ppo_config(tiny_model, out, prompts_file=str(bad), steps=1, batch_size=2, mini_batch_size=2),
                       FunctionReward(lambda p, r: float(isinstance(p, list)), name="conversation"))
    assert result.history[0]["reward/conversation"] == 0.5  # one of the two prompts came as a conversation


def every_answer(trainer: OnlineTrainer, prompt: str, steps: int):
    """Every answer the policy can sample to `prompt` in at most `steps` tokens (the stop token ends one), as a
    rollout of them all, and pi(answer) of each: enumerated through plain forwards of the policy's LM."""
    lm = trainer.accelerator.unwrap_model(trainer.policy).lm
    query_ids, query_mask = encode_prompts(trainer.tokenizer, [prompt])
    done, growing = [], [([], [])]  # (tokens, log pi of each)
    for _ in range(steps):
        grown = []
        for tokens, logps in growing:
            ids = torch.cat([query_ids[0], torch.tensor(tokens, dtype=torch.long)])[None]
            log_pi = torch.log_softmax(sampling_logits(lm(input_ids=ids).logits[0, -1], trainer.sampling), -1)
            for a in torch.nonzero(torch.isfinite(log_pi)).flatten().tolist():
                (done if a in trainer.stop_ids else grown).append((tokens + [a], logps + [log_pi[a].item()]))
        growing = grown
    done += growing
    n, pad = len(done), trainer.tokenizer.pad_token_id
    response_ids = torch.full((n, steps), pad, dtype=torch.long)
    response_mask, logprobs = torch.zeros((n, steps), dtype=torch.long), torch.zeros((n, steps))
    for i, (tokens, logps) in enumerate(done):
        response_ids[i, :len(tokens)], response_mask[i, :len(tokens)] = torch.tensor(tokens), 1
        logprobs[i, :len(tokens)] = torch.tensor(logps)
    rollout = Rollout(query_ids.repeat(n, 1), query_mask.repeat(n, 1), response_ids, response_mask,
                      torch.isin(response_ids, torch.tensor(trainer.stop_ids)).any(-1), torch.zeros(n, dtype=torch.long),
                      logprobs=logprobs)
    return rollout, logprobs.sum(-1).exp()


@torch.no_grad()
@pytest.mark.parametrize("sampling", [{"max_new_tokens": 1, "temperature": 0.1},
                                      {"max_new_tokens": 2, "temperature": 0.05, "top_p": 0.9},
                                      {"max_new_tokens": 2, "temperature": 0.7, "top_k": 5}],
                         ids=["untruncated", "top_p", "top_k"])
def test_k3_is_unbiased_for_the_exact_kl_of_every_short_answer_with_and_without_truncation(tiny_model, tmp_path,
                                                                                            sampling):
    """E_{y~pi}[sum_t k3_t] over every answer the policy can give equals KL(pi || pi_ref) computed exactly over the
    same answers, pi being what is sampled (truncated by top-p/top-k) and pi_ref the reference's whole softmax at
    the sampling temperature. Uncorrected, k3's expectation under truncation falls short of it by the reference
    mass truncation removes (E_pi[pi_ref / pi] is the reference's mass on the kept set, not 1)."""
    trainer = OnlineTrainer(ppo_config(tiny_model, tmp_path / "run", algorithm="rloo", kl_estimator="k3",
                                       sampling={**sampling, "num_samples": 2}), FunctionReward(frac_e))
    lm = trainer.accelerator.unwrap_model(trainer.policy).lm
    for name, weight in lm.named_parameters():
        if "lora_B" in name:  # the adapters start at zero (policy = reference): make the policy another model
            weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(len(name)))
    rollout, pi = every_answer(trainer, "Who is Wren?", sampling["max_new_tokens"])
    assert pi.sum().item() == pytest.approx(1.0, abs=1e-4)
    ref_logprobs = trainer.reference(rollout)[0]
    exact = (pi * (rollout.logprobs - ref_logprobs).sum(-1)).sum().item()
    zeros = torch.zeros(len(rollout))
    targets = trainer.advantages(rollout, Scores({}, zeros, zeros))
    estimated = (pi * targets.kl.sum(-1)).sum().item()
    print(f"{sampling}: {len(rollout)} answers, exact KL {exact:.6f}, E[k3] {estimated:.6f}")
    assert exact > 0.1
    assert estimated == pytest.approx(exact, rel=1e-4)


def test_grpo_s_k3_loss_term_adds_the_reference_mass_truncation_removes(tiny_model, tmp_path):
    """GRPO's KL loss term is the corrected k3 under top-k: in the update's one minibatch (pi_theta = pi_old
    there) its logged mean is that of (rho - pi_ref(S)) - log rho over the rollout's tokens, not (rho - 1) - log rho."""
    trainer = OnlineTrainer(ppo_config(tiny_model, tmp_path / "run", algorithm="grpo", batch_size=4, mini_batch_size=4,
                                       sampling={"temperature": 0.7, "top_k": 5, "num_samples": 2}),
                            FunctionReward(frac_e))
    rollout = trainer.rollout(PROMPTS[:2])
    scores = trainer.score([p for p in PROMPTS[:2] for _ in range(2)], rollout)
    targets = trainer.advantages(rollout, scores)
    mask = rollout.response_mask.float()
    corrected = core.masked_mean(core.kl_estimate(targets.old_logprobs, targets.ref_logprobs, "k3", targets.ref_dropped),
                                 mask).item()
    plain = core.masked_mean(core.kl_estimate(targets.old_logprobs, targets.ref_logprobs, "k3"), mask).item()
    assert corrected > plain + 0.1  # the reference keeps little of its mass in a top-5 of the policy
    assert trainer.update(rollout, targets)["loss/kl"] == pytest.approx(corrected, abs=1e-4)


def test_grpo_under_top_k_trains_past_tokens_the_updated_policy_no_longer_keeps(tiny_model, tmp_path, monkeypatch):
    """A sampled token outside the updated policy's top-k has pi_theta = 0: the ratio loss takes it as ratio 0, and
    the k3 term (infinite there, with no gradient) leaves it out instead of making the loss NaN and skipping the
    update (before: 53 of 64 updates skipped in this run's longer version). Run by `rlhfkit grpo`, its toy reward
    put in the place of the scorer the command line names."""
    from typer.testing import CliRunner

    from rlhfkit.cli import app
    from rlhfkit.online import trainer

    monkeypatch.setattr(trainer, "load_scorer", lambda spec, device: FunctionReward(frac_e))
    args = ["grpo", f"model={tiny_model}", f"prompts_file={COMPANY_TRAIN}", f"output_dir={tmp_path / 'run'}",
            "rewards=[{scorer: frac_e}]", "steps=2", "batch_size=8", "mini_batch_size=2", "ppo_epochs=4",
            "learning_rate=5e-2", "lora.enabled=false", "lr_scheduler=constant", "max_nonfinite_updates=0",
            "preview.num_prompts=0", "sampling={temperature: 0.7, top_k: 3, num_samples: 2, max_new_tokens: 8}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["algorithm"] == "grpo"
    assert any(h["policy/outside_support"] > 0 for h in history)
    assert all(math.isfinite(h["loss/kl"]) for h in history)
