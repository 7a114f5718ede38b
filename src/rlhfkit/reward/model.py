"""The reward model: a transformer backbone and a scalar head, read at the last real token of prompt + response.

Causal-LM backbones (the default, the bundled SmolLM2) get our head: Linear(d, 1), weight ~ N(0, 1/sqrt(d+1)),
bias 0. Encoder backbones are loaded as AutoModelForSequenceClassification(num_labels=1). The last real token
is found from the attention mask, never from the pad id (the bundled model pads with its EOS token), so the
score is the same under left and right padding. After training, `gain` and `bias` map the raw scores of the
training completions to mean 0 and std 1; `score()` applies them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerBase

from rlhfkit.errors import ModelNotFoundError
from rlhfkit.models.loading import disable_dropout, load_causal_lm, load_tokenizer
from rlhfkit.models.registry import resolve_model

CONFIG_FILE = "reward_model.json"
HEAD_FILE = "reward_head.safetensors"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, per row; correct for left and right padding."""
    width = attention_mask.shape[-1]
    return width - 1 - attention_mask.flip(-1).argmax(-1)


def is_causal_lm(name: str) -> bool:
    path = resolve_model(name)
    if (Path(path) / "adapter_config.json").is_file():
        return True  # adapters here are trained on causal LMs
    try:
        architectures = AutoConfig.from_pretrained(path).architectures or []
    except OSError as e:
        raise ModelNotFoundError(f"cannot read the config of {name!r}: {e}") from e
    return any(a.endswith("ForCausalLM") for a in architectures)


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Linear | None, tokenizer: PreTrainedTokenizerBase,
                 base_model: str, gain: float = 1.0, bias: float = 0.0, max_length: int = 512):
        super().__init__()
        self.backbone = backbone
        self.head = head  # None: the backbone is a sequence classifier with its own head
        self.tokenizer = tokenizer
        self.base_model = base_model
        self.gain, self.bias = gain, bias
        self.max_length = max_length

    @classmethod
    def from_base(cls, name: str, max_length: int = 512) -> RewardModel:
        """A new reward model on the backbone `name` (alias, directory, adapter directory or hub id)."""
        tokenizer = load_tokenizer(name)
        if is_causal_lm(name):
            lm = load_causal_lm(name, dtype="float32")
            if hasattr(lm, "merge_and_unload"):  # an SFT adapter: fold it into the weights
                lm = lm.merge_and_unload()
            backbone = lm.base_model  # the transformer without its LM head
            d = backbone.config.hidden_size
            head = nn.Linear(d, 1)
            nn.init.normal_(head.weight, std=1 / math.sqrt(d + 1))
            nn.init.zeros_(head.bias)
        else:
            backbone = AutoModelForSequenceClassification.from_pretrained(
                resolve_model(name), num_labels=1, ignore_mismatched_sizes=True  # a new 1-output head
            )
            head = None
        disable_dropout(backbone)
        if backbone.config.pad_token_id is None:
            backbone.config.pad_token_id = tokenizer.pad_token_id
        return cls(backbone, head, tokenizer, base_model=name, max_length=max_length)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) rewards, one per row."""
        if self.head is None:
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        # Position ids from the mask, so a left-padded row sees the same positions as an unpadded one.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        return self.head(last).squeeze(-1)

    def tokenize(self, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
        """Prompt + response in the chat template, right-padded; overlong texts keep their end (where the score is read)."""
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
            )
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
    def raw_scores(self, prompts: list[str], responses: list[str], batch_size: int = 16) -> torch.Tensor:
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(prompts), batch_size):
            batch = self.tokenize(prompts[start : start + batch_size], responses[start : start + batch_size])
            out.append(self(**{k: v.to(device) for k, v in batch.items()}).float().cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, prompts: list[str], responses: list[str], batch_size: int = 16) -> torch.Tensor:
        """Normalised rewards: gain * raw + bias."""
        return self.gain * self.raw_scores(prompts, responses, batch_size) + self.bias

    def set_normalization(self, raw: torch.Tensor) -> None:
        """Choose gain and bias so that `raw` (scores of the training completions) gets mean 0 and std 1."""
        std = raw.float().std().item()
        self.gain = 1.0 / std if std > 0 else 1.0
        self.bias = -raw.float().mean().item() * self.gain

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        if self.head is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}, path / HEAD_FILE)
        meta = {"kind": "scalar-head" if self.head is not None else "sequence-classification",
                "base_model": self.base_model, "gain": self.gain, "bias": self.bias, "max_length": self.max_length}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> RewardModel:
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise ModelNotFoundError(f"{path} is not a saved reward model (no {CONFIG_FILE} in it)")
        meta = json.loads((path / CONFIG_FILE).read_text())
        tokenizer = load_tokenizer(str(path))
        if meta["kind"] == "scalar-head":
            from transformers import AutoModel

            backbone = AutoModel.from_pretrained(path)
            weights = load_file(path / HEAD_FILE)
            head = nn.Linear(weights["weight"].shape[1], 1)
            head.load_state_dict(weights)
        else:
            backbone, head = AutoModelForSequenceClassification.from_pretrained(path), None
        disable_dropout(backbone)
        return cls(backbone, head, tokenizer, base_model=meta["base_model"], gain=meta["gain"], bias=meta["bias"],
                   max_length=meta["max_length"])
