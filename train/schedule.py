"""The learning rate and its schedule, chosen from the run's length when not given.

Gao et al.'s rule (2e-4 / sqrt(d_sae / 2^14)) and a fixed warm-up of 100 steps are tuned for runs of
tens of thousands of steps. Users run short budgets constantly (sweeps, pilots, the CPU demo),
where that rate is ten times too small and the warm-up eats most of the run. So the default rate is
a power law in the run's length and width, fitted to a sweep on SmolLM2 activations
(bench/lr_sweep.py; the table is in docs/training.md), and the warm-up is a share of the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from sae.models import SAE

REFERENCE_LR = 4e-3
"""The default rate of a dictionary of REFERENCE_WIDTH latents trained for REFERENCE_STEPS steps."""
REFERENCE_WIDTH = 4096
REFERENCE_STEPS = 100
WIDTH_EXPONENT = 0.1
"""lr ∝ d_sae ** -WIDTH_EXPONENT: in runs of 24-2441 steps the best rate hardly falls with width
(Gao et al.'s 1/sqrt(d_sae) holds for their long runs; here it starved 32k latents)."""
STEPS_EXPONENT = 0.25
"""lr ∝ steps ** -STEPS_EXPONENT: half the rate for a run 16 times longer."""
WARMUP_FRACTION = 0.05
MIN_WARMUP_STEPS = 5
"""Adam's first steps move every weight by about the rate whatever its gradient (its moments
start empty): in a 24-step run a one-step warm-up left a BatchTopK SAE 0.04 short of 0.7 times its
rate, and five steps made the default rate the best of 0.7x / 1x / 2x (docs/training.md)."""
MAX_WARMUP_STEPS = 1000


def default_lr(d_sae: int, steps: int, factor: float = 1.0) -> float:
    """Adam's rate for a dictionary of d_sae latents trained for `steps` steps; `factor` is the
    dictionary's own multiplier (SAE.rate_factor). Among the rates within 0.002 explained variance
    of the best one the sweep found, the fit follows the smallest: the larger ones kill latents."""
    width = (REFERENCE_WIDTH / d_sae) ** WIDTH_EXPONENT
    length = (REFERENCE_STEPS / max(1, steps)) ** STEPS_EXPONENT
    return factor * REFERENCE_LR * width * length


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
    """Linear warm-up over 5% of the run, at least 5 steps (a quarter of a run under 20 steps, at
    least one) and at most 1000."""
    floor = max(1, min(MIN_WARMUP_STEPS, steps // 4))
    return max(floor, min(MAX_WARMUP_STEPS, round(WARMUP_FRACTION * steps)))


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
