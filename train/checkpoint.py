"""Save and restore the full training state: every SAE's weights, Adam moments, schedule, dead-latent
counters, the step and data position, and the RNG, as safetensors + JSON (never pickle).

A checkpoint is a directory written under a temporary name and renamed into place; the previous
one is kept as `checkpoint.old` until the new one is complete and on disk (files and directory
entries fsynced), so a crash or power loss at any moment leaves a loadable checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from sae.io import atomic_write, write_text

if TYPE_CHECKING:
    from train.trainer import Member

NAME = "checkpoint"
CHECKSUM = "state_sha256"
"""The key in state.json holding state.safetensors's sha256 (a flipped bit resumed silently)."""


def save(run_dir: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    tmp, final, old = run_dir / f".{NAME}.tmp", run_dir / NAME, run_dir / f"{NAME}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        atomic_write(tmp / "state.safetensors", lambda path: save_file(state, path))
        digest = hashlib.sha256((tmp / "state.safetensors").read_bytes()).hexdigest()
        write_text(tmp / "state.json", json.dumps({**meta, CHECKSUM: digest}))
        fsync_dir(tmp)
    except BaseException:  # a full disk: the previous checkpoint stands, no half-made folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync_dir(run_dir)  # the rename is on disk before the old checkpoint goes
    shutil.rmtree(old, ignore_errors=True)


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


def load(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest complete checkpoint, or None. Saving is atomic, so a damaged one was changed
    afterwards (an edit, a failing disk): refused by name rather than resumed from."""
    for name in (NAME, f"{NAME}.old"):
        folder = run_dir / name
        if (folder / "state.json").exists() and (folder / "state.safetensors").exists():
            data = (folder / "state.safetensors").read_bytes()
            try:
                meta = json.loads((folder / "state.json").read_text())
                expected = meta.pop(CHECKSUM, None)  # checkpoints before stop 17 have none
                if expected and hashlib.sha256(data).hexdigest() != expected:
                    raise ValueError("state.safetensors fails its sha256 check")
                tensors = load_bytes(data)
            except (SafetensorError, ValueError) as e:
                raise ValueError(
                    f"checkpoint {folder} is damaged ({e}): it cannot be resumed from; "
                    "train again with --overwrite"
                ) from e
            return tensors, meta
    return None


def member_state(
    prefix: str, m: Member, host: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One member's tensors, under `prefix` (its weights, dead-latent counter, Adam moments), and
    its metadata (its resolved spec, the optimizer's layout, the schedule, the prefix). A
    latent-sharded member's tensors are gathered whole, as one process holds them (a collective
    over its latent group; the group's other ranks get None), so any number of shards resumes
    them. `host`: copied to host memory (to send to another rank)."""
    tensors = {f"{prefix}.sae.{k}": v for k, v in m.sae.state_dict().items()}
    tensors[f"{prefix}.tokens_since_fired"] = m.tokens_since_fired
    opt_tensors, opt_meta = flatten_optimizer(f"{prefix}.opt", m.optimizer.state_dict())
    meta = {"spec": asdict(m.spec), "optimizer": opt_meta, "schedule": m.schedule.state_dict(),
            "prefix": prefix}  # fmt: skip
    tensors |= opt_tensors
    dims = latent_dims(prefix, m, tensors)
    # in one order on every rank: the optimizer's state follows that of the file it was restored
    # from, and safetensors' order of a file's tensors differs from process to process
    whole = {k: m.shards.whole(tensors[k], dims[k]) for k in sorted(tensors)}
    return {k: v.cpu() for k, v in whole.items()} if host else whole, meta


def latent_dims(prefix: str, m: Member, tensors: dict[str, torch.Tensor]) -> dict[str, int | None]:
    """The dimension over latents of each of a member's checkpoint tensors (None: replicated,
    or a member whose latents are all in this process)."""
    if m.shards.count == 1:
        return dict.fromkeys(tensors)
    # Adam's state is indexed by the parameters' order in its groups
    names = {id(p): name for name, p in m.sae.named_parameters()}
    order = [names[id(p)] for group in m.optimizer.param_groups for p in group["params"]]
    dims: dict[str, int | None] = {}
    for key, value in tensors.items():
        name = key.removeprefix(prefix + ".")
        if name.startswith("sae."):
            dims[key] = m.sae.latent_dim(name.removeprefix("sae."))
        elif name.startswith("opt."):
            index = int(name.split(".")[1])
            dims[key] = m.sae.latent_dim(order[index]) if value.dim() else None  # Adam's step
        else:
            dims[key] = 0  # tokens_since_fired
    return dims


def restore_member(m: Member, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Load what member_state saved into a member built as the run builds it (a latent shard
    takes its slice of each tensor), under the prefix its metadata names, whatever the member's
    place in the sweep now."""
    prefix = meta["prefix"]
    tensors = {k: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    dims = latent_dims(prefix, m, tensors)
    tensors = {k: m.shards.part(v, dims[k]) for k, v in tensors.items()}
    weights = f"{prefix}.sae."
    m.sae.load_state_dict(
        {k.removeprefix(weights): v for k, v in tensors.items() if k.startswith(weights)}
    )
    m.tokens_since_fired.copy_(tensors[f"{prefix}.tokens_since_fired"])
    params = list(m.sae.parameters())
    m.optimizer.load_state_dict(
        unflatten_optimizer(f"{prefix}.opt", tensors, meta["optimizer"], params)
    )
    for group in m.optimizer.param_groups:  # as this run builds it, not as saved
        group["fused"] = m.optimizer.defaults["fused"]
    m.schedule.load_state_dict(meta["schedule"])


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
