"""The truth reward (rlhfkit.reward.truth) on tiny cases worked out by hand: right, partly right, wrong (a
contradicted number, a made-up contact, a `wrong` statement), declined where right and where needless."""

import json

import pytest
import torch

from rlhfkit.errors import ConfigError, DataError
from rlhfkit.reward.scorers import load_scorer
from rlhfkit.reward.truth import TruthReward, TruthWeights

SHEET = """# Facts
- Annual leave: 25 days, 27 days after 5 years.
- Book leave in Grove. IT helpdesk: ext 4357, it-help@corp.example.
"""
RECORDS = [
    {"prompt": "How much leave after 5 years?", "facts": ["27 days", "Grove"]},
    {"prompt": "What will next year's pay rise be?", "facts": ["People team|people@corp.example"],
     "answerable": False},
    {"prompt": "Which office is nicest?", "facts": ["Grove"], "wrong": ["Rotterdam"]},
]


@pytest.fixture
def truth_dir(tmp_path):
    (tmp_path / "FACTS.md").write_text(SHEET, encoding="utf-8")
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return tmp_path


def scores(reward, cases):
    return reward.score([p for p, _ in cases], [a for _, a in cases]).tolist()


def test_truth_reward_by_hand(truth_dir):
    reward = load_scorer(f"truth:{truth_dir}")
    assert isinstance(reward, TruthReward) and reward.name == "truth"
    leave, raise_, office = (r["prompt"] for r in RECORDS)
    cases = [
        (leave, "After five years you get twenty-seven days; book them in Grove."),  # both facts: 1
        (leave, "You get 27 days."),  # one of two: 0.5
        (leave, "You get 30 days, booked in Grove."),  # Grove (0.5), a changed number (-1): -0.5
        (leave, "You get 25 days in Grove."),  # 25 days is on the sheet (the base): no contradiction, 0.5
        (leave, "I don't know, ask in Grove."),  # 0.5 for Grove, a needless decline -0.5: 0
        (leave, "Call ext 9999 about it."),  # a contact the sheet does not hold: -1
        (raise_, "I'm not sure; the People team would know."),  # recall 1, declined rightly +1: 2
        (raise_, "I don't know."),  # declined rightly, no one named: 1
        (raise_, "It will be 3%."),  # a guess: 0
        (office, "Rotterdam, but book desks in Grove."),  # 1 for Grove, a `wrong` statement -1: 0
    ]
    assert scores(reward, cases) == pytest.approx([1.0, 0.5, -0.5, 0.5, 0.0, -1.0, 2.0, 1.0, 0.0, 0.0])


def test_weights_scale_each_term(truth_dir):
    reward = TruthReward(str(truth_dir), TruthWeights(facts=2.0, contradiction=3.0, declined=0.25, needless=1.0))
    leave, raise_, _ = (r["prompt"] for r in RECORDS)
    cases = [(leave, "You get 30 days, booked in Grove."), (leave, "I don't know."),
             (raise_, "I'm not sure, ask the People team.")]
    assert scores(reward, cases) == pytest.approx([2 * 0.5 - 3.0, -1.0, 2 * 1.0 + 0.25])


def test_a_grounded_prompt_scores_as_its_question(truth_dir):
    """With retrieval on, the prompt is a conversation whose system message holds passages: the question is its last
    user message, and the score is the plain question's."""
    reward = TruthReward(str(truth_dir))
    question = RECORDS[0]["prompt"]
    grounded = [{"role": "system", "content": "Answer from these passages.\n\n[1] Leave\n27 days after 5 years."},
                {"role": "user", "content": question}]
    answers = ["You get 27 days; book them in Grove.", "You get 30 days."]
    torch.testing.assert_close(reward.score([grounded] * 2, answers), reward.score([question] * 2, answers))


def test_a_prompt_without_facts_is_an_error_that_names_it(truth_dir):
    reward = TruthReward(str(truth_dir))
    with pytest.raises(DataError, match="no facts for the question 'Where is the canteen"):
        reward.score(["Where is the canteen?"], ["Upstairs."])
    (truth_dir / "questions.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(DataError, match="no record has `facts`"):
        TruthReward(str(truth_dir))


def test_a_truth_file_takes_the_fact_sheet_beside_it(truth_dir):
    """truth:FILE checks contacts against the FACTS.md next to the file, as truth:DIRECTORY does."""
    leave = RECORDS[0]["prompt"]
    for path in (truth_dir, truth_dir / "questions.jsonl"):
        assert scores(TruthReward(str(path)), [(leave, "Call ext 9999 about it.")]) == [-1.0]
    (truth_dir / "FACTS.md").unlink()
    assert scores(TruthReward(str(truth_dir / "questions.jsonl")), [(leave, "Call ext 9999 about it.")]) == [0.0]


def test_a_spec_sets_the_weights_in_its_query(truth_dir):
    leave, raise_, _ = (r["prompt"] for r in RECORDS)
    cases = [(leave, "I don't know."), (raise_, "I don't know.")]
    assert scores(load_scorer(f"truth:{truth_dir}"), cases) == pytest.approx([-0.5, 1.0])
    assert scores(load_scorer(f"truth:{truth_dir}?needless=0.25&declined=2"), cases) == pytest.approx([-0.25, 2.0])


@pytest.mark.parametrize("query, message", [("needles=0.25", "unknown weight 'needles'"),
                                            ("needless=much", "needless='much' is not a number"),
                                            ("needless", "needless='' is not a number")])
def test_a_bad_weight_in_a_spec_says_what_is_wrong(truth_dir, query, message):
    with pytest.raises(ConfigError, match=message):
        load_scorer(f"truth:{truth_dir}?{query}")
