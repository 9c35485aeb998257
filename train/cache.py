"""The sharded activation cache: a directory (local path or any fsspec URL, s3:// included) with

    manifest.json                    what was harvested, and the list of finished shards
    shard-00000.safetensors ...      per row: activations per hookpoint, token id, document,
                                     position in its window, and window index

A shard becomes visible only once fully written: locally it is written to a temporary name,
fsynced and renamed; on object stores a PUT is all-or-nothing. The manifest is rewritten (the same
way) after each shard, so it never lists a shard that is not complete. Each shard's sha256 is in
the manifest and is checked whenever the shard is read in full.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sae.io import atomic_write
from train import order

FORMAT = "sae-forge-activations/1"
MANIFEST = "manifest.json"
PART = "manifest.part-{}.json"
"""A rank's manifest of the shards it wrote in a harvest split over processes (merged at the end)."""
META_KEYS = ("tokens", "docs", "positions", "windows")
MANIFEST_KEYS = (
    "format",
    "hookpoints",
    "d_in",
    "dtype",
    "shards",
    "token_count",
    "stats",
    "complete",
)
"""What a reader needs from a manifest (older caches may lack some of the identity's keys)."""
IDENTITY = (
    "format",
    "model",
    "model_revision",
    "revision",
    "hookpoints",
    "d_in",
    "dtype",
    "precision",
    "context_size",
    "prepend_bos",
    "dataset",
    "split",
    "pack",
    "seed",
    "text_column",
    "shard_windows",
    "dataset_fingerprint",
)
"""Manifest fields that must match for a harvest to add to an existing cache (shard_windows too:
a resumed harvest skips shards x shard_windows windows). Caches from before a field was recorded
are not compared on it."""
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
}  # fmt: skip
"""Safetensors' dtype names, for reading part of a shard."""


class CacheError(RuntimeError):
    """A cache that cannot be used as asked; the message names the cache and the problem."""


class CorruptShard(CacheError):
    """A shard whose bytes do not match its manifest entry (flipped bits, truncation)."""


class CacheMismatch(CacheError):
    """A harvest into a cache made from another model, hookpoint or setting."""


def acts_key(hook: str) -> str:
    return f"acts.{hook}"


