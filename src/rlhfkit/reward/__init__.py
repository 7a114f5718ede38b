"""Reward models trained on human preferences, classifier and function rewards, and their composition."""

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
