"""`sae compare` on two small runs trained here: a local run folder and an offline W&B run."""

import json

import pytest
import torch

import eval as ev
import sae
import train
from eval.compare import CompareConfig, dictionary_similarity, load_run, points
from sae.cli import main


@pytest.fixture(scope="module")
def runs(small_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    common = {"architecture": "topk", "expansion_factor": 4, "total_tokens": 8192,
              "batch_size": 1024, "lr": 4e-3, "warmup_steps": 1}  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        train.fit(
            small_cache.url, k=16, seed=0, out=str(root / "k16"), wandb_project="cmp", **common
        )
    d = train.fit(small_cache.url, k=32, seed=1, out=str(root / "k32"), **common)
    (folder,) = (p.parent for p in (root / "k32").glob("*/cfg.json"))
    ev.evaluate(d, tokens=630, context_size=64, concepts=False, absorption=False,
                json=str(folder / "eval.json"))  # fmt: skip
    return root


def test_runs_side_by_side(runs, tmp_path, capsys):
    (offline,) = (runs / "k16" / "wandb").glob("offline-run-*")
    main(["compare", str(runs / "k16"), str(runs / "k32"), str(offline), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["config_differences"]["k"][:2] == [16, 32]
    assert result["config_differences"]["seed"][:2] == [0, 1]
    local, other, from_wandb = result["final_metrics"].values()
    assert local["metrics/l0"] == 16 and other["metrics/l0"] == 32
    assert from_wandb["metrics/explained_variance"] == pytest.approx(
        local["metrics/explained_variance"]
    )
    l0s = sorted(p["l0"] for p in result["points"] if p["l0"] is not None)
    assert l0s == [16, 16, 32]
    (scored,) = [p for p in result["points"] if p["source"] == "eval.json"]
    assert 0 < scored["ce_loss_recovered"] < 1 and scored["l0"] == 32
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "compare.html").read_text()
    assert "data:image/png;base64," in page and "Dictionary similarity" in page
    assert len(result["similarity"]) == 1  # the two local runs' SAEs
    assert "matched" in capsys.readouterr().out


def test_a_wandb_run_of_two_saes_gives_a_point_per_sae(small_cache, tmp_path, monkeypatch):
    """No SAE folders beside a W&B run: the SAEs are the names suffixing its metrics."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    train.fit(small_cache.url, sweep=[{"k": 16}, {"k": 32}], architecture="topk",
              expansion_factor=4, total_tokens=4096, batch_size=1024, warmup_steps=1,
              out=str(tmp_path), wandb_project="cmp")  # fmt: skip
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    got = {p["sae"]: p["l0"] for p in points(load_run(str(offline)))}
    assert set(got) == {p.parent.name for p in tmp_path.glob("*/cfg.json")}
    assert sorted(got.values()) == [16, 32]


def test_dictionary_similarity():
    torch.manual_seed(0)
    a = sae.create("topk", d_in=32, d_sae=128, k=4)
    assert dictionary_similarity(a, a)["matched_a_in_b"] == 1.0
    b = sae.create("topk", d_in=32, d_sae=64, k=4)
    with torch.no_grad():
        b.W_dec[:32] = (
            a.W_dec[torch.randperm(128)[:32]] * 3
        )  # half of b is in a, any order and scale
    sim = dictionary_similarity(a, b)
    assert sim["matched_b_in_a"] == 0.5 and sim["matched_a_in_b"] == 0.25
    assert sim["mean_max_cosine_b_in_a"] > 0.5


def test_a_path_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a run"):
        load_run(str(tmp_path))
    assert CompareConfig().threshold == 0.9
