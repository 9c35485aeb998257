"""Triton kernels for the sparse top-k path on CUDA; sae/kernels.py calls them when the tensors are
on a GPU and Triton is installed, and torch's embedding_bag otherwise.

Two gather-reduce kernels cover every sparse product of a top-k step:
- `bag_sum`: out[b] = sum of weight[j] * table[index[j]] over the entries j of bag b (contiguous,
  CSR offsets). With bags = rows it decodes (table W_dec); with bags = latents (entries sorted by
  latent) it is a weight gradient S^T @ x, which embedding_bag's backward would do with a sort
  and atomics.
- `entry_dots`: out[j] = <a[row[j]], table[index[j]]>, the gradient of the decoded values.
Both accumulate in float32 whatever the inputs' dtype, and work on tiles of entries x columns.
Tested here on CPU tensors with TRITON_INTERPRET=1 (tests/sae/test_triton.py).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _bag_sum(
    index_ptr, weight_ptr, offsets_ptr, table_ptr, out_ptr, d, table_stride, out_stride,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bag = tl.program_id(0).to(tl.int64)  # bag * out_stride can pass 2**31
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    start = tl.load(offsets_ptr + bag)
    end = tl.load(offsets_ptr + bag + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(start, end, BLOCK_E):
        entries = first + tl.arange(0, BLOCK_E)
        entry_ok = entries < end
        index = tl.load(index_ptr + entries, mask=entry_ok, other=0)
        weight = tl.load(weight_ptr + entries, mask=entry_ok, other=0.0).to(tl.float32)
        rows = tl.load(
            table_ptr + index[:, None] * table_stride + cols[None, :],
            mask=entry_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc += tl.sum(weight[:, None] * rows.to(tl.float32), axis=0)
    tl.store(out_ptr + bag * out_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _entry_dots(
    a_ptr, rows_ptr, table_ptr, index_ptr, out_ptr, n, d, a_stride, table_stride,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    entries = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    entry_ok = entries < n
    rows = tl.load(rows_ptr + entries, mask=entry_ok, other=0)
    index = tl.load(index_ptr + entries, mask=entry_ok, other=0)
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for first in range(0, d, BLOCK_D):
        cols = first + tl.arange(0, BLOCK_D)
        ok = entry_ok[:, None] & (cols < d)[None, :]
        a = tl.load(a_ptr + rows[:, None] * a_stride + cols[None, :], mask=ok, other=0.0)
        t = tl.load(table_ptr + index[:, None] * table_stride + cols[None, :], mask=ok, other=0.0)
        acc += tl.sum(a.to(tl.float32) * t.to(tl.float32), axis=1)
    tl.store(out_ptr + entries, acc.to(out_ptr.dtype.element_ty), mask=entry_ok)


def current_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it t's (the interpreter takes CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def bag_sum(index: Tensor, weight: Tensor, offsets: Tensor, table: Tensor) -> Tensor:
    """[len(offsets) - 1, d]: bag b sums weight[j] * table[index[j]] for j in offsets[b]:offsets[b+1]."""
    table = table.contiguous()
    n_bags, d = len(offsets) - 1, table.shape[1]
    out = torch.empty(n_bags, d, dtype=table.dtype, device=table.device)
    if n_bags and d:
        block_d = min(128, triton.next_power_of_2(d))
        grid = (n_bags, triton.cdiv(d, block_d))
        with current_device(table):
            _bag_sum[grid](
                index.contiguous(), weight.contiguous(), offsets.contiguous(), table, out, d,
                table.stride(0), out.stride(0), BLOCK_E=16, BLOCK_D=block_d,
            )  # fmt: skip
    return out


def entry_dots(a: Tensor, rows: Tensor, table: Tensor, index: Tensor) -> Tensor:
    """[n_entries]: <a[rows[j]], table[index[j]]> for every entry j."""
    a, table = a.contiguous(), table.contiguous()
    n, d = len(index), table.shape[1]
    out = torch.empty(n, dtype=torch.promote_types(a.dtype, table.dtype), device=a.device)
    if n:
        block_e = 32
        with current_device(a):
            _entry_dots[(triton.cdiv(n, block_e),)](
                a, rows.contiguous(), table, index.contiguous(), out, n, d, a.stride(0),
                table.stride(0), BLOCK_E=block_e, BLOCK_D=min(128, triton.next_power_of_2(d)),
            )  # fmt: skip
    return out
