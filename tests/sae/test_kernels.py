"""The sparse top-k path against the dense reference: values, loss terms and every gradient."""

import pytest
import torch

import sae.kernels
from sae.kernels import largest, sparse_decode, sparse_encode, topk_selection
from sae.models import SAE, TrainContext
from tests.conftest import TopkSizes, make_sae

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def needs(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_encode_and_decode_match_dense_autograd(device, monkeypatch):
    """In float64 the torch path is exact up to summation order. The Triton kernels accumulate in
    float32 whatever the inputs (2e-3 off here on an H200, and in the interpreter): they are held
    to float32 tolerances in tests/sae/test_triton.py, and kept out of this one."""
    needs(device)
    monkeypatch.setenv("SAE_FORGE_TRITON", "0")
    torch.manual_seed(0)
    batch, d_in, d_sae, k = 64, 24, 96, 5
    f64 = {"device": device, "dtype": torch.float64}  # exact up to summation order
    x = torch.randn(batch, d_in, **f64, requires_grad=True)
    shift = torch.randn(d_in, **f64, requires_grad=True)
    W_enc = torch.randn(d_in, d_sae, **f64, requires_grad=True)
    b_enc = torch.randn(d_sae, **f64, requires_grad=True)
    W_dec = torch.randn(d_sae, d_in, **f64, requires_grad=True)
    target = torch.randn(batch, d_in, **f64)
    params = [x, shift, W_enc, b_enc, W_dec]

    def select(pre):  # top-k plus two more picks per row that may repeat a latent, row-sorted
        picks = torch.cat([pre.topk(k, -1).indices, pre[:, :7].topk(2, -1).indices], -1)
        rows = torch.arange(batch, device=device).repeat_interleave(k + 2)
        return pre.gather(1, picks).flatten(), rows, picks.flatten()

    columns = torch.tensor([3, 50, 7, 90], device=device)  # a dense block, overlapping the picks

    def loss(decoded, z, block):
        extra = z.view(batch, -1)[:, -2:].sum() + (block.relu() ** 3).sum()
        return (decoded - target).pow(2).sum() + extra

    values, rows, latents, block = sparse_encode(x, shift, W_enc, b_enc, select, columns)
    z = values.relu()
    loss(sparse_decode(z, rows, latents, W_dec, batch), z, block).backward()
    sparse = grads(params)

    pre = (x - shift) @ W_enc + b_enc
    _, rows, latents = select(pre.detach())
    z = pre[rows, latents].relu()
    torch.testing.assert_close(values, pre[rows, latents])
    torch.testing.assert_close(block, pre[:, columns])
    codes = torch.zeros(batch, d_sae, **f64).index_put((rows, latents), z, accumulate=True)
    loss(codes @ W_dec, z, pre[:, columns]).backward()
    for got, want in zip(sparse, grads(params), strict=True):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "matryoshka_batchtopk"])
@pytest.mark.parametrize("dead", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_training_loss_equals_the_dense_reference(
    device, architecture, dead, normalize, monkeypatch
):
    needs(device)
    fields = {"normalize_activations": "expected_average_only_in", "norm_scaling_factor": 0.7}
    # 1024 latents: 4096 chunk maxima for 512 picks, so BatchTopK's selection is pruned (on CPU)
    d = make_sae(architecture, d_in=16, d_sae=1024, k=4, **(fields if normalize else {})).to(device)
    x = torch.randn(128, 16, device=device) * 2 + 1
    mask = torch.rand(1024, device=device) < 0.4 if dead else None
    ctx = TrainContext(aux_coefficient=0.5, dead=mask)
    params = list(d.parameters())

    sparse = d.training_loss(x, ctx)
    sparse.loss.backward()
    sparse_grads = grads(params)
    # the base class: dense codes, dense matmuls, and torch's own topk for BatchTopK
    monkeypatch.setattr(sae.kernels, "largest", lambda flat, k: flat.topk(k, sorted=False))
    dense = SAE.training_loss(d, x, ctx)
    dense.loss.backward()

    assert set(sparse.parts) == set(dense.parts)
    for name in dense.parts:
        torch.testing.assert_close(sparse.parts[name], dense.parts[name], atol=1e-5, rtol=1e-5)
    assert dense.parts["auxiliary_reconstruction_loss"].item() > 0 if dead else True
    torch.testing.assert_close(sparse.x_hat, dense.x_hat, atol=1e-5, rtol=1e-5)
    assert torch.equal(sparse.fired, dense.fired) and sparse.l0 == dense.l0
    # BatchTopK's threshold statistic: the same entry, computed by another matmul (on CUDA,
    # cuBLAS picks kernels by shape, so the last bit may differ)
    torch.testing.assert_close(sparse.smallest, dense.z[dense.z > 0].min().detach())
    for got, want in zip(sparse_grads, grads(params), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "flat, k, pruned",
    [
        (torch.randn(64, 3000) * torch.rand(64, 1) * 3 + torch.randn(3000), 1000, True),
        (torch.randn(40_007).round(decimals=1), 400, True),  # ties at the bound; n % 32 != 0
        (torch.randn(64, 3000).relu(), 1000, True),  # half zeros
        (torch.randn(64, 3000).relu().bfloat16(), 1000, True),
        (torch.cat([torch.randn(5000), torch.tensor([float("nan")])]), 50, False),  # NaN bound
        (torch.randn(64), 2, False),  # too few chunks (2) for a bound
    ],
    ids=["scaled", "ties", "relu", "bf16", "nan", "small"],
)
def test_largest_picks_the_same_values_as_topk(flat, k, pruned):
    flat = flat.flatten()
    with TopkSizes() as spy:
        values, indices = largest(flat, k)
    want = flat.topk(k, sorted=False).values
    assert indices.unique().numel() == k
    torch.testing.assert_close(flat[indices], values, equal_nan=True)
    torch.testing.assert_close(values.sort().values, want.sort().values, equal_nan=True)
    # pruned: topk over the chunk maxima, then over a few candidates; else over everything
    assert (max(spy.sizes) < len(flat)) == pruned, spy.sizes
    assert spy.sizes[-1] < 3 * k if pruned else spy.sizes[-1] == len(flat)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "matryoshka_batchtopk"])
