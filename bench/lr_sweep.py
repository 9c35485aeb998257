"""The learning-rate sweep behind the budget-aware defaults (train/schedule.py, docs/training.md).

At each point (architecture, width, budget) it trains the default learning rate and multiples of
it on the same cached rows, in one sweep per (architecture, budget) so that every member sees the
same batches, and scores each on held-out activations. It reports the best learning rate found,
its held-out explained variance, and the default's shortfall from it (target: under 0.01).
With --hook and --hook-out it sweeps transcoders (scored on the output hookpoint) instead of SAEs.
Writes bench/results/lr-sweep-<device>.json.

    python bench/lr_sweep.py --cache runs/sweep/cache --heldout runs/sweep/heldout \
        --widths 2304 4608 9216 --budgets 100000 400000 1600000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from eval.demo import DemoConfig, heldout_scores, train_and_heldout  # noqa: E402
from sae.environment import machine  # noqa: E402
from sae.models import REGISTRY  # noqa: E402
from train.cache import ActivationCache  # noqa: E402
from train.config import ENCODER_INITS, TrainConfig  # noqa: E402
from train.schedule import default_lr  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def sweep_point(args, architecture: str, budget: int, widths: list[int], heldout) -> list[dict]:
    """Train every width x multiplier of one architecture and budget together; score each."""
    steps = budget // args.batch_size
    rule = REGISTRY[architecture]
    coefficient = args.coefficient.get(architecture, rule.sparsity_coefficient)  # 0: no penalty
    hooks = {"hook": args.hook, "hook_out": args.hook_out} if args.hook_out else {}
    encoder = {"encoder_init": args.encoder_init}
    sweep, rows = [], []
    for width in widths:
        for multiplier in args.multipliers:
            lr = (
                default_lr(width, steps, rule.rate_factor(transcoder=bool(args.hook_out)))
                * multiplier
            )
            sweep.append({"architecture": architecture, "d_sae": width, "k": args.k, "lr": lr,
                          "sparsity_coefficient": coefficient, **hooks, **encoder,
                          "name": f"{architecture}-{width}-x{multiplier:g}"})  # fmt: skip
            rows.append({"architecture": architecture, "d_sae": width, "tokens": budget,
                         "steps": steps, "multiplier": multiplier, "lr": lr,
                         "sparsity_coefficient": coefficient, **hooks, **encoder})  # fmt: skip
    cfg = TrainConfig(cache=args.cache, out=str(Path(args.out) / f"{architecture}-{budget}"),
                      total_tokens=budget, batch_size=args.batch_size, sweep=sweep, device=args.device,
                      overwrite=True, seed=args.seed)  # fmt: skip
    start = time.perf_counter()
    saes = Trainer(cfg, args.cache).run()
    seconds = time.perf_counter() - start
    for row, sae in zip(rows, saes, strict=True):
        row.update(heldout_scores(sae, heldout), train_seconds=seconds)
        print(json.dumps(row), flush=True)
    return rows


L0_TOLERANCE = 1.1
"""Under a penalty rule a learning rate counts as better only at an L0 at most this times the
default's: the rate moves L0 too, and a denser code explains more without being a better fit."""


def rivals(group: list[dict], default: dict | None) -> list[dict]:
    """The runs the default is measured against: all of them for rules with k (equal L0); for
    penalty rules (ReLU-L1, JumpReLU, Gated) those at matched or lower L0."""
    if default is None or REGISTRY[default["architecture"]].uses_k:
        return group
    return [r for r in group if r["l0"] <= L0_TOLERANCE * default["l0"]]


def summarise(rows: list[dict]) -> list[dict]:
    """Per point: the best multiplier's explained variance against the default's (multiplier 1)."""
    points: dict[tuple, list[dict]] = {}
    for row in rows:
        points.setdefault((row["architecture"], row["d_sae"], row["tokens"]), []).append(row)
    table = []
    for (architecture, width, tokens), group in sorted(points.items()):
        default = next((r for r in group if r["multiplier"] == 1), None)
        best = max(rivals(group, default), key=lambda r: r["explained_variance"])
        table.append({
            "architecture": architecture, "d_sae": width, "tokens": tokens, "steps": group[0]["steps"],
            "best_lr": best["lr"], "best_explained_variance": best["explained_variance"],
            "best_at_edge": best["multiplier"] in (min(r["multiplier"] for r in group),
                                                   max(r["multiplier"] for r in group)),
            "default_lr": default and default["lr"],
            "default_explained_variance": default and default["explained_variance"],
            "shortfall": default and best["explained_variance"] - default["explained_variance"],
            "default_l0": default and default["l0"],
            "best_l0": best["l0"],
        })  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="training activations (default: SmolLM2 layer 6 on the "
                        "training plays, harvested into runs/bench/layer6/cache on first use)")  # fmt: skip
    parser.add_argument("--heldout", help="held-out activations (default: the 4 held-out plays, "
                        "runs/bench/layer6/heldout)")  # fmt: skip
    parser.add_argument("--hook", help="the input hookpoint of a transcoder sweep")
    parser.add_argument("--hook-out", help="sweep transcoders from --hook to this hookpoint "
                        "(a cache holding both) instead of SAEs")  # fmt: skip
    parser.add_argument("--architectures", nargs="+", default=["topk"])
    parser.add_argument("--widths", nargs="+", type=int, default=[2304, 4608, 9216])
    parser.add_argument("--budgets", nargs="+", type=int, default=[100_000, 400_000, 1_600_000])
    parser.add_argument("--multipliers", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--encoder-init", default="auto", choices=ENCODER_INITS,
                        help="every dictionary's encoder start (train/config.py)")  # fmt: skip
    parser.add_argument("--coefficient", nargs="*", default=[],
                        help="architecture=sparsity_coefficient, for rules without k (matched L0)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/lr-sweep")
    parser.add_argument("--results", default="")
    args = parser.parse_args()
    if bool(args.hook) != bool(args.hook_out):
        parser.error("--hook and --hook-out go together: a transcoder sweep names both")
    if args.hook_out and not (args.cache and args.heldout):
        parser.error("a transcoder sweep needs --cache and --heldout holding both hookpoints")
    if not (args.cache and args.heldout):
        caches = train_and_heldout(Path("runs/bench/layer6"), [DemoConfig.hook], 2_000_000, 40_000)
        args.cache, args.heldout = (c.url for c in caches)
    args.coefficient = {a: float(c) for a, _, c in (s.partition("=") for s in args.coefficient)}
    heldout = ActivationCache(args.heldout)
    rows = []
    for architecture in args.architectures:
        for budget in args.budgets:
            rows += sweep_point(args, architecture, budget, args.widths, heldout)
    table = summarise(rows)
    for t in table:
        default = (  # a sweep without multiplier 1 has no default to compare
            f"default {t['default_lr']:.2e} EV {t['default_explained_variance']:.3f}  "
            f"shortfall {t['shortfall']:+.3f}"
            if t["default_lr"]
            else "no default run"
        )
        print(f"{t['architecture']:10s} d_sae {t['d_sae']:6d} {t['tokens']:>9,} tok  best lr {t['best_lr']:.2e} "
              f"EV {t['best_explained_variance']:.3f}{' (edge)' if t['best_at_edge'] else ''}  {default}")  # fmt: skip
    device = torch.device(args.device)
    results = Path(
        args.results or Path(__file__).parent / "results" / f"lr-sweep-{device.type}.json"
    )
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"benchmark": "lr_sweep", "machine": machine(), "k": args.k,
                                   "batch_size": args.batch_size, "points": table, "runs": rows},
                                  indent=1))  # fmt: skip
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
