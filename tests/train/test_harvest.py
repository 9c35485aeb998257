"""Harvesting SmolLM2 activations into the cache: values, early stop, resume after SIGKILL,
corruption, NaN, a dataset that runs out, and refusing to mix caches."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import train.harvest
from sae.cli import main as cli
from sae.hooks import capture, record
from sae.lm import blocks
from sae.locks import LOCK_FILE
from tests.conftest import sigkill_when, start_sae
from tests.train.runs import in_process
from train.cache import IDENTITY, CacheMismatch, CacheWriter, load_cache
from train.config import HarvestConfig
from train.data import load_documents
from train.harvest import Harvester, NonFiniteActivations, harvest, resolve_precision

HOOKS = ["blocks.3.hook_resid_post", "blocks.5.hook_mlp_out"]
SMALL = {
    "hook": HOOKS,
    "tokens": 1500,
    "context_size": 32,
    "batch_size": 4,
    "shard_windows": 8,
    "dtype": "float32",
    "device": "cpu",
}
"""A fp32 harvest of 1500 rows in 8-window shards: the settings several tests compare against."""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("harvest") / "cache"
    harvest(
        out=str(out),
        **SMALL,
    )
    return load_cache(out)


def test_rows_are_the_models_activations(cache, smollm2):
    model, tok = smollm2
    assert len(cache) == 1500 and cache.manifest["complete"]
    assert cache.hookpoints == HOOKS and cache.d_in(HOOKS[0]) == 576
    positions = cache.rows(np.arange(len(cache)), "positions")
    assert positions.min() == 1 and positions.max() == 31, "BOS (position 0) is never a row"
    windows = cache.rows(np.arange(len(cache)), "windows")
    for w in [0, 5, 17]:
        idx = np.nonzero((windows == w).numpy())[0]
        ids = torch.cat([torch.tensor([tok.bos_token_id]), cache.rows(idx, "tokens").long()])[None]
        with torch.no_grad(), record(model, HOOKS) as acts:
            model(ids)
        for hook in HOOKS:
            torch.testing.assert_close(
                cache.rows(idx, hook), acts[hook][0, 1:], atol=1e-4, rtol=1e-4
            )
    cache.verify()


def test_rows_know_their_document(cache, smollm2):
    """`docs` is the index of the play in dataset order, even though harvesting shuffles them."""
    tok = smollm2[1]
    plays = list(load_documents("shakespeare"))
    windows = cache.rows(np.arange(len(cache)), "windows")
    for w in [1, 9]:
        idx = np.nonzero((windows == w).numpy())[0]
        docs = cache.rows(idx, "docs")
        if (docs == docs[0]).all():
            play = tok(plays[int(docs[0])], add_special_tokens=False).input_ids
            window = cache.rows(idx, "tokens").tolist()
            assert any(
                play[i : i + len(window)] == window for i in range(len(play) - len(window) + 1)
            )


def test_background_writer_writes_the_same_bytes(cache, tmp_path, monkeypatch):
    """Preparing shards in the writer thread (CUDA, or spare cores) or in line gives identical shards."""
    default = train.harvest.host_core_spare
    monkeypatch.setattr(train.harvest, "host_core_spare", lambda device: not default(device))
    threaded = harvest(
        out=str(tmp_path / "t"),
        **SMALL,
    )
    assert threaded.manifest["shards"] == cache.manifest["shards"]
    for entry in cache.manifest["shards"]:
        assert (tmp_path / "t" / entry["name"]).read_bytes() == (
            Path(cache.url) / entry["name"]
        ).read_bytes()


def test_forward_stops_at_the_deepest_hook(smollm2):
    model, _ = smollm2
    calls = {i: 0 for i in range(30)}
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(blocks(model))
    ]
    try:
        with torch.no_grad():
            acts = capture(
                model,
                ["blocks.2.hook_resid_pre", "blocks.6.hook_attn_out"],
                input_ids=torch.ones(1, 4, dtype=torch.long),
            )
    finally:
        for h in handles:
            h.remove()
    assert [calls[i] for i in range(6)] == [1] * 6
    assert all(calls[i] == 0 for i in range(6, 30)), "nothing from block 6's MLP onwards runs"
    assert set(acts) == {"blocks.2.hook_resid_pre", "blocks.6.hook_attn_out"}


def test_existing_cache_from_other_hooks_is_refused_and_complete_one_is_kept(cache):
    before = json.loads((Path(cache.url) / "manifest.json").read_text())
    with pytest.raises(CacheMismatch, match="hookpoints: cache has"):
        harvest(
            out=cache.url,
            hook=["blocks.3.hook_resid_pre"],
            tokens=1500,
            context_size=32,
            batch_size=4,
            shard_windows=8,
            dtype="float32",
        )
    again = harvest(
        out=cache.url,
        **SMALL,
    )
    assert again.manifest == before
    with pytest.raises(FileExistsError, match=r"a finished cache of 1,500 tokens.*not extended"):
        harvest(out=cache.url, **{**SMALL, "tokens": 3000})
    assert json.loads((Path(cache.url) / "manifest.json").read_text()) == before


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_computes_in_the_cache_dtype_only_where_it_is_native(native, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", "bfloat16", cpu) == ("bfloat16" if native else "float32")
    assert resolve_precision("auto", "float32", cpu) == "float32"
    assert resolve_precision("bfloat16", "bfloat16", cpu) == "bfloat16", "an explicit one is kept"
    assert resolve_precision("float32", "float16", cpu) == "float32"


def test_a_bf16_cache_of_a_float32_forward_is_the_float32_cache_rounded(cache, tmp_path):
    """Where bf16 is not native the forward runs in fp32 and only storage is bf16: each value is
    the fp32 harvest's, rounded once. Resuming it at another precision would mix two forwards."""
    out = tmp_path / "bf16"
    rounded = harvest(out=str(out), **{**SMALL, "dtype": "bfloat16", "precision": "float32"})
    assert rounded.manifest["dtype"] == "bfloat16" and rounded.manifest["precision"] == "float32"
    rows = np.arange(len(cache))
    for hook in HOOKS:
        assert torch.equal(rounded.rows(rows, hook), cache.rows(rows, hook).to(torch.bfloat16))
    with pytest.raises(
        CacheMismatch, match="precision: cache has 'float32', this harvest 'bfloat16'"
    ):
        harvest(out=str(out), **{**SMALL, "dtype": "bfloat16", "precision": "bfloat16"})


