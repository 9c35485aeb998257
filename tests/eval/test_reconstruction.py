"""Reconstruction metrics against a hand computation, and the demo end to end on a small budget."""

import json
import math

import pytest
import torch

from eval.demo import DemoConfig, run_demo
from eval.reconstruction import ReconstructionStats, reconstruction
from tests.conftest import make_sae


@torch.no_grad()
def test_metrics_match_a_hand_computation_over_batches():
    d = make_sae("topk", k=4)
    torch.manual_seed(0)
    x = torch.randn(300, 6) * 2 + 5  # a large mean: centred and uncentred variance differ a lot
    scores = reconstruction(d, x.split(64))
    x_hat = d(x).double()
    x = x.double()
    err = (x - x_hat).pow(2).sum()
    assert abs(scores["fvu"] - (err / (x - x.mean(0)).pow(2).sum()).item()) < 1e-6
    assert abs(scores["explained_variance"] - (1 - scores["fvu"])) < 1e-12
    assert abs(scores["mse"] - (err / x.numel()).item()) < 1e-6
    assert (
        abs(scores["cosine"] - torch.nn.functional.cosine_similarity(x, x_hat).mean().item()) < 1e-6
    )
    assert abs(scores["l2_ratio"] - (x_hat.norm(dim=1) / x.norm(dim=1)).mean().item()) < 1e-6


@torch.no_grad()
def test_saebench_and_uncentred_variants_follow_their_formulas():
    """SAEBench 0.6's core eval (evals/core/main.py) as it computes explained_variance over
    equal batches: per-batch E||x||^2 and per-dimension E[x^2], averaged, then
    1 - E||x - x_hat||^2 / (E||x||^2 - mean_d(E[x^2])^2)."""
    d = make_sae("topk", k=4)
    torch.manual_seed(0)
    x = torch.randn(300, 6) * 2 + 5
    batches = x.split(60)
    scores = reconstruction(d, batches)
    sum_sq, per_dim, resid = [], [], []
    for b in batches:
        b, b_hat = b.double(), d(b).double()
        sum_sq.append(b.pow(2).sum(-1).mean(0))
        per_dim.append(b.pow(2).mean(0))
        resid.append((b - b_hat).pow(2).sum(-1).mean(0))
    total = torch.stack(sum_sq).mean(0) - torch.cat(per_dim).mean(0) ** 2
    saebench = 1 - torch.stack(resid).mean(0) / total
    assert scores["explained_variance_saebench"] == pytest.approx(saebench.item(), abs=1e-9)
    x_hat = d(x).double()
    uncentred = 1 - (x.double() - x_hat).pow(2).sum() / x.double().pow(2).sum()
    assert scores["explained_variance_uncentred"] == pytest.approx(uncentred.item(), abs=1e-9)
    assert scores["explained_variance"] < scores["explained_variance_saebench"]


@torch.no_grad()
def test_every_leading_index_is_a_token():
    d = make_sae("topk", k=4)
    torch.manual_seed(0)
    x = torch.randn(4, 5, 6) * 2 + 5  # [batch, seq, d]
    assert reconstruction(d, [x]) == pytest.approx(reconstruction(d, [x.flatten(0, 1)]))


def test_constant_inputs_leave_fvu_undefined():
    stats = ReconstructionStats()
    x = torch.full((10, 4), 0.1)
    stats.add(x, x + 0.1)
    scores = stats.result()
    assert math.isnan(scores["fvu"]) and math.isnan(scores["explained_variance"])
    assert scores["mse"] == pytest.approx(0.01)


def test_a_large_mean_costs_no_precision():
    torch.manual_seed(0)
    x = 1e4 + 1e-3 * torch.randn(1000, 16, dtype=torch.float64)
    x_hat = x + 1e-4 * torch.randn_like(x)
    stats = ReconstructionStats()
    for a, b in zip(x.split(300), x_hat.split(300), strict=True):
        stats.add(a, b)
    hand = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert stats.result()["fvu"] == pytest.approx(hand.item(), rel=1e-6)


def test_perfect_reconstruction_explains_everything():
    class Identity(torch.nn.Module):
        W_enc = torch.zeros(1)

        def forward(self, x):
            return x

    scores = reconstruction(Identity(), [torch.randn(50, 4), torch.randn(30, 4)])
    assert (
        scores["fvu"] == 0
        and scores["explained_variance"] == 1
        and abs(scores["cosine"] - 1) < 1e-12
    )


def test_demo_end_to_end_small(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    summary = run_demo(
        DemoConfig(
            out=str(tmp_path),
            train_tokens=12_288,
            eval_tokens=2_000,
            batch_size=1024,
            ce_tokens=254,
        )  # fmt: skip
    )
    assert set(summary) == {"sae", "batchtopk-k32-x4"}
    assert summary["sae"]["d_sae"] == 4608 and 20 < summary["sae"]["l0"] <= 32
    assert 0 < summary["sae"]["explained_variance"] < 1
    for s in summary.values():  # the spliced-in loss is in the summary, not a second command away
        assert s["ce_clean"] < s["ce_sae"] < s["ce_zero_ablation"]
        recovered = (s["ce_zero_ablation"] - s["ce_sae"]) / (s["ce_zero_ablation"] - s["ce_clean"])
        assert s["ce_loss_recovered"] == pytest.approx(recovered) and 0 < s["kl_score"] < 1
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "sae" / "cfg.json").exists() and list(
        (tmp_path / "wandb").glob("offline-run-*")
    )
    heldout = json.loads((tmp_path / "heldout" / "manifest.json").read_text())
    assert (
        heldout["split"] == "test"
        and json.loads((tmp_path / "cache" / "manifest.json").read_text())["split"] == "train"
    )
