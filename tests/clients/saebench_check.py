"""Run inside SAEBench's own virtualenv (`make clients-venv`), never imported by the suite: SAEBench
0.6's first-letter absorption eval (its `run_eval`, unchanged) on SAELens folders that `sae export`
wrote. Three things are set from outside: the vocabulary (the word list given, where SAEBench
takes every alphabetic token), where it writes its artifacts (its defaults point inside its
installed package), and what runs the model: transformers, behind the two HookedTransformer
methods the eval calls, run only up to the hooked block. TransformerLens runs every block and
the 49k-wide unembedding for logits the eval never reads: 4 minutes for 500 prompts on two CPU
cores, too slow for the suite; on these prompts its residual stream matches transformers' to
8e-7 relative. The random generators are
seeded before the first SAE; the LM probe is trained once and kept, as SAEBench keeps it for
every SAE of a model and layer, and before each later SAE the generators are put back where they
stood after it was trained, so every SAE sees the draws of a fresh run with that seed. Writes, per SAE, its eval output and the intermediate results the test
compares (tests/eval/test_saebench_agreement.py) to OUT/<name>.json.

Also fits scikit-learn's LogisticRegression, as SAEBench's k-sparse probes do, on OUT/lr_problem.json
when it exists (to OUT/lr_solution.json).

Usage: python saebench_check.py MODEL_DIR WORDS_JSON SEED OUT SAE_DIR...
"""

import json
import random
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from sae_bench.evals.absorption import common, feature_absorption, k_sparse_probing
from sae_bench.evals.absorption import main as absorption
from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
from sae_lens import SAE
from sklearn.linear_model import LogisticRegression
from transformers import AutoModelForCausalLM, AutoTokenizer


