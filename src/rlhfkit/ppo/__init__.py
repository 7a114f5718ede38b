"""The online trainer (PPO, RLOO, GRPO: the algorithm is a setting): advantages (GAE, leave-one-out, group-normalised),
KL (estimators, controllers), losses (core.py), and the trainer's phases (trainer.py)."""

from rlhfkit.ppo.trainer import NonFiniteError, PPOResult, train_ppo

__all__ = ["NonFiniteError", "PPOResult", "train_ppo"]
