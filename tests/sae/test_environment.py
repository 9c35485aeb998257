"""An unsupported torch or transformers is refused at import, naming versions and range."""

import subprocess
import sys
from importlib import metadata

import pytest


def _import_sae_beside(tmp_path, dists: dict[str, str]) -> subprocess.CompletedProcess:
    """`import sae` in a fresh interpreter that finds these distributions (name -> version)
    ahead of the installed ones, as a machine with other releases installed would."""
    for name, version in dists.items():
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import sae"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def _declared(name: str) -> str:
    return next(r for r in metadata.requires("sae-forge") if r.startswith(name))


@pytest.mark.parametrize("name", ["transformers", "torch"])
def test_a_release_below_the_range_is_refused_at_import(tmp_path, name):
    done = _import_sae_beside(tmp_path, {name: "1.0.0"})
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("sae.environment.UnsupportedEnvironment:")
    assert f"{name} 1.0.0 is installed, sae-forge supports {_declared(name)}" in last


def test_both_problems_are_named_at_once(tmp_path):
    done = _import_sae_beside(tmp_path, {"transformers": "4.0.0", "torch": "1.13.1"})
    last = done.stderr.strip().splitlines()[-1]
    assert "transformers 4.0.0" in last and "torch 1.13.1" in last


def test_the_installed_releases_pass(tmp_path):
    assert _import_sae_beside(tmp_path, {}).returncode == 0
