"""PPO: rollout, advantages (GAE, whitening), KL (estimators, controllers), losses, and the trainer."""

from rlhfkit.ppo.trainer import NonFiniteError, PPOResult, train_ppo

__all__ = ["NonFiniteError", "PPOResult", "train_ppo"]
