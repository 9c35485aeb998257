"""Where training batches come from, built outside the Trainer: an activation cache, a model's
forward passes (no cache), or any iterable of activation tensors. A source says which hookpoints it
can give and what to record as the dictionaries' provenance; opened for the run's hookpoints, it
gives each one's width and normalization scale and an identity (what --resume compares), then
{hook: [batch_size, d]} batches for as long as asked, deterministically: resuming skips the
batches already used (a model stream recomputes them). A new kind of data is a subclass here.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, replace
from hashlib import sha256
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from train import order
from train.cache import ActivationCache
from train.config import HarvestConfig

Data = str | Path | ActivationCache | HarvestConfig | Iterable[Tensor]


class Source:
    meta: dict[str, Any]
    """Provenance for each dictionary's config: model_name, model_revision, context_size,
    dataset_path."""
    identity: dict[str, Any] | None = None
    """What the data is, for --resume to refuse other data (None: unknowable, an iterable)."""
    d_in: dict[str, int]
    scale: dict[str, float]
    """Each hookpoint's width, and its scale to mean norm sqrt(d) (set by open)."""

    def default_hook(self) -> str:
        """The hookpoint of a dictionary that names none."""
        raise NotImplementedError

    def check(self, hooks: set[str], who: str) -> None:
        """Refuse, naming `who`, hookpoints this source cannot give."""

    def open(
        self, hooks: list[str], batch_size: int, seed: int, rank: int = 0, ranks: int = 1
    ) -> None:
        """Get ready to give, of every global batch of batch_size rows, rank `rank`'s
        batch_size / ranks rows (its contiguous n-th: train/order.py)."""
        raise NotImplementedError

    def narrow(self, hooks: list[str]) -> None:
        """Give only these of the opened hookpoints where that saves reading (a rank of a
        distributed sweep needs only its dictionaries'); other sources give them all."""

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        raise NotImplementedError


class CacheSource(Source):
    """A harvested cache, reshuffled each pass."""

    def __init__(self, cache: str | Path | ActivationCache):
        self.cache = cache if isinstance(cache, ActivationCache) else ActivationCache(str(cache))
        m = self.cache.manifest
        self.meta = {"model_name": m["model"], "model_revision": m.get("model_revision", ""),
                     "context_size": m["context_size"], "dataset_path": m["dataset"]}  # fmt: skip

    def default_hook(self) -> str:
        hooks = self.cache.hookpoints
        if len(hooks) != 1:
            raise ValueError(
                f"the cache holds several hookpoints {hooks}; name one with --hook (`hook=` in "
                "train.fit, or `hook` per sweep entry)"
            )
        return hooks[0]

    def check(self, hooks: set[str], who: str) -> None:
        for hook in sorted(hooks - set(self.cache.hookpoints)):
            raise ValueError(
                f"SAE {who} wants hookpoint {hook!r}, but {self.cache.url} has {self.cache.hookpoints}"
            )

    def open(
        self, hooks: list[str], batch_size: int, seed: int, rank: int = 0, ranks: int = 1
    ) -> None:
        cache = self.cache
        if len(cache) < batch_size:  # every pass would yield nothing, for ever
            raise ValueError(
                f"{cache.url} holds {len(cache):,} rows, fewer than batch_size={batch_size:,}: "
                "not one batch; lower --batch-size or harvest more"
            )
        for h in hooks:  # a NaN/inf row: the manifest's scale falls back to 1.0
            if not math.isfinite(mean_norm := cache.stats(h)["mean_norm"]):
                raise ValueError(
                    f"{cache.url}: the mean_norm of {h} is {mean_norm}, so the cache holds "
                    "NaN/inf activations; harvest it again"
                )
        self.hooks, self.batch_size, self.seed = hooks, batch_size, seed
        self.rank, self.ranks = rank, ranks
        self.d_in = {h: cache.d_in(h) for h in hooks}
        self.scale = {h: cache.stats(h)["norm_scaling_factor"] for h in hooks}
        shards = "".join(s["sha256"] for s in cache.shards)  # a moved cache is the same
        self.identity = {"rows": len(cache), "shards": sha256(shards.encode()).hexdigest(),
                         "order": order.VERSION}  # fmt: skip

    def narrow(self, hooks: list[str]) -> None:
        self.hooks = hooks

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        """This rank's part of each batch; it reads only those rows."""
        for epoch in range(sys.maxsize):
            yield from self.cache.batches(
                self.batch_size, self.hooks, seed=self.seed + epoch, drop_last=True,
                rank=self.rank, ranks=self.ranks,
            )  # fmt: skip


