"""The trainer: ground-truth recovery, sweeps reading data once, resume after SIGKILL, W&B offline
logs read back, and the guards (NaN loss, bad configs, mismatched caches)."""

import json
import os
import re
import runpy
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sae
import train
from tests.conftest import HOOK, sigkill_when, start_sae, synthetic, synthetic_cache
from tests.train.runs import failure, in_process, threads_of_a_child
from train.cache import ActivationCache
from train.config import TrainConfig
from train.prefetch import prefetched
from train.tracking import read_offline_run
from train.trainer import NonFiniteLoss, Trainer


def random_batches(n: int, rows: int, d: int = 16, nan_at: int | None = None):
    """n Gaussian batches; batch `nan_at` has one NaN."""
    for i in range(n):
        x = torch.randn(rows, d)
        if i == nan_at:
            x[rows // 2, 2] = float("nan")
        yield x


def test_topk_recovers_ground_truth_features(tmp_path):
    features, batches = synthetic()
    d = train.fit(
        batches(),
        architecture="topk",
        d_sae=128,
        k=3,
        total_tokens=1_000_000,
        batch_size=2048,
        out=str(tmp_path),
    )
    cos = torch.nn.functional.normalize(d.W_dec, dim=1) @ features.T
    assert cos.max(0).values.mean() >= 0.95, "mean max cosine similarity to the true features"
    saved = sae.load(tmp_path / "topk-k3-x128")  # tensors: no hookpoint in the name
    assert saved.cfg.k == 3
    assert (saved.cfg.model_name, saved.cfg.dataset_path) == ("", ""), "tensors: source unknown"


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_bf16_autocast_training_recovers_ground_truth_features(tmp_path, architecture):
    """The fp32 test's 488 steps on batches of 1024 rows, not 2048: they recover the features as
    well (mean max cosine 0.979-0.999 over three seeds; 0.983-0.999 on 2048) in half the time on
    a CPU that emulates bf16."""
    features, batches = synthetic(batch=1024)
    d = train.fit(batches(), architecture=architecture, d_sae=128, k=3, total_tokens=500_000,
                  batch_size=1024, out=str(tmp_path), autocast=True)  # fmt: skip
    assert all(p.dtype == torch.float32 for p in d.parameters())
    cos = torch.nn.functional.normalize(d.W_dec, dim=1) @ features.T
    assert cos.max(0).values.mean() >= 0.95


def test_sweep_trains_every_config_reading_the_data_once(tmp_path, monkeypatch):
    cache = synthetic_cache(tmp_path / "cache")
    reads = []
    original = ActivationCache.read_shard
    monkeypatch.setattr(
        ActivationCache, "read_shard", lambda self, i: reads.append(i) or original(self, i)
    )
    sweep = [{"architecture": "topk", "k": 8}, {"architecture": "batchtopk", "k": 8}, {"architecture": "standard", "name": "relu"},
             {"architecture": "jumprelu"}, {"architecture": "gated"}, {"architecture": "matryoshka_batchtopk", "k": 8, "matryoshka_widths": [16, 64, 256]}]  # fmt: skip
    saes = train.fit(
        str(tmp_path / "cache"),
        sweep=sweep,
        expansion_factor=4,
        total_tokens=16_000,
        batch_size=1000,
        out=str(tmp_path / "run"),
    )
    assert [d.cfg.architecture for d in saes] == [s["architecture"] for s in sweep]
    assert saes[-1].cfg.matryoshka_widths == [16, 64, 256]
    assert len(reads) == len(cache.manifest["shards"]), "each shard read once for all six SAEs"
    assert (tmp_path / "run" / "relu" / "cfg.json").exists()
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 16 and "metrics/l0/relu" in rows[-1] and "losses/l1_loss/relu" in rows[-1]
    assert (
        rows[-1]["metrics/explained_variance/topk-k8-x4-blocks_6_hook_resid_post"]
        > rows[0]["metrics/explained_variance/topk-k8-x4-blocks_6_hook_resid_post"]
    )


def test_each_sae_of_a_sweep_trains_as_it_would_alone(tmp_path):
    """Every SAE is initialised from the seed: a sweep member equals its solo run, bit for bit,
    whatever comes before it in the sweep."""
    data = [torch.randn(200, 16, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    settings = dict(d_sae=64, total_tokens=1000, batch_size=200, warmup_steps=1, seed=3)
    second = {"architecture": "jumprelu"}
    _, swept = train.fit(iter(data), sweep=[{"architecture": "topk", "k": 4}, second],
                         out=str(tmp_path / "sweep"), **settings)  # fmt: skip
    alone = train.fit(iter(data), out=str(tmp_path / "alone"), **settings, **second)
    for key, value in alone.state_dict().items():
        assert torch.equal(swept.state_dict()[key], value), key


def cli_cache(tmp_path):
    """12 batches a pass: the runs below are resumed part way through one."""
    return synthetic_cache(tmp_path / "cache", rows=12_000, d=64, shard_rows=1_200)


def cli_args(cache, out, *extra) -> list[str]:
    """60 steps; the signals below land after step 20 or 10, seconds before the end (a step took
    60 ms here, alone on a core), and the resume repeats only what the killed run did not do
    (the SIGKILL test took 2 min of CPU at 200 steps of a d_sae 2048 SAE of d_in 256)."""
    return ["train", "--cache", str(cache), "--out", str(out), "--architecture", "topk", "--k", "16", "--d-sae", "512",
            "--batch-size", "1000", "--total-tokens", "60000", "--checkpoint-every", "10", *extra]  # fmt: skip


def test_sigkill_and_resume_matches_uninterrupted(tmp_path):
    cache = cli_cache(tmp_path)
    killed = tmp_path / "killed"
    proc = start_sae(*cli_args(cache.url, killed))
    # after the second checkpoint: the one resumed from has replaced an earlier one
    sigkill_when(proc, killed / "checkpoint" / "state.json", lambda state: state["step"] >= 20)
    name = "topk-k16-x512-blocks_6_hook_resid_post"
    assert not (killed / name).exists(), "killed before the end"
    # start_sae's 2 threads: the same float sums as the killed run's (1 thread ends 0.1 away)
    in_process(cli_args(cache.url, killed, "--resume"), threads=2)
    in_process(cli_args(cache.url, tmp_path / "clean"), threads=2)
    a, b = sae.load(killed / name), sae.load(tmp_path / "clean" / name)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key], atol=1e-5, rtol=1e-4)

    def curve(run):
        return [
            json.loads(line)["losses/mse_loss"]
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]

    assert len(curve(killed)) == len(curve(tmp_path / "clean")) == 60
    torch.testing.assert_close(
        torch.tensor(curve(killed)), torch.tensor(curve(tmp_path / "clean")), atol=1e-5, rtol=1e-4
    )


def test_resume_refuses_other_data_or_settings_and_allows_a_longer_run(tmp_path):
    cache = synthetic_cache(tmp_path / "cache", rows=4000, d=16, shard_rows=1000)
    run = tmp_path / "run"
    settings = dict(architecture="topk", k=4, d_sae=32, batch_size=500, total_tokens=2000,
                    warmup_steps=1, checkpoint_every=2, out=str(run))  # fmt: skip
    train.fit(cache.url, **settings)
    state = (run / "checkpoint" / "state.json").read_text()
    name = "topk-k4-x32-blocks_6_hook_resid_post"
    other = synthetic_cache(tmp_path / "other", rows=4000, d=16, shard_rows=1000, seed=1)
    for data, change, message in [
        (cache.url, {"batch_size": 250}, "batch_size: 500 -> 250"),
        (cache.url, {"seed": 7, "aux_coefficient": 0.5}, "aux_coefficient: 0.03125 -> 0.5; seed: 0 -> 7"),
        (cache.url, {"lr": 1e-3}, f"{name}.lr: 0.0 -> 0.001"),
        (other.url, {}, "data: {'rows': 4000, 'shards': "),
    ]:  # fmt: skip
        with pytest.raises(
            ValueError, match="trained with other settings \\((.*; )?" + re.escape(message)
        ):
            train.fit(data, resume=True, **{**settings, **change})
    assert (run / "checkpoint" / "state.json").read_text() == state, "nothing resumed"
    # a checkpoint of another data order (before train/order.py, none was recorded)
    older = json.loads(state)
    del older["data"]["order"]
    (run / "checkpoint" / "state.json").write_text(json.dumps(older))
    with pytest.raises(ValueError, match="trained with other settings .*'order': 'blocks/1'"):
        train.fit(cache.url, resume=True, **settings)
    (run / "checkpoint" / "state.json").write_text(state)
    moved = shutil.copytree(tmp_path / "cache", tmp_path / "moved")  # the same cache elsewhere
    with pytest.warns(UserWarning, match="resuming with total_tokens=3,000 .* from step 4"):
        train.fit(str(moved), resume=True, **{**settings, "total_tokens": 3000,
                                             "checkpoint_every": 1, "device": "cpu"})  # fmt: skip
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_resume_with_another_number_of_processes(tmp_path, architecture):
    """A per-row SAE trains the same in any number of processes; BatchTopK picks among each
    process's rows, so its run would change: refused."""
    settings = dict(architecture=architecture, k=4, d_sae=32, batch_size=100, total_tokens=600,
                    warmup_steps=1, checkpoint_every=2, out=str(tmp_path))  # fmt: skip
    train.fit(random_batches(4, 100), **settings)
    state = tmp_path / "checkpoint" / "state.json"
    state.write_text(
        json.dumps({**json.loads(state.read_text()), "world_size": 2, "data_ranks": 2})
    )
    if architecture == "topk":
        train.fit(random_batches(6, 100), resume=True, **settings)
        return
    with pytest.raises(
        ValueError, match=r"data-parallel ranks \(batchtopk-k4-x32 select within each\): 2 -> 1"
    ):
        train.fit(random_batches(6, 100), resume=True, **settings)


def test_resume_drops_a_metrics_line_cut_short(tmp_path):
    """A kill or a full disk in the middle of appending a line leaves half of it: resuming drops it."""
    settings = dict(d_sae=32, k=4, batch_size=100, total_tokens=600, warmup_steps=1,
                    checkpoint_every=2, out=str(tmp_path))  # fmt: skip
    train.fit(random_batches(4, 100), **settings)  # stops at step 4 of 6, checkpointed
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "losses/mse_loss": 1.2')
    train.fit(random_batches(6, 100), resume=True, **settings)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_cache_smaller_than_a_batch_is_refused(tmp_path):
    """Each pass over it would yield no batch: training would wait for ever."""
    synthetic_cache(tmp_path / "cache", rows=400, d=16, shard_rows=200)
    cfg = TrainConfig(batch_size=500, total_tokens=5000, out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"holds 400 rows, fewer than batch_size=500"):
        Trainer(cfg, str(tmp_path / "cache"))


def test_prefetched_keeps_order_raises_in_place_and_stops_reading_when_closed():
    read = []

    def shards(bad: int | None = None, seconds: float = 0.0):
        for i in range(1000):
            time.sleep(seconds)
            read.append(i)
            if i == bad:
                raise ValueError(f"shard {i} is corrupt")
            yield i

    for depth in (0, 2):
        assert list(prefetched(shards(), depth=depth, prepare=lambda i: -i))[:3] == [0, -1, -2]
    got = []
    with pytest.raises(ValueError, match="shard 5 is corrupt"):
        got.extend(prefetched(shards(bad=5), depth=3))
    assert got == [0, 1, 2, 3, 4]
    # slow reads: when the consumer stops after 3, the 4th is being read and the 5th only queued
    read.clear()
    items = prefetched(shards(seconds=0.2), depth=2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()
    time.sleep(0.6)
    assert read == [0, 1, 2, 3], "closing cancels the reads not yet started"
    worker = []
    items = prefetched(shards(), setup=lambda: worker.append(threading.current_thread()))
    assert next(items) == 0 and worker[0] is not threading.current_thread()
    items.close()


def test_batches_read_in_a_background_thread_train_the_same(tmp_path, monkeypatch):
    synthetic_cache(tmp_path / "cache", rows=12_000, shard_rows=1_000)
    depths = []
    monkeypatch.setattr(
        train.trainer,
        "prefetched",
        lambda items, depth=2, **kw: depths.append(depth) or prefetched(items, depth, **kw),
    )
    runs = {}
    for background in (False, True):
        monkeypatch.setattr(train.trainer, "host_core_spare", lambda device, b=background: b)
        out = tmp_path / f"run-{background}"
        sae_ = train.fit(str(tmp_path / "cache"), d_sae=128, k=8, total_tokens=10_000,
                         batch_size=500, checkpoint_every=7, out=str(out))  # fmt: skip
        runs[background] = (sae_.state_dict(), (out / "metrics.jsonl").read_text())
    assert depths == [0, 2], "in line, then through a worker thread"
    assert runs[True][1] == runs[False][1] and len(runs[True][1].splitlines()) == 20
    for name, weight in runs[False][0].items():
        assert torch.equal(runs[True][0][name], weight), name


def test_written_files_get_the_umask_mode_not_owner_only(tmp_path):
    """Caches and runs are often shared folders: no file may come out readable by its owner only
    (mkstemp and safetensors would make them so)."""
    synthetic_cache(tmp_path / "cache", rows=4000)
    train.fit(str(tmp_path / "cache"), d_sae=64, k=4, total_tokens=2000, batch_size=500,
              checkpoint_every=2, out=str(tmp_path / "run"))  # fmt: skip
    mask = os.umask(0)
    os.umask(mask)
    if mask & 0o044 == 0o044:
        pytest.skip(f"umask {mask:03o} makes new files owner-only anyway")
    modes = {
        str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
        for p in tmp_path.rglob("*")
        if p.is_file()
    }
    kinds = {Path(name).name.split(".")[-1] for name in modes}
    assert {"safetensors", "json", "jsonl"} <= kinds and any("checkpoint" in n for n in modes)
    assert {name: mode for name, mode in modes.items() if mode != 0o666 & ~mask} == {}


def test_a_directory_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    def fit(nan_at: int | None = None, **settings):
        data = random_batches(4, 100, nan_at=nan_at)
        return train.fit(data, d_sae=32, k=4, total_tokens=400, batch_size=100,
                         out=str(tmp_path), checkpoint_every=2, **settings)  # fmt: skip

    fit()
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(
        FileExistsError, match=r"holds a run \(metrics.jsonl, checkpoint\): --resume"
    ):
        fit()
    assert (tmp_path / "metrics.jsonl").read_text() == before, "nothing of the first run is lost"
    fit(overwrite=True)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4] and (tmp_path / "metrics.jsonl").read_text() != before
    with pytest.raises(NonFiniteLoss):  # an overwriting run that dies before its first checkpoint
        fit(nan_at=1, overwrite=True)
    assert not (tmp_path / "checkpoint").exists(), "--resume must not continue the replaced run"


def test_fit_without_out_replaces_its_scratch_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        train.fit((torch.randn(100, 16) for _ in range(2)), d_sae=32, k=4, total_tokens=200,
                  batch_size=100, warmup_steps=1)  # fmt: skip
    assert (tmp_path / "runs" / "demo" / "train" / "metrics.jsonl").exists()


def test_a_warmup_longer_than_the_run_is_warned_about(tmp_path):
    def fit():
        train.fit((torch.randn(100, 16) for _ in range(4)), d_sae=32, k=4, total_tokens=400,
                  batch_size=100, warmup_steps=100, out=str(tmp_path))  # fmt: skip

    with pytest.warns(UserWarning, match=r"warmup_steps=100 is longer than a quarter of the run "
                      r"\(4 steps\): the learning rate never reaches lr"):  # fmt: skip
        fit()
    with warnings.catch_warnings():  # a run refused before it starts gets no advice
        warnings.simplefilter("error")
        with pytest.raises(FileExistsError):
            fit()


@pytest.mark.parametrize("bad", [7, 8])  # 8: the NaN step is a checkpoint step (9)
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, bad):
    with pytest.raises(
        NonFiniteLoss, match=f"loss is nan at step {bad + 1}; its checkpoint of step 6 in"
    ):
        train.fit(
            random_batches(100, 500, nan_at=bad),
            d_sae=64,
            k=4,
            total_tokens=50_000,
            batch_size=500,
            checkpoint_every=3,
            out=str(tmp_path),
        )
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 6


