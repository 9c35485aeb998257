"""What the `sae` command says when something is wrong: one line naming the thing (a flag, file,
model, URL or width) and what was expected, instead of a library's traceback or usage."""

from dataclasses import dataclass

import fsspec
import pytest
import torch
import yaml
from botocore.exceptions import NoCredentialsError

import sae
from eval.synthetic import SyntheticData, recovery
from sae.cli import field_docs, main
from sae.lm import load_lm
from tests.conftest import make_sae, start_sae
from train.config import SAESpec, TrainConfig
from train.data import load_documents

MISSING_MODEL = "sae-forge-tests/no-such-model"  # never in the HF cache; tests run offline


def test_train_help_documents_the_inherited_sae_fields(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name in ("architecture", "expansion_factor", "d_sae", "k", "lr", "hook", "name"):
        assert field_docs(SAESpec)[name] in help_text
    assert (
        "--lr FLOAT Adam learning rate; 0 picks it from the width and the run's length" in help_text
    )
    assert "(-1: 5% of the run, at least 5 and at most 1000)" in help_text
    assert "--sparsity-coefficient FLOAT L1 weight" in help_text
    assert "0 picks the architecture's default for the run's length" in help_text


def test_a_subclass_field_docstring_overrides_the_inherited_one():
    @dataclass
    class Narrower(TrainConfig):
        k: int = 8
        """Active latents per row, fewer here."""

    docs = field_docs(Narrower)
    assert docs["k"] == "Active latents per row, fewer here."
    assert (
        docs["lr"] == field_docs(SAESpec)["lr"]
        and docs["cache"] == field_docs(TrainConfig)["cache"]
    )


@pytest.mark.parametrize("typo", ["--expension-factor", "--expansion_factor"])
def test_a_mistyped_flag_is_the_subcommands_error_with_a_suggestion(typo, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", typo, "4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: sae train ")
    assert f"sae train: error: unrecognized arguments: {typo} 4; " in err
    assert "did you mean --expansion-factor?" in err


@pytest.mark.parametrize("dataset", ["my_txts/", "./my_txts", "~/no/such/folder", "notes.jsonl"])
def test_a_missing_local_dataset_is_named(dataset):
    with pytest.raises(FileNotFoundError, match=f"no such file or folder: {dataset} "):
        next(load_documents(dataset))


def test_a_hub_dataset_id_still_goes_to_datasets(monkeypatch):
    import datasets

    asked = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, **kw: asked.append(name) or [{"text": "a row"}]
    )
    assert list(load_documents("roneneldan/TinyStories")) == ["a row"]
    assert asked == ["roneneldan/TinyStories"]


def test_a_model_neither_local_nor_cached_is_named(capsys):
    with pytest.raises(OSError, match="neither a local folder nor available offline") as e:
        load_lm(MISSING_MODEL)
    assert MISSING_MODEL in str(e.value) and isinstance(e.value.__cause__, OSError)
    with pytest.raises(SystemExit, match=f"sae harvest: OSError: model '{MISSING_MODEL}' is"):
        main(["harvest", "--model", MISSING_MODEL])


def test_missing_s3_credentials_are_one_line_naming_the_url(monkeypatch, tmp_path):
    def no_credentials(url, **kwargs):
        raise NoCredentialsError()

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_credentials)
    with pytest.raises(SystemExit) as e:
        main(["train", "--cache", "s3://nobucket/x", "--out", str(tmp_path)])
    assert str(e.value.code) == (
        "sae train: NoCredentialsError: Unable to locate credentials (accessing s3://nobucket/x)"
    )


def test_a_programming_error_keeps_its_traceback(monkeypatch, tmp_path):
    def bug(url, **kwargs):
        raise AttributeError("a bug")

    monkeypatch.setattr(fsspec.core, "url_to_fs", bug)
    with pytest.raises(AttributeError, match="a bug"):
        main(["train", "--cache", "s3://nobucket/x", "--out", str(tmp_path)])


def test_synthetic_data_of_another_width_than_the_sae_is_named(tmp_path):
    d = sae.create("topk", d_in=64, d_sae=128, k=4)
    with pytest.raises(ValueError, match=r"synthetic data has width d=32 but the SAE has d_in=64"):
        recovery(d, SyntheticData(d=32, n_features=48), n=64)
    d.save(tmp_path / "sae")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"d": 32, "n_features": 48}))
    with pytest.raises(
        SystemExit, match=r"sae eval: ValueError: --synthetic .*spec.yaml: .*d=32 .*d_in=64"
    ):
        main(["eval", str(tmp_path / "sae"), "--synthetic", str(tmp_path / "spec.yaml")])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dead-tokens", "-1"], "dead_tokens must be non-negative, got -1"),
        (["--checkpoint-every", "-1"], "checkpoint_every must be non-negative"),
        (["--warmup-steps", "-5"], r"warmup_steps must be -1 \(5% of the run\) or more"),
        (["--sparsity-warmup-fraction", "-1"], r"sparsity_warmup_fraction must be in \[0, 1\]"),
        (["--expansion-factor", "-2"], "expansion_factor must be positive, got -2"),
        (["--decoder-init", "ones"], "decoder_init 'ones' is not one of auto, random, zero"),
        (["--device", "gpu"], "--device 'gpu' is not a device"),
        (["--device", "cuda:7"], "--device cuda:7"),
    ],
)
def test_out_of_range_settings_are_refused_naming_them(tmp_path, flags, message):
    """Each was accepted silently: -1 dead tokens declared every latent dead, -1 checkpointed
    every step; a device typo or a missing GPU gave torch's traceback."""
    with pytest.raises(SystemExit, match=f"sae train: .*{message}"):
        main(["train", "--cache", str(tmp_path / "none"), "--out", str(tmp_path / "r"), *flags])


