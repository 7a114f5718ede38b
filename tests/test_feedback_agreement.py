"""Agreement metrics against published and hand-computed values."""

from __future__ import annotations

import pytest

from rlhfkit.data.preference import RankingRecord
from rlhfkit.feedback.agreement import consensus_agreement, krippendorff_alpha, pairwise_agreement

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 coders, 12 units, values 1-5,
# missing values as None. Published: nominal 0.743, ordinal 0.815, interval 0.849.
CODERS = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]
UNITS = [[v for v in unit if v is not None] for unit in zip(*CODERS)]


@pytest.mark.parametrize(("metric", "published"), [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorffs_worked_example(metric, published):
    assert krippendorff_alpha(UNITS, metric) == pytest.approx(published, abs=5e-4)


def test_alpha_by_hand_two_coders_binary():
    # Units (a, b): (0,0) (0,0) (1,1) (0,1). Coincidences: o_00 = 4, o_11 = 2, o_01 = o_10 = 1; n_0 = 5, n_1 = 3, n = 8.
    # D_o = (1 + 1) / 8; D_e = (5*3 + 3*5) / (8*7); alpha = 1 - (2/8) / (30/56) = 1 - 56/120 = 0.5333.
    units = [[0, 0], [0, 0], [1, 1], [0, 1]]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(1 - 56 / 120)
    # Ordinal with two values: delta^2(0,1) = (n_0 + n_1 - (n_0 + n_1)/2)^2 = 16; the scale cancels, so the same alpha.
    assert krippendorff_alpha(units, "ordinal") == pytest.approx(1 - 56 / 120)


def test_alpha_perfect_undefined_and_unpairable():
    assert krippendorff_alpha([[1, 1], [2, 2], [3, 3]], "ordinal") == 1.0
    assert krippendorff_alpha([[2, 2], [2, 2]], "ordinal") is None  # one value throughout: no expected disagreement
    assert krippendorff_alpha([[1], [2]], "nominal") is None  # nobody coded the same unit
    assert krippendorff_alpha([[1, 2], [2, 1]], "nominal") < 0  # systematic disagreement


def rec(annotator, ranks, item="x"):
    return RankingRecord(prompt="p", completions=["a", "b", "c"], ranks=ranks, annotator=annotator, id=item)


def test_pairwise_and_consensus_agreement():
    records = [rec("u1", [1, 2, 3]), rec("u2", [1, 3, 2]), rec("u3", [1, 2, 2]),
               rec("u1", [1, 2, 3], "y"), rec("u2", [1, 2, 3], "y"), rec("solo", [3, 2, 1], "z")]
    # Item x: pairs (a,b) (a,c) (b,c); u1 vs u2 agree on 2 of 3, u1 vs u3 on 2, u2 vs u3 on 2. Item y: 3 of 3.
    assert pairwise_agreement(records) == pytest.approx((2 + 2 + 2 + 3) / 12)
    # Consensus on x: a>b (3 votes), a>c (3), b vs c: u1 for b, u2 for c, u3 tie -> no pair. On y: all three pairs.
    assert consensus_agreement(records) == {"solo": None, "u1": 1.0, "u2": 1.0, "u3": 1.0}
    flipped = records + [rec("u4", [3, 2, 1], "y")]  # y: 2 votes against 1 on each pair; u4 is in the minority
    assert consensus_agreement(flipped)["u4"] == 0.0
    assert pairwise_agreement([rec("u1", [1, 2, 3])]) is None


def test_agreement_matches_completions_by_text_and_groups_records_without_ids():
    a = RankingRecord(prompt="p", completions=["a", "b", "c"], ranks=[1, 2, 3], annotator="u1")
    b = RankingRecord(prompt="p", completions=["c", "a", "b"], ranks=[3, 1, 2], annotator="u2")  # same order, shuffled
    other = RankingRecord(prompt="q", completions=["a", "b"], ranks=[2, 1], annotator="u3")
    assert pairwise_agreement([a, b, other]) == 1.0
    assert consensus_agreement([a, b, other]) == {"u1": 1.0, "u2": 1.0, "u3": None}
