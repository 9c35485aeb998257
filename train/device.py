"""Which device a run uses, and whether the host has a core to spare beside it: shared by harvest,
training and evaluation, and kept apart from the model-loading code so that training from a cache
(every rank of a torchrun launch) starts without importing transformers."""

from __future__ import annotations

import os

import torch


def host_core_spare(device: torch.device) -> bool:
    """Whether host-side work (serializing shards, reading batches) gets a thread of its own: with
    CUDA, where the host mostly waits for the GPU, or where torch leaves a core unused. On a CPU box
    whose cores all run the model's or the SAE's matmuls a thread would only take turns with them."""
    return device.type == "cuda" or (os.cpu_count() or 1) > torch.get_num_threads()


def resolve_device(device: str) -> torch.device:
    """--device as a torch device: auto is CUDA where there is one; others are checked here, so a
    typo or a machine without CUDA is one line naming the option, not a traceback mid-run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"--device {device!r} is not a device: cpu, cuda, cuda:N or auto"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device (use cpu or auto)")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices here")
    return resolved
