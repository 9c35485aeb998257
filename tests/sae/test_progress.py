"""Progress where no terminal shows a bar (a log file, a notebook cell, CI): lines, not silence."""

import tqdm.std

from sae.progress import LOG_INTERVAL, progress


def test_progress_is_written_as_lines_when_stderr_is_not_a_terminal(capsys):
    with progress(total=1000, unit="tok", unit_scale=True, desc="train") as bar:
        for _ in range(10):
            bar.update(100)
    err = capsys.readouterr().err
    assert "\r" not in err
    # the start and the end; nothing between within a minute, and close's redraw not repeated
    assert [line.split("|")[0] for line in err.splitlines()] == ["train:   0%", "train: 100%"]
    assert "1.00k/1.00k" in err


def test_a_line_a_minute_however_fast_the_updates(capsys, monkeypatch):
    """Ten updates a second for five minutes on a fake clock: a line at the start, one per
    LOG_INTERVAL and the last; tqdm's adaptive miniters and its monitor thread (which redraws a
    bar whose miniters grew every 10 s) must not add more."""
    now = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    with progress(total=3000, desc="train") as bar:
        for _ in range(3000):
            now[0] += 0.1
            bar.update(1)
            if bar.miniters > 1 and now[0] - bar.last_print_t >= bar.maxinterval:
                bar.refresh()  # what tqdm's monitor thread does (tqdm.std.TMonitor.run)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 + 300 / LOG_INTERVAL + (300 % LOG_INTERVAL > 0)
    assert lines[0].startswith("train:   0%") and lines[-1].startswith("train: 100%")


def test_a_disabled_progress_writes_nothing(capsys):
    with progress(total=10, desc="train", disable=True) as bar:
        bar.update(10)
    assert capsys.readouterr().err == ""
