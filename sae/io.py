"""Save and load dictionaries: our layout (SAELens's), and import of sparsify's.

On disk an SAE is a directory with `cfg.json` and `sae_weights.safetensors` exactly as SAELens 6
writes them, so `sae_lens.SAE.load_from_disk` reads ours unchanged. Our full SAEConfig rides
along under the key `sae_forge`, which SAELens ignores. Nothing here ever unpickles: checkpoints
in .pt/.bin/.pkl form are refused, because loading them runs arbitrary code from the file.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae import clt, crosscoder, layered  # noqa: F401 (they register their kinds)
from sae.config import DTYPES, ConfigError, SAEConfig
from sae.models import REGISTRY, SAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as sae_lens_version: the SAELens cfg.json layout we follow (SAELens reads files without
it as pre-6.0 configs and rewrites their keys)."""


class FormatError(ValueError):
    """A file that is not a valid SAE; the message names the file and what is wrong."""


class PickleRefused(FormatError):
    """A pickle-based checkpoint was offered; we never unpickle."""


# -- save -----------------------------------------------------------------------------------------
def saelens_cfg(sae: SAE) -> dict[str, Any]:
    """cfg.json contents: SAELens's keys, plus our config (with normalization folded) under `sae_forge`."""
    c = sae.cfg
    ours = {**c.to_dict(), "normalize_activations": "none", "norm_scaling_factor": 1.0,
            "norm_scaling_factor_out": 1.0}  # fmt: skip
    ours["dtype"] = str(sae.W_enc.dtype).removeprefix("torch.")
    cfg: dict[str, Any] = {
        "architecture": saelens_architecture(sae),
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": ours["dtype"],
        "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": "none",
        # SAELens reshapes a hook_z SAE's [..., heads, d_head] input; ours take it flattened
        "reshape_activations": "hook_z" if c.hook_name.endswith(".hook_z") else "none",
        "metadata": {
            "model_name": c.model_name,
            "hook_name": c.hook_name,
            "context_size": c.context_size,
            "prepend_bos": c.prepend_bos,
            "dataset_path": c.dataset_path,
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": SAELENS_FORMAT_VERSION,
        },
        "sae_forge": ours,
    }
    if sae.saelens_architecture == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
    if c.is_transcoder:
        cfg["d_out"] = c.d_out
        cfg["metadata"]["hook_name_out"] = c.hook_name_out
    return cfg


