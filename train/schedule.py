"""The learning rate and its schedule, chosen from the run's length when not given.

Gao et al.'s rule (2e-4 / sqrt(d_sae / 2^14)) and a fixed warm-up of 100 steps are tuned for runs of
tens of thousands of steps. Users run short budgets constantly (sweeps, pilots, the CPU demo), where
that rate is ten times too small and the warm-up eats most of the run. So the default rate grows as
the run gets shorter, by a rule measured on SmolLM2 activations (bench/lr_sweep.py; the table is in
docs/training.md), and the warm-up is a share of the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from sae.models import SAE

LONG_RUN_STEPS = 14_600
"""Steps from which Gao et al.'s width rule holds unchanged; shorter runs take a larger rate."""
SHORT_RUN_EXPONENT = 0.5
"""How fast the rate grows as the run shortens: lr ∝ (LONG_RUN_STEPS / steps) ** SHORT_RUN_EXPONENT."""
WARMUP_FRACTION = 0.05
MAX_WARMUP_STEPS = 1000


def default_lr(d_sae: int, steps: int, factor: float = 1.0) -> float:
    """Adam's rate for a dictionary of d_sae latents trained for `steps` steps; `factor` is the
    architecture's own multiplier (SAE.lr_factor)."""
    width = 2e-4 / math.sqrt(d_sae / 2**14)
    length = max(1.0, LONG_RUN_STEPS / max(1, steps)) ** SHORT_RUN_EXPONENT
    return factor * width * length


def param_groups(dictionary: nn.Module, lr: float) -> list[dict[str, Any]]:
    """Adam's parameter groups: every parameter at `lr`, except those an architecture trains
    faster (SAE.lr_scales: JumpReLU's thresholds), each SAE part of a layered dictionary included."""
    scaled = {
        id(getattr(part, name)): scale
        for part in dictionary.modules()
        if isinstance(part, SAE)
        for name, scale in part.lr_scales().items()
    }
    groups: dict[float, list[nn.Parameter]] = {1.0: []}  # first: the rate that is logged
    for p in dictionary.parameters():
        groups.setdefault(scaled.get(id(p), 1.0), []).append(p)
    return [{"params": ps, "lr": lr * scale} for scale, ps in groups.items() if ps]


def default_warmup(steps: int) -> int:
    """Linear warm-up over 5% of the run, at least one step and at most 1000."""
    return max(1, min(MAX_WARMUP_STEPS, round(WARMUP_FRACTION * steps)))


def lr_lambda(warmup_steps: int, decay_fraction: float, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, constant, then linear decay to zero over the last decay_fraction."""
    decay_start = total_steps * (1 - decay_fraction)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, warmup_steps))
        decay = (
            1.0
            if step < decay_start
            else max(0.0, (total_steps - step) / max(1.0, total_steps - decay_start))
        )
        return warm * decay

    return factor
