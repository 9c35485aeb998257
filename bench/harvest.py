"""Harvest throughput, in one run on the same windows and precision:

  ours      `sae harvest` end to end (data, forward to the deepest hook, shards, manifest), tokens/s
  bare      the model's forward truncated after the hooked block, nothing stored
  saelens   SAELens's ActivationsStore.get_activations on the same model (TransformerBridge), one
            pass per hookpoint, as SAELens caches one hook per run

Prints ratios and writes bench/results/harvest-<device>.json. Tokens/s count the rows a harvest
stores (position 0 excluded) for ours, and window tokens for the baselines, which favours them.
A harvest pays ~0.2 s of start-up (reading the corpus, tokenizing enough text to fill the window
shuffle buffer), so the default run (48 batches) is long enough for the rate to be the steady one
of a real harvest; at 16 batches the start-up alone costs ~6%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch import nn

# bench/train.py sits beside this file: keep this folder from shadowing the `train` package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from train.config import HarvestConfig  # noqa: E402
from train.harvest import DTYPES, Harvester  # noqa: E402

LAYER = 6
ONE = [f"blocks.{LAYER}.hook_resid_post"]
FOUR = [f"blocks.{LAYER}.hook_{k}" for k in ("resid_pre", "attn_out", "mlp_out", "resid_post")]
BRIDGE_NAMES = {  # TransformerBridge's names for the same hookpoints
    f"blocks.{LAYER}.hook_resid_pre": f"blocks.{LAYER}.hook_in",
    f"blocks.{LAYER}.hook_attn_out": f"blocks.{LAYER}.attn.hook_out",
    f"blocks.{LAYER}.hook_mlp_out": f"blocks.{LAYER}.mlp.hook_out",
    f"blocks.{LAYER}.hook_resid_post": f"blocks.{LAYER}.hook_out",
}


class PeakRSS:
    """Samples resident memory in a thread: the peak during a block, in MiB."""

    def __enter__(self):
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
            self.peak = max(self.peak, rss / 2**20)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def timed(fn, device: torch.device | None = None) -> float:
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)  # queued warm-up work is not ours to count
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def batches_of(harvester: Harvester, n_batches: int) -> list[torch.Tensor]:
    """The first windows of our harvest order, as the [batch, seq] tensors every method runs on."""
    windows = list(islice(harvester.windows(), n_batches * harvester.cfg.batch_size))
    tokens = torch.from_numpy(np.stack([w.tokens for w in windows]))
    return list(tokens.split(harvester.cfg.batch_size))


def bare_forward(model: nn.Module, batches: list[torch.Tensor], dtype: torch.dtype) -> float:
    """The base model with its block list cut after the hooked block: the forward's floor (on a
    GPU, the tokens already there and the activations left there)."""
    base = model.model
    full = base.layers
    base.layers = nn.ModuleList(list(full)[: LAYER + 1])
    device = next(base.parameters()).device
    on_device = [b.to(device) for b in batches]
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
        ):
            base(on_device[0], use_cache=False)  # warm-up
            return timed(lambda: [base(b, use_cache=False) for b in on_device], device)
    finally:
        base.layers = full


def ours(harvester: Harvester, out: Path) -> tuple[float, float]:
    """Seconds for a whole harvest into a fresh cache, and the peak RSS (MiB) while it ran."""
    harvester.cfg = replace(harvester.cfg, out=str(out))
    with PeakRSS() as mem:
        seconds = timed(harvester.run)
    return seconds, mem.peak


def saelens_stores(
    model_dir: str, batches: list[torch.Tensor], hooks: list[str], dtype: torch.dtype, device
) -> list:
    """One SAELens ActivationsStore per hookpoint on a TransformerBridge of the same model."""
    import datasets
    from sae_lens.analysis.sae_transformer_bridge import SAETransformerBridge
    from sae_lens.training.activations_store import ActivationsStore

    bridge = SAETransformerBridge.boot_transformers(model_dir, device=str(device))
    tokens = torch.cat(batches)
    return [
        ActivationsStore(
            model=bridge,
            dataset=datasets.Dataset.from_dict({"input_ids": tokens.tolist()}),
            streaming=False,
            hook_name=BRIDGE_NAMES[hook],
            hook_head_index=None,
            context_size=tokens.shape[1],
            d_in=576,
            n_batches_in_buffer=2,
            total_training_tokens=10**9,
            store_batch_size_prompts=len(batches[0]),
            train_batch_size_tokens=4096,
            prepend_bos=True,
            normalize_activations="none",
            device=device,
            dtype="float32",
            autocast_lm=dtype != torch.float32,
        )  # fmt: skip
        for hook in hooks
    ]


def saelens(stores: list, batches: list[torch.Tensor], device: torch.device) -> float:
    """Seconds for SAELens to produce the same activations: one pass per hookpoint."""
    on_device = [b.to(device) for b in batches]
    with torch.no_grad():
        stores[0].get_activations(on_device[0])  # warm-up
        return sum(
            timed(lambda s=s: [s.get_activations(b) for b in on_device], device) for s in stores
        )


def memory_growth(scratch: Path, batches: int, batch_size: int, device: torch.device) -> dict:
    """Peak RSS of the same harvest at 1x and 4x the tokens: bounded memory means no growth."""
    out = {}
    for factor in (1, 4):
        cfg = HarvestConfig(
            dtype="bfloat16",
            device=str(device),
            batch_size=batch_size,
            tokens=factor * batches * batch_size * 127,
            shard_windows=8 * batch_size,
            out=str(scratch / f"mem-{factor}"),
        )
        _, peak = ours(Harvester(cfg), scratch / f"mem-{factor}")
        out[f"peak_rss_mib_{cfg.tokens}_tokens"] = peak
        print(f"memory: {cfg.tokens:,} tokens -> peak RSS {peak:.0f} MiB", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--batches", type=int, default=48, help="forward batches of B x 128 tokens per measurement"
    )
    ap.add_argument(
        "--batch-size", type=int, default=0, help="B: windows per forward (0: 8 on CPU, 64 on CUDA)"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of bare, ours, bare, SAELens; medians of the rates and of each round's ratios",
    )
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument(
        "--skip-memory", action="store_true", help="skip the 1x vs 4x tokens peak-RSS check"
    )
    args = ap.parse_args()
    from sae.lm import smollm2_dir

    model_dir = str(smollm2_dir())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    results = []
    scratch = Path(tempfile.mkdtemp())
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for hooks in (ONE, FOUR):
            cfg = HarvestConfig(
                hook=hooks, dtype=dtype_name, precision=dtype_name, device=str(device), batch_size=batch_size, context_size=128,
                tokens=args.batches * batch_size * 127, shard_windows=8 * batch_size, out=str(scratch / "probe"),
            )  # fmt: skip
            harvester = Harvester(cfg)  # model load is not part of a harvest's throughput
            batches = batches_of(harvester, args.batches)
            window_tokens = sum(b.numel() for b in batches)
            stores = saelens_stores(model_dir, batches, hooks, dtype, device)
            runs: dict[str, list[float]] = {"ours": [], "bare": [], "saelens": [], "rss": []}
            ratios: dict[str, list[float]] = {"bare": [], "saelens": []}
            for r in range(args.rounds):
                # the bare forward before and after ours: a linear drift in the machine's speed
                # (large on shared CPUs) cancels out of each round's ratio
                bare = [window_tokens / bare_forward(harvester.model, batches, dtype)]
                seconds, peak = ours(harvester, scratch / f"{dtype_name}-{len(hooks)}-{r}")
                bare.append(window_tokens / bare_forward(harvester.model, batches, dtype))
                runs["ours"].append(cfg.tokens / seconds)
                runs["bare"].append(float(np.mean(bare)))
                runs["rss"].append(peak)
                runs["saelens"].append(window_tokens / saelens(stores, batches, device))
                for name in ratios:
                    ratios[name].append(runs["ours"][-1] / runs[name][-1])
            med = {k: float(np.median(v)) for k, v in runs.items()}
            row = {
                "dtype": dtype_name,
                "hookpoints": len(hooks),
                "window_tokens": window_tokens,
                "rounds": args.rounds,
                "ours_tokens_per_s": med["ours"],
                "bare_forward_tokens_per_s": med["bare"],
                "saelens_tokens_per_s": med["saelens"],
                "ours_vs_bare": float(np.median(ratios["bare"])),  # medians of each round's ratio
                "ours_vs_saelens": float(np.median(ratios["saelens"])),
                "ours_peak_rss_mib": max(runs["rss"]),
                "all_rounds": runs,
            }
            results.append(row)
            print(
                f"{dtype_name:8s} {len(hooks)} hook(s): ours {med['ours']:6.0f} tok/s | bare forward {med['bare']:6.0f} "
                f"(ours/bare {row['ours_vs_bare']:.2f}x) | SAELens {med['saelens']:6.0f} (ours/SAELens "
                f"{row['ours_vs_saelens']:.2f}x) | peak RSS {row['ours_peak_rss_mib']:.0f} MiB",
                flush=True,
            )
            del harvester, stores
    memory = {} if args.skip_memory else memory_growth(scratch, args.batches, batch_size, device)
    shutil.rmtree(scratch, ignore_errors=True)
    machine = {
        "device": device.type,
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    out = Path(args.out) / f"harvest-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": "harvest",
        "model": "smollm2-135m",
        "layer": LAYER,
        "batch": f"{batch_size} x 128",
        "machine": machine,
    }
    out.write_text(json.dumps({**meta, "results": results, "memory": memory}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
