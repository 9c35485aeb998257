"""MLP transcoder training speed: ours against EleutherAI sparsify's (`--transcode`), one step at a
time on the same rows.

sparsify has no activation cache and no trainer that takes rows, so its training step is run as
its Trainer runs it for a transcoder (sparsify/trainer.py 1.3.3: forward with the target, loss fvu
(its default auxk_alpha is 0), backward, its default optimizer (signum: schedule-free SignSGD)
stepped; with `transcode` it neither removes the gradient parallel to the decoder rows nor
renormalizes them, as our recipe does) on the batches ours trains on, ours timed twice: with its
defaults, and with AuxK off as sparsify's (--aux-coefficient 0; the run is 12 batches long, so its
dead window is one batch, dead_tokens' floor, and AuxK works on many latents within a few steps): TopK,
k 32, 8x, batch 4096 (--batch-size), SmolLM2 layer 6 (mlp.hook_in -> hook_mlp_out), fp32 (or both under bf16
autocast, `--autocast`), on CUDA when there is one. The three alternate batch by batch, so a drift
in the machine's speed falls on all; the median step time of each gives rows/s. sparsify is taken
from the environment when it is there, else from requirements/sparsify.txt, installed without its
dependencies into .venv/sparsify. On CPU, SPARSIFY_DISABLE_TRITON=1: with triton installed it picks
its Triton decoder even for CPU tensors; on CUDA it keeps that decoder, its fast path. Writes
bench/results/transcoder-speed-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from itertools import islice
from pathlib import Path

import torch

# this file's folder holds bench/train.py: keep it from shadowing the `train` package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from sae.environment import machine  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.harvest import harvest  # noqa: E402
from train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPARSIFY = ROOT / ".venv" / "sparsify"


def sparsify_module(device: str):
    """sparsify: the environment's, else installed into .venv/sparsify on first use."""
    if device == "cpu":
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    with suppress(ImportError):
        import sparsify

        return sparsify
    if not (SPARSIFY / "sparsify").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--require-hashes",
                        "--target", str(SPARSIFY), "-r", str(ROOT / "requirements" / "sparsify.txt")],
                       check=True)  # fmt: skip
    sys.path.insert(0, str(SPARSIFY))
    import sparsify

    return sparsify


def sparsify_step(sparsify, device: str, autocast: bool):
    """One training step of sparsify's transcoder as its Trainer takes it, as a function of a batch."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify.sign_sgd import SignSGD

    cfg = sparsify.SparseCoderConfig(num_latents=4608, k=32, transcode=True)
    coder = sparsify.SparseCoder(576, cfg, device=device)
    lr = 5e-3 / (coder.num_latents / 2**14) ** 0.5  # its trainer's default for signum
    optimizer = ScheduleFreeWrapper(
        SignSGD([{"params": coder.parameters(), "lr": lr}]), momentum=0.95
    )
    optimizer.train()

    def step(x, y):
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=autocast):
            out = coder(x, y, dead_mask=None)  # its default auxk_alpha is 0: no AuxK term
        out.fvu.backward()
        optimizer.step()  # a transcoder's decoder is left free: no row norms, no parallel grad
        optimizer.zero_grad()
        return out.fvu.item()

    return step


def timed(step, batch: dict, device: str) -> float:
    """Seconds of one step, the device's queue drained before and after."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(batch)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4096, help="rows a step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast, both sides")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    device = args.device
    sparsify = sparsify_module(device)
    hook_in, hook_out, batch = "blocks.6.mlp.hook_in", "blocks.6.hook_mlp_out", args.batch_size
    scratch = Path(tempfile.mkdtemp())
    cache = harvest(out=str(scratch / "cache"), hook=[hook_in, hook_out], tokens=batch * args.batches,
                    dtype="float32", device=device)  # fmt: skip

    def trainer(name: str, aux: float) -> Trainer:
        cfg = TrainConfig(out=str(scratch / name), hook=hook_in, hook_out=hook_out, k=32, expansion_factor=8,
                          total_tokens=batch * args.batches, batch_size=batch, lr=4e-3, warmup_steps=1,
                          device=device, autocast=args.autocast, aux_coefficient=aux)  # fmt: skip
        return Trainer(cfg, cache)

    trainers = {
        "ours": trainer("ours", TrainConfig.aux_coefficient),
        "ours_no_auxk": trainer("ours_no_auxk", 0.0),
    }
    step = sparsify_step(sparsify, device, args.autocast)
    steps = {name: lambda b, t=t: t.train_step(b).read() for name, t in trainers.items()}
    steps["sparsify"] = lambda b: step(b[hook_in], b[hook_out])

    batches = list(islice(trainers["ours"].source, args.batches))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i, b in enumerate(batches):
        b = {hook: x.to(device) for hook, x in b.items()}  # on the device before any clock
        seconds = {name: timed(f, b, device) for name, f in steps.items()}
        if i:  # the first step of each warms up allocators and caches
            for name, s in seconds.items():
                times[name].append(s)
    rows = {k: batch / statistics.median(v) for k, v in times.items()}
    ratio = rows["ours"] / rows["sparsify"]
    like = rows["ours_no_auxk"] / rows["sparsify"]
    print(f"transcoder training rows/s: ours {rows['ours']:,.0f} (AuxK off {rows['ours_no_auxk']:,.0f}), "
          f"sparsify {rows['sparsify']:,.0f}: {ratio:.2f}x ({like:.2f}x with AuxK off, as sparsify)")  # fmt: skip
    result = {"hooks": [hook_in, hook_out], "batch_size": batch, "k": 32, "d_sae": 4608, "device": device,
              "dtype": "bfloat16 autocast" if args.autocast else "float32",
              "steps_timed": len(times["ours"]), "step_s": times, "rows_per_s": rows,
              "ours_over_sparsify": ratio, "ours_no_auxk_over_sparsify": like,
              "sparsify": sparsify.__version__, "machine": machine()}  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    suffix = "-bf16" if args.autocast else ""
    path = Path(args.out) / f"transcoder-speed{suffix}-{torch.device(device).type}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
