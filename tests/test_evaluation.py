"""Evaluation: the statistics against hand computations, KL from samples against the exact KL of a tiny model,
`rlhfkit eval` end to end on tiny models, and simulated annotators."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import build_tiny_model
from rlhfkit.cli import app
from rlhfkit.config import EvalConfig, SimulateConfig
from rlhfkit.data.jsonl import read_jsonl, write_jsonl
from rlhfkit.data.preference import RankingRecord
from rlhfkit.errors import ConfigError, DataError, OutputExistsError
from rlhfkit.evaluation import evaluate, simulate
from rlhfkit.evaluation.metrics import (
    bootstrap,
    distinct_n,
    distinct_n_interval,
    mean_interval,
    percent_change_interval,
    win_rate_interval,
)
from rlhfkit.evaluation.simulate import Item, ranks_from_utilities, simulate_rankings
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
from rlhfkit.rollout import Sampling, encode_prompts, sampling_logits
from rlhfkit.reward.model import RewardModel


# --- statistics -------------------------------------------------------------------------------------------------


def test_bootstrap_of_a_two_point_sample_matches_its_exact_resampling_distribution():
    """Resampling [0, 1] gives means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4: the 95% interval is [0, 1] and
    the 50% interval (quantiles 0.25 and 0.75) is [0.5, 0.5] up to the quantile interpolation at the edges."""
    x = np.array([0.0, 1.0])
    means = []
    bootstrap(lambda i: means.append(x[i].mean(-1)) or x[i].mean(-1), 2, n_resamples=20_000, seed=1)
    means = np.concatenate(means[1:])  # the first call is the sample itself
    for value, p in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        assert (means == value).mean() == pytest.approx(p, abs=0.01)
    wide = mean_interval(x, n_resamples=20_000, confidence=0.95)
    assert (wide.value, wide.low, wide.high) == (0.5, 0.0, 1.0)
    narrow = mean_interval(x, n_resamples=20_000, confidence=0.4)  # quantiles 0.3 and 0.7 lie inside the 1/2 mass
    assert (narrow.low, narrow.high) == (0.5, 0.5)


def test_bootstrap_interval_of_a_mean_agrees_with_the_normal_approximation():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=400)
    ci = mean_interval(x, n_resamples=20_000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert ci.value == pytest.approx(x.mean())
    assert ci.low == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert ci.high == pytest.approx(x.mean() + half, abs=0.1 * half)


def test_percent_change_is_paired_over_prompts():
    """Every prompt's toxicity halves: paired resamples all show -50%, however much the prompts differ."""
    baseline = np.random.default_rng(1).uniform(0.05, 0.9, size=50)
    ci = percent_change_interval(baseline, baseline / 2)
    assert ci.value == pytest.approx(-50.0) and ci.low == pytest.approx(-50.0) and ci.high == pytest.approx(-50.0)
    assert ci.excludes(0.0)
    noisy = percent_change_interval(baseline, np.random.default_rng(2).permutation(baseline))
    assert noisy.value == pytest.approx(0.0, abs=1e-9) and noisy.low < 0 < noisy.high and not noisy.excludes(0.0)
    with pytest.raises(ValueError, match="paired"):
        percent_change_interval([1.0, 2.0], [1.0])


def test_win_rate_counts_ties_half():
    ci = win_rate_interval([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    assert ci.value == pytest.approx(0.5)
    assert win_rate_interval([5.0] * 4, [1.0] * 4).value == 1.0


def test_distinct_n_by_hand():
    texts = ["a b a b", "a b c", ""]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)  # a, b, c of 7 tokens
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)  # (a b), (b a), (b c) of 5 bigrams
    assert distinct_n(["one"], 2) == 0.0


