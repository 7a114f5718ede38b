"""Where records come from: a JSONL file, a local `datasets` directory, or a Hugging Face hub dataset.

Wherever a data file is accepted, the source may be
  - a JSONL file (one JSON object a line);
  - a directory written by `datasets.Dataset.save_to_disk` or `DatasetDict.save_to_disk`;
  - a dataset id on the Hugging Face hub (`trl-lib/ultrafeedback_binarized`), where there is internet.
The last two need the `datasets` package (`pip install 'rlhfkit[hub]'`). A split is chosen with `SOURCE:SPLIT`
(a split name such as `test`; for a hub dataset also a slice such as `train[:1000]`); without one, a dataset with several splits
gives its `train` split. Every record comes with where it was read (`file:line` or `source[split] row N`), so that
errors point at it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhfkit.data.jsonl import read_jsonl
from rlhfkit.errors import ConfigError, DataError

HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
SPLIT_SUFFIX = re.compile(r"^(.+?):([\w.-]+(?:\[[^\]]*\])?)$")
DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


def read_records(source: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `(where, record)` for every record of `source` (see the module docstring)."""
    name, split = split_source(str(source))
    path = Path(name).expanduser()
    if path.is_file():
        if split is not None:
            raise DataError(f"{source}: a JSONL file has no splits")
        for lineno, record in read_jsonl(path):
            yield f"{path}:{lineno}", record
    elif path.is_dir():
        if not any((path / marker).is_file() for marker in DATASET_MARKERS):
            raise DataError(f"{path} is a directory but not a dataset saved with `datasets` (no dataset_info.json "
                            "or dataset_dict.json in it); give a JSONL file or a saved dataset")
        yield from _rows(f"{path}", _load_from_disk(path, split))
    elif HUB_ID.match(name) and not name.endswith((".jsonl", ".json")):
        yield from _rows(name, _load_from_hub(name, split))
    else:
        raise DataError(f"{source}: no such file")


def split_source(source: str) -> tuple[str, str | None]:
    """`NAME:SPLIT` -> (NAME, SPLIT), SPLIT a name with an optional slice (`test`, `train[:100]`); a name that
    exists as a path is never split (it may hold a colon)."""
    match = SPLIT_SUFFIX.match(source)
    if Path(source).expanduser().exists() or match is None:
        return source, None
    return match.group(1), match.group(2)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError("reading a Hugging Face dataset needs the `datasets` package: pip install 'rlhfkit[hub]'") from None
    return datasets


def _pick_split(name: str, splits: dict, split: str | None):
    """The asked split of a DatasetDict, else `train`, else its only split."""
    if split is None:
        split = "train" if "train" in splits or len(splits) != 1 else next(iter(splits))
    if split not in splits:
        raise DataError(f"{name} has no split {split!r} (its splits: {', '.join(splits)}); choose one with {name}:SPLIT")
    return splits[split]


def _load_from_disk(path: Path, split: str | None):
    datasets = _datasets()
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(str(path), loaded, split)
    if split is not None:
        raise DataError(f"{path} holds a single dataset, not splits; drop :{split}")
    return loaded


def _load_from_hub(name: str, split: str | None):
    datasets = _datasets()
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (offline, not found, no access); all mean "cannot load it"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{name}: no such file, and it did not load as a Hugging Face dataset ({first})") from None
    return _pick_split(name, loaded, None) if isinstance(loaded, datasets.DatasetDict) else loaded


def _rows(name: str, rows) -> Iterator[tuple[str, dict[str, Any]]]:
    label = f"{name}[{rows.split}]" if getattr(rows, "split", None) else name
    for i, row in enumerate(rows):
        yield f"{label} row {i}", dict(row)