def harvest_args(out) -> list[str]:
    """20 shards of 4 windows, the last cut: after the third, 2 s of forwards are left (2k tokens
    a second here, on 2 threads)."""
    return ["harvest", "--out", str(out), "--tokens", "5000", "--context-size", "64", "--batch-size", "4",
            "--shard-windows", "4", "--hook", "blocks.4.hook_resid_post", "--hook", "blocks.2.hook_attn_out"]  # fmt: skip


def test_sigkill_then_resume_gives_identical_shards(tmp_path):
    killed = tmp_path / "killed"
    proc = start_sae(*harvest_args(killed))
    sigkill_when(proc, killed / "manifest.json", lambda m: len(m["shards"]) >= 3)
    partial = json.loads((killed / "manifest.json").read_text())
    assert not partial["complete"] and 3 <= len(partial["shards"]) < 20, "killed part way"
    # the resume and the uninterrupted harvest in this process, on the killed one's 2 threads
    # (the same float sums); a child spends 10 s importing and loading the model
    in_process(harvest_args(killed), threads=2)
    in_process(harvest_args(tmp_path / "clean"), threads=2)
    a, b = load_cache(killed), load_cache(tmp_path / "clean")
    assert len(a) == len(b) == 5000 and a.manifest["shards"] == b.manifest["shards"]
    for entry in a.manifest["shards"]:
        assert (killed / entry["name"]).read_bytes() == (
            tmp_path / "clean" / entry["name"]
        ).read_bytes()
    a.verify()


