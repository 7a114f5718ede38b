"""Preference data: rankings of K completions, pairwise comparisons, and the conversion between them.

A ranking of K completions yields every K-choose-2 pair (InstructGPT). Equal ranks are ties; a tie says neither
completion is better, so by default it yields no pair (`keep_ties=True` keeps it as a pair with label 1/2).

Consolidation of several annotators' rankings of the same item, pair by pair (majority):
  for completions a and b, count the annotators who ranked a above b and those who ranked b above a;
  annotators who tied them count for neither side. The side with more votes wins the pair; equal votes
  (including every annotator tying them) make the pair a tie.
The same rule builds the feedback app's consensus export. A pair also carries its vote share: the fraction of the
item's annotators who ranked its chosen completion above the rejected one, a tie counting half (2 of 3: 2/3), the
soft target of `soft_labels` training.

Pairs are read in TRL's preference formats too: a conversational prompt (`"prompt": [messages]`, chosen and
rejected as one assistant message each), and an implicit prompt (only `chosen` and `rejected`, each the whole
text or conversation; the prompt is the part they share).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rlhfkit.data.records import Prompt, Record, load_records
from rlhfkit.data.sources import read_records
from rlhfkit.errors import DataError


class RankingRecord(BaseModel):
    """`{"prompt", "completions": [K], "ranks": [K ints, 1 = best, equal = tie], "annotator", "id"?}`."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    completions: list[str]
    ranks: list[int]
    annotator: str
    id: str | None = None

    @field_validator("prompt", "annotator")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _check(self) -> RankingRecord:
        k = len(self.completions)
        if k < 2:
            raise ValueError(f"completions: a ranking needs at least 2 completions, got {k}")
        if len(self.ranks) != k:
            raise ValueError(f"ranks: {len(self.ranks)} ranks for {k} completions; give one rank per completion")
        if any(r < 1 for r in self.ranks):
            raise ValueError("ranks: ranks start at 1 (= best)")
        for i, text in enumerate(self.completions):
            if not text.strip():
                raise ValueError(f"completions.{i}: empty completion")
        if len(set(self.completions)) != k:
            raise ValueError("completions: the same completion appears twice")
        return self


class PairRecord(Record):
    """`{"prompt", "chosen", "rejected", "margin"?, "tie"?}`: the pair format TRL and most tools read; also TRL's
    conversational and implicit-prompt forms (see the module docstring)."""

    prompt: Prompt
    chosen: str
    rejected: str
    margin: float = 0.0  # required reward gap, as in Llama 2's margin loss
    share: float = Field(1.0, ge=0, le=1)  # fraction of annotators who preferred chosen (ties count half)
    tie: bool = False  # neither is better (kept only when asked)

    @model_validator(mode="before")
    @classmethod
    def _trl_forms(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not {"chosen", "rejected"} <= data.keys():
            return data
        data = dict(data)
        if "prompt" not in data:
            data["prompt"], data["chosen"], data["rejected"] = split_shared_prompt(data["chosen"], data["rejected"])
        for key in ("chosen", "rejected"):
            data[key] = _completion_text(data[key], key)
        return data

    @model_validator(mode="after")
    def _check(self) -> PairRecord:
        for name in ("prompt", "chosen", "rejected"):
            value = getattr(self, name)
            if isinstance(value, str) and not value.strip():
                raise ValueError(f"{name}: must not be empty")
        if self.chosen == self.rejected:
            raise ValueError("chosen and rejected are the same text")
        return self


def _completion_text(value: Any, key: str) -> Any:
    """A conversational completion (one assistant message) as its text; text as it is."""
    if not isinstance(value, list):
        return value
    if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
        raise ValueError(f"{key}: a conversational completion must be one assistant message")
    return value[0].get("content")


def split_shared_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """An implicit-prompt pair -> (prompt, chosen, rejected): the prompt is what the two share from the start.

    Conversations share their first messages. Texts share a prefix, cut back to a word boundary so that no word is
    split between prompt and answer; surrounding whitespace is dropped.
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise ValueError("chosen and rejected share no prompt: give a 'prompt' field")
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and not chosen[n - 1].isspace():  # a word they start alike goes to both answers whole
            n -= 1
        if not chosen[:n].strip():
            raise ValueError("chosen and rejected share no prompt: give a 'prompt' field")
        return chosen[:n].strip(), chosen[n:].strip(), rejected[n:].strip()
    raise ValueError("chosen and rejected must both be strings or both be lists of messages")


def prompt_key(prompt: str | list) -> str:
    """A hashable key for a prompt that may be a conversation."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def load_rankings(source: str | os.PathLike) -> list[RankingRecord]:
    return load_records(source, RankingRecord)


def load_pairs(source: str | os.PathLike) -> list[PairRecord]:
    return load_records(source, PairRecord)


def detect_format(source: str | os.PathLike) -> str:
    """'rankings' or 'pairs', from the keys of the first record."""
    for where, record in read_records(source):
        if "completions" in record:
            return "rankings"
        if "chosen" in record:
            return "pairs"
        raise DataError(f"{where}: neither a ranking (completions, ranks) nor a pair (chosen, rejected)")
    raise DataError(f"{source}: the file holds no records")


def ranking_to_pairs(record: RankingRecord, keep_ties: bool = False) -> list[PairRecord]:
    """Every K-choose-2 pair of one ranking, better completion as `chosen`."""
    pairs = []
    for i, j in combinations(range(len(record.completions)), 2):
        ri, rj = record.ranks[i], record.ranks[j]
        if ri == rj and not keep_ties:
            continue
        better, worse = (i, j) if ri <= rj else (j, i)
        pairs.append(PairRecord(prompt=record.prompt, chosen=record.completions[better],
                                rejected=record.completions[worse], tie=ri == rj))
    return pairs


@dataclass
class PreferenceItem:
    """One prompt, its distinct completions, and the comparisons among them as index pairs.

    The reward model scores each completion once and forms every pair from those scores.
    """

    prompt: str | list  # text, or a conversation so far (message dicts)
    completions: list[str]
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (better, worse)
    ties: list[tuple[int, int]] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)  # one per pair
    shares: list[float] = field(default_factory=list)  # one per pair: the vote share of its better completion

    def to_pair_records(self) -> list[PairRecord]:
        c = self.completions
        return [PairRecord(prompt=self.prompt, chosen=c[i], rejected=c[j], margin=m, share=q)
                for (i, j), m, q in zip(self.pairs, self.margins, self.shares)] + [
            PairRecord(prompt=self.prompt, chosen=c[i], rejected=c[j], tie=True) for i, j in self.ties
        ]


