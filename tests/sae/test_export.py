"""`sae export`: circuit-tracer's transcoder sets read back by circuit-tracer 0.5.0's own loader,
sparsify's layout read back by our sparsify import, and what a target cannot express refused."""

import sys
from pathlib import Path

import pytest
import torch
import yaml

import sae
from sae.cli import main
from sae.export import export
from tests.conftest import make_sae
from tests.sae.test_clt import make_clt

CLIENTS = Path(__file__).resolve().parents[2] / ".venv" / "clients"
RULES = ["standard", "jumprelu", "batchtopk"]


def transcoder(architecture, layer, skip=False, d_sae=24):
    return make_sae(architecture, d_in=8, d_sae=d_sae, k=3, d_out=8, hook_name=f"blocks.{layer}.mlp.hook_in",
                    hook_name_out=f"blocks.{layer}.hook_mlp_out", apply_b_dec_to_input=False, skip=skip,
                    normalize_activations="expected_average_only_in", norm_scaling_factor=0.7,
                    norm_scaling_factor_out=1.9, seed=layer)  # fmt: skip


@pytest.fixture
def circuit_tracer(monkeypatch):
    """circuit-tracer's transcoder module, from the copy `make install` puts in .venv/clients."""
    if not (CLIENTS / "circuit_tracer").exists():
        pytest.fail(f"{CLIENTS} lacks circuit-tracer: run `make install`")
    monkeypatch.syspath_prepend(str(CLIENTS))
    import circuit_tracer.transcoder.single_layer_transcoder as module

    yield module
    for name in [m for m in sys.modules if m.startswith("circuit_tracer")]:
        del sys.modules[name]


@pytest.mark.parametrize("skip", [False, True])
@torch.no_grad()
def test_a_transcoder_set_loads_in_circuit_tracer_with_our_codes_and_outputs(
    tmp_path, circuit_tracer, skip
):
    """A run's folder of 3 per-layer transcoders (ReLU, JumpReLU, BatchTopK, scales folded) read
    by circuit-tracer's load_transcoder_set: same codes and reconstructions at every layer."""
    run = tmp_path / "run"
    ours = [transcoder(rule, layer, skip) for layer, rule in enumerate(RULES)]
    for t in ours:
        t.save(run / t.cfg.hook_name.replace(".", "_"))
    out = export(run, "circuit-tracer", tmp_path / "ct")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == (
        "mlp.hook_in",
        "hook_mlp_out",
    )
    paths = dict(enumerate(config["transcoders"]))
    theirs = circuit_tracer.load_transcoder_set(paths, scan=config["scan"], device=torch.device("cpu"),
                                                feature_input_hook=config["feature_input_hook"],
                                                feature_output_hook=config["feature_output_hook"])  # fmt: skip
    assert len(theirs) == 3 and theirs.skip_connection == skip
    x = torch.randn(40, 8) * 2
    for layer, t in enumerate(ours):
        z = t.encode(x)
        assert (z > 0).any() and (z == 0).any()
        their_z = theirs[layer].encode(x)
        torch.testing.assert_close(their_z, z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs[layer].decode(their_z, x), t(x), atol=1e-5, rtol=1e-5)


def test_what_circuit_tracer_cannot_express_is_refused(tmp_path):
    def run_of(*dictionaries):
        folder = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        for i, d in enumerate(dictionaries):
            d.save(folder / str(i))
        return folder

    cases = [
        (run_of(transcoder("topk", 0)), "loads only ReLU and JumpReLU transcoders from files"),
        (run_of(make_sae("standard", d_in=8)), "is an SAE; circuit-tracer's sets are transcoders"),
        (run_of(transcoder("standard", 0), transcoder("standard", 2)), r"every layer from 0; got layers \[0, 2\]"),
        (run_of(transcoder("standard", 0), transcoder("standard", 1, skip=True, d_sae=32)), "one width"),
    ]  # fmt: skip
    for source, message in cases:
        with pytest.raises(ValueError, match=message):
            export(source, "circuit-tracer", tmp_path / "out")
        assert not (tmp_path / "out").exists(), "nothing written"


