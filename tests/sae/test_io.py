"""Our on-disk format: round trips, sparsify import, and refusal of bad files."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sae
from sae.io import CFG_FILE, WEIGHTS_FILE, load_set
from tests.conftest import make_sae


@pytest.mark.parametrize("architecture", sae.ARCHITECTURES)
@torch.no_grad()
def test_save_load_round_trip(tmp_path, architecture):
    d = make_sae(
        architecture, hook_name="blocks.2.hook_mlp_out", model_name="gpt2", context_size=64
    )
    d.save(tmp_path / "sae")
    back = sae.load(tmp_path / "sae")
    assert type(back) is type(d)
    assert back.cfg == d.cfg
    x = torch.randn(7, 6)
    torch.testing.assert_close(back.encode(x), d.encode(x))
    torch.testing.assert_close(back(x), d(x))


@torch.no_grad()
def test_normalization_is_folded_at_save(tmp_path):
    d = make_sae("topk", normalize_activations="expected_average_only_in", norm_scaling_factor=2.5)
    d.save(tmp_path)
    back = sae.load(tmp_path)
    assert back.cfg.normalize_activations == "none" and back.cfg.norm_scaling_factor == 1.0
    x = torch.randn(4, 6)
    torch.testing.assert_close(back(x), d(x))
    assert d.cfg.normalize_activations == "expected_average_only_in", (
        "saving must not change the live SAE"
    )


def test_saved_files_use_saelens_keys_and_shapes(tmp_path):
    make_sae("batchtopk", d_in=6, d_sae=16).save(tmp_path)
    cfg = json.loads((tmp_path / CFG_FILE).read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["sae_forge"]["architecture"] == "batchtopk"
    assert cfg["metadata"]["hook_name"] == "blocks.6.hook_resid_post"
    weights = load_file(tmp_path / WEIGHTS_FILE)
    assert {n: tuple(t.shape) for n, t in weights.items()} == {
        "W_enc": (6, 16),
        "W_dec": (16, 6),
        "b_enc": (16,),
        "b_dec": (6,),
        "threshold": (16,),
    }
    assert not list(tmp_path.glob("*.tmp")), "temporary files must be renamed away"


def test_load_casts_dtype(tmp_path):
    make_sae("standard").save(tmp_path)
    assert sae.load(tmp_path, dtype="bfloat16").W_enc.dtype == torch.bfloat16


# -- sparsify -------------------------------------------------------------------------------------
def write_sparsify(folder, d_in=6, num_latents=16, k=3, **extra_cfg):
    """A folder in sparsify's layout, built from its documented key names."""
    torch.manual_seed(3)
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(
        json.dumps(
            {
                "expansion_factor": 32,
                "normalize_decoder": True,
                "num_latents": num_latents,
                "k": k,
                "multi_topk": False,
                "skip_connection": False,
                "transcode": False,
                "d_in": d_in,
                **extra_cfg,
            }
        )
    )
    weights = {
        "encoder.weight": torch.randn(num_latents, d_in),
        "encoder.bias": torch.randn(num_latents) * 0.1,
        "W_dec": torch.randn(num_latents, d_in),
        "b_dec": torch.randn(d_in) * 0.1,
    }
    save_file(weights, folder / "sae.safetensors")
    return weights


@torch.no_grad()
def test_sparsify_import_matches_sparsify_math(tmp_path):
    folder = tmp_path / "run" / "layers.4"
    w = write_sparsify(folder)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m"}))
    d = sae.load(folder)
    assert d.cfg.architecture == "topk" and d.cfg.k == 3
    assert (
        d.cfg.hook_name == "blocks.4.hook_resid_post"
        and d.cfg.model_name == "EleutherAI/pythia-70m"
    )
    x = torch.randn(5, 6)
    # sparsify: pre = relu((x - b_dec) @ encoder.weight.T + encoder.bias); top-k; decode with W_dec
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    vals, idx = pre.topk(3)
    x_hat = (
        torch.stack([(vals[n, :, None] * w["W_dec"][idx[n]]).sum(0) for n in range(5)]) + w["b_dec"]
    )
    torch.testing.assert_close(d(x), x_hat)


