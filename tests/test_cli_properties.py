"""Property: every `sae harvest|train|eval` invocation either succeeds or ends with one line of
error (argparse's usage and error for a malformed flag), never a traceback.

Hypothesis draws each option from values a user might type, valid and not: negatives, zeros,
huge numbers, NaN, empty and path-escaping strings, unknown names. Budgets stay small where an
invocation is valid (a few hundred tokens), so the examples that run do so in seconds.
Derandomized: CI runs the same examples every time.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sae
from sae.cli import main
from tests.conftest import synthetic_cache

HOOK = "blocks.6.hook_resid_post"  # the synthetic cache's, and SmolLM2's layer 6
COUNTER = itertools.count()


def options(table: dict[str, list]) -> st.SearchStrategy[list[str]]:
    """argv from a subset of `table`'s flags, each with one of its candidate values."""
    picks = {flag: st.sampled_from(values) for flag, values in table.items()}
    chosen = st.fixed_dictionaries({}, optional=picks)
    return chosen.map(lambda d: [str(a) for flag, v in d.items() for a in (flag, v)])


def outcome(argv: list[str], capsys) -> None:
    """Run `sae ARGV` in this process; fail on anything but success or a one-line refusal."""
    try:
        main(argv)
    except SystemExit as e:
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        if isinstance(e.code, str):
            assert e.code.startswith(f"sae {argv[0]}: ") and "\n" not in e.code.strip(), e.code
        elif e.code == 2:  # argparse: the usage, then one error line
            assert err.strip().splitlines()[-1].startswith(f"sae {argv[0]}: error:"), err
        else:
            assert e.code in (0, None), (e.code, err)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("prop") / "cache"
    return synthetic_cache(path, rows=800, d=16, shard_rows=400).url


@pytest.fixture(scope="module")
def smollm2_sae(tmp_path_factory):
    path = tmp_path_factory.mktemp("prop") / "sae"
    sae.create("topk", d_in=576, d_sae=256, k=8, hook_name=HOOK, model_name="smollm2-135m").save(
        path
    )
    return str(path)


PROPERTY = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip


@settings(PROPERTY, max_examples=8)  # each run that gets far loads the model: 8 s apiece
@given(options({
    "--tokens": [-1, 0, 1, 64],
    "--context-size": [-3, 0, 1, 2, 33, 9000],
    "--batch-size": [-1, 0, 1, 4],
    "--shard-windows": [0, 3, 4, 8],
    "--hook": ["blocks.1.hook_resid_post", "blocks.99.hook_resid_post", "", "nonsense", "model.layers.1"],
    "--dtype": ["float32", "int8", ""],  # 16-bit autocast is slow on CPUs without it
    "--device": ["cpu", "cuda", "tpu"],
    "--dataset": ["shakespeare", "no/such/folder/", " "],
    "--split": ["train", "test", "nope"],
    "--seed": [-1, 0, 2**40],
}))  # fmt: skip
def test_harvest_succeeds_or_says_one_line(tmp_path, capsys, argv):
    budget = [] if "--tokens" in argv else ["--tokens", "64"]
    budget += [] if "--dtype" in argv else ["--dtype", "float32"]  # bf16, the default, is slow here
    outcome(["harvest", *argv, *budget, "--out", str(tmp_path / f"h{next(COUNTER)}")], capsys)


@PROPERTY
@given(options({
    "--architecture": ["topk", "batchtopk", "jumprelu", "standard", "gated", "matryoshka_batchtopk", "bogus"],
    "--k": [-1, 0, 4, 10**6],
    "--d-sae": [0, -4, 32],
    "--expansion-factor": [0, 2],
    "--total-tokens": [-1, 0, 100, 400],
    "--batch-size": [0, 100, 1000],
    "--lr": ["nan", "inf", "-1", "0", "1e-3"],
    "--warmup-steps": [-1, 0, 1],
    "--decay-fraction": ["-0.5", "0", "0.2", "2"],
    "--name": ["", "../x", "/abs/x", "plain"],
    "--hook": ["", HOOK, "blocks.2.hook_mlp_out"],
    "--checkpoint-every": [-1, 0, 2],
    "--device": ["cpu", "cuda"],
    "--seed": [-1, 0],
}))  # fmt: skip
def test_train_succeeds_or_says_one_line(tmp_path, capsys, tiny_cache, argv):
    budget = [] if "--total-tokens" in argv else ["--total-tokens", "400", "--batch-size", "100"]
    run = [
        "train",
        "--cache",
        tiny_cache,
        *argv,
        *budget,
        "--out",
        str(tmp_path / f"t{next(COUNTER)}"),
    ]
    outcome(run, capsys)


@PROPERTY
@given(options({
    "--tokens": [-1, 64],
    "--context-size": [-1, 0, 1, 2, 16, 9000],
    "--batch-size": [-1, 0, 4],
    "--device": ["cpu", "cuda"],
    "--dataset": ["shakespeare", "no/such/folder/"],
    "--split": ["test", "nope"],
    "--json": ["", "{tmp}/report.json", "/proc/no/report.json"],
}))  # fmt: skip
def test_eval_succeeds_or_says_one_line(tmp_path, capsys, smollm2_sae, argv):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    budget = [] if "--tokens" in argv else ["--tokens", "64"]
    outcome(["eval", smollm2_sae, *argv, *budget, "--no-absorption"], capsys)
