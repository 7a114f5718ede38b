"""Reward-model diagnostics: Kendall's tau against scipy on random rankings with ties, best-of-K and the length
figures by hand, and the diagnostics written after `reward train` and printed by `reward score`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import kendalltau
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.data.jsonl import read_jsonl, write_jsonl
from rlhfkit.data.preference import RankingRecord
from rlhfkit.reward.diagnostics import DIAGNOSTICS_FILE, diagnose


def ranking(item: str, completions: list[str], ranks: list[int], annotator: str) -> RankingRecord:
    return RankingRecord(id=item, prompt=f"question {item}", completions=completions, ranks=ranks, annotator=annotator)


def score_of(table: dict[str, float]):
    return lambda prompts, texts: [table[t] for t in texts]


def test_kendall_tau_matches_scipy_on_random_rankings_with_ties():
    rng = np.random.default_rng(0)
    records, scores, expected = [], {}, {"a": [], "b": [], "c": []}
    for item in range(30):
        completions = [f"item {item} answer {j}" for j in range(5)]
        # rewards with ties too: drawn from 3 values
        reward = rng.integers(0, 3, size=5).astype(float)
        scores |= dict(zip(completions, reward))
        for annotator in expected:
            ranks = rng.integers(1, 4, size=5)  # ranks 1-3 over 5 completions: ties in every ranking
            records.append(ranking(str(item), completions, ranks.tolist(), annotator))
            if len(set(ranks)) > 1 and len(set(reward)) > 1:
                expected[annotator].append(kendalltau(reward, -ranks).statistic)  # tau-b, rank 1 = best
    d = diagnose(records, score_of(scores))
    for annotator, taus in expected.items():
        assert d.kendall_tau_per_annotator[annotator] == pytest.approx(np.mean(taus), abs=1e-12)
    assert d.kendall_tau == pytest.approx(np.mean([t for taus in expected.values() for t in taus]), abs=1e-12)


def test_a_reward_that_follows_the_annotators_scores_one_and_its_reverse_minus_one():
    texts = ["short", "a bit longer", "the longest answer of all"]
    records = [ranking("1", texts, [1, 2, 3], "a"), ranking("1", texts, [1, 2, 3], "b")]
    right = diagnose(records, score_of({"short": 3.0, "a bit longer": 2.0, "the longest answer of all": 1.0}))
    assert (right.pairwise_accuracy, right.best_of_k_accuracy, right.kendall_tau) == (1.0, 1.0, 1.0)
    assert right.annotator_kendall_tau == 1.0 and right.annotator_alpha == 1.0 and right.annotator_pairwise_agreement == 1.0
    assert right.best_of_k_chance == pytest.approx(1 / 3)
    # people here prefer the shorter answer; this reward too: the longer one of a pair is never preferred
    assert right.length_only_pairwise_accuracy == 0.0
    assert right.longer_preferred_by_reward == 0.0 and right.longer_preferred_by_annotators == 0.0
    assert right.length_spearman == pytest.approx(-1.0)
    wrong = diagnose(records, score_of({"short": 1.0, "a bit longer": 2.0, "the longest answer of all": 3.0}))
    assert (wrong.pairwise_accuracy, wrong.best_of_k_accuracy, wrong.kendall_tau) == (0.0, 0.0, -1.0)


def test_best_of_k_counts_ties_fractionally_against_the_mean_rank():
    texts = ["w x", "y", "z z z"]
    # mean ranks: w x 1.5, y 1.5, z z z 3 -> two best of three (chance 2/3)
    records = [ranking("1", texts, [1, 2, 3], "a"), ranking("1", texts, [2, 1, 3], "b")]
    assert diagnose(records, score_of({"w x": 5.0, "y": 0.0, "z z z": 0.0})).best_of_k_accuracy == 1.0
    tied_top = diagnose(records, score_of({"w x": 5.0, "y": 0.0, "z z z": 5.0}))  # top: w x (best) and z z z (not)
    assert tied_top.best_of_k_accuracy == 0.5 and tied_top.best_of_k_chance == pytest.approx(2 / 3)
    # the annotators disagree on (w x, y): the consensus pairs are (w x > z z z) and (y > z z z); the reward ties
    # the first (not ordered: wrong) and reverses the second
    assert tied_top.pairs == 2 and tied_top.pairwise_accuracy == 0.0


def rankings_file(path, n_items=6):
    lines = []
    for i in range(n_items):
        completions = [f"Good answer {i}: the office opens at 8.", f"ok {i}", f"wrong {i}, it opens at noon", f"go away {i}"]
        for ann, ranks in (("a", [1, 2, 3, 4]), ("b", [1, 3, 2, 4])):
            lines.append({"id": str(i), "prompt": f"When does office {i} open?", "completions": completions,
                          "ranks": ranks, "annotator": ann})
    write_jsonl(path, lines)
    return path


def test_reward_train_writes_and_prints_diagnostics_and_reward_score_computes_them(tiny_model, tmp_path):
    data = rankings_file(tmp_path / "rankings.jsonl")
    out = tmp_path / "rm"
    runner = CliRunner()
    result = runner.invoke(app, ["reward", "train", "-c", "configs/reward.yaml", f"model={tiny_model}",
                                 f"train_file={data}", f"eval_file={data}", f"output_dir={out}", "batch_size=2",
                                 "learning_rate=1e-2", "epochs=2"])
    assert result.exit_code == 0, result.output
    assert "best-of-K accuracy" in result.output and "between annotators 0.667 (the ceiling)" in result.output
    saved = json.loads((out / DIAGNOSTICS_FILE).read_text())
    assert saved["items"] == 6 and saved["completions"] == 24 and saved["best_of_k_chance"] == 0.25
    assert saved["kendall_tau_per_annotator"].keys() == {"a", "b"}

    scored = tmp_path / "scored.jsonl"
    result = runner.invoke(app, ["reward", "score", "--data", str(data), "--model", str(out), "--model", "toxicity",
                                 "--output", str(scored)])
    assert result.exit_code == 0, result.output
    assert result.output.count("best-of-K accuracy") == 2
    # the same model scores the same held-out items as after training
    assert f"best-of-K accuracy {saved['best_of_k_accuracy']:.3f}" in result.output
    records = [r for _, r in read_jsonl(scored)]
    assert len(records) == 12 and all(len(r["scores"]["toxicity"]) == 4 and len(r["scores"]["reward"]) == 4 for r in records)
