"""Sparse paths for top-k SAEs: only the encoder's forward matmul is dense.

A TopK step on a [batch, d_sae] pre-activation keeps k of d_sae entries per row, yet the dense
formulation pays for all of them three times: x @ W_enc forward, then W_enc's gradient and the
input's gradient in backward, each a [batch, d_in] x [d_in, d_sae] matmul, plus a dense decode and
its two gradients. Here the encoder's forward stays dense (the selection needs every
pre-activation), the selection keeps only [batch, m] values and indices, and everything after it
runs on those m entries per row through `embedding_bag`: the decode and its gradients, and the
encoder's gradients. No [batch, d_sae] tensor is kept for backward.

The gather-reduce products run as torch's embedding_bag everywhere, and as the Triton kernels of
sae/triton_kernels.py on CUDA when Triton is installed.

AuxK needs the dead latents' pre-activations; they leave the encoder as one dense block of
columns, and its matmuls stay dense over those columns only (a few percent of d_sae once training
settles): BLAS on a narrow block is faster than scattering k_aux = d_in/2 entries per row.

A CLT's layers, whatever their rule, decode only the entries of their codes that matter
(`support_decode`): a ReLU's or a top-k selection's zeros pass no gradient, and JumpReLU's pass
one only near the threshold.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

SPARSE_SHARE = 1 / 32
"""The largest share of a code's entries that `support_decode` decodes one by one; beyond it the
dense matmul is faster (the decode alone broke even near 4-5% of 2304-4608 latents, d 576, on the
CPU; a 30-layer CLT at 2.8% steps 1.5x faster than dense, bench/clt_decode.py)."""
DECODE_FLOATS = 2**28
"""Entries x width per chunk of a sparse decode on the CPU (1 GB of float32): each chunk's backward
zero-fills a W_dec-sized gradient, which at 64 MB made a 30-layer CLT's step 5.2 s where the dense
decode took 4.2 and one chunk 3.5 (1024 rows, k 16 of 576 latents a layer)."""

Selection = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
"""pre [batch, d_sae] -> (values, rows, latents) of the entries to keep, sorted by row (the values
come with the selection: gathering them again from pre costs as much as a tenth of a CPU step)."""


class SparseEncode(torch.autograd.Function):
    """pre = (x - shift) @ W_enc + b_enc, of which only two parts leave: the entries (rows,
    latents) that select(pre) picks, as values, and the dense block pre[:, columns]. Backward
    touches only those: bag sums over the picked entries, dense matmuls over the block.
    Under autocast the matmul runs in its dtype and the picked values come out in x's.

    `shift` is the SAE's b_dec: its gradient is minus the column sum of x's, which equals
    -W_enc @ grad(b_enc), a matrix-vector product, so x's own gradient (data) is never formed."""

    @staticmethod
    def forward(ctx, x, shift, W_enc, b_enc, select: Selection, columns: Tensor):
        x_in = x - shift
        dtype = matmul_dtype(x_in)
        with torch.autocast(x.device.type, enabled=False):
            pre = torch.addmm(b_enc.to(dtype), x_in.to(dtype), W_enc.to(dtype))
            values, rows, latents = select(pre)
        ctx.save_for_backward(x_in, W_enc, rows, latents, columns)
        ctx.mark_non_differentiable(rows, latents)
        return values.to(x_in.dtype), rows, latents, pre[:, columns]

    @staticmethod
    def backward(ctx, grad_values: Tensor, _rows, _latents, grad_columns: Tensor):
        x_in, W_enc, rows, latents, columns = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        # W_enc's: for each latent, the sum of g * x_in[row] over its entries
        # [d_in, d_sae] as a transposed view, the layout of W_enc itself (a clone of W_dec.T)
        grad_W_enc = latent_sums(rows, latents, grad_values, x_in, d_sae).T
        grad_b_enc = torch.zeros(d_sae, dtype=grad_values.dtype, device=grad_values.device)
        grad_b_enc.index_add_(0, latents, grad_values)
        if len(columns):  # dense over the block, in the forward's matmul precision
            block = x_in.T.to(grad_columns.dtype) @ grad_columns
            grad_W_enc.index_add_(1, columns, block.to(grad_W_enc.dtype))
            grad_b_enc.index_add_(0, columns, grad_columns.to(grad_b_enc.dtype).sum(0))
        grad_x = grad_shift = None
        if ctx.needs_input_grad[0]:  # for each row, the sum of g * W_enc[:, latent]
            grad_x = bag_sum(latents, grad_values, bag_offsets(rows, len(x_in)), W_enc.T)
            if len(columns):
                grad_x = grad_x.addmm(grad_columns.to(W_enc.dtype), W_enc[:, columns].T)
        if ctx.needs_input_grad[1]:
            grad_shift = -(W_enc @ grad_b_enc)
        return grad_x, grad_shift, grad_W_enc, grad_b_enc, None, None


def matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast gives matmuls on x's device (x's own when autocast is off): the
    encoder's dense matmul follows it; the sparse sums after the selection stay in x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def use_triton(t: Tensor) -> bool:
    """The Triton kernels serve CUDA tensors when Triton is installed (SAE_FORGE_TRITON=0: never)."""
    return t.is_cuda and os.environ.get("SAE_FORGE_TRITON") != "0" and triton_installed()


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def bag_offsets(bags: Tensor, n_bags: int) -> Tensor:
    """[n_bags + 1] boundaries of entries sorted by bag (row or latent; bags without entries are
    empty). A search, not a count: on CUDA bincount reads its input's maximum back to the host,
    which would stall the device several times a step."""
    return torch.searchsorted(bags, torch.arange(n_bags + 1, device=bags.device))


def bag_sum(index: Tensor, weight: Tensor, offsets: Tensor, table: Tensor) -> Tensor:
    """[len(offsets) - 1, d]: bag b sums weight[j] * table[index[j]] over its entries
    offsets[b]:offsets[b+1]; embedding_bag, or the Triton kernel on CUDA."""
    if use_triton(table):
        from sae import triton_kernels

        return triton_kernels.bag_sum(index, weight, offsets, table)
    return F.embedding_bag(
        index, table, offsets, mode="sum", per_sample_weights=weight, include_last_offset=True
    )


def latent_sums(rows: Tensor, latents: Tensor, weights: Tensor, x: Tensor, d_sae: int) -> Tensor:
    """[d_sae, d]: for each latent, the sum of weight * x[row] over its entries; the sparse
    product S^T @ x as one bag sum over the entries sorted by latent."""
    order = latents.argsort()
    return bag_sum(rows[order], weights[order], bag_offsets(latents[order], d_sae), x)


