"""Evaluation: sampled answers scored and compared with confidence intervals, simulated annotators, HTML report."""

from rlhfkit.evaluation.evaluate import EvalResult, evaluate
from rlhfkit.evaluation.simulate import simulate

__all__ = ["EvalResult", "evaluate", "simulate"]
