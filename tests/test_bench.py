"""The benchmarks run end to end on a tiny configuration and write the JSON they promise (their
figures are measured by running them in full, never asserted here)."""

import importlib.util
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sae
from sae.models import TARGET_L0_COEFFICIENT, BatchTopKSAE, TopKSAE
from tests.conftest import synthetic_cache, write_cache
from train.schedule import default_lr

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, out: Path, *args: str) -> dict:
    """`python bench/SCRIPT --out OUT ARGS` run in this process: the suite has already paid for
    importing torch, transformers and SAELens (8 s of a fresh interpreter's start)."""
    saved = sys.argv, sys.path[:], dict(os.environ), torch.get_rng_state()
    sys.argv = [str(ROOT / "bench" / script), "--out", str(out), *args]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
        torch.set_rng_state(saved[3])
    (result,) = out.glob("*.json")
    return json.loads(result.read_text())


def load_bench(script: str):
    """A bench script as a module, to test its parts."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / "bench" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_bench_compares_ours_saelens_and_the_limit(tmp_path):
    rules = ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "standard")
    report = run_bench("train.py", tmp_path, "--expansions", "1", "--batch", "256", "--steps", "1",
                       "--rounds", "1", "--dead", "0.1", "--dtypes", "bfloat16",
                       "--architectures", *rules, "--name", "t")  # fmt: skip
    rows = report["results"]
    assert [(r["architecture"], r["dtype"], r["d_sae"], r["dead_fraction"]) for r in rows] == [
        (a, "bfloat16", 576, 0.1) for a in rules
    ]  # fmt: skip
    assert (tmp_path / "t-cpu.json").exists() or (tmp_path / "t-cuda.json").exists()
    for r in rows:
        assert r["ours_rows_per_s"] > 0 and r["saelens_rows_per_s"] > 0
        assert r["ours_vs_saelens"] == r["ours_rows_per_s"] / r["saelens_rows_per_s"]
        assert r["ours_peak_memory_mib"] > 0
    assert report["machine"]["device"] in ("cpu", "cuda")


def test_harvest_bench_compares_ours_the_bare_forward_and_saelens(tmp_path):
    # float32: a CPU without native bf16 (AVX2 only) runs SmolLM2's bf16 forward 7x slower
    report = run_bench("harvest.py", tmp_path, "--batches", "1", "--batch-size", "2", "--rounds", "1",
                       "--dtypes", "float32", "--skip-memory")  # fmt: skip
    assert [(r["dtype"], r["hookpoints"]) for r in report["results"]] == [
        ("float32", 1), ("float32", 4),
    ]  # fmt: skip
    for r in report["results"]:
        assert r["ours_vs_bare"] > 0 and r["ours_vs_saelens"] > 0 and r["ours_peak_rss_mib"] > 0


def test_transcoder_bench_scores_a_transcoder_beside_an_sae(tmp_path):
    report = run_bench("transcoder.py", tmp_path, "--tokens", "4096", "--eval-tokens", "127",
                       "--expansion", "1", "--k", "8", "--layer", "1")  # fmt: skip
    assert report["hooks"] == ["blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"]
    assert list(report["scores"]) == ["transcoder", "sae", "transcoder-random"]
    for name in report["scores"]:
        s = report["scores"][name]
        assert s["explained_variance"] <= 1 and 0 < s["l0"] <= 8  # 2 steps: no quality yet
    ratio = report["transcoder_over_sae"]["explained_variance"]
    assert (
        ratio
        == report["scores"]["transcoder"]["explained_variance"]
        / report["scores"]["sae"]["explained_variance"]
    )


# 3 steps of 128 rows, scored on two windows: windows of 32 tokens keep each of the 30-layer
# model's forward passes (8 windows a batch) a quarter of the bench's default 128
CLT_SMALL = ("--tokens", "384", "--batch-size", "128", "--context-size", "32", "--eval-tokens", "60",
             "--d-sae", "32", "--k", "4")  # fmt: skip


def test_clt_bench_scores_a_clt_beside_per_layer_transcoders(tmp_path):
    report = run_bench("clt.py", tmp_path, *CLT_SMALL)
    assert report["layers"] == 30 and report["steps"] == 3 and report["context_size"] == 32
    assert 60 <= report["eval_tokens"] < 60 + 31 and report["sweep_rows_per_s"] > 0
    for name in ("clt", "set"):
        s = report["scores"][name]
        with_errors = s["ce_replacement_with_errors"]
        assert abs(with_errors - s["ce_clean"]) < 1e-4, "with error terms: the clean model"
        assert 0 < s["l0"] <= 30 * 32
    assert report["step_s"]["clt"] > 0 and report["peak_rss_gb"] > 0
    ratio = report["clt_over_set"]["ce_loss_recovered"]
    assert (
        ratio
        == report["scores"]["clt"]["ce_loss_recovered"]
        / report["scores"]["set"]["ce_loss_recovered"]
    )


def test_transcoder_speed_bench_times_ours_and_sparsify_on_the_same_batches(tmp_path):
    report = run_bench("transcoder_speed.py", tmp_path, "--batches", "3", "--batch-size", "1024")
    assert report["steps_timed"] == 2 and report["sparsify"] == "1.3.3"
    assert report["batch_size"] == 1024
    rows = report["rows_per_s"]
    assert rows["ours"] > 0 and report["ours_over_sparsify"] == rows["ours"] / rows["sparsify"]
    like = report["ours_no_auxk_over_sparsify"]
    assert like == rows["ours_no_auxk"] / rows["sparsify"]
    assert all(len(s) == 2 for s in report["step_s"].values())


def test_eval_bench_times_ours_the_bare_forwards_saelens_and_the_dashboard(tmp_path):
    report = run_bench("eval.py", tmp_path, "--tokens", "62", "--context-size", "32",
                       "--d-sae", "256", "--absorption-words", "100", "--absorption-icl", "1",
                       "--latents", "2")  # fmt: skip
    assert report["windows"] == 2 and report["tokens"] == 62 and report["batch_size"] == 2
    rates, seconds = report["tokens_per_s"], report["seconds"]
    assert rates["ours"] > 0 and rates["bare"] > 0 and rates["saelens"] > 0
    assert report["ours_over_bare"] == seconds["bare"] / seconds["core"]
    assert report["ours_over_saelens"] == seconds["saelens_run_evals"] / seconds["core"]
    assert report["dashboard_over_eval"] == seconds["dashboard"] / seconds["with_concepts"]
    assert report["absorption_per_100_words_s"] == seconds["absorption"]  # on 100 words


def test_quality_bench_scores_ours_sparsify_and_saelens_on_the_same_rows(tmp_path):
    synthetic_cache(tmp_path / "cache", rows=12_000, d=64, shard_rows=4_000)
    synthetic_cache(tmp_path / "heldout", rows=4_000, d=64, shard_rows=4_000, seed=1)
    report = run_bench("quality.py", tmp_path / "scratch", "--cache", str(tmp_path / "cache"),
                       "--heldout", str(tmp_path / "heldout"), "--budgets", "8192",
                       "--results", str(tmp_path / "scratch" / "quality.json"))  # fmt: skip
    assert (report["d_sae"], report["k"], report["heldout_rows"]) == (512, 32, 4_000)
    (result,) = report["results"]
    assert (result["budget"], result["steps"]) == (8192, 2)
    scores = result["scores"]
    assert list(scores) == ["ours", "sparsify", "saelens"]
    assert scores["sparsify"]["version"] == "1.3.3"
    for s in scores.values():
        assert -1 <= s["explained_variance"] <= 1  # 2 steps: no quality yet
        assert 0 < s["l0"] <= 32 and 0 <= s["dead_fraction"] <= 1 and s["rows_per_s"] > 0
    ratio = result["ours_over_saelens"]["explained_variance"]
    assert ratio == scores["ours"]["explained_variance"] / scores["saelens"]["explained_variance"]


def test_capacity_bench_finds_the_widest_dictionary_each_library_trains(tmp_path):
    report = run_bench("capacity.py", tmp_path, "--start", "512", "--max-d-sae", "1024",
                       "--batch", "64", "--device", "cpu", "--scratch", str(tmp_path / "s"))  # fmt: skip
    for library in ("ours", "saelens"):
        result = report["results"][library]
        assert (result["largest_d_sae"], result["smallest_failed_d_sae"]) == (1024, None)
        assert [a["d_sae"] for a in result["attempts"]] == [512, 1024]
        assert all(a["trains"] and a["step_s"] > 0 for a in result["attempts"])
    assert report["ours_over_saelens"] == 1.0 and report["settings"]["d_in"] == 576


def test_capacity_search_doubles_then_halves_the_gap_on_multiples_of_4096():
    capacity = load_bench("capacity.py")
    tried = []

    def trains(width: int) -> bool:
        tried.append(width)
        return width <= 300_000

    assert capacity.widest(trains, 65536, 2**26, 3) == (294912, 327680)
    assert tried == [65536, 131072, 262144, 524288, 393216, 327680, 294912]
    assert capacity.widest(lambda w: True, 512, 1024, 3) == (1024, None)
    assert capacity.widest(lambda w: False, 512, 1024, 3) == (0, 512)


def test_lr_sweep_bench_measures_the_default_rate_against_its_multiples(tmp_path):
    synthetic_cache(tmp_path / "cache", rows=8_000, d=64, shard_rows=4_000)
    synthetic_cache(tmp_path / "heldout", rows=4_000, d=64, shard_rows=4_000, seed=1)
    subprocess.run([sys.executable, str(ROOT / "bench" / "lr_sweep.py"), "--cache", str(tmp_path / "cache"),
                    "--heldout", str(tmp_path / "heldout"), "--widths", "128", "256", "--budgets", "4000",
                    "--multipliers", "0.5", "1", "--batch-size", "1000", "--out", str(tmp_path / "runs"),
                    "--results", str(tmp_path / "sweep.json")],
                   check=True, cwd=ROOT, capture_output=True, timeout=600)  # fmt: skip
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert len(report["runs"]) == 4 and report["batch_size"] == 1000
    assert {r["sparsity_coefficient"] for r in report["runs"]} == {0.0}  # TopK: no penalty
    for point in report["points"]:  # per width: the best multiple against the default (x1)
        runs = [r for r in report["runs"] if r["d_sae"] == point["d_sae"]]
        assert point["best_explained_variance"] == max(r["explained_variance"] for r in runs)
        assert point["default_lr"] == default_lr(point["d_sae"], 4)
        assert point["shortfall"] == point["best_explained_variance"] - next(
            r["explained_variance"] for r in runs if r["multiplier"] == 1
        )


def test_lr_sweep_without_the_default_rate_reports_the_best_found(tmp_path):
    """A probe of rates around the default (no multiplier 1) printed its table by formatting
    the missing default, and crashed before writing what it had trained. (Of JumpReLU aimed at
    L0 k, which trains at its own weight, with the pre-activation loss.)"""
    synthetic_cache(tmp_path / "cache", rows=4_000, d=16, shard_rows=1_000)
    synthetic_cache(tmp_path / "heldout", rows=1_000, d=16, shard_rows=1_000, seed=1)
    report = run_bench("lr_sweep.py", tmp_path / "runs", "--cache", str(tmp_path / "cache"),
                       "--heldout", str(tmp_path / "heldout"), "--widths", "64", "--budgets", "2000",
                       "--multipliers", "0.5", "2", "--batch-size", "1000", "--encoder-init", "tied",
                       "--architectures", "jumprelu", "--k", "4", "--target-l0", "--pre-act", "0.01",
                       "--results", str(tmp_path / "runs" / "probe.json"))  # fmt: skip
    assert {r["encoder_init"] for r in report["runs"]} == {"tied"}  # JumpReLU's own start is fitted
    assert all(r["target_l0"] and r["pre_act_coefficient"] == 0.01 for r in report["runs"])
    assert {r["sparsity_coefficient"] for r in report["runs"]} == {TARGET_L0_COEFFICIENT}
    (point,) = report["points"]
    assert point["default_lr"] is None and point["shortfall"] is None
    assert point["best_explained_variance"] == max(r["explained_variance"] for r in report["runs"])


def test_lr_sweep_judges_penalty_rules_at_matched_l0():
    """Under an L1 penalty a larger rate may give a denser code that explains more: it is not a
    better rate unless its L0 is within 10% of the default's."""
    lr_sweep = load_bench("lr_sweep.py")
    point = {"d_sae": 64, "tokens": 4000, "steps": 4}
    runs = [
        {**point, "architecture": a, "multiplier": m, "lr": m, "explained_variance": ev, "l0": l0}
        for a in ("standard", "topk")
        for m, ev, l0 in [
            (0.5, 0.70, 30.0),
            (1.0, 0.75, 32.0),
            (2.0, 0.80, 64.0),
            (4.0, 0.76, 35.0),
        ]
    ]
    standard, topk = lr_sweep.summarise(runs)
    assert (standard["matched_l0"], standard["best_lr"], standard["shortfall"]) == (
        32.0,
        4.0,  # x2 explains more only by a twice denser code; x4 at L0 35 is within 10%
        pytest.approx(0.01),
    )
    assert (topk["matched_l0"], topk["best_lr"], topk["shortfall"]) == (
        None,
        2.0,
        pytest.approx(0.05),
    )  # k fixes L0: all count


