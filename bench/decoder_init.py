"""Where one way of starting a dictionary overtakes another (the measurements behind
`decoder_init auto` and `encoder_init auto`: train/trainer.py's start_decoder and fits_encoder).

--part decoder (the default): MLP transcoders with random unit decoder rows against a zero
decoder (docs/transcoders.md). --part encoder: SAEs on the residual stream whose encoder starts
as the decoder's transpose (tied) against that transpose scaled to fit the first batch (fitted;
docs/training.md). For each run length it trains the two starts of one sparsity rule in one sweep,
on the same batches and with the library's defaults otherwise (learning rate and warm-up from the
run's length), and scores both on held-out plays: explained variance, L0 and dead share. The
crossing point is the shortest run from which the second start scores at least as well at every
longer length measured. Writes bench/results/<part>-init-<device>.json.

    python bench/decoder_init.py --architectures topk batchtopk --steps 25 50 100 200 400
    python bench/decoder_init.py --part encoder --steps 24 97 354
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from eval.demo import heldout_scores, train_and_heldout  # noqa: E402
from sae.environment import machine  # noqa: E402
from sae.models import REGISTRY  # noqa: E402
from train.cache import ActivationCache  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.schedule import default_lr  # noqa: E402
from train.trainer import Trainer  # noqa: E402

STARTS = {
    "decoder": ("decoder_init", ("random", "zero")),  # a transcoder's decoder
    "encoder": ("encoder_init", ("tied", "fitted")),  # an SAE's encoder scale
}
"""Per part: the setting compared, and its two values (the one to overtake first)."""


def layout(part: str, layer: int) -> tuple[dict[str, str], Path, int]:
    """The part's dictionaries' hookpoints, the bench cache that holds them, and the tokens it
    harvests: transcoders from the MLP's input to its output (the demo's 600k rows), or SAEs on
    the residual stream (lr_sweep's rows)."""
    if part == "decoder":
        hooks = {"hook": f"blocks.{layer}.mlp.hook_in", "hook_out": f"blocks.{layer}.hook_mlp_out"}
        return hooks, Path(f"runs/bench/layer{layer}-mlp"), 600_000
    return {"hook": f"blocks.{layer}.hook_resid_post"}, Path(f"runs/bench/layer{layer}"), 2_000_000


def run_length(args, architecture: str, steps: int, heldout: ActivationCache) -> list[dict]:
    """Both starts of one rule at each learning-rate multiple, trained together for `steps`
    steps (the same batches), each scored on held-out rows."""
    field, starts = STARTS[args.part]
    transcoder = "hook_out" in args.hooks
    shape = {"architecture": architecture, "k": args.k, "expansion_factor": args.expansion,
             "sparsity_coefficient": args.coefficient.get(architecture, 0.0), **args.hooks}  # fmt: skip
    rule = REGISTRY[architecture]
    width = args.expansion * args.d_in
    lr = default_lr(width, steps, rule.rate_factor(transcoder, width))
    runs = [(start, m) for m in args.multipliers for start in starts]
    sweep = [{**shape, field: start, "lr": lr * m, "name": f"{start}-x{m:g}"}
             for start, m in runs]  # fmt: skip
    cfg = TrainConfig(cache=args.cache, out=str(Path(args.out) / f"{architecture}-{steps}"),
                      total_tokens=steps * args.batch_size, batch_size=args.batch_size, sweep=sweep,
                      device=args.device, overwrite=True, seed=args.seed)  # fmt: skip
    start = time.perf_counter()
    dictionaries = Trainer(cfg, args.cache).run()
    seconds = time.perf_counter() - start
    rows = []
    for (name, m), dictionary in zip(runs, dictionaries, strict=True):
        row = {"architecture": architecture, "steps": steps, field: name,
               "multiplier": m, "lr": lr * m, **heldout_scores(dictionary, heldout),
               "train_seconds": seconds}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def crossing(rows: list[dict], part: str = "decoder") -> int | None:
    """The shortest run length from which the second start's explained variance is at least the
    first's at every longer length (rows of one rule and rate); None if it is not at the
    longest."""
    field, (first, second) = STARTS[part]
    by_steps: dict[int, dict[str, float]] = {}
    for r in rows:
        by_steps.setdefault(r["steps"], {})[r[field]] = r["explained_variance"]
    found = None
    for steps in sorted(by_steps, reverse=True):
        if by_steps[steps][second] < by_steps[steps][first]:
            break
        found = steps
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=sorted(STARTS), default="decoder",
                        help="decoder: a transcoder's, zero against random rows; encoder: an "
                        "SAE's scale, fitted against tied")  # fmt: skip
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--cache", help="training activations at the MLP's input and output "
                        "(--part encoder: the residual stream; default: the training plays, "
                        "harvested into runs/bench/layer6-mlp/cache or runs/bench/layer6/cache)")  # fmt: skip
    parser.add_argument("--heldout", help="held-out activations (default: the 4 held-out plays, "
                        "runs/bench/layer6-mlp/heldout or runs/bench/layer6/heldout)")  # fmt: skip
    parser.add_argument("--architectures", nargs="+", default=["topk", "batchtopk"])
    parser.add_argument("--steps", nargs="+", type=int, default=[25, 50, 100, 200, 400])
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--multipliers", nargs="+", type=float, default=[1.0],
                        help="learning rates as multiples of the default rule's")  # fmt: skip
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--coefficient", nargs="*", default=[],
                        help="architecture=sparsity_coefficient, for the penalty rules")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    parser.add_argument("--results", default="")
    args = parser.parse_args()
    args.out = args.out or f"runs/{args.part}-init"
    args.hooks, folder, tokens = layout(args.part, args.layer)
    if not (args.cache and args.heldout):
        caches = train_and_heldout(folder, list(args.hooks.values()), tokens, 40_000)
        args.cache, args.heldout = (c.url for c in caches)
    args.coefficient = {a: float(c) for a, _, c in (s.partition("=") for s in args.coefficient)}
    heldout = ActivationCache(args.heldout)
    args.d_in = heldout.d_in(args.hooks["hook"])
    rows, crossings = [], {}
    for architecture in args.architectures:
        runs = [r for steps in args.steps for r in run_length(args, architecture, steps, heldout)]
        for m in args.multipliers:
            crossings[f"{architecture} x{m:g}"] = crossing(
                [r for r in runs if r["multiplier"] == m], args.part
            )
        rows += runs
    _, (first, second) = STARTS[args.part]
    print(f"{'rule':10s} {'steps':>5s} {'lr':>5s}  EV {first} / {second}   "
          f"dead {first} / {second}   L0 {first} / {second}")  # fmt: skip
    for one, two in zip(rows[::2], rows[1::2], strict=True):
        print(f"{one['architecture']:10s} {one['steps']:5d} x{one['multiplier']:<4g}  "
              f"{one['explained_variance']:.3f} / {two['explained_variance']:.3f}      "
              f"{one['dead_fraction']:5.1%} / {two['dead_fraction']:5.1%}      "
              f"{one['l0']:5.1f} / {two['l0']:5.1f}")  # fmt: skip
    print(f"{second} start at least as good from (steps): {crossings}")
    device = torch.device(args.device)
    results = Path(
        args.results or Path(__file__).parent / "results" / f"{args.part}-init-{device.type}.json"
    )
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"benchmark": "decoder_init", "part": args.part,
                                   "machine": machine(), "layer": args.layer, "k": args.k,
                                   "expansion": args.expansion, "batch_size": args.batch_size,
                                   "crossing_steps": crossings, "runs": rows},
                                  indent=1))  # fmt: skip
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
