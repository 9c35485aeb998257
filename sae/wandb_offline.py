"""Reading W&B's offline run files (`offline-run-*/run-*.wandb`) without a server: for loading
artifacts logged by offline runs (`sae.load("wandb:...")`), for tests, and for `sae compare`."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class OfflineArtifact:
    name: str
    type: str
    files: dict[str, tuple[str, str]]
    """path in the artifact -> (local staged copy, base64 MD5 digest)."""


@dataclass
class OfflineRun:
    """What an offline W&B run recorded: config, every history row, summary, logged artifacts."""

    run_id: str
    project: str = ""
    started: float = 0.0
    """Start time (seconds since the epoch)."""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[OfflineArtifact] = field(default_factory=list)


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Parse `offline-run-*/run-*.wandb` (W&B's record log: LevelDB log framing of protobuf
    Records), so tests and `sae compare` can read runs that were never synced."""
    from wandb.proto import wandb_internal_pb2

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb")) if run_dir.is_dir() else [run_dir]
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    run = OfflineRun(files[0].stem.removeprefix("run-"))
    for data in _wandb_records(files[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "run":
            run.project = record.run.project
            run.started = record.run.start_time.ToMicroseconds() / 1e6
            run.config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "artifact":
            a = record.artifact
            files = {c.path: (c.local_path, c.digest) for c in a.manifest.contents}
            run.artifacts.append(OfflineArtifact(a.name, a.type, files))
    return run


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _wandb_records(path: Path):
    """Records of a W&B datastore: a 7-byte header (':W&B', magic, version), then 32 KiB blocks of
    [crc32 u32, length u16, type u8] framed chunks (1 full, 2 first, 3 middle, 4 last)."""
    block = 32768
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, fragments = 7, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            fragments = [chunk]
        elif kind == 3:
            fragments.append(chunk)
        elif kind == 4:
            yield b"".join([*fragments, chunk])