def test_a_harvest_stopped_after_its_cut_last_shard_resumes_to_more_tokens(
    cache, tmp_path, monkeypatch
):
    """Killed after writing its last shard, cut to --tokens, but before marking the cache
    complete: asked for more, it redoes that shard whole (it kept the cut and skipped the rest of
    its windows' rows)."""
    out = tmp_path / "cut"

    def killed(self, note=None):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(CacheWriter, "finish", killed)
        with pytest.raises(KeyboardInterrupt):
            harvest(out=str(out), **{**SMALL, "tokens": 1000})
    cut = load_cache(out)
    assert not cut.manifest["complete"] and cut.manifest["shards"][-1]["trimmed"]
    with pytest.raises(ValueError, match=r"already holds 1,000 tokens, more than --tokens 600"):
        harvest(out=str(out), **{**SMALL, "tokens": 600})  # it was marked complete at 1,000
    assert load_cache(out).manifest == cut.manifest
    resumed = harvest(out=str(out), **SMALL)
    assert resumed.manifest["shards"] == cache.manifest["shards"]
    resumed.verify()


def test_dataset_shorter_than_tokens_stops_cleanly(tmp_path, capsys):
    (tmp_path / "text.txt").write_text(
        "Now is the winter of our discontent made glorious summer by this sun of York. " * 20
    )
    settings = {"out": str(tmp_path / "c"), "dataset": str(tmp_path / "text.txt"), "tokens": 100_000,
                "context_size": 32, "batch_size": 2, "shard_windows": 4, "device": "cpu"}  # fmt: skip
    c = harvest(**settings)
    assert c.manifest["complete"] and 0 < len(c) < 100_000
    assert "the dataset ended after" in c.manifest["note"]
    assert "the dataset ended after" in capsys.readouterr().err
    assert harvest(**settings).manifest == c.manifest, "the same command again: already complete"


def test_an_empty_dataset_leaves_no_cache_that_blocks_the_run_after_the_fix(tmp_path):
    """It left a "complete" cache of 0 tokens, and the re-run with text refused it."""
    text = tmp_path / "text.txt"
    text.write_text("")
    settings = {"out": str(tmp_path / "c"), "dataset": str(text), "tokens": 200,
                "context_size": 32, "batch_size": 2, "shard_windows": 4, "dtype": "float32"}  # fmt: skip
    with pytest.raises(ValueError, match=r"fills not one 32-token window: nothing harvested, and"):
        harvest(**settings)
    assert not (tmp_path / "c" / "manifest.json").exists()
    text.write_text("Now is the winter of our discontent made glorious summer by this sun. " * 20)
    assert len(harvest(**settings)) == 200


@pytest.fixture
def poisoned_model(tmp_path, smollm2):
    """A tiny Llama whose embedding of one token is inf: windows holding it give NaN activations."""
    tok = smollm2[1]
    clean_text = "the king is dead, long live the king. " * 40
    bad = sorted(set(tok("Zounds! quoth Falstaff").input_ids) - set(tok(clean_text).input_ids))[0]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=49152,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    with torch.no_grad():
        model.model.embed_tokens.weight[bad] = float("inf")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"{i}.txt").write_text(clean_text)
    (data / "9.txt").write_text("Zounds! quoth Falstaff. " * 10)
    return tmp_path / "model", data, bad


@pytest.mark.parametrize(("batch_size", "shard_windows"), [(2, 2), (2, 6)])
def test_nan_activations_raise_and_nothing_bad_is_written(
    tmp_path, poisoned_model, batch_size, shard_windows
):
    model, data, bad = poisoned_model
    out = tmp_path / "cache"
    cfg = HarvestConfig(
        model=str(model), dataset=str(data), out=str(out), hook=["blocks.1.hook_resid_post"],
        tokens=10_000, context_size=16, batch_size=batch_size, shard_windows=shard_windows,
        pack=False, device="cpu",
    )  # fmt: skip
    with pytest.raises(NonFiniteActivations) as error:
        harvest(cfg)
    found = re.search(
        r"NaN/inf values at hookpoint 'blocks.1.hook_resid_post' in batch (\d+) \(windows (\d+)\.\.(\d+)\)",
        str(error.value),
    )
    assert found, str(error.value)
    batch, first, last = map(int, found.groups())
    # the message names the first batch holding the poisoned token, and its windows
    windows = [bad in w.tokens for w in islice(Harvester(cfg).windows(), last + 1)]
    assert windows.index(True) // batch_size == batch
    assert (first, last) == (batch * batch_size, (batch + 1) * batch_size - 1)
    written = [p.name for p in out.glob("*") if p.name != LOCK_FILE]  # the lock is not data
    assert not [name for name in written if name.startswith(".")], "no partial files"
    kept = first // shard_windows  # the shards before the poisoned batch's
    if not kept:
        assert not written, "nothing was written"
        return
    c = load_cache(out)
    assert not c.manifest["complete"] and len(c.manifest["shards"]) == kept
    c.verify()
    for i in range(kept):
        assert torch.isfinite(c.read_shard(i)["acts.blocks.1.hook_resid_post"]).all()


