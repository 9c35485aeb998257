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
import math
import sys
import time
from itertools import pairwise, product
from pathlib import Path

import torch

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from eval.demo import DemoConfig, heldout_scores, train_and_heldout  # noqa: E402
from sae.environment import machine  # noqa: E402
from sae.models import REGISTRY  # noqa: E402
from train.cache import ActivationCache  # noqa: E402
from train.config import DECODER_INITS, ENCODER_INITS, TrainConfig  # noqa: E402
from train.schedule import default_lr  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def sweep_point(args, architecture: str, budget: int, widths: list[int], heldout) -> list[dict]:
    """Train every width x multiplier (x coefficient, for a penalty rule swept at several) of one
    architecture and budget together; score each."""
    steps = budget // args.batch_size
    rule = REGISTRY[architecture]
    swept = args.coefficient.get(architecture)
    hooks = {"hook": args.hook, "hook_out": args.hook_out} if args.hook_out else {}
    starts = {"encoder_init": args.encoder_init, "decoder_init": args.decoder_init}
    starts |= {"target_l0": True} if args.target_l0 else {}
    starts |= {"pre_act_coefficient": args.pre_act} if args.pre_act is not None else {}
    sweep, rows = [], []
    for width, multiplier in product(widths, args.multipliers):
        # 0: the trainer's weight for the run (Trainer.coefficient), recorded once it is built
        for coefficient in swept or [0.0]:
            lr = default_lr(width, steps, rule.rate_factor(bool(args.hook_out), width)) * multiplier
            name = f"{architecture}-{width}-x{multiplier:g}" + (
                f"-c{coefficient:g}" if swept and len(swept) > 1 else ""
            )
            sweep.append({"architecture": architecture, "d_sae": width, "k": args.k, "lr": lr,
                          "sparsity_coefficient": coefficient, **hooks, **starts, "name": name})  # fmt: skip
            rows.append({"architecture": architecture, "d_sae": width, "tokens": budget,
                         "steps": steps, "multiplier": multiplier, "lr": lr, **hooks, **starts})  # fmt: skip
    cfg = TrainConfig(cache=args.cache, out=str(Path(args.out) / f"{architecture}-{budget}"),
                      total_tokens=budget, batch_size=args.batch_size, sweep=sweep, device=args.device,
                      overwrite=True, seed=args.seed)  # fmt: skip
    start = time.perf_counter()
    trainer = Trainer(cfg, args.cache)
    saes = trainer.run()
    seconds = time.perf_counter() - start
    for row, m, sae in zip(rows, trainer.members, saes, strict=True):
        row["sparsity_coefficient"] = trainer.coefficient(m)
        row.update(heldout_scores(sae, heldout), train_seconds=seconds)
        print(json.dumps(row), flush=True)
    return rows


L0_TOLERANCE = 1.1
"""Under a penalty rule a run counts at the matched L0 by its own explained variance only if its
L0 is at most this times that L0: the rate moves L0 too, and a denser code explains more without
being a better fit."""


def at_l0(runs: list[dict], l0: float) -> float | None:
    """A penalty rule's explained variance at L0 `l0` from runs at one rate and several
    coefficients: interpolated in log L0 between the two runs around it, or that of a run at
    most L0_TOLERANCE times as dense if one explains more (a sparser code that explains more is
    better outright); None when no run reaches that far."""
    found = [r["explained_variance"] for r in runs if r["l0"] <= L0_TOLERANCE * l0]
    curve = sorted((r["l0"], r["explained_variance"]) for r in runs)
    for (l0_a, ev_a), (l0_b, ev_b) in pairwise(curve):
        if l0_a <= l0 <= l0_b and l0_a < l0_b:
            t = math.log(l0 / l0_a) / math.log(l0_b / l0_a)
            found.append(ev_a + t * (ev_b - ev_a))
    return max(found, default=None)


