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

FORMAT = "sae-forge-activations/1"
MANIFEST = "manifest.json"
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

    def __init__(self, url: str, identity: dict[str, Any]):
        self.url = url
        self.fs, self.root = _filesystem(url)
        if isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(self.root, exist_ok=True)
        else:
            self._check_bucket(url)
        identity = {"format": FORMAT, **identity}
        existing = (
            _read_manifest(self.fs, self.root, url)
            if self.fs.exists(_join(self.root, MANIFEST))
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

    def commit(self, shard: PreparedShard) -> None:
        """The I/O half: store the shard under the next name, then record it in the manifest."""
        name = f"shard-{self.shards_done:05d}.safetensors"
        _put(self.fs, _join(self.root, name), shard.data)
        self.manifest["shards"].append({"name": name, **shard.entry})
        self.manifest["token_count"] += shard.entry["rows"]
        self._save_manifest()

    def write_shard(self, tensors: dict[str, torch.Tensor], trimmed: bool = False) -> None:
        self.commit(self.prepare(tensors, trimmed))

    def drop_trimmed(self) -> None:
        """Forget a last shard cut short to an earlier --tokens (a harvest stopped before it
        finished), so that a harvest asking for more redoes it whole instead of skipping the
        rows its windows held beyond the cut."""
        if self.manifest["shards"] and self.manifest["shards"][-1].get("trimmed"):
            self.manifest["token_count"] -= self.manifest["shards"].pop()["rows"]
            self._save_manifest()

    def finish(self, note: str | None = None) -> None:
        self.manifest["complete"] = True
        if note:
            self.manifest["note"] = note
        self._save_manifest()

    def _save_manifest(self) -> None:
        self.manifest["stats"] = _total_stats(self.manifest)
        _put(self.fs, _join(self.root, MANIFEST), json.dumps(self.manifest, indent=1).encode())


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


def _read_manifest(fs: fsspec.AbstractFileSystem, root: str, url: str) -> dict[str, Any]:
    try:
        manifest = json.loads(fs.cat_file(_join(root, MANIFEST)))
    except json.JSONDecodeError as e:
        raise CacheError(f"{url}/{MANIFEST} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise CacheError(f"{url}/{MANIFEST} should be a JSON object, not {type(manifest).__name__}")
    if missing := [k for k in MANIFEST_KEYS if k not in manifest]:
        raise CacheError(
            f"{url}/{MANIFEST}: missing keys {missing} (an edited or damaged manifest)"
        )
    if manifest.get("format") != FORMAT:
        raise CacheError(
            f"{url}/{MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    names = [shard["name"] for shard in manifest["shards"]]
    if repeated := sorted({n for n in names if names.count(n) > 1}):  # verify() read them twice
        raise CacheError(f"{url}/{MANIFEST}: shards {repeated} listed more than once (edited?)")
    for key in ("d_in", "stats") if manifest["shards"] else ("d_in",):  # stats come with shards
        # hookpoints edited apart from these failed in train with a bare KeyError
        if unmatched := sorted(set(manifest["hookpoints"]) ^ set(manifest[key])):
            raise CacheError(
                f"{url}/{MANIFEST}: hookpoints and {key} disagree on {unmatched} (edited?)"
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
        entry, problems = self.shards[i], []
        if len(t) != entry["rows"]:
            problems.append(f"{len(t)} rows, the manifest says {entry['rows']}")
        hook = name.removeprefix("acts.")
        if name != hook and hook in self.hookpoints:
            if str(t.dtype).removeprefix("torch.") != self.manifest["dtype"]:
                problems.append(f"dtype {t.dtype}, the manifest says {self.manifest['dtype']}")
            if t.shape[-1] != self.manifest["d_in"][hook]:
                problems.append(
                    f"width {t.shape[-1]}, the manifest says {self.manifest['d_in'][hook]}"
                )
        if problems:
            raise CorruptShard(f"{self.url}: shard {entry['name']}, {name}: " + "; ".join(problems))
        return t

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
        parts, order = [], []
        for s in np.unique(shard_of):
            local = index[shard_of == s] - self.offsets[s]
            parts.append(self._shard_tensor(int(s), name)[torch.as_tensor(local)])
            order.append(np.nonzero(shard_of == s)[0])
        if not parts:
            return torch.empty(0)
        out = torch.cat(parts)
        return out[torch.as_tensor(np.argsort(np.concatenate(order), kind="stable"))]

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

    def batches(
        self,
        batch_size: int,
        hook: str | list[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        buffer_rows: int = 262_144,
        drop_last: bool = False,
    ) -> Iterator[Any]:
        """[batch_size, d_in] activations of one hookpoint, or, for a list of hookpoints, dicts
        of them for the same rows (one read of the data for several SAEs). Shuffled: shards in a
        seeded random order, rows mixed within a buffer of about `buffer_rows` rows (whole shards
        are loaded), so memory is bounded by the buffer, not the cache. Every shard read is
        hash-checked. Arguments are checked here, at the call, not at the first batch."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        hooks = [self._hook(h) for h in hook] if isinstance(hook, list) else [self._hook(hook)]
        return self._batches(batch_size, hooks, isinstance(hook, list), shuffle, seed,
                             buffer_rows, drop_last)  # fmt: skip

    def _batches(
        self, batch_size: int, hooks: list[str], as_dicts: bool, shuffle: bool, seed: int,
        buffer_rows: int, drop_last: bool,
    ) -> Iterator[Any]:  # fmt: skip
        keys = [acts_key(h) for h in hooks]
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.shards)) if shuffle else np.arange(len(self.shards))
        pending: list[dict[str, torch.Tensor]] = []
        held = 0
        for n, i in enumerate(order):
            shard = self.read_shard(int(i))
            pending.append({k: shard[k] for k in keys})
            held += self.shards[i]["rows"]
            if held < buffer_rows and n + 1 < len(order):
                continue
            block = {k: torch.cat([p[k] for p in pending]) for k in keys}
            if shuffle:
                perm = torch.as_tensor(rng.permutation(len(block[keys[0]])))
                block = {k: v[perm] for k, v in block.items()}
            rows = len(block[keys[0]])
            full = rows // batch_size * batch_size
            for start in range(0, full, batch_size):
                yield self._pick(
                    {k: v[start : start + batch_size] for k, v in block.items()}, as_dicts, keys
                )
            pending = [{k: v[full:] for k, v in block.items()}] if full < rows else []
            held = rows - full
        if pending and not drop_last:
            yield self._pick(pending[0], as_dicts, keys)

    @staticmethod
    def _pick(batch: dict[str, torch.Tensor], as_dicts: bool, keys: list[str]) -> Any:
        return (
            {k.removeprefix("acts."): v for k, v in batch.items()} if as_dicts else batch[keys[0]]
        )


def load_cache(url: str) -> ActivationCache:
    """Open a cache written by `sae harvest` (a local path or fsspec URL such as s3://bucket/prefix)."""
    return ActivationCache(str(url))
