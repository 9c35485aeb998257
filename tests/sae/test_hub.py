"""sae.load from the Hugging Face hub and SAELens's registry, against a local HF cache (offline)."""

import shutil

import huggingface_hub.constants
import pytest
import torch

import sae
from sae.hub import HubError, resolve_saelens
from tests.conftest import make_sae

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF cache, with the hub unreachable: only what a test puts in the cache exists."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_cache(cache, repo_id, subdir, folder):
    """Lay out `folder`'s files as huggingface_hub caches a downloaded repo snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    target = repo / "snapshots" / COMMIT / subdir
    target.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        shutil.copy(f, target / f.name)


@torch.no_grad()
def test_hf_repo_subdir_loads_from_cache(tmp_path, hf_cache):
    d = make_sae("jumprelu")
    d.save(tmp_path / "local")
    put_in_cache(hf_cache, "someorg/saes", "layer_6/width_16", tmp_path / "local")
    back = sae.load("hf:someorg/saes/layer_6/width_16")
    x = torch.randn(3, 6)
    torch.testing.assert_close(back(x), d(x))


def test_hf_repo_root_loads_from_cache(tmp_path, hf_cache):
    make_sae("topk").save(tmp_path / "local")
    put_in_cache(hf_cache, "someorg/one-sae", "", tmp_path / "local")
    assert sae.load("hf:someorg/one-sae").cfg.architecture == "topk"


def test_hf_unreachable_gives_clear_error(hf_cache):
    with pytest.raises(
        HubError, match=r"could not fetch hf:someorg/absent .* not in the local cache"
    ):
        sae.load("hf:someorg/absent/sub")


def test_hf_spec_needs_org_and_repo():
    with pytest.raises(ValueError, match="hf:org/repo"):
        sae.load("hf:justone")


# -- SAELens registry -----------------------------------------------------------------------------
def test_saelens_release_resolves_offline():
    pytest.importorskip("sae_lens")
    ref = resolve_saelens("gpt2-small-res-jb/blocks.4.hook_resid_pre")
    assert (ref.release, ref.sae_id) == ("gpt2-small-res-jb", "blocks.4.hook_resid_pre")
    assert (ref.repo_id, ref.folder_name) == (
        "jbloom/GPT2-Small-SAEs-Reformatted",
        "blocks.4.hook_resid_pre",
    )
    assert ref.converter == "sae_lens"


def test_saelens_unknown_release_and_id():
    pytest.importorskip("sae_lens")
    with pytest.raises(ValueError, match="no SAELens release is a prefix"):
        resolve_saelens("no-such-release/x")
    with pytest.raises(ValueError, match="has no SAE 'blocks.99.hook_resid_pre'"):
        resolve_saelens("gpt2-small-res-jb/blocks.99.hook_resid_pre")


@torch.no_grad()
def test_saelens_release_loads_through_its_converter(tmp_path, hf_cache):
    """The release's files are what SAELens itself saved; they come from the (local) hub cache."""
    sae_lens = pytest.importorskip("sae_lens")
    cfg = sae_lens.StandardSAEConfig(d_in=8, d_sae=24)
    cfg.metadata.hook_name = "blocks.0.hook_resid_pre"
    theirs = sae_lens.StandardSAE(cfg)
    for p in theirs.parameters():
        p.copy_(torch.randn_like(p) * 0.3)
    theirs.save_model(str(tmp_path / "local"))
    put_in_cache(
        hf_cache,
        "jbloom/GPT2-Small-SAEs-Reformatted",
        "blocks.0.hook_resid_pre",
        tmp_path / "local",
    )
    ours = sae.load("saelens:gpt2-small-res-jb/blocks.0.hook_resid_pre")
    assert ours.cfg.hook_name == "blocks.0.hook_resid_pre"
    x = torch.randn(5, 8)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_saelens_hub_unreachable_gives_clear_error(hf_cache):
    pytest.importorskip("sae_lens")
    with pytest.raises(
        HubError,
        match=r"resolves to hf:jbloom/GPT2-Small-SAEs-Reformatted/blocks.2.hook_resid_pre.*could not be fetched",
    ):
        sae.load("saelens:gpt2-small-res-jb/blocks.2.hook_resid_pre")