def test_lr_sweep_interpolates_each_rate_to_one_l0_over_its_coefficients():
    """With several coefficients per rate, each rate's explained variance is read off its own
    L0 curve at the L0 asked for (linear in log L0), so rates compare at exactly matched L0."""
    lr_sweep = load_bench("lr_sweep.py")
    point = {"architecture": "standard", "d_sae": 64, "tokens": 4000, "steps": 4}
    runs = [
        {**point, "multiplier": m, "lr": m, "sparsity_coefficient": c, "explained_variance": ev,
         "l0": l0}
        for m, c, l0, ev in [
            (1.0, 3, 16.0, 0.60), (1.0, 2, 64.0, 0.80),  # at L0 32: 0.70
            (2.0, 3, 8.0, 0.62), (2.0, 2, 32.0, 0.72),  # 0.72 exactly at 32
            (0.5, 3, 40.0, 0.50), (0.5, 2, 80.0, 0.90),  # never reaches L0 32
        ]
    ]  # fmt: skip
    (summary,) = lr_sweep.summarise(runs, l0=32)
    assert summary["explained_variance_by_multiplier"] == {
        1.0: pytest.approx(0.70),
        2.0: pytest.approx(0.72),
        0.5: None,
    }
    assert (summary["best_lr"], summary["shortfall"]) == (2.0, pytest.approx(0.02))
    assert lr_sweep.at_l0(runs[4:], 30.0) is None  # sparser than any of x0.5's runs
    (unreached,) = lr_sweep.summarise(runs[4:], l0=30)
    assert (unreached["best_lr"], unreached["shortfall"]) == (None, None)


