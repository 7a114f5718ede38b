"""Record types, JSONL reading with file:line errors, and chat formatting."""

from rlhfkit.data.jsonl import read_jsonl, write_jsonl
from rlhfkit.data.records import Message, SFTExample, load_sft_examples

__all__ = ["Message", "SFTExample", "load_sft_examples", "read_jsonl", "write_jsonl"]