def test_latents_and_inputs_out_of_range_are_named():
    from transformers import LlamaConfig, LlamaForCausalLM

    from sae.hooks import ablate, steer

    d = sae.create("topk", d_in=16, d_sae=32, k=4, hook_name="blocks.0.hook_resid_post")
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                         num_attention_heads=2, vocab_size=10))  # fmt: skip
    with (
        pytest.raises(ValueError, match=r"latents \[32\] out of range: .* latents 0..31"),
        steer(model, d, latent=32, scale=1.0),
    ):
        pass
    with pytest.raises(ValueError, match=r"latents \[-1\] out of range"), ablate(model, d, [3, -1]):
        pass
    with pytest.raises(ValueError, match=r"expects activations with last dimension d_in=16"):
        d.encode(torch.tensor(1.0))


def test_a_report_path_that_is_a_directory_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match=r"sae eval: --json .* is a directory"):
        main(["eval", str(tmp_path / "no-sae"), "--json", str(tmp_path)])


def test_ctrl_c_ends_a_command_with_one_line(tmp_path):
    """SIGINT mid-harvest: exit code 130 and one line, not a 30-line KeyboardInterrupt traceback;
    the shards already written stay (the same command resumes)."""
    import signal
    import time

    proc = start_sae("harvest", "--tokens", "2000000", "--out", str(tmp_path / "cache"),
                     "--shard-windows", "16")  # fmt: skip
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cache").glob("shard-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    lines = [line for line in err.splitlines() if line.strip() and "harvest:" not in line[:9]]
    assert proc.returncode == 130, err
    assert lines[-1] == "sae harvest: interrupted" and "Traceback" not in err, err
    assert list((tmp_path / "cache").glob("shard-*"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["harvest", "--hook", "blocks.1.hook_resid_post", "--hook", "blocks.1.hook_resid_post"],
         "--hook blocks.1.hook_resid_post given more than once"),
        (["harvest", "--hook", " "], "--hook is empty: name a hookpoint"),
        (["train", "--name", "../../x"], "name '../../x' would write outside --out"),
        (["train", "--name", "/tmp/x"], "name '/tmp/x' would write outside --out"),
        (["train", "--total-tokens", "100", "--batch-size", "1024"],
         "total_tokens=100 is less than one batch"),
        (["dashboard", "some/sae", "--latents", "-1"], "latents must be non-negative, got -1"),
        (["compare", "a", "b", "--threshold", "5"], r"threshold is a cosine in \[-1, 1\], got 5.0"),
    ],
)  # fmt: skip
def test_values_out_of_range_are_refused_before_any_work(argv, message):
    """Each used to run: a hook stored twice, SAEs written outside --out, 0 steps trained and a
    random SAE saved, 1023 dashboard pages, identical SAEs reported 0% matched."""
    with pytest.raises(SystemExit, match=f"sae {argv[0]}: .*{message}"):
        main(argv)


def test_a_context_longer_than_the_model_is_refused(tmp_path):
    """SmolLM2 has 8192 positions: 100000 ran with no output for ever, 9000 silently."""
    with pytest.raises(SystemExit, match="context_size 9000 is longer than llama's 8192 positions"):
        main(["harvest", "--context-size", "9000", "--out", str(tmp_path / "c")])
    assert not list((tmp_path / "c").glob("shard-*"))


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "SAE", "--json", "{blocker}/eval.json"],
        ["dashboard", "SAE", "--out", "{blocker}/dash"],
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_the_evaluation(tmp_path, argv):
    """--json under a regular file: refused at once, naming it (it used to fail after the whole
    evaluation, 37-91 s in)."""
    sae_dir = tmp_path / "sae"
    make_sae("topk").save(sae_dir)
    (tmp_path / "blocker").write_text("a file, not a folder")
    argv = [
        a.replace("SAE", str(sae_dir)).replace("{blocker}", str(tmp_path / "blocker")) for a in argv
    ]
    with pytest.raises(SystemExit, match=f"cannot write into {tmp_path / 'blocker'}"):
        main(argv)


def test_a_report_that_is_not_json_is_named(tmp_path):
    make_sae("topk").save(tmp_path / "sae")
    (tmp_path / "r.json").write_text("not json")
    with pytest.raises(
        SystemExit, match=f"--report {tmp_path / 'r.json'} is not an `sae eval --json` report"
    ):
        main(
            [
                "dashboard",
                str(tmp_path / "sae"),
                "--report",
                str(tmp_path / "r.json"),
                "--out",
                str(tmp_path / "d"),
            ]
        )