@pytest.mark.parametrize("skip", [False, True])
@torch.no_grad()
def test_sparsify_transcoder_imports_with_sparsify_math(tmp_path, skip):
    """sparsify's transcode: no b_dec subtracted from the input; the MLP module's input and output
    are the hookpoints; a skip connection adds x @ W_skip.T (sparsify's `x @ W_skip.mT`)."""
    folder = tmp_path / "layers.2.mlp"
    w = write_sparsify(folder, transcode=True, skip_connection=skip)
    if skip:
        w["W_skip"] = torch.randn(6, 6) * 0.3
        save_file(w, folder / "sae.safetensors")
    d = sae.load(folder)
    assert (d.cfg.hook_name, d.cfg.hook_name_out) == (
        "blocks.2.mlp.hook_in",
        "blocks.2.hook_mlp_out",
    )
    assert d.cfg.skip == skip and not d.cfg.apply_b_dec_to_input
    x = torch.randn(5, 6)
    pre = torch.relu(x @ w["encoder.weight"].T + w["encoder.bias"])
    vals, idx = pre.topk(3)
    y = torch.stack([(vals[n, :, None] * w["W_dec"][idx[n]]).sum(0) for n in range(5)]) + w["b_dec"]
    if skip:
        y = y + x @ w["W_skip"].mT
    torch.testing.assert_close(d(x), y)


def test_sparsify_coders_we_cannot_express_are_refused(tmp_path):
    write_sparsify(tmp_path / "layers.1.self_attn", transcode=True)
    with pytest.raises(sae.FormatError, match="transcoder of module 'layers.1.self_attn'"):
        sae.load(tmp_path / "layers.1.self_attn")
    write_sparsify(tmp_path / "layers.1", skip_connection=True)
    with pytest.raises(sae.FormatError, match="autoencoder with a skip connection"):
        sae.load(tmp_path / "layers.1")


# -- bad input ------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    make_sae("topk").save(tmp_path)
    return tmp_path


def edit_cfg(folder, fn):
    cfg = json.loads((folder / CFG_FILE).read_text())
    fn(cfg)
    (folder / CFG_FILE).write_text(json.dumps(cfg))


def test_malformed_json_names_the_file(saved):
    (saved / CFG_FILE).write_text('{"d_in": 6,')
    with pytest.raises(sae.FormatError, match=r"cfg\.json is not valid JSON"):
        sae.load(saved)


def test_missing_key_is_named(saved):
    edit_cfg(saved, lambda c: (c.pop("sae_forge"), c.pop("d_sae")))
    with pytest.raises(sae.FormatError, match=r"missing required keys \['d_sae'\]"):
        sae.load(saved)


def test_wrong_type_is_named(saved):
    edit_cfg(saved, lambda c: c["sae_forge"].update(d_sae="16"))
    with pytest.raises(sae.FormatError, match=r"cfg\.json.*d_sae should be int, got str"):
        sae.load(saved)


def test_unknown_architecture_is_named(saved):
    edit_cfg(saved, lambda c: c["sae_forge"].update(architecture="relu2"))
    with pytest.raises(sae.FormatError, match=r"cfg\.json: unknown architecture 'relu2'"):
        sae.load(saved)


def test_unknown_saelens_architecture_is_named(saved):
    edit_cfg(saved, lambda c: (c.pop("sae_forge"), c.update(architecture="temporal")))
    with pytest.raises(sae.FormatError, match="SAELens architecture 'temporal' is not supported"):
        sae.load(saved)


def test_weights_that_disagree_with_cfg_are_refused(saved):
    edit_cfg(saved, lambda c: c["sae_forge"].update(d_sae=20))
    with pytest.raises(sae.FormatError, match=r"W_enc has shape \[6, 16\], expected \[6, 20\]"):
        sae.load(saved)


def test_missing_tensor_is_named(saved):
    weights = load_file(saved / WEIGHTS_FILE)
    del weights["b_enc"]
    save_file(weights, saved / WEIGHTS_FILE)
    with pytest.raises(sae.FormatError, match="missing b_enc"):
        sae.load(saved)


def test_truncated_weights_are_refused(saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(sae.FormatError, match="not a readable safetensors file"):
        sae.load(saved)


@pytest.mark.parametrize("name", ["sae.pt", "model.bin", "weights.pkl"])
def test_pickles_are_never_loaded(tmp_path, name):
    marker = tmp_path / "executed"
    # a real malicious pickle: unpickling it would create `marker`
    import pickle

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / name).write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(sae.PickleRefused, match="pickle"):
        sae.load(tmp_path)
    with pytest.raises(sae.PickleRefused, match="runs whatever code"):
        sae.load(tmp_path / name)
    assert not marker.exists()


