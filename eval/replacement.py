"""Every hookpoint of a dictionary replaced at once: a cross-layer transcoder, or one transcoder
per layer, replacing every MLP output (the replacement model of circuit-tracer's attribution
graphs, sae.hooks.replace_mlps), or a crosscoder replacing every layer it reads.

Scored on the same tokens as `sae eval`: each output's explained variance (and each layer's
sparsity) from the clean pass's inputs (open loop, as in training), then the next-token CE loss
and KL of three edited passes:

    replacement              every output replaced by the dictionary's prediction. Transcoders
                             and CLTs run closed loop: each layer reads what the replaced layers
                             before it wrote. A crosscoder's layers read each other both ways, so
                             its clean-pass reconstructions are written instead.
    replacement_with_errors  the same with each output's error added back: the model as clean,
                             the identity attribution relies on (a check, CE equal to clean)
    zero_ablation            every output zeroed (position 0 kept), the floor of CE loss recovered
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from eval.reconstruction import ReconstructionStats
from eval.sparsity import SparsityStats
from eval.splice import SplicedLosses, _keep_first
from sae.clt import CrossLayerTranscoder
from sae.crosscoder import Crosscoder
from sae.hooks import edit, record, replace_mlps
from sae.models import SAE
from sae.progress import progress

Replacement = CrossLayerTranscoder | Crosscoder | list[SAE]
HEADLINE = (
    "explained_variance", "ce_clean", "ce_replacement", "ce_replacement_with_errors",
    "ce_zero_ablation", "ce_loss_recovered", "kl_score", "l0", "dead_fraction",
)  # fmt: skip
"""The report's lines in `sae eval`'s table."""


def hookpoints(dictionary: Replacement) -> tuple[list[str], list[str]]:
    """Input and output hookpoints per layer, refusing a set that does not replace one output per
    layer from that layer's input (two transcoders writing one MLP output, or an SAE)."""
    if isinstance(dictionary, CrossLayerTranscoder):
        return list(dictionary.cfg.hook_names), list(dictionary.cfg.hook_names_out)
    if isinstance(dictionary, Crosscoder):
        return list(dictionary.cfg.hook_names), list(dictionary.cfg.hook_names)
    if not dictionary or not all(t.cfg.is_transcoder for t in dictionary):
        raise ValueError("a replacement model is made of transcoders (or a CLT); this set has SAEs")
    outputs = [t.cfg.hook_name_out for t in dictionary]
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"two transcoders of the set write the same hookpoint: {outputs}")
    return [t.cfg.hook_name for t in dictionary], outputs


def predictions(dictionary: Replacement, xs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The codes (one per layer; a crosscoder's one for all) and each output's prediction from
    the inputs xs of every layer."""
    if isinstance(dictionary, Crosscoder):
        z = dictionary.encode(torch.cat(xs, -1))
        return [z], list(dictionary.decode(z).split(dictionary.cfg.d_in, -1))
    codes, outputs = [], []
    for j, x in enumerate(xs):
        if isinstance(dictionary, CrossLayerTranscoder):
            codes.append(dictionary.encode_layer(j, x))
            outputs.append(dictionary.decode_layer(j, codes))
        else:
            codes.append(dictionary[j].encode(x))
            outputs.append(dictionary[j].predict(x, codes[-1]))
    return codes, outputs


@contextmanager
def _written(model: nn.Module, values: dict[str, Tensor], error_term: bool) -> Iterator[None]:
    """Each hookpoint's activation replaced by a fixed value [batch, seq, d] (position 0 kept);
    with `error_term`, the error against this pass's activation is added back."""

    def write(value: Tensor):
        return lambda y: y if error_term else value.to(y.dtype)

    with ExitStack() as stack:
        for hook, value in values.items():
            stack.enter_context(edit(model, hook, _keep_first(write(value[:, 1:]))))
        yield


@contextmanager
def _zeroed(model: nn.Module, hooks: list[str]) -> Iterator[None]:
    with ExitStack() as stack:
        for hook in hooks:
            stack.enter_context(edit(model, hook, _keep_first(torch.zeros_like)))
        yield


def _variants(
    dictionary: Replacement, model: nn.Module, outputs: list[str], written: dict[str, Tensor]
) -> dict[str, AbstractContextManager]:
    if isinstance(dictionary, Crosscoder):
        replaced = [_written(model, written, error) for error in (False, True)]
    else:
        replaced = [replace_mlps(model, dictionary, error_term=error) for error in (False, True)]
    return {"replacement": replaced[0], "replacement_with_errors": replaced[1],
            "zero_ablation": _zeroed(model, outputs)}  # fmt: skip


@torch.no_grad()
def replacement_report(
    dictionary: Replacement,
    model: nn.Module,
    ids: Tensor,
    batch_size: int = 8,
    device: str = "cpu",
    on_codes: Callable[[Tensor], None] | None = None,
) -> dict[str, Any]:
    """Per-layer and pooled output explained variance, L0 and dead fraction, and the replaced
    model's CE loss, KL, CE loss recovered and KL score, over windows `ids` [n, seq] (BOS first).
    `on_codes` gets each batch's codes of every latent [tokens, latents] (positions 1.., layers
    concatenated), for what is counted per latent (densities, concepts, a dashboard's examples)."""
    inputs, outputs = hookpoints(dictionary)
    recon = [ReconstructionStats() for _ in outputs]
    pooled, losses = ReconstructionStats(), SplicedLosses(main="replacement")
    sparsity: list[SparsityStats] = []
    with progress(total=ids[:, 1:].numel(), unit="tok", desc="replacement") as bar:
        for batch in ids.split(batch_size):
            batch = batch.to(device)
            with record(model, sorted(set(inputs + outputs))) as acts:
                logits = model(batch).logits
            xs = [acts[h].float() for h in inputs]  # [batch, seq, d], position 0 too
            codes, y_hats = predictions(dictionary, xs)
            sparsity = sparsity or [SparsityStats(z.shape[-1]) for z in codes]
            for stats, z in zip(sparsity, codes, strict=True):
                stats.add(z[:, 1:].flatten(0, 1))
            if on_codes is not None:
                on_codes(torch.cat([z[:, 1:].flatten(0, 1) for z in codes], -1))
            ys = [acts[h][:, 1:].flatten(0, 1).float() for h in outputs]
            scored = [y_hat[:, 1:].flatten(0, 1) for y_hat in y_hats]
            for stats, y, y_hat in zip(recon, ys, scored, strict=True):
                stats.add(y, y_hat)
            pooled.add(torch.cat(ys, -1), torch.cat(scored, -1))
            written = dict(zip(outputs, y_hats, strict=True))
            losses.add(model, batch, logits, _variants(dictionary, model, outputs, written))
            bar.update(len(ys[0]))
    codes = [s.result() for s in sparsity]
    layers = [{"hook_name_out": hook, **{k: r.result()[k] for k in ("explained_variance", "fvu")}}
              for hook, r in zip(outputs, recon, strict=True)]  # fmt: skip
    if len(codes) == len(layers):  # one code per layer
        for layer, s in zip(layers, codes, strict=True):
            layer |= {"l0": s["l0"], "dead_fraction": s["dead_fraction"]}
    return {
        "explained_variance": pooled.result()["explained_variance"],
        "l0": sum(s["l0"] for s in codes),
        "dead_fraction": sum(s["dead_fraction"] * len(s["density"]) for s in codes)
        / sum(len(s["density"]) for s in codes),
        **losses.result(),
        "layers": layers,
    }