def test_lr_sweep_trains_each_rate_at_each_coefficient_asked(tmp_path):
    synthetic_cache(tmp_path / "cache", rows=4_000, d=16, shard_rows=1_000)
    synthetic_cache(tmp_path / "heldout", rows=1_000, d=16, shard_rows=1_000, seed=1)
    report = run_bench("lr_sweep.py", tmp_path / "runs", "--cache", str(tmp_path / "cache"),
                       "--heldout", str(tmp_path / "heldout"), "--architectures", "standard",
                       "--widths", "64", "--budgets", "2000", "--multipliers", "1", "2",
                       "--coefficient", "standard=3,0.5", "--l0", "8", "--batch-size", "1000",
                       "--results", str(tmp_path / "runs" / "probe.json"))  # fmt: skip
    assert [(r["multiplier"], r["sparsity_coefficient"]) for r in report["runs"]] == [
        (1.0, 3.0), (1.0, 0.5), (2.0, 3.0), (2.0, 0.5)
    ]  # fmt: skip
    assert (tmp_path / "runs" / "standard-2000" / "standard-64-x2-c0.5" / "cfg.json").exists()
    (point,) = report["points"]
    assert point["matched_l0"] == 8.0 and point["default_l0"] == report["runs"][0]["l0"]


MLP_HOOKS = ["blocks.6.mlp.hook_in", "blocks.6.hook_mlp_out"]


