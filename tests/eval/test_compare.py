"""`sae compare` on two small runs trained here: a local run folder and an offline W&B run."""

import errno
import json
import math
import re
from pathlib import Path

import pytest
import torch
from matplotlib.colors import to_hex

import eval as ev
import sae
import train
from eval.compare import (
    SIMILARITY,
    CompareConfig,
    compare,
    dictionary_similarity,
    frontier_figure,
    load_run,
    points,
)
from sae.cli import main
from tests.conftest import make_sae


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
    printed = capsys.readouterr().out
    assert "matched" in printed
    # W&B's own keys (_wandb, _step, _runtime, ...) are neither settings nor metrics
    assert not [k for k in result["config_differences"] if k.startswith("_")]
    assert not [k for m in result["final_metrics"].values() for k in m if k.startswith("_")]
    # the W&B run's one SAE is named by the run alone, without a trailing slash
    assert re.search(rf"^{re.escape(result['runs'][2])}: L0 16,", printed, re.M)


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


def test_dictionaries_over_several_layers_compare_by_their_writes_to_every_layer():
    """A CLT's latents are matched by what they write to all output layers (zero before their own
    layer): the same CLT matches itself, and its first layer's latents match a transcoder that
    writes what they write."""
    from tests.sae.test_clt import make_clt
    from tests.sae.test_crosscoder import make_crosscoder

    clt = make_clt("topk", layers=[0, 1, 2])
    assert dictionary_similarity(clt, clt)["matched_a_in_b"] == 1.0
    spread = sae.create("topk", d_in=6, d_out=18, d_sae=16, k=3, apply_b_dec_to_input=False,
                        hook_name="blocks.0.mlp.hook_in", hook_name_out="blocks.0.hook_mlp_out")  # fmt: skip
    with torch.no_grad():
        spread.W_dec.copy_(clt.layers[0].W_dec * 2)
    assert dictionary_similarity(spread, clt)["matched_a_in_b"] == 1.0
    assert dictionary_similarity(clt, spread)["matched_a_in_b"] == pytest.approx(1 / 3)
    xc = make_crosscoder()
    assert dictionary_similarity(xc, xc)["mean_max_cosine_a_in_b"] == pytest.approx(1.0)
    assert dictionary_similarity(xc, clt)["reason"] == "d_in 24 vs 18"


def test_a_path_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a run"):
        load_run(str(tmp_path))
    assert CompareConfig().threshold == 0.9


def fake_run(folder, metrics, saes=()):
    """A `sae train` output folder written by hand: metrics.jsonl and SAE folders."""
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
    for name, d in saes:
        d.save(folder / name)
    return str(folder)


def test_runs_of_one_folder_name_keep_their_own_columns(tmp_path):
    """`a/run` and `other/run` were both labelled `run`: final_metrics kept one of them."""
    a = fake_run(tmp_path / "a" / "run", [{"metrics/l0": 1.0}])
    other = fake_run(tmp_path / "other" / "run", [{"metrics/l0": 2.0}])
    result = compare(CompareConfig(runs=[a, other, other], out=str(tmp_path / "out")))
    assert result["runs"] == ["a/run", "other/run#1", "other/run#2"]
    assert [m["metrics/l0"] for m in result["final_metrics"].values()] == [1.0, 2.0, 2.0]
    assert [p["run"] for p in result["points"]] == result["runs"]
    page = (tmp_path / "out" / "compare.html").read_text()
    assert "<tr><td>metrics/l0</td><td>1</td><td>2</td><td>2</td></tr>" in page


