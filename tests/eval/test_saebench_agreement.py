"""Our monosemanticity scores against SAEBench 0.6 itself, run in its own virtualenv (`make
clients-venv`) by tests/clients/saebench_check.py and saeprobes_check.py (in one process:
saebench_all.py) on the same SAEs (exported to SAELens), the same words and the same seed.

First-letter absorption, for the session's trained TopK SAE and for a random one: SAEBench's
prompts and our activations on them, its LM probe and ours, its k-sparse probes' choice of main
latents and ours, and every letter's absorption fraction and full-absorption rate agree to float
rounding. The random draws are SAEBench's (Python's `random` for the prompts, torch's for the
probes), so nothing is left to chance: the tolerance is 1e-6.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import sae
from eval.concepts import (
    LETTERS,
    AbsorptionConfig,
    first_letter_absorption,
    spelling,
    spelling_words,
)
from eval.meta_sae import MetaConfig, meta_sae_score
from eval.probes import logistic_regression
from eval.sparse_probing import (
    METRICS,
    ProbingConfig,
    data_dir,
    probing_tasks,
    read_task,
    sparse_probing,
    split,
    task_files,
)
from sae.cli import main
from sae.lm import smollm2_dir

ROOT = Path(__file__).resolve().parents[2]
SB_PYTHON = ROOT / ".venv-sae-bench" / "bin" / "python"
SCRIPT = ROOT / "tests" / "clients" / "saebench_all.py"
SEED = 42
# SAEBench scores every letter its LM probe passes; on 150 words (276 with each letter topped up to
# 10) that is six letters (measured), not the 20 it asks of a full vocabulary (min_feats_for_eval,
# our min_letters), so both are told 1.
CFG = AbsorptionConfig(words=150, min_letters=1, seed=SEED)


@pytest.fixture(scope="module")
def exported(trained_sae, tmp_path_factory):
    """The trained TopK SAE and a seeded random one, each also as a SAELens folder."""
    if not SB_PYTHON.exists():
        pytest.fail(f"{SB_PYTHON} is missing: run `make clients-venv` (make test does)")
    root = tmp_path_factory.mktemp("saebench")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        random_sae = sae.create("topk", d_in=576, d_sae=trained_sae.cfg.d_sae, k=32,
                                hook_name=trained_sae.cfg.hook_name)  # fmt: skip
    saes = {"trained": trained_sae, "random": random_sae}
    for name, d in saes.items():
        d.save(root / name)
        main(["export", str(root / name), str(root / "saelens" / name), "--format", "saelens"])
    return root, saes


def start(root: Path, *args: str) -> subprocess.Popen:
    """SAEBench's side of every test here, in its own virtualenv and one process, started to run
    while we compute ours: much of its time is single-threaded Python (23 s of it importing
    TransformerLens, paid once), so its torch takes one thread and leaves the other core to ours
    (measured alone: 173 s for this module against 180 s with two threads, and a quarter less CPU)."""
    env = {**os.environ, "PYTHONPATH": "", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    command = [str(SB_PYTHON), str(SCRIPT), str(smollm2_dir()), *args,
               *(str(root / "saelens" / name) for name in ("trained", "random"))]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=root)  # fmt: skip


def finished(run: subprocess.Popen, timeout: int = 900) -> None:
    try:
        _, stderr = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        _, stderr = run.communicate()
        stages = [line for line in stderr.splitlines() if line.startswith("saebench_all:")]
        pytest.fail(f"SAEBench's side ran past {timeout} s ({stages or 'no stage done'}); "
                    f"its stderr ends:\n{stderr[-4000:]}")  # fmt: skip
    assert run.returncode == 0, stderr[-4000:]


# Sparse probing on two of sae-probes' tasks with short prompts (1000 and 2000 rows); the meta-SAE
# score at a third of SAEBench's 1500 steps (both sides, the trained SAE's), to fit the suite's time.
TASKS = ["117_us_state_FL", "125_world_country_Italy"]
PROBING = ProbingConfig(tasks=TASKS)
META = MetaConfig(steps=500)


@pytest.fixture(scope="module")
def both(exported, smollm2):
    """Ours and SAEBench's absorption, logistic regression, sparse probing and meta-SAE score."""
    root, saes = exported
    words = spelling_words(smollm2[1], CFG)
    (root / "words.json").write_text(json.dumps(words))
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(300, 6, generator=g))
    y = (x[:, 0] - x[:, 1] + 0.5 * torch.randn(300, generator=g)) > 0.3
    (root / "out").mkdir()
    (root / "out" / "lr_problem.json").write_text(json.dumps({"x": x.tolist(), "y": y.tolist()}))
    (root / "probing").mkdir()
    run = start(root, str(root / "words.json"), str(SEED), str(root / "out"), ",".join(TASKS),
                str(META.steps), str(root / "probing"))  # fmt: skip
    hook = saes["trained"].cfg.hook_name
    data = spelling(*smollm2, hook, CFG, words)
    absorption = {name: first_letter_absorption(d, data, CFG) for name, d in saes.items()}
    tasks = probing_tasks(*smollm2, hook, PROBING)
    probing = {name: sparse_probing(d, tasks, PROBING) for name, d in saes.items()}
    meta = meta_sae_score(saes["trained"], META)["decoder_fraction_variance_explained"]
    finished(run)
    theirs = {name: json.loads((root / "out" / f"{name}.json").read_text()) for name in saes}
    solution = json.loads((root / "out" / "lr_solution.json").read_text())
    probed = {name: json.loads((root / "probing" / f"{name}.json").read_text()) for name in saes}
    probed["splits"] = json.loads((root / "probing" / "splits.json").read_text())
    return (data, absorption, theirs, (x, y, solution)), (probing, meta, probed)


