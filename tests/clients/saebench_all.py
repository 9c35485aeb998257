"""Run inside SAEBench's own virtualenv (`make clients-venv`), never imported by the suite:
saebench_check.py (first-letter absorption) and then saeprobes_check.py (sparse probing and the
meta-SAE score) in one process, which imports SAEBench, SAELens and TransformerLens once (about
15 s of the suite's two cores).

Usage: python saebench_all.py MODEL_DIR WORDS_JSON SEED ABSORPTION_OUT TASKS META_STEPS PROBING_OUT
SAE_DIR...
"""

import sys
import time

import saebench_check
import saeprobes_check


def main(model_dir: str, words_json: str, seed: str, absorption_out: str, tasks: str,
         meta_steps: str, probing_out: str, *sae_dirs: str) -> None:  # fmt: skip
    start = time.perf_counter()
    saebench_check.main(model_dir, words_json, seed, absorption_out, *sae_dirs)
    # stage times on stderr, which the test shows when this process fails or runs too long
    print(f"saebench_all: absorption done at {time.perf_counter() - start:.0f} s", file=sys.stderr)
    saeprobes_check.main(model_dir, tasks, meta_steps, probing_out, *sae_dirs)
    print(f"saebench_all: probing and meta-SAE done at {time.perf_counter() - start:.0f} s",
          file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:])
