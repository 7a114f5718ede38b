"""Retrievers over a knowledge base's passages, and their recall on questions whose facts are known.

- `BM25Retriever`: Okapi BM25 (Robertson & Zaragoza 2009) from the `bm25s` package, over the passages' titles and
  texts in the gold evaluation's normalised tokens (case, number formats; rlhfkit.text.facts), stop words out:
  score(q, d) = sum over query terms t of IDF(t) * f(t, d) (k1 + 1) / (f(t, d) + k1 (1 - b + b |d| / avgdl)).
- `DenseRetriever`: the cosine of sentence embeddings (all-MiniLM-L6-v2 by default, the gold evaluation's embedder,
  loaded offline the same way).

Both return the top k passages, best first; ties keep the documents' order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlhfkit.retrieval.knowledge import Passage
from rlhfkit.text.facts import states, tokens

# a short English stop list: words that carry no topic (BM25's IDF already discounts them; out, they cost nothing)
STOP_WORDS = frozenset(
    "a an and are as at be but by can could do does for from have how i if in into is it its me my of on or our "
    "so that the their there these they this to was we what when where which who why will with would you your".split()
)


def _terms(text: str) -> list[str]:
    return [t for t in tokens(text) if t not in STOP_WORDS]


class BM25Retriever:
    def __init__(self, passages: Sequence[Passage], k1: float = 1.5, b: float = 0.75):
        import bm25s

        self.passages = list(passages)
        self.index = bm25s.BM25(k1=k1, b=b)
        self.index.index([_terms(str(p)) for p in self.passages], show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        known = [t for t in _terms(query) if t in self.index.vocab_dict]
        if not known:
            return np.zeros(len(self.passages))
        return np.asarray(self.index.get_scores(known), dtype=np.float64)

    def search(self, query: str, k: int) -> list[Passage]:
        return _top(self.passages, self.scores(query), k)


class DenseRetriever:
    def __init__(self, passages: Sequence[Passage], embedder: str = "all-minilm-l6-v2", device: str = "cpu"):
        from rlhfkit.text.embedding import load_embedder

        self.passages = list(passages)
        self.embedder = load_embedder(embedder, device)
        self.vectors = self.embedder.embed([str(p) for p in self.passages])  # unit length: dot = cosine

    def scores(self, query: str) -> np.ndarray:
        return (self.vectors @ self.embedder.embed([query])[0]).double().numpy()

    def search(self, query: str, k: int) -> list[Passage]:
        return _top(self.passages, self.scores(query), k)


def _top(passages: list[Passage], scores: np.ndarray, k: int) -> list[Passage]:
    order = np.argsort(-scores, kind="stable")[:k]  # stable: ties keep the documents' order
    return [passages[i] for i in order]


def fact_recall_at_k(retriever, questions: Sequence[str], facts: Sequence[Sequence[str]], k: int) -> float:
    """Retrieval recall@k against the facts a right answer states: per question, the share of its facts that the
    top-k passages state (the gold evaluation's matching: `rlhfkit.text.facts.states`), averaged over the
    questions. With k = all passages it is the knowledge base's ceiling: facts phrased otherwise in the documents
    than in the truth never count."""
    if not questions:
        raise ValueError("no questions with facts to measure recall on")
    shares = []
    for question, wanted in zip(questions, facts, strict=True):
        seen = tokens("\n".join(str(p) for p in retriever.search(question, k)))
        shares.append(sum(states(seen, f) for f in wanted) / len(wanted))
    return float(np.mean(shares))
