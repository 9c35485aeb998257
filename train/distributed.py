"""Data parallel training under torchrun. The data order is deterministic and the same in any
number of processes (train/order.py): each rank reads only its part of every global batch (from a
cache, the byte ranges of its rows; from a model, its own windows) and trains on it. PyTorch's
DistributedDataParallel averages the gradients in buckets of parameters while the backward pass is
still running, which gives the same update as one process on the whole batch for every loss that
is a mean over rows. Dead-latent counts and buffers (BatchTopK's threshold) are synchronised too.
Rank 0 alone logs, checkpoints and saves.

    torchrun --nproc-per-node 8 -m train --cache s3://bucket/cache --architecture topk ...
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-endpoint HOST:29500 -m train --cache s3://...

Batch top-k (batchtopk, matryoshka) selects within each data rank's rows, as other libraries do.

Latent sharding (--latent-shards n) splits each dictionary's latents over n ranks, for dictionaries
too big for one device: the processes form a DeviceMesh of (data, latent) ranks, rank = data * n +
latent, and each latent group trains one dictionary on one data rank's rows. A shard holds its
slice of every per-latent tensor (W_enc's columns, W_dec's rows, b_enc, thresholds) and the
output-space ones whole (b_dec, W_skip). `LatentShards` is the one place that knows it: the SAE's
training code calls it where latents meet (sae/models.py's `Whole` is the same with no one to talk
to). Top-k selection is global: each shard's own top k per row, then the k largest of the ranks'
candidates, gathered (values only: a candidate's rank and slot follow from its place in the
gather); the decode is the sum of the shards' partial decodes, an all_reduce whose backward passes
the gradient through unchanged, and b_dec's gradient through the encoder is summed over the shards
where b_dec enters it (Megatron-LM's pair of column-parallel collectives).

A distributed sweep (--distribute-sweep) shares out a sweep's dictionaries instead: each is trained
whole on one rank, on whole batches, as one process trains it, so nothing is reduced; the ranks are
balanced by each dictionary's training memory and read only their dictionaries' hookpoints. Rank 0
gathers the metrics (one W&B run) and the checkpoint's states, and writes the checkpoint one process
would, which therefore resumes in any number of processes and in any mode.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from sae.kernels import Selection, largest
from sae.layered import LayeredDictionary
from sae.models import SAE, LossOutput, Whole

Sharded = SAE | LayeredDictionary
"""What latent sharding splits: any dictionary (a CLT's or crosscoder's latents through their SAEs)."""


class TrainingLoss(nn.Module):
    """A dictionary's training loss as a module's forward: DistributedDataParallel hooks the
    forward of the module it wraps to reduce the gradients of the backward that follows."""

    def __init__(self, sae: nn.Module):
        super().__init__()
        self.sae = sae

    def forward(self, *args) -> LossOutput:
        return self.sae.training_loss(*args)


def end_process_group() -> None:
    """Ends the group this process started, as torch asks, before the interpreter's exit tears
    down gloo's threads under it: left to exit, a rank sometimes aborted after training had
    finished (SIGABRT, "terminate called without an active exception"), under load. It happened
    once more with this in place (a CLT on two processes, 2026-12-05, not reproduced since):
    destroy_process_group drops torch's own references, but a finished run's DDP wrappers, if
    still in unreachable reference cycles, can keep the group and its worker threads alive
    through their reducers into the interpreter's teardown, where freeing the tensors those
    threads hold aborts. Collecting them first lets the group end while the interpreter is whole."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


