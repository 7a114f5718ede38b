"""The online trainer (PPO, RLOO, GRPO: the algorithm is a setting): advantages (GAE, leave-one-out, group-normalised),
KL (estimators, controllers) in core.py, the losses in rlhfkit.losses, and the trainer's phases (trainer.py)."""

from rlhfkit.ppo.trainer import NonFiniteError, PPOResult, train_ppo

__all__ = ["NonFiniteError", "PPOResult", "train_ppo"]