@pytest.fixture(scope="module")
def compared(both):
    return both[0]


@pytest.fixture(scope="module")
def probed(both):
    return both[1]


def test_prompts_activations_and_lm_probe_are_saebenchs(compared):
    data, _, theirs, _ = compared
    t = theirs["trained"]
    spelled = {part: [p.rsplit("\n", 1)[1].removesuffix(" has the first letter:") for p in t[f"{part}_prompts"]]
               for part in ("train", "test")}  # fmt: skip
    assert spelled == data.split
    x_test = torch.tensor(t["x_test"])
    assert torch.allclose(data.x["test"][: len(x_test)], x_test, atol=1e-5)
    assert torch.allclose(data.probe_w, torch.tensor(t["probe_weight"]), atol=1e-5)
    assert torch.allclose(data.probe_b, torch.tensor(t["probe_bias"]), atol=1e-5)
    assert data.probe_f1.tolist() == pytest.approx([t["probe_f1"][c] for c in LETTERS], abs=1e-9)


@pytest.mark.parametrize("name", ["trained", "random"])
def test_absorption_is_saebenchs_letter_by_letter(compared, name):
    _, ours, theirs, _ = compared
    o, t = ours[name], theirs[name]
    assert sorted(o["letters"]) == sorted(t["letters"]) and len(o["letters"]) >= 5
    for c, mine in o["letters"].items():
        ref = t["letters"][c]
        assert mine["main_latents"] == t["k_sparse_features"][c][: ref["num_split_features"]], c
        assert mine["probe_true_positives"] == ref["num_probe_true_positives"], c
        assert mine["absorption_fraction"] == pytest.approx(
            ref["mean_absorption_fraction"], abs=1e-6
        ), c
        assert mine["full_absorption_rate"] == pytest.approx(
            ref["full_absorption_rate"], abs=1e-6
        ), c
    m = t["metrics"]
    assert o["mean_absorption_fraction"] == pytest.approx(
        m["mean_absorption_fraction_score"], abs=1e-6
    )
    assert o["mean_full_absorption_rate"] == pytest.approx(
        m["mean_full_absorption_score"], abs=1e-6
    )
    assert o["std_absorption_fraction"] == pytest.approx(
        m["std_dev_absorption_fraction_score"], abs=1e-6
    )
    assert o["mean_main_latents"] == pytest.approx(m["mean_num_split_features"], abs=1e-9)


