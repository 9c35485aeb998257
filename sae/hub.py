"""sae.load(): one entry point for every place a dictionary can come from.

"runs/demo/sae"                      a local directory (ours, SAELens's or sparsify's layout)
"hf:org/repo[/subdir][@revision]"    a Hugging Face repo, through huggingface_hub's cache
"saelens:<release>/<sae_id>"         SAELens's pretrained registry (needs the interop extra)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError

from sae.io import FormatError, build, cfg_from_saelens, load_dir
from sae.models import SAE

SCHEMES = ("hf", "saelens")


class HubError(RuntimeError):
    """A remote source could not be reached or does not hold what was asked for."""


def load(source: str | Path, device: str = "cpu", dtype: str | None = None) -> SAE:
    """Load a dictionary from a local directory, `hf:` repo or `saelens:` release (see module doc)."""
    text = str(source)
    scheme, sep, rest = text.partition(":")
    if not sep or Path(text).exists():
        return load_dir(text, device, dtype)
    if scheme == "hf":
        return load_hf(rest, device, dtype)
    if scheme == "saelens":
        return load_saelens(rest, device, dtype)
    raise ValueError(
        f"unknown SAE source {text!r}: use a local directory or one of the schemes {[s + ':' for s in SCHEMES]}"
    )


def load_hf(spec: str, device: str = "cpu", dtype: str | None = None) -> SAE:
    """`org/repo[/subdir][@revision]`: fetch only the subdir into the HF cache, then load it."""
    spec, _, revision = spec.partition("@")
    parts = spec.strip("/").split("/")
    if len(parts) < 2:
        raise ValueError(f"hf:{spec} should name a repo as hf:org/repo[/subdir]")
    repo_id, subdir = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        root = snapshot_download(
            repo_id, revision=revision or None, allow_patterns=[f"{subdir}/*"] if subdir else None
        )
    except (OSError, HfHubHTTPError) as e:
        raise HubError(
            f"could not fetch hf:{repo_id} (revision {revision or 'main'}) from the Hugging Face hub, "
            f"and it is not in the local cache: {e}"
        ) from e
    return load_dir(Path(root) / subdir, device, dtype)


@dataclass(frozen=True)
class SAELensRef:
    """Where a SAELens release id points: the HF repo and folder, and SAELens's converter name."""

    release: str
    sae_id: str
    repo_id: str
    folder_name: str
    converter: str


def resolve_saelens(spec: str) -> SAELensRef:
    """Resolve `<release>/<sae_id>` through SAELens's registry (offline: it ships as YAML)."""
    from sae_lens.loading.pretrained_sae_loaders import get_conversion_loader_name
    from sae_lens.loading.pretrained_saes_directory import (
        get_pretrained_saes_directory,
        get_repo_id_and_folder_name,
    )

    directory = get_pretrained_saes_directory()
    release = max((r for r in directory if spec.startswith(r + "/")), key=len, default=None)
    if release is None:
        head = spec.split("/")[0]
        close = sorted(r for r in directory if head and head[:6] in r)[:10]
        raise ValueError(
            f"saelens:{spec}: no SAELens release is a prefix of it; similar releases: {close}"
        )
    sae_id = spec[len(release) + 1 :]
    saes = directory[release].saes_map
    if sae_id not in saes:
        raise ValueError(
            f"saelens:{spec}: release {release!r} has no SAE {sae_id!r}; it has e.g. {list(saes)[:8]}"
        )
    repo_id, folder_name = get_repo_id_and_folder_name(release, sae_id)
    return SAELensRef(release, sae_id, repo_id, folder_name, get_conversion_loader_name(release))


def load_saelens(spec: str, device: str = "cpu", dtype: str | None = None) -> SAE:
    """Fetch through SAELens's own converter for the release (which knows each release's file
    layout), then build our SAE from the config and weights it returns."""
    from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS
    from sae_lens.loading.pretrained_saes_directory import (
        get_config_overrides,
        get_norm_scaling_factor,
    )

    ref = resolve_saelens(spec)
    loader = NAMED_PRETRAINED_SAE_LOADERS[ref.converter]
    overrides = {**get_config_overrides(ref.release, ref.sae_id), "device": "cpu"}
    try:
        cfg_dict, state, _ = loader(
            repo_id=ref.repo_id,
            folder_name=ref.folder_name,
            device="cpu",
            force_download=False,
            cfg_overrides=overrides,
        )
    except (OSError, HfHubHTTPError) as e:
        raise HubError(
            f"saelens:{spec} resolves to hf:{ref.repo_id}/{ref.folder_name}, which could not be fetched "
            f"from the Hugging Face hub and is not in the local cache: {e}"
        ) from e
    source = f"saelens:{spec} (hf:{ref.repo_id}/{ref.folder_name})"
    cfg = cfg_from_saelens(cfg_dict, source)
    if cfg_dict.get("normalize_activations") == "expected_average_only_in":
        factor = get_norm_scaling_factor(ref.release, ref.sae_id)
        if factor is None:
            raise FormatError(
                f"{source}: normalize_activations is expected_average_only_in but the release has no norm_scaling_factor"
            )
        cfg.normalize_activations, cfg.norm_scaling_factor = (
            "expected_average_only_in",
            float(factor),
        )
    return build(cfg, state, source, device, dtype)
