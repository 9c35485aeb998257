"""Which LM on which text is declared once (train.config.TextOptions): harvest, streaming
training, eval and the dashboard take the same flags with the same meaning, and each reaches
the stage that reads the text (eval's --text-column, streaming training's --split and
--context-size)."""

import json
from dataclasses import fields

import pytest

import sae
from eval.dashboard import DashboardConfig
from eval.report import EvalConfig, evaluate
from sae.cli import field_docs, main
from train.config import HarvestConfig, TextOptions, TrainConfig
from train.data import load_documents

SHARED = [f.name for f in fields(TextOptions)]


def test_every_stage_declares_the_text_options_once():
    docs = field_docs(TextOptions)
    for cls in (HarvestConfig, TrainConfig, EvalConfig, DashboardConfig):
        assert issubclass(cls, TextOptions)
        own = field_docs(cls)
        for name in ("dataset", "text_column"):  # the same meaning everywhere
            assert own[name] == docs[name], (cls.__name__, name)


def test_eval_reads_the_text_column(trained_sae, tmp_path):
    rows = tmp_path / "plays.jsonl"
    rows.write_text(
        "\n".join(json.dumps({"body": t}) for t in load_documents("shakespeare", "test"))
    )
    settings = dict(split="train", tokens=126, context_size=64, concepts=False, absorption=False)
    report = evaluate(trained_sae, dataset=str(rows), text_column="body", **settings)
    assert report["meta"]["tokens"] == 126 and report["ce_clean"] > 0
    with pytest.raises(KeyError, match="no column 'text'"):
        evaluate(trained_sae, dataset=str(rows), **settings)


def test_streaming_training_takes_the_split_and_context_size(tmp_path):
    main(["train", "--stream", "--model", "smollm2-135m", "--split", "test", "--context-size", "32",
          "--hook", "blocks.2.hook_resid_post", "--d-sae", "128", "--total-tokens", "1024",
          "--batch-size", "256", "--device", "cpu", "--out", str(tmp_path / "run")])  # fmt: skip
    trained = sae.load(tmp_path / "run" / "topk-k32-x128-blocks_2_hook_resid_post")
    assert trained.cfg.context_size == 32 and trained.cfg.model_name == "smollm2-135m"
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert (state["data"]["split"], state["data"]["context_size"]) == ("test", 32)