def test_distinct_n_interval_is_the_jackknife_by_hand():
    texts = ["a b a b", "b c", "a b c d", "d d d", "", "c a"]
    left_out = np.array([distinct_n(texts[:i] + texts[i + 1:], 2) for i in range(len(texts))])  # one at a time
    k = len(texts)
    se = math.sqrt((k - 1) / k * ((left_out - left_out.mean()) ** 2).sum())
    interval = distinct_n_interval(texts, 2, confidence=0.95)
    assert interval.value == pytest.approx(distinct_n(texts, 2))
    assert interval.low == pytest.approx(interval.value - 1.959964 * se)
    assert interval.high == pytest.approx(interval.value + 1.959964 * se)
    assert interval.low < interval.value < interval.high
    assert distinct_n_interval(["one two"], 2).as_dict() == {"value": 1.0, "low": 1.0, "high": 1.0}


# --- KL from samples against the exact KL -------------------------------------------------------------------------


def sharpened_model(path, seed: int, scale: float):
    """A tiny model whose (tied) output embedding is scaled up, so that its next-token distributions are far from
    uniform and two such models differ by a KL worth measuring."""
    build_tiny_model(path, seed=seed)
    model = load_causal_lm(str(path), dtype="float32")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    model.save_pretrained(path)
    return str(path)


