"""Typed records for the JSONL formats in DESIGN.md, and loaders that report `file:line: field: problem`."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from rlhfkit.data.jsonl import read_jsonl
from rlhfkit.errors import DataError


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class SFTExample(BaseModel):
    """One supervised example: `{"prompt", "response"}` or `{"messages": [...]}` (chat format).

    Either way it is held as a list of messages; the loss is taken on the assistant turns only.
    """

    model_config = ConfigDict(extra="ignore")

    messages: list[Message]
    id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _prompt_response_to_messages(cls, data: Any) -> Any:
        if isinstance(data, dict) and "messages" not in data:
            missing = [k for k in ("prompt", "response") if k not in data]
            if missing:
                raise ValueError(
                    f"missing field {missing[0]!r}: an SFT record is either "
                    '{"prompt": str, "response": str} or {"messages": [{"role", "content"}, ...]}'
                )
            for key in ("prompt", "response"):
                if not isinstance(data[key], str):
                    raise ValueError(f"field {key!r} must be a string, got {type(data[key]).__name__}")
            data = {
                "id": data.get("id"),
                "messages": [
                    {"role": "user", "content": data["prompt"]},
                    {"role": "assistant", "content": data["response"]},
                ],
            }
        return data

    @field_validator("messages")
    @classmethod
    def _has_assistant_turn(cls, messages: list[Message]) -> list[Message]:
        if not any(m.role == "assistant" for m in messages):
            raise ValueError("needs at least one assistant message to learn from")
        if messages[-1].role != "assistant":
            raise ValueError("the last message must be the assistant's")
        for m in messages:
            if m.role == "assistant" and not m.content.strip():
                raise ValueError("an assistant message is empty")
        return messages

    @property
    def prompt(self) -> str:
        """The last user message: what the example asks."""
        return next(m.content for m in reversed(self.messages) if m.role == "user")


def _describe(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def load_records(path: str | os.PathLike, model: type[BaseModel]) -> list[Any]:
    """Read a JSONL file into `model` records; any bad line raises DataError with `file:line`."""
    records = []
    for lineno, raw in read_jsonl(path):
        try:
            records.append(model.model_validate(raw))
        except ValidationError as e:
            raise DataError(f"{path}:{lineno}: {_describe(e)}") from None
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records


def load_sft_examples(path: str | os.PathLike) -> list[SFTExample]:
    return load_records(path, SFTExample)


class PromptRecord(BaseModel):
    """`{"prompt": str, "id"?: str}`; other keys are ignored, so SFT and evaluation files serve as prompt files."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    id: str | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        return prompt


def load_prompts(path: str | os.PathLike) -> list[PromptRecord]:
    return load_records(path, PromptRecord)


class TruthRecord(PromptRecord):
    """An evaluation prompt with its truth: `{"prompt", "id"?, "response"?, "facts"?, "answerable"?, "wrong"?}`.

    - `response`: the ideal answer (reference-based metrics compare answers with it);
    - `facts`: short strings a correct answer states (a fact may give alternatives separated by `|`);
    - `answerable`: false when the knowledge source does not hold the answer: then a correct answer says so
      (and its facts name whom to ask instead);
    - `wrong`: statements the knowledge source contradicts for this question (e.g. another office's hours).

    It is also a prompt record and, with `response`, an SFT record: the same file serves every stage.
    """

    response: str | None = None
    facts: list[str] | None = None
    answerable: bool = True
    wrong: list[str] | None = None

    @field_validator("facts", "wrong")
    @classmethod
    def _non_empty_strings(cls, values: list[str] | None) -> list[str] | None:
        if values is not None:
            if not values:
                raise ValueError("an empty list: leave the key out instead")
            for i, value in enumerate(values):
                if not all(alternative.strip() for alternative in value.split("|")):
                    raise ValueError(f"item {i} ({value!r}) is empty or has an empty alternative")
        return values


def load_truth_records(path: str | os.PathLike) -> list[TruthRecord]:
    return load_records(path, TruthRecord)
