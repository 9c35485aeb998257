"""Progress where no terminal shows a bar (a log file, a notebook cell, CI): lines, not silence."""

from sae.progress import progress


def test_progress_is_written_as_lines_when_stderr_is_not_a_terminal(capsys):
    with progress(total=1000, unit="tok", unit_scale=True, desc="train") as bar:
        for _ in range(10):
            bar.update(100)
    err = capsys.readouterr().err
    assert "\r" not in err
    # the start and the end; nothing between within a minute, and close's redraw not repeated
    assert [line.split("|")[0] for line in err.splitlines()] == ["train:   0%", "train: 100%"]
    assert "1.00k/1.00k" in err


def test_a_disabled_progress_writes_nothing(capsys):
    with progress(total=10, desc="train", disable=True) as bar:
        bar.update(10)
    assert capsys.readouterr().err == ""
