"""Sparse probing and the meta-SAE score: their parts by hand, `sae eval --probing --meta` on a
task folder laid out as sae-probes' data, and bad input (tests/eval/test_saebench_agreement.py
checks both against SAEBench itself)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import sae
from eval.meta_sae import MetaConfig, meta_sae_score, variance_explained
from eval.sparse_probing import (
    ProbingConfig,
    best_probe,
    data_dir,
    probing_tasks,
    ranked_latents,
    read_task,
    sparse_probing,
    split,
    task_files,
)
from sae.cli import main


def task_folder(root, tasks: dict[str, pd.DataFrame]):
    """A folder laid out as sae-probes' data/: its MASTER list and cleaned_data/NAME.csv.zst."""
    (root / "cleaned_data").mkdir(parents=True)
    master = pd.DataFrame({
        "Dataset Tag": [name.split("_", 1)[1] for name in tasks],
        "Dataset save name": [f"cleaned_data/{name}.csv" for name in tasks],
        "Data type": "Binary Classification",
    })  # fmt: skip
    master.to_csv(root / "probing_datasets_MASTER.csv.zst", compression="zstd", index=False)
    for name, frame in tasks.items():
        frame.to_csv(root / "cleaned_data" / f"{name}.csv.zst", compression="zstd", index=False)
    return root


def numbers_or_words(n: int, seed: int = 0) -> pd.DataFrame:
    """A task the LM reads at once: does the prompt end in a number or in a word?"""
    rng = np.random.RandomState(seed)
    words = ["castle", "river", "sword", "crown", "garden", "stone", "horse", "letter"]
    target = rng.permutation(np.arange(n) % 2)  # exactly balanced: small sets need it
    prompts = [f"The last thing: {rng.randint(10, 999)}" if t else f"The last thing: {rng.choice(words)}"
               for t in target]  # fmt: skip
    return pd.DataFrame({"prompt": prompts, "target": np.where(target, "number", "word")})


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("probing") / "data"
    return task_folder(
        root, {"1_numbers": numbers_or_words(400), "2_more": numbers_or_words(300, 1)}
    )


def test_the_split_is_balanced_disjoint_and_seeded():
    y = np.array([1] * 750 + [0] * 750)
    train, test = split(y, 1024, 42)
    assert len(train) == 1024 and len(test) == 1500 - 1024 - 1
    assert y[train].sum() == 512 and y[test].sum() == int(np.ceil(475 / 2))
    assert not set(train) & set(test)
    again = split(y, 1024, 42)
    assert (again[0] == train).all() and (again[1] == test).all()
    assert not (split(y, 1024, 7)[0] == train).all()
    with pytest.raises(ValueError, match="half positive"):
        split(np.array([1] * 100 + [0] * 1400), 1024, 42)