def test_nan_before_any_checkpoint_says_none_was_written(tmp_path):
    with pytest.raises(
        NonFiniteLoss, match="loss is nan at step 2; no checkpoint was written before it"
    ):
        train.fit(random_batches(4, 100, nan_at=1), d_sae=32, k=4, total_tokens=400,
                  batch_size=100, warmup_steps=1, out=str(tmp_path))  # fmt: skip


def test_nan_in_the_data_is_named_before_training(tmp_path):
    """A NaN row would make the cache's input scale 1.0, or a stream's NaN: say what it is."""
    synthetic_cache(tmp_path / "cache", rows=2000, d=16, shard_rows=1000, nan_row=17)
    with pytest.raises(
        ValueError,
        match=r"cache: the mean_norm of blocks.6.hook_resid_post is nan, so the cache holds NaN/inf",
    ):
        train.fit(
            str(tmp_path / "cache"), batch_size=500, total_tokens=2000, out=str(tmp_path / "a")
        )
    with pytest.raises(ValueError, match=r"the data's first 100 rows of .* hold NaN/inf"):
        train.fit(random_batches(4, 100, nan_at=0), d_sae=32, k=4, total_tokens=400,
                  batch_size=100, out=str(tmp_path / "b"))  # fmt: skip


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"k": 600, "d_sae": 512}, sae.ConfigError, "k=600 is larger than d_sae=512"),
        ({"lr": -1.0}, ValueError, "lr must be non-negative"),
        ({"architecture": "relu2"}, sae.ConfigError, "unknown architecture 'relu2'"),
        ({"batch_size": 0}, ValueError, "batch_size must be positive"),
        ({"learning_rate": 1e-3}, TypeError, "unknown settings \\['learning_rate'\\]"),
    ],
)
def test_invalid_configs_are_refused_before_any_work(tmp_path, settings, error, message):
    consumed = []

    def batches():
        for _ in range(10):
            consumed.append(1)
            yield torch.randn(64, 32)

    with pytest.raises(error, match=message):
        train.fit(
            batches(), total_tokens=10_000, out=str(tmp_path), **{"batch_size": 64, **settings}
        )
    assert len(consumed) <= 1, "at most the first batch is peeked (for d_in)"
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cache_with_other_hookpoint_is_refused(tmp_path):
    synthetic_cache(tmp_path / "cache", rows=4000)
    with pytest.raises(
        ValueError,
        match=r"wants hookpoint 'blocks.9.hook_resid_post', but .* has \['blocks.6.hook_resid_post'\]",
    ):
        train.fit(
            str(tmp_path / "cache"), hook="blocks.9.hook_resid_post", out=str(tmp_path / "run")
        )


