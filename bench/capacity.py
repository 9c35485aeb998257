"""The widest dictionary that trains on one device: ours against SAELens on the same batches, on a
GPU each in a process of its own. TopK (or BatchTopK) at d_in 576 (SmolLM2's residual stream), batch 4096,
k 32, bf16 autocast, 10% of the latents dead (AuxK on, as a long run has them): a width trains if
a warm-up step and two more finish. Widths double from --start until one fails or --max-d-sae is
reached, then the gap is halved --refine times (a multiple of 4096). An out-of-memory error is
caught, the memory freed and the search goes on; after one, a smaller width that fails counts as
a failure too (fragmentation), so the figure is what trains, never an overestimate. Peak memory
(CUDA max allocated) and the step time are kept for each width that trains. Writes
bench/results/<name>-<device>.json.

Latent sharding (--latent-shards L) puts 1/L of every per-latent tensor on each of L devices:
the per-latent memory measured here, divided by L, is what each holds (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from sae.environment import machine  # noqa: E402

D_IN = 576


def bench_train():
    """bench/train.py's step builders (ours, SAELens's), which time the same steps for speed."""
    spec = importlib.util.spec_from_file_location(
        "bench_train", Path(__file__).with_name("train.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def attempt(build: Callable[[], Callable], batches: list, device: torch.device) -> dict | None:
    """A width's warm-up and two timed steps: their times and peak memory, or None when the
    device runs out of memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        step = build()
        step(batches[0])
        times = []
        for x in batches[1:3]:
            sync(device)
            start = time.perf_counter()
            step(x)
            sync(device)
            times.append(time.perf_counter() - start)
    except (torch.OutOfMemoryError, RuntimeError) as e:  # cuBLAS's failures are RuntimeErrors
        if not isinstance(e, torch.OutOfMemoryError) and "ALLOC_FAILED" not in str(e):
            raise
        return None
    finally:
        step = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"step_s": statistics.median(times), "peak_mib": peak}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def search(library: str, args: dict) -> dict:
    """The widest d_sae that trains with `library`'s step: doubling, then halving the gap."""
    device = torch.device(args["device"])
    bt = bench_train()
    batches = bt.make_batches(3, args["batch"], D_IN, device)
    architecture, k, dead_fraction = args["architecture"], args["k"], args["dead"]

    def builder(d_sae: int) -> Callable[[], Callable]:
        dead = int(dead_fraction * d_sae)
        if library == "ours":
            scratch = Path(args["scratch"])
            return lambda: bt.ours(batches, architecture, d_sae, k, dead, True, device, scratch)
        return lambda: bt.saelens(architecture, D_IN, d_sae, k, dead, True, device)

    tried: list[dict] = []

    def trains(d_sae: int) -> bool:
        result = attempt(builder(d_sae), batches, device)
        tried.append({"d_sae": d_sae, "trains": result is not None, **(result or {})})
        print(f"{library}: d_sae {d_sae:,} {'trains' if result else 'out of memory'}"
              + (f" ({result['peak_mib'] or 0:,.0f} MiB, {result['step_s'] * 1e3:.0f} ms/step)" if result else ""),
              flush=True)  # fmt: skip
        return result is not None

    good, bad = widest(trains, args["start"], args["max_d_sae"], args["refine"])
    return {"largest_d_sae": good, "smallest_failed_d_sae": bad, "attempts": tried}


def per_latent(result: dict) -> float | None:
    """Peak bytes per latent at the widest width that trained (what a latent shard divides)."""
    widest = [
        a for a in result["attempts"] if a["trains"] and a["d_sae"] == result["largest_d_sae"]
    ]
    if not widest or widest[0]["peak_mib"] is None:  # none trained, or no peak on a CPU
        return None
    return widest[0]["peak_mib"] * 2**20 / widest[0]["d_sae"]


def widest(
    trains: Callable[[int], bool], start: int, most: int, refine: int
) -> tuple[int, int | None]:
    """The widest width found to train (0: none) and the narrowest found not to (None: every
    width tried trained): doubling from `start` up to `most`, then `refine` halvings of the gap
    between them, on multiples of 4096."""
    good, bad, width = 0, None, start
    while width <= most:
        if not trains(width):
            bad = width
            break
        good, width = width, width * 2
    for _ in range(refine if bad else 0):
        middle = (good + bad) // 2 // 4096 * 4096
        if middle in (good, bad):
            break
        if trains(middle):
            good = middle
        else:
            bad = middle
    return good, bad


def worker(conn, library: str, args: dict) -> None:
    conn.send(search(library, args))


def in_own_process(library: str, args: dict) -> dict:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=worker, args=(child, library, args))
    process.start()
    child.close()  # the worker's end only: a worker that dies then ends the wait below
    try:
        result = parent.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"the {library} process died (exit code {process.exitcode})") from None
    process.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--architecture", default="topk", choices=["topk", "batchtopk"])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--dead", type=float, default=0.1, help="fraction of dead latents (AuxK)")
    ap.add_argument("--start", type=int, default=2**16, help="first width tried")
    ap.add_argument("--max-d-sae", type=int, default=2**26, help="stop doubling here")
    ap.add_argument("--refine", type=int, default=3, help="halvings of the gap after a failure")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scratch", default="/tmp/sae-forge-bench-capacity")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="capacity")
    args = vars(ap.parse_args())
    out, name = Path(args.pop("out")), args.pop("name")
    # on a GPU each library in a process of its own, which hands its memory back whole
    run = in_own_process if args["device"].startswith("cuda") else search
    results = {library: run(library, args) for library in ("ours", "saelens")}
    ours, theirs = (results[x]["largest_d_sae"] for x in ("ours", "saelens"))
    report = {
        "benchmark": "capacity", "machine": machine(), "settings": {**args, "d_in": D_IN},
        "gpu": torch.cuda.get_device_name() if args["device"].startswith("cuda") else None,
        "results": results, "ours_over_saelens": ours / theirs if theirs else None,
        "peak_bytes_per_latent": {library: per_latent(r) for library, r in results.items()},
    }  # fmt: skip
    print(f"widest that trains: ours {ours:,} latents, SAELens {theirs:,} "
          f"(ours/SAELens {report['ours_over_saelens'] or float('nan'):.2f}x)")  # fmt: skip
    path = out / f"{name}-{torch.device(args['device']).type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
