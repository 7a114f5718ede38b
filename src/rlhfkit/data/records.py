"""Typed records for the data formats (ours and TRL's), and loaders that report `file:line: field: problem`.

SFT examples, prompts and preference pairs are read in rlhfkit's formats and in TRL's dataset formats beside them
(https://huggingface.co/docs/trl/dataset_formats): prompt/completion, conversational `messages`, conversational
prompt/completion, and preference pairs with an explicit or implicit prompt.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, PrivateAttr, ValidationError, field_validator, model_validator

from rlhfkit.data.sources import read_records
from rlhfkit.errors import DataError

logger = logging.getLogger(__name__)


class Message(BaseModel):
    """One chat turn. Keys beyond role and content (`tool_calls`, `name`, `tool_call_id`) go to the chat template
    as they are; an assistant turn that only calls tools may leave out its content."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: str

    @model_validator(mode="before")
    @classmethod
    def _tool_call_without_content(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tool_calls") and data.get("content") is None:
            data = {**data, "content": ""}
        return data


def _as_prompt(value: Any) -> Any:
    """A prompt as text, or a conversation so far (messages ending with a user or tool turn); a conversation of
    one user message is its text. Conversations are kept as plain dicts, ready for a chat template or JSON."""
    if not isinstance(value, list):
        return value
    messages = [Message.model_validate(m).model_dump() for m in value]
    if not messages:
        raise ValueError("the conversation is empty")
    if messages[-1]["role"] not in ("user", "tool"):
        raise ValueError(f"a prompt conversation must end with a user (or tool) turn, not {messages[-1]['role']}")
    if len(messages) == 1:
        return messages[0]["content"]
    return messages


Prompt = Annotated[str | list[dict[str, Any]], BeforeValidator(_as_prompt)]


class Record(BaseModel):
    """A record that knows where it was read (`file:line`), for errors raised after loading."""

    model_config = ConfigDict(extra="ignore")
    _where: str = PrivateAttr("")

    @property
    def where(self) -> str:
        return self._where


SFT_FORMATS = ('{"prompt": str, "response": str}, {"prompt": str, "completion": str}, '
               '{"messages": [{"role", "content"}, ...]} or {"prompt": [messages], "completion": [messages]}')


class SFTExample(Record):
    """One supervised example, held as a list of messages; the loss is taken on the assistant turns only.

    Read from `{"prompt", "response"}` (ours), `{"prompt", "completion"}` (TRL's prompt-completion), `{"messages"}`
    (chat; system and tool turns included) or `{"prompt": [messages], "completion": [messages]}` (TRL's
    conversational prompt-completion).
    """

    messages: list[Message]
    id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _to_messages(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "messages" in data:
            return data
        answer_key = "completion" if "completion" in data else "response"
        if "prompt" not in data:
            raise ValueError(f"missing field 'prompt': an SFT record is one of {SFT_FORMATS}")
        if answer_key not in data:
            raise ValueError(f"missing field 'response' (or 'completion'): an SFT record is one of {SFT_FORMATS}")
        prompt, answer = data["prompt"], data[answer_key]
        if isinstance(prompt, list) and isinstance(answer, list):
            messages = prompt + answer
        elif isinstance(prompt, str) and isinstance(answer, str):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        else:
            for key, value in (("prompt", prompt), (answer_key, answer)):
                if not isinstance(value, (str, list)):
                    raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
            raise ValueError(f"'prompt' and {answer_key!r} must both be strings or both be lists of messages")
        return {"id": data.get("id"), "messages": messages}

    @field_validator("messages")
    @classmethod
    def _has_assistant_turn(cls, messages: list[Message]) -> list[Message]:
        if not any(m.role == "assistant" for m in messages):
            raise ValueError("needs at least one assistant message to learn from")
        if messages[-1].role != "assistant":
            raise ValueError("the last message must be the assistant's")
        for m in messages:
            if m.role == "assistant" and not m.content.strip() and not getattr(m, "tool_calls", None):
                raise ValueError("an assistant message is empty")
        return messages

    @property
    def prompt(self) -> str:
        """The last user message: what the example asks."""
        return next((m.content for m in reversed(self.messages) if m.role == "user"), "")

    @property
    def has_empty_prompt(self) -> bool:
        return not any(m.content.strip() for m in self.messages if m.role == "user")


def _describe(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def load_records(source: str | os.PathLike, model: type[BaseModel]) -> list[Any]:
    """Read a JSONL file (or a dataset, see `rlhfkit.data.sources`) into `model` records; a bad record raises
    DataError naming where it is (`file:line`)."""
    records = []
    for where, raw in read_records(source):
        try:
            record = model.model_validate(raw)
        except ValidationError as e:
            raise DataError(f"{where}: {_describe(e)}") from None
        if isinstance(record, Record):
            record._where = where
        records.append(record)
    if not records:
        raise DataError(f"{source}: the file holds no records")
    return records


def load_sft_examples(source: str | os.PathLike) -> list[SFTExample]:
    """SFT examples; a warning names the records whose prompt is empty (they train, on an answer to nothing)."""
    examples = load_records(source, SFTExample)
    empty = [ex.where for ex in examples if ex.has_empty_prompt]
    if empty:
        logger.warning("%d SFT records have an empty prompt (first: %s); they teach answers to nothing",
                       len(empty), empty[0])
    return examples


class PromptRecord(Record):
    """`{"prompt": str, "id"?: str}`; other keys are ignored, so SFT and evaluation files serve as prompt files."""

    prompt: str
    id: str | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        return prompt


class ChatPromptRecord(PromptRecord):
    """A prompt as text or as a conversation so far: `{"prompt": str}`, TRL's conversational `{"prompt": [messages]}`,
    or `{"messages": [...]}` (a chat SFT file serves too: its trailing assistant turns are left out)."""

    prompt: Prompt

    @model_validator(mode="before")
    @classmethod
    def _messages_to_prompt(cls, data: Any) -> Any:
        if isinstance(data, dict) and "prompt" not in data and isinstance(data.get("messages"), list):
            messages = list(data["messages"])
            while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
                messages.pop()
            data = {**data, "prompt": messages}
        return data

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str | list) -> str | list:
        if isinstance(prompt, str) and not prompt.strip():
            raise ValueError("the prompt is empty")
        return prompt


def load_prompts(source: str | os.PathLike) -> list[ChatPromptRecord]:
    """Prompts for sampling; each `.prompt` is a string or a conversation (a list of message dicts)."""
    return load_records(source, ChatPromptRecord)


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
