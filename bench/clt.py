"""A cross-layer transcoder over all 30 SmolLM2 layers against 30 per-layer transcoders of the same
rule and width, trained in one sweep straight from the model (no cache of 60 hookpoints: each
batch is forwarded, used and dropped), then both scored as the replacement model (every MLP
output replaced at once) on held-out plays.

Prints, and writes to bench/results/clt-<device>.json (--device: cpu, or cuda when there is one;
`--tokens 2000000` is the demo's budget): the stream's rows/s alone (the bare forward
passes that harvest the 60 hookpoints) and with the sweep training on it, each dictionary's
training-step time (measured after training, on one batch), the process's peak memory, and for both dictionaries the replacement model's
CE loss recovered, KL score, pooled output explained variance and L0; ratios CLT / set.

With --multipliers it sweeps the CLT's own learning rate instead (no set): CLTs at those multiples
of the rule's default rate for a CLT (train/schedule.py, LayeredDictionary.rate_factor) with the
default warm-up, from each of --decoder-inits (auto, random, zero) and
each of --encoder-inits (auto, tied, fitted) and, for a penalty rule, at each of
--coefficients (default: the rule's weight for a CLT) and under each of --penalties (a JumpReLU
CLT's L0 penalty, its distance from k: --target-l0, or auto: the CLT's) and each of --pre-acts (the weight of
Anthropic's pre-activation loss, --pre-act-coefficient; 0: off; default: the rule's); each
scored as above, into clt-rates-<device>.json (--name: another name).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from itertools import product
from pathlib import Path

import torch

# this file's folder holds bench/train.py: keep it from shadowing the `train` package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from eval.replacement import replacement_report  # noqa: E402
from eval.report import EvalConfig, dataset_windows, take_tokens  # noqa: E402
from sae.clt import CrossLayerTranscoder  # noqa: E402
from sae.environment import machine  # noqa: E402
from sae.lm import load_lm  # noqa: E402
from train.config import DECODER_INITS, HarvestConfig, TrainConfig  # noqa: E402
from train.harvest import Harvester  # noqa: E402
from train.schedule import default_lr  # noqa: E402
from train.trainer import Trainer  # noqa: E402

LAYERS = 30
CLT = {"layers": f"0-{LAYERS - 1}", "hook": "mlp.hook_in", "hook_out": "hook_mlp_out"}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_device_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def step_time(trainer: Trainer, batch: dict, members: list, repeat: int = 3) -> float:
    """Seconds per optimizer step of `members` alone on `batch` (after training: it moves them)."""
    everyone, trainer.members = trainer.members, members
    trainer.train_step(batch).read()  # warm-up (CUDA: kernels, allocator)
    start = time.perf_counter()
    for _ in range(repeat):
        trainer.train_step(batch).read()
    trainer.members = everyone
    return (time.perf_counter() - start) / repeat


SCORES = ("ce_loss_recovered", "kl_score", "explained_variance", "l0", "dead_fraction", "ce_clean",
          "ce_replacement", "ce_replacement_with_errors", "ce_zero_ablation")  # fmt: skip


def score(dictionaries: dict, args) -> tuple[dict[str, dict], int]:
    """Each dictionary (or set of them) as the replacement model on held-out plays; and the
    number of tokens scored."""
    lm, tokenizer = load_lm("smollm2-135m", device=args.device)
    windows = dataset_windows(tokenizer, EvalConfig(sae="", context_size=args.context_size))
    ids = take_tokens(windows, args.eval_tokens, args.context_size, "test")
    scores = {}
    for name, d in dictionaries.items():
        r = replacement_report(d, lm, ids, device=args.device)
        scores[name] = s = {k: r[k] for k in SCORES}
        print(f"{name:12s} CE loss recovered {s['ce_loss_recovered']:.3f} | KL score {s['kl_score']:.3f} | "
              f"explained variance {s['explained_variance']:.3f} | L0 {s['l0']:.0f} | dead "
              f"{s['dead_fraction']:.1%}", flush=True)  # fmt: skip
    return scores, ids[:, 1:].numel()


def against_set(args, stream: HarvestConfig, shape: dict, out: Path) -> dict:
    """The CLT and 30 per-layer transcoders at one hand-set rate; scores, step times, ratios."""
    sweep = [{**shape, **CLT, "name": "clt"}]
    sweep += [{**shape, "hook": f"blocks.{i}.mlp.hook_in",
               "hook_out": f"blocks.{i}.hook_mlp_out", "name": f"set/layer_{i}"}
              for i in range(LAYERS)]  # fmt: skip
    cfg = TrainConfig(out=str(out), total_tokens=args.tokens, batch_size=args.batch_size,
                      lr=4e-3, warmup_steps=10, sweep=sweep, device=args.device)  # fmt: skip
    trainer = Trainer(cfg, stream)
    (clt, *transcoders), train_s = trained(trainer, args)
    scores, eval_tokens = score({"clt": clt, "set": transcoders}, args)
    batch = next(Harvester(stream).stream(args.batch_size))
    step_s = {"clt": step_time(trainer, batch, trainer.members[:1]),
              "set": step_time(trainer, batch, trainer.members[1:])}  # fmt: skip
    print(f"one training step: CLT {step_s['clt']:.3f} s, 30 transcoders {step_s['set']:.3f} s")
    ratios = {
        k: scores["clt"][k] / scores["set"][k] for k in ("ce_loss_recovered", "explained_variance")
    }
    ratios["step_time"] = step_s["clt"] / step_s["set"]
    print(f"CLT / set: CE loss recovered {ratios['ce_loss_recovered']:.3f}x, explained variance "
          f"{ratios['explained_variance']:.3f}x, step time {ratios['step_time']:.2f}x")  # fmt: skip
    return {"step_s": step_s, "scores": scores, "clt_over_set": ratios, "steps": trainer.step,
            "train_s": train_s, "eval_tokens": eval_tokens}  # fmt: skip


RECORDED = ("lr", "decoder_init", "encoder_init", "pre_act_coefficient")
"""Each swept CLT's settings, stored beside its scores (and the weight and penalty it trained at)."""


