"""Save and restore the full training state: every SAE's weights, Adam moments, schedule, dead-latent
counters, the step and data position, and the RNG, as safetensors + JSON (never pickle).

A checkpoint is a directory written under a temporary name and renamed into place; the previous
one is kept as `checkpoint.old` until the new one is complete and on disk (files and directory
entries fsynced), so a crash or power loss at any moment leaves a loadable checkpoint.

A latent-sharded run writes it sharded: each latent shard its slices of the per-latent tensors
(`shard-I-of-N.safetensors`), the first shard the rest (`state.safetensors`) and state.json,
which records every file's sha256 and the dimension over latents of each sliced tensor. No rank
gathers a dictionary, and a run resumes with any number of shards: each reads its slice from the
files that hold it (`Stored`), one process reads them whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sae.io import atomic_write, write_text
from sae.models import WHOLE, Whole

if TYPE_CHECKING:
    from train.trainer import Member

NAME = "checkpoint"
CHECKSUM = "state_sha256"
"""The key in state.json holding state.safetensors's sha256 (a flipped bit resumed silently)."""
SHARDS = "shards"
"""The key in state.json describing a sharded checkpoint's files: {"count", "files": {name:
sha256}, "dims": {tensor: its dimension over latents}, "shapes": {tensor: its shape in each
file}}."""
T = TypeVar("T")


