"""The networks policy trainers (online RL, DPO) train and evaluation runs: the policy LM (optionally with a value
head), a separate critic, and the starting model they begin from.

A starting model that is itself an adapter (an SFT run) is merged into its base first, so a reference that is the
starting model is exactly the SFT model; an adapter trained on it records that merged model as its base, written
to output_dir/base, so that peft loads the trained output alone.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager

import torch
from torch import nn

from rlhfkit.config import DPOConfig, PPOConfig
from rlhfkit.errors import ConfigError
from rlhfkit.models.loading import apply_lora, is_adapter, load_causal_lm, load_tokenizer
from rlhfkit.rollout.prefix import forward_responses



class PolicyModel(nn.Module):
    """A causal LM; with `value_head`, also a critic reading the LM's last hidden state (one shared forward)."""

    def __init__(self, lm: nn.Module, value_head: nn.Linear | None = None):
        super().__init__()
        self.lm = lm
        self.value_head = value_head

    def forward(self, query_ids, query_mask, response_ids, response_mask):
        """Logits predicting each response token, [B, R, V], and the values there ([B, R] or None).

        Prompts shared by several rows, and the prefix all prompts share, are computed once (rlhfkit.rollout.prefix);
        the LM head runs only on the response positions: prompt tokens need no vocabulary projection.
        """
        def select(out):
            return out.logits, out.hidden_states[-1] if self.value_head is not None else None

        logits, hidden = forward_responses(self.lm, query_ids, query_mask, response_ids, response_mask, select,
                                           output_hidden_states=self.value_head is not None)
        values = None if hidden is None else self.value_head(hidden).squeeze(-1).float()
        return logits, values

    @contextmanager
    def as_reference(self):
        """The frozen starting model: this LM with its LoRA adapter switched off."""
        with self.lm.disable_adapter():
            yield self

    def generate(self, **kwargs):
        return self.lm.generate(**kwargs)


class ValueModel(nn.Module):
    """A separate critic: a transformer backbone and a scalar head, V(s_t) at every response position."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
        (hidden,) = forward_responses(self.backbone, query_ids, query_mask, response_ids, response_mask,
                                      lambda out: (out.last_hidden_state,))
        return self.head(hidden).squeeze(-1).float()


START_MODEL_DIR = "base"  # in a run started from an adapter: the merged start, the trained adapter's base


StartSettings = PPOConfig | DPOConfig  # the settings read here: model, load_in_4bit, lora, merge_adapter, output_dir


def load_start_model(cfg: StartSettings) -> nn.Module:
    """The starting policy as one plain model: an SFT adapter is merged into its base."""
    lm = load_causal_lm(cfg.model, dtype="auto" if cfg.load_in_4bit else "float32", load_in_4bit=cfg.load_in_4bit)
    if hasattr(lm, "merge_and_unload"):
        if cfg.load_in_4bit:
            raise ConfigError(
                f"{cfg.model} is a LoRA adapter and load_in_4bit is on: an adapter cannot be merged into 4-bit weights "
                "exactly. Train the SFT stage with merge_adapter: true, or turn load_in_4bit off."
            )
        lm = lm.merge_and_unload()
    return lm


def write_start_model(lm: nn.Module, cfg: StartSettings) -> None:
    """Save the merged starting model (and its tokenizer) to output_dir/base, once, and make it the name the
    trained adapter records as its base: plain peft then loads the run's output on its own, and the SFT run may move."""
    from accelerate import PartialState

    target = (cfg.output_dir / START_MODEL_DIR).resolve()
    if PartialState().is_main_process and not (target / "config.json").is_file():
        tmp = target.with_name(f".{START_MODEL_DIR}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing it
        lm.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(cfg.model).save_pretrained(tmp)
        tmp.replace(target)
    lm.name_or_path = lm.config.name_or_path = str(target)


def trainable_start_model(cfg: StartSettings) -> nn.Module:
    """The starting model ready to train: with fresh LoRA adapters (recording the merged start as their base when
    it was itself an adapter), or all of its weights."""
    lm = load_start_model(cfg)
    if cfg.lora.enabled:
        if is_adapter(cfg.model) and not cfg.merge_adapter:
            write_start_model(lm, cfg)
        lm = apply_lora(lm, cfg.lora, quantized=cfg.load_in_4bit)
    return lm
