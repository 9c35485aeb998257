"""The installed torch and transformers against the ranges sae-forge declares.

A release outside them fails at `import sae` with the versions and the supported range named,
instead of a traceback from deep inside transformers at the first forward pass. The ranges are
read from the installed distribution's own metadata (pyproject.toml), so they are stated once.
"""

from __future__ import annotations

from importlib import metadata

CHECKED = ("torch", "transformers")


class UnsupportedEnvironment(ImportError):
    """torch or transformers is missing, or installed at a release sae-forge does not support."""


def check_versions() -> None:
    """Raise UnsupportedEnvironment naming every checked package outside its declared range."""
    try:
        declared = metadata.requires("sae-forge") or []
    except metadata.PackageNotFoundError:
        return  # a source tree that was never installed declares nothing to check against
    from packaging.requirements import Requirement

    problems = []
    for line in declared:
        req = Requirement(line)
        if req.name not in CHECKED or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        try:
            found = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed (sae-forge needs {req})")
            continue
        if not req.specifier.contains(found, prereleases=True):
            problems.append(f"{req.name} {found} is installed, sae-forge supports {req}")
    if problems:
        raise UnsupportedEnvironment(
            "; ".join(problems) + ". Install a supported release (pip install 'NAME>=LOW'), "
            "or run `make install`, which installs the tested versions of requirements/lock.txt"
        )


def machine() -> dict[str, object]:
    """The machine a benchmark ran on, for its results file (bench/results/*.json)."""
    import os
    import platform

    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__}  # fmt: skip
