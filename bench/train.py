"""Training throughput, in one run on the same batches: our trainer's step (forward, losses, backward,
Adam, decoder constraint, dead-latent tracking, metrics) vs SAELens's training step for the same
architecture (TopKTrainingSAE, BatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAE with AuxK,
JumpReLUTrainingSAE with its L0 loss, StandardTrainingSAE with its L1: training_forward_pass,
backward, Adam), and the limit: the encoder's dense matmul alone (x @ W_enc). Prints rows/s and
ratios; writes bench/results/<name>-<device>.json. Our JumpReLU and ReLU-L1 start at L0 k (their
fitted start) and train on the dense code, as SAELens's do.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# this file is bench/train.py: keep its folder from shadowing the `train` package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from sae.models import default_matryoshka_widths  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.trainer import Trainer  # noqa: E402

SAELENS = {"topk": "TopK", "batchtopk": "BatchTopK", "matryoshka_batchtopk": "MatryoshkaBatchTopK",
           "jumprelu": "JumpReLU", "standard": "Standard"}  # fmt: skip
"""Our architectures and the names of SAELens's training classes for them."""
PENALTY = {"jumprelu": {"l0": 1.0}, "standard": {"l1": 1.0}}
"""SAELens's penalty weights for the penalty rules (its step reads them from its scheduler)."""


def make_batches(steps: int, batch: int, d_in: int, device: torch.device) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(batch, d_in, device=device) * 3 + 1 for _ in range(steps)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rows_per_s(
    steps: dict[str, Callable], baseline: SAELensProcess, batches: list, device, rounds: int
) -> dict[str, float]:
    """Rows/s of each in-process step function, taking turns on every batch, and of the baseline,
    which runs all the batches in its process after each round: a drift in the machine's speed
    (large on shared CPUs) hits all of them alike. (Taking turns with another process per batch
    would not do: each side's idle OpenMP threads spin for a while and steal the cores.)"""
    elapsed = dict.fromkeys([*steps, "saelens"], 0.0)
    for _ in range(rounds):
        for x in batches:
            for name, step in steps.items():
                sync(device)
                start = time.perf_counter()
                step(x)
                sync(device)
                elapsed[name] += time.perf_counter() - start
        elapsed["saelens"] += baseline.run()
    rows = rounds * sum(len(x) for x in batches)
    return {name: rows / t for name, t in elapsed.items()}


def peak_memory_mib(device: torch.device) -> float:
    """CUDA max allocated, or the process's peak RSS on CPU (which never goes down)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ours(
    batches, architecture: str, d_sae: int, k: int, dead: int, autocast: bool, device, out: Path
):
    cfg = TrainConfig(
        architecture=architecture,
        d_sae=d_sae,
        k=k,
        batch_size=len(batches[0]),
        total_tokens=10**9,
        out=str(out),
        device=str(device),
        hook="bench",
        autocast=autocast,
    )
    trainer = Trainer(cfg, iter(batches))
    trainer.start_members({"bench": batches[0]})
    member = trainer.members[0]

    def step(x):
        member.tokens_since_fired[:dead] = 10**12  # AuxK on: the same dead latents as SAELens
        trainer.train_step({"bench": x})
        trainer.step += 1

    return step


def saelens(
    architecture: str,
    d_in: int,
    d_sae: int,
    k: int,
    dead: int,
    autocast: bool,
    device: torch.device,
):
    import sae_lens
    from sae_lens.saes.sae import TrainStepInput

    cls, config = (
        getattr(sae_lens, f"{SAELENS[architecture]}TrainingSAE{c}") for c in ("", "Config")
    )
    extra = {} if architecture in PENALTY else {"k": k, "aux_loss_coefficient": 1 / 32}
    if "matryoshka" in architecture:
        extra["matryoshka_widths"] = default_matryoshka_widths(d_sae)  # ours, given to SAELens too
    sae = cls(config(d_in=d_in, d_sae=d_sae, device=str(device), **extra))
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-4)
    mask = torch.zeros(d_sae, dtype=torch.bool, device=device)
    mask[:dead] = True
    n = [0]

    def step(x):  # as SAELens's SAETrainer: the forward pass under autocast, backward outside
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x,
                    coefficients=PENALTY.get(architecture, {}),
                    dead_neuron_mask=mask,
                    n_training_steps=n[0],
                    is_logging_step=False,
                )
            )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        n[0] += 1

    return step


def saelens_worker(conn, steps: int, batch: int, d_in: int, device: str) -> None:
    """SAELens in a process of its own, as its users run it: our trainer tunes the process's
    allocator (train.trainer.keep_freed_memory), which would speed SAELens up too. A dict
    request sets up (and warms up) the SAE of that configuration; True runs a step on every
    batch and answers with the seconds it took; None ends it."""
    device = torch.device(device)
    batches = make_batches(steps, batch, d_in, device)
    step = None
    while (request := conn.recv()) is not None:
        if isinstance(request, dict):
            step = None  # the previous configuration's memory first
            step = saelens(**request, d_in=d_in, device=device)
            step(batches[0])  # warm-up
            conn.send("ready")
            continue
        sync(device)
        start = time.perf_counter()
        for x in batches:
            step(x)
        sync(device)
        conn.send(time.perf_counter() - start)


class SAELensProcess:
    """The baseline, stepping in its own process on the same batches (made from the same seed);
    one process for every configuration, so SAELens is imported once."""

    def __init__(self, steps: int, batch: int, d_in: int, device: str):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=saelens_worker, args=(child, steps, batch, d_in, device),
                                   daemon=True)  # fmt: skip
        self.process.start()

    def configure(self, **args) -> None:
        """The SAE the next runs step: saelens()'s arguments but d_in and the device."""
        self.conn.send(args)
        if self.conn.recv() != "ready":
            raise RuntimeError("the SAELens process did not set up its SAE")

    def run(self) -> float:
        """Seconds for a step on every batch."""
        self.conn.send(True)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()


