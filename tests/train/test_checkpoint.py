"""Checkpoint writes are durable: files and directory entries reach the disk before the previous
checkpoint is deleted."""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from sae.models import Whole
from train import checkpoint


@pytest.mark.skipif(sys.platform != "linux", reason="names file descriptors through /proc")
def test_a_checkpoint_is_fsynced_before_the_previous_one_goes(tmp_path, monkeypatch):
    events = []
    fsync, rmtree = os.fsync, shutil.rmtree

    def recording_fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def recording_rmtree(path, *args, **kwargs):
        events.append(("rmtree", Path(path)))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(shutil, "rmtree", recording_rmtree)
    run = tmp_path.resolve()
    checkpoint.save(run, {"w": torch.ones(3)}, {"step": 1})
    events.clear()
    checkpoint.save(run, {"w": torch.zeros(3)}, {"step": 2})
    synced = [path for what, path in events if what == "fsync"]
    tmp = run / ".checkpoint.tmp"
    for name in ("state.safetensors", "state.json"):  # under its temporary name, in the new folder
        assert any(p.parent == tmp and p.name.startswith(f".{name}.") for p in synced), name
    assert tmp in synced and run in synced
    deleted_old = max(
        i for i, event in enumerate(events) if event == ("rmtree", run / "checkpoint.old")
    )
    assert events.index(("fsync", run)) < deleted_old, "the rename is on disk first"
    tensors, meta = checkpoint.load(run)
    assert meta == {"step": 2} and torch.equal(tensors["w"], torch.zeros(3))


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """safetensors reports a failed write as SafetensorError, not OSError: the CLI printed a
    traceback naming no file."""
    from safetensors import SafetensorError

    checkpoint.save(tmp_path, {"w": torch.ones(3)}, {"step": 1})

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(
        OSError, match=r"cannot write .*\.checkpoint\.tmp/state\.safetensors: .*No space"
    ):
        checkpoint.save(tmp_path, {"w": torch.zeros(3)}, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    tensors, meta = checkpoint.load(tmp_path)
    assert meta == {"step": 1} and torch.equal(tensors["w"], torch.ones(3))


@pytest.mark.parametrize("damage", ["json", "weights", "bitflip"])
def test_a_damaged_checkpoint_is_refused_by_name(tmp_path, damage):
    """A flipped bit in a tensor's bytes still parses as safetensors: only the sha256 in
    state.json catches it (it resumed silently from the damaged weights)."""
    checkpoint.save(tmp_path, {"w": torch.ones(3)}, {"step": 1})
    weights = tmp_path / "checkpoint" / "state.safetensors"
    if damage == "json":
        (tmp_path / "checkpoint" / "state.json").write_text('{"step": ')
    elif damage == "weights":
        weights.write_bytes(weights.read_bytes()[:-5])
    else:
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0x01  # one bit of the last float
        weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint is damaged .* --overwrite"):
        checkpoint.load(tmp_path)


def test_a_shard_that_cannot_write_fails_every_shard_and_keeps_the_previous_checkpoint(tmp_path):
    """Latent-sharded, each rank writes its own file: when another rank's write fails (a full
    disk there), this one raises too, naming it, instead of waiting for it in the next collective,
    and the first rank removes the half-made folder."""

    class FirstOfTwo(Whole):
        count = 2

        def everyone(self, obj):
            return [obj, (None, "OSError: cannot write shard-1-of-2.safetensors: No space left")]

    checkpoint.save(tmp_path, {"w": torch.ones(4)}, {"step": 1})
    with pytest.raises(RuntimeError, match=r"latent shard 1 could not write its part of the "
                       r"checkpoint: OSError: cannot write shard-1-of-2.*No space"):  # fmt: skip
        checkpoint.save(tmp_path, {"w": torch.zeros(2)}, {"step": 2}, {"w": 0}, FirstOfTwo())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    tensors, meta = checkpoint.load(tmp_path)
    assert meta == {"step": 1} and torch.equal(tensors["w"], torch.ones(4))
