"""LM forward passes -> activation rows in the cache.

One forward pass captures every requested hookpoint and stops as soon as the last of them has
fired, so no layer past the deepest hook is computed. Rows leave out position 0 (BOS, the
attention sink) and padding. Shards are written by a background thread while the next shard's
forward passes run; on CUDA, activations go to pinned host memory with non-blocking copies.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, nullcontext
from itertools import islice, takewhile

import numpy as np
import torch
from torch import Tensor, nn

from sae.hooks import capture
from sae.lm import check_context, load_lm, revision_name
from sae.locks import exclusive
from sae.progress import progress
from train import order
from train.cache import META_KEYS, ActivationCache, CacheWriter, acts_key, shard_name
from train.config import HarvestConfig
from train.data import (
    PAD_DOC,
    Window,
    dataset_fingerprint,
    load_documents,
    shuffled,
    token_windows,
)
from train.device import host_core_spare, resolve_device
from train.distributed import World
from train.prefetch import prefetched

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STREAM_GROUP_BYTES = 256 * 2**20
"""At most this many bytes of rows per shuffled group when training straight from the model."""


class NonFiniteActivations(FloatingPointError):
    """NaN or inf in the model's activations; nothing from the offending shard is written."""


def native_precision(dtype: str, device: torch.device) -> bool:
    """Whether `device` computes `dtype` matmuls natively. CUDA does (bf16 from Ampere on); a CPU
    does where oneDNN has kernels for it (AVX-512 or AMX). Elsewhere torch emulates them: on an
    AVX2-only CPU SmolLM2's bf16 forward ran at 280 tokens/s against fp32's 1,900 (decision 44)."""
    if dtype == "float32":
        return True
    if device.type == "cuda":
        return dtype == "float16" or torch.cuda.is_bf16_supported()
    mkldnn = torch.ops.mkldnn
    probe = {"bfloat16": "_is_mkldnn_bf16_supported", "float16": "_is_mkldnn_fp16_supported"}
    return (
        device.type == "cpu" and hasattr(mkldnn, probe[dtype]) and getattr(mkldnn, probe[dtype])()
    )


def resolve_precision(precision: str, dtype: str, device: torch.device) -> str:
    """--precision as a dtype name: auto computes in the cache dtype where that is native and in
    float32 elsewhere, so a bf16 cache costs no speed on any machine (rounding fp32 activations to
    bf16 is exact per value, not an approximation of a bf16 forward)."""
    if precision != "auto":
        return precision
    return dtype if native_precision(dtype, device) else "float32"


