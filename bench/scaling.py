"""Scale-out on this machine: training throughput with 1, 2 and 4 processes (torchrun, gloo, one
thread each) per mode, beside the ideal (linear in processes, up to the cores), and the cache bytes
each rank reads.

  data    data parallel: each rank reads and trains on its part of every global batch (1/N of the
          bytes of one process) and DistributedDataParallel averages the gradients
  latent  latent sharded: every rank holds 1/N of the latents and trains on the whole batch (the
          ranks of a latent group read the same rows)

TopK, k 32, 8x (d_in 576), global batch 4096, a synthetic bf16 cache; steps timed after two of
warm-up, between barriers. Writes bench/results/scaling-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# this file's folder holds bench/train.py: keep it from shadowing the `train` package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from sae.environment import machine  # noqa: E402
from train.cache import CacheWriter  # noqa: E402
from train.config import TrainConfig  # noqa: E402

D_IN, BATCH, WARMUP = 576, 4096, 2
MODES = {"data": {}, "latent": {"latent_shards": -1}}
"""Each mode's TrainConfig settings beyond the shared ones (-1: the number of processes)."""


def per_step(d_in: int, d_sae: int, k: int, rows: int, data: int, latent: int) -> dict[str, float]:
    """Bytes per rank per step, by the design: fp32 parameters, their gradients and Adam's two
    moments (16 bytes a parameter) of the rank's 1/latent of the latents; the encoder's
    pre-activations of its `rows` (the per-data-rank batch), fp32; the data-parallel gradient
    all-reduce (ring: 2 (n-1)/n of the data sent per rank); within a latent group, the all-gather of
    each row's k candidate values (fp32; a candidate's latent follows from its place) and the ring
    all-reduce of the [rows, d_in] partial decodes, once for the code and once for AuxK (k_aux =
    d_in / 2, when latents are dead: an upper bound)."""
    params = 2 * d_in * d_sae // latent + d_sae // latent + d_in
    ring = lambda n, size: 2 * (n - 1) / n * size  # noqa: E731
    k_aux = d_in // 2
    latent_traffic = (latent - 1) * rows * (k + k_aux) * 4 + 2 * ring(latent, rows * d_in * 4)
    return {
        "payload": {  # what one rank hands to the collectives, without AuxK (no latent dead)
            "gradient_buckets": 4 * params if data > 1 else 0,
            "all_gather": rows * k * 4 if latent > 1 else 0,
            "all_reduce": rows * d_in * 4 if latent > 1 else 0,
        },
        "memory": 16 * params + 4 * rows * d_sae / latent,
        "gradient_traffic": ring(data, 4 * params) if data > 1 else 0.0,
        "latent_traffic": latent_traffic if latent > 1 else 0.0,
        "encoder_flops": 2 * rows * d_in * d_sae / latent,
    }


def synthetic_cache(path: Path, shards: int, rows: int = 4096) -> str:
    """Random bf16 rows: what is read and reduced, not what is learnt, is measured here."""
    identity = {"model": "synthetic", "revision": "0", "hookpoints": ["h"], "d_in": {"h": D_IN},
                "dtype": "bfloat16", "context_size": 128, "prepend_bos": True,
                "dataset": "synthetic", "pack": True, "seed": 0}  # fmt: skip
    writer = CacheWriter(str(path), identity)
    g = torch.Generator().manual_seed(0)
    for i in range(shards):
        meta = torch.arange(i * rows, (i + 1) * rows)
        writer.write_shard({"acts.h": torch.randn(rows, D_IN, generator=g).bfloat16(),
                            "tokens": meta.int(), "docs": meta.int(), "positions": meta.int(),
                            "windows": meta})  # fmt: skip
    writer.finish()
    return str(path)


def worker(cache: str, out: str, mode: str, steps: int) -> None:
    """One rank (under torchrun): time `steps` steps, count the bytes its cache reads, and write
    both to out/rank-R.json."""
    from train.trainer import Trainer

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    settings = {k: processes if v == -1 else v for k, v in MODES[mode].items()}
    cfg = TrainConfig(out=out, hook="h", architecture="topk", k=32, expansion_factor=8,
                      batch_size=BATCH, total_tokens=(steps + WARMUP + 1) * BATCH, lr=4e-3,
                      device="cpu", **settings)  # fmt: skip
    trainer = Trainer(cfg, cache)
    read = {"bytes": 0}
    fs = trainer.source.cache.fs

    def counted(fn):
        def reads(*args, **kwargs):
            data = fn(*args, **kwargs)
            read["bytes"] += len(data) if isinstance(data, bytes) else sum(map(len, data))
            return data

        return reads

    fs.cat_file, fs.cat_ranges = counted(fs.cat_file), counted(fs.cat_ranges)
    sent = count_collectives(trainer)
    batches = iter(trainer.source)
    trainer.start_members(next(batches))
    for i in range(WARMUP + steps):
        if i == WARMUP:
            trainer.world.barrier()
            sent.update(dict.fromkeys(sent, 0))  # the timed steps' alone
            start = time.perf_counter()
        trainer.train_step(next(batches)).read()
        trainer.step += 1
    trainer.world.barrier()
    seconds = time.perf_counter() - start
    per_step_sent = {k: v / steps for k, v in sent.items()}
    result = {"seconds": seconds, "steps": steps, "bytes": read["bytes"], "sent": per_step_sent}
    (Path(out) / f"rank-{trainer.world.rank}.json").write_text(json.dumps(result))