class World:
    """This process's place in the job, a (data, latent) mesh of ranks; a world of one when not
    launched by torchrun. Data-parallel collectives run over `data_group` (the ranks holding the
    same latents), the shards' over `latent_group`. With `distribute_sweep` the ranks share out
    the sweep's dictionaries instead, each training its own on whole batches (one data rank)."""

    def __init__(self, latent_shards: int = 1, distribute_sweep: bool = False) -> None:
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        check_mesh(self.size, latent_shards)
        self.latent_shards = latent_shards
        self.data_size, self.data_rank = self.size // latent_shards, self.rank // latent_shards
        self.splits_sweep = distribute_sweep and self.size > 1
        if self.splits_sweep:
            self.data_size, self.data_rank = 1, 0
        self.data_group = self.latent_group = None  # the default group: the whole world
        if self.size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            atexit.register(end_process_group)
        if self.splits_sweep:
            # metrics and checkpoint states travel pickled in host memory: over NCCL each would
            # be staged on the GPUs, rank 0 holding every rank's states at once beside its own
            self.object_group = dist.new_group(backend="gloo")
        if latent_shards > 1:
            mesh = init_device_mesh(
                "cuda" if dist.get_backend() == "nccl" else "cpu",
                (self.data_size, latent_shards),
                mesh_dim_names=("data", "latent"),
            )
            self.data_group, self.latent_group = mesh.get_group("data"), mesh.get_group("latent")

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
        """Every data rank trains on an equal part of each batch."""
        n = self.data_size
        if batch_size % n:
            fit = batch_size // n * n or n
            over = f"{n} processes"
            if n != self.size:
                over = (
                    f"{n} data ranks ({self.size} processes / --latent-shards {self.latent_shards})"
                )
            raise ValueError(
                f"--batch-size {batch_size:,} does not split evenly over {over}: "
                f"make it a multiple of {n} (say {fit:,}), or change --nproc-per-node"
            )

    def split_latents(
        self, dictionary: Sharded, name: str, device: torch.device
    ) -> tuple[Sharded, LatentShards]:
        """This rank's slice of a dictionary's latents, built on `device` (`dictionary`: the
        whole, built on the meta device, which holds no memory); a width that does not split
        over the shards, or leaves a shard fewer latents than a row's top k, is refused (a CLT's
        latents: each layer's)."""
        n = self.latent_shards
        d_sae, k = dictionary.cfg.d_sae, dictionary.cfg.k if dictionary.parts[0].uses_k else 0
        if d_sae % n:
            fit = d_sae // n * n or n
            raise ValueError(
                f"{name}: d_sae {d_sae:,} does not split over --latent-shards {n}: make --d-sae "
                f"(or --expansion-factor x d_in) a multiple of {n} (say {fit:,}), or change "
                "--latent-shards"
            )
        if k > d_sae // n:
            raise ValueError(
                f"{name}: k {k} is more than a latent shard's {d_sae // n} latents (d_sae "
                f"{d_sae:,} / --latent-shards {n}): lower --latent-shards or --k"
            )
        shards = LatentShards(self.latent_group, self.rank % n, n, d_sae, device)
        return shards.build(dictionary), shards

    def training_loss(self, sae: nn.Module) -> Callable[..., LossOutput]:
        """sae.training_loss, whose backward leaves the gradients averaged over data ranks: DDP
        reduces them in buckets of about 25 MB as the backward produces them, a few collectives
        per step instead of one per parameter. Its own buffers are averaged by average_buffers.
        A latent shard's gradients come whole out of its backward (LatentShards)."""
        if self.data_size == 1:
            return sae.training_loss
        return DistributedDataParallel(
            TrainingLoss(sae), broadcast_buffers=False, process_group=self.data_group
        )

    def gather(self, x: Tensor) -> Tensor:
        """Every data rank's rows of x, in rank order: the global batch (for b_dec's first value)."""
        if self.data_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.data_size)]
        dist.all_gather(parts, x.contiguous(), group=self.data_group)
        return torch.cat(parts)

    def batch_mean(self, t: Tensor) -> Tensor:
        """The mean of t over data ranks: of a mean over each rank's rows, the global batch's."""
        if self.data_size == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, group=self.data_group)
        return t / self.data_size

    def any_rank(self, mask: Tensor) -> Tensor:
        """Elementwise OR of a boolean tensor over data ranks (a latent fired anywhere)."""
        if self.data_size == 1:
            return mask
        flags = mask.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.data_group)
        return flags.bool()

    def average_buffers(self, module: nn.Module) -> None:
        """The mean over data ranks of a module's floating-point buffers, in one collective."""
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if self.data_size == 1 or not buffers:
            return
        flat = _flatten_dense_tensors(buffers)
        dist.all_reduce(flat, group=self.data_group)
        flat /= self.data_size
        for b, mean in zip(buffers, _unflatten_dense_tensors(flat, buffers), strict=True):
            b.copy_(mean)

    def owners(self, names: list[str], cost: Callable[[int], int]) -> list[int]:
        """The rank that trains each dictionary of the sweep: this one for all of them, unless
        the sweep is distributed (then balanced by `cost(i)`, the bytes dictionary i holds in
        training, asked only then)."""
        if not self.splits_sweep:
            return [self.rank] * len(names)
        check_sweep(names, self.size)
        costs = [cost(i) for i in range(len(names))]
        owners = balance(costs, self.size)
        if self.is_main:
            for rank in range(self.size):
                mine = [i for i, owner in enumerate(owners) if owner == rank]
                held = sum(costs[i] for i in mine) / 2**20
                print(f"rank {rank} trains {', '.join(names[i] for i in mine)} "
                      f"(about {held:,.0f} MiB)", file=sys.stderr)  # fmt: skip
        return owners

    def share(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (a distributed sweep's metrics)."""
        if not self.splits_sweep:
            return [obj]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, obj, group=self.object_group)
        return gathered

    def to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None on the others): a distributed
        sweep's checkpoint states, which rank 0 writes as one process would."""
        if not self.splits_sweep:
            return [obj]
        gathered: list[Any] | None = [None] * self.size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0, group=self.object_group)
        return gathered

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def balance(costs: list[int], ranks: int) -> list[int]:
    """Each item's rank: the largest first, each to the rank holding the least so far (ties to
    the lower rank). Graham's rule: the fullest rank holds at most 4/3 of the best split's."""
    load, owners = [0] * ranks, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[i], load[rank] = rank, load[rank] + costs[i]
    return owners


