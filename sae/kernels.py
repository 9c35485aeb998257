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

Selection = Callable[[Tensor], tuple[Tensor, Tensor]]
"""pre [batch, d_sae] -> (rows, latents) of the entries to keep, sorted by row."""


class SparseEncode(torch.autograd.Function):
    """pre = (x - shift) @ W_enc + b_enc, of which only two parts leave: the entries (rows,
    latents) that select(pre) picks, as values, and the dense block pre[:, columns]. Backward
    touches only those: embedding_bag over the picked entries, dense matmuls over the block.

    `shift` is the SAE's b_dec: its gradient is minus the column sum of x's, which equals
    -W_enc @ grad(b_enc), a matrix-vector product, so x's own gradient (data) is never formed."""

    @staticmethod
    def forward(ctx, x, shift, W_enc, b_enc, select: Selection, columns: Tensor):
        x_in = x - shift
        pre = torch.addmm(b_enc, x_in, W_enc)
        rows, latents = select(pre)
        ctx.save_for_backward(x_in, W_enc, rows, latents, columns)
        ctx.mark_non_differentiable(rows, latents)
        return pre[rows, latents], rows, latents, pre[:, columns]

    @staticmethod
    def backward(ctx, grad_values: Tensor, _rows, _latents, grad_columns: Tensor):
        x_in, W_enc, rows, latents, columns = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        # W_enc's: for each latent, the sum of g * x_in[row] over its entries
        grad_W_enc = latent_sums(rows, latents, grad_values, x_in, d_sae).T.contiguous()
        grad_b_enc = torch.zeros(d_sae, dtype=grad_values.dtype, device=grad_values.device)
        grad_b_enc.index_add_(0, latents, grad_values)
        if len(columns):
            grad_W_enc.index_add_(1, columns, x_in.T @ grad_columns)
            grad_b_enc.index_add_(0, columns, grad_columns.sum(0))
        grad_x = grad_shift = None
        if ctx.needs_input_grad[0]:  # for each row, the sum of g * W_enc[:, latent]
            grad_x = F.embedding_bag(
                latents, W_enc.T.contiguous(), bag_offsets(rows, len(x_in)),
                mode="sum", per_sample_weights=grad_values,
            )  # fmt: skip
            if len(columns):
                grad_x = grad_x.addmm(grad_columns, W_enc[:, columns].T)
        if ctx.needs_input_grad[1]:
            grad_shift = -(W_enc @ grad_b_enc)
        return grad_x, grad_shift, grad_W_enc, grad_b_enc, None, None


def bag_offsets(rows: Tensor, n_rows: int) -> Tensor:
    """embedding_bag offsets of entries sorted by row (rows without entries get empty bags)."""
    counts = torch.bincount(rows, minlength=n_rows)
    return counts.cumsum(0) - counts


def latent_sums(rows: Tensor, latents: Tensor, weights: Tensor, x: Tensor, d_sae: int) -> Tensor:
    """[d_sae, d]: for each latent, the sum of weight * x[row] over its entries; the sparse
    product S^T @ x as one embedding_bag over the entries sorted by latent."""
    order = latents.argsort()
    return F.embedding_bag(
        rows[order], x, bag_offsets(latents[order], d_sae), mode="sum",
        per_sample_weights=weights[order],
    )  # fmt: skip


def topk_selection(k: int) -> Selection:
    """Each row's k largest pre-activations (TopK)."""

    def select(pre: Tensor) -> tuple[Tensor, Tensor]:
        latents = pre.topk(k, dim=-1, sorted=False).indices.flatten()
        return torch.arange(len(pre), device=pre.device).repeat_interleave(k), latents

    return select


def batch_topk_selection(k: int) -> Selection:
    """The batch's k * n_rows largest pre-activations (BatchTopK), sorted by row."""

    def select(pre: Tensor) -> tuple[Tensor, Tensor]:
        flat = pre.flatten().topk(min(k * len(pre), pre.numel()), sorted=False).indices.sort()
        return flat.values // pre.shape[1], flat.values % pre.shape[1]

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
    sparse code, and (autograd of embedding_bag) its gradients, in O(entries * d_in)."""
    return F.embedding_bag(
        latents, W_dec, bag_offsets(rows, n_rows), mode="sum", per_sample_weights=values
    )