def count_collectives(trainer) -> dict[str, int]:
    """Payload bytes of the collectives as the step makes them: gradient buckets (DDP's comm
    hook), all_reduce and all_gather calls (a tensor's bytes, before any ring's factor)."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    sent = {"gradient_buckets": 0, "all_reduce": 0, "all_gather": 0}
    in_bucket = [False]  # the bucket hook's own all_reduce is counted as the bucket's

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def counted_bucket(state, bucket):  # DDP checks the name `bucket`
        sent["gradient_buckets"] += nbytes(bucket.buffer())
        in_bucket[0] = True
        try:
            return allreduce_hook(state, bucket)
        finally:
            in_bucket[0] = False

    def counting(name: str, fn):
        def collective(*args, **kwargs):
            if not in_bucket[0]:
                sent[name] += nbytes(args[1] if name == "all_gather" else args[0])
            return fn(*args, **kwargs)

        return collective

    for m in trainer.members:
        if isinstance(m.loss, DistributedDataParallel):
            m.loss.register_comm_hook(None, counted_bucket)
    dist.all_reduce = counting("all_reduce", dist.all_reduce)
    dist.all_gather = counting("all_gather", dist.all_gather)
    return sent


def run(cache: str, mode: str, processes: int, steps: int, scratch: Path) -> dict:
    out = scratch / f"{mode}-{processes}"
    out.mkdir(parents=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(processes), __file__, "--worker", cache, str(out), mode, str(steps)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launcher, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{mode} with {processes} processes failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(processes)]
    seconds = max(r["seconds"] for r in ranks)
    data, latent = (1, processes) if mode == "latent" else (processes, 1)
    model = per_step(D_IN, 8 * D_IN, 32, BATCH // data, data, latent)
    return {"processes": processes, "rows_per_s": steps * BATCH / seconds,
            "bytes_per_rank": [r["bytes"] for r in ranks], "sent_per_step": ranks[0]["sent"],
            "model_payload_per_step": model["payload"]}  # fmt: skip


def model_table(rows: int = 4096, gpus: int = 8, link: float = 300e9, flops: float = 600e12) -> str:
    """docs/scaling.md's table: per_step over d_in 2304-8192, 64k-16M latents, k 32 and 128, on
    `gpus` GPUs split data x latent, with times at `link` bytes/s of all-reduce bandwidth per GPU
    (NVLink 4: ~450 GB/s of bus bandwidth, less in practice) and `flops` of bf16 (an H100's
    dense ~990 TFLOP/s, about 60% of it reached); a step costs about three encoder matmuls."""
    lines = ["| d_in | latents | k | data x latent | memory / GPU | gradient all-reduce | "
             "latent collectives | their time | compute |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for d_in in (2304, 4096, 8192):
        for d_sae in (2**16, 2**20, 2**24):
            for k in (32, 128):
                for data in (gpus, 1):
                    r = per_step(d_in, d_sae, k, rows, data, gpus // data)
                    comm = (r["gradient_traffic"] + r["latent_traffic"]) / link * 1e3
                    lines.append(
                        f"| {d_in} | {d_sae:,} | {k} | {data} x {gpus // data} | "
                        f"{r['memory'] / 2**30:,.1f} GiB | {r['gradient_traffic'] / 2**20:,.0f} MiB | "
                        f"{r['latent_traffic'] / 2**20:,.0f} MiB | {comm:,.1f} ms | "
                        f"{3 * r['encoder_flops'] / flops * 1e3:,.1f} ms |"
                    )
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        cache, out, mode, steps = sys.argv[2:]
        return worker(cache, out, mode, int(steps))
    if sys.argv[1:2] == ["--model"]:
        return print(model_table())
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp())
    cache = synthetic_cache(scratch / "cache", shards=(args.steps + WARMUP + 2) * BATCH // 4096)
    cores = os.cpu_count() or 1
    results = []
    for mode in args.modes:
        rows = [run(cache, mode, n, args.steps, scratch) for n in args.processes]
        base = next((r for r in rows if r["processes"] == 1), rows[0])
        for r in rows:
            n = r["processes"]
            r["speedup"] = r["rows_per_s"] / base["rows_per_s"]
            r["ideal"] = min(n, cores) / min(base["processes"], cores)
            r["bytes_per_rank_over_one_process"] = max(r["bytes_per_rank"]) / max(
                base["bytes_per_rank"]
            )
            sent = ", ".join(f"{k} {v / 2**20:.2f} MiB (model {r['model_payload_per_step'][k] / 2**20:.2f})"
                             for k, v in r["sent_per_step"].items())  # fmt: skip
            print(f"{mode:6s} {n} processes: {r['rows_per_s']:8,.0f} rows/s, {r['speedup']:.2f}x "
                  f"(ideal {r['ideal']:.0f}x on {cores} cores); bytes per rank "
                  f"{r['bytes_per_rank_over_one_process']:.2f} of one process's; per step {sent}",
                  flush=True)  # fmt: skip
        results.append({"mode": mode, "runs": rows})
    report = {"d_in": D_IN, "d_sae": 8 * D_IN, "k": 32, "batch_size": BATCH, "steps": args.steps,
              "results": results, "machine": machine()}  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "scaling-cpu.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
