"""Rewards: anything that scores (prompt, response) pairs with one float each.

- `RewardModelReward`: a reward model (rlhfkit's, normalised; or any sequence classifier with one label, e.g. TRL's).
- `ClassifierReward`: any HF sequence classifier; the reward is one label's logit or probability, the label
  chosen by its NAME in the model config (never by position: label orders differ between models). The head
  decides what a probability is: softmax over the labels of a single-label classifier, sigmoid for a multi-label
  one (`problem_type: multi_label_classification`) or a one-label one. Spec: `hf:MODEL:LABEL[:logit|prob]`, e.g.
  hf:facebook/roberta-hate-speech-dynabench-r4-target:nothate, where there is internet.
- `ToxicityScorer`: the offline default, the trained classifier of the PyPI package alt-profanity-check
  (a linear SVM on bag-of-words, calibrated); `score` is P(toxic), and as a reward it counts negatively.
- `ProfaneWords` (`profane_words`): 1 for an answer with a word of a profanity list; a second judge of harm
  beside the classifier (rlhfkit.reward.wordlist).
- `FunctionReward`: a plain Python function.
- `WeightedSum`: sum of weight * reward over several rewards.
- `TruthReward` (`truth:PATH`): facts stated, contradictions and declining checked against the truth: see
  rlhfkit.reward.truth.
- `GoldReward`: the gold measures against the truth (`similarity:PATH`, `rouge_l:PATH`, `facts:PATH`): see
  rlhfkit.reward.gold.
- What a harm score can cost (`refusal`: 1 for an answer that refuses or evades; `relevance`: prompt-answer
  similarity): see rlhfkit.reward.engagement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from rlhfkit.data.chat import prompt_text
from rlhfkit.errors import ConfigError

OUTPUTS = {"logit": "logit", "prob": "probability", "probability": "probability"}


class Reward(Protocol):
    name: str

    def score(self, prompts: Sequence, responses: Sequence[str]) -> torch.Tensor: ...


class RewardModelReward:
    def __init__(self, path: str, name: str = "reward", batch_size: int = 16, device: str | torch.device = "cpu"):
        from rlhfkit.reward.model import RewardModel

        self.model = RewardModel.from_pretrained(path).to(device)
        self.name, self.batch_size = name, batch_size

    def score(self, prompts, responses):
        return self.model.score(list(prompts), list(responses), self.batch_size)


class ClassifierReward:
    """One label of a sequence classifier, by name. `output`: "logit", "probability" (softmax over the labels, or
    sigmoid for a multi-label or one-label head), or "auto": the logit of a one-label head (a reward model's score),
    else the probability."""

    def __init__(self, model: str, label: str, output: str = "auto", name: str | None = None,
                 batch_size: int = 32, max_length: int = 512, include_prompt: bool = False,
                 device: str | torch.device = "cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rlhfkit.models.registry import not_found, resolve_model

        if output not in ("auto", "logit", "probability"):
            raise ConfigError(f"classifier output must be 'logit' or 'probability' (prob), not {output!r}")
        resolved = resolve_model(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolved)
            self.model = AutoModelForSequenceClassification.from_pretrained(resolved).to(device).eval()
        except OSError as e:
            raise not_found(model, e) from e
        config = self.model.config
        labels = {str(v): int(k) for k, v in config.id2label.items()}
        if label not in labels:
            raise ConfigError(f"{model} has no label {label!r}; its labels are {sorted(labels)}")
        if self.tokenizer.pad_token is None:  # a one-sequence-at-a-time model (GPT-2 style): pad with EOS
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # a decoder's head reads each row at its last token that is not the pad id: the id the inputs are padded
        # with (a config may have none, `pad_token_id: null`, where its tokenizer has one)
        config.get_text_config().pad_token_id = self.tokenizer.pad_token_id
        self.index = labels[label]
        self.sigmoid = config.num_labels == 1 or config.problem_type == "multi_label_classification"
        self.output = ("logit" if config.num_labels == 1 else "probability") if output == "auto" else output
        self.batch_size, self.max_length, self.include_prompt = batch_size, max_length, include_prompt
        self.name = name or f"{label}_{self.output}"

    @torch.no_grad()
    def score(self, prompts, responses):
        out = []
        for start in range(0, len(responses), self.batch_size):
            texts = list(responses[start : start + self.batch_size])
            pair = [prompt_text(p) for p in prompts[start : start + self.batch_size]] if self.include_prompt else None
            enc = self.tokenizer(*([pair, texts] if pair else [texts]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.model.device)
            logits = self.model(**enc).logits.float()
            if self.output == "probability":
                logits = logits.sigmoid() if self.sigmoid else logits.softmax(-1)
            out.append(logits[:, self.index].cpu())
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
    """A scorer by name: `toxicity` (offline), `profane_words` (rlhfkit.reward.wordlist), `refusal` or `relevance`
    (rlhfkit.reward.engagement), a reward-model directory, `hf:MODEL:LABEL[:logit|prob]` (one label of a
    classifier; without the last part, the logit of a one-label head and the probability otherwise), the truth reward `truth:PATH[?needless=0.25&...]`
    (rlhfkit.reward.truth, its weights changed in the query), or a gold measure against the truth,
    `similarity:PATH`, `rouge_l:PATH` or `facts:PATH` (rlhfkit.reward.gold)."""
    if spec == "toxicity":
        return ToxicityScorer()
    if spec == "profane_words":
        from rlhfkit.reward.wordlist import ProfaneWords

        return ProfaneWords()
    if spec in ("refusal", "relevance"):
        from rlhfkit.reward.engagement import EngagementReward

        return EngagementReward(spec, device=str(device))
    metric, sep, path = spec.partition(":")
    if sep and metric == "truth":
        from rlhfkit.reward.truth import TruthReward, TruthWeights

        path, weights = TruthWeights.parse(path)
        if not path:
            raise ConfigError(f"scorer {spec!r} needs the truth: truth:PATH, a JSONL file or directory of prompts with "
                              "their `facts` (e.g. truth:data/company)")
        return TruthReward(path, weights)
    if sep and metric in ("similarity", "rouge_l", "facts"):
        from rlhfkit.reward.gold import GoldReward

        if not path:
            raise ConfigError(f"scorer {spec!r} needs the truth: {metric}:PATH, a JSONL file or directory of prompts "
                              f"with their ideal `response` and `facts` (e.g. {metric}:data/company)")
        return GoldReward(metric, path, device=device)
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        output = OUTPUTS.get(parts[-1]) if len(parts) > 2 else None
        if output is not None:
            parts = parts[:-1]
        model, label = ":".join(parts[:-1]), parts[-1] if len(parts) > 1 else ""
        if not model or not label:
            raise ConfigError(f"classifier spec {spec!r} needs a label: hf:MODEL:LABEL[:logit|prob], e.g. "
                              "hf:facebook/roberta-hate-speech-dynabench-r4-target:nothate")
        return ClassifierReward(model, label, output=output or "auto", device=device)
    return RewardModelReward(spec, device=device)