def mlp_caches(tmp_path) -> None:
    """Training and held-out caches of an MLP's input (16 wide) and a linear output (8 wide)."""
    for name, seed in (("cache", 0), ("heldout", 1)):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(4000, 16, generator=g)
        write_cache(
            tmp_path / name, [{MLP_HOOKS[0]: x, MLP_HOOKS[1]: x @ torch.randn(16, 8, generator=g)}]
        )


def test_clt_bench_sweeps_the_clts_own_rate_decoder_start_weight_and_penalty(tmp_path):
    report = run_bench("clt.py", tmp_path, *CLT_SMALL, "--architecture", "jumprelu",
                       "--multipliers", "2", "--decoder-inits", "zero",
                       "--penalties", "l0", "auto", "--coefficients", "0.2",
                       "--pre-acts", "0.003")  # fmt: skip
    default = default_lr(32, 3)  # a CLT's factor is 1 (LayeredDictionary.rate_factor)
    assert report["default_lr"] == default and report["steps"] == 3
    assert report["architecture"] == "jumprelu"
    starts = {n: (s["lr"], s["decoder_init"], s["encoder_init"], s["sparsity_coefficient"],
                  s["target_l0"], s["pre_act_coefficient"]) for n, s in report["scores"].items()}  # fmt: skip
    assert starts == {
        "clt-x2-zero-l0-c0.2-preact0.003": (2 * default, "zero", "auto", 0.2, False, 0.003),
        # a JumpReLU CLT's default: aimed at k (sae.clt.AIMED_AT_K)
        "clt-x2-zero-c0.2-preact0.003": (2 * default, "zero", "auto", 0.2, True, 0.003),
    }
    for s in report["scores"].values():
        assert abs(s["ce_replacement_with_errors"] - s["ce_clean"]) < 1e-4
        assert 0 < s["l0"] <= 30 * 32


