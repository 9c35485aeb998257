"""Print how the running environment differs from the lock: `python changed.py LOCK [LOCK ...]`.

Run with a side environment's interpreter (make test-latest, make test-oldest) so a failure in
it comes with the releases that moved. Exits 0 either way: this reports, it does not judge.
"""

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name

PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)")


def locked(paths: list[str]) -> dict[str, str]:
    pins = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                if m := PIN.match(line):
                    pins[canonicalize_name(m[1])] = m[2]
    return pins


def installed() -> dict[str, tuple[str, bool]]:
    """name -> (version, whether it lies in this environment rather than the system's). The first
    of a name on sys.path is the one imported: a venv's copy shadows the system's."""
    found: dict[str, tuple[str, bool]] = {}
    for d in metadata.distributions():
        own = str(Path(str(d.locate_file(""))).resolve()).startswith(
            str(Path(sys.prefix).resolve())
        )
        found.setdefault(canonicalize_name(d.metadata["Name"]), (d.version, own))
    return found


def main() -> None:
    pins, found = locked(sys.argv[1:]), installed()
    now = {name: version for name, (version, _) in found.items()}
    moved = {
        name: (pins[name], now.get(name)) for name in sorted(pins) if now.get(name) != pins[name]
    }
    own = {name for name, (_, mine) in found.items() if mine}
    added = sorted(own - set(pins) - {"sae-forge", "pip", "torch", "triton"})
    print(f"against the lock ({len(pins)} pins): {len(moved)} changed, {len(added)} not in it")
    for name, (old, new) in moved.items():
        print(f"  {name}: {old} -> {new or 'absent'}")
    for name in added:
        print(f"  {name}: (not locked) {now[name]}")


if __name__ == "__main__":
    main()