def test_latents_rank_by_the_gap_between_classes_at_their_own_scale():
    """Latent 1 fires large on one positive (raw gap 30, scaled 0.5); latent 2 fires small on
    both (gap 1); latent 0 never fires."""
    y = np.array([1, 1, 0, 0])
    z = torch.tensor([[0.0, 60.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert ranked_latents(z, y).tolist() == [2, 1, 0]


def test_a_probe_on_a_separating_feature_is_perfect():
    rng = np.random.RandomState(0)
    y = rng.randint(0, 2, 600)
    x = np.stack([y + 0.1 * rng.randn(600), rng.randn(600)], 1).astype(np.float32)
    for l1 in (True, False):
        scores = best_probe(x[:400], y[:400], x[400:], y[400:], l1, 42)
        assert scores["test_accuracy"] == 1.0 and scores["test_auc"] == 1.0
    noise = best_probe(x[:400, 1:], y[:400], x[400:, 1:], y[400:], True, 42)
    assert noise["test_accuracy"] < 0.65


def test_tasks_are_read_with_their_labels_in_sorted_order(toy_data):
    files = task_files(data_dir(ProbingConfig(data=str(toy_data))))
    assert list(files) == ["1_numbers", "2_more"]
    prompts, y = read_task("1_numbers", files["1_numbers"], 5000)
    assert len(prompts) == 400 and set(y) == {0, 1}
    assert all(
        p.split(": ")[1].isdigit() for p, label in zip(prompts, y, strict=True) if label == 0
    )  # "number" < "word"
    assert len(read_task("1_numbers", files["1_numbers"], 100)[0]) == 100


def test_sparse_probing_reads_a_number_from_one_latent(toy_data, smollm2, trained_sae):
    cfg = ProbingConfig(data=str(toy_data), tasks=["1_numbers"], ks=[1, 5])
    tasks = probing_tasks(*smollm2, trained_sae.cfg.hook_name, cfg)
    (task,) = tasks
    assert task.x_train.shape == (300, 576) and task.x_test.shape == (99, 576)
    assert task.llm["test_accuracy"] > 0.95
    report = sparse_probing(trained_sae, tasks, cfg)
    scores = report["tasks"]["1_numbers"]
    assert len(scores["sae_top_1_latents"]) == 1 and len(scores["sae_top_5_latents"]) == 5
    assert scores["sae_top_5_latents"][0] == scores["sae_top_1_latents"][0]
    assert report["sae_top_5_test_accuracy"] > 0.9
    assert report["llm_test_accuracy"] == task.llm["test_accuracy"]
    narrow = sae.create("topk", d_in=64, d_sae=128, k=4, hook_name=trained_sae.cfg.hook_name)
    with pytest.raises(ValueError, match="width 576, the SAE d_in 64"):
        sparse_probing(narrow, tasks, cfg)


def test_bad_tasks_are_named(tmp_path, smollm2):
    one_class = pd.DataFrame({"prompt": ["a", "b", "c"], "target": ["yes"] * 3})
    no_prompt = pd.DataFrame({"text": ["a", "b"], "target": [0, 1]})
    root = task_folder(tmp_path / "data", {"7_same": one_class, "8_columns": no_prompt})
    files = task_files(root)
    with pytest.raises(ValueError, match=r"probing task 7_same has 1 label value\(s\) \['yes'\]"):
        read_task("7_same", files["7_same"], 5000)
    with pytest.raises(ValueError, match=r"8_columns .* has no \['prompt'\] column"):
        read_task("8_columns", files["8_columns"], 5000)
    with pytest.raises(ValueError, match="unknown probing tasks \\['9_none'\\]"):
        probing_tasks(
            *smollm2, "blocks.6.hook_resid_post", ProbingConfig(data=str(root), tasks=["9_none"])
        )
    with pytest.raises(FileNotFoundError, match="not a sae-probes data folder"):
        data_dir(ProbingConfig(data=str(tmp_path)))


def test_the_meta_sae_explains_a_decoder_built_from_few_parts():
    """A decoder whose rows are each the sum of two of 32 parts is explained by a meta-SAE of 128
    latents with k 4; as many random rows are not (measured: 1.000 and 0.499)."""
    g = torch.Generator().manual_seed(0)
    parts = torch.nn.functional.normalize(torch.randn(32, 128, generator=g), dim=1)
    pairs = torch.randint(0, 32, (512, 2), generator=g)
    composed = sae.create("topk", d_in=128, d_sae=512, k=4)
    random = sae.create("topk", d_in=128, d_sae=512, k=4)
    with torch.no_grad():
        composed.W_dec.copy_(parts[pairs[:, 0]] + parts[pairs[:, 1]])
    cfg = MetaConfig(steps=400, batch_size=256, lr=5e-3)
    built, noise = meta_sae_score(composed, cfg), meta_sae_score(random, cfg)
    assert built["meta_d_sae"] == 128 and built["k"] == 4
    assert built["decoder_fraction_variance_explained"] > 0.99
    assert noise["decoder_fraction_variance_explained"] < 0.6


def test_variance_explained_by_hand():
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])

    class Half(torch.nn.Module):
        def forward(self, x):
            return x / 2

    by_hand = 1 - (rows / 2).pow(2).sum() / (rows - rows.mean(0)).pow(2).sum()
    assert variance_explained(Half(), rows) == pytest.approx(float(by_hand))


def test_sae_eval_probing_and_meta_on_the_cli(trained_sae, toy_data, tmp_path, capsys):
    trained_sae.save(tmp_path / "sae")
    out = tmp_path / "report.json"
    main(["eval", str(tmp_path / "sae"), "--tokens", "126", "--context-size", "64",
          "--no-concepts", "--no-absorption", "--probing", "--probing-data", str(toy_data),
          "--probing-tasks", "1_numbers", "2_more", "--meta", "--meta-steps", "100",
          "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    probing = report["probing"]
    assert sorted(probing["tasks"]) == ["1_numbers", "2_more"] and probing["ks"] == [
        1,
        2,
        5,
        10,
        20,
    ]
    assert probing["sae_top_20_test_accuracy"] == pytest.approx(
        np.mean([t["sae_top_20_test_accuracy"] for t in probing["tasks"].values()])
    )
    assert 0 < report["meta_sae"]["decoder_fraction_variance_explained"] < 1
    assert report["meta_sae"]["meta_d_sae"] == trained_sae.cfg.d_sae // 4
    assert f"probing_top_1_accuracy {probing['sae_top_1_test_accuracy']:.4f}" in printed
    assert "meta_sae_fve" in printed
    # the dashboard's overview shows both beside the headline scores
    main(["dashboard", str(tmp_path / "sae"), "--report", str(out), "--out", str(tmp_path / "site"),
          "--latents", "1"])  # fmt: skip
    index = (tmp_path / "site" / "index.html").read_text()
    assert (
        f"<tr><td>probing_top_5_accuracy</td><td>{probing['sae_top_5_test_accuracy']:.4f}</td>"
        in index
    )
    assert "<tr><td>meta_sae_fve</td>" in index