@torch.no_grad()
def exact_kl(policy_dir: str, reference_dir: str, prompt: str, sampling: Sampling) -> float:
    """KL(pi || pi_ref) over all responses of at most two tokens, by the chain rule:
    KL = sum_a1 p(a1) [log p(a1)/q(a1) + 1(a1 is not a stop token) KL(p(. | a1) || q(. | a1))],
    with p the policy's sampling distribution (truncated as `sampling` says) and q the reference's full softmax."""
    tokenizer = load_tokenizer(policy_dir)
    p_model, q_model = (load_causal_lm(d, dtype="float32").eval() for d in (policy_dir, reference_dir))
    ids, _ = encode_prompts(tokenizer, [prompt], max_length=256)
    vocab = p_model.config.vocab_size
    first = torch.cat([ids.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)

    def log_dists(model, how):
        logits = sampling_logits(model(input_ids=first).logits, how)
        return torch.log_softmax(logits[0, -2], -1), torch.log_softmax(logits[:, -1], -1)  # step 1 [V], step 2 [V, V]

    p1, p2 = log_dists(p_model, sampling)
    q1, q2 = log_dists(q_model, sampling.untruncated)
    second = torch.where(p2 > float("-inf"), p2.exp() * (p2 - q2), 0.0).sum(-1)
    second[tokenizer.eos_token_id] = 0.0  # the answer ended at the first token
    return float(torch.where(p1 > float("-inf"), p1.exp() * (p1 - q1 + second), 0.0).sum())


@pytest.mark.parametrize("truncation", [{}, {"top_k": 8, "top_p": 0.9}])
def test_kl_from_samples_matches_the_exact_kl_on_a_tiny_model(tmp_path, truncation):
    """Also under top-k/top-p: the sampler's log-probs are those of the truncated distribution it drew from."""
    reference = sharpened_model(tmp_path / "ref", seed=0, scale=5.0)
    policy = sharpened_model(tmp_path / "policy", seed=1, scale=5.0)
    prompt = "Who is Wren?"
    settings = {"max_new_tokens": 2, "temperature": 0.7, **truncation}
    exact = exact_kl(policy, reference, prompt, Sampling(**settings))
    assert exact > 0.5  # a KL worth estimating
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": prompt}] * 1500)
    cfg = EvalConfig(models={"ref": reference, "policy": policy}, prompts=str(tmp_path / "prompts.jsonl"),
                     output_dir=tmp_path / "eval", sampling=settings, batch_size=500, bootstrap_samples=2000)
    result = evaluate(cfg)
    kl = result.models["policy"]["kl_to_reference"]
    half_width = (kl["high"] - kl["low"]) / 2
    assert abs(kl["value"] - exact) < 2 * half_width, (kl, exact)  # within ~4 standard errors
    assert half_width < 0.2 * exact
    own = result.models["ref"]["kl_to_reference"]
    if not truncation:  # the reference against itself: the same numbers computed twice
        assert abs(own["value"]) < 1e-5 and own["high"] - own["low"] < 1e-5
    else:  # what truncation removes: E[-log mass kept] > 0, as the exact KL of the reference to itself says
        self_kl = exact_kl(reference, reference, prompt, Sampling(**settings))
        assert self_kl > 0.01 and abs(own["value"] - self_kl) < own["high"] - own["low"] + 1e-3, (own, self_kl)


# --- rlhfkit eval end to end ---------------------------------------------------------------------------------------


def test_eval_compares_models_on_the_same_prompts_and_writes_its_outputs(tiny_model, tmp_path):
    other = str(build_tiny_model(tmp_path / "other", seed=3))
    rm = tmp_path / "rm"
    RewardModel.from_base(tiny_model).save_pretrained(rm)
    prompts = [{"prompt": f"Question {i}: how many holidays do I get?"} for i in range(12)]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    out = tmp_path / "eval"
    runner = CliRunner()
    args = ["eval", "--models", f"base={tiny_model},again={tiny_model}", "--models", f"other={other}",
            "--prompts", str(tmp_path / "prompts.jsonl"), "--output-dir", str(out), "--reward-model", str(rm),
            "sampling.max_new_tokens=8", "bootstrap_samples=500", "batch_size=5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "toxicity mean" in result.output and "other" in result.output and "eval.json" in result.output

    report = json.loads((out / "eval.json").read_text())
    assert report["baseline"] == "base" and report["reference"] == "base" and report["num_prompts"] == 12
    base, again, other_m = (report["metrics"][n] for n in ("base", "again", "other"))
    # Same model, same seed: the same answers, so no change, KL 0 and every comparison a tie.
    assert again["toxicity_change_pct"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert again["kl_to_reference"]["value"] == pytest.approx(0.0, abs=1e-5)
    assert again["win_rate_vs_reference"]["value"] == 0.5 and base["toxicity_change_pct"] is None
    # another model: a KL is measured (k1 from 12 answers of two near-uniform tiny models: small, of either sign;
    # its exactness is tested above against the exact KL)
    kl = other_m["kl_to_reference"]
    assert abs(kl["value"]) > 1e-4 and kl["low"] < kl["value"] < kl["high"]
    for m in (base, other_m):
        assert 0.0 <= m["toxicity_mean"]["low"] <= m["toxicity_mean"]["value"] <= m["toxicity_mean"]["high"] <= 1.0
        assert 1 <= m["response_tokens"] <= 8 and 0 <= m["distinct_2"]["value"] <= 1 and m["reference_perplexity"] > 1

    samples = [r for _, r in read_jsonl(out / "samples.jsonl")]
    assert len(samples) == 36 and {r["model"] for r in samples} == {"base", "again", "other"}
    assert set(samples[0]["scores"]) == {"toxicity", "reward", "kl", "profane_words", "refusal", "relevance"}
    by_model = {m: [r["response"] for r in samples if r["model"] == m] for m in ("base", "again")}
    assert by_model["base"] == by_model["again"]
    # the toxicity figures are those of the saved answers
    tox = [r["scores"]["toxicity"] for r in samples if r["model"] == "other"]
    assert other_m["toxicity_mean"]["value"] == pytest.approx(sum(tox) / len(tox))
    # and so are the profane-word rate, the refusal rate and the relevance (per answer in samples.jsonl, means with
    # intervals)
    for key, metric in (("profane_words", "profane_word_rate"), ("refusal", "refusal_rate"), ("relevance", "relevance")):
        values = [r["scores"][key] for r in samples if r["model"] == "other"]
        assert other_m[metric]["value"] == pytest.approx(sum(values) / len(values))
        assert other_m[metric]["low"] <= other_m[metric]["value"] <= other_m[metric]["high"]
    assert all(row in result.output for row in ("profane", "refusal", "relevance"))  # table rows (labels wrap at 80 columns)

    again_run = runner.invoke(app, args)
    assert again_run.exit_code != 0 and isinstance(again_run.exception, OutputExistsError)


def test_eval_settings_errors_are_clear(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="reference 'nope' is not one of the models"):
        from rlhfkit.config import load_config

        load_config(EvalConfig, None, ["reference=nope", "prompts=x.jsonl", "output_dir=o"],
                    settings={"models": {"a": tiny_model}})
    cfg = EvalConfig(models={"a": tiny_model}, prompts=str(tmp_path / "missing.jsonl"), output_dir=tmp_path / "o")
    with pytest.raises(DataError, match="not found"):
        evaluate(cfg)
    result = CliRunner().invoke(app, ["eval", "--models", "a=x,a=y", "--prompts", "p", "--output-dir", "o"])
    assert result.exit_code != 0 and "two models are named 'a'" in result.output


# --- simulated annotators ---------------------------------------------------------------------------------------


def test_ranks_from_utilities_are_dense_with_ties():
    assert ranks_from_utilities(np.array([0.2, 0.9, 0.2, -1.0])) == [2, 1, 2, 3]


def test_simulated_pairs_follow_bradley_terry_with_the_gumbel_noise():
    """Two completions whose gold utilities differ by 1, noise 1: annotators prefer the better one with
    probability sigmoid(1) = 0.731."""
    items = [Item("x", "p", ["good", "bad"])]
    records = simulate_rankings(items, [[1.0, 0.0]], annotators=4000, noise=1.0, seed=0)
    agree = np.mean([r["ranks"] == [1, 2] for r in records])
    assert agree == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.025)
    exact = simulate_rankings(items, [[1.0, 0.0]], annotators=5, noise=0.0)
    assert all(r["ranks"] == [1, 2] for r in exact)


def test_simulate_writes_valid_rankings_from_a_gold_scorer(tmp_path):
    completions = ["Happy to help, here is the schedule.", "Shut up, you stupid idiot, figure it out yourself.",
                   "Sure thing, the office opens at nine."]
    write_jsonl(tmp_path / "items.jsonl", [{"id": "q1", "prompt": "When does the office open?", "completions": completions}])
    cfg = SimulateConfig(gold=[{"scorer": "toxicity", "weight": -1.0}], completions_file=tmp_path / "items.jsonl",
                         annotators=3, noise=0.0, output_file=tmp_path / "rankings.jsonl")
    records, _ = simulate(cfg)
    rankings = [RankingRecord.model_validate(r) for _, r in read_jsonl(tmp_path / "rankings.jsonl")]
    assert len(rankings) == len(records) == 3 and {r.annotator for r in rankings} == {"sim-1", "sim-2", "sim-3"}
    for r in rankings:
        assert r.ranks[1] == max(r.ranks)  # the rude one is last for every noiseless annotator
    with pytest.raises(OutputExistsError):
        simulate(cfg)
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completions": ["only one"]}])
    with pytest.raises(DataError, match=r"bad.jsonl:1"):
        simulate(cfg.model_copy(update={"completions_file": tmp_path / "bad.jsonl", "overwrite": True}))
    for sources in ({}, {"model": "m"}, {"completions_file": "c.jsonl", "model": "m", "prompts_file": "p.jsonl"}):
        with pytest.raises(ValueError, match="either completions_file"):
            SimulateConfig(gold=[{"scorer": "toxicity"}], output_file=tmp_path / "r.jsonl", **sources)


def test_simulate_samples_k_completions_from_a_model(tiny_model, tmp_path):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Who is Wren?", "id": "w"}, {"prompt": "Hi"}])
    result = CliRunner().invoke(app, ["simulate", "-c", "configs/simulate.yaml", f"model={tiny_model}",
                                      f"prompts_file={tmp_path / 'prompts.jsonl'}", "k=3", "max_new_tokens=6",
                                      f"output_file={tmp_path / 'sim.jsonl'}", "annotators=2", "gold=[{scorer: toxicity, weight: -1}]"])
    assert result.exit_code == 0, result.output
    rankings = [RankingRecord.model_validate(r) for _, r in read_jsonl(tmp_path / "sim.jsonl")]
    assert {r.id for r in rankings} <= {"w", "item-1"} and len(rankings) >= 2
    assert all(2 <= len(r.completions) <= 3 for r in rankings)
