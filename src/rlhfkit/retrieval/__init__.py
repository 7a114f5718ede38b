"""Retrieval: documents -> passages (knowledge.py), retrievers (retrievers.py), grounded prompts (grounding.py)."""

from rlhfkit.retrieval.grounding import Grounding, format_passages
from rlhfkit.retrieval.knowledge import Passage, chunk_text, load_passages
from rlhfkit.retrieval.retrievers import BM25Retriever, DenseRetriever, fact_recall_at_k

__all__ = ["BM25Retriever", "DenseRetriever", "Grounding", "Passage", "chunk_text", "fact_recall_at_k", "format_passages",
           "load_passages"]