# -- storage helpers ------------------------------------------------------------------------------
def _put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` so that readers see either nothing or all of it."""
    if isinstance(fs, LocalFileSystem):
        atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(data))
    else:
        fs.pipe_file(path, data)  # one PUT: objects appear whole or not at all


def _filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of a cache URL; a scheme whose package is missing (gs://
    without gcsfs) is named with what to install."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise ValueError(f"cannot open {url}: {e}") from e


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


# -- writing --------------------------------------------------------------------------------------
class PreparedShard(NamedTuple):
    data: bytes
    """The serialized safetensors file."""
    entry: dict[str, Any]
    """Its manifest entry, less the name (given at commit, in order)."""


class CacheWriter:
    """Appends shards to a cache; reopening with the same identity resumes after the last shard."""

    def __init__(self, url: str, identity: dict[str, Any], part: int | None = None):
        """`part`: the rank of a harvest split over processes, which records the shards it
        writes in its own part manifest (PART); `merge_parts` gathers them into the manifest."""
        self.url = url
        self.fs, self.root = _filesystem(url)
        if isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(self.root, exist_ok=True)
        else:
            self._check_bucket(url)
        self.name = MANIFEST if part is None else PART.format(part)
        identity = {"format": FORMAT, **identity}
        existing = (
            _read_manifest(self.fs, self.root, url, self.name)
            if self.fs.exists(_join(self.root, self.name))
            else None
        )
        if existing is not None:
            diffs = [
                f"{k}: cache has {existing.get(k)!r}, this harvest {identity.get(k)!r}"
                for k in IDENTITY
                if k in existing and existing[k] != identity.get(k)
            ]
            if diffs:
                raise CacheMismatch(
                    f"{url} holds a different harvest; refusing to mix. " + "; ".join(diffs)
                )
            self.manifest = existing
            if part is None:  # a rank's temporaries may be another rank's shard in flight
                self._remove_temporaries()
        else:
            self.manifest = {
                **identity,
                "shards": [],
                "complete": False,
                "token_count": 0,
                "stats": {},
            }

    def _check_bucket(self, url: str) -> None:
        """A missing bucket is named here (makedirs would create one); `info`, unlike `exists`,
        lets credential and connection errors through, which `exists` reported as no bucket."""
        bucket = self.root.split("/")[0]
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{url}: bucket {bucket!r} does not exist (create it first)"
            ) from None

    def _remove_temporaries(self) -> None:
        """Delete the half-written temporary files (`.shard-00007.safetensors.*.tmp`) that a
        killed harvest leaves locally: nothing reads them, they only take disk."""
        if isinstance(self.fs, LocalFileSystem):
            for tmp in Path(self.root).glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    @property
    def shards_done(self) -> int:
        return len(self.manifest["shards"])

    @property
    def rows_done(self) -> int:
        return self.manifest["token_count"]

    def prepare(self, tensors: dict[str, torch.Tensor], trimmed: bool = False) -> PreparedShard:
        """The CPU half of writing a shard: serialize, hash, and sum the statistics. `trimmed`:
        its windows gave more rows than it keeps (the harvest's last, cut to --tokens)."""
        data = save_safetensors({k: v.contiguous() for k, v in tensors.items()})
        entry = {
            "rows": int(tensors["tokens"].shape[0]),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "stats": {
                hook: _shard_stats(tensors[acts_key(hook)]) for hook in self.manifest["hookpoints"]
            },
        }
        if trimmed:
            entry["trimmed"] = True
        return PreparedShard(data, entry)

    def commit(self, shard: PreparedShard, index: int | None = None) -> None:
        """The I/O half: store the shard under its name (shard number `index`, by default the
        next), then record it in the manifest."""
        name = shard_name(self.shards_done if index is None else index)
        _put(self.fs, _join(self.root, name), shard.data)
        self.manifest["shards"].append({"name": name, **shard.entry})
        self.manifest["token_count"] += shard.entry["rows"]
        self._save_manifest()

    def write_shard(
        self, tensors: dict[str, torch.Tensor], trimmed: bool = False, index: int | None = None
    ) -> None:
        self.commit(self.prepare(tensors, trimmed), index)

    def parts(self) -> list[int]:
        """The ranks with a part manifest in this cache's folder (a harvest split over
        processes, perhaps over another number of them before it was resumed)."""
        paths = self.fs.glob(_join(self.root, PART.format("*")))
        return sorted(int(p.rsplit("part-", 1)[1].removesuffix(".json")) for p in paths)

    def merge_parts(self) -> None:
        """Take the ranks' part manifests' shards, in order, as this manifest's (which is then
        the one a single process writes for the same windows), and delete the parts."""
        names = [PART.format(rank) for rank in self.parts()]
        shards = sorted(
            (s for name in names for s in _read_manifest(self.fs, self.root, self.url, name)["shards"]),
            key=lambda s: s["name"],
        )  # fmt: skip
        if [s["name"] for s in shards] != [shard_name(i) for i in range(len(shards))]:
            raise CacheError(f"{self.url}: the ranks' shards are not numbered 0..{len(shards) - 1}")
        self.manifest["shards"] = shards
        self.manifest["token_count"] = sum(s["rows"] for s in shards)
        self._save_manifest()
        for name in names:
            self.fs.rm(_join(self.root, name))

    def drop_trimmed(self) -> None:
        """Forget a last shard cut short to an earlier --tokens (a harvest stopped before it
        finished), so that a harvest asking for more redoes it whole instead of skipping the
        rows its windows held beyond the cut."""
        if trimmed := [s for s in self.manifest["shards"] if s.get("trimmed")]:
            self.manifest["shards"] = [s for s in self.manifest["shards"] if s not in trimmed]
            self.manifest["token_count"] -= sum(s["rows"] for s in trimmed)
            self._save_manifest()

    def finish(self, note: str | None = None) -> None:
        self.manifest["complete"] = True
        if note:
            self.manifest["note"] = note
        self._save_manifest()

    def _save_manifest(self) -> None:
        self.manifest["stats"] = _total_stats(self.manifest)
        _put(self.fs, _join(self.root, self.name), json.dumps(self.manifest, indent=1).encode())


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _shard_stats(x: torch.Tensor) -> dict[str, Any]:
    """Sums that add up across shards: per-dimension sum, sum of norms, sum of squared norms."""
    x = x.float()  # float32 within a shard (pairwise sums), float64 across shards
    norms = x.norm(dim=-1).double()
    return {
        "sum": x.sum(0).double().tolist(),
        "sum_norm": float(norms.sum()),
        "sum_sq_norm": float((norms**2).sum()),
    }


def _total_stats(manifest: dict[str, Any]) -> dict[str, Any]:
    """Per hookpoint: mean vector, mean norm, and the SAELens input scale sqrt(d_in) / mean norm."""
    n = manifest["token_count"]
    out = {}
    for hook in manifest["hookpoints"]:
        if n == 0:
            continue
        parts = [s["stats"][hook] for s in manifest["shards"]]
        mean_norm = sum(p["sum_norm"] for p in parts) / n
        out[hook] = {
            "mean": (np.sum([p["sum"] for p in parts], axis=0) / n).tolist(),
            "mean_norm": mean_norm,
            "mean_sq_norm": sum(p["sum_sq_norm"] for p in parts) / n,
            "norm_scaling_factor": math.sqrt(manifest["d_in"][hook]) / mean_norm
            if mean_norm > 0
            else 1.0,
        }
    return out


def _read_manifest(
    fs: fsspec.AbstractFileSystem, root: str, url: str, name: str = MANIFEST
) -> dict[str, Any]:
    try:
        manifest = json.loads(fs.cat_file(_join(root, name)))
    except json.JSONDecodeError as e:
        raise CacheError(f"{url}/{name} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise CacheError(f"{url}/{name} should be a JSON object, not {type(manifest).__name__}")
    if missing := [k for k in MANIFEST_KEYS if k not in manifest]:
        raise CacheError(f"{url}/{name}: missing keys {missing} (an edited or damaged manifest)")
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{url}/{name}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    names = [shard["name"] for shard in manifest["shards"]]
    if repeated := sorted({n for n in names if names.count(n) > 1}):  # verify() read them twice
        raise CacheError(f"{url}/{name}: shards {repeated} listed more than once (edited?)")
    for key in ("d_in", "stats") if manifest["shards"] else ("d_in",):  # stats come with shards
        # hookpoints edited apart from these failed in train with a bare KeyError
        if unmatched := sorted(set(manifest["hookpoints"]) ^ set(manifest[key])):
            raise CacheError(
                f"{url}/{name}: hookpoints and {key} disagree on {unmatched} (edited?)"
            )
    return manifest


# -- reading --------------------------------------------------------------------------------------
class ActivationCache:
    """Read side: manifest, verification, random access and shuffled batches."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = _filesystem(url)
        if not self.fs.exists(_join(self.root, MANIFEST)):
            raise FileNotFoundError(f"no activation cache at {url} (no {MANIFEST})")
        self.manifest = _read_manifest(self.fs, self.root, url)
        if not self.manifest["complete"]:  # readable up to its last shard, but not what was asked
            warnings.warn(
                f"{url} is an unfinished harvest ({self.manifest['token_count']:,} tokens so far): "
                "run the same `sae harvest` again to complete it",
                stacklevel=2,
            )
        self.shards = self.manifest["shards"]
        self._headers: dict[int, tuple[dict[str, Any], int]] = {}  # shard_rows reads them once
        self.offsets = np.cumsum([0] + [s["rows"] for s in self.shards])  # where each shard starts
        if self.offsets[-1] != self.manifest["token_count"]:
            raise CacheError(
                f"{url}/{MANIFEST}: token_count {self.manifest['token_count']} but its shards hold "
                f"{self.offsets[-1]} rows (an edited or damaged manifest)"
            )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def hookpoints(self) -> list[str]:
        return list(self.manifest["hookpoints"])

    def d_in(self, hook: str | None = None) -> int:
        return self.manifest["d_in"][self._hook(hook)]

    def stats(self, hook: str | None = None) -> dict[str, Any]:
        return self.manifest["stats"][self._hook(hook)]

    def _hook(self, hook: str | None) -> str:
        if hook is None:
            if len(self.hookpoints) != 1:
                raise ValueError(f"{self.url} holds several hookpoints {self.hookpoints}; name one")
            return self.hookpoints[0]
        if hook not in self.hookpoints:
            raise KeyError(f"{self.url} has no hookpoint {hook!r}; it has {self.hookpoints}")
        return hook

    def _path(self, i: int) -> str:
        return _join(self.root, self.shards[i]["name"])

    def read_shard(self, i: int) -> dict[str, torch.Tensor]:
        """A whole shard, after checking its size and sha256 against the manifest."""
        if not 0 <= i < len(self.shards):
            raise IndexError(f"{self.url} has shards 0..{len(self.shards) - 1}, not {i}")
        entry = self.shards[i]
        try:
            data = self.fs.cat_file(self._path(i))
        except FileNotFoundError as e:
            raise CorruptShard(f"{self.url}: shard {entry['name']} is missing") from e
        if len(data) != entry["bytes"]:
            raise CorruptShard(
                f"{self.url}: shard {entry['name']} has {len(data)} bytes, the manifest says {entry['bytes']} (truncated?)"
            )
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CorruptShard(
                f"{self.url}: shard {entry['name']} fails its sha256 check (corrupted)"
            )
        tensors = load_safetensors(data)
        expected = [*META_KEYS, *map(acts_key, self.hookpoints)]
        if missing := [k for k in expected if k not in tensors]:
            raise CorruptShard(f"{self.url}: shard {entry['name']} has no {missing}")
        return {k: self._as_listed(i, k, t) for k, t in tensors.items()}

    def _as_listed(self, i: int, name: str, t: torch.Tensor) -> torch.Tensor:
        """t, once it has the rows (and, activations, the dtype and width) the manifest lists: the
        sha256 vouches for a shard's bytes, not for the manifest's account of them."""
        self._check_listed(i, name, t.dtype, list(t.shape))
        return t

    def _check_listed(self, i: int, name: str, dtype: torch.dtype | None, shape: list[int]) -> None:
        entry, problems = self.shards[i], []
        if shape[0] != entry["rows"]:
            problems.append(f"{shape[0]} rows, the manifest says {entry['rows']}")
        hook = name.removeprefix("acts.")
        if name != hook and hook in self.hookpoints:
            if str(dtype).removeprefix("torch.") != self.manifest["dtype"]:
                problems.append(f"dtype {dtype}, the manifest says {self.manifest['dtype']}")
            if shape[-1] != self.manifest["d_in"][hook]:
                problems.append(
                    f"width {shape[-1]}, the manifest says {self.manifest['d_in'][hook]}"
                )
        if problems:
            raise CorruptShard(f"{self.url}: shard {entry['name']}, {name}: " + "; ".join(problems))

    def verify(self) -> None:
        """Check every shard's bytes; raises CorruptShard naming the first bad one."""
        for i in range(len(self.shards)):
            self.read_shard(i)

    def rows(self, index: np.ndarray | list[int], key: str) -> torch.Tensor:
        """Random access to rows (global indices) of one tensor: an hookpoint name or one of
        tokens/docs/positions/windows. Local shards are memory-mapped, so only the touched rows
        are read; this path checks sizes, not hashes (use verify() for that)."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for {self.url} with {len(self)} rows")
        name = key if key in META_KEYS else acts_key(self._hook(key))
        shard_of = np.searchsorted(self.offsets, index, side="right") - 1
        parts, places = [], []  # each part's rows' places in index
        for s in np.unique(shard_of):
            local = index[shard_of == s] - self.offsets[s]
            parts.append(self._shard_tensor(int(s), name)[torch.as_tensor(local)])
            places.append(np.nonzero(shard_of == s)[0])
        if not parts:
            return torch.empty(0)
        out = torch.cat(parts)
        return out[torch.as_tensor(np.argsort(np.concatenate(places), kind="stable"))]

    def _shard_tensor(self, i: int, name: str) -> torch.Tensor:
        if isinstance(self.fs, LocalFileSystem):
            path = self._path(i)
            if not os.path.exists(path):
                raise CorruptShard(f"{self.url}: shard {self.shards[i]['name']} is missing")
            if os.path.getsize(path) != self.shards[i]["bytes"]:
                raise CorruptShard(
                    f"{self.url}: shard {self.shards[i]['name']} has the wrong size (truncated?)"
                )
            try:
                with safe_open(path, framework="pt") as f:
                    return self._as_listed(i, name, f.get_tensor(name))
            except SafetensorError as e:
                raise CorruptShard(
                    f"{self.url}: shard {self.shards[i]['name']} is unreadable: {e}"
                ) from e
        return self.read_shard(i)[name]

    def shard_rows(self, i: int, start: int, stop: int, keys: list[str]) -> dict[str, torch.Tensor]:
        """Rows start:stop of some tensors of shard i, reading only their bytes (one ranged read
        each, at once: a rank of a data-parallel run reads its part of a shard, not all of it).
        A part has no hash to check: its header, sizes, dtype and width are checked."""
        header, base = self._header(i)
        entry, spans, shapes = self.shards[i], [], []
        for key in keys:
            if key not in header:
                raise CorruptShard(f"{self.url}: shard {entry['name']} has no {key}")
            shape, (first, last) = header[key]["shape"], header[key]["data_offsets"]
            self._check_listed(i, key, SAFETENSORS_DTYPES.get(header[key]["dtype"]), shape)
            row = (last - first) // max(1, shape[0])  # bytes per row
            spans.append((base + first + start * row, base + first + stop * row))
            shapes.append((SAFETENSORS_DTYPES[header[key]["dtype"]], [stop - start, *shape[1:]]))
        data = self._ranges(i, spans)
        return {
            key: torch.frombuffer(bytearray(d), dtype=dtype).reshape(shape)
            for key, d, (dtype, shape) in zip(keys, data, shapes, strict=True)
        }

    def _header(self, i: int) -> tuple[dict[str, Any], int]:
        """Shard i's safetensors header (per tensor: dtype, shape, byte offsets) and where its data
        begins: two small reads, once per shard."""
        if i not in self._headers:
            (size,) = self._ranges(i, [(0, 8)])
            n = int.from_bytes(size, "little")
            if not 0 < n < self.shards[i]["bytes"]:
                raise CorruptShard(f"{self.url}: shard {self.shards[i]['name']} is unreadable")
            (text,) = self._ranges(i, [(8, 8 + n)])
            try:
                self._headers[i] = (json.loads(text), 8 + n)
            except json.JSONDecodeError as e:
                raise CorruptShard(
                    f"{self.url}: shard {self.shards[i]['name']} has an unreadable header: {e}"
                ) from e
        return self._headers[i]

    def _ranges(self, i: int, spans: list[tuple[int, int]]) -> list[bytes]:
        """Byte ranges of shard i, fetched together (concurrently on object stores)."""
        entry = self.shards[i]
        if any(stop > entry["bytes"] for _, stop in spans):
            raise CorruptShard(f"{self.url}: shard {entry['name']}: its header points past its end")
        starts, stops = zip(*spans, strict=True)
        data = self.fs.cat_ranges([self._path(i)] * len(spans), list(starts), list(stops))
        for d, (a, b) in zip(data, spans, strict=True):
            if isinstance(d, FileNotFoundError):
                raise CorruptShard(f"{self.url}: shard {entry['name']} is missing") from d
            if isinstance(d, Exception):
                raise d
            if len(d) != b - a:
                raise CorruptShard(
                    f"{self.url}: shard {entry['name']} is shorter than its manifest says (truncated?)"
                )
        return data

    def batches(
        self,
        batch_size: int,
        hook: str | list[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        buffer_rows: int = 262_144,
        drop_last: bool = False,
        rank: int = 0,
        ranks: int = 1,
    ) -> Iterator[Any]:
        """[batch_size, d_in] activations of one hookpoint, or, for a list of hookpoints, dicts
        of them for the same rows (one read of the data for several SAEs). Shuffled: shards in a
        seeded random order, then rows mixed within blocks of about `buffer_rows` rows
        (train/order.py), so memory is bounded by the block, not the cache. `rank` of `ranks`:
        that rank's rows of each of those batches (batch_size / ranks of them), read alone, about
        1/ranks of the bytes. A shard read whole is hash-checked (every one, in one process);
        a part of one is size-checked. Arguments are checked here, not at the first batch."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not 0 <= rank < ranks:
            raise ValueError(f"rank {rank} is not one of ranks 0..{ranks - 1}")
        hooks = [self._hook(h) for h in hook] if isinstance(hook, list) else [self._hook(hook)]
        return self._batches(batch_size, hooks, isinstance(hook, list), shuffle, seed,
                             buffer_rows, drop_last, rank, ranks)  # fmt: skip

    def _batches(
        self, batch_size: int, hooks: list[str], as_dicts: bool, shuffle: bool, seed: int,
        buffer_rows: int, drop_last: bool, rank: int, ranks: int,
    ) -> Iterator[Any]:  # fmt: skip
        keys = [acts_key(h) for h in hooks]
        rng = np.random.default_rng(seed)
        shards = rng.permutation(len(self.shards)) if shuffle else np.arange(len(self.shards))
        stream = _Stream(self, shards, keys)
        sizes = (self.shards[i]["rows"] for i in shards)
        for block in order.blocks(sizes, batch_size, buffer_rows, rng if shuffle else None):
            parts = [order.rank_part(b, rank, ranks) for b in block.batches]
            lo, hi = order.span(block, parts)
            rows = stream.read(lo, hi)  # {key: [hi - lo, ...]}
            for batch, part in zip(block.batches, parts, strict=True):
                if drop_last and len(batch) < batch_size:
                    return
                index = torch.as_tensor(part - lo)
                yield self._pick({k: v[index] for k, v in rows.items()}, as_dicts, keys)

    @staticmethod
    def _pick(batch: dict[str, torch.Tensor], as_dicts: bool, keys: list[str]) -> Any:
        return (
            {k.removeprefix("acts."): v for k, v in batch.items()} if as_dicts else batch[keys[0]]
        )


class _Stream:
    """A cache's shards end to end in a given order, read a stretch at a time: shards the stretch
    covers whole are read whole (and hash-checked), the ends of others in part. The last shard read
    whole is held, since the next stretch starts in it."""

    def __init__(self, cache: ActivationCache, shards: np.ndarray, keys: list[str]):
        self.cache, self.shards, self.keys = cache, shards, keys
        self.starts = np.cumsum([0] + [cache.shards[i]["rows"] for i in shards])
        self.held: tuple[int, dict[str, torch.Tensor]] | None = None

    def read(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """{key: [hi - lo, ...]}, rows lo:hi of the stream."""
        parts = []
        for j in range(int(np.searchsorted(self.starts, lo, side="right")) - 1, len(self.shards)):
            a, b = int(self.starts[j]), int(self.starts[j + 1])
            if a >= hi:
                break
            if b > a:
                parts.append(self.piece(j, max(lo, a) - a, min(hi, b) - a))
        if not parts:
            return {k: torch.empty(0) for k in self.keys}
        return {k: torch.cat([p[k] for p in parts]) for k in self.keys}

    def piece(self, j: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        i = int(self.shards[j])
        if self.held is None or self.held[0] != j:
            if (start, stop) != (0, self.cache.shards[i]["rows"]):
                return self.cache.shard_rows(i, start, stop, self.keys)
            shard = self.cache.read_shard(i)
            self.held = (j, {k: shard[k] for k in self.keys})
        return {k: v[start:stop] for k, v in self.held[1].items()}


def load_cache(url: str) -> ActivationCache:
    """Open a cache written by `sae harvest` (a local path or fsspec URL such as s3://bucket/prefix)."""
    return ActivationCache(str(url))