def test_frontier_colours_a_run_alike_on_both_panels_and_marks_training_points():
    """r1 has only a training point (no CE): r2 kept its colour on the CE panel, and training
    points are hollow, held-out ones filled, with a figure legend that says so."""
    fig = frontier_figure(
        [
            {"run": "r1", "sae": "", "l0": 8, "explained_variance": 0.9,
             "ce_loss_recovered": None, "source": "training"},
            {"run": "r2", "sae": "", "l0": 16, "explained_variance": 0.8,
             "ce_loss_recovered": 0.7, "source": "eval.json"},
        ]
    )  # fmt: skip
    drawn = [
        {tuple(c.get_offsets()[0]): (to_hex(c.get_edgecolor()[0]), c.get_facecolor())}
        for ax in fig.axes
        for c in ax.collections
    ]
    r1_ev, r2_ev, r2_ce = drawn
    (edge1, face1), (edge2, face2) = r1_ev[(8, 0.9)], r2_ev[(16, 0.8)]
    assert r2_ce[(16, 0.7)][0] == edge2 != edge1
    assert len(face1) == 0 and to_hex(face2[0]) == edge2  # hollow training, filled held-out
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "r1", "r2", "held-out (eval.json)", "training (no eval.json)",
    ]  # fmt: skip
    assert [to_hex(h.get_markeredgecolor()) for h in legend.legend_handles[:2]] == [edge1, edge2]


def test_saes_of_different_d_in_are_recorded_as_not_comparable(tmp_path, capsys):
    a = fake_run(tmp_path / "a", [{"metrics/l0": 3.0}], [("s", make_sae("topk", d_in=6))])
    b = fake_run(tmp_path / "b", [{"metrics/l0": 3.0}], [("s", make_sae("topk", d_in=8))])
    c = fake_run(tmp_path / "c", [{"metrics/l0": 3.0}], [("s", make_sae("topk", d_in=8))])
    main(["compare", a, b, c, "--out", str(tmp_path / "out")])
    ab, ac, bc = json.loads((tmp_path / "out" / "compare.json").read_text())["similarity"]
    assert ab == {"a": "a/s", "b": "b/s", **dict.fromkeys(SIMILARITY), "reason": "d_in 6 vs 8"}
    assert ac["reason"] == "d_in 6 vs 8" and "reason" not in bc
    assert 0 <= bc["matched_a_in_b"] <= 1
    assert (
        "<td>n/a</td><td>n/a</td><td>d_in 6 vs 8</td>"
        in (tmp_path / "out" / "compare.html").read_text()
    )
    assert "a/s vs b/s: n/a / n/a of latents matched (not comparable: d_in 6 vs 8)" in (
        capsys.readouterr().out
    )


def test_nan_and_missing_metrics_are_null_in_strict_json_and_na_on_the_page(tmp_path, capsys):
    run = fake_run(tmp_path / "r", [{"metrics/l0": 4.0, "metrics/explained_variance": math.nan}])
    other = fake_run(tmp_path / "s", [{"metrics/l0": 5.0, "metrics/fvu": 0.5}])
    main(["compare", run, other, "--out", str(tmp_path / "out")])

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    result = json.loads((tmp_path / "out" / "compare.json").read_text(), parse_constant=refuse)
    assert result["final_metrics"]["r"]["metrics/explained_variance"] is None
    assert result["points"][0]["explained_variance"] is None
    page = (tmp_path / "out" / "compare.html").read_text()
    assert "<tr><td>metrics/explained_variance</td><td>n/a</td><td>n/a</td></tr>" in page
    assert "<tr><td>metrics/fvu</td><td>n/a</td><td>0.5</td></tr>" in page
    assert "r: L0 4, explained variance n/a, CE recovered n/a (training)" in capsys.readouterr().out


def test_a_failed_write_leaves_the_old_compare_json_whole(tmp_path, monkeypatch):
    """A disk that fills mid-write: the old compare.json stays, with no temporary file beside."""
    run = fake_run(tmp_path / "r", [{"metrics/l0": 4.0}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "compare.json").write_text('{"old": true}')
    write_text = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space"):
        compare(CompareConfig(runs=[run], out=str(out)))
    assert json.loads((out / "compare.json").read_text()) == {"old": True}
    assert not list(out.glob(".*.tmp"))


def test_a_wandb_path_without_a_key_is_one_line(tmp_path, monkeypatch):
    """wandb's UsageError came out as a 27-line traceback."""
    from sae.cli import main

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(
        SystemExit, match=r"sae compare: RuntimeError: W&B run ent/proj/abc123: .*wandb login"
    ):
        main(["compare", "ent/proj/abc123", "--out", str(tmp_path / "cmp")])