def rates(args, stream: HarvestConfig, shape: dict, out: Path) -> dict:
    """CLTs at multiples of their default rate, from each start and at each weight; scores."""
    steps = args.tokens // args.batch_size
    default = default_lr(args.d_sae, steps, CrossLayerTranscoder.rate_factor(True, args.d_sae))
    weights = args.coefficients or [0.0]  # 0: the rule's default for a CLT
    sweep = []
    for m, start, decoder, c, penalty, pull in product(
        args.multipliers, args.encoder_inits, args.decoder_inits, weights, args.penalties,
        args.pre_acts,
    ):  # fmt: skip
        name = f"clt-x{m:g}" + "".join(f"-{v}" for v in (start, decoder, penalty) if v != "auto")
        name += (f"-c{c:g}" if c else "") + (f"-preact{pull:g}" if pull >= 0 else "")
        sweep.append({**shape, **CLT, "lr": default * m, "decoder_init": decoder,
                      "encoder_init": start, "sparsity_coefficient": c,
                      "target_l0": None if penalty == "auto" else penalty == "target",
                      "pre_act_coefficient": pull, "name": name})  # fmt: skip
    cfg = TrainConfig(out=str(out), total_tokens=args.tokens, batch_size=args.batch_size,
                      sweep=sweep, device=args.device)  # fmt: skip
    trainer = Trainer(cfg, stream)
    clts, train_s = trained(trainer, args)
    applied = {  # a weight of 0 and an unset penalty resolved
        m.name: {"sparsity_coefficient": trainer.coefficient(m), "target_l0": trainer.target_l0(m)}
        for m in trainer.members
    }
    scores, eval_tokens = score({s["name"]: clt for s, clt in zip(sweep, clts, strict=True)}, args)
    for spec in sweep:
        scores[spec["name"]].update({k: spec[k] for k in RECORDED} | applied[spec["name"]])
    return {"default_lr": default, "multipliers": args.multipliers, "scores": scores,
            "steps": trainer.step, "train_s": train_s, "eval_tokens": eval_tokens}  # fmt: skip


