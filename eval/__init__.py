"""Scoring dictionaries: reconstruction, spliced-in loss, sparsity and monosemanticity."""

from eval.report import evaluate

__all__ = ["evaluate"]