def fit_small(out, steps, batch, **settings):
    """A tiny TopK fit on synthetic data logged to W&B project `settings['wandb_project']`."""
    _, batches = synthetic(batch=batch)
    return train.fit(
        batches(),
        d_sae=64,
        k=4,
        total_tokens=batch * steps,
        batch_size=batch,
        out=str(out),
        **settings,
    )


def test_wandb_offline_logs_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    fit_small(tmp_path, 12, 512, wandb_project="sae-forge-test")
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    ours = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in run.history if "losses/mse_loss" in row]
    assert len(logged) == 12
    assert [row["losses/mse_loss"] for row in logged] == pytest.approx(
        [row["losses/mse_loss"] for row in ours]
    )
    for key in (
        "metrics/explained_variance",
        "metrics/l0",
        "sparsity/dead_features",
        "losses/overall_loss",
    ):
        assert key in logged[-1]
    assert run.config["architecture"] == "topk" and run.config["k"] == 4
    assert [(a.name, a.type) for a in run.artifacts] == [("topk-k4-x64", "model")]
    assert run.project == "sae-forge-test"


def test_no_wandb_key_falls_back_to_offline_with_a_warning(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.warns(UserWarning, match="no W&B API key: logging offline"):
        fit_small(tmp_path, 3, 256, wandb_project="p")
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_wandb_failing_mid_run_does_not_stop_training(tmp_path, monkeypatch):
    import wandb.sdk.wandb_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    calls = []

    def broken_log(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise ConnectionError("W&B connection lost")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", broken_log)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = fit_small(tmp_path, 10, 256, wandb_project="p")
    assert any("W&B failed (ConnectionError" in str(w.message) for w in caught)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 10
    assert d.cfg.d_sae == 64


def test_trained_sae_loads_back_from_its_offline_wandb_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    first = fit_small(tmp_path, 3, 256, wandb_project="proj")
    time.sleep(1.1)  # W&B names offline runs by the second
    second = fit_small(tmp_path, 5, 256, wandb_project="proj", overwrite=True)  # the same W&B dir
    name = "topk-k4-x64"  # tensors of unknown origin: no hookpoint in the name
    x = torch.randn(10, 32)
    for spec, expected in [
        (f"wandb:me/proj/{name}:v0", first),
        (f"wandb:me/proj/{name}:latest", second),
        (f"wandb:me/proj/{name}", second),
    ]:
        torch.testing.assert_close(sae.load(spec)(x), expected(x))
    with pytest.raises(sae.hub.HubError, match="versions v0..v1, not v7"):
        sae.load(f"wandb:me/proj/{name}:v7")
    with pytest.raises(sae.hub.HubError, match="no offline W&B run .* 'nothing'"):
        sae.load("wandb:me/proj/nothing")


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """Two gloo processes on CPU, one thread each."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, *args], env=env, capture_output=True, text=True)


def one_and_two_processes(tmp_path, *args: str) -> None:
    """`python -m train` with args into tmp_path/one (in this process), then torchrun's 2
    processes into tmp_path/two; both must succeed."""
    in_process(["train", "--out", str(tmp_path / "one"), *args])
    ddp = torchrun("-m", "train", "--out", str(tmp_path / "two"), *args)
    assert ddp.returncode == 0, failure(ddp.stderr)


COUNTING_RUN = """
import json, sys
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from train.config import TrainConfig
from train.trainer import Trainer

cache, out = sys.argv[1:]
# weights of their own, not the tuned defaults: at ReLU-L1's 1.8 the ranks' other summation order
# grew to 2e-3 in W_enc by step 20 (all else 1e-7), as a code at ReLU's kink flipping would; the
# same for this JumpReLU under the pre-activation loss (1e-2 in W_dec), whose kink is at the
# threshold, so it trains without it here and a JumpReLU started later from another draw with it
weights = {"standard": 2.0, "jumprelu": 1.0}
sweep = [{"architecture": a, "name": a, "sparsity_coefficient": weights.get(a, 0.0)}
         for a in ("topk", "standard", "jumprelu", "gated")]
sweep[2]["pre_act_coefficient"] = 0
sweep.append({"architecture": "jumprelu", "name": "pulled", "sparsity_coefficient": 1.0,
              "pre_act_coefficient": 1e-3})
trainer = Trainer(TrainConfig(cache=cache, out=out, sweep=sweep, k=4, expansion_factor=4,
                              batch_size=500, total_tokens=10_000, device="cpu"), cache)
counts = {"buckets": 0, "all_reduce": 0, "bytes": 0}

def counted_bucket(state, bucket):
    counts["buckets"] += 1
    return allreduce_hook(state, bucket)

def all_reduce(*args, **kwargs):
    counts["all_reduce"] += 1
    return reduce(*args, **kwargs)

def counted(read):
    def fn(*args, **kwargs):
        data = read(*args, **kwargs)
        counts["bytes"] += len(data) if isinstance(data, bytes) else sum(map(len, data))
        return data
    return fn

if trainer.world.size > 1:
    for m in trainer.members:
        m.loss.register_comm_hook(None, counted_bucket)
    reduce, dist.all_reduce = dist.all_reduce, all_reduce
fs = trainer.source.cache.fs
fs.cat_file, fs.cat_ranges = counted(fs.cat_file), counted(fs.cat_ranges)
trainer.run()
del fs.cat_file, fs.cat_ranges  # fsspec caches the filesystem: in-process it outlives the run
with open(f"{out}/counts-{trainer.world.rank}.json", "w") as f:
    json.dump({**counts, "steps": trainer.step, "members": len(trainer.members),
               "parameters": sum(len(list(m.sae.parameters())) for m in trainer.members)}, f)
"""


@pytest.mark.filterwarnings("ignore::UserWarning")  # a short run
def test_two_processes_read_half_the_data_and_reduce_gradients_in_a_few_collectives(
    tmp_path, monkeypatch
):
    """Each of 2 gloo ranks reads about half the cache's bytes and reduces each SAE's gradients in
    one bucket per step (not one all_reduce per parameter); the SAEs (four architectures whose loss
    is a mean over rows, and a JumpReLU with the pre-activation loss) end as one process's,
    trained on the same global batches."""
    cache = synthetic_cache(tmp_path / "cache", rows=12_000, d=32, shard_rows=1_000)
    (script := tmp_path / "counting_run.py").write_text(COUNTING_RUN)
    # the one process is this one (runs.in_process: a child's imports cost 6 s)
    with threads_of_a_child(1), monkeypatch.context() as m:
        m.setattr(sys, "argv", [str(script), cache.url, str(tmp_path / "one")])
        runpy.run_path(str(script), run_name="__main__")
    two = torchrun(str(script), cache.url, str(tmp_path / "two"))
    assert two.returncode == 0, failure(two.stderr)
    single = json.loads((tmp_path / "one" / "counts-0.json").read_text())
    for rank in (0, 1):
        counts = json.loads((tmp_path / "two" / f"counts-{rank}.json").read_text())
        steps, members = counts["steps"], counts["members"]
        assert steps == 20 and members == 5 and counts["parameters"] > 2 * members
        assert counts["buckets"] == steps * members, "one gradient bucket per SAE and step"
        assert counts["all_reduce"] <= 2 * steps * members, "fired latents and buffers: one each"
        assert counts["bytes"] < 0.6 * single["bytes"], (rank, counts["bytes"], single["bytes"])
    for name in ("topk", "standard", "jumprelu", "gated", "pulled"):
        a, b = sae.load(tmp_path / "one" / name), sae.load(tmp_path / "two" / name)
        for key, value in a.state_dict().items():
            torch.testing.assert_close(
                b.state_dict()[key], value, atol=1e-4, rtol=1e-4, msg=f"{name}.{key}"
            )


def test_a_nan_loss_on_one_rank_stops_every_rank_before_the_checkpoint(tmp_path):
    """The gradients are averaged over ranks, so a NaN on rank 1 reaches rank 0's weights: rank 0
    must not save them, though its own loss was finite."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(
        textwrap.dedent(f"""
            import torch, train
            def batches():
                for i in range(100):
                    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(i))
                    if i == 5:
                        x[150, 2] = float("nan")  # a row of rank 1's half, at step 6
                    yield x
            train.fit(batches(), d_sae=32, k=4, total_tokens=4000, batch_size=200,
                      checkpoint_every=3, out={str(tmp_path / "run")!r}, device="cpu")
        """)
    )
    ddp = torchrun(str(script))
    assert ddp.returncode != 0
    assert "loss is nan at step 6" in ddp.stderr and "loss is NaN/inf on another rank" in ddp.stderr
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3


def test_two_processes_on_the_cli_equal_one_and_count_dead_latents_over_the_global_batch(tmp_path):
    """`python -m train` under torchrun, 2 gloo processes: the same SAE as one process (AuxK
    training the dead latents), logged by rank 0 alone; a latent is dead after dead_tokens rows of
    whole batches without firing, whatever the number of ranks sharing them."""
    cache = synthetic_cache(tmp_path / "cache", rows=12_000, d=32, shard_rows=2_000)
    common = ["--cache", cache.url, "--architecture", "topk", "--k", "2", "--expansion-factor", "16",
              "--batch-size", "500", "--total-tokens", "10000", "--device", "cpu", "--dead-tokens", "1000"]  # fmt: skip
    one_and_two_processes(tmp_path, *common)
    name = "topk-k2-x16-blocks_6_hook_resid_post"
    a, b = sae.load(tmp_path / "one" / name), sae.load(tmp_path / "two" / name)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, atol=1e-4, rtol=1e-4)

    def dead(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["sparsity/dead_features"] for line in lines]

    assert len(dead("two")) == 20, "rank 0 alone logs"
    assert dead("two") == dead("one") and max(dead("one")) > 0
    one, two = (
        load_file(tmp_path / run / "checkpoint" / "state.safetensors") for run in ("one", "two")
    )
    assert torch.equal(two["m0.tokens_since_fired"], one["m0.tokens_since_fired"])


