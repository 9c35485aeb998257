"""The replacement model on SmolLM2: every MLP output replaced at once by a CLT or a set of
per-layer transcoders. With error terms it is the clean model; a CLT with nothing to write is the
zero ablation; a CLT whose latents write only to their own layer is the transcoder set with the
same weights; `sae eval` scores a CLT folder and a run folder of transcoders."""

import json

import pytest
import torch

import sae
from eval.replacement import replacement_report
from sae.cli import main
from sae.clt import CLTConfig, CrossLayerTranscoder

D, F, LAYERS = 576, 8, 30


def random_clt(architecture="jumprelu", seed=0):
    torch.manual_seed(seed)
    cfg = CLTConfig(architecture=architecture, d_in=D, d_sae=F, k=2, model_name="smollm2-135m",
                    hook_names=[f"blocks.{i}.mlp.hook_in" for i in range(LAYERS)],
                    hook_names_out=[f"blocks.{i}.hook_mlp_out" for i in range(LAYERS)])  # fmt: skip
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        for name, tensor in clt.state_dict().items():
            if name.endswith("threshold"):
                tensor.fill_(0.05)
            elif name.endswith("b_enc"):
                tensor.copy_(torch.rand_like(tensor) * 0.2)
            else:
                tensor.normal_(0, 0.05)
    return clt


def own_layer_only(clt):
    """Zero every block of W_dec_i but layer i's, and the per-layer transcoders it then equals
    (each with its layer's input centre)."""
    transcoders = []
    for i, part in enumerate(clt.layers):
        with torch.no_grad():
            part.W_dec[:, D:] = 0
        t = sae.create(clt.cfg.architecture, d_in=D, d_sae=F, k=2, hook_name=clt.cfg.hook_names[i],
                       hook_name_out=clt.cfg.hook_names_out[i], apply_b_dec_to_input=False,
                       model_name="smollm2-135m")  # fmt: skip
        state = part.state_dict()
        state["W_dec"] = part.W_dec[:, :D].detach().clone()
        state["b_dec"] = clt.b_dec[i * D : (i + 1) * D].detach().clone()
        t.load_state_dict(state)
        transcoders.append(t)
    return transcoders


@pytest.fixture(scope="module")
def ids(heldout_ids):
    return heldout_ids[:2]


def test_with_error_terms_the_replacement_model_is_the_clean_model(smollm2, ids):
    report = replacement_report(random_clt(), smollm2[0], ids)
    assert report["ce_replacement_with_errors"] == pytest.approx(report["ce_clean"], abs=1e-4)
    assert report["kl_replacement_with_errors"] < 1e-5
    assert report["ce_replacement"] > report["ce_clean"] + 0.5, "a random CLT hurts"
    assert len(report["layers"]) == LAYERS and report["tokens"] == ids[:, 2:].numel()
    assert 0 < report["l0"] <= LAYERS * F


def test_a_clt_that_writes_nothing_is_the_zero_ablation(smollm2, ids):
    clt = random_clt()
    with torch.no_grad():
        clt.b_dec.zero_()
        for part in clt.layers:
            part.W_dec.zero_()
    report = replacement_report(clt, smollm2[0], ids)
    assert report["ce_replacement"] == pytest.approx(report["ce_zero_ablation"], rel=1e-5)
    assert report["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-5)


def test_a_clt_writing_only_to_its_own_layers_is_the_transcoder_set(smollm2, ids):
    """The set goes through sae.hooks.splice, the CLT through its own hooks: the same replacement
    model, with each layer reading what the replaced layers before it wrote (closed loop)."""
    clt = random_clt("standard")
    transcoders = own_layer_only(clt)
    as_clt = replacement_report(clt, smollm2[0], ids)
    as_set = replacement_report(transcoders, smollm2[0], ids)
    for key in ("ce_replacement", "kl_replacement", "explained_variance", "l0"):
        assert as_clt[key] == pytest.approx(as_set[key], rel=1e-4, abs=1e-6), key
    assert as_clt["ce_replacement"] > as_clt["ce_clean"]


def test_sae_eval_scores_a_clt_and_a_run_folder_of_transcoders(smollm2, tmp_path, capsys):
    clt = random_clt("standard")
    clt.save(tmp_path / "clt")
    for t in own_layer_only(random_clt("standard", seed=1))[:3]:
        t.save(tmp_path / "set" / t.cfg.hook_name.replace(".", "_"))
    for source, layers in [(tmp_path / "clt", LAYERS), (tmp_path / "set", 3)]:
        out = tmp_path / f"{source.name}.json"
        main(["eval", str(source), "--tokens", "126", "--context-size", "64", "--json", str(out)])
        report = json.loads(out.read_text())
        assert len(report["layers"]) == layers and report["meta"]["tokens"] == 126
        assert report["ce_replacement_with_errors"] == pytest.approx(report["ce_clean"], abs=1e-4)
        assert "ce_replacement" in capsys.readouterr().out


def test_a_replacement_set_refuses_saes_and_two_writers_of_one_output(smollm2, ids):
    t = own_layer_only(random_clt("standard"))[:2]
    s = sae.create("topk", d_in=D, d_sae=F, k=2, hook_name="blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="made of transcoders"):
        replacement_report([t[0], s], smollm2[0], ids)
    with pytest.raises(ValueError, match="write the same hookpoint"):
        replacement_report([t[0], t[0]], smollm2[0], ids)
