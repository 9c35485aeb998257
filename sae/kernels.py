"""Sparse paths for top-k SAEs: only the encoder's forward matmul is dense.

A TopK step on a [batch, d_sae] pre-activation keeps k of d_sae entries per row, yet the dense
formulation pays for all of them three times: x @ W_enc forward, then W_enc's gradient and the
input's gradient in backward, each a [batch, d_in] x [d_in, d_sae] matmul, plus a dense decode and
its two gradients. Here the encoder's forward stays dense (the selection needs every
pre-activation), the selection keeps only [batch, m] values and indices, and everything after it
runs on those m entries per row through `embedding_bag`: the decode and its gradients, and the
encoder's gradients. No [batch, d_sae] tensor is kept for backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F


class SparseEncode(torch.autograd.Function):
    """values = (x @ W_enc + b_enc).gather(-1, indices), indices = select(pre), with a backward
    that touches only the selected entries."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, select: Callable[[Tensor], Tensor]):
        pre = torch.addmm(b_enc, x, W_enc)
        indices = select(pre)
        values = pre.gather(-1, indices)
        ctx.save_for_backward(x, W_enc, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: Tensor, _grad_indices: Tensor | None):
        x, W_enc, indices = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        grad_x = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[0]:  # x's gradient: sum_j g[b, j] * W_enc[:, idx[b, j]]
            grad_x = F.embedding_bag(
                indices, W_enc.T.contiguous(), per_sample_weights=grad_values, mode="sum"
            )
        if ctx.needs_input_grad[1]:  # W_enc's: for each latent, sum of g * x over its rows
            grad_W_enc = latent_sums(indices, grad_values, x, d_sae).T
        if ctx.needs_input_grad[2]:
            grad_b_enc = torch.zeros(d_sae, dtype=grad_values.dtype, device=grad_values.device)
            grad_b_enc.index_add_(0, indices.flatten(), grad_values.flatten())
        return grad_x, grad_W_enc, grad_b_enc, None


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
    x: Tensor, W_enc: Tensor, b_enc: Tensor, select: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """(values, indices) [batch, m] of the pre-activations `select` picks ([batch, m] indices)."""
    return SparseEncode.apply(x, W_enc, b_enc, select)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j values[b, j] * W_dec[indices[b, j]]: the decode of a sparse code, and (autograd of
    embedding_bag) its gradients, in O(batch * m * d_in)."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
