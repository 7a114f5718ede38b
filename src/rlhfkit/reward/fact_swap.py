"""The fact-swap test: can a reward model tell a right fact from a wrong one?

For each truth record with an ideal `response` and `facts`, the same answer is written twice: as it is, and with
one of its facts' numbers replaced by another that the fact sheet uses with the same words ("27 days" -> "25
days", "£54" -> "£35", "7:30" -> "8:30"), so the two differ in that number alone and the second no longer states
the fact. The share of pairs where the reward scores the right answer higher (ties count half) is the measure;
chance is 0.5. A reward model that ranks by length or style and not by content scores about 0.5 here however well
it agrees with people's rankings, which is what a policy optimising it would learn to exploit.

Only facts with a number are swapped (names and places have no "same words" to match), and only where the ideal
answer writes the number in digits; the records that offer neither are skipped.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhfkit.data.records import TruthRecord, load_truth_records
from rlhfkit.errors import DataError
from rlhfkit.text.facts import FactSheet, alternatives, contains, number_shape, number_value, states, tokens


@dataclass(frozen=True)
class FactSwap:
    prompt: str
    right: str
    wrong: str
    fact: str  # the fact the wrong answer no longer states
    swapped: str  # "27 -> 25"


def other_values(sheet_tokens: Sequence[str], alt: Sequence[str], j: int) -> list[str]:
    """Numbers the sheet states in place of alt[j] with alt's other words around them (same kind of number:
    currency, per cent, time), sorted; alt[j]'s own value excluded."""
    shape, n, found = number_shape(alt[j]), len(alt), set()
    for i in range(len(sheet_tokens) - n + 1):
        window = sheet_tokens[i:i + n]
        if all(w == a for k, (w, a) in enumerate(zip(window, alt)) if k != j) \
                and number_shape(window[j]) == shape and window[j] != alt[j]:
            found.add(window[j])
    return sorted(found)


def _digits_pattern(digits: str) -> re.Pattern:
    """The number as written in digits, not part of a longer one ("5" not in "15", "2.5" or "5:30")."""
    return re.compile(r"(?<![\d.,:])" + re.escape(digits) + r"(?![\d]|[.,:]\d)")


def replace_number(text: str, old: str, new: str, fact: str) -> str | None:
    """`text` with one digits occurrence of number token `old` changed to `new`'s digits, the first whose change
    makes `text` no longer state `fact` (else every occurrence changed); None where nothing does."""
    pattern, digits = _digits_pattern(number_value(old)), number_value(new)
    for match in pattern.finditer(text):
        candidate = text[:match.start()] + digits + text[match.end():]
        if not states(tokens(candidate), fact):
            return candidate
    candidate = pattern.sub(digits, text)
    return candidate if candidate != text and not states(tokens(candidate), fact) else None


def swap_one(record: TruthRecord, sheet: FactSheet, rng: random.Random) -> FactSwap | None:
    """The record's ideal answer with its first swappable fact made wrong (a value drawn by `rng`)."""
    answer_tokens, prompt_tokens = tokens(record.response), set(tokens(record.prompt))
    for fact in record.facts:
        for alt in alternatives(fact):
            if not contains(answer_tokens, alt):
                continue
            for j, token in enumerate(alt):
                if number_shape(token) is None:
                    continue
                values = [v for v in other_values(sheet.tokens, alt, j) if v not in prompt_tokens]
                rng.shuffle(values)
                for value in values:
                    wrong = replace_number(record.response, token, value, fact)
                    if wrong is not None:
                        return FactSwap(record.prompt, record.response, wrong, fact, f"{token} -> {value}")
    return None


def fact_swaps(records: Sequence[TruthRecord], sheet: FactSheet, seed: int = 0) -> list[FactSwap]:
    """One swap per record that has an ideal answer, facts, and a number the sheet offers another value for."""
    rng = random.Random(seed)
    swaps = (swap_one(r, sheet, rng) for r in records if r.response is not None and r.facts)
    return [s for s in swaps if s is not None]


def right_preferred(swaps: Sequence[FactSwap], score: Callable[[list, list[str]], Sequence[float]]) -> float:
    """The share of swaps whose right answer `score(prompts, responses)` puts above the wrong one (ties half)."""
    prompts = [s.prompt for s in swaps]
    values = np.asarray(score(prompts + prompts, [s.right for s in swaps] + [s.wrong for s in swaps]), dtype=float)
    right, wrong = values[:len(swaps)], values[len(swaps):]
    return float(np.mean((right > wrong) + 0.5 * (right == wrong)))


def load_fact_swaps(truth_file, facts_sheet) -> list[FactSwap]:
    """The swaps of a truth file's records against a fact sheet; an error where either is missing or none swaps."""
    if not Path(facts_sheet).is_file():
        raise DataError(f"fact sheet {facts_sheet} not found")
    swaps = fact_swaps(load_truth_records(truth_file), FactSheet.from_text(Path(facts_sheet).read_text(encoding="utf-8")))
    if not swaps:
        raise DataError(f"{truth_file}: no record has an ideal answer stating a fact with a number that {facts_sheet} "
                        "gives another value for: the fact-swap test has nothing to swap")
    return swaps