def save(
    run_dir: Path,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    dims: dict[str, int] | None = None,
    shards: Whole = WHOLE,
) -> None:
    """Write a checkpoint. Latent-sharded (`shards` of more than one rank), every rank of the
    group calls it: the tensors named in `dims` are its slices, written to a file of its own;
    the group's first rank writes the others and `meta` and puts the folder in place. A rank
    failing to write (a full disk) fails every rank, and the previous checkpoint stands."""
    tmp, final, old = run_dir / f".{NAME}.tmp", run_dir / NAME, run_dir / f"{NAME}.old"
    dims, first = dims or {}, shards.index == 0
    if first:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    shards.barrier()  # the folder exists before any shard writes into it

    def write_own() -> dict[str, str]:
        written = {}
        if dims:
            name = f"shard-{shards.index}-of-{shards.count}.safetensors"
            written[name] = write_tensors(tmp / name, {k: tensors[k] for k in dims})
        if first:
            rest = {k: v for k, v in tensors.items() if k not in dims}
            written["state.safetensors"] = write_tensors(tmp / "state.safetensors", rest)
        return written

    def finish(files: dict[str, str]) -> None:
        digest = files.pop("state.safetensors")
        shapes = {k: list(tensors[k].shape) for k in dims}  # each file's, alike
        shards_meta = {"count": shards.count, "files": files, "dims": dims, "shapes": shapes}
        described = {SHARDS: shards_meta} if dims else {}
        write_text(tmp / "state.json", json.dumps({**meta, CHECKSUM: digest, **described}))
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        fsync_dir(run_dir)  # the rename is on disk before the old checkpoint goes
        shutil.rmtree(old, ignore_errors=True)

    try:
        files = {k: v for written in together(shards, write_own) for k, v in written.items()}
        together(shards, lambda: finish(files) if first else None)
    except BaseException:  # no half-made folder
        if first:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def together(shards: Whole, work: Callable[[], T]) -> list[T]:
    """`work()` on every rank of the group, and every rank's result; if it fails on any rank it
    fails on all (a rank raising alone would leave the others waiting in their next collective)."""
    try:
        result, failure = work(), None
    except Exception as e:
        result, failure = None, e
    outcomes = shards.everyone((result, failure and f"{type(failure).__name__}: {failure}"))
    if failure is not None:
        raise failure
    for rank, (_, failed) in enumerate(outcomes):
        if failed:
            raise RuntimeError(
                f"latent shard {rank} could not write its part of the checkpoint: {failed}"
            )
    return [r for r, _ in outcomes]


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write tensors to a safetensors file durably; returns its sha256."""
    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))
    return file_sha256(path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (files created or renamed in it), which fsyncing the files
    does not."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(run_dir: Path) -> None:
    """Delete the run directory's checkpoints (an overwritten run's)."""
    for name in (NAME, f"{NAME}.old", f".{NAME}.tmp"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def load(run_dir: Path) -> tuple[Stored, dict[str, Any]] | None:
    """The newest complete checkpoint, or None. Saving is atomic, so a damaged one was changed
    afterwards (an edit, a failing disk): refused by name rather than resumed from."""
    for name in (NAME, f"{NAME}.old"):
        folder = run_dir / name
        if (folder / "state.json").exists() and (folder / "state.safetensors").exists():
            try:
                meta = json.loads((folder / "state.json").read_text())
            except ValueError as e:
                raise damaged(folder, e) from e
            return Stored(folder, meta), meta
    return None


def damaged(folder: Path, cause: Exception) -> ValueError:
    return ValueError(
        f"checkpoint {folder} is damaged ({cause}): it cannot be resumed from; train again "
        "with --overwrite"
    )


class Stored:
    """A checkpoint's tensors, read when asked for: whole, or one latent shard's slice, from
    state.safetensors or from the shards' files that hold it (whatever number of shards wrote
    them). A file is checked against its sha256 when first opened, and only the files a
    rank reads are opened."""

    def __init__(self, folder: Path, meta: dict[str, Any]):
        self.folder = folder
        described = meta.pop(SHARDS, {"files": {}, "dims": {}, "shapes": {}})
        self.digests = {"state.safetensors": meta.pop(CHECKSUM, None), **described["files"]}
        self.dims: dict[str, int] = described["dims"]  # a sliced tensor's dimension over latents
        self.shapes: dict[str, list[int]] = described["shapes"]  # and its shape in each file
        self.parts = [name for name in self.digests if name != "state.safetensors"]  # in order
        self.handles: dict[str, Any] = {}
        self.names = {*self.open("state.safetensors").keys(), *self.dims}

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def open(self, name: str):
        """A file's safetensors handle, its bytes checked first (a checkpoint before stop 17 has
        no sha256 for state.safetensors)."""
        if name not in self.handles:
            path, expected = self.folder / name, self.digests[name]
            try:
                if expected and file_sha256(path) != expected:
                    raise ValueError(f"{name} fails its sha256 check")
                self.handles[name] = safe_open(path, "pt")
            except (OSError, SafetensorError, ValueError) as e:
                raise damaged(self.folder, e) from e
        return self.handles[name]

    def ndim(self, key: str) -> int:
        if key in self.dims:
            return len(self.shapes[key])
        return len(self.open("state.safetensors").get_slice(key).get_shape())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.read(key)

    def read(
        self, key: str, dim: int | None = None, start: int = 0, width: int = 0
    ) -> torch.Tensor:
        """The tensor `key`, or along `dim` its `width` entries from `start` (a latent shard's
        slice)."""
        if key not in self.dims:
            if dim is None:
                return self.open("state.safetensors").get_tensor(key)
            return self.open("state.safetensors").get_slice(key)[cut(dim, start, start + width)]
        stored = self.dims[key]
        if dim is None:
            return torch.cat([self.open(name).get_tensor(key) for name in self.parts], stored)
        if dim != stored:
            raise ValueError(f"{key} is sliced over dimension {stored} in {self.folder}, not {dim}")
        size, pieces = self.shapes[key][dim], []  # the files overlapping [start, start + width)
        for index in range(start // size, (start + width - 1) // size + 1):
            lo, hi = max(start - index * size, 0), min(start + width - index * size, size)
            pieces.append(self.open(self.parts[index]).get_slice(key)[cut(dim, lo, hi)])
        return torch.cat(pieces, dim)


def cut(dim: int, lo: int, hi: int) -> tuple[slice, ...]:
    """The index of entries lo..hi-1 along `dim`."""
    return (slice(None),) * dim + (slice(lo, hi),)


def member_state(
    prefix: str, m: Member, host: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, Any]]:
    """One member's tensors, under `prefix` (its weights, dead-latent counter, Adam moments), the
    dimension over latents of those that are this rank's slice (a latent shard's per-latent
    tensors; none where all latents are in this process), and its metadata (its resolved spec,
    the optimizer's layout, the schedule, the prefix). `host`: copied to host memory (to send to
    another rank)."""
    tensors = {f"{prefix}.sae.{k}": v for k, v in m.sae.state_dict().items()}
    tensors[f"{prefix}.tokens_since_fired"] = m.tokens_since_fired
    opt_tensors, opt_meta = flatten_optimizer(f"{prefix}.opt", m.optimizer.state_dict())
    meta = {"spec": asdict(m.spec), "optimizer": opt_meta, "schedule": m.schedule.state_dict(),
            "prefix": prefix}  # fmt: skip
    tensors |= opt_tensors
    ranks = {k: v.dim() for k, v in tensors.items()}
    dims = {k: d for k, d in latent_dims(prefix, m, ranks).items() if d is not None}
    return {k: v.cpu() for k, v in tensors.items()} if host else tensors, dims, meta


def latent_dims(prefix: str, m: Member, ranks: dict[str, int]) -> dict[str, int | None]:
    """The dimension over latents of each of a member's checkpoint tensors, given their numbers
    of dimensions (None: replicated, or a member whose latents are all in this process)."""
    if m.shards.count == 1:
        return dict.fromkeys(ranks)
    # Adam's state is indexed by the parameters' order in its groups
    names = {id(p): name for name, p in m.sae.named_parameters()}
    order = [names[id(p)] for group in m.optimizer.param_groups for p in group["params"]]
    dims: dict[str, int | None] = {}
    for key, rank in ranks.items():
        name = key.removeprefix(prefix + ".")
        if name.startswith("sae."):
            dims[key] = m.sae.latent_dim(name.removeprefix("sae."))
        elif name.startswith("opt."):
            index = int(name.split(".")[1])
            dims[key] = m.sae.latent_dim(order[index]) if rank else None  # Adam's step
        else:
            dims[key] = rank - 1  # tokens_since_fired: the last dimension (a CLT's [layers, F])
    return dims


def restore_member(m: Member, stored: Stored, meta: dict[str, Any]) -> None:
    """Load what member_state saved into a member built as the run builds it (a latent shard
    reads its slice of each tensor), under the prefix its metadata names, whatever the member's
    place in the sweep now."""
    prefix = meta["prefix"]
    keys = [k for k in stored if k.startswith(prefix + ".")]
    dims = latent_dims(prefix, m, {k: stored.ndim(k) for k in keys})
    first, width = m.shards.first, m.tokens_since_fired.shape[-1]  # this rank's latents
    tensors = {k: stored.read(k, dims[k], first, width) for k in keys}
    weights = f"{prefix}.sae."
    state = {k.removeprefix(weights): v for k, v in tensors.items() if k.startswith(weights)}
    refuse_other_layout(m, state, meta["optimizer"]["param_groups"])
    m.sae.load_state_dict(state)
    counters = tensors[f"{prefix}.tokens_since_fired"]  # a CLT's were flat before stop 36
    m.tokens_since_fired.copy_(counters.view_as(m.tokens_since_fired))
    params = list(m.sae.parameters())
    m.optimizer.load_state_dict(
        unflatten_optimizer(f"{prefix}.opt", tensors, meta["optimizer"], params)
    )
    for group in m.optimizer.param_groups:  # as this run builds it, not as saved
        group["fused"] = m.optimizer.defaults["fused"]
    m.schedule.load_state_dict(meta["schedule"])


def refuse_other_layout(m: Member, state: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """A checkpoint from a version that laid the member out otherwise (a transcoder's b_enc got
    its own learning rate in stop 51, a CLT's input centre moved into its layers) would load
    Adam's moments into the wrong parameters, or fail deep in torch: say so, and what to do."""
    names = set(m.sae.state_dict())
    missing, unexpected = names - state.keys(), state.keys() - names
    sizes = [len(g["params"]) for g in groups]
    now = [len(g["params"]) for g in m.optimizer.param_groups]
    problems = [f"weights missing: {sorted(missing)}"] * bool(missing)
    problems += [f"unexpected weights: {sorted(unexpected)}"] * bool(unexpected)
    problems += [f"optimizer groups of {sizes} parameters, not {now}"] * (sizes != now)
    if problems:
        raise ValueError(
            f"{m.name}: the checkpoint was written by another version of sae-forge "
            f"({'; '.join(problems)}); resume it with that version, or start again with --overwrite"
        )


def flatten_optimizer(
    prefix: str, state: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state_dict as tensors (per-parameter moments) and JSON (param groups, scalars)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(
    prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], params: list[torch.Tensor]
) -> dict[str, Any]:
    """The state_dict back, each moment laid out like its parameter: fused Adam walks parameter,
    gradient and moments as flat memory, and silently mixes elements when their strides differ
    (W_enc is stored transposed; safetensors saves it contiguous)."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1 :].split(".", 1)
            param = params[int(index)]
            if value.shape == param.shape:
                value = torch.empty_like(param, dtype=value.dtype).copy_(value)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
