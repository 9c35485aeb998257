"""sae.load(): one entry point for every place a dictionary can come from.

"runs/demo/sae"                      a local directory (ours, SAELens's or sparsify's layout; a
                                     cross-layer transcoder or crosscoder of ours loads as its class)
"hf:org/repo[/subdir][@revision]"    a Hugging Face repo, through huggingface_hub's cache
"saelens:<release>/<sae_id>"         SAELens's pretrained registry (needs the interop extra)
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError

from sae.io import FormatError, build, cfg_from_saelens, load_dir, saelens_state
from sae.models import SAE

SCHEMES = ("hf", "saelens", "wandb")


class HubError(RuntimeError):
    """A remote source could not be reached or does not hold what was asked for."""


def load(source: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None) -> SAE:
    """Load a dictionary from a local directory, `hf:` repo or `saelens:` release (see module doc)."""
    text = str(source)
    scheme, sep, rest = text.partition(":")
    if not sep or Path(text).exists():
        return load_dir(text, device, dtype)
    if scheme == "hf":
        return load_hf(rest, device, dtype)
    if scheme == "saelens":
        return load_saelens(rest, device, dtype)
    if scheme == "wandb":
        return load_wandb(rest, device, dtype)
    raise ValueError(
        f"unknown SAE source {text!r}: use a local directory or one of the schemes {[s + ':' for s in SCHEMES]}"
    )


def load_hf(spec: str, device: str = "cpu", dtype: str | torch.dtype | None = None) -> SAE:
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


def load_saelens(spec: str, device: str = "cpu", dtype: str | torch.dtype | None = None) -> SAE:
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
    state = saelens_state(cfg_dict, state)
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


def load_wandb(spec: str, device: str = "cpu", dtype: str | torch.dtype | None = None) -> SAE:
    """`entity/project/name[:version]`, version `latest` (default) or `vN`. Online through the W&B
    API; with WANDB_MODE=offline from the artifacts that offline runs under $WANDB_DIR recorded
    (staged files, checked against their MD5 digests), so unsynced runs are loadable too."""
    path, _, version = spec.partition(":")
    parts = path.split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"wandb:{spec} should be wandb:entity/project/name[:version]")
    version = version or "latest"
    target = Path(tempfile.mkdtemp(prefix="sae-forge-wandb-"))
    if os.environ.get("WANDB_MODE") == "offline":
        _fetch_offline_artifact(parts[1], parts[2], version, target)
    else:
        import wandb

        try:
            wandb.Api().artifact(f"{path}:{version}", type="model").download(root=str(target))
        except Exception as e:  # noqa: BLE001 - wandb raises many types for a missing or unreachable artifact
            raise HubError(
                f"could not fetch wandb:{spec} through the W&B API ({type(e).__name__}: {e})"
            ) from e
    return load_dir(target, device, dtype)


def _fetch_offline_artifact(project: str, name: str, version: str, target: Path) -> None:
    from sae.wandb_offline import read_offline_run

    root = Path(os.environ.get("WANDB_DIR", ".")) / "wandb"
    runs = sorted(
        (read_offline_run(d) for d in root.glob("offline-run-*") if list(d.glob("run-*.wandb"))),
        key=lambda r: r.started,
    )
    logged = [
        a
        for r in runs
        if r.project == project
        for a in r.artifacts
        if a.name == name and a.type == "model"
    ]  # oldest first
    if not logged:
        raise HubError(
            f"no offline W&B run under {root} logged a model artifact {name!r} in project {project!r}"
        )
    index = len(logged) - 1 if version == "latest" else int(version.removeprefix("v"))
    if not 0 <= index < len(logged):
        raise HubError(
            f"offline W&B artifact {name!r} has versions v0..v{len(logged) - 1}, not {version}"
        )
    for rel, (local, digest) in logged[index].files.items():
        data = Path(local).read_bytes() if Path(local).exists() else None
        if data is None or base64.b64encode(hashlib.md5(data).digest()).decode() != digest:
            raise HubError(
                f"offline W&B artifact {name}:{version}: staged file for {rel} is missing or altered ({local})"
            )
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(data)
