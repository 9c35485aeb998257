"""Sparse paths for top-k SAEs: only the encoder's forward matmul is dense.

A TopK step on a [batch, d_sae] pre-activation keeps k of d_sae entries per row, yet the dense
formulation pays for all of them three times: x @ W_enc forward, then W_enc's gradient and the
input's gradient in backward, each a [batch, d_in] x [d_in, d_sae] matmul, plus a dense decode and
its two gradients. Here the encoder's forward stays dense (the selection needs every
pre-activation), the selection keeps only [batch, m] values and indices, and everything after it
runs on those m entries per row through `embedding_bag`: the decode and its gradients, and the
encoder's gradients. No [batch, d_sae] tensor is kept for backward.

AuxK needs the dead latents' pre-activations; they leave the encoder as one dense block of
columns, and its matmuls stay dense over those columns only (a few percent of d_sae once training
settles): BLAS on a narrow block is faster than scattering k_aux = d_in/2 entries per row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F


class SparseEncode(torch.autograd.Function):
    """pre = x @ W_enc + b_enc, of which only two parts leave: values = pre.gather(-1, indices) for
    indices = select(pre) ([batch, m]), and the dense block pre[:, columns]. Backward touches
    only those: embedding_bag over the selected entries, dense matmuls over the columns."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, select: Callable[[Tensor], Tensor], columns: Tensor):
        pre = torch.addmm(b_enc, x, W_enc)
        indices = select(pre)
        values = pre.gather(-1, indices)
        ctx.save_for_backward(x, W_enc, indices, columns)
        ctx.mark_non_differentiable(indices)
        return values, indices, pre[:, columns]

    @staticmethod
    def backward(ctx, grad_values: Tensor, _grad_indices, grad_columns: Tensor):
        x, W_enc, indices, columns = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        dense = len(columns) > 0
        # x's gradient: sum_j g[b, j] * W_enc[:, idx[b, j]], plus the block's
        grad_x = F.embedding_bag(
            indices, W_enc.T.contiguous(), per_sample_weights=grad_values, mode="sum"
        )
        if dense:
            grad_x = grad_x.addmm(grad_columns, W_enc[:, columns].T)
        # W_enc's: for each latent, the sum of g * x over the rows that selected it
        grad_W_enc = latent_sums(indices, grad_values, x, d_sae).T.contiguous()
        grad_b_enc = torch.zeros(d_sae, dtype=grad_values.dtype, device=grad_values.device)
        grad_b_enc.index_add_(0, indices.flatten(), grad_values.flatten())
        if dense:
            grad_W_enc.index_add_(1, columns, x.T @ grad_columns)
            grad_b_enc.index_add_(0, columns, grad_columns.sum(0))
        return grad_x, grad_W_enc, grad_b_enc, None, None


def latent_sums(indices: Tensor, weights: Tensor, rows: Tensor, d_sae: int) -> Tensor:
    """[d_sae, d]: for each latent l, sum over (b, j) with indices[b, j] == l of weights[b, j] *
    rows[b]; the sparse product S^T @ rows as one embedding_bag over entries sorted by latent."""
    flat = indices.flatten()
    order = flat.argsort()
    counts = torch.bincount(flat, minlength=d_sae)
    offsets = counts.cumsum(0) - counts
    row_of = torch.arange(len(rows), device=rows.device).repeat_interleave(indices.shape[1])
    return F.embedding_bag(
        row_of[order], rows, offsets, mode="sum", per_sample_weights=weights.flatten()[order]
    )


def sparse_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    select: Callable[[Tensor], Tensor],
    columns: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(values, indices) [batch, m] of the pre-activations `select` picks, and the pre-activations
    of `columns` [batch, n_columns] (AuxK's dead latents), all differentiable."""
    if columns is None:
        columns = torch.zeros(0, dtype=torch.long, device=x.device)
    return SparseEncode.apply(x, W_enc, b_enc, select, columns)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j values[b, j] * W_dec[indices[b, j]]: the decode of a sparse code, and (autograd of
    embedding_bag) its gradients, in O(batch * m * d_in)."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