class ChunkSource(Source):
    """Chunks of {hook: [n, d]} of any n, re-batched; widths and scales from the first chunk.
    Every rank reads every chunk and keeps its part of each batch."""

    def chunks(self, hooks: list[str], seed: int) -> Iterator[dict[str, Tensor]]:
        raise NotImplementedError

    def open(
        self, hooks: list[str], batch_size: int, seed: int, rank: int = 0, ranks: int = 1
    ) -> None:
        chunks = self.chunks(hooks, seed)
        first = next(chunks)  # peek: widths and input scales
        self._chunks, self.batch_size = chain([first], chunks), batch_size
        self.part = slice(rank * batch_size // ranks, (rank + 1) * batch_size // ranks)
        self.d_in = {h: first[h].shape[-1] for h in hooks}
        self.scale = input_scales(first)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for batch in rebatch(self._chunks, self.batch_size):
            yield {h: x[self.part] for h, x in batch.items()}


class ModelSource(Source):
    """The model's forward passes as training goes (a HarvestConfig: its text options, and any
    hookpoints the run asks for); each rank forwards only the windows holding its rows."""

    def __init__(self, harvest: HarvestConfig):
        from sae.lm import revision_name  # transformers: only a run that streams imports it

        self.harvest = harvest
        self.meta = {"model_name": harvest.model, "model_revision": revision_name(harvest.revision),
                     "context_size": harvest.context_size, "dataset_path": harvest.dataset}  # fmt: skip

    def default_hook(self) -> str:
        return self.harvest.hook[0]

    def open(
        self, hooks: list[str], batch_size: int, seed: int, rank: int = 0, ranks: int = 1
    ) -> None:
        from train.harvest import Harvester  # loads the model

        harvest = replace(self.harvest, hook=hooks, seed=seed)
        self.identity = {  # the hookpoints are each dictionary's, compared per dictionary
            k: v for k, v in asdict(harvest).items() if k not in ("out", "tokens", "device", "hook")
        } | {"order": order.VERSION, "revision": self.meta["model_revision"]}  # a folder's by path
        self.harvester = Harvester(harvest)
        self.d_in = dict(self.harvester.d_in)
        self.scale = input_scales(self.harvester.first_rows(batch_size))  # alike on every rank
        self.batch_size, self.rank, self.ranks = batch_size, rank, ranks

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        yield from self.harvester.stream(self.batch_size, self.rank, self.ranks)


class TensorSource(ChunkSource):
    """Any iterable of [n, d] activation tensors, all of one hookpoint."""

    meta = {"model_name": "", "dataset_path": ""}  # unknown: not the defaults' SmolLM2

    def __init__(self, tensors: Iterable[Tensor]):
        self.tensors = tensors

    def default_hook(self) -> str:
        """None known: the dictionary records "" unless `hook` names where the tensors came from."""
        return ""

    def chunks(self, hooks: list[str], seed: int) -> Iterator[dict[str, Tensor]]:
        if len(hooks) > 1:
            raise ValueError(
                "a stream of tensors feeds one hookpoint; give every SAE the same `hook` "
                "(transcoders need a cache or a model stream with both hookpoints)"
            )
        return ({hooks[0]: x.reshape(-1, x.shape[-1])} for x in self.tensors)


def input_scales(rows: dict[str, Tensor]) -> dict[str, float]:
    """Each hookpoint's scale to mean norm sqrt(d), measured on these rows."""
    scales = {}
    for h, x in rows.items():
        mean_norm = x.float().norm(dim=-1).mean().item()
        if not math.isfinite(mean_norm):
            raise ValueError(f"the data's first {len(x)} rows of {h} hold NaN/inf")
        scales[h] = math.sqrt(x.shape[-1]) / mean_norm if mean_norm > 0 else 1.0
    return scales


def source_for(data: Data | Source) -> Source:
    """The source of a cache (path, URL or ActivationCache), a HarvestConfig, or tensors."""
    if isinstance(data, Source):
        return data
    if isinstance(data, (str, Path, ActivationCache)):
        return CacheSource(data)
    if isinstance(data, HarvestConfig):
        return ModelSource(data)
    return TensorSource(data)


def rebatch(chunks: Iterable[dict[str, Tensor]], batch_size: int) -> Iterator[dict[str, Tensor]]:
    """{hook: [n, d]} chunks of any n -> {hook: [batch_size, d]} batches (the remainder is dropped)."""
    held: list[dict[str, Tensor]] = []
    count = 0
    for chunk in chunks:
        held.append(chunk)
        count += len(next(iter(chunk.values())))
        while count >= batch_size:
            flat = {k: torch.cat([c[k] for c in held]) for k in chunk}
            yield {k: v[:batch_size] for k, v in flat.items()}
            held, count = [{k: v[batch_size:] for k, v in flat.items()}], count - batch_size
