"""metrics.jsonl on resume: a line cut short by a kill or a full disk is dropped, other damage refused."""

import json

import pytest

from train.tracking import Tracker


def logged(tmp_path, torn: str = "", damaged: int | None = None) -> Tracker:
    """A tracker whose metrics.jsonl has steps 1..3, line `damaged` garbled, then `torn`."""
    tracker = Tracker(tmp_path)
    for step in (1, 2, 3):
        tracker.log({"losses/mse_loss": 0.5}, step)
    lines = tracker.metrics_file.read_text().splitlines(keepends=True)
    if damaged is not None:
        lines[damaged - 1] = lines[damaged - 1][:12] + "\n"
    tracker.metrics_file.write_text("".join(lines) + torn)
    return tracker


def steps(tracker: Tracker) -> list[int]:
    return [json.loads(line)["step"] for line in tracker.metrics_file.read_text().splitlines()]


@pytest.mark.parametrize("torn", ['{"step": 4, "losses/mse_loss": 0.', "\0" * 40, "{"])
def test_a_last_line_cut_short_is_dropped(tmp_path, torn):
    tracker = logged(tmp_path, torn)
    tracker.truncate_after(3)
    assert steps(tracker) == [1, 2, 3]
    tracker.log({"losses/mse_loss": 0.5}, 4)
    assert steps(tracker) == [1, 2, 3, 4]


def test_a_damaged_line_before_the_last_is_refused(tmp_path):
    tracker = logged(tmp_path, damaged=2)
    before = tracker.metrics_file.read_text()
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2, is not a metrics record"):
        tracker.truncate_after(3)
    assert tracker.metrics_file.read_text() == before


def test_a_fresh_run_empties_even_a_damaged_file(tmp_path):
    tracker = logged(tmp_path, torn="{", damaged=2)
    tracker.truncate_after(0)
    assert tracker.metrics_file.read_text() == ""


def test_a_full_disk_while_rewriting_keeps_the_history(tmp_path, monkeypatch):
    """truncate_after rewrites the file on every resume: in place, a failure between the truncate
    and the write lost every step logged."""
    import errno
    from pathlib import Path

    tracker = logged(tmp_path)
    before = tracker.metrics_file.read_text()

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space left"):
        tracker.truncate_after(2)
    monkeypatch.undo()
    assert tracker.metrics_file.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