TRANSCODERS = {
    ("standard", False): "transcoder",
    ("standard", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
}
"""SAELens's transcoder classes, by the SAE architecture they extend and whether they skip."""


def saelens_architecture(sae: SAE) -> str:
    """The class SAELens should load the weights as. A transcoder whose rule SAELens has no
    transcoder class for (TopK, gated, Matryoshka's prefix losses do not matter at inference) keeps
    the SAE's name, which SAELens then refuses by the shapes rather than misreads."""
    if not sae.cfg.is_transcoder:
        return sae.saelens_architecture
    return TRANSCODERS.get((sae.saelens_architecture, sae.cfg.skip), sae.saelens_architecture)


def save(sae: SAE, path: str | os.PathLike) -> Path:
    """Write `path/cfg.json` and `path/sae_weights.safetensors`, each atomically (temp file, fsync,
    rename), weights first, so a crash never leaves a cfg.json that points at half a file."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_tensors(path / WEIGHTS_FILE, sae.folded_state_dict())
    text = json.dumps(saelens_cfg(sae), indent=2)
    write_text(path / CFG_FILE, text)
    return path


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file of `tensors` (contiguous, on CPU), written with atomic_write."""
    state = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def _new_file_mode() -> int:
    """The mode a new file gets under the umask (read once, at import: setting the umask to read it
    is not thread-safe). mkstemp and safetensors make owner-only files, which no one else could
    read in a shared run or cache folder."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _new_file_mode()


def atomic_write(target: Path, write: Callable[[str], Any]) -> None:
    """`write(tmp)` a temporary file beside `target`, then fsync and rename it into place, so
    readers see either nothing or all of it; with the mode a new file gets."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError | SafetensorError):  # a full disk: say which file it stopped
            code, reason = getattr(e, "errno", None) or errno.EIO, getattr(e, "strerror", None) or e
            raise OSError(code, f"cannot write {target}: {reason}") from e
        raise


def check_writable(folder: str | os.PathLike) -> None:
    """Make `folder` and write a probe file in it, so that an output that cannot be written
    fails before the work that fills it (an evaluation found it 37-91 s in), naming the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise OSError(e.errno, f"cannot write into {folder}: {e.strerror or e}") from e


def write_text(path: str | os.PathLike, text: str) -> None:
    """`text` into `path` with atomic_write: a full disk or a kill leaves the previous file, not
    half of the new one."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (NaN and inf, which only Python and JavaScript read, as null), atomically."""
    write_text(path, json.dumps(_finite(obj), indent=1, allow_nan=False))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


# -- load -----------------------------------------------------------------------------------------
def load_dir(
    path: str | os.PathLike, device: str = "cpu", dtype: str | torch.dtype | None = None
) -> SAE:
    """Load an SAE directory in our/SAELens layout or sparsify's layout, or one of our
    dictionaries over several hookpoints (cfg.json with `dictionary`: sae/layered.py)."""
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise _pickle_refusal(path)
        raise FormatError(
            f"{path} is a file; sae.load expects a directory with {CFG_FILE} and {WEIGHTS_FILE}"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"no SAE directory at {path}")
    if (path / CFG_FILE).exists() and (path / WEIGHTS_FILE).exists():
        cfg_dict = read_cfg(path / CFG_FILE)
        if "dictionary" in cfg_dict:  # a CLT's or a crosscoder's (sae/layered.py)
            return layered.load(path, cfg_dict, read_weights(path / WEIGHTS_FILE), device, dtype)
        cfg = cfg_from_dict(cfg_dict, source=str(path / CFG_FILE))
        state = saelens_state(cfg_dict, read_weights(path / WEIGHTS_FILE))
        return build(cfg, state, str(path / WEIGHTS_FILE), device, dtype)
    if (path / CFG_FILE).exists() and (path / SPARSIFY_WEIGHTS_FILE).exists():
        return load_sparsify(path, device, dtype)
    # a training run's folder (ours, or sparsify's beside its pickled optimizer state)
    inside = sorted((p.parent for p in path.glob(f"*/{CFG_FILE}")), key=_natural)
    if inside:
        raise FileNotFoundError(
            f"{path} is a training run's folder holding {len(inside)} dictionaries: "
            f"{[p.name for p in inside]}; load one (sae.load('{inside[0]}')), or all of them "
            "with sae.io.load_set"
        )
    pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise _pickle_refusal(pickles[0])
    found = sorted(p.name for p in path.iterdir())
    hint = (
        "; it is an activation cache (sae train makes SAEs from it)"
        if "manifest.json" in found
        else ""
    )
    raise FileNotFoundError(
        f"{path} holds no SAE: expected {CFG_FILE} with {WEIGHTS_FILE} (SAELens/sae-forge) "
        f"or {SPARSIFY_WEIGHTS_FILE} (sparsify); found {found}{hint}"
    )


def load_set(source: str | os.PathLike) -> list[SAE | layered.LayeredDictionary]:
    """The dictionary in `source`, or one per subfolder holding one (a training run's folder),
    in the order of their names with numbers compared as numbers (layer 2 before layer 10)."""
    source = Path(source)
    if (source / CFG_FILE).exists():
        return [load_dir(source)]
    found = (
        sorted((p for p in source.iterdir() if (p / CFG_FILE).exists()), key=_natural)
        if source.is_dir()
        else []
    )
    if not found:
        raise FileNotFoundError(f"{source} holds no dictionary, nor subfolders with one")
    return [load_dir(p) for p in found]


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _pickle_refusal(path: Path) -> PickleRefused:
    return PickleRefused(
        f"refusing to load {path}: {path.suffix} checkpoints are Python pickles, and unpickling a "
        f"file runs whatever code it contains. Convert it to safetensors ({WEIGHTS_FILE} + {CFG_FILE}) "
        "in an environment you trust, then load that."
    )


def read_cfg(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise FormatError(f"{file} should hold a JSON object, found {type(data).__name__}")
    return data


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{file} is not a readable safetensors file: {e}") from e


def cfg_from_dict(data: dict[str, Any], source: str) -> SAEConfig:
    """Our cfg.json carries the full config under `sae_forge`; a SAELens one is translated."""
    try:
        if "sae_forge" in data:
            if not isinstance(data["sae_forge"], dict):
                raise FormatError(
                    f"{source}: sae_forge should hold a JSON object of SAEConfig fields"
                )
            return SAEConfig.from_dict(data["sae_forge"], source)
        return cfg_from_saelens(data, source)
    except ConfigError as e:
        raise invalid(source, e) from e


def invalid(source: str, error: ConfigError) -> FormatError:
    """A config check's error, naming the file it came from (the checks do not know it)."""
    message = str(error)
    return FormatError(message if message.startswith(source) else f"{source}: {message}")


SAELENS_TO_OURS = {
    "standard": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
    **{name: arch for (arch, _), name in TRANSCODERS.items()},
}  # fmt: skip


def cfg_from_saelens(data: dict[str, Any], source: str) -> SAEConfig:
    """Translate a SAELens (>= 6 or legacy) cfg.json into an SAEConfig."""
    missing = [key for key in ("d_in", "d_sae") if key not in data]
    if missing:
        raise FormatError(f"{source}: missing required keys {missing}")
    if not isinstance(data.get("metadata") or {}, dict):
        raise FormatError(f"{source}: metadata should hold a JSON object")
    meta = {**data, **(data.get("metadata") or {})}  # SAELens 6 nests provenance under metadata
    normalization = data.get("normalize_activations") or "none"
    if normalization not in ("none", "expected_average_only_in"):
        # expected_average_only_in without a factor is the identity in SAELens too; the others
        # normalize each row by its own statistics, which a fixed linear map cannot reproduce
        raise FormatError(
            f"{source}: normalize_activations {normalization!r} is not supported (each input row "
            "is normalized by its own norm or moments at run time); only 'none' and "
            "'expected_average_only_in' are"
        )
    arch = data.get("architecture", "standard")
    if arch == "standard" and meta.get("activation_fn_str", meta.get("activation_fn")) == "topk":
        arch = "topk"  # legacy SAELens (< 6) wrote TopK SAEs as standard + activation_fn "topk"
    if arch not in SAELENS_TO_OURS:
        raise FormatError(
            f"{source}: SAELens architecture {arch!r} is not supported; expected one of {sorted(SAELENS_TO_OURS)}"
        )
    transcoder = arch in TRANSCODERS.values()
    values: dict[str, Any] = {
        "architecture": SAELENS_TO_OURS[arch],
        "d_in": data["d_in"],
        "d_sae": data["d_sae"],
        "apply_b_dec_to_input": data.get("apply_b_dec_to_input", not transcoder),
        "dtype": data.get("dtype", "float32")
        if data.get("dtype", "float32") in DTYPES
        else "float32",
    }
    k = data.get("k", (meta.get("activation_fn_kwargs") or {}).get("k"))
    if arch == "topk":
        if k is None:
            raise FormatError(f"{source}: a topk SAE needs k")
        values["k"] = k
    elif isinstance(data["d_sae"], int):
        values["k"] = min(
            SAEConfig.k, data["d_sae"]
        )  # k is unused here; keep it valid for tiny SAEs
    # provenance the file does not give stays empty, rather than our defaults (SmolLM2's layer 6)
    values.update(hook_name="", model_name="", dataset_path="")
    if transcoder:
        values.update(d_out=data.get("d_out", data["d_in"]), skip="skip" in arch)
    for key in ("hook_name", "hook_name_out", "model_name", "context_size", "prepend_bos",
                "dataset_path"):  # fmt: skip
        if meta.get(key) is not None:
            values[key] = meta[key]
    if meta.get("hook_name") is None and meta.get("hook_point") is not None:
        values["hook_name"] = meta["hook_point"]
    return SAEConfig.from_dict(values, source)


def saelens_state(data: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAELens weights in our SAE's terms. A TopK SAE with rescale_acts_by_decoder_norm (what
    SAELens's TopK training saves) multiplies its pre-activations by the decoder rows' norms n and
    divides its codes by n before decoding: the same map as W_enc * n, b_enc * n, W_dec / n, which
    is our TopK SAE with unit decoder rows (same codes, same outputs)."""
    if not data.get("rescale_acts_by_decoder_norm") or "sae_forge" in data:
        return state
    if not {"W_enc", "b_enc", "W_dec"} <= set(state):
        return state  # build names what is missing
    n = state["W_dec"].float().norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    scaled = {"W_enc": state["W_enc"].float() * n, "b_enc": state["b_enc"].float() * n,
              "W_dec": state["W_dec"].float() / n[:, None]}  # fmt: skip
    return {**state, **{name: t.to(state[name].dtype) for name, t in scaled.items()}}


def build(
    cfg: SAEConfig,
    state: dict[str, torch.Tensor],
    source: str,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
) -> SAE:
    """Instantiate cfg's architecture and load `state`, refusing missing, extra or misshapen tensors."""
    cls = REGISTRY[cfg.architecture]
    expected = {name: tuple(t.shape) for name, t in cls(_on_meta(cfg)).folded_state_dict().items()}
    problems = [
        f"missing {name} (shape {list(shape)})"
        for name, shape in expected.items()
        if name not in state
    ]
    problems += [f"unexpected tensor {name}" for name in state if name not in expected]
    problems += [
        f"{name} has shape {list(state[name].shape)}, expected {list(shape)}"
        for name, shape in expected.items()
        if name in state and tuple(state[name].shape) != shape
    ]
    if problems:
        raise FormatError(
            f"{source} does not fit a {cfg.architecture} SAE with d_in={cfg.d_in}, d_sae={cfg.d_sae}: "
            + "; ".join(problems)
        )
    refuse_nonfinite(state, source)
    if dtype is None:
        stored = str(next(iter(state.values())).dtype).removeprefix("torch.")
        if stored not in DTYPES:
            raise FormatError(f"{source} stores {stored} weights; expected one of {sorted(DTYPES)}")
        dtype = stored
    dtype = str(dtype).removeprefix("torch.")  # torch.float16 as well as "float16"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    cfg.dtype, cfg.device = dtype, device
    sae = cls(_on_meta(cfg))
    tensors = {n: t.to(device=device, dtype=DTYPES[dtype]) for n, t in state.items()}
    sae.load_state_dict(with_folded_zeros(sae, tensors), assign=True)
    sae.cfg = cfg
    return sae


def with_folded_zeros(
    module: torch.nn.Module, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A saved state completed for `module`: what folded_state_dict folds away (a transcoder's
    input centre, already in the file's encoder biases) loads as zero, on the state's device."""
    like = next(iter(state.values()))
    return state | {
        name: torch.zeros(t.shape, device=like.device, dtype=like.dtype)
        for name, t in module.state_dict().items()
        if name not in state
    }


def refuse_nonfinite(state: dict[str, torch.Tensor], source: str) -> None:
    """A diverged run's weights loaded silently and encoded everything to NaN: name them."""
    if broken := [
        f"{name} holds {int((~t.isfinite()).sum())} NaN or infinite values"
        for name, t in state.items()
        if t.is_floating_point() and not bool(t.isfinite().all())
    ]:
        raise FormatError(f"{source}: " + "; ".join(broken))


def _on_meta(cfg: SAEConfig) -> SAEConfig:
    """A copy of cfg on the meta device: builds the module's skeleton without allocating memory."""
    return SAEConfig.from_dict({**cfg.to_dict(), "device": "meta"})


# -- sparsify -------------------------------------------------------------------------------------
SPARSIFY_UNSUPPORTED = {"signed": "signed (absolute-value) TopK"}


def load_sparsify(path: Path, device: str = "cpu", dtype: str | torch.dtype | None = None) -> SAE:
    """Import EleutherAI sparsify's layout: cfg.json (d_in, k, num_latents or expansion_factor,
    transcode, skip_connection) and sae.safetensors (encoder.weight [d_sae, d_in], encoder.bias,
    W_dec [d_sae, d_in], b_dec, W_skip [d_in, d_in]). sparsify applies ReLU then per-row top-k:
    our TopK SAE, which subtracts b_dec before encoding; a transcoder (`transcode`) does not, reads
    its module's input and predicts its output, and adds x @ W_skip.T with a skip connection."""
    source = str(path / CFG_FILE)
    raw = read_cfg(path / CFG_FILE)
    for key, why in SPARSIFY_UNSUPPORTED.items():
        if raw.get(key):
            raise FormatError(
                f"{source}: this sparsify coder uses {why}, which sae-forge does not import"
            )
    if raw.get("activation", "topk") != "topk":
        raise FormatError(
            f"{source}: sparsify activation {raw['activation']!r} is not supported (only topk)"
        )
    if "d_in" not in raw or "k" not in raw:
        raise FormatError(
            f"{source}: a sparsify cfg.json needs d_in and k, found keys {sorted(raw)}"
        )
    d_sae = raw.get("num_latents") or raw["d_in"] * raw.get("expansion_factor", 0)
    weights = read_weights(path / SPARSIFY_WEIGHTS_FILE)
    needed = ["encoder.weight", "encoder.bias", "W_dec", "b_dec"]
    if missing := [n for n in needed if n not in weights]:
        raise FormatError(
            f"{path / SPARSIFY_WEIGHTS_FILE}: missing {missing}; found {sorted(weights)}"
        )
    run_cfg = path.parent / "config.json"
    model = read_cfg(run_cfg).get("model") if run_cfg.exists() else None
    values = {
        "architecture": "topk",
        "d_in": raw["d_in"],
        "d_sae": d_sae,
        "k": raw["k"],
        "hook_name": sparsify_hook_name(path.name),
    }
    skip = bool(raw.get("skip_connection"))
    if raw.get("transcode"):
        values.update(hook_name=sparsify_input_hook_name(path.name, source),
                      hook_name_out=values["hook_name"], skip=skip, apply_b_dec_to_input=False)  # fmt: skip
    elif skip:
        raise FormatError(
            f"{source}: a sparsify autoencoder with a skip connection (its input centred by b_dec, "
            "then a skip path from the raw input) is not a dictionary sae-forge expresses"
        )
    if isinstance(model, str):
        values["model_name"] = model
    try:
        cfg = SAEConfig.from_dict(values, source)
    except ConfigError as e:
        raise invalid(source, e) from e
    state = {
        "W_enc": weights["encoder.weight"].T.contiguous(),
        "b_enc": weights["encoder.bias"],
        "W_dec": weights["W_dec"],
        "b_dec": weights["b_dec"],
        **({"W_skip": weights["W_skip"]} if "W_skip" in weights else {}),
    }
    return build(cfg, state, str(path / SPARSIFY_WEIGHTS_FILE), device, dtype)


def sparsify_input_hook_name(folder: str, source: str) -> str:
    """What a sparsify transcoder reads: its module's input (`layers.6.mlp`: the MLP's input after
    its norm; `layers.6`: the block's). Other modules' inputs have no hookpoint name here."""
    if hook := _sparsify_hook(folder, {"": "hook_resid_pre", "mlp": "mlp.hook_in"}):
        return hook
    raise FormatError(
        f"{source}: a sparsify transcoder of module {folder!r}, whose input has no hookpoint name "
        "here (layers.N and layers.N.mlp have)"
    )


def sparsify_hook_name(folder: str) -> str:
    """sparsify names a coder's folder by its hookpoint module (`layers.6`, `layers.6.mlp`)."""
    outputs = {"": "hook_resid_post", "mlp": "hook_mlp_out", "self_attn": "hook_attn_out"}
    return _sparsify_hook(folder, outputs) or folder


def _sparsify_hook(folder: str, kinds: dict[str, str]) -> str | None:
    """`layers.N[.module]` as blocks.N.<kinds[module]> ("" for the block itself); None otherwise."""
    parts = folder.split(".")
    if len(parts) < 2 or parts[0] != "layers" or not parts[1].isdigit():
        return None
    kind = kinds.get(parts[2] if len(parts) > 2 else "")
    return f"blocks.{parts[1]}.{kind}" if kind else None
