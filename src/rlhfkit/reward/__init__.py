"""Reward models trained on human preferences, classifier and function rewards, the truth reward (`truth`), the gold
measures (`gold`) and refusal and relevance (`engagement`) as rewards, and their composition (`scorers`)."""

from rlhfkit.reward.model import RewardModel
from rlhfkit.reward.scorers import (
    ClassifierReward,
    FunctionReward,
    RewardModelReward,
    ToxicityScorer,
    WeightedSum,
    load_scorer,
)

__all__ = [
    "ClassifierReward",
    "FunctionReward",
    "RewardModel",
    "RewardModelReward",
    "ToxicityScorer",
    "WeightedSum",
    "load_scorer",
]
