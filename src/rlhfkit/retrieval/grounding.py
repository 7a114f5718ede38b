"""Grounded prompts: the passages retrieved for a question, put in the prompt's system message.

The format (the system message; a prompt's own system text, or `system_prompt`, comes first):

    {system text, if any}

    {instruction}                       (RetrievalSettings.instruction)

    [1] {title of the best passage}
    {its text}

    [2] ...

and the question stays the user's message, as it was. Under a token budget (the prompt's `max_prompt_length`) the
passage block is cut from its end, token by token, until the rendered prompt fits: the lowest-ranked passage
shortens first, then goes; the question and the system text are never cut (where they alone exceed the budget,
the prompt has no passages and the stage's usual truncation applies).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING

from rlhfkit.data.chat import as_messages, last_user_message, render_messages
from rlhfkit.retrieval.knowledge import Passage, load_passages
from rlhfkit.retrieval.retrievers import BM25Retriever, DenseRetriever

if TYPE_CHECKING:
    from rlhfkit.config import RetrievalSettings

def format_passages(passages: list[Passage]) -> str:
    return "\n\n".join(f"[{i}] {p.title}\n{p.text}" for i, p in enumerate(passages, 1))


class Grounding:
    """Retrieve `top_k` passages for a prompt's last user message and put them in its system message."""

    def __init__(self, retriever, top_k: int, instruction: str, train_with_answer: bool = False):
        self.retriever, self.top_k, self.instruction = retriever, top_k, instruction
        self.train_with_answer = train_with_answer  # read by SFT (rlhfkit.data.chat.conversation_messages)
        self._fitted: dict[tuple, list[dict]] = {}

    @classmethod
    def from_settings(cls, settings: RetrievalSettings | None, device: str = "cpu") -> Grounding | None:
        """The grounding a config's `retrieval:` block describes (None: no grounding); built once per process."""
        if settings is None:
            return None
        return _from_settings(json.dumps(settings.model_dump(mode="json"), sort_keys=True), device)

    def passages(self, question: str) -> list[Passage]:
        return self.retriever.search(question, self.top_k)

    def messages(self, prompt: str | list, system: str | None = None, block: str | None = None) -> list[dict]:
        """The prompt as messages with the passage block (retrieved for its question unless given) in the system
        message."""
        messages = as_messages(prompt, system)
        if block is None:
            block = format_passages(self.passages(last_user_message(messages)))
        grounding = f"{self.instruction}\n\n{block}" if block else self.instruction
        if messages[0]["role"] == "system":
            return [{**messages[0], "content": f"{messages[0]['content']}\n\n{grounding}"}, *messages[1:]]
        return [{"role": "system", "content": grounding}, *messages]

    def fit(self, tokenizer, prompt: str | list, system: str | None = None, max_tokens: int | None = None,
            render=None, query: str | None = None) -> list[dict]:
        """`messages`, with the passages retrieved for `query` (by default the question) and their block cut from
        its end until `render(tokenizer, messages)` (the chat template with the generation prompt, by default: then
        the result is remembered per prompt) is at most `max_tokens` tokens."""
        if render is not None:
            return self._fit(tokenizer, prompt, system, max_tokens, render, query)
        key = (json.dumps(prompt), system, max_tokens, id(tokenizer), query)
        if key not in self._fitted:
            self._fitted[key] = self._fit(tokenizer, prompt, system, max_tokens, render_messages, query)
        return self._fitted[key]

    def _fit(self, tokenizer, prompt, system, max_tokens, render, query) -> list[dict]:
        block = format_passages(self.passages(query or last_user_message(as_messages(prompt, system))))
        block_ids = tokenizer(block, add_special_tokens=False)["input_ids"]

        def cut(n: int) -> str:  # the block's first n tokens as text
            return block if n >= len(block_ids) else tokenizer.decode(block_ids[:n], skip_special_tokens=True).rstrip()

        def fits(n: int) -> bool:
            text = render(tokenizer, self.messages(prompt, system, cut(n)))
            return max_tokens is None or len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_tokens

        if fits(len(block_ids)):
            return self.messages(prompt, system, block)
        if not fits(0):
            return as_messages(prompt, system)  # no room even for the instruction: the prompt as it was
        low, high = 0, len(block_ids)  # the longest prefix of the block that fits: binary search
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid) else (low, mid - 1)
        return self.messages(prompt, system, cut(low))


@lru_cache(maxsize=8)
def _from_settings(settings_json: str, device: str) -> Grounding:
    from rlhfkit.config import RetrievalSettings

    s = RetrievalSettings.model_validate_json(settings_json)
    passages = load_passages(s.documents, s.max_passage_words)
    retriever = BM25Retriever(passages) if s.retriever == "bm25" else DenseRetriever(passages, s.embedding_model, device)
    return Grounding(retriever, s.top_k, s.instruction, s.train_with_answer)
