import json
from collections import Counter
from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.data.preference import (
    RankingRecord,
    consolidate_rankings,
    load_preference_items,
    load_rankings,
    pairs_to_items,
    ranking_to_pairs,
)
from rlhfkit.errors import DataError


@st.composite
def rankings(draw, min_k=2, max_k=6):
    k = draw(st.integers(min_k, max_k))
    ranks = draw(st.lists(st.integers(1, k), min_size=k, max_size=k))
    return RankingRecord(prompt="p", completions=[f"c{i}" for i in range(k)], ranks=ranks, annotator="a", id="x")


@given(rankings())
def test_every_untied_couple_becomes_exactly_one_pair_with_the_better_one_chosen(r):
    pairs = ranking_to_pairs(r)
    rank = dict(zip(r.completions, r.ranks))
    untied = sum(1 for i, j in combinations(range(len(r.ranks)), 2) if r.ranks[i] != r.ranks[j])
    assert len(pairs) == untied
    assert len({frozenset((p.chosen, p.rejected)) for p in pairs}) == len(pairs)
    assert all(rank[p.chosen] < rank[p.rejected] and not p.tie for p in pairs)


@given(rankings())
def test_keeping_ties_gives_all_k_choose_2(r):
    k = len(r.completions)
    pairs = ranking_to_pairs(r, keep_ties=True)
    assert len(pairs) == k * (k - 1) // 2
    rank = dict(zip(r.completions, r.ranks))
    assert all(p.tie == (rank[p.chosen] == rank[p.rejected]) for p in pairs)


def as_set(items):
    return {(it.completions[i], it.completions[j]) for it in items for i, j in it.pairs}


@given(rankings(), st.randoms())
def test_one_annotator_consolidates_to_their_own_pairs_whatever_the_order(r, rnd):
    order = list(range(len(r.completions)))
    rnd.shuffle(order)
    shuffled = r.model_copy(update={"completions": [r.completions[i] for i in order], "ranks": [r.ranks[i] for i in order]})
    expected = {(p.chosen, p.rejected) for p in ranking_to_pairs(r)}
    assert as_set(consolidate_rankings([r])) == expected == as_set(consolidate_rankings([shuffled]))


@given(st.lists(rankings(min_k=4, max_k=4), min_size=1, max_size=5))
@settings(max_examples=200)
def test_consolidation_is_the_majority_of_annotators_per_pair(group):
    group = [g.model_copy(update={"annotator": f"a{n}"}) for n, g in enumerate(group)]
    [item] = consolidate_rankings(group, keep_ties=True) or [None]
    wins = Counter()
    for g in group:
        for p in ranking_to_pairs(g):
            wins[(p.chosen, p.rejected)] += 1
    for a, b in combinations(group[0].completions, 2):
        expected = (a, b) if wins[(a, b)] > wins[(b, a)] else (b, a) if wins[(b, a)] > wins[(a, b)] else None
        got_pairs = {(item.completions[i], item.completions[j]) for i, j in item.pairs}
        got_ties = {frozenset((item.completions[i], item.completions[j])) for i, j in item.ties}
        if expected is None:
            assert frozenset((a, b)) in got_ties and (a, b) not in got_pairs and (b, a) not in got_pairs
        else:
            assert expected in got_pairs and frozenset((a, b)) not in got_ties


def test_disagreement_is_settled_by_majority_and_an_even_split_is_a_tie():
    make = lambda ann, ranks: RankingRecord(prompt="p", completions=["a", "b", "c"], ranks=ranks, annotator=ann, id="1")  # noqa: E731
    [item] = consolidate_rankings([make("x", [1, 2, 3]), make("y", [2, 1, 3]), make("z", [1, 3, 2])], keep_ties=True)
    pairs = {(item.completions[i], item.completions[j]) for i, j in item.pairs}
    assert pairs == {("a", "b"), ("a", "c"), ("b", "c")}  # a>b 2:1, a>c 3:0, b>c 2:1
    [item] = consolidate_rankings([make("x", [1, 2, 3]), make("y", [2, 1, 3])], keep_ties=True)
    assert [(item.completions[i], item.completions[j]) for i, j in item.ties] == [("a", "b")]


