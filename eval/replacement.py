"""The replacement model: a cross-layer transcoder, or one transcoder per layer, replacing every
MLP output at once (sae.hooks.replace_mlps), as circuit-tracer's attribution graphs do.

Scored on the same tokens as `sae eval`: each layer's output explained variance and sparsity
from the clean pass's inputs (open loop, as in training), then the next-token CE loss and KL of
three edited passes:

    replacement              every output replaced by the dictionaries' prediction (closed loop:
                             each layer reads what the replaced layers before it wrote)
    replacement_with_errors  the same with each output's error added back: the model as clean,
                             the identity attribution relies on (a check, CE equal to clean)
    zero_ablation            every output zeroed (position 0 kept), the floor of CE loss recovered
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from eval.reconstruction import ReconstructionStats
from eval.sparsity import SparsityStats
from eval.splice import SplicedLosses, _keep_first
from sae.clt import CrossLayerTranscoder
from sae.hooks import edit, record, replace_mlps
from sae.models import SAE
from sae.progress import progress

Replacement = CrossLayerTranscoder | list[SAE]


def hookpoints(dictionary: Replacement) -> tuple[list[str], list[str]]:
    """Input and output hookpoints per layer, refusing a set that does not replace one output per
    layer from that layer's input (two transcoders writing one MLP output, or an SAE)."""
    if isinstance(dictionary, CrossLayerTranscoder):
        return list(dictionary.cfg.hook_names), list(dictionary.cfg.hook_names_out)
    if not dictionary or not all(t.cfg.is_transcoder for t in dictionary):
        raise ValueError("a replacement model is made of transcoders (or a CLT); this set has SAEs")
    outputs = [t.cfg.hook_name_out for t in dictionary]
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"two transcoders of the set write the same hookpoint: {outputs}")
    return [t.cfg.hook_name for t in dictionary], outputs


@contextmanager
def _zeroed(model: nn.Module, hooks: list[str]) -> Iterator[None]:
    with ExitStack() as stack:
        for hook in hooks:
            stack.enter_context(edit(model, hook, _keep_first(torch.zeros_like)))
        yield


@torch.no_grad()
def replacement_report(
    dictionary: Replacement, model: nn.Module, ids: Tensor, batch_size: int = 8, device: str = "cpu"
) -> dict[str, Any]:
    """Per-layer and pooled output explained variance, L0 and dead fraction, and the replacement
    model's CE loss, KL, CE loss recovered and KL score, over windows `ids` [n, seq] (BOS first)."""
    inputs, outputs = hookpoints(dictionary)
    n = len(outputs)
    per_layer = [(ReconstructionStats(), SparsityStats(_latents(dictionary, j))) for j in range(n)]
    pooled, losses = ReconstructionStats(), SplicedLosses(main="replacement")
    with progress(total=ids[:, 1:].numel(), unit="tok", desc="replacement") as bar:
        for batch in ids.split(batch_size):
            batch = batch.to(device)
            with record(model, sorted(set(inputs + outputs))) as acts:
                logits = model(batch).logits
            xs = [acts[h][:, 1:].flatten(0, 1).float() for h in inputs]
            ys = [acts[h][:, 1:].flatten(0, 1).float() for h in outputs]
            codes, predictions = [], []
            for j in range(n):
                z, y_hat = _layer(dictionary, j, xs[j], codes)
                codes.append(z)
                predictions.append(y_hat)
                per_layer[j][0].add(ys[j], y_hat)
                per_layer[j][1].add(z)
            pooled.add(torch.cat(ys, -1), torch.cat(predictions, -1))
            variants = {
                "replacement": replace_mlps(model, dictionary),
                "replacement_with_errors": replace_mlps(model, dictionary, error_term=True),
                "zero_ablation": _zeroed(model, outputs),
            }
            losses.add(model, batch, logits, variants)
            bar.update(len(xs[0]))
    layers = []
    for hook, (recon, sparsity) in zip(outputs, per_layer, strict=True):
        r, s = recon.result(), sparsity.result()
        layers.append({"hook_name_out": hook, "explained_variance": r["explained_variance"],
                       "fvu": r["fvu"], "l0": s["l0"], "dead_fraction": s["dead_fraction"]})  # fmt: skip
    spliced = losses.result()
    return {
        "explained_variance": pooled.result()["explained_variance"],
        "l0": sum(layer["l0"] for layer in layers),
        "dead_fraction": sum(layer["dead_fraction"] for layer in layers) / n,
        **spliced,
        "layers": layers,
    }


def _latents(dictionary: Replacement, j: int) -> int:
    return (
        dictionary.cfg.d_sae
        if isinstance(dictionary, CrossLayerTranscoder)
        else dictionary[j].cfg.d_sae
    )


def _layer(
    dictionary: Replacement, j: int, x: Tensor, codes: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """Layer j's codes and predicted output from its input x (and the earlier layers' codes)."""
    if isinstance(dictionary, CrossLayerTranscoder):
        z = dictionary.encode_layer(j, x)
        return z, dictionary.decode_layer(j, [*codes, z])
    t = dictionary[j]
    z = t.encode(x)
    return z, t.predict(x, z)
