"""JSONL reading and writing. Every error names the file and the line; writes are atomic."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rlhfkit.errors import DataError, OutputError


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, record)` for each non-blank line; line numbers start at 1.

    Raises DataError naming `file:line` for text that is not UTF-8, invalid JSON or a line that is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        f = path.open("rb")  # decoded line by line, so that a bad byte is reported on its own line
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    with f:
        yield from parse_jsonl(str(path), _decoded_lines(str(path), f))


def _decoded_lines(name: str, lines: Iterable[bytes]) -> Iterator[str]:
    for lineno, raw in enumerate(lines, start=1):
        try:
            yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{name}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                            "save the file as UTF-8") from None


def parse_jsonl(name: str, lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """`read_jsonl` for lines from anywhere (an upload, say); errors name `name:line`."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{name}:{lineno}: invalid JSON (nested too deeply)") from None
        except ValueError as e:  # an integer of more digits than Python converts (4300)
            raise DataError(f"{name}:{lineno}: invalid JSON ({str(e).split(';')[0]})") from None
        if not isinstance(record, dict):
            raise DataError(f"{name}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Write records to `path`, one JSON object per line, atomically (temp file + rename)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        raise
