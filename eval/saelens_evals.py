"""SAELens's `run_evals` on our token windows: what it needs besides an SAE and a model, so that a
cross-check (tests/eval/test_saelens_evals.py) and a benchmark (bench/eval.py) score exactly the
windows `sae eval` scores."""

from __future__ import annotations

import torch


class WindowStore:
    """What run_evals asks of an ActivationsStore (get_batch_tokens, reset_input_dataset,
    context_size, store_batch_size_prompts), serving our windows in order. run_evals resets the
    store between its CE pass and its reconstruction pass, so both see exactly these tokens."""

    def __init__(self, ids: torch.Tensor, batch: int) -> None:
        self.ids, self.next = ids, 0
        self.context_size, self.store_batch_size_prompts = ids.shape[1], batch

    def get_batch_tokens(self, batch_size: int) -> torch.Tensor:
        out = self.ids[self.next : self.next + batch_size]
        if len(out) != batch_size:
            raise ValueError(f"run_evals asked for more windows than the {len(self.ids)} given")
        self.next += batch_size
        return out

    def reset_input_dataset(self) -> None:
        self.next = 0


def run_evals_config(windows: int, batch: int):
    """SAELens's EvalConfig for every metric sae eval also computes, over all `windows`."""
    from sae_lens.evals import EvalConfig

    batches, rest = divmod(windows, batch)
    if rest:
        raise ValueError(f"{windows} windows do not split into run_evals batches of {batch}")
    return EvalConfig(
        batch_size_prompts=batch,
        n_eval_reconstruction_batches=batches,
        n_eval_sparsity_variance_batches=batches,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )
