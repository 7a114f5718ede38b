"""rlhfkit: Reinforcement Learning from Human Feedback for language models, end to end."""

__version__ = "0.1.0"
