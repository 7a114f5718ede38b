"""Typed request and response bodies of the JSON API (the HTML forms are converted to the same models), the
strict JSON reading of request bodies, and the types that keep unstorable input out (ids beyond the columns,
text PostgreSQL or UTF-8 cannot hold)."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from fastapi import Path, Request
from fastapi.routing import APIRoute
from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator

from rlhfkit.feedback.db import HARM_FLAGS, MAX_ID, QUESTIONS, RATING_ASPECTS

# Literal[tuple] is Literal[*tuple]: the names are defined once, in db.
Question = Literal[QUESTIONS]
Aspect = Literal[RATING_ASPECTS]
Flag = Literal[HARM_FLAGS]
Id = Annotated[int, Path(ge=1, le=MAX_ID, description="a row id")]


def storable(text: str) -> str:
    """`text` if both databases can store it: PostgreSQL refuses NUL, and a lone surrogate (JSON's "\\ud800" is
    valid syntax) is no character at all, so UTF-8 cannot encode it."""
    if "\x00" in text:
        raise ValueError("holds a NUL character (\\u0000), which cannot be stored")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate (\\u{ord(text[e.start]):04x}), which is not a character") from None
    return text


Text = Annotated[str, AfterValidator(storable)]


def parse_json(body: bytes) -> Any:
    """Standard JSON only: NaN, Infinity and numbers beyond a float (1e400) are refused, as are nesting past
    Python's recursion limit and integers past its 4300 digits. Raises json.JSONDecodeError saying which."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise json.JSONDecodeError(f"not UTF-8 (byte {e.start})", "", 0) from None
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None
    except ValueError as e:  # our refusals above, and ints past sys.get_int_max_str_digits()
        raise json.JSONDecodeError(str(e).split(";")[0], text, 0) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text[:20]} is too large for a floating-point number")
    return value


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes whose JSON bodies are read by `parse_json` (FastAPI's documented way to customise the request)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict_handler(request: Request):
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


class ProjectIn(BaseModel):
    name: Text = Field(min_length=1, max_length=200)
    guidelines: Text = Field("", max_length=100_000)
    k: int = Field(4, ge=2, le=10)
    annotators_per_item: int = Field(2, ge=1, le=50)
    questions: list[Question] = Field(min_length=1)
    control_share: float = Field(0.1, ge=0, le=1, description="of the items handed to an annotator, the control items")

    @field_validator("questions")
    @classmethod
    def _questions(cls, questions: list[str]) -> list[str]:
        if "ranking" in questions and "pairwise" in questions:
            raise ValueError("ask for either a ranking or a pairwise choice, not both")
        return list(dict.fromkeys(questions))

    @model_validator(mode="after")
    def _pairwise_compares_two(self) -> ProjectIn:
        if "pairwise" in self.questions and self.k != 2:
            raise ValueError("a pairwise choice compares exactly two completions: set K to 2")
        return self


class AnnotationIn(BaseModel):
    """One answer. Lists run over the item's completions in stored order (ids are in ItemOut). The time spent is
    measured by the server, from handing the item out to the first answer."""

    ranks: list[int] | None = Field(None, description="1 = best; equal ranks are ties (ranking or pairwise)")
    ratings: list[dict[Aspect, int]] | None = Field(None, description="per completion, each aspect 1-5")
    flags: list[list[Flag]] | None = Field(None, description="per completion, the harms it shows")
    ideal_response: Text | None = Field(None, max_length=20_000)


class CompletionOut(BaseModel):
    id: int
    text: str


class ItemOut(BaseModel):
    id: int
    project_id: int
    prompt: str
    context: str | None = None  # what the model was shown beside the prompt (a grounded job's passages)
    completions: list[CompletionOut]
    questions: list[str]


class AnnotationOut(BaseModel):
    id: int
    item_id: int
    annotator: str
    status: str
    ranks: list[int] | None
    ratings: list[dict[str, int]] | None
    flags: list[list[str]] | None
    ideal_response: str | None
    seconds_spent: float
    revisions: int


class ProgressOut(BaseModel):
    submitted: int
    skipped: int
    available: int  # items this person may still annotate


class JobOut(BaseModel):
    id: int
    kind: str
    status: str
    done: int
    total: int
    message: str
