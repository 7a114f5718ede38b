"""Chat formatting: render conversations with the tokenizer's chat template and mark which tokens to learn.

The loss is taken only on assistant tokens (the response and its end-of-turn token). We find them by
rendering the conversation up to each assistant turn with the generation prompt, and up to the end of that
turn; the characters in between are the assistant's. Character offsets from the fast tokenizer map them
onto tokens (a token that overlaps an assistant span is a target), so this works for any template whose renderings extend one another, which covers the
common ones (ChatML, Llama, Mistral, Gemma).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from rlhfkit.data.records import Message

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips

# ChatML: used for tokenizers that ship without a chat template (base models).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken

    @property
    def num_target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def as_messages(prompt: str | list, system: str | None = None) -> list[dict]:
    """A prompt (a user message's text, or a conversation so far as Message objects or dicts) as message dicts,
    with `system` in front unless the conversation has its own system turn."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [m if isinstance(m, dict) else m.model_dump() for m in prompt]
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def prompt_text(prompt: str | list) -> str:
    """A prompt as plain text: its own text, or a conversation's turns as `role: content` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in as_messages(prompt))


def render_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    """Messages in the chat template, with the generation prompt (the text a model continues)."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def prompt_messages(tokenizer: PreTrainedTokenizerBase, prompt: str | list, system: str | None = None,
                    grounding=None, max_length: int | None = None) -> list[dict]:
    """A prompt as the messages a model sees: with `system` in front and, with a `grounding`
    (rlhfkit.retrieval.Grounding), the passages retrieved for its question in the system message, cut so that the
    rendered prompt has at most `max_length` tokens. Every stage renders prompts through here."""
    if grounding is None:
        return as_messages(prompt, system)
    return grounding.fit(tokenizer, prompt, system, max_length)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list, system: str | None = None,
                  grounding=None, max_length: int | None = None) -> str:
    """The text a model continues to answer `prompt` (a user message or a conversation so far); see
    `prompt_messages` for `grounding` and `max_length`."""
    return render_messages(tokenizer, prompt_messages(tokenizer, prompt, system, grounding, max_length))


def answered_messages(tokenizer: PreTrainedTokenizerBase, prompt: str | list, answer: dict, system: str | None = None,
                      grounding=None, max_length: int | None = None, with_answer: bool = False) -> list[dict]:
    """A prompt and its answer turn as the model sees them (SFT examples, reward-model inputs): `system` in front
    (unless the prompt has its own system turn) and, with a `grounding`, the passages retrieved for its question (and
    the answer, `with_answer`) in the system message, cut so that the whole conversation renders within `max_length`
    tokens (the answer stays whole)."""
    if grounding is None:
        return [*as_messages(prompt, system), answer]
    query = f"{last_user_message(as_messages(prompt, system))}\n{answer['content']}" if with_answer else None
    fitted = grounding.fit(tokenizer, prompt, system, max_length,
                           render=lambda tok, m: _render(tok, [*m, answer], add_generation_prompt=False), query=query)
    return [*fitted, answer]


def conversation_messages(tokenizer: PreTrainedTokenizerBase, messages: list[Message], system: str | None = None,
                          grounding=None, max_length: int | None = None, training: bool = False) -> list[Message]:
    """A conversation (ending with the assistant turn learnt) as the model sees it: `answered_messages`; a
    `training` example's passages are retrieved with its answer where the grounding says `train_with_answer`."""
    *prompt, answer = [m.model_dump() for m in messages]
    with_answer = training and grounding is not None and grounding.train_with_answer
    return [Message.model_validate(m)
            for m in answered_messages(tokenizer, prompt, answer, system, grounding, max_length, with_answer)]


def last_user_message(messages: list[dict]) -> str:
    """The question a conversation asks last (what retrieval searches for)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_length: int
) -> TokenizedExample:
    """Token ids of the whole conversation, with labels only on assistant turns; truncated on the right."""
    dicts = [m.model_dump() for m in messages]
    text = _render(tokenizer, dicts, add_generation_prompt=False)
    spans = []  # (start, end) character spans of assistant turns in `text`
    for i, m in enumerate(dicts):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, dicts[:i], add_generation_prompt=True)
        through = _render(tokenizer, dicts[: i + 1], add_generation_prompt=False)
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            raise ValueError(
                "the tokenizer's chat template does not render conversations as prefixes of one another, "
                "so assistant turns cannot be located; set a simpler chat_template in the config"
            )
        spans.append((len(before), len(through)))

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = enc["input_ids"][:max_length]
    labels = []
    for token_id, (start, end) in zip(input_ids, enc["offset_mapping"]):
        inside = any(start < e and end > s for s, e in spans)  # overlaps an assistant span
        labels.append(token_id if inside else IGNORE_INDEX)
    return TokenizedExample(input_ids=input_ids, labels=labels)
