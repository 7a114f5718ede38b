"""Rewards: anything that scores (prompt, response) pairs with one float each.

- `RewardModelReward`: a trained reward model (normalised scores).
- `ClassifierReward`: any HF sequence classifier; the reward is one label's logit or probability, the label
  chosen by its NAME in the model config (never by position: label orders differ between models).
  E.g. facebook/roberta-hate-speech-dynabench-r4-target with label "nothate", where there is internet.
- `ToxicityScorer`: the offline default, the trained classifier of the PyPI package alt-profanity-check
  (a linear SVM on bag-of-words, calibrated); `score` is P(toxic), and as a reward it counts negatively.
- `FunctionReward`: a plain Python function.
- `WeightedSum`: sum of weight * reward over several rewards.
- Gold measures against the truth (`similarity:PATH`, `rouge_l:PATH`, `facts:PATH`): see rlhfkit.evaluation.gold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from rlhfkit.errors import ConfigError


class Reward(Protocol):
    name: str

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor: ...


class RewardModelReward:
    def __init__(self, path: str, name: str = "reward", batch_size: int = 16, device: str | torch.device = "cpu"):
        from rlhfkit.reward.model import RewardModel

        self.model = RewardModel.from_pretrained(path).to(device)
        self.name, self.batch_size = name, batch_size

    def score(self, prompts, responses):
        return self.model.score(list(prompts), list(responses), self.batch_size)


class ClassifierReward:
    """One label of a sequence classifier, by name; `output` is "logit" or "probability" (softmax over labels)."""

    def __init__(self, model: str, label: str, output: str = "probability", name: str | None = None,
                 batch_size: int = 32, max_length: int = 512, include_prompt: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rlhfkit.models.registry import not_found, resolve_model

        if output not in ("logit", "probability"):
            raise ConfigError(f"classifier output must be 'logit' or 'probability', not {output!r}")
        resolved = resolve_model(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolved)
            self.model = AutoModelForSequenceClassification.from_pretrained(resolved).eval()
        except OSError as e:
            raise not_found(model, e) from e
        labels = {str(v): int(k) for k, v in self.model.config.id2label.items()}
        if label not in labels:
            raise ConfigError(f"{model} has no label {label!r}; its labels are {sorted(labels)}")
        self.index = labels[label]
        self.output, self.batch_size, self.max_length = output, batch_size, max_length
        self.include_prompt = include_prompt
        self.name = name or f"{label}_{output}"

    @torch.no_grad()
    def score(self, prompts, responses):
        out = []
        for start in range(0, len(responses), self.batch_size):
            texts = list(responses[start : start + self.batch_size])
            pair = list(prompts[start : start + self.batch_size]) if self.include_prompt else None
            enc = self.tokenizer(*( [pair, texts] if pair else [texts] ), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.model.device)
            logits = self.model(**enc).logits.float()
            values = logits.softmax(-1) if self.output == "probability" else logits
            out.append(values[:, self.index].cpu())
        return torch.cat(out) if out else torch.zeros(0)


class ToxicityScorer:
    """P(toxic) of each response from alt-profanity-check's trained classifier (offline, fast, batched)."""

    name = "toxicity"

    def __init__(self):
        try:
            from profanity_check import predict_prob
        except ImportError:
            raise ConfigError("the offline toxicity scorer needs alt-profanity-check: pip install alt-profanity-check") from None
        self._predict_prob = predict_prob

    def score(self, prompts, responses):
        if not len(responses):
            return torch.zeros(0)
        return torch.as_tensor(self._predict_prob(list(responses)), dtype=torch.float32)


class FunctionReward:
    def __init__(self, fn: Callable[[str, str], float], name: str | None = None):
        self.fn, self.name = fn, name or fn.__name__

    def score(self, prompts, responses):
        return torch.tensor([float(self.fn(p, r)) for p, r in zip(prompts, responses)], dtype=torch.float32)


class WeightedSum:
    """sum_i w_i * reward_i; `components()` also returns each reward's own scores (for logging)."""

    def __init__(self, terms: Sequence[tuple[float, Reward]], name: str = "total"):
        if not terms:
            raise ConfigError("a weighted sum of rewards needs at least one reward")
        self.terms, self.name = list(terms), name

    def components(self, prompts, responses) -> dict[str, torch.Tensor]:
        return {r.name: r.score(prompts, responses) for _, r in self.terms}

    def score(self, prompts, responses):
        parts = self.components(prompts, responses)
        return sum(w * parts[r.name] for w, r in self.terms)


def load_scorer(spec: str, device: str | torch.device = "cpu") -> Reward:
    """A scorer by name: `toxicity` (offline), a saved reward-model directory, `hf:MODEL:LABEL` (classifier), or a
    gold measure against the truth, `similarity:PATH`, `rouge_l:PATH` or `facts:PATH` (rlhfkit.evaluation.gold)."""
    if spec == "toxicity":
        return ToxicityScorer()
    metric, sep, path = spec.partition(":")
    if sep and metric in ("similarity", "rouge_l", "facts"):
        from rlhfkit.evaluation.gold import TruthReward

        if not path:
            raise ConfigError(f"scorer {spec!r} needs the truth: {metric}:PATH, a JSONL file or directory of prompts "
                              f"with their ideal `response` and `facts` (e.g. {metric}:data/company)")
        return TruthReward(metric, path, device=device)
    if spec.startswith("hf:"):
        model, _, label = spec[3:].rpartition(":")
        if not model or not label:
            raise ConfigError(f"classifier spec {spec!r} needs a label: hf:MODEL:LABEL, e.g. "
                              "hf:facebook/roberta-hate-speech-dynabench-r4-target:nothate")
        return ClassifierReward(model, label)
    return RewardModelReward(spec, device=device)
