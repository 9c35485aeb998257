"""Sparse probing as SAEBench scores it (its `sparse_probing_sae_probes` eval, which runs the
sae-probes package of Kantamneni et al. 2025, "Are Sparse Autoencoders Useful?"): how well k of an
SAE's latents classify concepts that a probe on the model's own activations can read.

The tasks are sae-probes' binary classification sets (113 in 0.4.2: historical figures' gender,
US states, news topics, sentiment, code languages, ...), read from its data folder; no hub. Each
prompt is run as BOS and its last 1023 tokens (the tokenizer's left truncation), and its last token's
activation at the hookpoint is the example. Per task, with sae-probes' seed: 1024 training rows
(or all but 100) half positive, the rest of the first 5000 held out, half positive. The dense
baseline is an L2 logistic regression on the activations; for the SAE, latents are ranked by the
gap between the classes' means (each latent scaled by its mean non-zero magnitude) and an L1
logistic regression is fit on the top k. Each fit picks C from 10 values on a log scale by the
AUROC on the last 100 training rows, then refits on all of them (scikit-learn, as sae-probes).
Reported: held-out accuracy, AUROC and weighted F1, per task and averaged over tasks, under
SAEBench's key names (llm_test_accuracy, sae_top_{k}_test_accuracy, ...).

The model's part (`probing_tasks`: activations, split, dense probe) is computed once per hookpoint
and shared by every SAE there; `sparse_probing(sae, tasks)` is the SAE's part.
tests/eval/test_saebench_agreement.py runs sae-probes itself on a few tasks and compares.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from eval.probes import encode_rows, last_token_activations
from sae.models import SAE

MASTER = "probing_datasets_MASTER.csv.zst"
METRICS = ("test_accuracy", "test_auc", "test_f1")


@dataclass
class ProbingConfig:
    tasks: list[str] = field(default_factory=list)
    """sae-probes task names (e.g. 117_us_state_FL); empty: all of its binary tasks."""
    ks: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20])
    """Numbers of latents per sparse probe."""
    data: str = ""
    """A folder laid out as sae-probes' `data` (its MASTER list and cleaned_data/); empty: the
    installed sae-probes package's."""
    max_rows: int = 5000
    """Rows read per task (sae-probes' MAX_AMT)."""
    train_rows: int = 1024
    """Training rows per task (fewer where a task has under train_rows + 100)."""
    context_size: int = 1024
    """Tokens per prompt, kept from the end."""
    batch_size: int = 32
    seed: int = 42


@dataclass
class ProbingTask:
    """One task's examples at a hookpoint and the dense probe's scores on them."""

    name: str
    x_train: Tensor
    y_train: np.ndarray
    x_test: Tensor
    y_test: np.ndarray
    llm: dict[str, float]


def data_dir(cfg: ProbingConfig) -> Path:
    """The sae-probes data folder: cfg.data, or the installed package's (found without importing
    it: its code needs TransformerLens and xgboost, which reading its data does not)."""
    if cfg.data:
        path = Path(cfg.data)
    else:
        spec = importlib.util.find_spec("sae_probes")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "sparse probing reads the sae-probes package's tasks: `pip install --no-deps "
                "sae-probes` (44 MB of data; its own dependencies are not needed), or give a "
                "folder laid out as its data/ with --probing-data"
            )
        path = Path(spec.submodule_search_locations[0]) / "data"
    if not (path / MASTER).is_file():
        raise FileNotFoundError(f"{path} has no {MASTER}: not a sae-probes data folder")
    return path


def task_files(path: Path) -> dict[str, Path]:
    """Binary task name (number_tag, as sae-probes names them) -> its CSV, in sae-probes' order."""
    import pandas as pd

    master = pd.read_csv(path / MASTER, compression="zstd")
    saved = master[master["Data type"] == "Binary Classification"]["Dataset save name"]
    return {Path(name).name.split(".")[0]: path / f"{name}.zst" for name in saved}


def read_task(name: str, csv: Path, max_rows: int) -> tuple[list[str], np.ndarray]:
    """A task's first max_rows prompts and 0/1 labels (classes in sorted order, as scikit-learn's
    LabelEncoder numbers them); refuses a task that is not binary."""
    import pandas as pd

    frame = pd.read_csv(csv, compression="zstd")
    missing = {"prompt", "target"} - set(frame.columns)
    if missing:
        raise ValueError(f"probing task {name} ({csv}) has no {sorted(missing)} column")
    classes, y = np.unique(frame["target"].to_numpy(), return_inverse=True)
    if len(classes) != 2:
        raise ValueError(
            f"probing task {name} has {len(classes)} label value(s) {classes.tolist()[:5]}; a "
            "binary task needs exactly two"
        )
    return frame["prompt"].astype(str).tolist()[:max_rows], y[:max_rows]