@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip_transcoder"])
@torch.no_grad()
def test_sparsify_export_reads_back_through_our_sparsify_import(tmp_path, kind):
    if kind == "sae":
        d = make_sae("topk", d_in=8, d_sae=24, k=3, hook_name="blocks.2.hook_resid_post")
    else:
        d = transcoder("topk", 2, skip=kind == "skip_transcoder")
    out = tmp_path / ("layers.2" if kind == "sae" else "layers.2.mlp")  # sparsify's folder names
    main(["export", str(_saved(d, tmp_path)), str(out), "--format", "sparsify"])
    back = sae.load(out)
    assert (back.cfg.hook_name, back.cfg.hook_name_out) == (d.cfg.hook_name, d.cfg.hook_name_out)
    x = torch.randn(30, 8)
    torch.testing.assert_close(back(x), d(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match="is not empty; pass --overwrite"):
        main(["export", str(tmp_path / "saved"), str(out), "--format", "sparsify"])
    with pytest.raises(
        SystemExit, match="sparsify coders are per-row TopK; this dictionary is jumprelu"
    ):
        main(["export", str(_saved(transcoder("jumprelu", 2), tmp_path, "j")), str(tmp_path / "j2"),
              "--format", "sparsify"])  # fmt: skip


def _saved(d, tmp_path, name="saved"):
    d.save(tmp_path / name)
    return tmp_path / name


@pytest.fixture
def circuit_tracer_clt(circuit_tracer):
    import circuit_tracer.transcoder.cross_layer_transcoder as module

    return module


@pytest.mark.parametrize("architecture", RULES)
@torch.no_grad()
def test_a_clt_loads_in_circuit_tracer_with_our_codes_and_outputs(
    tmp_path, circuit_tracer_clt, architecture
):
    """circuit-tracer's load_clt on our export (scales and input centre folded): the same codes at
    every layer and the same reconstructions of every output from them."""
    clt = make_clt(architecture, layers=[0, 1, 2, 3], centred=True,
                   normalize_activations="expected_average_only_in",
                   norm_scaling_factors=[0.5, 2.0, 1.5, 1.0], norm_scaling_factors_out=[3.0, 0.7, 1.1, 2.0])  # fmt: skip
    clt.save(tmp_path / "clt")
    out = export(tmp_path / "clt", "circuit-tracer", tmp_path / "ct")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder"
    theirs = circuit_tracer_clt.load_clt(str(out), feature_input_hook=config["feature_input_hook"],
                                         feature_output_hook=config["feature_output_hook"],
                                         device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)  # fmt: skip
    assert (theirs.n_layers, theirs.d_transcoder, theirs.feature_input_hook) == (
        4,
        16,
        "mlp.hook_in",
    )
    x = torch.randn(4, 30, 6) * 2  # [layers, positions, d], circuit-tracer's layout
    ours = torch.stack([clt.encode_layer(i, x[i]) for i in range(4)])
    their_z = theirs.encode(x)
    assert (ours > 0).any() and (ours == 0).any()
    torch.testing.assert_close(their_z, ours, atol=1e-5, rtol=1e-5)
    rows = x.permute(1, 0, 2).flatten(1)  # [positions, layers * d], ours
    want = clt(rows).unflatten(-1, (4, 6)).permute(1, 0, 2)
    torch.testing.assert_close(theirs.decode(their_z.to_sparse()), want, atol=1e-5, rtol=1e-5)


def test_a_clt_circuit_tracer_cannot_express_is_refused(tmp_path):
    cases = [
        (make_clt("topk"), "loads only ReLU and JumpReLU CLTs from files"),
        (make_clt("standard", layers=[1, 2]), "cover every layer from 0"),
    ]
    for i, (clt, message) in enumerate(cases):
        clt.save(tmp_path / str(i))
        with pytest.raises(ValueError, match=message):
            export(tmp_path / str(i), "circuit-tracer", tmp_path / "out")
        assert not (tmp_path / "out").exists(), "nothing written"
    with pytest.raises(ValueError, match="no layout for a cross_layer_transcoder"):
        export(tmp_path / "0", "saelens", tmp_path / "out")