def topk_selection(k: int) -> Selection:
    """Each row's k largest pre-activations (TopK)."""

    def select(pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        values, latents = pre.topk(k, dim=-1, sorted=False)
        rows = torch.arange(len(pre), device=pre.device).repeat_interleave(k)
        return values.flatten(), rows, latents.flatten()

    return select


def largest(flat: Tensor, k: int, chunk: int = 32) -> tuple[Tensor, Tensor]:
    """flat.topk(k, sorted=False) for a 1-D tensor with k a small share of it (BatchTopK picks
    batch x k of batch x d_sae), ~10x faster on CPU: torch runs a single row's topk as one
    nth_element on one core, 0.3 s for 4096 x 4608 entries, more than the encoder's matmul. The
    k-th largest of the maxima of chunks of 32 entries is a lower bound on the k-th largest entry
    (k chunks hold an entry at least that large), and so few entries clear it (~1.5 k on
    Gaussian pre-activations) that topk over them is cheap. On CUDA topk is a fast radix select
    and the compaction would make the host wait for the device."""
    n_chunks = flat.numel() // chunk
    if flat.is_cuda or n_chunks <= k:
        return tuple(flat.topk(k, sorted=False))
    body, tail = flat.detach().split([n_chunks * chunk, len(flat) - n_chunks * chunk])
    maxima = body.view(n_chunks, chunk).amax(1)
    if len(tail):
        maxima = torch.cat([maxima, tail.amax(0, keepdim=True)])
    bound = maxima.topk(k, sorted=False).values.min()  # NaN when there is one (amax keeps NaN)
    candidates = (flat >= bound).nonzero().squeeze(1)
    if len(candidates) < k:  # a NaN bound: torch's topk, which ranks NaN highest
        return tuple(flat.topk(k, sorted=False))
    values, picks = flat[candidates].topk(k, sorted=False)
    return values, candidates[picks]


def batch_topk_selection(k: int) -> Selection:
    """The batch's k * n_rows largest pre-activations (BatchTopK), sorted by row."""

    def select(pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        values, index = largest(pre.flatten(), min(k * len(pre), pre.numel()))
        index, order = index.sort()
        return values[order], index // pre.shape[1], index % pre.shape[1]

    return select


def sparse_encode(
    x: Tensor,
    shift: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    select: Selection,
    columns: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For pre = (x - shift) @ W_enc + b_enc: (values, rows, latents) [n_entries] of the entries
    `select` picks (rows in order), and pre[:, columns] [batch, n_columns] (AuxK's dead latents)."""
    if columns is None:
        columns = torch.zeros(0, dtype=torch.long, device=x.device)
    return SparseEncode.apply(x, shift, W_enc, b_enc, select, columns)


def sparse_decode(
    values: Tensor, rows: Tensor, latents: Tensor, W_dec: Tensor, n_rows: int
) -> Tensor:
    """[n_rows, d_in]: each row's sum of value * W_dec[latent] over its entries, the decode of a
    sparse code, and its gradients, in O(entries * d_in): embedding_bag and its autograd, or the
    Triton kernels on CUDA."""
    offsets = bag_offsets(rows, n_rows)
    if use_triton(W_dec):
        return TritonDecode.apply(values, rows, latents, W_dec, offsets)
    return F.embedding_bag(
        latents, W_dec, offsets, mode="sum", per_sample_weights=values, include_last_offset=True
    )


def support_decode(z: Tensor, support: Tensor, W_dec: Tensor) -> Tensor:
    """z @ W_dec [rows, width] from the entries of z where `support` holds alone: those whose value
    or gradient can be nonzero (SAE.decode_support), so the loss and every gradient equal the
    dense product's. Dense when they are more than SPARSE_SHARE of z (a ReLU code's first steps).
    On the CPU a few rows at a time: embedding_bag's backward holds an [entries, width] tensor,
    1.1 GB for 1024 rows of k 16 at a 30-layer CLT's layer 0 (width 30 * 576), which chunks keep
    to DECODE_FLOATS (so too on a GPU without Triton). The Triton kernels hold no such tensor: the
    whole batch at once there. nonzero() waits for the device, once a call."""
    rows, latents = support.nonzero(as_tuple=True)
    if not len(z) or len(rows) > SPARSE_SHARE * support.numel():
        return z @ W_dec
    values = z[rows, latents]
    if use_triton(W_dec):
        return sparse_decode(values, rows, latents, W_dec, len(z))
    per_row = max(1.0, len(rows) / max(1, len(z)))
    step = max(1, int(DECODE_FLOATS / (per_row * W_dec.shape[1])))
    starts = list(range(0, len(z), step))
    bounds = torch.searchsorted(rows, torch.tensor([*starts, len(z)], device=rows.device)).tolist()
    return torch.cat([
        sparse_decode(values[a:b], rows[a:b] - start, latents[a:b], W_dec, min(step, len(z) - start))
        for start, a, b in zip(starts, bounds[:-1], bounds[1:], strict=True)
    ])  # fmt: skip


class TritonDecode(torch.autograd.Function):
    """The decode with the Triton kernels: values' gradient as one dot product per entry, W_dec's
    as a bag sum over the entries sorted by latent (no atomics)."""

    @staticmethod
    def forward(ctx, values, rows, latents, W_dec, offsets):
        from sae import triton_kernels

        ctx.save_for_backward(values, rows, latents, W_dec)
        return triton_kernels.bag_sum(latents, values, offsets, W_dec)

    @staticmethod
    def backward(ctx, grad: Tensor):
        from sae import triton_kernels

        values, rows, latents, W_dec = ctx.saved_tensors
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = triton_kernels.entry_dots(grad, rows, W_dec, latents).to(values.dtype)
        if ctx.needs_input_grad[3]:
            grad_W_dec = latent_sums(rows, latents, values, grad.to(W_dec.dtype), len(W_dec))
        return grad_values, None, None, grad_W_dec, None