@pytest.mark.cuda
@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_a_cuda_step_waits_for_the_device_only_for_the_dead_latents(tmp_path, architecture):
    """A step that reads nothing back keeps the GPU busy while the host queues the next one: the
    only sync is AuxK's index of the dead latents (their number sizes its matmuls)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from train.config import TrainConfig
    from train.trainer import Trainer

    x = torch.randn(1024, 64, device="cuda")
    cfg = TrainConfig(architecture=architecture, d_sae=512, k=8, batch_size=1024,
                      total_tokens=10**6, out=str(tmp_path), device="cuda", hook="h")  # fmt: skip
    trainer = Trainer(cfg, iter([x]))
    (member,) = trainer.members
    trainer.train_step({"h": x})  # Triton compiles, the allocator warms up
    member.tokens_since_fired[:32] = 10**12  # dead latents: AuxK runs
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            metrics = trainer.train_step({"h": x})
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # the first use of the debug mode also warns that it is a prototype: not a sync
    syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    assert len(syncs) == 1, syncs
    values, diverged = metrics.read()
    assert values["losses/auxiliary_reconstruction_loss"] > 0 and diverged == []


def test_with_auxk_off_no_dead_latent_columns_are_computed(tmp_path, monkeypatch):
    """--aux-coefficient 0 (sparsify's default) turns AuxK off: its term would be zero, so the
    step spends nothing on the dead latents' pre-activations, however many there are."""
    from sae import kernels
    from train.config import TrainConfig
    from train.trainer import Trainer

    x = torch.randn(256, 32)
    blocks = []
    encode = kernels.sparse_encode
    monkeypatch.setattr("sae.models.sparse_encode", lambda *a: blocks.append(a[5]) or encode(*a))
    for aux in (1 / 32, 0.0):
        cfg = TrainConfig(d_sae=128, k=4, batch_size=256, total_tokens=10**6, out=str(tmp_path / str(aux)),
                          hook="h", aux_coefficient=aux)  # fmt: skip
        trainer = Trainer(cfg, iter([x]))
        trainer.members[0].tokens_since_fired[:40] = 10**12  # dead
        values, _ = trainer.train_step({"h": x}).read()
        assert (values["losses/auxiliary_reconstruction_loss"] > 0) == (aux > 0)
    assert [len(b) for b in blocks] == [40, 0]


def test_an_unreachable_wandb_server_logs_offline_instead(tmp_path, monkeypatch):
    """Online mode with a server that does not answer: the run still gets its W&B record, offline
    under the run directory, to `wandb sync` later."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    monkeypatch.setenv("WANDB_SILENT", "true")  # else its login greeting retries for 10 s
    with pytest.warns(UserWarning, match="(?s)W&B could not start online .* logging offline"):
        fit_small(tmp_path, 3, 256, wandb_project="p")
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert len([r for r in read_offline_run(run_dir).history if "losses/mse_loss" in r]) == 3


def test_batchtopk_inference_threshold_gives_about_k_after_a_short_run(tmp_path):
    """The threshold averages the smallest kept activation over the last fifth of training: over
    the whole run (rate 0.01), a 16-step run kept the larger early codes and fired ~4 of k=8."""
    cache = synthetic_cache(tmp_path / "cache")
    d = train.fit(str(tmp_path / "cache"), architecture="batchtopk", k=8, expansion_factor=4,
                  total_tokens=16_000, batch_size=1000, warmup_steps=1, out=str(tmp_path / "run"))  # fmt: skip
    x = next(iter(cache.batches(4000, hook=HOOK, shuffle=True)))
    with torch.no_grad():
        l0 = (d.encode(x) > 0).sum(1).float().mean().item()
    assert 8 * 0.85 < l0 < 8 * 1.15


def test_a_disk_too_full_for_the_final_checkpoint_keeps_the_trained_sae(tmp_path, monkeypatch):
    """The final checkpoint (weights and Adam, three times the SAE) came first: a disk with room
    for the SAE but not for it left the run directory with metrics.jsonl alone."""
    from safetensors import SafetensorError

    from train import checkpoint

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        train.fit(random_batches(4, 100), d_sae=32, k=4, total_tokens=400, batch_size=100,
                  warmup_steps=1, checkpoint_every=0, out=str(tmp_path))  # fmt: skip
    (name,) = [p.name for p in tmp_path.iterdir() if (p / "cfg.json").exists()]
    assert sae.load(tmp_path / name).cfg.d_sae == 32
    assert not (tmp_path / "checkpoint").exists()


def test_a_run_shorter_than_one_batch_is_refused():
    """It trained 0 steps, printed "trained" and saved a randomly initialised SAE."""
    with pytest.raises(
        ValueError, match=r"total_tokens=100 is less than one batch \(batch_size=1024"
    ):
        TrainConfig(total_tokens=100, batch_size=1024)


def test_ctrl_c_saves_the_last_finished_step_and_resume_continues_from_it(tmp_path):
    """Ctrl-C kept nothing since the last checkpoint (here there is none: --checkpoint-every 0);
    now the step it lands in finishes, is checkpointed, and the command ends with one line."""
    import signal

    cache = cli_cache(tmp_path)
    run = tmp_path / "run"
    proc = start_sae(*cli_args(cache.url, run, "--checkpoint-every", "0"))
    deadline = time.time() + 180
    while time.time() < deadline:
        lines = (
            (run / "metrics.jsonl").read_text().splitlines()
            if (run / "metrics.jsonl").exists()
            else []
        )
        if len(lines) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.replace("\r", "\n").strip().splitlines()[-1] == "sae train: interrupted", err
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 10 <= state["step"] < 60 and len(logged) == state["step"]
    assert f"checkpoint of step {state['step']} saved" in err
    in_process(cli_args(cache.url, run, "--resume", "--checkpoint-every", "0"))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 60


def test_a_batch_size_that_does_not_split_over_the_processes_is_refused():
    from train.distributed import World

    world = World()
    world.size = world.data_size = 3
    with pytest.raises(ValueError, match=r"--batch-size 500 does not split evenly over 3 .*"
                       r"make it a multiple of 3 \(say 498\)"):  # fmt: skip
        world.check_batch_size(500)


def test_training_from_a_cache_does_not_import_transformers():
    """Every rank of a torchrun launch imports the trainer: without transformers (and the model
    code) that is about 1 s of a 2-core machine's time per process, not 3."""
    check = (
        "import sys, train.trainer; print(sorted({'transformers', 'sae.lm'} & set(sys.modules)))"
    )
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]", run.stdout
