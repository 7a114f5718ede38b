"""Online policy optimisation: PPO, RLOO and GRPO, one trainer whose algorithm is a setting (`rlhfkit ppo`,
`rlhfkit rloo`, `rlhfkit grpo`). core.py holds the math (masked statistics, KL estimators and controllers, GAE
and the critic-free advantages; the losses are in rlhfkit.losses), networks.py builds the policy, the critic and
the reference, trainer.py runs the phases of each iteration on the run skeleton (rlhfkit.runs); the settings are
rlhfkit.config.PPOConfig."""

from rlhfkit.online.trainer import NonFiniteError, PPOResult, train_ppo

__all__ = ["NonFiniteError", "PPOResult", "train_ppo"]
