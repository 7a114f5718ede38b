"""The networks PPO trains and consults: the policy (optionally with a value head), a separate critic, and the
frozen reference.

Reference: with LoRA the reference is the policy with its adapter disabled (the same base weights, no second
copy); without LoRA it is a frozen copy of the starting model. A starting model that is itself an adapter
(an SFT run) is merged into its base first, so the reference is exactly the SFT model; a PPO adapter trained on
it records that merged model as its base, written to output_dir/base, so that peft loads the PPO output alone.
"""

from __future__ import annotations

import copy
import logging
import shutil
from contextlib import contextmanager

import torch
from torch import nn

from rlhfkit.config import DPOConfig, PPOConfig
from rlhfkit.errors import ConfigError
from rlhfkit.models.loading import apply_lora, disable_dropout, is_adapter, load_causal_lm, load_tokenizer, lora_config
from rlhfkit.rollout.prefix import forward_responses

logger = logging.getLogger(__name__)


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


START_MODEL_DIR = "base"  # in a PPO run started from an adapter: the merged start, the PPO adapter's base


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
    """Save the merged starting model (and its tokenizer) to output_dir/base, once, and make it the name a PPO
    adapter records as its base: plain peft then loads the PPO output on its own, and the SFT run may move."""
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


def build_policy(cfg: PPOConfig) -> tuple[PolicyModel, nn.Module | None]:
    """The trainable policy and, without LoRA, the separate frozen reference."""
    lm = trainable_start_model(cfg)
    lm.config.use_cache = True  # generation; training forwards pass use_cache=False
    reference = None if cfg.lora.enabled else copy.deepcopy(lm).requires_grad_(False).eval()
    head = None
    if cfg.critic == "value_head":
        head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    policy = PolicyModel(lm, head)
    disable_dropout(policy)  # PPO's ratio must compare the same function in rollout and update
    return policy, reference


def value_head_from_reward_model(rm) -> nn.Linear | None:
    """The reward model's scalar head as a value head on the same scale as its rewards (the logit plus the stored
    offset, so a critic starts out predicting normalised scores); None for a head that is not one linear layer on a
    causal transformer's hidden states (an encoder's classifier)."""
    score = getattr(rm.classifier, "score", None)
    if not isinstance(score, nn.Linear):
        return None
    head = nn.Linear(score.in_features, 1)
    with torch.no_grad():
        head.weight.copy_(score.weight)
        head.bias.fill_(rm.offset + (score.bias.item() if score.bias is not None else 0.0))
    return head


def build_critic(cfg: PPOConfig, policy_tokenizer, reward_model_path: str | None) -> ValueModel:
    """A separate critic, initialised from the reward model (when it reads text the way the policy writes it:
    the same vocabulary and a scalar head on a causal transformer) or else from the starting policy with a zero
    head."""
    from rlhfkit.reward.model import RewardModel

    source = cfg.critic_init
    if source in ("auto", "reward_model") and reward_model_path is not None:
        rm = RewardModel.from_pretrained(reward_model_path)
        head = value_head_from_reward_model(rm)
        if head is not None and rm.tokenizer.get_vocab() == policy_tokenizer.get_vocab():
            critic = ValueModel(rm.body, head)
            source = "reward_model"
        elif source == "reward_model":
            raise ConfigError(
                f"critic_init: reward_model, but the reward model {reward_model_path} "
                + ("has a different vocabulary from the policy" if head is not None else "is an encoder classifier")
                + "; use critic_init: policy (or auto)"
            )
        else:
            source = "policy"
    elif source == "reward_model":
        raise ConfigError("critic_init: reward_model, but no reward model directory is among the rewards")
    else:
        source = "policy"
    if source == "policy":
        lm = load_start_model(cfg.model_copy(update={"load_in_4bit": False}))
        head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        critic = ValueModel(lm.base_model, head)
    logger.info("critic initialised from the %s", source.replace("_", " "))
    if cfg.lora.enabled:
        from peft import get_peft_model

        critic.backbone = get_peft_model(critic.backbone, lora_config(cfg.lora))
    disable_dropout(critic)
    return critic
