"""One writer per output folder: a second harvest or training run into it is refused by name,
and a holder killed with SIGKILL leaves no stale lock."""

import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from sae.locks import LOCK_FILE, FolderInUse, exclusive
from tests.conftest import start_sae


def _held_by(proc, folder, timeout: float = 120) -> str:
    """Wait until `proc` holds `folder`'s lock; the holder's line it wrote."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = (folder / LOCK_FILE).read_text() if (folder / LOCK_FILE).exists() else ""
        if f"pid {proc.pid} " in text:
            return text
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    raise AssertionError("the first process never took the lock")


def test_a_second_harvest_into_the_same_folder_is_refused_and_a_killed_holder_frees_it(tmp_path):
    out = tmp_path / "cache"
    first = start_sae("harvest", "--tokens", "2000000", "--out", str(out))
    try:
        holder = _held_by(first, out)
        # stopped, it keeps the lock without loading the model and harvesting on 2 threads
        # beside the second's start-up (nearly half of this test's time)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(
            [sys.executable, "-m", "sae.cli", "harvest", "--tokens", "9000", "--out", str(out)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode != 0
        (line,) = second.stderr.strip().splitlines()
        assert f"{out} is being written by {holder}" in line and "another --out" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with exclusive(out):  # the kernel dropped the dead holder's lock: nothing stale to clear
        pass


def test_a_training_run_holds_its_directory(tmp_path):
    """flock conflicts between two opens of the file even within one process: the lock held here
    stands for another run's."""

    def fit():
        return train.fit((torch.randn(100, 16) for _ in range(4)), d_sae=32, k=4,
                         total_tokens=400, batch_size=100, warmup_steps=1, out=str(tmp_path))  # fmt: skip

    with (
        exclusive(tmp_path),
        pytest.raises(FolderInUse, match=f"{tmp_path} is being written by pid"),
    ):
        fit()
    assert not (tmp_path / "metrics.jsonl").exists()
    fit()  # once the holder is gone
    with exclusive(tmp_path):  # and released at the end
        pass


def test_remote_folders_take_no_lock(tmp_path):
    with exclusive("s3://bucket/prefix"):
        pass
