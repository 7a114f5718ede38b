"""Fact checking of answers: does an answer state the facts a correct answer must state, and does it state
something the knowledge source contradicts?

Both sides (answer and fact) are normalised the same way and compared as token sequences:

 1. Unicode compatibility form, accents removed, lower case; typographic dashes and quotes become ASCII.
 2. Phone numbers (a run of digits, spaces, dots, hyphens and brackets holding at least 8 digits, with an
    optional leading +) become their digits: "+44 131 555 0199" and "+441315550199" match.
 3. Number words become digits: "zero" to "ninety-nine" ("twenty-five", "twenty five"), ordinals "first" to
    "thirty-first" ("first" -> 1); ordinal suffixes on digits go ("31st" -> 31); thousands separators go
    ("1,200" -> 1200).
 4. Units: "per cent" and "percent" -> "%"; "N pounds" -> "£N", "N euros" -> "€N", "Np" and "N pence" -> "£0.NN";
    "extension" -> "ext"; "e-mail" -> "email".
 5. Times: "7am", "7 a.m." -> "7:00"; "7pm" -> "19:00"; "07:30" -> "7:30"; "noon", "midday" -> "12:00".
 6. Dates: "March 31" -> "31 march".
 7. Tokens are runs of letters and digits, keeping ".", ":", "@" and "'" between two of them (0.36, 7:30,
    it-help@marrowbyfinch.example, don't), a leading £, € or + and a trailing %; everything else separates.
    A possessive "'s" goes ("St Anthony's" -> st anthony, "next month's" -> next month).

A fact is stated when one of its alternatives (separated by "|") appears in the answer as a contiguous run of
whole tokens: "5 days" matches "five days" and "5 Days!", but "5" does not match "15" or "25".

An answer to a question the knowledge source cannot answer (`answerable: false`) must also say that it does
not know (ABSTENTION: "I don't know", "I'm not sure", "I have no information about", ...).

An answer contradicts the knowledge source (`contradiction`) when it
  - states a number with the words of one of its facts but a different value, and states no alternative of
    that fact: fact "27 days", answer "... 30 days ..." (numbers that the prompt itself contains, statements
    that the fact sheet makes itself, and the question's other facts do not count);
  - gives contact details (an e-mail address at the sheet's domains, a phone number, an extension) that the
    fact sheet does not contain, when a fact sheet is given: made-up contacts are wrong contacts;
  - states one of the record's `wrong` statements (written by hand: another office's address, the wrong
    country's holidays, ...).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.data.records import TruthRecord, load_truth_records
from rlhfkit.errors import DataError

_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_ORDINAL_UNITS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
                  "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
                  "eighteenth", "nineteenth"]
FACT_SHEET_NAME = "FACTS.md"  # the fact sheet of a truth directory
_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
           "november", "december"]


def _number_words() -> dict[str, int]:
    words = {w: i for i, w in enumerate(_UNITS)}
    words |= {w: i + 1 for i, w in enumerate(_ORDINAL_UNITS)}
    words |= {"twentieth": 20, "thirtieth": 30}
    for tens, value in _TENS.items():
        words[tens] = value
        for unit in range(1, 10):
            words[f"{tens} {_UNITS[unit]}"] = value + unit
            if value <= 30:
                words[f"{tens} {_ORDINAL_UNITS[unit - 1]}"] = value + unit
    return words


NUMBER_WORDS = _number_words()
# longest first, so that "twenty five" is read before "twenty" and "five"
_NUMBER_WORD = re.compile(r"\b(" + "|".join(sorted((w.replace(" ", "[ -]") for w in NUMBER_WORDS), key=len, reverse=True))
                          + r")\b")
_PHONE = re.compile(r"\+?\(?\d[\d\s().-]{6,}\d")
_TOKEN = re.compile(r"[£€+]?[^\W_]+(?:[.:@'][^\W_]+)*%?")
_NUMBER_TOKEN = re.compile(r"^([£€+]?)(\d+(?:[.:]\d+)?)(%?)$")
_EMAIL = re.compile(r"[^\W_][\w.+-]*@[^\W_][\w-]*(?:\.[^\W_][\w-]*)+")
_EXTENSION = re.compile(r"\bext\s+(\d{3,5})\b")

ABSTENTION = [re.compile(p) for p in (
    r"\b(i|we) (don't|do not|can't|cannot|couldn't|could not) (know|say|tell|find|see|confirm)\b",
    r"\b(i'm|i am|we're|we are) not (sure|certain|aware)\b",
    r"\b(i|we) (don't|do not) have (the|any|that|this|a|an|information|details|data)\b",
    r"\b(i|we) have no (information|details|data|record)\b",
    r"\bno information\b",
    r"\bnot something i (know|have)\b",
    r"\b(isn't|is not|aren't|are not) in (my|the) (information|knowledge|fact sheet|sources)\b",
)]


def _fold(text: str) -> str:
    """Compatibility form, no accents, lower case, ASCII dashes and quotes."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    return re.sub(r"[\u2010-\u2015\u2212]", "-", re.sub(r"[\u2018\u2019\u02bc`]", "'", re.sub(r"[\u201c\u201d]", '"', text)))


def _phone(match: re.Match) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    if len(digits) < 8:
        return match.group(0)
    return (" +" if match.group(0).startswith("+") else " ") + digits + " "


def _time(match: re.Match) -> str:
    hour, minute, half = int(match.group(1)), match.group(2) or "00", match.group(3)[0]
    hour = hour % 12 + (12 if half == "p" else 0)
    return f"{hour}:{minute}"


def normalise_text(text: str) -> str:
    """The text after rules 1-6 of the module docstring (a string; `tokens` splits it)."""
    text = _fold(text)
    text = _PHONE.sub(_phone, text)
    text = _NUMBER_WORD.sub(lambda m: str(NUMBER_WORDS[re.sub(r"[ -]", " ", m.group(1))]), text)
    text = re.sub(r"\b(\d+)(?:st|nd|rd|th)\b", r"\1", text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = re.sub(r"\s*\b(?:per ?cent)\b", "%", text)
    text = re.sub(r"(\d)\s+%", r"\1%", text)
    text = re.sub(r"\b(\d+(?:\.\d+)?)\s*(?:pounds|gbp)\b", r"£\1", text)
    text = re.sub(r"\b(\d+(?:\.\d+)?)\s*(?:euros?|eur)\b", r"€\1", text)
    text = re.sub(r"([£€])\s+(?=\d)", r"\1", text)
    text = re.sub(r"\bextension\b", "ext", text)
    text = re.sub(r"\be-mail", "email", text)
    text = re.sub(r"\b(\d{1,2})(?:[:.](\d{2}))?\s*([ap])\.?m\b\.?", _time, text)
    text = re.sub(r"\b(?:noon|midday)\b", "12:00", text)
    text = re.sub(r"\b(\d{1,2})\s*(?:p|pence)\b", lambda m: f"£0.{int(m.group(1)):02d}", text)
    text = re.sub(r"\b(\d{1,2}) o'clock\b", r"\1:00", text)
    text = re.sub(r"\b0(\d):(\d\d)\b", r"\1:\2", text)
    text = re.sub(r"\b(" + "|".join(_MONTHS) + r")\s+(\d{1,2})\b", r"\2 \1", text)
    return text


def tokens(text: str) -> list[str]:
    """The normalised tokens of `text` (rule 7)."""
    return [t.removesuffix("'s") for t in _TOKEN.findall(normalise_text(text))]


def contains(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    needle, n = tuple(needle), len(needle)
    return n > 0 and any(tuple(haystack[i:i + n]) == needle for i in range(len(haystack) - n + 1))


def alternatives(fact: str) -> list[list[str]]:
    """The token sequences of a fact's alternatives ("a | b")."""
    return [tokens(part) for part in fact.split("|") if tokens(part)]


def states(answer_tokens: Sequence[str], fact: str) -> bool:
    """Whether the answer (its tokens) states one of the fact's alternatives."""
    return any(contains(answer_tokens, alt) for alt in alternatives(fact))


def abstains(answer: str) -> bool:
    """Whether the answer says that it does not know (ABSTENTION)."""
    text = normalise_text(answer)
    return any(p.search(text) for p in ABSTENTION)


def number_shape(token: str) -> tuple[str, str, bool] | None:
    """A number token's kind: (leading £/€/+, trailing %, whether it is a time); None for a word."""
    match = _NUMBER_TOKEN.match(token)
    return None if match is None else (match.group(1), match.group(3), ":" in match.group(2))


def number_value(token: str) -> str:
    """The digits of a number token ("£54" -> "54", "6%" -> "6", "7:30" -> "7:30")."""
    return _NUMBER_TOKEN.match(token).group(2)


def _different_number(answer_tokens: Sequence[str], fact_tokens: Sequence[str], prompt_tokens: set[str],
                      sheet: FactSheet | None, facts: set[tuple[str, ...]] = frozenset()) -> bool:
    """Whether the answer holds the fact's token pattern with a number in it changed: to one the prompt does not
    contain, in a statement the fact sheet does not make itself ("25 days" is no contradiction of "27 days" when
    the sheet says "25 days" of something else) nor another of the question's `facts` states (an answer that gives
    "27 days" does not contradict the same question's "2 days").

    Only facts with a number and a word apply: "27 days" yes, "£54" or "10:00" alone no (an answer may name other
    amounts and times for good reasons)."""
    shapes = [_NUMBER_TOKEN.match(t) for t in fact_tokens]
    if not any(shapes) or all(shapes):
        return False
    n = len(fact_tokens)
    for i in range(len(answer_tokens) - n + 1):
        window = answer_tokens[i:i + n]
        changed = False
        for want, got, shape in zip(fact_tokens, window, shapes):
            if shape is None:
                if want != got:
                    break
                continue
            other = _NUMBER_TOKEN.match(got)
            if other is None or (other.group(1), other.group(3), ":" in other.group(2)) != \
                    (shape.group(1), shape.group(3), ":" in shape.group(2)):
                break
            changed |= got != want and got not in prompt_tokens
        else:
            if changed and tuple(window) not in facts and (sheet is None or not contains(sheet.tokens, window)):
                return True
    return False


@dataclass(frozen=True)
class FactSheet:
    """The knowledge source as text: its tokens, and the contact details it contains (e-mail addresses, phone
    numbers as digits, extensions)."""

    tokens: tuple[str, ...]
    emails: frozenset[str]
    domains: frozenset[str]
    phones: frozenset[str]
    extensions: frozenset[str]

    @classmethod
    def from_text(cls, text: str) -> FactSheet:
        emails, phones, extensions = _contacts(text)
        return cls(tuple(tokens(text)), frozenset(emails), frozenset(e.split("@", 1)[1] for e in emails),
                   frozenset(phones), frozenset(extensions))

    def unknown_contacts(self, answer: str) -> list[str]:
        """Contact details in `answer` that the sheet does not contain (e-mail only at the sheet's domains)."""
        emails, phones, extensions = _contacts(answer)
        return ([e for e in emails if e.split("@", 1)[1] in self.domains and e not in self.emails]
                + [p for p in phones if p not in self.phones]
                + [f"ext {x}" for x in extensions if x not in self.extensions])


def _contacts(text: str) -> tuple[list[str], list[str], list[str]]:
    folded = _fold(text)
    emails = _EMAIL.findall(folded)
    phones = [p for p in (re.sub(r"\D", "", m.group(0)) for m in _PHONE.finditer(folded)) if len(p) >= 8]
    extensions = _EXTENSION.findall(normalise_text(text))
    return emails, phones, extensions


@dataclass(frozen=True)
class FactCheck:
    """One answer against one question's facts."""

    stated: tuple[bool, ...]  # per fact
    abstained: bool | None  # None: the question is answerable, so abstaining is not asked for
    contradictions: tuple[str, ...]  # what the answer states that the knowledge source contradicts

    @property
    def recall(self) -> float:
        """Share of the required items stated: the facts, plus saying "I don't know" when it cannot be known."""
        hits = list(self.stated) + ([self.abstained] if self.abstained is not None else [])
        return sum(hits) / len(hits) if hits else 0.0

    @property
    def contradicted(self) -> bool:
        return bool(self.contradictions)


def has_fact_check(truth: TruthRecord) -> bool:
    """Whether an answer to this record's question can be checked: it has facts, or is unanswerable, or has wrong
    statements."""
    return truth.facts is not None or not truth.answerable or truth.wrong is not None


def check_facts(answer: str, facts: Iterable[str], prompt: str = "", answerable: bool = True,
                wrong: Iterable[str] = (), sheet: FactSheet | None = None) -> FactCheck:
    """Check one answer (see the module docstring for the rules)."""
    facts = list(facts)
    answer_tokens = tokens(answer)
    prompt_tokens = set(tokens(prompt))
    stated = tuple(states(answer_tokens, f) for f in facts)
    every_alternative = {tuple(alt) for f in facts for alt in alternatives(f)}
    found = []
    for fact, ok in zip(facts, stated):
        if not ok and any(_different_number(answer_tokens, alt, prompt_tokens, sheet, every_alternative)
                          for alt in alternatives(fact)):
            found.append(f"a different number than {fact!r}")
    found += [f"{w!r}" for w in wrong if states(answer_tokens, w)]
    if sheet is not None:
        found += [f"unknown contact {c}" for c in sheet.unknown_contacts(answer)]
    return FactCheck(stated, None if answerable else abstains(answer), tuple(found))


def load_truth(path: str | Path) -> tuple[dict[str, TruthRecord], FactSheet | None]:
    """Truth records by prompt from a JSONL file or a directory of them, and the fact sheet (FACTS.md) in the
    directory, or beside the file, if there is one."""
    path = Path(path)
    if path.is_dir():
        files, sheet_file = sorted(path.glob("*.jsonl")), path / FACT_SHEET_NAME
        if not files:
            raise DataError(f"{path} holds no *.jsonl files of prompts with their truth")
    elif path.is_file():
        files, sheet_file = [path], path.parent / FACT_SHEET_NAME
    else:
        raise DataError(f"truth file {path} not found (a JSONL file, or a directory of them)")
    by_prompt: dict[str, TruthRecord] = {}
    for f in files:
        for record in load_truth_records(f):
            if by_prompt.setdefault(record.prompt, record) != record:
                raise DataError(f"{f}: the prompt {record.prompt[:60]!r} appears twice in {path} with different truth")
    sheet = FactSheet.from_text(sheet_file.read_text(encoding="utf-8")) if sheet_file and sheet_file.is_file() else None
    return by_prompt, sheet
