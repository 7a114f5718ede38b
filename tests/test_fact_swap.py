"""The fact-swap test (rlhfkit.reward.fact_swap) by hand, on rewards built to prefer one token, through
`rlhfkit reward train` (written and printed), and length debiasing's learnt length term."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.data.records import TruthRecord, load_truth_records
from rlhfkit.reward.diagnostics import DIAGNOSTICS_FILE
from rlhfkit.reward.fact_swap import fact_swaps, replace_number, right_preferred, swap_one
from rlhfkit.text.facts import FactSheet, check_facts, states, tokens

SHEET = FactSheet.from_text("Leave: 25 days a year, 27 days after 5 years; 3 days' notice. Mileage: £54 or £35.")


def test_a_swap_changes_one_number_to_another_the_sheet_uses_with_the_same_words():
    record = TruthRecord(prompt="Leave after 5 years?", response="After 5 years you get 27 days.", facts=["27 days"])
    swap = swap_one(record, SHEET, random.Random(0))
    # the sheet says "N days" with N in {25, 27, 3}; 5 is in the prompt... but "5 days" is not on the sheet anyway
    assert swap.wrong in ("After 5 years you get 25 days.", "After 5 years you get 3 days.")
    assert swap.right == record.response and swap.fact == "27 days"
    assert not states(tokens(swap.wrong), "27 days") and check_facts(swap.wrong, ["27 days"]).contradicted
    currency = TruthRecord(prompt="Mileage for 120 miles?", response="That comes to £54.", facts=["£54"])
    assert swap_one(currency, SHEET, random.Random(0)).wrong == "That comes to £35."
    # a number only in words, or a fact without a number, or a number the sheet has no other value for: no swap
    assert swap_one(TruthRecord(prompt="q", response="You get twenty-seven days.", facts=["27 days"]), SHEET,
                    random.Random(0)) is None
    assert swap_one(TruthRecord(prompt="q", response="Use Grove.", facts=["Grove"]), SHEET, random.Random(0)) is None


def test_replace_number_changes_the_occurrence_that_states_the_fact_only():
    # "5" also appears in "5 years": the swap of "5 days" leaves it alone
    assert replace_number("After 5 years, 5 days.", "5", "3", "5 days") == "After 5 years, 3 days."
    assert replace_number("15 days and 2.5 days", "5", "3", "5 days") is None  # "5" inside other numbers only


def test_right_preferred_on_rewards_built_to_prefer_one_token():
    records = load_truth_records(Path("data/company/test.jsonl"))
    sheet = FactSheet.from_text(Path("data/company/FACTS.md").read_text(encoding="utf-8"))
    swaps = fact_swaps(records, sheet)
    assert len(swaps) >= 30  # the held-out questions offer enough numbers to swap
    assert all(not states(tokens(s.wrong), s.fact) and states(tokens(s.right), s.fact) for s in swaps)
    # a reward that counts the facts' own tokens sees every swap; one that counts the swapped-in token sees none
    wanted = {s.right: s for s in swaps} | {s.wrong: s for s in swaps}
    knows = lambda prompts, texts: [float(states(tokens(t), wanted[t].fact)) for t in texts]  # noqa: E731
    assert right_preferred(swaps, knows) == 1.0
    assert right_preferred(swaps, lambda prompts, texts: [-x for x in knows(prompts, texts)]) == 0.0
    assert right_preferred(swaps, lambda prompts, texts: [len(t) for t in texts]) == pytest.approx(
        sum((len(s.right) > len(s.wrong)) + 0.5 * (len(s.right) == len(s.wrong)) for s in swaps) / len(swaps))
    assert right_preferred(swaps, lambda prompts, texts: [0.0] * len(texts)) == 0.5  # all ties: chance


def rankings(path: Path) -> Path:
    rows = []
    for i in range(6):
        completions = ["short.", "a longer answer here.", "the longest answer of all four here.", "mid one."]
        rows.append({"prompt": f"question {i}", "completions": completions, "ranks": [4, 2, 1, 3], "annotator": "a"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_reward_train_writes_and_prints_the_fact_swap_and_learns_a_length_term(tiny_model, tmp_path):
    data, out = rankings(tmp_path / "rankings.jsonl"), tmp_path / "rm"
    result = CliRunner().invoke(app, [
        "reward", "train", "-c", "configs/reward.yaml", f"model={tiny_model}", f"train_file={data}",
        f"eval_file={data}", f"output_dir={out}", "batch_size=2", "learning_rate=1e-2", "epochs=2", "log_every=1",
        "fact_swap_file=data/company/test.jsonl", "facts_sheet=data/company/FACTS.md", "length_debias=true"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / DIAGNOSTICS_FILE).read_text())
    assert saved["fact_swap_pairs"] >= 30 and 0.0 <= saved["fact_swap_right_preferred"] <= 1.0
    assert f"right fact preferred in {saved['fact_swap_right_preferred']:.3f} of {saved['fact_swap_pairs']}" \
        in result.output.replace("\n", " ")
    # every ranking prefers the longer answer: the length term's beta is positive (and finite), the same all run
    betas = [json.loads(line).get("train/length_beta") for line in (out / "metrics.jsonl").read_text().splitlines()]
    betas = [b for b in betas if b is not None]
    assert betas and 0 < betas[0] < 100 and len(set(betas)) == 1
    # the saved model is a plain classifier: no length term in its weights
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any("beta" in k for k in f.keys())


def test_the_length_coefficient_is_the_bradley_terry_fit_of_length_alone():
    """400 pairs 10 words apart, the longer preferred in 3 of 4: sigmoid(beta) = 3/4, beta = log 3 per 10 words."""
    from rlhfkit.data.preference import PreferenceItem
    from rlhfkit.reward.train import fit_length_coefficient

    short, long = "a " * 5, "a " * 15
    items = [PreferenceItem("p", [long, short], pairs=[(0, 1)], shares=[1.0]) for _ in range(300)]
    items += [PreferenceItem("p", [short, long], pairs=[(0, 1)], shares=[1.0]) for _ in range(100)]
    assert fit_length_coefficient(items) == pytest.approx(math.log(3), abs=1e-3)
    assert fit_length_coefficient(items[:300] + items[:0] + items[300:] * 3) == pytest.approx(0.0, abs=1e-6)
    # soft labels: each pair's vote share is its label
    soft = [PreferenceItem("p", [long, short], pairs=[(0, 1)], shares=[0.75]) for _ in range(10)]
    assert fit_length_coefficient(soft, soft_labels=True) == pytest.approx(math.log(3), abs=1e-3)
    assert fit_length_coefficient([PreferenceItem("p", [short, short + " "], pairs=[(0, 1)], shares=[1.0])]) == 0.0


def test_the_fact_swap_needs_its_sheet():
    from rlhfkit.config import RewardConfig

    with pytest.raises(ValueError, match="needs both fact_swap_file"):
        RewardConfig(train_file="x.jsonl", output_dir="out", fact_swap_file="data/company/test.jsonl")
