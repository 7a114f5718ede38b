"""A knowledge base: documents (Markdown or plain text) cut into passages a retriever returns and a prompt holds.

A Markdown document is cut at its headings: each section's text is one passage, titled by the path of headings
above it ("2. Offices > Lisbon"; a document's single top-level heading is its title, left out of the path, and text
before any heading is titled by the file's name); a section longer than `max_words` is cut between paragraphs (and a
paragraph longer than that between lines), so that a passage stays a readable whole. A plain-text document is cut
the same way, its paragraphs under one title, the file's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.errors import DataError

DOCUMENT_SUFFIXES = (".md", ".markdown", ".txt")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class Passage:
    title: str  # the headings above the text, joined by " > "
    text: str
    source: str = ""  # the document's file name

    def __str__(self) -> str:
        return f"{self.title}\n{self.text}"


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _pieces(paragraph: str, max_words: int) -> list[str]:
    """A paragraph, or its lines where it is longer than `max_words` (a line is never cut)."""
    if len(paragraph.split()) <= max_words:
        return [paragraph]
    return [line.strip() for line in paragraph.splitlines() if line.strip()]


def _pack(paragraphs: list[str], max_words: int) -> list[str]:
    """Consecutive paragraphs (or their lines) joined into chunks of at most `max_words` words; a longer line
    stands alone. Paragraphs are joined by a blank line, the lines of one paragraph by a newline."""
    chunks: list[str] = []
    words = 0
    for paragraph in paragraphs:
        for i, piece in enumerate(_pieces(paragraph, max_words)):
            n = len(piece.split())
            if chunks and words + n <= max_words:
                chunks[-1] += ("\n" if i else "\n\n") + piece
                words += n
            else:
                chunks.append(piece)
                words = n
    return chunks


def chunk_text(text: str, title: str, max_words: int = 120) -> list[Passage]:
    """Passages of one document (see the module docstring); text before the first heading goes under
    `title` (the file name)."""
    lines = text.splitlines()
    top_level = sum(1 for line in lines if (m := _HEADING.match(line)) and len(m.group(1)) == 1)
    stack: list[tuple[int, str]] = []  # (level, heading) of the headings above the current line
    sections: list[tuple[str, list[str]]] = [(title, [])]  # (title, lines)
    for line in lines:
        m = _HEADING.match(line)
        if m is None:
            sections[-1][1].append(line)
            continue
        level = len(m.group(1))
        stack = [(lvl, h) for lvl, h in stack if lvl < level] + [(level, m.group(2))]
        path = [h for lvl, h in stack if lvl > 1 or top_level > 1]
        sections.append((" > ".join(path) or m.group(2), []))
    passages = []
    for section_title, body in sections:
        passages += [Passage(section_title, chunk, title) for chunk in _pack(_paragraphs("\n".join(body)), max_words)]
    return passages


def _document_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in DOCUMENT_SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"{path}: no documents ({', '.join(DOCUMENT_SUFFIXES)}) in this directory")
        return files
    if not path.is_file():
        raise DataError(f"document {path} not found")
    return [path]


def load_passages(documents: list[str | Path], max_words: int = 120) -> list[Passage]:
    """The passages of every document (files, or directories searched for .md/.markdown/.txt files)."""
    passages = []
    for doc in documents:
        for f in _document_files(Path(doc)):
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"{f}: cannot read the document ({e})") from None
            passages += chunk_text(text, f.name, max_words)
    if not passages:
        raise DataError(f"the documents {', '.join(map(str, documents))} hold no text")
    return passages
