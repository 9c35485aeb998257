"""A cross-layer transcoder's training step with each layer's decode taken from its code's support
alone (sae/kernels.py's support_decode: the nonzero entries, and JumpReLU's zeros near a threshold)
against the dense decode of the whole code, the baseline, on the same rows: SmolLM2's shape (30
layers of 576 latents, k 16 each, d 576), random rows, each layer started at L0 k (its fitted
start). Forward, loss and backward, timed alternately; prints seconds a step and the ratio;
writes bench/results/<name>-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# this file is in bench/: keep its folder from shadowing the packages
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from sae import kernels  # noqa: E402
from sae.clt import CLTConfig, CrossLayerTranscoder  # noqa: E402
from sae.environment import machine  # noqa: E402
from sae.models import TrainContext  # noqa: E402


def make_clt(
    architecture: str, layers: int, d: int, d_sae: int, k: int, device
) -> CrossLayerTranscoder:
    cfg = CLTConfig(architecture=architecture, d_in=d, d_sae=d_sae, k=k, device=str(device),
                    hook_names=[f"blocks.{i}.mlp.hook_in" for i in range(layers)],
                    hook_names_out=[f"blocks.{i}.hook_mlp_out" for i in range(layers)])  # fmt: skip
    return CrossLayerTranscoder(cfg)


def step_seconds(clt, x, y, ctx, share: float, device) -> float:
    """One forward, loss and backward with support_decode's share limit set to `share`."""
    kernels.SPARSE_SHARE, saved = share, kernels.SPARSE_SHARE
    try:
        clt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        clt.training_loss(x, ctx, y).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    finally:
        kernels.SPARSE_SHARE = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--architectures", nargs="+", default=["topk", "jumprelu"])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=576, help="latents per layer")
    ap.add_argument("--k", type=int, default=16, help="L0 per layer at the start")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3, help="timed steps of each, alternating")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="clt-decode")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for architecture in args.architectures:
        torch.manual_seed(0)
        clt = make_clt(architecture, args.layers, args.d, args.d_sae, args.k, device)
        x = torch.randn(args.batch_size, args.layers * args.d, device=device)
        y = torch.randn(args.batch_size, args.layers * args.d, device=device)
        clt.fit_code_scale(x, y)  # every layer at L0 k
        ctx = TrainContext(sparsity_coefficient=0.3, aux_coefficient=0.0)
        times = {"support": [], "dense": []}
        for i in range(args.steps + 1):  # the first of each warms up
            for name, share in (("support", kernels.SPARSE_SHARE), ("dense", -1.0)):
                seconds = step_seconds(clt, x, y, ctx, share, device)
                if i:
                    times[name].append(seconds)
        row = {"architecture": architecture, "layers": args.layers, "d": args.d,
               "d_sae": args.d_sae, "k": args.k, "batch_size": args.batch_size,
               **{f"{n}_step_s": statistics.median(t) for n, t in times.items()}}  # fmt: skip
        row["dense_over_support"] = row["dense_step_s"] / row["support_step_s"]
        results.append(row)
        print(f"{architecture} CLT, {args.layers} layers x {args.d_sae} latents, k {args.k}, "
              f"batch {args.batch_size}: support decode {row['support_step_s']:.3f} s a step, "
              f"dense {row['dense_step_s']:.3f} s ({row['dense_over_support']:.2f}x)", flush=True)  # fmt: skip
    out = Path(args.out) / f"{args.name}-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "clt_decode", "results": results,
              "machine": {**machine(), "device": str(device), "torch_threads": torch.get_num_threads()}}  # fmt: skip
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
