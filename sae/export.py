"""Write dictionaries in other tools' layouts: circuit-tracer's per-layer transcoder set, sparsify's
coder folder, SAELens's (= ours). Each refuses, by name and before writing, what the target cannot
express, rather than writing something its reader would misread."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from sae.clt import CrossLayerTranscoder, layer_kinds
from sae.io import CFG_FILE, SPARSIFY_WEIGHTS_FILE, load_set, save, write_tensors, write_text
from sae.layered import LayeredDictionary
from sae.models import SAE

HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
JUMPRELU_LIKE = ("jumprelu", "batchtopk", "matryoshka_batchtopk")
"""Rules whose inference is a JumpReLU (BatchTopK's shared threshold is one per latent here)."""


def to_circuit_tracer(dictionaries: list[SAE | CrossLayerTranscoder], out: Path) -> Path:
    """A cross-layer transcoder's files (clt_to_circuit_tracer), or a per-layer transcoder set: layer_{i}.safetensors (W_enc [F, d], b_enc, W_dec [F, d], b_dec,
    activation_function.threshold for JumpReLU-like rules, W_skip [d, d]) and config.yaml, which
    circuit-tracer's `load_transcoders` reads. One transcoder per layer 0..n-1, all between the
    same two hookpoint kinds of their layer, with one width, as its TranscoderSet requires."""
    if any(isinstance(d, LayeredDictionary) for d in dictionaries):
        return clt_to_circuit_tracer(
            _only(dictionaries, "circuit-tracer", CrossLayerTranscoder), out
        )
    layers = {}
    for d in dictionaries:
        layer, kinds = _circuit_tracer_layer(d)
        if layer in layers:
            raise ValueError(f"two transcoders for layer {layer}: a set holds one per layer")
        layers[layer] = (d, kinds)
    if sorted(layers) != list(range(len(layers))):
        raise ValueError(
            f"circuit-tracer needs a transcoder for every layer from 0; got layers {sorted(layers)}"
        )
    ordered = [layers[i] for i in range(len(layers))]
    kinds = {k for _, k in ordered}
    widths = {d.cfg.d_sae for d, _ in ordered}
    if len(kinds) > 1 or len(widths) > 1:
        raise ValueError(
            f"a circuit-tracer set has one input and output hook and one width; got hooks "
            f"{sorted(kinds)} and widths {sorted(widths)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (d, _) in enumerate(ordered):
        state = d.folded_state_dict()
        tensors = {"W_enc": state["W_enc"].T, "b_enc": state["b_enc"], "W_dec": state["W_dec"],
                   "b_dec": state["b_dec"]}  # fmt: skip
        if d.cfg.architecture in JUMPRELU_LIKE:
            tensors["activation_function.threshold"] = state["threshold"]
        if d.cfg.skip:
            tensors["W_skip"] = state["W_skip"]
        path = out / f"layer_{i}.safetensors"
        write_tensors(path, tensors)
        paths.append(str(path.resolve()))
    (input_kind, output_kind), first = kinds.pop(), ordered[0][0]
    # absolute paths: circuit-tracer resolves them from its working directory
    write_config(out, "transcoder_set", first.cfg.model_name, input_kind, output_kind,
                 transcoders=paths)  # fmt: skip
    return out


def write_config(out: Path, kind: str, model: str, hook_in: str, hook_out: str, **more) -> None:
    """config.yaml as circuit-tracer's load_transcoders reads it."""
    config = {"model_kind": kind, "model_name": model, "feature_input_hook": hook_in,
              "feature_output_hook": hook_out, **more, "scan": f"sae-forge:{out.name}"}  # fmt: skip
    write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def clt_to_circuit_tracer(clt: CrossLayerTranscoder, out: Path) -> Path:
    """circuit-tracer's CLT files, which its load_clt reads: W_enc_{i}.safetensors (W_enc_{i}
    [F, d], b_enc_{i}, b_dec_{i}, threshold_{i} for JumpReLU-like rules) and W_dec_{i}.safetensors
    (W_dec_{i} [F, n - i, d]), for layers 0..n-1 of the model, plus config.yaml."""
    c = clt.cfg
    name = f"{c.architecture} CLT over layers {c.layers}"
    if c.architecture not in ("standard", *JUMPRELU_LIKE):
        raise ValueError(
            f"{name}: circuit-tracer loads only ReLU and JumpReLU CLTs from files; a "
            f"{c.architecture} one has no such form (BatchTopK exports as its JumpReLU threshold)"
        )
    if c.layers != list(range(c.n_layers)):
        raise ValueError(f"{name}: circuit-tracer's CLTs cover every layer from 0")
    if c.d_in != c.d_out:
        raise ValueError(
            f"{name}: circuit-tracer's CLTs map d_model to d_model, not {c.d_in} to {c.d_out}"
        )
    thresholds = c.architecture in JUMPRELU_LIKE
    if thresholds and any(bool((p.threshold < 0).any()) for p in clt.layers):
        raise ValueError(
            f"{name}: negative thresholds, which circuit-tracer's JumpReLU reads differently"
        )
    state, d = clt.folded_state_dict(), c.d_out
    out.mkdir(parents=True, exist_ok=True)
    for i in range(c.n_layers):
        encoder = {f"W_enc_{i}": state[f"layers.{i}.W_enc"].T, f"b_enc_{i}": state[f"layers.{i}.b_enc"],
                   f"b_dec_{i}": state["b_dec"][i * d : (i + 1) * d]}  # fmt: skip
        if thresholds:
            encoder[f"threshold_{i}"] = state[f"layers.{i}.threshold"]
        write_tensors(out / f"W_enc_{i}.safetensors", encoder)
        decoder = state[f"layers.{i}.W_dec"].unflatten(-1, (c.n_layers - i, d))
        write_tensors(out / f"W_dec_{i}.safetensors", {f"W_dec_{i}": decoder})
    hook_in, hook_out = (sorted(layer_kinds(h)[1])[0] for h in (c.hook_names, c.hook_names_out))
    write_config(out, "cross_layer_transcoder", c.model_name, hook_in, hook_out)
    return out


def _circuit_tracer_layer(d: SAE) -> tuple[int, tuple[str, str]]:
    """A transcoder's layer and hook kinds, refusing what circuit-tracer's files cannot hold."""
    c = d.cfg
    name = f"{c.architecture} dictionary {c.hook_name} -> {c.hook_name_out}"
    if not c.is_transcoder:
        raise ValueError(f"{name} is an SAE; circuit-tracer's sets are transcoders (--hook-out)")
    if c.architecture not in ("standard", *JUMPRELU_LIKE):
        raise ValueError(
            f"{name}: circuit-tracer loads only ReLU and JumpReLU transcoders from files; a "
            f"{c.architecture} one has no such form (BatchTopK exports as its JumpReLU threshold)"
        )
    if c.d_in != c.d_out:
        raise ValueError(
            f"{name}: circuit-tracer's transcoders map d_model to d_model, not {c.d_in} to {c.d_out}"
        )
    if c.architecture in JUMPRELU_LIKE and bool((d.threshold < 0).any()):
        raise ValueError(
            f"{name}: negative thresholds, which circuit-tracer's JumpReLU reads differently"
        )
    matches = [HOOK.match(h) for h in (c.hook_name, c.hook_name_out)]
    if not all(matches) or matches[0].group(1) != matches[1].group(1):
        raise ValueError(
            f"{name}: a per-layer set reads and writes blocks.L hookpoints of one layer"
        )
    return int(matches[0].group(1)), (matches[0].group(2), matches[1].group(2))


def to_sparsify(d: SAE, out: Path) -> Path:
    """sparsify's coder folder (cfg.json, sae.safetensors): a TopK autoencoder centred by b_dec, or
    a TopK transcoder (`transcode`), with `skip_connection`, of one width in and out."""
    c = d.cfg
    if c.architecture != "topk":
        raise ValueError(f"sparsify coders are per-row TopK; this dictionary is {c.architecture}")
    if c.d_in != c.d_out or c.apply_b_dec_to_input == c.is_transcoder:
        raise ValueError(
            "sparsify holds autoencoders that subtract b_dec from their input and transcoders of "
            "one width that do not; this dictionary is neither"
        )
    state = d.folded_state_dict()
    tensors = {"encoder.weight": state["W_enc"].T, "encoder.bias": state["b_enc"],
               "W_dec": state["W_dec"], "b_dec": state["b_dec"]}  # fmt: skip
    if c.skip:
        tensors["W_skip"] = state["W_skip"]
    out.mkdir(parents=True, exist_ok=True)
    write_tensors(out / SPARSIFY_WEIGHTS_FILE, tensors)
    cfg = {"activation": "topk", "expansion_factor": max(1, c.d_sae // c.d_in),
           "normalize_decoder": True, "num_latents": c.d_sae, "k": c.k, "multi_topk": False,
           "skip_connection": c.skip, "transcode": c.is_transcoder, "d_in": c.d_in}  # fmt: skip
    write_text(out / CFG_FILE, json.dumps(cfg, indent=2))
    return out


FORMATS: dict[str, Callable[[list[SAE], Path], Path]] = {
    "circuit-tracer": to_circuit_tracer,
    "sparsify": lambda ds, out: to_sparsify(_only(ds, "sparsify"), out),
    "saelens": lambda ds, out: save(_only(ds, "saelens"), out),
}


def _only(dictionaries: list, fmt: str, kind: type = SAE):
    """The one dictionary of the source, of the kind the format holds."""
    if len(dictionaries) != 1:
        raise ValueError(
            f"--format {fmt} writes one dictionary; the source holds {len(dictionaries)}"
        )
    d = dictionaries[0]
    if not isinstance(d, kind):
        what = d.kind if isinstance(d, LayeredDictionary) else "a one-hookpoint dictionary"
        where = " (circuit-tracer's holds CLTs)" if isinstance(d, CrossLayerTranscoder) else ""
        raise ValueError(f"--format {fmt} has no layout for a {what}{where}; sae.load reads ours")
    return d


def export(source: str | Path, fmt: str, out: str | Path) -> Path:
    """Write the dictionary (or the set of them) in `source` as `fmt` into `out`."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {sorted(FORMATS)}")
    return FORMATS[fmt](load_set(source), Path(out))


def write_model_folder(model: str, out: str | Path, revision: str = "") -> Path:
    """The LM as a Hugging Face folder that transformers 4.56-4.57 (circuit-tracer 0.5's pin)
    reads as the model we run: our folders are saved by transformers 5, whose config keeps RoPE's
    theta under `rope_parameters` (4.57 would take its default of 10000) and whose tokenizer class
    4.57 does not know (the tokenizer.json it wraps is the same)."""
    from sae.lm import revision_path

    source, out = Path(revision_path(model, revision)[0]), Path(out)
    if not (source / "config.json").exists():
        raise ValueError(
            f"{model} is not a local model folder ({source}); circuit-tracer can load it by name"
        )
    shutil.copytree(source, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = rope
    write_text(out / "config.json", json.dumps(config, indent=2))
    tokenizer = json.loads((out / "tokenizer_config.json").read_text())
    if tokenizer.get("tokenizer_class") == "TokenizersBackend":
        tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_text(out / "tokenizer_config.json", json.dumps(tokenizer, indent=2))
    return out