def test_lr_sweep_bench_sweeps_transcoders_between_two_hookpoints(tmp_path):
    mlp_caches(tmp_path)
    report = run_bench("lr_sweep.py", tmp_path / "runs", "--cache", str(tmp_path / "cache"),
                       "--heldout", str(tmp_path / "heldout"), "--hook", MLP_HOOKS[0],
                       "--hook-out", MLP_HOOKS[1], "--widths", "64", "--budgets", "2000",
                       "--multipliers", "1", "2", "--k", "4", "--batch-size", "1000",
                       "--decoder-init", "random",
                       "--results", str(tmp_path / "runs" / "sweep.json"))  # fmt: skip
    runs = report["runs"]
    assert [(r["hook"], r["hook_out"], r["multiplier"], r["decoder_init"]) for r in runs] == [
        (*MLP_HOOKS, 1.0, "random"),
        (*MLP_HOOKS, 2.0, "random"),
    ]
    for r in runs:
        assert r["lr"] == r["multiplier"] * default_lr(64, 2, TopKSAE.transcoder_lr_factor)
        assert 0 < r["l0"] <= 4
        assert math.isfinite(r["explained_variance"])
        cfg = json.loads(
            (
                tmp_path / "runs" / "topk-2000" / f"topk-64-x{r['multiplier']:g}" / "cfg.json"
            ).read_text()
        )
        assert (cfg["sae_forge"]["d_in"], cfg["sae_forge"]["d_out"]) == (16, 8)  # 16 -> 8 wide
    (point,) = report["points"]
    assert point["best_explained_variance"] == max(r["explained_variance"] for r in runs)


