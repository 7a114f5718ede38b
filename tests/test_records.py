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


def test_trl_prompt_completion_and_conversational_forms_read_as_conversations(tmp_path):
    tool_call = {"type": "function", "function": {"name": "holidays", "arguments": {"year": 2026}}}
    records = [
        {"prompt": "Where is HQ?", "completion": "Edinburgh."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is HQ?"}],
         "completion": [{"role": "assistant", "content": "Edinburgh."}]},
        {"messages": [{"role": "user", "content": "Holidays in 2026?"},
                      {"role": "assistant", "tool_calls": [tool_call]},
                      {"role": "tool", "name": "holidays", "content": "28 days"},
                      {"role": "assistant", "content": "You get 28 days."}]},
    ]
    plain, system, tools = load_sft_examples(write(tmp_path, *records))
    assert [(m.role, m.content) for m in plain.messages] == [("user", "Where is HQ?"), ("assistant", "Edinburgh.")]
    assert [m.role for m in system.messages] == ["system", "user", "assistant"]
    assert [m.role for m in tools.messages] == ["user", "assistant", "tool", "assistant"]
    # the keys beyond role and content reach the chat template as they were
    assert tools.messages[1].model_dump() == {"role": "assistant", "content": "", "tool_calls": [tool_call]}
    assert tools.messages[2].model_dump()["name"] == "holidays"


def test_an_sft_record_with_an_empty_prompt_is_named_in_a_warning(tmp_path, caplog):
    path = write(tmp_path, {"prompt": "a", "response": "b"}, {"prompt": " ", "response": "c"})
    with caplog.at_level("WARNING"):
        assert len(load_sft_examples(path)) == 2
    assert "1 SFT records have an empty prompt (first: " in caplog.text and "sft.jsonl:2" in caplog.text


def test_prompt_files_take_text_or_a_conversation(tmp_path):
    from rlhfkit.data.records import load_prompts

    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is HQ?"}]
    path = write(tmp_path, {"prompt": "Parking?", "id": "p1"}, {"prompt": conversation},
                 {"messages": conversation + [{"role": "assistant", "content": "Edinburgh."}]},
                 {"messages": [{"role": "user", "content": "Hi"}]})
    prompts = load_prompts(path)
    assert [p.prompt for p in prompts] == ["Parking?", conversation, conversation, "Hi"]
    assert prompts[0].id == "p1" and prompts[2].where.endswith("sft.jsonl:3")
    bad = write(tmp_path, {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    with pytest.raises(DataError, match=r"sft\.jsonl:1: prompt: .*must end with a user \(or tool\) turn"):
        load_prompts(bad)


def test_a_saved_dataset_directory_reads_like_a_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    from rlhfkit.data.records import load_prompts

    rows = [{"prompt": "Where is HQ?", "completion": "Edinburgh."}, {"prompt": "Parking?", "completion": "Level -1."}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "flat")
    assert [e.messages[1].content for e in load_sft_examples(tmp_path / "flat")] == ["Edinburgh.", "Level -1."]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows[1:])}).save_to_disk(tmp_path / "splits")
    assert [e.prompt for e in load_sft_examples(tmp_path / "splits")] == ["Where is HQ?"]  # train by default
    assert [p.prompt for p in load_prompts(f"{tmp_path / 'splits'}:test")] == ["Parking?"]
    with pytest.raises(DataError, match=r"has no split 'dev' \(its splits: train, test\)"):
        load_prompts(f"{tmp_path / 'splits'}:dev")
    datasets.Dataset.from_list([{"prompt": "a"}]).save_to_disk(tmp_path / "broken")
    with pytest.raises(DataError, match=r"broken row 0: missing field 'response'"):
        load_sft_examples(tmp_path / "broken")
    (tmp_path / "plain-dir").mkdir()
    with pytest.raises(DataError, match="not a dataset saved with `datasets`"):
        load_sft_examples(tmp_path / "plain-dir")


def test_a_hub_dataset_id_is_loaded_through_datasets_with_its_split(tmp_path, monkeypatch):
    """No hub here: datasets.load_dataset stands in, and the test checks what rlhfkit asks of it."""
    datasets = pytest.importorskip("datasets")
    from rlhfkit.data.records import load_prompts

    asked = []

    def load_dataset(name, split=None):
        asked.append((name, split))
        rows = datasets.Dataset.from_list([{"prompt": f"{name} {split}"}])
        return rows if split else datasets.DatasetDict({"test": rows, "train": rows})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert [p.prompt for p in load_prompts("org/prompts")] == ["org/prompts None"]  # the train split of the dict
    assert [p.prompt for p in load_prompts("org/prompts:test[:10]")] == ["org/prompts test[:10]"]
    assert asked == [("org/prompts", None), ("org/prompts", "test[:10]")]
    with pytest.raises(DataError, match="no such file"):
        load_prompts(tmp_path / "typo.jsonl")  # a missing file is never sent to the hub
    assert len(asked) == 2