def split(y: np.ndarray, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """sae-probes' balanced split: n_train rows and all but one of the rest, each half positive
    (rounded up), drawn by numpy's RandomState(seed) in its order."""
    rng = np.random.RandomState(seed)
    n_test = len(y) - n_train - 1
    pos, neg = np.where(y == 1)[0], np.where(y == 0)[0]
    want = {"train": int(np.ceil(n_train / 2)), "test": int(np.ceil(n_test / 2))}
    if want["train"] + want["test"] > len(pos) or n_train + n_test - sum(want.values()) > len(neg):
        raise ValueError(
            f"{len(pos)} positive and {len(neg)} negative rows cannot give {n_train} training and "
            f"{n_test} held-out rows, each half positive"
        )
    train_pos = rng.choice(pos, size=want["train"], replace=False)
    train_neg = rng.choice(neg, size=n_train - want["train"], replace=False)
    test_pos = rng.choice(np.setdiff1d(pos, train_pos), size=want["test"], replace=False)
    test_neg = rng.choice(np.setdiff1d(neg, train_neg), size=n_test - want["test"], replace=False)
    train = rng.permutation(np.concatenate([train_pos, train_neg]))
    test = rng.permutation(np.concatenate([test_pos, test_neg]))
    return train, test


def best_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    l1: bool,
    seed: int,
) -> dict[str, float]:
    """sae-probes' `find_best_reg`: C from logspace(5, -5, 10) by AUROC on the last 100 (at most
    a fifth of the) training rows, refit on all of them in a seeded shuffle, scored held out."""
    from joblib import Parallel, delayed
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    def fitted(c: float, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
        """sae-probes' probe for C = c, fit; unconverged fits at large C are expected, not news."""
        if l1:
            probe = LogisticRegression(
                C=c, l1_ratio=1.0, solver="saga", random_state=seed, max_iter=1000
            )
        else:
            probe = LogisticRegression(C=c, random_state=seed, max_iter=1000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return probe.fit(x, y)

    n = len(x_train)
    fit = n - min(int(0.2 * n), 100)

    def validated(c: float) -> float:
        if len(np.unique(y_train[:fit])) < 2:
            return 0.5
        model = fitted(c, x_train[:fit], y_train[:fit])
        return roc_auc_score(y_train[fit:], model.predict_proba(x_train[fit:])[:, 1])

    cs = np.logspace(5, -5, 10)
    scores = Parallel(n_jobs=-1)(delayed(validated)(c) for c in cs)  # one fit per core at a time
    order = np.random.RandomState(seed).permutation(n)
    model = fitted(cs[int(np.argmax(scores))], x_train[order], y_train[order])
    predicted = model.predict(x_test)
    return {
        "test_accuracy": float(accuracy_score(y_test, predicted)),
        "test_auc": float(roc_auc_score(y_test, model.predict_proba(x_test)[:, 1])),
        "test_f1": float(f1_score(y_test, predicted, average="weighted")),
        "val_auc": float(max(scores)),
    }


def probing_tasks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    hook: str,
    cfg: ProbingConfig,
) -> list[ProbingTask]:
    """Each task's examples at `hook` (only the rows its split uses are run) and its dense probe."""
    for module in ("sklearn", "zstandard"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"sparse probing needs {module}: pip install 'sae-forge[probing]' (scikit-learn "
                "fits the probes as sae-probes does; zstandard reads its task files)"
            )
    files = task_files(data_dir(cfg))
    unknown = [t for t in cfg.tasks if t not in files]
    if unknown:
        raise ValueError(f"unknown probing tasks {unknown}; sae-probes has e.g. {list(files)[:4]}")
    tasks = []
    for name in cfg.tasks or list(files):
        prompts, y = read_task(name, files[name], cfg.max_rows)
        n_train = min(len(y) - 100, cfg.train_rows)
        if n_train < 128:  # sae-probes validates smaller sets otherwise (k-fold); not ported
            raise ValueError(f"probing task {name} has {len(y)} rows; it needs at least 228")
        train, test = split(y, n_train, cfg.seed)
        ids = (tokenizer(prompts[i], add_special_tokens=False).input_ids for i in [*train, *test])
        rows = [[tokenizer.bos_token_id, *row[len(row) - cfg.context_size + 1 :]] for row in ids]
        x = last_token_activations(model, rows, hook, cfg.batch_size)
        x_train, x_test = x[: len(train)], x[len(train) :]
        llm = best_probe(x_train.numpy(), y[train], x_test.numpy(), y[test], False, cfg.seed)
        tasks.append(ProbingTask(name, x_train, y[train], x_test, y[test], llm))
    return tasks


def ranked_latents(z: Tensor, y: np.ndarray) -> Tensor:
    """Latents by |mean on positives - mean on negatives|, each scaled by its mean non-zero
    magnitude first (so a rarely firing, large latent does not win on scale alone)."""
    scale = z.abs().sum(0) / ((z != 0).sum(0) + 1e-6)
    z = z / (scale + 1e-6)
    positive = torch.as_tensor(y == 1)
    gap = z[positive].mean(0) - z[~positive].mean(0)
    return torch.argsort(gap.abs(), descending=True)


def sparse_probing(sae: SAE, tasks: list[ProbingTask], cfg: ProbingConfig) -> dict:
    """The SAE's k-sparse probes on every task, with the dense probe's scores beside them."""
    if not tasks:
        raise ValueError("no probing tasks")
    if tasks[0].x_train.shape[1] != sae.cfg.d_in:
        raise ValueError(
            f"the probing activations have width {tasks[0].x_train.shape[1]}, the SAE d_in "
            f"{sae.cfg.d_in}: probe it at the hookpoint it was trained on ({sae.cfg.hook_name})"
        )
    by_task = {}
    for task in tasks:
        z_train, z_test = (encode_rows(sae, x, 128) for x in (task.x_train, task.x_test))
        ranking = ranked_latents(z_train, task.y_train)
        scores = {f"llm_{m}": task.llm[m] for m in METRICS}
        for k in cfg.ks:
            top = ranking[:k]
            sparse = best_probe(z_train[:, top].numpy(), task.y_train, z_test[:, top].numpy(),
                                task.y_test, True, cfg.seed)  # fmt: skip
            scores |= {f"sae_top_{k}_{m}": sparse[m] for m in METRICS}
            scores[f"sae_top_{k}_latents"] = top.tolist()
        by_task[task.name] = scores
    keys = [f"llm_{m}" for m in METRICS] + [f"sae_top_{k}_{m}" for k in cfg.ks for m in METRICS]
    mean = {key: float(np.mean([s[key] for s in by_task.values()])) for key in keys}
    return {**mean, "ks": list(cfg.ks), "tasks": by_task}
