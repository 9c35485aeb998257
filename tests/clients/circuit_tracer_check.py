"""Run inside circuit-tracer's own virtualenv (`make clients-venv`), never imported by the suite:
load an `sae export --format circuit-tracer` folder and a model folder with circuit-tracer 0.5's
own loaders and nnsight backend, and write what circuit-tracer computes on one prompt for the
test to compare with ours (tests/sae/test_circuit_tracer.py):

    logits [n_pos, vocab], activations [n_layers, n_pos, F] (its zeroed position 0 included),
    the MLPs' inputs [n_layers, n_pos, d] and its reconstructions of their outputs (MLP output
    minus its error vectors), replacement and completeness scores of attribute()'s graph.

Usage: python circuit_tracer_check.py MODEL_DIR TOKENS_JSON EXPORT OUT.safetensors [EXPORT OUT ...]
(several exports in one process: circuit-tracer, nnsight and transformers are imported once).
"""

import json
import sys
from pathlib import Path

import torch
import yaml
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.graph import compute_graph_scores
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
from nnsight import save
from safetensors.torch import save_file


def main(model_dir: str, tokens_json: str, *exports_and_outs: str) -> None:
    for export, out in zip(exports_and_outs[::2], exports_and_outs[1::2], strict=True):
        check(export, model_dir, tokens_json, out)


def check(export: str, model_dir: str, tokens_json: str, out: str) -> None:
    config = yaml.safe_load((Path(export) / "config.yaml").read_text())
    hooks = {"feature_input_hook": config["feature_input_hook"],
             "feature_output_hook": config["feature_output_hook"]}  # fmt: skip
    cpu, f32 = torch.device("cpu"), torch.float32
    if config["model_kind"] == "cross_layer_transcoder":
        transcoders = load_clt(
            export, scan=config["scan"], device=cpu, dtype=f32, lazy_decoder=False, **hooks
        )
    else:
        paths = dict(enumerate(config["transcoders"]))
        transcoders = load_transcoder_set(
            paths, scan=config["scan"], device=cpu, dtype=f32, **hooks
        )
    model = ReplacementModel.from_pretrained_and_transcoders(
        model_dir, transcoders, backend="nnsight", device=cpu, dtype=f32
    )
    tokens = torch.tensor(json.loads(Path(tokens_json).read_text()))
    logits, activations = model.get_activations(tokens)
    context = model.setup_attribution(tokens)
    with model.trace(tokens):  # the MLPs' inputs and outputs, read in model order as nnsight needs
        pairs = [
            (i.output, o.output)
            for i, o in zip(model.feature_input_locs, model.feature_output_locs, strict=True)
        ]
        inputs = save(torch.cat([i for i, _ in pairs], 0))
        outputs = save(torch.cat([o for _, o in pairs], 0))
    graph = attribute(tokens, model, max_n_logits=3, batch_size=32, max_feature_nodes=64)
    replacement, completeness = compute_graph_scores(graph)
    save_file(
        {
            "logits": logits.squeeze(0).float().contiguous(),
            "activations": activations.float().contiguous(),
            "inputs": inputs.float().contiguous(),
            "reconstructions": (outputs - context.error_vectors).float().contiguous(),
            "scores": torch.tensor([replacement, completeness], dtype=torch.float64),
            "graph_finite": torch.tensor(bool(graph.adjacency_matrix.isfinite().all())),
        },
        out,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
