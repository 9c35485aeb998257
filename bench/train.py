"""Training throughput, in one run on the same batches: our trainer's step (forward, losses, backward,
Adam, decoder constraint, dead-latent tracking, metrics) vs SAELens's TopK training step
(TopKTrainingSAE.training_forward_pass with AuxK, backward, Adam), and the limit: the encoder's
dense matmul alone (x @ W_enc). Prints rows/s and ratios; writes bench/results/train-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

# this file is bench/train.py: keep its folder from shadowing the `train` package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from train.config import TrainConfig  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def rows_per_s(step, batches: list[torch.Tensor], device: torch.device) -> float:
    step(batches[0])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for x in batches:
        step(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(len(x) for x in batches) / (time.perf_counter() - start)


def ours(batches: list[torch.Tensor], d_sae: int, k: int, device: torch.device, out: Path):
    cfg = TrainConfig(
        architecture="topk",
        d_sae=d_sae,
        k=k,
        batch_size=len(batches[0]),
        total_tokens=10**9,
        out=str(out),
        device=str(device),
        hook="bench",
    )
    trainer = Trainer(cfg, iter(batches))
    trainer.init_b_dec({"bench": batches[0]})
    member = trainer.members[0]

    def step(x):
        member.tokens_since_fired[: d_sae // 10] = 10**12  # AuxK on: the same 10% dead as SAELens
        trainer.train_step({"bench": x})
        trainer.step += 1

    return step


def saelens(d_in: int, d_sae: int, k: int, device: torch.device):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, k=k, aux_loss_coefficient=1 / 32, device=str(device)
        )
    )
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool, device=device)
    dead[: d_sae // 10] = True  # AuxK on, as in a real run
    n = [0]

    def step(x):
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={},
                dead_neuron_mask=dead,
                n_training_steps=n[0],
                is_logging_step=False,
            )
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        n[0] += 1

    return step


def encoder_limit(d_in: int, d_sae: int, device: torch.device, dtype: torch.dtype):
    W = torch.randn(d_in, d_sae, device=device, dtype=dtype)
    return lambda x: x.to(dtype) @ W


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--expansions", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d_in = 576
    torch.manual_seed(0)
    batches = [torch.randn(args.batch, d_in, device=device) * 3 + 1 for _ in range(args.steps)]
    results = []
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "sae-forge-bench-train"
    for expansion in args.expansions:
        d_sae = expansion * d_in
        ours_rate = rows_per_s(ours(batches, d_sae, args.k, device, scratch), batches, device)
        lens_rate = rows_per_s(saelens(d_in, d_sae, args.k, device), batches, device)
        limit = rows_per_s(encoder_limit(d_in, d_sae, device, torch.float32), batches, device)
        row = {
            "d_in": d_in, "d_sae": d_sae, "k": args.k, "batch": args.batch, "dtype": "float32",
            "ours_rows_per_s": ours_rate, "saelens_rows_per_s": lens_rate, "encoder_matmul_rows_per_s": limit,
            "ours_vs_saelens": ours_rate / lens_rate, "ours_vs_encoder_limit": ours_rate / limit,
        }  # fmt: skip
        row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # so far
        if device.type == "cuda":
            row["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        results.append(row)
        print(
            f"{expansion}x (d_sae {d_sae}), k {args.k}, batch {args.batch}, fp32: ours {ours_rate:7.0f} rows/s | SAELens {lens_rate:7.0f} "
            f"(ours/SAELens {row['ours_vs_saelens']:.2f}x) | encoder matmul {limit:7.0f} (ours/limit {row['ours_vs_encoder_limit']:.0%})",
            flush=True,
        )
    machine = {"device": str(device), "name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}  # fmt: skip
    out = Path(args.out) / f"train-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"benchmark": "train", "machine": machine, "results": results}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