def trained(trainer: Trainer, args) -> tuple[list, float]:
    """The sweep's dictionaries and the seconds it took, streaming included."""
    start = time.perf_counter()
    dictionaries = trainer.run()
    seconds = time.perf_counter() - start
    print(f"sweep: {args.tokens / seconds:,.0f} rows/s with the stream, peak memory "
          f"{peak_rss_gb():.2f} GB", flush=True)  # fmt: skip
    return dictionaries, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=80_000, help="rows streamed and trained on")
    ap.add_argument("--eval-tokens", type=int, default=8_000)
    ap.add_argument("--d-sae", type=int, default=576, help="latents per layer (both)")
    ap.add_argument("--architecture", default="batchtopk", help="every layer's rule (both)")
    ap.add_argument("--k", type=int, default=16, help="the rule's k per layer")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument(
        "--context-size", type=int, default=128, help="tokens a window, streamed and scored"
    )
    ap.add_argument("--multipliers", nargs="+", type=float,
                    help="sweep the CLT's rate at these multiples of its default (no set)")  # fmt: skip
    ap.add_argument("--encoder-inits", nargs="+", default=["auto"],
                    help="with --multipliers: a CLT from each encoder start (auto, tied, fitted)")  # fmt: skip
    ap.add_argument("--coefficients", nargs="+", type=float,
                    help="with --multipliers: a penalty rule's CLT at each of these weights")  # fmt: skip
    ap.add_argument("--penalties", nargs="+", default=["auto"], choices=["auto", "l0", "target"],
                    help="with --multipliers: a JumpReLU CLT under each penalty (l0: the L0; "
                    "target: its distance from k, --target-l0; auto: the CLT's default)")  # fmt: skip
    ap.add_argument("--pre-acts", nargs="+", type=float, default=[-1.0],
                    help="with --multipliers: a JumpReLU CLT at each weight of the "
                    "pre-activation loss (--pre-act-coefficient; 0: off; below 0: the rule's)")  # fmt: skip
    ap.add_argument("--decoder-inits", nargs="+", default=["auto"], choices=DECODER_INITS,
                    help="with --multipliers: a CLT from each decoder start")  # fmt: skip
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", help="the result file's name before -<device>.json")
    args = ap.parse_args()
    hooks = [
        f"blocks.{i}.{kind}" for i in range(LAYERS) for kind in ("mlp.hook_in", "hook_mlp_out")
    ]
    # the stream forwards windows a shuffled block at a time (shard_windows of them at most): a
    # short run's block holds no more windows than it trains on
    windows = 8 * min(32, -(-args.tokens // (8 * (args.context_size - 1))))
    stream = HarvestConfig(hook=hooks, context_size=args.context_size, batch_size=8,
                           shard_windows=windows, device=args.device)  # fmt: skip

    start = time.perf_counter()  # the bare stream: forwards and hookpoint copies, nothing trained
    rows = 0
    for chunk in Harvester(stream).stream(args.batch_size):
        if (rows := rows + len(chunk[hooks[0]])) >= args.tokens:
            break
    stream_rows_s = rows / (time.perf_counter() - start)
    print(f"stream alone: {stream_rows_s:,.0f} rows/s (60 hookpoints, {rows:,} rows)", flush=True)

    shape = {"architecture": args.architecture, "k": args.k, "d_sae": args.d_sae}
    scratch = Path(tempfile.mkdtemp())
    mode = rates if args.multipliers else against_set
    found = mode(args, stream, shape, scratch / "train")
    shutil.rmtree(scratch, ignore_errors=True)
    sweep_rows_s = args.tokens / found.pop("train_s")
    print(f"stream with training / alone {sweep_rows_s / stream_rows_s:.2f}x; peak "
          f"memory {peak_rss_gb():.2f} GB")  # fmt: skip
    result = {
        "layers": LAYERS, "tokens": args.tokens, "d_sae_per_layer": args.d_sae,
        "architecture": args.architecture, "k_per_layer": args.k, "batch_size": args.batch_size,
        "context_size": args.context_size,
        "stream_rows_per_s": stream_rows_s, "sweep_rows_per_s": sweep_rows_s,
        "peak_rss_gb": peak_rss_gb(), "device": args.device,
        "peak_device_gb": peak_device_gb(args.device), **found,
        "machine": machine(),
    }  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = args.name or ("clt-rates" if args.multipliers else "clt")
    path = Path(args.out) / f"{name}-{torch.device(args.device).type}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
