"""Print how the running environment differs from the lock: `python changed.py LOCK [LOCK ...]`.

Run with a side environment's interpreter (make test-latest, make test-oldest) so a failure in
it comes with the releases that moved. Exits 0 either way: this reports, it does not judge.
"""

import re
import sys
from importlib import metadata

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


def installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def main() -> None:
    pins, now = locked(sys.argv[1:]), installed()
    moved = {
        name: (pins[name], now.get(name)) for name in sorted(pins) if now.get(name) != pins[name]
    }
    added = sorted(set(now) - set(pins) - {"sae-forge", "pip", "torch", "triton"})
    print(f"against the lock ({len(pins)} pins): {len(moved)} changed, {len(added)} not in it")
    for name, (old, new) in moved.items():
        print(f"  {name}: {old} -> {new or 'absent'}")
    for name in added:
        print(f"  {name}: (not locked) {now[name]}")


if __name__ == "__main__":
    main()
