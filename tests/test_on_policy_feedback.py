"""The on-policy feedback round: simulated annotators who know the handbook (the truth reward as their gold
utility), their noise set from people's measured agreement, every ranking marked simulated, and the same
completions loaded into the feedback app for people to rank instead."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from rlhfkit.cli import app as cli_app
from rlhfkit.data.jsonl import read_jsonl, write_jsonl
from rlhfkit.data.preference import RankingRecord, load_rankings
from rlhfkit.errors import DataError
from rlhfkit.evaluation.simulate import Item, calibrate_noise, expected_agreement, simulate_rankings
from rlhfkit.feedback.agreement import pairwise_agreement

from feedback_helpers import Client, add_user, create_project


def measured_agreement(items, gold, noise, annotators=3, seed=0) -> float:
    records = simulate_rankings(items, gold, annotators, noise, seed)
    return pairwise_agreement([RankingRecord.model_validate(r) for r in records])


@pytest.mark.parametrize("target", [0.9024, 0.75])
def test_the_calibrated_noise_gives_the_agreement_asked_for(target):
    rng = np.random.default_rng(1)
    gold = [list(rng.choice([0.0, 0.5, 1.0, 2.0, -1.0], size=4, replace=False) + rng.normal(0, 0.1, 4))
            for _ in range(400)]
    items = [Item(f"i{n}", f"p{n}", [f"c{k}" for k in range(4)]) for n in range(400)]
    noise = calibrate_noise(gold, target)
    assert expected_agreement(gold, noise) == pytest.approx(target, abs=1e-6)
    assert measured_agreement(items, gold, noise) == pytest.approx(target, abs=0.015)
    # more noise, less agreement; none, full agreement
    assert expected_agreement(gold, 2 * noise) < target < expected_agreement(gold, noise / 2)
    assert measured_agreement(items, gold, 0.0) == 1.0


def test_an_agreement_that_ties_make_unreachable_is_an_error():
    gold = [[1.0, 1.0, 0.0, 0.0]] * 10  # 2 of 6 pairs tie: at most (4 + 0.5 * 2) / 6 = 0.833 with any noise
    with pytest.raises(DataError, match=r"between 0.5 and 0.833 on these items \(33% of pairs have equal gold"):
        calibrate_noise(gold, 0.9)


QUESTION = "I hit my 5-year anniversary this spring, does that change my holiday allowance?"
ANSWERS = ["Yes: after 5 years you get 2 extra days, so 27 days a year.",  # both facts: truth 1
           "Yes, you get 27 days now.",  # one fact: 0.5
           "Yes, you get 30 days now.",  # a changed number: -1
           "I don't know, sorry."]  # a needless decline: -0.5


def test_simulated_annotators_who_know_the_handbook_rank_right_facts_first_and_the_answers_go_to_the_app(tmp_path):
    write_jsonl(tmp_path / "samples.jsonl", [{"id": f"s{i}", "prompt": QUESTION, "completions": ANSWERS}
                                             for i in range(40)])
    runner = CliRunner()
    result = runner.invoke(cli_app, [
        "simulate", "-c", "configs/simulate.yaml", "model=null", "prompts_file=null",
        f"completions_file={tmp_path / 'samples.jsonl'}", "gold=[{scorer: 'truth:data/company'}]",
        "match_agreement=data/company_feedback/rankings_train.jsonl", f"output_file={tmp_path / 'rankings.jsonl'}",
        f"items_file={tmp_path / 'items.jsonl'}"])
    assert result.exit_code == 0, result.output
    people = pairwise_agreement(load_rankings("data/company_feedback/rankings_train.jsonl"))
    rankings = load_rankings(tmp_path / "rankings.jsonl")
    raw = [r for _, r in read_jsonl(tmp_path / "rankings.jsonl")]
    assert len(rankings) == 120 and all(r["simulated"] is True and r["annotator"].startswith("sim-") for r in raw)
    assert raw[0]["gold"] == pytest.approx([1.0, 0.5, -1.0, -0.5])
    # 40 items are few: the measured agreement is near the people's (0.902), not equal to it
    assert pairwise_agreement(rankings) == pytest.approx(people, abs=0.06)
    assert f"pairwise agreement {pairwise_agreement(rankings):.3f}" in result.output
    first = np.mean([r.ranks[0] == 1 for r in rankings])
    wrong_last = np.mean([r.ranks[2] == max(r.ranks) for r in rankings])
    assert first > 0.6 and wrong_last > 0.6

    # the same completions into the feedback app, for people to rank instead
    url = f"sqlite:///{tmp_path / 'app.db'}"
    from rlhfkit.feedback.app import create_app

    web = create_app(url)
    add_user(web, "admin", "admin")
    add_user(web, "alice")
    admin, alice = Client(web).login("admin"), Client(web).login("alice")
    pid = create_project(admin, name="on-policy", k=4, annotators=1, questions=("ranking",), members=("alice",))
    result = runner.invoke(cli_app, ["feedback", "import", "--project", "on-policy", str(tmp_path / "items.jsonl"),
                                     "--database-url", url])
    assert result.exit_code == 0, result.output
    assert "imported 40 completions records" in result.output
    item = alice.get(f"/api/projects/{pid}/next").json()
    assert item["prompt"] == QUESTION and sorted(c["text"] for c in item["completions"]) == sorted(ANSWERS)
    bad = runner.invoke(cli_app, ["feedback", "import", "--project", "nope", str(tmp_path / "items.jsonl"),
                                  "--database-url", url])
    assert bad.exit_code != 0 and "no project named 'nope'" in str(bad.exception)
    assert json.loads((tmp_path / "items.jsonl").read_text().splitlines()[0])["completions"] == ANSWERS
