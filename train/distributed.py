"""Data parallel training under torchrun: every rank reads the same global batch (the data order is
deterministic, so no sampler is needed), trains on its slice of rows, and gradients are averaged
across ranks before each optimizer step, which gives the same update as one process on the whole
batch for every loss that is a mean over rows. Dead-latent counts and buffers (BatchTopK's
threshold) are synchronised too. Rank 0 alone logs, checkpoints and saves.

    torchrun --nproc-per-node 8 -m train --cache s3://bucket/cache --architecture topk ...
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-endpoint HOST:29500 -m train --cache s3://...

Batch top-k (batchtopk, matryoshka) selects within each rank's slice, as other libraries do.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn


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

    def shard(self, x: Tensor) -> Tensor:
        """This rank's rows of a global batch (the batch size must divide by the world size)."""
        if self.size == 1:
            return x
        if len(x) % self.size:
            raise ValueError(f"batch of {len(x)} rows does not split evenly over {self.size} ranks")
        per = len(x) // self.size
        return x[self.rank * per : (self.rank + 1) * per]

    def average_gradients(self, module: nn.Module) -> None:
        if self.size == 1:
            return
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.size

    def any_rank(self, mask: Tensor) -> Tensor:
        """Elementwise OR of a boolean tensor over ranks (a latent fired anywhere)."""
        if self.size == 1:
            return mask
        flags = mask.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags.bool()

    def average_buffers(self, module: nn.Module) -> None:
        if self.size == 1:
            return
        for b in module.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b /= self.size

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()
