"""The reward model: a transformers sequence classifier with one output (`AutoModelForSequenceClassification`,
`num_labels=1`), the form TRL trains and loads, so that a saved rlhfkit reward model loads in plain transformers
and TRL and gives the same scores there, and a TRL-trained one works here.

A causal-LM backbone (the default, the bundled SmolLM2) becomes its `*ForSequenceClassification` class: the
transformer plus a bias-free `score` layer, Linear(d, 1) initialised N(0, 1/sqrt(d+1)), read at the last token that
is not padding (transformers' rule). Encoder backbones get their own classification head with one output. The text
scored is prompt + response in the model's chat template.

After training, the scores of the training completions are normalised to std 1, the scale folded into the last
linear layer of the head, and to mean 0 where that layer has a bias (encoder classifiers: the shift goes into it).
Decoder heads (`score`) have none, in every architecture transformers has, and nothing in a plain checkpoint can
add a constant after them, so their rewards keep the level training left them at: a score is exactly the logit
that transformers and TRL compute (a Bradley-Terry loss fixes no level, and a constant changes no preference,
ranking, best-of-n choice or GRPO/RLOO advantage; PPO's `normalize_reward` centres rewards where wanted).
Reward models saved before this stored the shift in config.json (`rlhfkit_reward.offset`), which `score()` still
adds: their score is their logit plus that offset.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhfkit.data.chat import answered_messages
from rlhfkit.errors import ConfigError, ModelNotFoundError
from rlhfkit.models.loading import disable_dropout, load_causal_lm, load_tokenizer
from rlhfkit.models.registry import resolve_model
from rlhfkit.rollout.prefix import MIN_SHARED_PREFIX, caches, encode_prefix

CONFIG_KEY = "rlhfkit_reward"  # in config.json: {"offset", "max_length", "base_model", "retrieval"}
DEFAULT_MAX_LENGTH = 1024  # for reward models trained elsewhere (TRL's RewardConfig default)
LEGACY_CONFIG_FILE, LEGACY_HEAD_FILE = "reward_model.json", "reward_head.safetensors"  # rlhfkit 0.1's format

logger = logging.getLogger(__name__)


def is_causal_lm(name: str) -> bool:
    path = resolve_model(name)
    if (Path(path) / "adapter_config.json").is_file():
        return True  # adapters here are trained on causal LMs
    try:
        architectures = AutoConfig.from_pretrained(path).architectures or []
    except OSError as e:
        raise ModelNotFoundError(f"cannot read the config of {name!r}: {e}") from e
    return any(a.endswith("ForCausalLM") for a in architectures)


def output_layer(classifier: PreTrainedModel) -> nn.Linear:
    """The last linear layer of a sequence classifier's head (`score`, `classifier`, `classifier.out_proj`, ...)."""
    head = getattr(classifier, "score", None) or getattr(classifier, "classifier", None)
    linears = [head] if isinstance(head, nn.Linear) else [m for m in (head.modules() if head is not None else [])
                                                          if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(classifier).__name__} has no linear classification head (score or classifier)")
    return linears[-1]


def _classifier_around(lm: PreTrainedModel) -> PreTrainedModel:
    """The one-output `*ForSequenceClassification` of a causal LM's architecture, around the LM's own transformer,
    with a new head: `score` = Linear(d, 1), N(0, 1/sqrt(d+1)), no bias (as transformers builds it)."""
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    with torch.device("meta"):  # the transformer is the LM's and the head is made below: nothing to initialise
        classifier = AutoModelForSequenceClassification.from_config(config)
    setattr(classifier, classifier.base_model_prefix, lm.base_model)
    if not isinstance(getattr(classifier, "score", None), nn.Linear):
        raise ConfigError(f"{type(classifier).__name__} has no `score` layer; train the reward model on another model")
    d = classifier.score.in_features
    # Drawn as rlhfkit 0.1 drew its head (a Linear with a bias, then the weight re-drawn), so that one seed gives the
    # same reward model as before; transformers' score layer keeps the weight (Bradley-Terry never moves a bias).
    drawn = nn.Linear(d, 1)
    nn.init.normal_(drawn.weight, std=1 / math.sqrt(d + 1))
    classifier.score = nn.Linear(d, 1, bias=False)
    classifier.score.weight = drawn.weight
    if any(t.is_meta for t in [*classifier.parameters(), *classifier.buffers()]):
        raise ConfigError(f"{type(classifier).__name__} has parts beyond its transformer and score layer; "
                          "train the reward model on another model")
    return classifier


