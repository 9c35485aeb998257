"""The Triton kernels against torch: on CPU through Triton's interpreter (TRITON_INTERPRET=1), and
compiled on CUDA when a GPU is present. The whole sparse training loss is also run with the Triton
kernels in place of embedding_bag and compared with the dense reference."""

import os

import pytest
import torch
from torch.nn import functional as F

from sae import kernels
from sae.models import SAE, TrainContext
from tests.conftest import make_sae

triton_kernels = pytest.importorskip("sae.triton_kernels", exc_type=ImportError)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # set by tests/conftest.py without a GPU
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def on(device: str) -> torch.device:
    if device == "cpu" and not INTERPRETED:
        pytest.skip("compiled Triton kernels take CUDA tensors; the interpreter is off")
    if device == "cuda" and (INTERPRETED or not torch.cuda.is_available()):
        pytest.skip("no CUDA device for compiled Triton kernels")
    return torch.device(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bag_sum_equals_embedding_bag(device, dtype):
    device = on(device)
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([0, 3, 40, 1, 0, 17, 5])  # empty bags, and bags longer than a tile
    n, d, n_table = int(sizes.sum()), 200, 50  # d is not a multiple of the column tile
    index = torch.randint(n_table, (n,), generator=g).to(device)
    weight = torch.randn(n, generator=g).to(device, dtype)
    table = torch.randn(n_table, d, generator=g).to(device, dtype)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).to(device)
    got = triton_kernels.bag_sum(index, weight, offsets, table)
    want = F.embedding_bag(index, table.float(), offsets, mode="sum",
                           per_sample_weights=weight.float(), include_last_offset=True)  # fmt: skip
    assert got.dtype == dtype and got.shape == (len(sizes), d)
    torch.testing.assert_close(
        got.float(), want, atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 1e-2
    )


@pytest.mark.parametrize("device", DEVICES)
def test_entry_dots_equal_the_gathered_products(device):
    device = on(device)
    g = torch.Generator().manual_seed(1)
    n, d = 77, 150
    a, table = torch.randn(10, d, generator=g), torch.randn(30, d, generator=g)
    rows, index = torch.randint(10, (n,), generator=g), torch.randint(30, (n,), generator=g)
    got = triton_kernels.entry_dots(
        a.to(device), rows.to(device), table.to(device), index.to(device)
    )
    torch.testing.assert_close(got.cpu(), (a[rows] * table[index]).sum(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "matryoshka_batchtopk"])
def test_training_loss_with_triton_kernels_equals_the_dense_reference(
    monkeypatch, device, architecture
):
    device = on(device)
    monkeypatch.setattr(kernels, "use_triton", lambda t: True)
    torch.manual_seed(0)
    d = make_sae(architecture, d_in=16, d_sae=64, k=4).to(device)
    x = torch.randn(96, 16, device=device) * 2 + 1
    ctx = TrainContext(aux_coefficient=0.5, dead=torch.rand(64, device=device) < 0.3)
    params = list(d.parameters())
    sparse = d.training_loss(x, ctx)
    sparse.loss.backward()
    got = [p.grad.clone() for p in params]
    d.zero_grad()
    dense = SAE.training_loss(d, x, ctx)
    dense.loss.backward()
    torch.testing.assert_close(sparse.loss, dense.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.x_hat, dense.x_hat, atol=1e-5, rtol=1e-5)
    for mine, want in zip(got, [p.grad for p in params], strict=True):
        torch.testing.assert_close(mine, want, atol=1e-4, rtol=1e-4)
