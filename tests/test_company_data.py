"""The bundled company dataset (data/company/) holds together: every record's facts come from FACTS.md under the
evaluation's normalisation, every ideal response states its facts and contradicts nothing, the unanswerable
questions decline, and the ids and prompts are as the dataset's README says."""

from __future__ import annotations

import json

import pytest

from conftest import COMPANY_TEST, COMPANY_TRAIN, COMPANY_VALIDATION, REPO
from rlhfkit.data.records import load_sft_examples, load_truth_records
from rlhfkit.text.facts import FactSheet, abstains, alternatives, check_facts, states

FACTS_MD = REPO / "data" / "company" / "FACTS.md"
KEYS = ("id", "prompt", "response", "facts", "answerable", "wrong")

# Test facts that FACTS.md does not state in these words: each is the sheet's rule applied to the question (a
# weekday worked out from "the previous working day", 120 miles at 45p, advice to ask a colleague directly) or a
# wording the sheet abbreviates ("31 Dec"). The test set is kept as it is; this list says which they are.
TEST_FACTS_OFF_THE_SHEET = {
    "company-0284": ["31 December|end of the year|end of the calendar year|year end|end of December"],
    "company-0287": ["Friday"],
    "company-0292": ["£54"],
    "company-0306": ["don't approve|do not approve|deny|reject|decline"],
    "company-0332": ["directly|ask him|ask your teammate"],
}


@pytest.fixture(scope="module")
def sheet() -> FactSheet:
    return FactSheet.from_text(FACTS_MD.read_text(encoding="utf-8"))


def raw(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("path", [COMPANY_TRAIN, COMPANY_VALIDATION, COMPANY_TEST], ids=["train", "validation", "test"])
def test_every_record_has_facts_or_is_marked_unanswerable(path):
    records = load_truth_records(path)  # also validates the facts (no empty list, no empty alternative)
    for r in records:
        assert r.facts or not r.answerable, r.id
        assert r.facts is None or 1 <= len(r.facts) <= 4, r.id
    for record in raw(path):  # one JSON object per line, keys in the documented order
        assert list(record) == [k for k in KEYS if k in record], record["id"]
    # and the file still loads wherever SFT records load
    assert [e.messages[-1].content for e in load_sft_examples(path)] == [r.response for r in records]


def test_every_training_fact_is_stated_in_facts_md(sheet):
    records = load_truth_records(COMPANY_TRAIN) + load_truth_records(COMPANY_VALIDATION)
    off = [(r.id, f) for r in records for f in r.facts or [] if not states(sheet.tokens, f)]
    assert not off


def test_the_test_facts_not_in_facts_md_are_the_known_derived_ones(sheet):
    off: dict[str, list[str]] = {}
    for r in load_truth_records(COMPANY_TEST):
        for f in r.facts or []:
            assert alternatives(f), (r.id, f)
            if not states(sheet.tokens, f):
                off.setdefault(r.id, []).append(f)
    assert off == TEST_FACTS_OFF_THE_SHEET


@pytest.mark.parametrize("path", [COMPANY_TRAIN, COMPANY_VALIDATION, COMPANY_TEST], ids=["train", "validation", "test"])
def test_each_ideal_response_states_its_facts_and_contradicts_nothing(path, sheet):
    for r in load_truth_records(path):
        check = check_facts(r.response, r.facts or [], r.prompt, r.answerable, r.wrong or [], sheet)
        # recall 1.0: every fact, and for an unanswerable question saying that it does not know
        assert check.recall == 1.0 and not check.contradicted, (r.id, check)
        # an answerable question's ideal answer does not decline (a needless refusal)
        assert not r.answerable or not abstains(r.response), r.id
        assert 15 <= len(r.response.split()) <= 47, r.id


def test_unanswerable_training_questions_ids_and_prompts():
    train, validation = load_truth_records(COMPANY_TRAIN), load_truth_records(COMPANY_VALIDATION)
    test = load_truth_records(COMPANY_TEST)
    assert len(train) == 268 and len(validation) == 38 and len(test) == 73
    assert sum(not r.answerable for r in train) >= 30 and sum(not r.answerable for r in validation) == 9
    # the validation split: every 8th training question in id order, from the 4th on
    pool = sorted(train + validation, key=lambda r: r.id)
    assert [r.id for r in validation] == [r.id for r in pool[3::8]]
    ids = sorted(int(r.id.removeprefix("company-")) for r in train + validation + test)
    assert ids == list(range(1, len(ids) + 1))  # unique and consecutive across the three files
    assert all(r.id == f"company-{int(r.id.removeprefix('company-')):04d}" for r in train + validation + test)
    prompts = [r.prompt.strip().lower() for r in train + validation + test]
    assert len(set(prompts)) == len(prompts)