class RewardModel(nn.Module):
    """A sequence classifier with one output and its tokenizer: scores (prompt, response) pairs, higher is better."""

    def __init__(self, classifier: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, base_model: str,
                 offset: float = 0.0, max_length: int = 512, retrieval: dict | None = None):
        super().__init__()
        self.classifier = classifier
        self.tokenizer = tokenizer
        self.base_model = base_model
        self.offset = offset
        self.max_length = max_length
        self.retrieval = retrieval  # RetrievalSettings as a dict: the model reads prompts with these passages
        self._takes_positions = "position_ids" in inspect.signature(classifier.forward).parameters
        self._caches = "cache" in inspect.signature(classifier.forward).parameters  # a decoder: a prefix is cacheable

    @property
    def grounding(self):
        """The grounding of the prompts this model was trained on (saved with it), or None."""
        if self.retrieval is None:
            return None
        from rlhfkit.config import RetrievalSettings
        from rlhfkit.retrieval import Grounding

        return Grounding.from_settings(RetrievalSettings.model_validate(self.retrieval), str(next(self.parameters()).device))

    @property
    def body(self) -> nn.Module:
        """The transformer without its classification head (where LoRA adapters go)."""
        return getattr(self.classifier, self.classifier.base_model_prefix)

    def set_body(self, module: nn.Module) -> None:
        """Put `module` in the body's place (a LoRA-wrapped body, then the merged one)."""
        setattr(self.classifier, self.classifier.base_model_prefix, module)

    @classmethod
    def from_base(cls, name: str, max_length: int = 512) -> RewardModel:
        """A new reward model on the backbone `name` (alias, directory, adapter directory or hub id)."""
        tokenizer = load_tokenizer(name)
        if is_causal_lm(name):
            lm = load_causal_lm(name, dtype="float32")
            if hasattr(lm, "merge_and_unload"):  # an SFT adapter: fold it into the weights
                lm = lm.merge_and_unload()
            classifier = _classifier_around(lm)
        else:
            classifier = AutoModelForSequenceClassification.from_pretrained(
                resolve_model(name), num_labels=1, ignore_mismatched_sizes=True  # a new 1-output head
            )
        return cls._ready(classifier, tokenizer, base_model=name, max_length=max_length)

    @classmethod
    def _ready(cls, classifier, tokenizer, **kwargs) -> RewardModel:
        disable_dropout(classifier)  # the same text must always get the same score
        text_config = classifier.config.get_text_config()
        if text_config.pad_token_id is None:  # transformers finds the last real token through the pad id
            text_config.pad_token_id = tokenizer.pad_token_id
        return cls(classifier, tokenizer, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits, one per row: what transformers' `model(**inputs).logits[:, 0]` gives. On a decoder, the tokens
        every row starts with (the chat template's system prompt) are computed once for the batch (their keys and
        values repeated for every row, gradients included), then the rest of each row: the same function."""
        extra = {}
        if self._takes_positions:  # from the mask, so that a left-padded row sees the positions it would alone
            extra["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cacheable = self._caches and caches(self.classifier)
        shared = self._shared_prefix(input_ids, attention_mask) if cacheable else 0
        if shared < MIN_SHARED_PREFIX:
            return self.classifier(input_ids=input_ids, attention_mask=attention_mask, **extra).logits[:, 0]
        cache = DynamicCache(config=self.classifier.config)
        encode_prefix(self.classifier, input_ids[0, :shared], cache, len(input_ids))
        # transformers reads the score at the rightmost token that is not padding: in the rest, at the same token
        return self.classifier(input_ids=input_ids[:, shared:], attention_mask=attention_mask, cache=cache,
                               use_cache=True, **{k: v[:, shared:] for k, v in extra.items()}).logits[:, 0]

    def _shared_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
        """How many leading tokens every (right-padded) row shares, leaving each row the token its score is read at;
        0 for a single row or left padding."""
        if len(input_ids) < 2 or not attention_mask[:, 0].all():
            return 0
        pad = self.classifier.config.get_text_config().pad_token_id
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)
        read_at = (columns * (input_ids != pad)).argmax(-1) if pad is not None else attention_mask.sum(-1) - 1
        limit = int(read_at.min())  # every row keeps the token its score is read at
        differs = ((input_ids[:, :limit] != input_ids[:1, :limit]) | (attention_mask[:, :limit] == 0)).any(0)
        return int(differs.nonzero()[0]) if differs.any() else limit

    def tokenize(self, prompts: list, responses: list[str]) -> dict[str, torch.Tensor]:
        """Prompt + response in the chat template, right-padded; overlong texts keep their end (where the score is
        read). A prompt is a user message's text or a conversation so far."""
        grounding = self.grounding
        texts = [
            self.tokenizer.apply_chat_template(answered_messages(self.tokenizer, p, {"role": "assistant", "content": r},
                                                                 grounding=grounding, max_length=self.max_length),
                                               tokenize=False)
            for p, r in zip(prompts, responses)
        ]
        side = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = "left"
        try:
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   add_special_tokens=False, return_tensors="pt")
        finally:
            self.tokenizer.truncation_side = side
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    @torch.no_grad()
    def raw_scores(self, prompts: list, responses: list[str], batch_size: int = 16) -> torch.Tensor:
        """The classifier's logits (no offset)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(prompts), batch_size):
            batch = self.tokenize(prompts[start : start + batch_size], responses[start : start + batch_size])
            out.append(self(**{k: v.to(device) for k, v in batch.items()}).float().cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, prompts: list, responses: list[str], batch_size: int = 16) -> torch.Tensor:
        """Rewards: the logits plus the stored offset (normalised, after rlhfkit's training)."""
        return self.raw_scores(prompts, responses, batch_size) + self.offset

    @torch.no_grad()
    def set_normalization(self, raw: torch.Tensor) -> None:
        """Make the rewards of `raw` (logits of the training completions) std 1, and mean 0 where the head's last
        linear layer has a bias: r' = g (r - mean), g into the layer's weight, -g mean into its bias. A bias-free
        layer keeps the level (see the module docstring): a shift kept beside the weights would make plain
        transformers and TRL score otherwise than rlhfkit."""
        scores = raw.float() + self.offset
        std = scores.std().item() if scores.numel() > 1 else 0.0
        gain = 1.0 / std if std > 0 else 1.0
        layer = output_layer(self.classifier)
        layer.weight.mul_(gain)
        if layer.bias is not None:
            layer.bias.mul_(gain).add_((self.offset - scores.mean().item()) * gain)
            self.offset = 0.0
        else:
            self.offset *= gain  # 0 for every model trained since; an older model's stored shift, on the new scale

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """transformers' layout (config.json, model.safetensors, tokenizer files), the offset in config.json."""
        path = Path(path)
        setattr(self.classifier.config, CONFIG_KEY, {"offset": self.offset, "max_length": self.max_length,
                                                      "base_model": self.base_model, "retrieval": self.retrieval})
        self.classifier.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> RewardModel:
        """A saved reward model: rlhfkit's, any `*ForSequenceClassification` with one label (e.g. TRL's), or the
        format of rlhfkit 0.1 (a backbone plus reward_head.safetensors)."""
        path = Path(path)
        if (path / LEGACY_CONFIG_FILE).is_file():
            return cls._from_legacy(path)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(f"{path} is not a model directory ({e})") from None
        architectures = config.architectures or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ModelNotFoundError(
                f"{path} is not a reward model: a reward model is a sequence classifier with one label "
                f"(*ForSequenceClassification), and this is {', '.join(architectures) or 'of unknown architecture'}")
        if config.num_labels != 1:
            labels = ", ".join(str(v) for v in config.id2label.values())
            raise ConfigError(f"{path} is a classifier with {config.num_labels} labels ({labels}), not a reward model; "
                              f"use one label's score as a reward with hf:{path}:LABEL")
        meta = getattr(config, CONFIG_KEY, None) or {}
        classifier = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        return cls._ready(classifier, load_tokenizer(str(path)), base_model=meta.get("base_model", str(path)),
                          offset=meta.get("offset", 0.0), max_length=meta.get("max_length", DEFAULT_MAX_LENGTH),
                          retrieval=meta.get("retrieval"))

    @classmethod
    def _from_legacy(cls, path: Path) -> RewardModel:
        """rlhfkit 0.1 saved the transformer (or an encoder classifier), a separate scalar head, and gain and bias."""
        meta = json.loads((path / LEGACY_CONFIG_FILE).read_text())
        classifier = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        layer = output_layer(classifier)
        offset = meta["bias"]
        with torch.no_grad():
            if meta["kind"] == "scalar-head":
                head = load_file(path / LEGACY_HEAD_FILE)
                layer.weight.copy_(head["weight"])
                offset += meta["gain"] * head["bias"].item()
            layer.weight.mul_(meta["gain"])
            if layer.bias is not None:
                layer.bias.mul_(meta["gain"])
        model = cls._ready(classifier, load_tokenizer(str(path)), base_model=meta["base_model"], offset=offset,
                           max_length=meta["max_length"])
        logger.info("%s is in rlhfkit 0.1's reward-model format; save it again to write the current one", path)
        return model
