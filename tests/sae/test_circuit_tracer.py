"""circuit-tracer 0.5.0 itself, in its own virtualenv (`make clients-venv`), on dictionaries trained
here for all 30 SmolLM2 layers in one streaming pass: ReLU transcoders, JumpReLU skip transcoders
and a JumpReLU cross-layer transcoder, exported by `sae export --format circuit-tracer`. Its
nnsight backend, on the model folder `sae export --model-folder` writes, gives our logits, our codes at
every layer and position >= 1 (the same active sets) and our predictions (its reconstructions, MLP
output minus its error vectors), and attribute() builds a finite graph whose replacement and completeness
scores lie in [0, 1]."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from eval.replacement import hookpoints, predictions
from sae.cli import main
from sae.hooks import record
from sae.io import load_set
from train.config import HarvestConfig

ROOT = Path(__file__).resolve().parents[2]
CT_PYTHON = ROOT / ".venv-circuit-tracer" / "bin" / "python"
SCRIPT = ROOT / "tests" / "clients" / "circuit_tracer_check.py"
LAYERS = 30
KINDS = ("relu", "skip", "clt")


def per_layer(architecture, name, **more):
    return [{"architecture": architecture, "hook": f"blocks.{i}.mlp.hook_in", "name": f"{name}/layer_{i}",
             "hook_out": f"blocks.{i}.hook_mlp_out", **more} for i in range(LAYERS)]  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory, smollm2):
    if not CT_PYTHON.exists():
        pytest.fail(f"{CT_PYTHON} is missing: run `make clients-venv` (make test does)")
    root = tmp_path_factory.mktemp("circuit-tracer")
    sweep = per_layer("standard", "relu") + per_layer("jumprelu", "skip", skip=True)
    sweep.append({"architecture": "jumprelu", "layers": f"0-{LAYERS - 1}", "hook": "mlp.hook_in",
                  "hook_out": "hook_mlp_out", "name": "clt", "d_sae": 32})  # fmt: skip
    stream = HarvestConfig(model="smollm2-135m", context_size=64, batch_size=8, device="cpu")
    train.fit(stream, sweep=sweep, d_sae=64, total_tokens=4096, batch_size=512, warmup_steps=2,
              lr=4e-3, out=str(root / "run"), device="cpu")  # fmt: skip
    exports = {kind: root / f"{kind}-ct" for kind in KINDS}
    for kind, out in exports.items():  # the CLT's with the model folder circuit-tracer reads
        model = ["--model-folder", str(root / "model")] if kind == "clt" else []
        main(["export", str(root / "run" / kind), str(out), "--format", "circuit-tracer", *model])
    tokenizer = smollm2[1]
    ids = [
        tokenizer.bos_token_id,
        *tokenizer("To be, or not to be, that is the question")["input_ids"],
    ]
    (root / "tokens.json").write_text(json.dumps(ids))
    # circuit-tracer's side of every kind, in one process (its imports are paid once)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    pairs = [str(p) for kind in KINDS for p in (exports[kind], root / f"{kind}-theirs.safetensors")]
    run = subprocess.run([str(CT_PYTHON), str(SCRIPT), str(root / "model"),
                          str(root / "tokens.json"), *pairs],
                         capture_output=True, text=True, timeout=900, env=env, cwd=root)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return root, torch.tensor(ids)


@pytest.mark.parametrize("kind", KINDS)
def test_circuit_tracer_computes_our_codes_predictions_and_a_graph(exported, smollm2, kind):
    root, ids = exported
    theirs = load_file(root / f"{kind}-theirs.safetensors")
    found = load_set(root / "run" / kind)
    dictionary = found if kind != "clt" else found[0]
    inputs, outputs = hookpoints(dictionary)
    model = smollm2[0]
    with torch.no_grad(), record(model, inputs + outputs) as acts:
        logits = model(ids[None]).logits[0]
        codes, y_hats = predictions(dictionary, [acts[h] for h in inputs])
    torch.testing.assert_close(theirs["logits"], logits, atol=1e-4, rtol=1e-5)
    ours = torch.stack([z[0] for z in codes])[:, 1:]  # [layer, position, latent]
    their_codes = theirs["activations"][:, 1:]
    assert torch.equal(their_codes > 0, ours > 0), "the same latents fire at every layer"
    active_layers = int((ours > 0).flatten(1).any(1).sum())
    assert active_layers >= LAYERS // 2 and (ours == 0).any(), "codes are sparse, not empty"
    torch.testing.assert_close(their_codes, ours, atol=1e-4, rtol=1e-4)
    # its transformers 4.57 forward differs from ours by float rounding (1e-4 deep in the model):
    # the dictionary's own arithmetic is compared on its inputs
    their_inputs = theirs["inputs"]
    torch.testing.assert_close(
        their_inputs, torch.stack([acts[h][0] for h in inputs]), atol=1e-3, rtol=1e-4
    )
    with torch.no_grad():
        codes, y_hats = predictions(dictionary, list(their_inputs[:, None]))
    torch.testing.assert_close(
        their_codes, torch.stack([z[0] for z in codes])[:, 1:], atol=1e-5, rtol=1e-5
    )
    recon = torch.stack([y[0] for y in y_hats])[:, 1:]
    # a CLT's output sums 30 layers' writes, in another order than circuit-tracer's index_add
    torch.testing.assert_close(theirs["reconstructions"][:, 1:], recon, atol=1e-4, rtol=1e-4)
    replacement, completeness = theirs["scores"].tolist()
    assert bool(theirs["graph_finite"]) and 0 <= replacement <= 1 and 0 <= completeness <= 1
    print(f"{kind}: replacement score {replacement:.3f}, completeness {completeness:.3f}")