def test_harvest_to_s3_resumes_and_matches_local(s3_bucket, cache):
    """Into s3:// (moto): a harvest that died after its first shard resumes, and the result has
    the same shards, byte for byte, as the local harvest."""
    import fsspec

    url = f"{s3_bucket}/smollm2/cache"
    died = CacheWriter(url, {k: cache.manifest[k] for k in IDENTITY if k != "format"})
    died.write_shard(cache.read_shard(0))
    resumed = harvest(
        out=url,
        **SMALL,
    )
    assert resumed.manifest["shards"] == cache.manifest["shards"] and resumed.manifest["complete"]
    resumed.verify()
    fs = fsspec.filesystem("s3")
    for entry in cache.manifest["shards"]:
        assert (
            fs.cat_file(f"{url}/{entry['name']}") == (Path(cache.url) / entry["name"]).read_bytes()
        )


def test_training_straight_from_the_model_sees_the_harvest_rows(cache, tmp_path):
    """Streaming (no cache) forwards the same windows a harvest would, shuffled within each group."""
    import train
    from train.config import HarvestConfig
    from train.sources import ModelSource

    stream = HarvestConfig(
        hook=HOOKS, context_size=32, batch_size=4, shard_windows=8, dtype="float32", device="cpu"
    )
    source = ModelSource(stream)
    source.open(HOOKS, batch_size=124, seed=0)
    first = torch.cat([b[HOOKS[0]] for b in islice(iter(source), 2)])  # 248 rows = the first group
    shard = cache.read_shard(0)[f"acts.{HOOKS[0]}"]
    assert len(first) == len(shard) == 248
    sort = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    torch.testing.assert_close(sort(first), sort(shard))
    assert not torch.equal(first, shard), "rows are shuffled within the group"
    d = train.fit(
        stream,
        architecture="topk",
        d_sae=1152,
        k=16,
        total_tokens=992,
        batch_size=248,
        out=str(tmp_path),
    )
    assert (
        d.cfg.hook_name == HOOKS[0]
        and d.cfg.model_name == "smollm2-135m"
        and d.cfg.context_size == 32
    )


def test_training_from_a_dataset_without_one_window_is_refused(tmp_path):
    """Each pass over it would give no rows: the stream would wait for ever for the first."""
    from train.sources import ModelSource

    (tmp_path / "empty.txt").write_text("")
    stream = HarvestConfig(
        dataset=str(tmp_path / "empty.txt"), hook=HOOKS[:1], context_size=32, device="cpu"
    )
    with pytest.raises(ValueError, match=r"empty.txt' \(split train\) fills not one 32-token"):
        ModelSource(stream).open(HOOKS[:1], batch_size=124, seed=0)


def test_a_harvest_resumed_on_changed_text_is_refused(tmp_path):
    """Only the dataset's name was recorded: resuming after its files changed mixed old and new
    text. The manifest holds the files' fingerprint, and a different one is refused."""
    from train.data import dataset_fingerprint

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("Now is the winter of our discontent made glorious summer. " * 40)
    settings = dict(dataset=str(texts), out=str(tmp_path / "cache"), tokens=200, context_size=32,
                    shard_windows=8, dtype="float32")  # fmt: skip
    cache = harvest(**settings)
    assert cache.manifest["dataset_fingerprint"] == dataset_fingerprint(str(texts)) != ""
    (texts / "a.txt").write_text("Friends, Romans, countrymen, lend me your ears. " * 40)
    with pytest.raises(CacheMismatch, match="dataset_fingerprint: cache has '[0-9a-f]{64}'"):
        harvest(**settings)