def encoder_limit(d_in: int, d_sae: int, device: torch.device, dtype: torch.dtype):
    W = torch.randn(d_in, d_sae, device=device, dtype=dtype)
    return lambda x: x.to(dtype) @ W


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="batches per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--expansions", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--dead", type=float, nargs="+", default=[0.1, 0.0],
                    help="fractions of dead latents, which AuxK trains (the same for both sides)")  # fmt: skip
    ap.add_argument("--architectures", nargs="+", default=["topk"],
                    choices=list(SAELENS))  # fmt: skip
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="train", help="results file: <name>-<device>.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d_in = 576
    batches = make_batches(args.steps, args.batch, d_in, device)
    results = []
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "sae-forge-bench-train"
    grid = [(a, e, t, f) for a in args.architectures for e in args.expansions for t in args.dtypes for f in args.dead]  # fmt: skip
    lens = SAELensProcess(args.steps, args.batch, d_in, str(device))
    for architecture, expansion, dtype, dead_fraction in grid:
        d_sae = expansion * d_in
        dead, autocast = int(dead_fraction * d_sae), dtype == "bfloat16"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step = ours(batches, architecture, d_sae, args.k, dead, autocast, device, scratch)
        step(batches[0])  # warm-up, and our peak memory before anything else allocates
        memory = peak_memory_mib(device)
        lens.configure(
            architecture=architecture, d_sae=d_sae, k=args.k, dead=dead, autocast=autocast
        )
        limit = encoder_limit(d_in, d_sae, device, getattr(torch, dtype))
        limit(batches[0])
        steps = {"ours": step, "limit": limit}
        rate = rows_per_s(steps, lens, batches, device, args.rounds)
        del step, steps, limit  # before the next configuration measures its memory
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row = {
            "architecture": architecture, "d_in": d_in, "d_sae": d_sae, "k": args.k, "batch": args.batch,
            "dtype": dtype, "dead_fraction": dead_fraction, "ours_rows_per_s": rate["ours"],
            "saelens_rows_per_s": rate["saelens"], "encoder_matmul_rows_per_s": rate["limit"],
            "ours_vs_saelens": rate["ours"] / rate["saelens"],
            "ours_vs_encoder_limit": rate["ours"] / rate["limit"],
            "ours_peak_memory_mib": memory,
            "memory": "cuda_max_allocated" if device.type == "cuda" else "peak_rss",
        }  # fmt: skip
        results.append(row)
        print(
            f"{architecture} {expansion}x (d_sae {d_sae}), k {args.k}, batch {args.batch}, {dtype}, {dead_fraction:.0%} dead: "
            f"ours {rate['ours']:7.0f} rows/s | SAELens {rate['saelens']:7.0f} (ours/SAELens {row['ours_vs_saelens']:.2f}x) | "
            f"encoder matmul {rate['limit']:7.0f} (ours/limit {row['ours_vs_encoder_limit']:.0%}) | ours peak {memory:.0f} MiB",
            flush=True,
        )
    lens.close()
    machine = {"device": str(device), "name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}  # fmt: skip
    out = Path(args.out) / f"{args.name}-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"benchmark": "train", "machine": machine, "results": results}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
