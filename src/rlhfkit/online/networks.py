"""The networks the online trainer builds: the policy (optionally with a value head), a separate critic, and the
frozen reference.

Reference: with LoRA the reference is the policy with its adapter disabled (the same base weights, no second
copy); without LoRA it is a frozen copy of the starting model (an SFT adapter merged into its base:
rlhfkit.models.policy).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from rlhfkit.config import PPOConfig
from rlhfkit.errors import ConfigError
from rlhfkit.models.loading import disable_dropout, lora_config
from rlhfkit.models.policy import PolicyModel, ValueModel, load_start_model, trainable_start_model

logger = logging.getLogger(__name__)


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
