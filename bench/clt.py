"""A cross-layer transcoder over all 30 SmolLM2 layers against 30 per-layer transcoders of the same
rule and width, trained in one sweep straight from the model (no cache of 60 hookpoints: each
batch is forwarded, used and dropped), then both scored as the replacement model (every MLP
output replaced at once) on held-out plays.

Prints, and writes to bench/results/clt-<device>.json (--device: cpu, or cuda when there is one;
`--tokens 2000000` is the demo's budget): the stream's rows/s alone (the bare forward
passes that harvest the 60 hookpoints) and with the sweep training on it, each dictionary's
training-step time (measured after training, on one batch), the process's peak memory, and for both dictionaries the replacement model's
CE loss recovered, KL score, pooled output explained variance and L0; ratios CLT / set.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

# this file's folder holds bench/train.py: keep it from shadowing the `train` package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from eval.replacement import replacement_report  # noqa: E402
from eval.report import EvalConfig, dataset_windows, take_tokens  # noqa: E402
from sae.environment import machine  # noqa: E402
from sae.lm import load_lm  # noqa: E402
from train.config import HarvestConfig, TrainConfig  # noqa: E402
from train.harvest import Harvester  # noqa: E402
from train.trainer import Trainer  # noqa: E402

LAYERS = 30


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=80_000, help="rows streamed and trained on")
    ap.add_argument("--eval-tokens", type=int, default=8_000)
    ap.add_argument("--d-sae", type=int, default=576, help="latents per layer (both)")
    ap.add_argument("--k", type=int, default=16, help="batchtopk's average per layer")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    device = args.device
    hooks = [
        f"blocks.{i}.{kind}" for i in range(LAYERS) for kind in ("mlp.hook_in", "hook_mlp_out")
    ]
    stream = HarvestConfig(hook=hooks, context_size=128, batch_size=8, device=device)

    start = time.perf_counter()  # the bare stream: forwards and hookpoint copies, nothing trained
    rows = 0
    for chunk in Harvester(stream).stream(args.batch_size):
        if (rows := rows + len(chunk[hooks[0]])) >= args.tokens:
            break
    stream_rows_s = rows / (time.perf_counter() - start)
    print(f"stream alone: {stream_rows_s:,.0f} rows/s (60 hookpoints, {rows:,} rows)", flush=True)

    shape = {"architecture": "batchtopk", "k": args.k, "d_sae": args.d_sae}
    sweep = [{**shape, "layers": f"0-{LAYERS - 1}", "hook": "mlp.hook_in", "hook_out": "hook_mlp_out",
              "name": "clt"}]  # fmt: skip
    sweep += [{**shape, "hook": f"blocks.{i}.mlp.hook_in", "hook_out": f"blocks.{i}.hook_mlp_out",
               "name": f"set/layer_{i}"} for i in range(LAYERS)]  # fmt: skip
    scratch = Path(tempfile.mkdtemp())
    cfg = TrainConfig(out=str(scratch / "train"), total_tokens=args.tokens, batch_size=args.batch_size,
                      lr=4e-3, warmup_steps=10, sweep=sweep, device=device)  # fmt: skip
    trainer = Trainer(cfg, stream)
    start = time.perf_counter()
    clt, *transcoders = trainer.run()
    train_s = time.perf_counter() - start
    print(f"sweep: {args.tokens / train_s:,.0f} rows/s with the stream, peak memory "
          f"{peak_rss_gb():.2f} GB", flush=True)  # fmt: skip

    lm, tokenizer = load_lm("smollm2-135m", device=device)
    ids = take_tokens(dataset_windows(tokenizer, EvalConfig(sae="")), args.eval_tokens, 128, "test")
    scores = {}
    for name, d in (("clt", clt), ("set", transcoders)):
        r = replacement_report(d, lm, ids, device=device)
        scores[name] = {k: r[k] for k in ("ce_loss_recovered", "kl_score", "explained_variance", "l0",
                                          "dead_fraction", "ce_clean", "ce_replacement",
                                          "ce_replacement_with_errors", "ce_zero_ablation")}  # fmt: skip
        s = scores[name]
        print(f"{name:4s} CE loss recovered {s['ce_loss_recovered']:.3f} | KL score {s['kl_score']:.3f} | "
              f"explained variance {s['explained_variance']:.3f} | L0 {s['l0']:.0f} | dead "
              f"{s['dead_fraction']:.1%}", flush=True)  # fmt: skip
    batch = next(Harvester(stream).stream(args.batch_size))
    step_s = {"clt": step_time(trainer, batch, trainer.members[:1]),
              "set": step_time(trainer, batch, trainer.members[1:])}  # fmt: skip
    print(f"one training step: CLT {step_s['clt']:.3f} s, 30 transcoders {step_s['set']:.3f} s")
    shutil.rmtree(scratch, ignore_errors=True)
    ratios = {
        k: scores["clt"][k] / scores["set"][k] for k in ("ce_loss_recovered", "explained_variance")
    }
    ratios["step_time"] = step_s["clt"] / step_s["set"]
    print(f"CLT / set: CE loss recovered {ratios['ce_loss_recovered']:.3f}x, explained variance "
          f"{ratios['explained_variance']:.3f}x, step time {ratios['step_time']:.2f}x; stream with "
          f"training / alone {args.tokens / train_s / stream_rows_s:.2f}x; peak memory "
          f"{peak_rss_gb():.2f} GB")  # fmt: skip
    result = {
        "layers": LAYERS, "tokens": args.tokens, "eval_tokens": ids[:, 1:].numel(), "d_sae_per_layer": args.d_sae,
        "k_per_layer": args.k, "batch_size": args.batch_size, "steps": trainer.step,
        "stream_rows_per_s": stream_rows_s, "sweep_rows_per_s": args.tokens / train_s,
        "step_s": step_s, "peak_rss_gb": peak_rss_gb(), "device": device,
        "peak_device_gb": peak_device_gb(device),
        "scores": scores, "clt_over_set": ratios,
        "machine": machine(),
    }  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"clt-{torch.device(device).type}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
