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
    for name in (
        "demo",
        "harvest",
        "train",
        "eval",
        "dashboard",
        "compare",
        "info",
        "convert",
        "export",
    ):
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


def options_from(tmp_path, command, cls, text, *argv):
    (tmp_path / "c.yaml").write_text(text)
    args = parser(command).parse_args([command, *argv, "--config", str(tmp_path / "c.yaml")])
    return build_options(cls, args)


def test_config_values_take_the_options_types(tmp_path):
    """YAML reads 1e-3 and 2e6 as strings, `no` as a bool and a lone hookpoint as a string; each
    reaches the run as the option's type or is refused naming the file and option."""
    from train.config import HarvestConfig, TrainConfig

    text = "lr: 1e-3\ntotal_tokens: 2e6\nsweep: [{k: '16', lr: 3e-4}]\n"
    cfg = options_from(tmp_path, "train", TrainConfig, text)
    assert (cfg.lr, cfg.total_tokens) == (0.001, 2_000_000)
    assert [(s.k, s.lr) for s in cfg.specs()] == [(16, 0.0003)]
    hook = options_from(tmp_path, "harvest", HarvestConfig, "hook: blocks.3.hook_resid_pre\n").hook
    assert hook == ["blocks.3.hook_resid_pre"]
    refused = {
        "normalize: 'no'\n": r"normalize should be bool, got 'no'",
        "total_tokens: 1.5\n": r"total_tokens should be int, got 1.5",
        "total_tokens: .inf\n": r"total_tokens should be int, got inf",
        "lr: fast\n": r"lr should be float, got 'fast'",
        "sweep: {k: 16}\n": r"sweep should be list",
        "cache: [a, b]\n": r"cache should be str",
    }
    for text, message in refused.items():
        with pytest.raises(ValueError, match=r"c.yaml: " + message):
            options_from(tmp_path, "train", TrainConfig, text)
    with pytest.raises(ValueError, match=r"sweep entries are mappings of SAE fields, got 'topk'"):
        options_from(tmp_path, "train", TrainConfig, "sweep: [topk]\n").specs()


def test_positionals_may_come_from_the_config_file(tmp_path):
    cfg = options_from(tmp_path, "convert", ConvertOptions, "source: a\nout: b\n")
    assert (cfg.source, cfg.out) == ("a", "b")
    with pytest.raises(SystemExit, match=r"OUT required \(as an argument or in --config\)"):
        options_from(tmp_path, "convert", ConvertOptions, "source: a\n")


@pytest.mark.parametrize(
    "content, message",
    [(None, "No such file"), (b"out: [\n", "while parsing"), (b"\x80\x03pickle", "decode")],
)
def test_an_unreadable_config_file_is_named(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_bytes(content)
    args = parser("convert").parse_args(["convert", "a", "b", "--config", str(path)])
    with pytest.raises(SystemExit, match=rf"--config {path}: .*{message}"):
        build_options(ConvertOptions, args)


def test_list_flags_take_their_items_type(tmp_path):
    from train.config import TrainConfig

    args = parser("train").parse_args(["train", "--matryoshka-widths", "64", "512"])
    assert build_options(TrainConfig, args).specs()[0].matryoshka_widths == [64, 512]
    # and from a config file, run-level and per sweep entry: items typed, or refused by name
    text = "matryoshka_widths: ['64', 512]\nsweep: [{matryoshka_widths: [8, '2e3']}]\n"
    cfg = options_from(tmp_path, "train", TrainConfig, text)
    assert cfg.matryoshka_widths == [64, 512] and cfg.specs()[0].matryoshka_widths == [8, 2000]
    with pytest.raises(ValueError, match=r"c.yaml: matryoshka_widths\[1\] should be int, got 'x'"):
        options_from(tmp_path, "train", TrainConfig, "matryoshka_widths: [1, x]\n")
    with pytest.raises(ValueError, match=r"sweep entry .*: matryoshka_widths\[0\] should be int"):
        options_from(
            tmp_path, "train", TrainConfig, "sweep: [{matryoshka_widths: [1.5]}]\n"
        ).specs()


def test_top_level_help_imports_no_torch():
    """`sae --help` and `import sae` stay instant: torch (seconds to import) loads on first use."""
    code = (
        "import sys, contextlib, io\n"
        "from sae.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_convert_refuses_to_overwrite_an_sae_or_its_source(tmp_path):
    """An SAE already in OUT is kept unless --overwrite; OUT never is the source (a lossy dtype
    would otherwise replace the only copy)."""
    make_sae("topk").save(tmp_path / "src")
    make_sae("gated").save(tmp_path / "dst")
    before = (tmp_path / "dst" / "sae_weights.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="already holds an SAE .*--overwrite"):
        main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")])
    assert (tmp_path / "dst" / "sae_weights.safetensors").read_bytes() == before
    for out in (tmp_path / "src", tmp_path / "x" / ".." / "src"):
        with pytest.raises(SystemExit, match="is the source itself"):
            main(["convert", str(tmp_path / "src"), str(out), "--overwrite", "--dtype", "float16"])
    assert sae.load(tmp_path / "src").W_enc.dtype == torch.float32
    main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--overwrite"])
    assert sae.load(tmp_path / "dst").cfg.architecture == "topk"
