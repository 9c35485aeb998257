"""Data parallel training under torchrun. The data order is deterministic and the same in any
number of processes (train/order.py): each rank reads only its part of every global batch (from a
cache, the byte ranges of its rows; from a model, its own windows) and trains on it. PyTorch's
DistributedDataParallel averages the gradients in buckets of parameters while the backward pass is
still running, which gives the same update as one process on the whole batch for every loss that
is a mean over rows. Dead-latent counts and buffers (BatchTopK's threshold) are synchronised too.
Rank 0 alone logs, checkpoints and saves.

    torchrun --nproc-per-node 8 -m train --cache s3://bucket/cache --architecture topk ...
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-endpoint HOST:29500 -m train --cache s3://...

Batch top-k (batchtopk, matryoshka) selects within each rank's rows, as other libraries do.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from sae.models import LossOutput


class TrainingLoss(nn.Module):
    """A dictionary's training loss as a module's forward: DistributedDataParallel hooks the
    forward of the module it wraps to reduce the gradients of the backward that follows."""

    def __init__(self, sae: nn.Module):
        super().__init__()
        self.sae = sae

    def forward(self, *args) -> LossOutput:
        return self.sae.training_loss(*args)


class World:
    """This process's place in the job; a world of one when not launched by torchrun."""

    def __init__(self) -> None:
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per rank under torchrun."""
        if requested.type == "cuda" and self.size > 1:
            torch.cuda.set_device(self.local_rank)  # NCCL and Triton launch on the current device
            return torch.device("cuda", self.local_rank)
        return requested

    def check_batch_size(self, batch_size: int) -> None:
        """Every rank trains on an equal part of each batch."""
        if batch_size % self.size:
            fit = batch_size // self.size * self.size or self.size
            raise ValueError(
                f"--batch-size {batch_size:,} does not split evenly over {self.size} processes: "
                f"make it a multiple of {self.size} (say {fit:,}), or change --nproc-per-node"
            )

    def training_loss(self, sae: nn.Module) -> Callable[..., LossOutput]:
        """sae.training_loss, whose backward leaves the gradients averaged over ranks: DDP
        reduces them in buckets of about 25 MB as the backward produces them, a few collectives
        per step instead of one per parameter. Its own buffers are averaged by average_buffers."""
        if self.size == 1:
            return sae.training_loss
        return DistributedDataParallel(TrainingLoss(sae), broadcast_buffers=False)

    def gather(self, x: Tensor) -> Tensor:
        """Every rank's rows of x, in rank order: the global batch (for b_dec's first value)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def any_rank(self, mask: Tensor) -> Tensor:
        """Elementwise OR of a boolean tensor over ranks (a latent fired anywhere)."""
        if self.size == 1:
            return mask
        flags = mask.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags.bool()

    def average_buffers(self, module: nn.Module) -> None:
        """The mean over ranks of a module's floating-point buffers, in one collective."""
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if self.size == 1 or not buffers:
            return
        flat = _flatten_dense_tensors(buffers)
        dist.all_reduce(flat)
        flat /= self.size
        for b, mean in zip(buffers, _unflatten_dense_tensors(flat, buffers), strict=True):
            b.copy_(mean)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()
