"""Metrics out of a run: a metrics.jsonl file always, Weights & Biases when a project is set.

W&B runs offline (files under the run directory, `wandb sync` later) when there is no API key, with
a warning; if W&B fails mid-run it is switched off with a warning and training goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from sae.io import write_text


class Tracker:
    def __init__(
        self,
        out: Path,
        project: str = "",
        entity: str = "",
        config: dict | None = None,
        run_id: str | None = None,
        active: bool = True,
    ):
        """`active=False` (ranks other than 0 under torchrun) records nothing."""
        self.out = out
        self.active = active
        self.metrics_file = out / "metrics.jsonl"
        self.run = None
        if project and active:
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
            settings = dict(project=project, entity=entity or None, config=config, dir=str(self.out),
                            id=run_id, resume="allow" if run_id else None)  # fmt: skip
            try:
                return wandb.init(**settings)
            except Exception as e:  # noqa: BLE001 - unreachable or refused: keep the run's record
                if os.environ.get("WANDB_MODE") == "offline":
                    raise
                warnings.warn(
                    f"W&B could not start online ({type(e).__name__}: {e}); logging offline under "
                    "the run directory instead (sync later with `wandb sync`)",
                    stacklevel=3,
                )
                return wandb.init(**settings, mode="offline")
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
        """Drop metrics logged after `step`: on resume those the run logs again, on a fresh run all.
        A last line that does not parse was cut short (a kill or a full disk mid-write) and is
        dropped too; an earlier one is damage this cannot explain, and is refused."""
        if not self.active or not self.metrics_file.exists():
            return
        lines = self.metrics_file.read_text(errors="replace").splitlines() if step else []
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                logged = json.loads(line)["step"]
            except (ValueError, TypeError, KeyError) as e:
                if number == len(lines):
                    break
                raise ValueError(
                    f"{self.metrics_file}, line {number}, is not a metrics record ({e})"
                ) from e
            if logged <= step:
                kept.append(line)
        text = "".join(line + "\n" for line in kept)  # a kill mid-write must not lose the history
        write_text(self.metrics_file, text)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.active:
            return
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
                # finish() can return before W&B's service has written the last records (seen
                # offline, and after an online start failed): teardown waits for them, so the
                # run files are whole when training returns
                import wandb

                wandb.teardown()
            except Exception as e:  # noqa: BLE001
                self._lost(e)

    def _lost(self, error: Exception) -> None:
        warnings.warn(
            f"W&B failed ({type(error).__name__}: {error}); training continues, metrics still go to {self.metrics_file}",
            stacklevel=3,
        )
        run, self.run = self.run, None
        with contextlib.suppress(
            Exception
        ):  # close it, so a later wandb.init in this process starts clean
            run.finish(exit_code=1)


def _has_netrc_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text()


from sae.wandb_offline import OfflineRun, read_offline_run  # noqa: E402  (re-exported for tests and compare)

__all__ = ["OfflineRun", "Tracker", "read_offline_run"]