class Transformer:
    """`tokenizer`, `to_tokens` and `run_with_cache` (residual-stream hooks) as HookedTransformer
    has them: its tokenizer prepends BOS (TransformerLens reloads it with add_bos_token=True),
    `to_tokens` too, one length per batch (the absorption prompts have one)."""

    def __init__(self, path: str):
        self.tokenizer = AutoTokenizer.from_pretrained(path, add_bos_token=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.cfg = SimpleNamespace(
            model_name=Path(path).name, d_model=self.model.config.hidden_size
        )

    def to_tokens(self, text: str | list[str]) -> torch.Tensor:
        texts = [text] if isinstance(text, str) else text
        bos = self.tokenizer.bos_token_id
        rows = [[bos, *self.tokenizer(t, add_special_tokens=False).input_ids] for t in texts]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("prompts of different lengths in one batch")
        return torch.tensor(rows)

    @torch.no_grad()
    def run_with_cache(self, inputs, names_filter: list[str], stop_at_layer=None):
        """The residual stream after the hooked block, for texts or token ids (as
        HookedTransformer, no attention mask); the blocks above it and the unembedding, whose
        logits the evals never read, are not run."""
        (name,) = names_filter
        layer, kind = name.split(".")[1:]
        assert kind == "hook_resid_post", name
        tokens = inputs if isinstance(inputs, torch.Tensor) else self.to_tokens(inputs)
        cache = {}

        def keep(module, args, output):
            cache[name] = output[0] if isinstance(output, tuple) else output
            raise Reached

        handle = self.model.model.layers[int(layer)].register_forward_hook(keep)
        try:
            self.model.model(tokens)
        except Reached:
            pass
        finally:
            handle.remove()
        return None, cache


class Reached(Exception):
    """Stops the forward pass at the hooked block."""


def remember_generators(train_and_save_probes):
    """Wraps SAEBench's LM-probe training to keep Python's and torch's generator states after it."""

    def train(*args, **kwargs):
        train_and_save_probes(*args, **kwargs)
        AFTER_PROBE.update(python=random.getstate(), torch=torch.get_rng_state())

    return train


def remember_probe(save_probe_and_data):
    """Wraps SAEBench's probe saving to keep the probe's weights as trained, so that nothing
    needs unpickling its probe.pth back."""

    def save(probe, probe_data, probing_path):
        save_probe_and_data(probe, probe_data, probing_path)
        AFTER_PROBE.update(weight=probe.weights.detach().float().tolist(),
                           bias=probe.biases.detach().float().tolist())  # fmt: skip

    return save


AFTER_PROBE: dict = {}


def patched(out: Path, words: list[str]) -> None:
    """SAEBench's vocabulary is `words`, its model `Transformer`; its artifacts go under `out`."""
    absorption.HookedTransformer = SimpleNamespace(
        from_pretrained_no_processing=lambda name, **kwargs: Transformer(name)
    )
    for module in (feature_absorption, common):
        module.get_alpha_tokens = lambda tokenizer: list(words)
    absorption.run_k_sparse_probing_experiment = partial(
        k_sparse_probing.run_k_sparse_probing_experiment,
        experiment_dir=out / "k_sparse_probing", probes_dir=out.parent / "probes",
    )  # fmt: skip
    absorption.run_feature_absortion_experiment = partial(
        feature_absorption.run_feature_absortion_experiment,
        experiment_dir=out / "feature_absorption",
        sparse_probing_experiment_dir=out / "k_sparse_probing", probes_dir=out.parent / "probes",
    )  # fmt: skip


def intermediates(out: Path, layer: int, name: str) -> dict:
    (probes,) = (out.parent / "probes").glob(f"*/layer_{layer}")
    data = np.load(probes / "data.npz")
    metrics = pd.read_parquet(
        out / "k_sparse_probing" / name / f"layer_{layer}_{name}_metrics.parquet"
    )
    words = pd.read_parquet(out / "feature_absorption" / name / f"layer_{layer}_{name}.parquet")
    return {
        "train_prompts": pd.read_csv(probes / "train_df.csv", keep_default_na=False)[
            "prompt"
        ].tolist(),
        "test_prompts": pd.read_csv(probes / "test_df.csv", keep_default_na=False)[
            "prompt"
        ].tolist(),
        "x_test": data["X_test"][:64].tolist(),
        "probe_weight": AFTER_PROBE["weight"],
        "probe_bias": AFTER_PROBE["bias"],
        "probe_f1": dict(zip(metrics["letter"], metrics["f1_probe"].astype(float), strict=True)),
        "k_sparse_f1": {
            row["letter"]: [float(row[f"f1_sparse_sae_{k}"]) for k in range(1, 11)]
            for _, row in metrics.iterrows()
        },  # fmt: skip
        "k_sparse_features": {
            row["letter"]: [int(i) for i in row["sparse_sae_k_10_feats"]]
            for _, row in metrics.iterrows()
        },  # fmt: skip
        "absorption_prompts": words["prompt"].tolist(),
        "absorption_words": words["token"].tolist(),
        "word_fraction": words["absorption_fraction"].astype(float).tolist(),
        "word_full": words["is_full_absorption"].astype(bool).tolist(),
    }


def logistic_regression(out: Path) -> None:
    problem = json.loads((out / "lr_problem.json").read_text())
    fit = LogisticRegression(max_iter=500, class_weight="balanced")
    fit.fit(np.array(problem["x"]), np.array(problem["y"]).astype(np.int64))
    solution = {"weight": fit.coef_[0].tolist(), "bias": float(fit.intercept_[0])}
    (out / "lr_solution.json").write_text(json.dumps(solution))


def main(model_dir: str, words_json: str, seed: str, out: str, *sae_dirs: str) -> None:
    words = json.loads(Path(words_json).read_text())
    if (Path(out) / "lr_problem.json").exists():
        logistic_regression(Path(out))
    common.train_and_save_probes = remember_generators(common.train_and_save_probes)
    common.save_probe_and_data = remember_probe(common.save_probe_and_data)
    for sae_dir in sae_dirs:
        name = Path(sae_dir).name
        work = Path(out) / name
        patched(work, words)
        sae = SAE.load_from_disk(sae_dir, device="cpu")
        layer = int(sae.cfg.metadata.hook_name.split(".")[1])
        # All letters the LM probe passes are scored, however few: the word list is small.
        config = AbsorptionEvalConfig(
            model_name=model_dir, random_seed=int(seed), min_feats_for_eval=1
        )
        (work / "results").mkdir(parents=True, exist_ok=True)
        if "python" in AFTER_PROBE:
            random.setstate(AFTER_PROBE["python"])
            torch.set_rng_state(AFTER_PROBE["torch"])
        else:
            random.seed(int(seed))
            torch.manual_seed(int(seed))
        result = absorption.run_eval(
            config, [(name, sae)], "cpu", str(work / "results"), force_rerun=True
        )
        output = next(iter(result.values()))
        record = {
            "metrics": output["eval_result_metrics"]["mean"],
            "letters": {d["first_letter"]: d for d in output["eval_result_details"]},
            **intermediates(work, layer, f"{name}_custom_sae"),
        }
        (Path(out) / f"{name}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:])