def _item_key(record: RankingRecord) -> tuple:
    return ("id", record.id) if record.id is not None else ("text", record.prompt, frozenset(record.completions))


def consolidate_rankings(records: list[RankingRecord], keep_ties: bool = False) -> list[PreferenceItem]:
    """One item per ranked prompt, the pairs decided by annotator majority (see the module docstring)."""
    groups: dict[tuple, list[RankingRecord]] = defaultdict(list)
    for r in records:
        groups[_item_key(r)].append(r)
    items = []
    for key, group in groups.items():
        first = group[0]
        for other in group[1:]:
            if other.prompt != first.prompt or set(other.completions) != set(first.completions):
                raise DataError(
                    f"item {key[1]!r}: annotators {first.annotator!r} and {other.annotator!r} ranked different "
                    "prompts or completions under the same id"
                )
        completions = list(first.completions)
        above: dict[tuple[int, int], int] = defaultdict(int)  # (i, j): annotators who ranked i above j
        for r in group:
            rank_of = dict(zip(r.completions, r.ranks))
            for i, j in combinations(range(len(completions)), 2):
                ri, rj = rank_of[completions[i]], rank_of[completions[j]]
                above[(i, j)] += ri < rj
                above[(j, i)] += rj < ri
        item = PreferenceItem(prompt=first.prompt, completions=completions)
        for i, j in combinations(range(len(completions)), 2):
            ties = len(group) - above[(i, j)] - above[(j, i)]
            if above[(i, j)] == above[(j, i)]:
                if keep_ties:
                    item.ties.append((i, j))
                continue
            better, worse = (i, j) if above[(i, j)] > above[(j, i)] else (j, i)
            item.pairs.append((better, worse))
            item.shares.append((above[(better, worse)] + ties / 2) / len(group))
        item.margins = [0.0] * len(item.pairs)
        if item.pairs or item.ties:
            items.append(item)
    return items


def pairs_to_items(pairs: list[PairRecord], keep_ties: bool = False) -> list[PreferenceItem]:
    """Group pairs by prompt so that each distinct completion is scored once."""
    by_prompt: dict[str, PreferenceItem] = {}
    index: dict[str, dict[str, int]] = defaultdict(dict)
    for p in pairs:
        if p.tie and not keep_ties:
            continue
        key = prompt_key(p.prompt)
        item = by_prompt.setdefault(key, PreferenceItem(prompt=p.prompt, completions=[]))
        ids = []
        for text in (p.chosen, p.rejected):
            if text not in index[key]:
                index[key][text] = len(item.completions)
                item.completions.append(text)
            ids.append(index[key][text])
        if p.tie:
            item.ties.append((ids[0], ids[1]))
        else:
            item.pairs.append((ids[0], ids[1]))
            item.margins.append(p.margin)
            item.shares.append(p.share)
    return list(by_prompt.values())


def load_preference_items(path: str | os.PathLike, keep_ties: bool = False) -> list[PreferenceItem]:
    """Rankings (consolidated by majority) or pairs, as items for reward-model training and evaluation."""
    if detect_format(path) == "rankings":
        return consolidate_rankings(load_rankings(path), keep_ties=keep_ties)
    return pairs_to_items(load_pairs(path), keep_ties=keep_ties)
