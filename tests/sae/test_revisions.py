"""A model's revisions (`--revision`): a hub branch or tag read through huggingface_hub's cache, as
Pythia's step8000 is, or a checkpoint's own folder; recorded in the cache's manifest and the
dictionary's cfg.json, refused when a harvest would mix two, and used again by eval."""

import pytest
import torch

import train
from eval.report import EvalConfig, load_inputs
from sae.lm import load_lm
from tests.conftest import COMMITS, REPO
from train.cache import CacheMismatch
from train.harvest import harvest

HOOK = "blocks.1.hook_resid_post"


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x, y = a.state_dict(), b.state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_revision_loads_that_snapshot_and_an_unknown_one_names_those_there_are(trajectory):
    models, repo = trajectory
    step1, _ = load_lm(REPO, revision="step1")
    main, _ = load_lm(REPO)
    assert same_weights(step1, models["step1"]) and same_weights(main, models["main"])
    with pytest.raises(OSError, match=r"has no revision 'step9'; it has \['main', 'step1'\]"):
        load_lm(REPO, revision="step9")
    # a checkpoint's folder as the revision
    folder, _ = load_lm(REPO, revision=str(repo / "snapshots" / COMMITS["step1"]))
    assert same_weights(folder, models["step1"])
    with pytest.raises(ValueError, match="is a folder on this machine .* no revision 'step1'"):
        load_lm(str(repo / "snapshots" / COMMITS["main"]), revision="step1")


def test_the_revision_goes_from_harvest_to_the_dictionary_and_back_to_eval(trajectory, tmp_path):
    models, _ = trajectory
    settings = dict(model=REPO, hook=[HOOK], tokens=512, context_size=32, batch_size=8,
                    shard_windows=8, dtype="float32", device="cpu")  # fmt: skip
    cache = harvest(out=str(tmp_path / "cache"), revision="step1", **settings)
    assert cache.manifest["model_revision"] == "step1"
    with pytest.raises(CacheMismatch, match="model_revision: cache has 'step1', this harvest ''"):
        harvest(out=str(tmp_path / "cache"), **{**settings, "tokens": 1024})
    d = train.fit(cache.url, architecture="topk", k=4, d_sae=32, batch_size=128,
                  total_tokens=512, out=str(tmp_path / "run"))  # fmt: skip
    assert (d.cfg.model_name, d.cfg.model_revision) == (REPO, "step1")
    lm, *_ = load_inputs(d, EvalConfig(sae="", tokens=64, context_size=32))
    assert same_weights(lm, models["step1"]), "eval runs the revision the SAE was trained on"


def test_a_streamed_runs_checkpoint_folder_is_the_same_data_from_another_directory(
    trajectory, tmp_path, monkeypatch
):
    from train.config import HarvestConfig
    from train.sources import ModelSource

    _, repo = trajectory
    identities = []
    for cwd in (repo, repo / "snapshots"):  # the same folder, typed relative to two directories
        monkeypatch.chdir(cwd)
        folder = f"{'snapshots/' if cwd == repo else ''}{COMMITS['step1']}"
        source = ModelSource(HarvestConfig(model=REPO, revision=folder, hook=[HOOK],
                                           context_size=32, dtype="float32", device="cpu"))  # fmt: skip
        source.open([HOOK], batch_size=64, seed=0)
        identities.append(source.identity)
    assert identities[0] == identities[1]
    assert identities[0]["revision"] == str(repo / "snapshots" / COMMITS["step1"])