def test_missing_directory_and_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SAE directory"):
        sae.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no SAE"):
        sae.load(tmp_path)


def test_a_run_folder_or_a_cache_is_told_apart_from_an_sae(tmp_path):
    """A SAELens user passes the training run's folder; say where its SAEs are."""
    make_sae("topk").save(tmp_path / "run" / "topk-k4")
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(
        FileNotFoundError, match=r"a training run's folder holding 1 dictionaries: \['topk-k4'\]"
    ):
        sae.load(tmp_path / "run")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="it is an activation cache"):
        sae.load(tmp_path / "cache")


def test_a_sparsify_run_folder_lists_its_coders_instead_of_refusing_its_pickles(tmp_path):
    """sparsify's checkpoint folder keeps its optimizer and state as .pt pickles beside one folder
    per hookpoint: the coders are loadable, and we never unpickle the rest."""
    run = tmp_path / "checkpoints" / "run"
    for layer in (10, 6):
        write_sparsify(run / f"layers.{layer}")
    for name in ("optimizer_0.pt", "state.pt", "lr_scheduler_0.pt"):
        (run / name).write_bytes(b"not unpickled")
    (run / "config.json").write_text("{}")
    with pytest.raises(
        FileNotFoundError, match=r"holding 2 dictionaries: \['layers.6', 'layers.10'\]"
    ):
        sae.load(run)
    assert [d.cfg.hook_name for d in load_set(run)] == [
        "blocks.6.hook_resid_post",
        "blocks.10.hook_resid_post",
    ]


def test_unknown_scheme(tmp_path):
    with pytest.raises(ValueError, match="unknown SAE source 'ftp:x'"):
        sae.load("ftp:x")


def test_non_object_sections_are_named(saved):
    edit_cfg(saved, lambda c: c.update(sae_forge=None))
    with pytest.raises(sae.FormatError, match="sae_forge should hold a JSON object"):
        sae.load(saved)
    edit_cfg(saved, lambda c: (c.pop("sae_forge"), c.update(metadata=["blocks.6"])))
    with pytest.raises(sae.FormatError, match="metadata should hold a JSON object"):
        sae.load(saved)


def test_integer_weights_are_named_with_their_file(saved):
    state = {n: t.to(torch.int32) for n, t in load_file(saved / WEIGHTS_FILE).items()}
    save_file(state, saved / WEIGHTS_FILE)
    with pytest.raises(sae.FormatError, match=r"sae_weights\.safetensors stores int32 weights"):
        sae.load(saved)


def test_dtype_may_be_a_torch_dtype(saved):
    assert sae.load(saved, dtype=torch.float16).W_enc.dtype == torch.float16


def test_decode_refuses_codes_of_another_width():
    with pytest.raises(ValueError, match=r"d_sae=16, got shape \(3, 15\)"):
        make_sae("topk").decode(torch.zeros(3, 15))


def test_write_json_is_strict_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    """Undefined scores (NaN) are null, which strict JSON readers take; a failed write (a full
    disk) leaves the previous report whole."""
    from sae.io import write_json

    path = tmp_path / "eval.json"
    write_json(path, {"fvu": float("nan"), "l0": 32.0, "per": [float("inf"), 1.0], "n": 3})
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {
        "fvu": None, "l0": 32.0, "per": [None, 1.0], "n": 3
    }  # fmt: skip

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError):
        write_json(path, {"l0": 1.0})
    monkeypatch.undo()
    assert json.loads(path.read_text())["l0"] == 32.0
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_weights_holding_nan_are_refused_by_name(tmp_path):
    """A diverged run's SAE loaded silently and turned every input into NaN codes."""
    from safetensors.torch import load_file, save_file

    make_sae("topk").save(tmp_path)
    state = load_file(tmp_path / "sae_weights.safetensors")
    state["W_dec"][3, :2] = float("nan")
    state["b_enc"][0] = float("inf")
    save_file(state, tmp_path / "sae_weights.safetensors")
    with pytest.raises(
        sae.FormatError, match="W_dec holds 2 NaN or infinite values; b_enc holds 1"
    ):
        sae.load(tmp_path)
