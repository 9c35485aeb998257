"""Run inside SAEBench's own virtualenv (`make clients-venv`), never imported by the suite: SAEBench
0.6's sparse probing (`sparse_probing_sae_probes`, which runs the sae-probes package) and its
meta-SAE score (`meta_structure`), both unchanged, on SAELens folders that `sae export` wrote.

sae-probes loads a HookedTransformer only to fill its activation cache; the cache is filled first
by sae-probes' own `generate_single_dataset_activations` with saebench_check's transformers
adapter as the model (same tokenizer, BOS first, same padding, the residual stream to 8e-7), so
TransformerLens never runs the whole model and its unembedding. Writes OUT/<name>.json per SAE:
SAEBench's sparse-probing output, sae-probes' chosen latents per task and k, and (for the first
SAE only: its 500 steps are most of this script's time) the meta score; and OUT/splits.json:
every task's labels and train/test rows as sae-probes draws them.

Usage: python saeprobes_check.py MODEL_DIR TASKS(comma-separated) META_STEPS OUT SAE_DIR...
"""

import json
import sys
from pathlib import Path

import torch
from sae_bench.evals.meta_structure.eval_config import MetaStructureEvalConfig
from sae_bench.evals.meta_structure.main import run_eval_single_sae
from sae_bench.evals.sparse_probing_sae_probes import main as probing
from sae_bench.evals.sparse_probing_sae_probes.eval_config import SparseProbingSaeProbesEvalConfig
from sae_lens import SAE
from sae_probes.constants import DATA_PATH
from sae_probes.generate_model_activations import generate_single_dataset_activations
from sae_probes.utils_data import get_dataset_sizes, get_train_test_indices, get_yvals
from saebench_check import Transformer

KS = [1, 2, 5, 10, 20]


def splits(seed: int = 42) -> dict:
    """Per task: labels (first 5000 rows), training rows, held-out rows, as run_sae_eval gets them."""
    out = {}
    for task, size in get_dataset_sizes().items():
        y = get_yvals(task)[:5000]
        n_train = min(size - 100, 1024)
        train, test = get_train_test_indices(y, n_train, len(y) - n_train - 1, 0.5, seed)
        out[task] = [y.tolist(), train.tolist(), test.tolist()]
    return out


def main(model_dir: str, tasks: str, meta_steps: str, out: str, *sae_dirs: str) -> None:
    root, names = Path(out), tasks.split(",")
    (root / "splits.json").write_text(json.dumps(splits()))
    model = Transformer(model_dir)
    cache = root / "model_cache"
    for sae_dir in sae_dirs:
        name = Path(sae_dir).name
        sae = SAE.load_from_disk(sae_dir, device="cpu")
        hook = sae.cfg.metadata.hook_name
        for task in names:
            generate_single_dataset_activations(
                model, "smollm2", DATA_PATH / "cleaned_data" / f"{task}.csv.zst", [hook], cache,
                device="cpu",
            )  # fmt: skip
        config = SparseProbingSaeProbesEvalConfig(
            model_name="smollm2", dataset_names=names, ks=KS, results_path=str(root / "results"),
            model_cache_path=str(cache),
        )  # fmt: skip
        output = next(iter(probing.run_eval(config, [(name, sae)], "cpu", str(root / "eval"),
                                            force_rerun=True).values()))  # fmt: skip
        chosen = {}
        for task in names:
            (path,) = (root / "results").glob(
                f"{name}_*/sae_probes_smollm2/normal_setting/{task}_*_l1.json"
            )
            chosen[task] = {str(e["k"]): e["indices"] for e in json.loads(path.read_text())}
        record = {
            "metrics": output["eval_result_metrics"],
            "details": {d["dataset_name"]: d for d in output["eval_result_details"]},
            "latents": chosen,
        }
        if sae_dir == sae_dirs[0]:
            torch.manual_seed(42)
            # SAEBench's default bf16 autocast is for the GPU: on a CPU without AVX-512 BF16 it is
            # emulated (500 steps ran past 10 minutes on the suite's AVX2 machine); ours is float32.
            meta_cfg = MetaStructureEvalConfig(train_steps=int(meta_steps), autocast=False)
            meta = run_eval_single_sae(name, name, sae, meta_cfg, "cpu").eval_result_metrics
            record["meta"] = meta.meta_structure.decoder_fraction_variance_explained
        (root / f"{name}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:])
