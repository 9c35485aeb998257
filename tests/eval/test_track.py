"""`sae track` on dictionaries whose lineages are known: identical ones persist whole, a permuted
copy is matched back to the permutation, and latents built to split, merge, be born and die are
named so."""

import json

import pytest
import torch
from torch.nn import functional as F

import sae
from eval.track import TrackConfig, track
from sae.cli import main
from tests.conftest import REPO, make_sae

D_IN, D_SAE = 64, 32


def saved(tmp_path, name: str, W_dec: torch.Tensor, architecture: str = "topk"):
    d = make_sae(architecture, d_in=D_IN, d_sae=D_SAE)
    with torch.no_grad():
        d.W_dec.copy_(W_dec)
    d.save(tmp_path / name)
    return str(tmp_path / name)


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_identical_dictionaries_persist_whole_and_a_permuted_copy_is_matched_back(tmp_path):
    W = unit_rows(D_SAE, D_IN, 0)
    order = torch.randperm(len(W), generator=torch.Generator().manual_seed(1))
    refs = [saved(tmp_path, "a", W), saved(tmp_path, "b", W), saved(tmp_path, "c", W[order])]
    result = track(TrackConfig(dictionaries=refs))
    same, permuted = result["transitions"]
    assert (same["persists"], same["born"], same["died"]) == (len(W), 0, 0)
    assert same["mean_persisting_cosine"] == pytest.approx(1)
    assert permuted["persists"] == len(W)
    parents = [latent["parent"] for latent in result["latents"][2]]
    assert parents == order.tolist(), "c's latent j is b's latent order[j]"
    assert [x["lineage"] for x in result["latents"][2]] == order.tolist()
    assert result["lineages"] == {"count": len(W), "first_reaching_end": len(W)}


def test_splits_merges_births_and_deaths_are_named(tmp_path):
    """Latent 0 of `before` splits into two latents of `after` (each 0.6 of the way from it to
    another direction: the Hungarian match keeps one, the other is split off), latent 2 merges
    into latent 1 (after: 1 + 0.6 of 2), latent 3 dies and a new one is born."""
    n = D_SAE
    base = unit_rows(n + 4, D_IN, 0)
    before, after = base[:n].clone(), base[:n].clone()
    after[0] = F.normalize(base[0] + 0.6 * base[n], dim=-1)
    after[3] = F.normalize(base[0] + 0.6 * base[n + 1], dim=-1)  # the second half of the split
    after[1] = F.normalize(base[1] + 0.6 * base[2], dim=-1)
    after[2] = base[n + 2]  # born where 2 was: 2 merged into 1
    refs = [saved(tmp_path, "before", before), saved(tmp_path, "after", after)]
    result = track(TrackConfig(dictionaries=refs, persist=0.75, related=0.4))
    old, new = result["latents"]
    assert sorted([new[0]["status"], new[3]["status"]]) == ["persists", "split"]
    assert new[0]["parent"] == new[3]["parent"] == 0
    assert [new[j]["status"] for j in (1, 2)] == ["persists", "born"]
    assert [old[i]["fate"] for i in range(4)] == ["persists", "persists", "merged", "died"]
    assert old[2]["child"] == 1
    assert result["lineages"] == {"count": n + 2, "first_reaching_end": n - 2}
    (step,) = result["transitions"]
    assert (step["split"], step["born"], step["merged"], step["died"]) == (1, 1, 1, 1)
    assert step["persists"] == n - 2


def test_the_cli_writes_the_page_plot_and_json_and_refuses_other_dictionaries(tmp_path, capsys):
    W = unit_rows(D_SAE, D_IN, 0)
    refs = [saved(tmp_path, "a", W), saved(tmp_path, "b", W)]
    main(["track", *refs, "--out", str(tmp_path / "out")])
    assert "0 born" in capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "track.json").read_text())
    assert result["schema"] == "sae-forge-track/1" and len(result["latents"]) == 2
    assert (tmp_path / "out" / "track.png").stat().st_size > 0
    assert "Features across checkpoints" in (tmp_path / "out" / "track.html").read_text()
    other = make_sae("jumprelu", d_in=D_IN, d_sae=D_SAE)
    other.save(tmp_path / "jumprelu")
    with pytest.raises(ValueError, match="has architecture 'jumprelu' where .* has 'topk'"):
        track(TrackConfig(dictionaries=[refs[0], str(tmp_path / "jumprelu")]))
    with pytest.raises(ValueError, match="related <= persist"):
        TrackConfig(persist=0.3, related=0.5)


def test_with_tokens_each_dictionary_runs_on_its_own_checkpoint(trajectory, tmp_path):
    """One dictionary saved as trained on revisions main, main and step1 of a two-revision model:
    each is scored on its own checkpoint; on the same checkpoint the same latents fire alike
    (correlation 1, the activation matching agrees), and the last dictionary's explained
    variance on the last checkpoint is its own."""
    torch.manual_seed(0)
    base = sae.create("topk", d_in=16, d_sae=16, k=4, hook_name="blocks.1.hook_resid_post",
                      model_name=REPO)  # fmt: skip
    refs = []
    for i, revision in enumerate(["main", "main", "step1"]):
        base.cfg.model_revision = revision
        base.save(tmp_path / f"d{i}")
        refs.append(str(tmp_path / f"d{i}"))
    result = track(TrackConfig(dictionaries=refs, tokens=248, context_size=32))
    first, second, last = result["checkpoints"]
    assert [c["revision"] for c in result["checkpoints"]] == ["main", "main", "step1"]
    assert first["explained_variance"] == second["explained_variance"] != last["explained_variance"]
    assert last["last_dictionary_explained_variance"] == pytest.approx(last["explained_variance"])
    assert first["last_dictionary_explained_variance"] == pytest.approx(first["explained_variance"])
    same, moved = result["transitions"]
    assert same["mean_persisting_correlation"] == pytest.approx(1, abs=1e-5)
    assert same["activation_agreement"] == 1
    assert -1 <= moved["mean_persisting_correlation"] < 1 and moved["persists"] == 16
    assert all(x["correlation"] is not None for x in result["latents"][2])
