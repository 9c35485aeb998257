"""The `sae` command: subcommands listed, options generated from dataclasses, config files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import sae
from sae.cli import ConvertOptions, build_options, main, parser
from tests.conftest import make_sae


def test_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "sae.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("demo", "harvest", "train", "eval", "dashboard", "compare", "info", "convert"):
        assert name in out


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "sae"  # installed beside the interpreter by pip
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "harvest" in out.stdout


def test_flags_come_from_dataclass_fields_with_their_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    help_text = capsys.readouterr().out
    assert "--dtype" in help_text and "dtype of the saved weights. (default: float32)" in help_text
    assert "SOURCE" in help_text and "OUT" in help_text


def test_config_file_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"dtype": "bfloat16", "source": "a"}))
    args = parser().parse_args(["convert", "x", "y", "--config", str(tmp_path / "c.yaml")])
    assert build_options(ConvertOptions, args) == ConvertOptions(
        source="x", out="y", dtype="bfloat16"
    )
    args = parser().parse_args(
        ["convert", "x", "y", "--config", str(tmp_path / "c.yaml"), "--dtype", "float16"]
    )
    assert build_options(ConvertOptions, args).dtype == "float16"
    (tmp_path / "bad.yaml").write_text("dtyp: float16\n")
    with pytest.raises(SystemExit, match=r"unknown options \['dtyp'\]"):
        build_options(
            ConvertOptions,
            parser().parse_args(["convert", "x", "y", "--config", str(tmp_path / "bad.yaml")]),
        )


def test_convert_and_info(tmp_path, capsys):
    make_sae("gated").save(tmp_path / "src")
    main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "bfloat16"])
    assert sae.load(tmp_path / "dst").W_enc.dtype == torch.bfloat16
    main(["info", str(tmp_path / "dst")])
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") : out.rindex("}") + 1])["architecture"] == "gated"