def test_no_dense_code_tensor_is_kept_for_backward(architecture):
    batch, d_sae = 256, 512
    d = make_sae(architecture, d_in=32, d_sae=d_sae, k=8)
    x = torch.randn(batch, 32)
    ctx = TrainContext(dead=torch.rand(d_sae) < 0.5)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        d.training_loss(x, ctx).loss.backward()
    assert saved and all(s[-1] != d_sae or s[0] != batch for s in saved if len(s) == 2), saved

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        SAE.training_loss(d, x, ctx)  # the dense path does keep the code [batch, d_sae]...
    widest = (batch, d_sae // 2 if architecture.startswith("matryoshka") else d_sae)
    assert widest in saved  # ...Matryoshka's by prefix group, the widest 256 to 512


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_the_encoder_in_bf16_and_keeps_fp32_gradients(device):
    needs(device)
    torch.manual_seed(0)
    d = make_sae("topk", d_in=32, d_sae=128, k=4).to(device)
    x = torch.randn(256, 32, device=device)
    ctx = TrainContext(aux_coefficient=0.5, dead=torch.arange(128, device=device) < 40)
    params = list(d.parameters())
    d.training_loss(x, ctx).loss.backward()
    reference = grads(params)
    with torch.autocast(device, torch.bfloat16):
        out = d.training_loss(x, ctx)
        columns = torch.arange(3, device=device)
        block = sparse_encode(x, d.b_dec, d.W_enc, d.b_enc, topk_selection(4), columns)[3]
    assert block.dtype == torch.bfloat16 and out.x_hat.dtype == torch.float32
    out.loss.backward()
    for got, want in zip(grads(params), reference, strict=True):
        assert got.dtype == torch.float32
        assert (got - want).norm() <= 0.03 * want.norm()  # bf16 rounding of the matmuls only


def test_support_decode_takes_the_dense_gradients_from_the_support_alone(monkeypatch):
    """Decoding only the entries where the support holds, zeros among them (JumpReLU's near its
    thresholds), a few rows at a time: z's gradient on the support and W_dec's equal the dense
    product's, and the decode was in fact chunked."""
    torch.manual_seed(0)
    support = torch.rand(96, 64) < 0.2
    z = (torch.randn(96, 64) * support * (torch.rand(96, 64) < 0.7)).requires_grad_()
    W_dec = torch.randn(64, 16, requires_grad=True)
    g = torch.randn(96, 16)
    (z @ W_dec).backward(g)
    want = z.grad * support, W_dec.grad
    z.grad = W_dec.grad = None
    calls = []
    decode = sae.kernels.sparse_decode
    monkeypatch.setattr(sae.kernels, "sparse_decode", lambda *a: calls.append(1) or decode(*a))
    monkeypatch.setattr(sae.kernels, "SPARSE_SHARE", 1.0)
    monkeypatch.setattr(sae.kernels, "DECODE_FLOATS", 16 * 40)  # about three rows a chunk
    got = sae.kernels.support_decode(z, support, W_dec)
    got.backward(g)
    assert len(calls) > 10
    torch.testing.assert_close(got, z.detach() @ W_dec.detach())
    torch.testing.assert_close(z.grad, want[0])  # nothing off the support
    torch.testing.assert_close(W_dec.grad, want[1])


def test_a_dense_code_decodes_whole():
    """Beyond SPARSE_SHARE of the entries (a ReLU code's first steps) the matmul is faster."""
    z = torch.rand(32, 64)
    W = torch.randn(64, 8)
    assert sae.kernels.SPARSE_SHARE < 1
    torch.testing.assert_close(sae.kernels.support_decode(z, z > 0.5, W), z @ W)