def summarise(rows: list[dict], l0: float | None = None) -> list[dict]:
    """Per point: the best multiplier's explained variance against the default's (multiplier 1,
    at the first coefficient swept). Rules with k compare runs directly; penalty rules compare each
    rate's explained variance at one L0 (`l0`, else the default run's) through `at_l0`, so that
    several coefficients per rate give a comparison at matched L0."""
    points: dict[tuple, list[dict]] = {}
    for row in rows:
        points.setdefault((row["architecture"], row["d_sae"], row["tokens"]), []).append(row)
    table = []
    for (architecture, width, tokens), group in sorted(points.items()):
        default = next((r for r in group if r["multiplier"] == 1), None)
        rates: dict[float, list[dict]] = {}
        for r in group:
            rates.setdefault(r["multiplier"], []).append(r)
        # k fixes L0, so every run counts; a penalty rule's rates are judged at one L0
        matched = None if REGISTRY[architecture].uses_k else l0 or (default and default["l0"])
        score = {
            m: at_l0(rs, matched) if matched else max(r["explained_variance"] for r in rs)
            for m, rs in rates.items()
        }
        best = max((m for m in score if score[m] is not None), key=score.get, default=None)
        default_ev = score.get(1.0)
        table.append({
            "architecture": architecture, "d_sae": width, "tokens": tokens, "steps": group[0]["steps"],
            "matched_l0": matched, "best_multiplier": best, "best_lr": best and rates[best][0]["lr"],
            "best_explained_variance": score.get(best),
            "best_at_edge": best in (min(rates), max(rates)),
            "default_lr": default and default["lr"],
            "default_explained_variance": default_ev,
            "shortfall": None if default_ev is None else score[best] - default_ev,
            "default_l0": default and default["l0"],
            "explained_variance_by_multiplier": score,
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
    parser.add_argument("--decoder-init", default="auto", choices=DECODER_INITS,
                        help="every dictionary's decoder start (train/config.py)")  # fmt: skip
    parser.add_argument("--coefficient", nargs="*", default=[],
                        help="architecture=C[,C...]: a penalty rule's sparsity coefficient, or several "
                        "(each rate trained at each; the first is the default's)")  # fmt: skip
    parser.add_argument("--target-l0", action="store_true", help="train JumpReLU with its "
                        "penalty on L0's distance from k (SAESpec.target_l0)")  # fmt: skip
    parser.add_argument("--pre-act", type=float, help="train JumpReLU with the pre-activation "
                        "loss at this weight (SAESpec.pre_act_coefficient; 0: off; default: the "
                        "rule's)")  # fmt: skip
    parser.add_argument("--l0", type=float, help="judge penalty rules at this L0 (default: the "
                        "default run's); with several coefficients each rate is interpolated to it")  # fmt: skip
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
    args.coefficient = {
        a: [float(c) for c in cs.split(",")]
        for a, _, cs in (s.partition("=") for s in args.coefficient)
    }
    heldout = ActivationCache(args.heldout)
    rows = []
    for architecture in args.architectures:
        for budget in args.budgets:
            rows += sweep_point(args, architecture, budget, args.widths, heldout)
    table = summarise(rows, args.l0)
    for t in table:
        default = (  # a sweep without multiplier 1 (or none reaching the L0) has no default
            f"default {t['default_lr']:.2e} EV {t['default_explained_variance']:.3f}  "
            f"shortfall {t['shortfall']:+.3f}"
            if t["shortfall"] is not None
            else "no default run to compare"
        )
        matched = f" at L0 {t['matched_l0']:.1f}" if t["matched_l0"] else ""
        best = (
            f"best lr {t['best_lr']:.2e} EV {t['best_explained_variance']:.3f}"
            f"{' (edge)' if t['best_at_edge'] else ''}"
            if t["best_lr"]
            else "no rate reaches that L0"
        )
        print(
            f"{t['architecture']:10s} d_sae {t['d_sae']:6d} {t['tokens']:>9,} tok{matched}  {best}  {default}"
        )
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