def test_the_random_sae_absorbs(compared):
    """The agreement is not 0 == 0: a random dictionary's letters are spread over latents that
    SAEBench counts as absorbing (measured on these words: a full-absorption rate of 0.28 over
    the six letters, where the trained SAE has 0.06; on 600 words 0.16 mean fraction and 0.35
    full, against 0 and 0)."""
    _, ours, _, _ = compared
    letters = ours["random"]["letters"]
    absorbed = [
        c for c, v in letters.items() if v["absorption_fraction"] > 0 or v["full_absorptions"]
    ]
    assert absorbed, letters


def test_logistic_regression_is_scikit_learns(compared):
    """The k-sparse probes' fit: scikit-learn's LogisticRegression(class_weight="balanced") stops
    its L-BFGS at a gradient of 1e-4, about 1e-3 short of the optimum in the weights (measured:
    1.2e-3 at most); ours is the optimum itself (test_concepts checks the gradient to 1e-8)."""
    *_, (x, y, solution) = compared
    w, b = logistic_regression(x[None], y[None])
    assert torch.allclose(w[0], torch.tensor(solution["weight"], dtype=torch.double), atol=3e-3)
    assert float(b[0]) == pytest.approx(solution["bias"], abs=3e-3)


def test_every_tasks_labels_and_split_are_sae_probes(probed):
    """All 113 tasks, not only the two probed: the labels and the rows of each split."""
    *_, theirs = probed
    files = task_files(data_dir(PROBING))
    assert len(files) == len(theirs["splits"]) == 113
    for task, (labels, train, test) in theirs["splits"].items():
        _, y = read_task(task, files[task], PROBING.max_rows)
        ours = split(y, min(len(y) - 100, PROBING.train_rows), PROBING.seed)
        assert y.tolist() == labels and ours[0].tolist() == train and ours[1].tolist() == test, task


@pytest.mark.parametrize("name", ["trained", "random"])
def test_sparse_probing_is_saebenchs_task_by_task(probed, name):
    """The same latents for every k (sae-probes' ranking), and scikit-learn's probes on them
    score the same (to a held-out row: 0.01 is one of the smallest task's 99). The dense probe on
    576 raw dimensions is not converged within its 1000 L-BFGS steps at the large C values, so its
    last digits follow the BLAS's summation order: given sae-probes' own activations, ours
    classifies one of those 99 rows differently (measured: 0.687 vs 0.677), so two rows there,
    and one row of each task in the mean over the two tasks (in a SAEBench environment built
    afresh on this 2-core machine, ours 0.808 against 0.803 there, one row of one task, for the
    commit that had passed at 0.005 before)."""
    ours, _, theirs = probed
    o, t = ours[name], theirs[name]
    for task in TASKS:
        mine, ref = o["tasks"][task], t["details"][task]
        for k in PROBING.ks:
            assert mine[f"sae_top_{k}_latents"] == t["latents"][task][str(k)], (task, k)
            for m in METRICS:
                key = f"sae_top_{k}_{m}"
                assert mine[key] == pytest.approx(ref["sae_metrics_by_k"][str(k)][m], abs=0.01), key
        for m in METRICS:
            assert mine[f"llm_{m}"] == pytest.approx(ref[f"llm_{m}"], abs=0.021), (task, m)
    for k in PROBING.ks:
        assert o[f"sae_top_{k}_test_accuracy"] == pytest.approx(
            t["metrics"]["sae"][f"sae_top_{k}_test_accuracy"], abs=0.005
        )
    assert o["llm_test_accuracy"] == pytest.approx(
        t["metrics"]["llm"]["llm_test_accuracy"], abs=0.011
    )


def test_meta_sae_score_is_saebenchs_within_training_noise(probed):
    """Our trainer fits the meta-SAE where SAEBench uses SAELens's: the same data, width, k,
    steps and learning rate; the scores differ by training's spread, not definition (measured for
    the trained and the random SAE: ours 0.333 and 0.323, SAEBench's 0.348 and 0.337 at these 500
    steps; 0.367 and 0.355 against 0.376 and 0.364 at SAEBench's 1500; at 250 steps the gap grows
    to 0.028). Both sides score the trained SAE only: the random one's was within the same gap,
    and the two meta-SAEs were a third of this module's time."""
    _, meta, theirs = probed
    assert meta == pytest.approx(theirs["trained"]["meta"], abs=0.025)
