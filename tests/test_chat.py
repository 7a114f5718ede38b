from rlhfkit.data.chat import IGNORE_INDEX, render_prompt, tokenize_conversation
from rlhfkit.data.records import Message
from rlhfkit.models import load_tokenizer


def conversation(*turns):
    roles = ["user", "assistant"]
    return [Message(role=roles[i % 2], content=t) for i, t in enumerate(turns)]


def target_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_labels_cover_exactly_the_response_and_its_end_of_turn(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    ex = tokenize_conversation(tokenizer, conversation("Where is the Lisbon office?", "On Rua Example 12."), 256)
    assert target_text(tokenizer, ex) == "On Rua Example 12.<|im_end|>\n"
    assert all(label in (t, IGNORE_INDEX) for t, label in zip(ex.input_ids, ex.labels))
    # The prompt is exactly what generation would continue from.
    prompt_ids = tokenizer(render_prompt(tokenizer, "Where is the Lisbon office?"), add_special_tokens=False)["input_ids"]
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
    assert set(ex.labels[: len(prompt_ids)]) == {IGNORE_INDEX}


def test_every_assistant_turn_is_a_target_and_no_user_turn(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    ex = tokenize_conversation(tokenizer, conversation("hi", "Hello there.", "parking?", "Level -1 of the garage."), 256)
    assert target_text(tokenizer, ex) == "Hello there.<|im_end|>\nLevel -1 of the garage.<|im_end|>\n"


def test_truncation_keeps_the_prompt_and_cuts_the_response(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    full = tokenize_conversation(tokenizer, conversation("q", "a long answer " * 20), 1000)
    cut = tokenize_conversation(tokenizer, conversation("q", "a long answer " * 20), 30)
    assert len(cut.input_ids) == 30 and cut.input_ids == full.input_ids[:30] and cut.labels == full.labels[:30]
    assert 0 < cut.num_target_tokens < full.num_target_tokens
