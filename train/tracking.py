"""Metrics out of a run: a metrics.jsonl file always, Weights & Biases when a project is set.

W&B runs offline (files under the run directory, `wandb sync` later) when there is no API key, with
a warning; if W&B fails mid-run it is switched off with a warning and training goes on.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Tracker:
    def __init__(
        self,
        out: Path,
        project: str = "",
        entity: str = "",
        config: dict | None = None,
        run_id: str | None = None,
    ):
        self.out = out
        self.metrics_file = out / "metrics.jsonl"
        self.run = None
        if project:
            self.run = self._start_wandb(project, entity, config or {}, run_id)

    def _start_wandb(self, project: str, entity: str, config: dict, run_id: str | None):
        try:
            import wandb

            if (
                not os.environ.get("WANDB_MODE")
                and not os.environ.get("WANDB_API_KEY")
                and not _has_netrc_key()
            ):
                warnings.warn(
                    "no W&B API key: logging offline under the run directory (sync later with `wandb sync`)",
                    stacklevel=3,
                )
                os.environ["WANDB_MODE"] = "offline"
            return wandb.init(
                project=project, entity=entity or None, config=config, dir=str(self.out), id=run_id, resume="allow" if run_id else None
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a tracking failure must never stop training
            warnings.warn(
                f"W&B could not start ({type(e).__name__}: {e}); training continues without it",
                stacklevel=3,
            )
            return None

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def truncate_after(self, step: int) -> None:
        """On resume: drop metrics logged after the checkpoint, which the resumed run logs again."""
        if self.metrics_file.exists():
            kept = [
                line
                for line in self.metrics_file.read_text().splitlines()
                if json.loads(line)["step"] <= step
            ]
            self.metrics_file.write_text("".join(line + "\n" for line in kept))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            try:
                self.run.log(metrics, step=step)
            except Exception as e:  # noqa: BLE001
                self._lost(e)

    def log_model(self, name: str, directory: Path) -> None:
        """The trained SAE as a W&B artifact of type `model` (loadable with sae.load("wandb:...") once supported)."""
        if self.run is None:
            return
        try:
            import wandb

            artifact = wandb.Artifact(name, type="model")
            artifact.add_dir(str(directory))
            self.run.log_artifact(artifact)
        except Exception as e:  # noqa: BLE001
            self._lost(e)

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:  # noqa: BLE001
                self._lost(e)

    def _lost(self, error: Exception) -> None:
        warnings.warn(
            f"W&B failed ({type(error).__name__}: {error}); training continues, metrics still go to {self.metrics_file}",
            stacklevel=3,
        )
        self.run = None


def _has_netrc_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text()


# -- reading offline runs back ----------------------------------------------------------------------
@dataclass
class OfflineRun:
    """What an offline W&B run recorded: config, every history row, summary, logged artifacts."""

    run_id: str
    config: dict[str, Any]
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    artifacts: list[tuple[str, str]]  # (name, type)


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Parse `offline-run-*/run-*.wandb` (W&B's record log: LevelDB log framing of protobuf
    Records), so tests and `sae compare` can read runs that were never synced."""
    from wandb.proto import wandb_internal_pb2

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb")) if run_dir.is_dir() else [run_dir]
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    run = OfflineRun(files[0].stem.removeprefix("run-"), {}, [], {}, [])
    for data in _wandb_records(files[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "run":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "artifact":
            run.artifacts.append((record.artifact.name, record.artifact.type))
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