def check_mesh(size: int, latent_shards: int) -> None:
    """The processes form a grid of data ranks x latent shards."""
    if latent_shards < 1 or size % latent_shards:
        fits = [n for n in range(1, size + 1) if size % n == 0]
        raise ValueError(
            f"--latent-shards {latent_shards} does not divide the {size} processes into a grid of "
            f"data ranks x latent shards: use one of {fits}, or launch a multiple of "
            f"{latent_shards} processes (--nproc-per-node)"
        )


def check_sweep(names: list[str], size: int) -> None:
    """A distributed sweep gives every process at least one dictionary."""
    if len(names) < size:
        raise ValueError(
            f"--distribute-sweep over {size} processes needs at least as many dictionaries, but "
            f"the sweep has {len(names)} ({', '.join(names)}): launch at most {len(names)} "
            "processes, or train without --distribute-sweep"
        )


class SumOverShards(torch.autograd.Function):
    """The sum over the latent group of each shard's part (forward: all_reduce). Every shard then
    computes the same loss from the sum, whose gradient is the gradient of each part: backward
    passes it unchanged (all_reducing it too would count the loss once per shard)."""

    @staticmethod
    def forward(ctx, part: Tensor, group: ProcessGroup) -> Tensor:
        total = part.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class CopyToShards(torch.autograd.Function):
    """A replicated tensor entering the shards' latents (b_dec in the encoder): each shard's
    backward holds the gradient through its own latents only, so backward sums them."""

    @staticmethod
    def forward(ctx, t: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class LatentShards(Whole):
    """This rank's slice [first, first + width) of a dictionary's d_sae latents, and the
    collectives over the latent group that make its training equal the whole dictionary's."""

    def __init__(
        self, group: ProcessGroup | None, index: int, count: int, d_sae: int, device: torch.device
    ):
        self.group, self.index, self.count, self.device = group, index, count, device
        self.width = d_sae // count
        self.first = index * self.width

    def centre(self, t: Tensor) -> Tensor:
        return CopyToShards.apply(t, self.group)

    def sum(self, t: Tensor) -> Tensor:
        return SumOverShards.apply(t, self.group)

    def minimum(self, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return t

    def total(self, n: int) -> int:
        count = torch.tensor([n], device=self.device)
        dist.all_reduce(count, group=self.group)
        return int(count)

    def winners(self, values: Tensor) -> Tensor:
        """[rows, m] this shard's candidates (the largest m of its own, by value) -> [rows, m]
        bool: those among the m largest of the row's candidates from every shard."""
        m = values.shape[-1]
        gathered = [torch.empty_like(values) for _ in range(self.count)]
        dist.all_gather(gathered, values.detach().contiguous(), group=self.group)
        top = torch.cat(gathered, -1).topk(m, dim=-1, sorted=False).indices  # [rows, m]
        slot = top - self.index * m  # where this shard's candidates lie in the gather: 0..m-1
        slot = slot.where((slot >= 0) & (slot < m), m)  # others' to a spare slot
        won = torch.zeros(len(values), m + 1, dtype=torch.bool, device=values.device)
        return won.scatter_(-1, slot, True)[:, :m]

    def topk(self, k: int) -> Selection:
        """Each row's k largest over every shard: the losers among this shard's k candidates
        stay as entries of value 0, which the ReLU after the selection passes no gradient
        (fixed shapes: no wait for the device's count of winners)."""

        def select(pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            values, latents = pre.topk(k, dim=-1, sorted=False)  # [batch, k]
            values = values.masked_fill(~self.winners(values), 0)
            rows = torch.arange(len(pre), device=pre.device).repeat_interleave(k)
            return values.flatten(), rows, latents.flatten()

        return select

    def batch_topk(self, k: int) -> Selection:
        """The batch's k * rows largest over every shard, likewise (sorted by row)."""

        def select(pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            values, index = largest(pre.flatten(), k * len(pre))
            values = values.masked_fill(~self.winners(values[None])[0], 0)
            index, order = index.sort()
            return values[order], index // pre.shape[1], index % pre.shape[1]

        return select

    def auxk(self, pre_dead: Tensor, k: int) -> Tensor:
        """Each row's k largest dead pre-activations over every shard, ReLU'd, dense over this
        shard's dead columns (a shard with fewer than k dead pads its candidates with -inf)."""
        batch, n_dead = pre_dead.shape
        values, index = pre_dead.detach().topk(min(k, n_dead), dim=-1, sorted=False)
        pad = k - values.shape[1]
        values = torch.cat([values, values.new_full((batch, pad), -torch.inf)], -1)
        index = torch.cat([index, index.new_full((batch, pad), n_dead)], -1)  # a spare column
        keep = self.winners(values) & (values > 0)
        picked = pre_dead.new_zeros(batch, n_dead + 1)
        picked.scatter_(-1, index, keep.to(pre_dead.dtype))  # 1 at the winners
        return pre_dead * picked[:, :n_dead]

    def build(self, whole: Sharded) -> Sharded:
        """This shard's slice of a dictionary (`whole`: its class and config, built on the meta
        device), on the shard's device: the slice of every per-latent tensor that the whole
        dictionary starts with, drawn without the whole in memory (sae/models.py's unit_rows),
        and the output-space ones whole; its training made collective."""
        cfg = replace(whole.cfg, device=str(self.device))
        sliced = type(whole)(cfg, latents=range(self.first, self.first + self.width))
        for part in sliced.parts:
            part.shards = self
        return sliced

    def whole(self, t: Tensor, dim: int | None) -> Tensor | None:
        """A sharded tensor's slices, joined along `dim` in the host memory of the group's first
        rank (None on the others), received one slice at a time so that no device ever holds
        the whole; a replicated one (dim None) as it is."""
        if dim is None:
            return t
        t = t.contiguous()
        if self.index:
            dist.send(t, group=self.group, group_dst=0)
            return None
        parts, buffer = [t.cpu()], torch.empty_like(t)
        for shard in range(1, self.count):
            dist.recv(buffer, group=self.group, group_src=shard)
            parts.append(buffer.to("cpu", copy=True))  # a CPU buffer is received again
        return torch.cat(parts, dim)

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def everyone(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.count
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def whole_sae(self, sae: Sharded) -> Sharded | None:  # type: ignore[override]
        """The whole dictionary on the group's first rank, in host memory (None on the others),
        to save."""
        state = {k: self.whole(v, sae.latent_dim(k)) for k, v in sae.state_dict().items()}
        if self.index:
            return None
        whole = type(sae)(replace(sae.cfg, device="meta"))
        whole.load_state_dict({k: v.cpu() for k, v in state.items()}, assign=True)
        for module in (whole, *whole.parts):
            module.cfg = replace(module.cfg, device="cpu")
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.is_meta:  # not in the state (a CLT layer's zero b_dec)
                    setattr(module, name, torch.zeros_like(buffer, device="cpu"))
        return whole