def model_revision(model: nn.Module) -> str:
    """A fingerprint of the model's config (the hub commit when known), so caches from two
    different models never mix even when both are called by the same path."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return commit
    config = {
        k: v
        for k, v in model.config.to_dict().items()
        if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")
    }
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def batched(windows: Iterator[Window], size: int) -> Iterator[list[Window]]:
    while batch := list(islice(windows, size)):
        yield batch


class Harvester:
    """Holds the model and the forward settings; `run` streams shards into a CacheWriter."""

    def __init__(self, cfg: HarvestConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        self.precision = resolve_precision(cfg.precision, cfg.dtype, self.device)
        self.model, self.tokenizer = load_lm(cfg.model, str(self.device), revision=cfg.revision)
        check_context(self.model, cfg.context_size)
        self.takes_use_cache = "use_cache" in inspect.signature(self.model.forward).parameters
        self.d_in = {
            h: int(a.shape[-1]) for h, a in self.forward(torch.ones(1, 2, dtype=torch.long)).items()
        }

    @torch.inference_mode()
    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """[batch, seq] token ids -> {hook: [batch, seq, d]} in the cache dtype."""
        inputs = {"input_ids": tokens.to(self.device, non_blocking=True)}
        # no mask where nothing is padded lets attention take its causal fast path
        if mask is not None and not bool(mask.all()):
            inputs["attention_mask"] = mask.to(self.device, non_blocking=True)
        if self.takes_use_cache:
            inputs["use_cache"] = False  # no KV cache to build: nothing generates here
        precision = DTYPES[self.precision]
        with torch.autocast(self.device.type, precision, enabled=precision != torch.float32):
            acts = capture(self.model, self.cfg.hook, **inputs)
        return {h: a.to(self.dtype) for h, a in acts.items()}

    def identity(self) -> dict:
        c = self.cfg
        return {
            "model": c.model,
            "model_revision": revision_name(c.revision),
            "revision": model_revision(self.model),
            "hookpoints": list(c.hook),
            "d_in": self.d_in,
            "dtype": c.dtype,
            "precision": self.precision,
            "context_size": c.context_size,
            "prepend_bos": True,
            "dataset": c.dataset,
            "dataset_fingerprint": dataset_fingerprint(c.dataset, c.split),
            "split": c.split,
            "pack": c.pack,
            "seed": c.seed,
            "text_column": c.text_column,
            "shard_windows": c.shard_windows,
        }

    def windows(self, epoch: int = 0) -> Iterator[Window]:
        c = self.cfg
        seed = c.seed + 2 * epoch  # each pass over the data in a new order
        docs = shuffled(enumerate(load_documents(c.dataset, c.split, c.text_column)), seed)
        return shuffled(token_windows(self.tokenizer, docs, c.context_size, c.pack), seed + 1)

    def shard_rows(
        self, windows: list[Window], first_window: int, first_batch: int
    ) -> dict[str, Tensor]:
        """Forward a shard's windows batch by batch; keep every real token but the first."""
        parts: dict[str, list[Tensor]] = {
            k: [] for k in [*map(acts_key, self.cfg.hook), *META_KEYS]
        }
        sums: list[Tensor] = []  # NaN/inf reach a sum: one cheap reduction per batch and hook
        for b, batch in enumerate(batched(iter(windows), self.cfg.batch_size)):
            tokens = torch.from_numpy(np.stack([w.tokens for w in batch]))
            docs = torch.from_numpy(np.stack([w.docs for w in batch]))
            keep = docs != PAD_DOC  # [batch, seq]
            acts = self.forward(tokens, keep.long())
            keep[:, 0] = False  # position 0: BOS, the attention sink
            for hook, a in acts.items():
                rows = a[keep.to(a.device)]
                sums.append(rows.float().sum())
                parts[acts_key(hook)].append(_to_host(rows))
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            first = first_window + b * self.cfg.batch_size
            windows_idx = (first + torch.arange(len(batch)))[:, None].expand_as(tokens)
            parts["tokens"].append(tokens[keep].to(torch.int32))
            parts["docs"].append(docs[keep])
            parts["positions"].append(positions[keep].to(torch.int32))
            parts["windows"].append(windows_idx[keep].to(torch.int64))
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the pinned copies have landed
        # read once per shard: a check per batch would make the host wait for the device each time
        if not torch.isfinite(torch.stack(sums)).all():
            self.raise_non_finite(parts, len(windows), first_window, first_batch)
        return {k: torch.cat(v) for k, v in parts.items()}

    def raise_non_finite(
        self, parts: dict[str, list[Tensor]], n_windows: int, first_window: int, first_batch: int
    ) -> None:
        """Name the first batch and hookpoint with a NaN/inf value (a sum can also overflow to
        inf from finite values: then there is none, and the shard is fine)."""
        size = self.cfg.batch_size
        for b in range(len(parts["tokens"])):
            for hook in self.cfg.hook:
                rows = parts[acts_key(hook)][b]
                if bad := int((~torch.isfinite(rows)).sum()):
                    start = first_window + b * size
                    end = first_window + min(n_windows, (b + 1) * size) - 1
                    raise NonFiniteActivations(
                        f"{bad} NaN/inf values at hookpoint {hook!r} in batch {first_batch + b} "
                        f"(windows {start}..{end}); "
                        "nothing from this shard was written"
                    )

    def stream(self, batch_size: int, rank: int = 0, ranks: int = 1) -> Iterator[dict[str, Tensor]]:
        """Rank `rank`'s rows of each global batch, for training straight from the model: the
        windows, pass after pass through the dataset (each in a new order), are train/order.py's
        stream, in blocks of about stream_windows windows; a rank forwards only the windows
        holding its rows (and one process each window once)."""
        rng = np.random.default_rng(self.cfg.seed)
        windows = WindowStream(self)
        block_rows = self.stream_windows() * (self.cfg.context_size - 1)
        for block in order.blocks(windows.sizes(), batch_size, block_rows, rng):
            parts = [order.rank_part(b, rank, ranks) for b in block.batches]
            lo, hi = order.span(block, parts)
            rows = windows.read(lo, hi)  # {hook: [hi - lo, d]}
            for part in parts:
                index = torch.as_tensor(part - lo)
                yield {h: rows[h][index] for h in self.cfg.hook}

    def first_rows(self, count: int) -> dict[str, Tensor]:
        """{hook: rows} of the first windows holding `count` rows, the same on every rank (the
        input scales of a stream are measured on them)."""
        windows, rows = [], 0
        for w in self.windows(0):
            windows.append(w)
            rows += window_rows(w)
            if rows >= count:
                break
        if not rows:  # every pass over the data would find none: never a batch, for ever
            raise self.no_window("nothing to train on")
        acts = self.shard_rows(windows, 0, 0)
        return {h: acts[acts_key(h)] for h in self.cfg.hook}

    def stream_windows(self) -> int:
        """Windows per shuffled group of a stream: shard_windows, fewer (a multiple of batch_size)
        where its rows at every hookpoint would pass STREAM_GROUP_BYTES. A CLT over SmolLM2's 30
        layers reads 60 hookpoints: 256 windows of them are 2.2 GB in bfloat16, held twice while
        the trainer re-batches them."""
        c = self.cfg
        window_bytes = (c.context_size - 1) * sum(self.d_in.values()) * DTYPES[c.dtype].itemsize
        fits = STREAM_GROUP_BYTES // window_bytes // c.batch_size * c.batch_size
        return max(c.batch_size, min(c.shard_windows, fits))

    def no_window(self, consequence: str) -> ValueError:
        c = self.cfg
        return ValueError(
            f"dataset {c.dataset!r} (split {c.split}) fills not one {c.context_size}-token "
            f"window: {consequence}"
        )

    def run(self) -> ActivationCache:
        writer = CacheWriter(self.cfg.out, self.identity())
        if self.finished(writer):
            return ActivationCache(self.cfg.out)
        self.check_extent(writer.rows_done)
        writer.drop_trimmed()  # redone: whole, or cut again to this --tokens
        self.write_shards(writer, writer.shards_done, writer.rows_done, lambda index: True)
        return self.finish(writer)

    def run_part(self, world: World) -> ActivationCache:
        """This rank's part of a harvest split over processes (torchrun): shard i is forwarded
        and written by rank i % ranks, which lists it in its part manifest; every rank makes
        (tokenizes) every window, to know where shards start and the last one ends. When all are
        done, rank 0 merges the parts into the manifest a single process writes for the same
        windows, so the cache is the same bytes. Resumes after any rank was killed, with any
        number of processes: a shard any part lists is done."""
        c = self.cfg
        writer = CacheWriter(c.out, self.identity())  # written last, by rank 0
        if self.finished(writer, quiet=not world.is_main):
            return ActivationCache(c.out)
        if writer.shards_done:
            raise ValueError(
                f"{c.out} holds an unfinished harvest of one process: resume it with one process "
                "(sae harvest without torchrun), or harvest into a new --out"
            )
        parts = {r: CacheWriter(c.out, self.identity(), part=r) for r in writer.parts()}
        self.check_extent(sum(part.rows_done for part in parts.values()))
        world.barrier()  # every rank has read the parts before any drops a trimmed shard
        if world.is_main:
            for part in parts.values():
                part.drop_trimmed()
        world.barrier()
        done = {s["name"] for part in parts.values() for s in part.manifest["shards"]}
        mine = CacheWriter(c.out, self.identity(), part=world.rank)
        self.write_shards(
            mine, 0, 0,
            lambda index: index % world.size == world.rank and shard_name(index) not in done,
            show=world.is_main,
        )  # fmt: skip
        world.barrier()
        if world.is_main:
            writer.merge_parts()
            self.finish(writer)
        world.barrier()
        return ActivationCache(c.out)

    def finished(self, writer: CacheWriter, quiet: bool = False) -> bool:
        """Whether the cache is already complete (it is then left as it is)."""
        c = self.cfg
        if not writer.manifest["complete"]:
            return False
        if writer.rows_done < c.tokens and "note" not in writer.manifest:
            raise FileExistsError(
                f"{c.out} is a finished cache of {writer.rows_done:,} tokens, and a finished "
                f"cache is not extended (to {c.tokens:,}): harvest into a new --out"
            )
        if not quiet:
            print(
                f"{c.out}: harvest already complete ({writer.rows_done:,} tokens)", file=sys.stderr
            )
        return True

    def check_extent(self, rows_done: int) -> None:
        """Refuse to resume with fewer --tokens than are written: cutting would delete shards."""
        c = self.cfg
        if rows_done > c.tokens:
            raise ValueError(
                f"{c.out} is an unfinished cache that already holds {rows_done:,} tokens, "
                f"more than --tokens {c.tokens:,}: resume with --tokens {rows_done:,} or "
                "more, or harvest into a new --out"
            )

    def write_shards(
        self,
        writer: CacheWriter,
        start: int,
        submitted: int,
        mine: Callable[[int], bool],
        show: bool = True,
    ) -> None:
        """Forward and write shards start.. that are `mine` until --tokens rows are reached,
        counting every shard's rows (a rank of a split harvest skips the other ranks'), the last
        one cut there. `submitted`: the rows before shard `start`."""
        c = self.cfg
        windows = islice(self.windows(), start * c.shard_windows, None)
        # tokenizing is host work too (on an H200 it took 2x the forward passes of SmolLM2's
        # first 7 layers): the next shard's windows are made while this one's forwards run
        background = host_core_spare(self.device)
        shards = prefetched(
            enumerate(iter(lambda: list(islice(windows, c.shard_windows)), []), start),
            depth=int(background),
        )
        bar = progress(total=c.tokens, initial=submitted, unit="tok", unit_scale=True,
                       desc="harvest", disable=not show)  # fmt: skip
        pending: Future | None = None
        # serializing and hashing a shard is CPU work: the writer thread does it where it has a
        # core; otherwise it is done in line, and only the I/O (write, fsync, rename), which
        # barely uses a core, overlaps the next forward passes
        with ThreadPoolExecutor(max_workers=1) as pool, closing(shards):
            for index, shard in shards:
                if submitted >= c.tokens:
                    break
                held = np.cumsum([window_rows(w) for w in shard])  # rows up to each window
                rows, wanted = int(held[-1]), c.tokens - submitted
                if mine(index):
                    first_window = index * c.shard_windows
                    needed = shard[: windows_for(held, wanted, c.batch_size)]
                    acts = self.shard_rows(needed, first_window, first_window // c.batch_size)
                    acts, trimmed = {k: v[:wanted] for k, v in acts.items()}, rows > wanted
                    prepared = None if background else writer.prepare(acts, trimmed)
                    if pending is not None:
                        pending.result()  # at most one shard in flight: memory stays bounded
                    pending = (
                        pool.submit(writer.write_shard, acts, trimmed, index)
                        if background
                        else pool.submit(writer.commit, prepared, index)
                    )
                submitted += min(rows, wanted)
                bar.update(min(rows, wanted))
            if pending is not None:
                pending.result()
        bar.close()

    def finish(self, writer: CacheWriter) -> ActivationCache:
        c = self.cfg
        if not writer.rows_done:  # a "complete" empty cache would refuse the run after a fix
            raise self.no_window(f"nothing harvested, and {c.out} has no manifest")
        note = None
        if writer.rows_done < c.tokens:
            note = (
                f"the dataset ended after {writer.rows_done:,} tokens; {c.tokens:,} were asked for"
            )
            print(f"{c.out}: {note}", file=sys.stderr)
        writer.finish(note)
        print(
            f"{c.out}: {writer.rows_done:,} tokens x {len(c.hook)} hookpoints in {writer.shards_done} shards",
            file=sys.stderr,
        )
        return ActivationCache(c.out)


def window_rows(w: Window) -> int:
    """The rows a window gives: its real tokens but the first (shard_rows keeps those)."""
    return int((w.docs[1:] != PAD_DOC).sum())


def windows_for(held: np.ndarray, rows: int, batch_size: int) -> int:
    """How many of a shard's windows to forward for its first `rows` rows (`held`: the rows up to
    and including each window): whole batches, so that each row is computed in the batch it has
    in a whole shard (the last shard, cut at --tokens, is then the first rows of the whole one,
    bit for bit, as a resume to more tokens needs)."""
    needed = int(np.searchsorted(held, rows)) + 1  # the window holding the `rows`-th row
    return min(len(held), -(-needed // batch_size) * batch_size)


class WindowStream:
    """The dataset's windows end to end, pass after pass, forwarded only when a stretch of their
    rows is read. The last window forwarded is held, since the next stretch may start in it."""

    def __init__(self, harvester: Harvester):
        self.harvester = harvester
        # index, rows start:stop, window
        self.pending: deque[tuple[int, int, int, Window]] = deque()
        self.held: tuple[int, int, dict[str, Tensor]] = (0, 0, {})  # rows start:stop, acts

    def sizes(self) -> Iterator[int]:
        """Each window's rows, as train/order.py counts them; the window waits in `pending`."""
        index = position = 0
        for epoch in range(sys.maxsize):
            before = position
            for w in self.harvester.windows(epoch):
                rows = window_rows(w)
                self.pending.append((index, position, position + rows, w))
                index, position = index + 1, position + rows
                yield rows
            if position == before:  # another pass would find none either
                raise self.harvester.no_window("nothing to train on")

    def read(self, lo: int, hi: int) -> dict[str, Tensor]:
        """{hook: [hi - lo, d]}, rows lo:hi of the stream (stretches come in increasing order)."""
        while self.pending and self.pending[0][2] <= lo:
            self.pending.popleft()
        start, stop, acts = self.held
        parts = [(start, acts)] if start <= lo < stop else []
        after = stop if parts else lo  # the windows needed end past this
        todo = [p for p in takewhile(lambda p: p[1] < hi, self.pending) if p[2] > after]
        if todo:
            first = todo[0][0]
            rows = self.harvester.shard_rows(
                [p[3] for p in todo], first, first // self.harvester.cfg.batch_size
            )
            new = {h: rows[acts_key(h)] for h in self.harvester.cfg.hook}
            parts.append((todo[0][1], new))
            last = todo[-1]
            self.held = (
                last[1],
                last[2],
                {h: v[len(v) - (last[2] - last[1]) :] for h, v in new.items()},
            )
        base = parts[0][0]
        return {
            h: torch.cat([p[h] for _, p in parts])[lo - base : hi - base]
            for h in self.harvester.cfg.hook
        }


def _to_host(t: Tensor) -> Tensor:
    """Device -> host. On CUDA into pinned memory without blocking, so the copy overlaps the next
    forward pass (shard_rows synchronizes once per shard)."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def harvest(cfg: HarvestConfig | None = None, **overrides) -> ActivationCache:
    """Harvest activations into a cache (resuming one that was interrupted); returns its reader.
    Under torchrun the windows' shards are split over the processes (Harvester.run_part)."""
    from dataclasses import replace

    cfg = replace(cfg or HarvestConfig(), **overrides)
    world = World()
    if world.size == 1:
        with exclusive(cfg.out):  # before the model loads: a second writer is refused at once
            return Harvester(cfg).run()
    cfg = replace(cfg, device=str(world.device(resolve_device(cfg.device))))
    # rank 0 holds the lock; the others write nothing before run_part's first barrier
    with exclusive(cfg.out) if world.is_main else nullcontext():
        return Harvester(cfg).run_part(world)
