import json

import pytest

from rlhfkit.data.jsonl import read_jsonl, write_jsonl
from rlhfkit.errors import DataError


def test_read_skips_blank_lines_and_numbers_lines_from_one(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (3, {"a": 2})]


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        list(read_jsonl(path))


def test_non_object_line_is_rejected(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        list(read_jsonl(path))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        list(read_jsonl(tmp_path / "nope.jsonl"))


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old content\n")

    def failing():
        yield {"x": 1}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(path, failing())
    assert path.read_text() == "old content\n"  # the old file is whole
    write_jsonl(path, [{"x": "é"}, {"y": [1]}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"x": "é"}, {"y": [1]}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_text_that_is_not_utf8_is_a_data_error_on_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "a"}\n{"prompt": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        list(read_jsonl(path))


def test_an_unwritable_output_is_an_output_error(tmp_path):
    from rlhfkit.errors import OutputError

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputError, match="cannot write .*a-file/out.jsonl"):
        write_jsonl(tmp_path / "a-file" / "out.jsonl", [{"a": 1}])
