"""Scoring dictionaries: reconstruction, spliced-in loss, sparsity and monosemanticity."""