def test_each_rank_of_a_model_stream_forwards_only_the_windows_of_its_rows(monkeypatch):
    """Two ranks' parts of each batch, side by side, are one process's batch (up to the float
    error of forwarding windows in other groups), and each rank forwards about half the windows
    one process forwards (every rank forwarded all of them)."""
    from train.sources import ModelSource

    stream = HarvestConfig(
        hook=HOOKS, context_size=32, batch_size=4, shard_windows=16, dtype="float32", device="cpu"
    )
    source = ModelSource(stream)
    source.open(HOOKS, batch_size=124, seed=0)
    harvester, forwarded = source.harvester, []
    shard_rows = harvester.shard_rows
    monkeypatch.setattr(
        harvester, "shard_rows", lambda w, *a: forwarded.extend(w) or shard_rows(w, *a)
    )
    one = list(islice(harvester.stream(124), 12))
    windows = len(forwarded)
    parts = []
    for rank in (0, 1):
        forwarded.clear()
        parts.append(list(islice(harvester.stream(124, rank, 2), 12)))
        assert len(forwarded) <= 0.65 * windows, (rank, len(forwarded), windows)
    for batch, part0, part1 in zip(one, *parts, strict=True):
        for hook in HOOKS:
            joined = torch.cat([part0[hook], part1[hook]])
            torch.testing.assert_close(joined, batch[hook], atol=1e-4, rtol=1e-4)  # batched apart


SPLIT = ["--tokens", "1500", "--context-size", "32", "--batch-size", "2", "--shard-windows", "4",
         "--hook", "blocks.2.hook_resid_post", "--dtype", "float32", "--device", "cpu"]  # fmt: skip
"""13 shards, the last cut: a harvest small enough to split over processes in a test."""


def torchrun_harvest(out: Path, processes: int) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(processes), "-m", "sae.cli", "harvest", "--out", str(out), *SPLIT]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out.parent / f"{out.name}.log", "ab") as log:  # the workers' output, to look at
        return subprocess.Popen(launcher, env=env, stdout=log, stderr=subprocess.STDOUT)


def rank_process(out: Path, rank: int) -> int | None:
    """The pid of the torchrun worker of this rank harvesting into `out`."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if f"RANK={rank}".encode() in environ and str(out).encode() in cmdline:
            return int(proc.name)
    return None


def test_a_harvest_split_over_processes_is_the_one_process_cache_and_survives_a_killed_rank(
    tmp_path,
):
    """torchrun: each rank forwards and writes every n-th shard; the merged cache is the one
    process's, byte for byte. A rank killed part way fails the job at once, and a rerun resumes
    from the shards every part lists."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker: the same float sums
    try:
        cli(["harvest", "--out", str(tmp_path / "one"), *SPLIT])
    finally:
        torch.set_num_threads(threads)
    split = tmp_path / "split"
    job = torchrun_harvest(split, 2)
    while not read_json(split / "manifest.part-1.json")["shards"]:  # rank 1 wrote a shard
        assert job.poll() is None, "the job ended before rank 1 wrote a shard"
        time.sleep(0.02)
    os.kill(rank_process(split, 1), signal.SIGKILL)
    assert job.wait(timeout=120) != 0, "the job goes down with its rank"
    assert not (split / "manifest.json").exists()
    done = [
        s["name"] for r in (0, 1) for s in read_json(split / f"manifest.part-{r}.json")["shards"]
    ]
    assert 1 <= len(done) < 13
    assert torchrun_harvest(split, 2).wait(timeout=180) == 0
    assert not list(split.glob("manifest.part-*"))
    one = sorted(p.name for p in (tmp_path / "one").glob("shard-*"))
    assert sorted(p.name for p in split.glob("shard-*")) == one and len(one) == 13
    for name in ["manifest.json", *one]:
        assert (split / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"shards": []}