def test_decoder_init_bench_trains_both_starts_on_the_same_batches(tmp_path):
    mlp_caches(tmp_path)
    report = run_bench("decoder_init.py", tmp_path / "runs", "--cache", str(tmp_path / "cache"),
                       "--heldout", str(tmp_path / "heldout"), "--steps", "1", "2",
                       "--multipliers", "1", "2", "--expansion", "4", "--k", "4",
                       "--batch-size", "1000", "--architectures", "topk",
                       "--results", str(tmp_path / "runs" / "decoder-init.json"))  # fmt: skip
    runs = report["runs"]
    assert [(r["steps"], r["multiplier"], r["decoder_init"]) for r in runs] == [
        (steps, m, start) for steps in (1, 2) for m in (1.0, 2.0) for start in ("random", "zero")
    ]
    for r in runs:
        assert r["lr"] == r["multiplier"] * default_lr(64, r["steps"], TopKSAE.transcoder_lr_factor)
        assert 0 < r["l0"] <= 4
    assert set(report["crossing_steps"]) == {"topk x1", "topk x2"}


def test_decoder_init_bench_compares_an_saes_encoder_starts(tmp_path):
    for name, seed in (("cache", 0), ("heldout", 1)):
        synthetic_cache(tmp_path / name, rows=4000, d=16, shard_rows=1000, seed=seed)
    report = run_bench("decoder_init.py", tmp_path / "runs", "--part", "encoder",
                       "--cache", str(tmp_path / "cache"), "--heldout", str(tmp_path / "heldout"),
                       "--steps", "1", "2", "--expansion", "4", "--k", "4", "--batch-size", "1000",
                       "--architectures", "batchtopk",
                       "--results", str(tmp_path / "runs" / "encoder-init.json"))  # fmt: skip
    runs = report["runs"]
    assert report["part"] == "encoder"
    assert [(r["steps"], r["encoder_init"]) for r in runs] == [
        (steps, start) for steps in (1, 2) for start in ("tied", "fitted")
    ]
    for r in runs:
        # an SAE's rate: BatchTopK's own factor, not a transcoder's
        assert r["lr"] == default_lr(64, r["steps"], BatchTopKSAE.lr_factor)
    saved = sae.load(next((tmp_path / "runs" / "batchtopk-1").glob("*/cfg.json")).parent)
    assert not saved.cfg.is_transcoder and saved.cfg.hook_name == "blocks.6.hook_resid_post"
    assert set(report["crossing_steps"]) == {"batchtopk x1"}


def test_the_crossing_is_where_the_zero_start_stays_ahead():
    decoder_init = load_bench("decoder_init.py")

    def runs(*pairs):
        return [{"steps": steps, "decoder_init": start, "explained_variance": ev}
                for steps, (rand, zero) in zip((25, 50, 100, 200), pairs, strict=True)
                for start, ev in (("random", rand), ("zero", zero))]  # fmt: skip

    assert decoder_init.crossing(runs((0.5, 0.4), (0.6, 0.7), (0.6, 0.6), (0.7, 0.8))) == 50
    assert decoder_init.crossing(runs((0.5, 0.6), (0.6, 0.5), (0.6, 0.7), (0.7, 0.8))) == 100
    assert decoder_init.crossing(runs((0.5, 0.6), (0.6, 0.7), (0.6, 0.7), (0.8, 0.7))) is None


def test_clt_decode_bench_times_the_support_decode_against_the_dense_one(tmp_path):
    report = run_bench("clt_decode.py", tmp_path, "--layers", "3", "--d", "16", "--d-sae", "64",
                       "--k", "2", "--batch-size", "64", "--steps", "1", "--name", "t")  # fmt: skip
    assert [r["architecture"] for r in report["results"]] == ["topk", "jumprelu"]
    for r in report["results"]:
        assert r["support_step_s"] > 0 and r["dense_step_s"] > 0
        assert r["dense_over_support"] == r["dense_step_s"] / r["support_step_s"]