def write(tmp_path, *records):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "completions": ["a", "b"], "ranks": [1], "annotator": "x"}, "1 ranks for 2 completions"),
    ({"prompt": "p", "completions": ["a"], "ranks": [1], "annotator": "x"}, "at least 2 completions"),
    ({"prompt": "p", "completions": ["a", " "], "ranks": [1, 2], "annotator": "x"}, r"completions\.1: empty"),
    ({"prompt": "p", "completions": ["a", "b"], "ranks": [0, 1], "annotator": "x"}, "ranks start at 1"),
    ({"prompt": "p", "completions": ["a", "b"], "ranks": [1, 2]}, "annotator: Field required"),
])
def test_bad_rankings_name_file_line_and_problem(tmp_path, record, message):
    good = {"prompt": "p", "completions": ["a", "b"], "ranks": [1, 2], "annotator": "x"}
    with pytest.raises(DataError, match=r"r\.jsonl:2: .*" + message):
        load_rankings(write(tmp_path, good, record))


def test_pairs_file_groups_by_prompt_and_scores_each_completion_once(tmp_path):
    path = write(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "c", "margin": 1.5},
                 {"prompt": "q", "chosen": "x", "rejected": "y"})
    items = load_preference_items(path)
    assert [(i.prompt, i.completions, i.pairs, i.margins) for i in items] == [
        ("p", ["a", "b", "c"], [(0, 1), (0, 2)], [0.0, 1.5]), ("q", ["x", "y"], [(0, 1)], [0.0])]
    assert pairs_to_items([]) == []


def test_bundled_rankings_have_several_annotators_who_sometimes_disagree():
    from conftest import REPO

    records = load_rankings(REPO / "data" / "company_feedback" / "rankings_train.jsonl")
    by_item = Counter(r.id for r in records)
    assert len(by_item) >= 120 and min(by_item.values()) >= 2
    items = consolidate_rankings(records, keep_ties=True)
    assert sum(len(i.ties) for i in items) > 0  # genuine disagreement (or shared ties) exists


def test_trl_preference_forms_give_the_same_pairs_as_ours(tmp_path):
    from rlhfkit.data.preference import load_pairs

    user = [{"role": "user", "content": "Where is HQ?"}]
    good, bad = [{"role": "assistant", "content": "Edinburgh."}], [{"role": "assistant", "content": "Paris."}]
    rows = [
        {"prompt": "Where is HQ?", "chosen": "Edinburgh.", "rejected": "Paris."},  # ours = TRL standard, explicit
        {"chosen": "Where is HQ? Edinburgh.", "rejected": "Where is HQ? Paris."},  # standard, implicit prompt
        {"prompt": user, "chosen": good, "rejected": bad},  # conversational, explicit
        {"chosen": user + good, "rejected": user + bad},  # conversational, implicit
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs(path)
    assert {(p.prompt, p.chosen, p.rejected) for p in pairs} == {("Where is HQ?", "Edinburgh.", "Paris.")}
    [item] = load_preference_items(path)
    assert item.completions == ["Edinburgh.", "Paris."] and item.pairs == [(0, 1)] * 4


def test_implicit_prompts_split_at_a_word_and_conversations_keep_their_turns(tmp_path):
    from rlhfkit.data.preference import split_shared_prompt

    assert split_shared_prompt("Human: hi. Assistant: Hello there", "Human: hi. Assistant: Help yourself") == (
        "Human: hi. Assistant:", "Hello there", "Help yourself")
    system = {"role": "system", "content": "Be brief."}
    turns = [system, {"role": "user", "content": "a"}]
    prompt, chosen, rejected = split_shared_prompt(turns + [{"role": "assistant", "content": "b"}],
                                                   turns + [{"role": "assistant", "content": "c"}])
    assert prompt == turns and chosen == [{"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="share no prompt"):
        split_shared_prompt("yes", "no")
    path = tmp_path / "conv.jsonl"
    path.write_text(json.dumps({"chosen": turns + [{"role": "assistant", "content": "b"}],
                                "rejected": turns + [{"role": "assistant", "content": "c"}]}) + "\n")
    [item] = load_preference_items(path)
    assert item.prompt == turns and item.completions == ["b", "c"]
