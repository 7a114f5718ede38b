import json

import pytest

from rlhfkit.data.records import load_sft_examples
from rlhfkit.errors import DataError


def write(tmp_path, *records):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_response_becomes_a_two_turn_conversation(tmp_path):
    [ex] = load_sft_examples(write(tmp_path, {"prompt": "Where is HQ?", "response": "Edinburgh.", "id": "x1"}))
    assert [(m.role, m.content) for m in ex.messages] == [("user", "Where is HQ?"), ("assistant", "Edinburgh.")]
    assert ex.id == "x1" and ex.prompt == "Where is HQ?"


def test_chat_format_is_read_as_is(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    [ex] = load_sft_examples(write(tmp_path, {"messages": messages}))
    assert [m.model_dump() for m in ex.messages] == messages
    assert ex.prompt == "c"


def test_missing_field_names_the_field_and_line(tmp_path):
    path = write(tmp_path, {"prompt": "a", "response": "b"}, {"prompt": "only a prompt"})
    with pytest.raises(DataError, match=r"sft\.jsonl:2: missing field 'response'"):
        load_sft_examples(path)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "a", "response": 3}, "field 'response' must be a string"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, r"messages\.1\.role"),
        ({"messages": [{"role": "user", "content": "a"}]}, "needs at least one assistant message"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "last message"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}, "is empty"),
    ],
)
def test_bad_records_say_what_is_wrong(tmp_path, record, message):
    with pytest.raises(DataError, match=r"sft\.jsonl:1: .*" + message):
        load_sft_examples(write(tmp_path, record))


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        load_sft_examples(path)


def test_bundled_company_data_is_valid_and_split_without_overlap():
    from conftest import COMPANY_TEST, COMPANY_TRAIN

    train, test = load_sft_examples(COMPANY_TRAIN), load_sft_examples(COMPANY_TEST)
    assert len(train) + len(test) >= 300 and len(test) >= 50
    assert not {e.prompt.lower() for e in train} & {e.prompt.lower() for e in test}
