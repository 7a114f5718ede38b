"""Typed request and response bodies of the JSON API (the HTML forms are converted to the same models)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from rlhfkit.feedback.db import HARM_FLAGS, QUESTIONS, RATING_ASPECTS

# Literal[tuple] is Literal[*tuple]: the names are defined once, in db.
Question = Literal[QUESTIONS]
Aspect = Literal[RATING_ASPECTS]
Flag = Literal[HARM_FLAGS]


class ProjectIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    guidelines: str = Field("", max_length=100_000)
    k: int = Field(4, ge=2, le=10)
    annotators_per_item: int = Field(2, ge=1, le=50)
    questions: list[Question] = Field(min_length=1)

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
    """One answer. Lists run over the item's completions in the order shown (ids are in ItemOut)."""

    ranks: list[int] | None = Field(None, description="1 = best; equal ranks are ties (ranking or pairwise)")
    ratings: list[dict[Aspect, int]] | None = Field(None, description="per completion, each aspect 1-5")
    flags: list[list[Flag]] | None = Field(None, description="per completion, the harms it shows")
    ideal_response: str | None = Field(None, max_length=20_000)
    seconds_spent: float | None = Field(None, ge=0, le=86_400)


class CompletionOut(BaseModel):
    id: int
    text: str


class ItemOut(BaseModel):
    id: int
    project_id: int
    prompt: str
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


class ProgressOut(BaseModel):
    submitted: int
    skipped: int
    available: int  # items this person may still annotate


class JobOut(BaseModel):
    id: int
    status: str
    done: int
    total: int
    message: str
