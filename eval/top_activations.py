"""Per latent, its top activating tokens and a uniform sample of the tokens it fires on, gathered in
one streaming pass with memory fixed by d_sae (not by the number of tokens).

Both are the same operation on tensors: keep each latent's n best entries by some key, merging
every batch into [d_sae, n] buffers with one topk. The key is the activation for the top list, and
an independent uniform random number for the sample (the n smallest of i.i.d. keys are a uniform
sample without replacement: a mergeable reservoir). The top list keeps each context window at most
once, at its strongest token: several tokens of one window would show the same context again and
again, leaving fewer of the latent's contexts on its page and for the explainer of auto-interp.
Quantile examples, which show what a latent does at moderate strength and keep explanations
honest, are drawn from the sample afterwards.
`gather` runs that pass over token windows; `activations_at` re-runs only the windows of chosen
examples to read a latent's activation at every token of their contexts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae.hooks import capture
from sae.layered import LayeredDictionary
from sae.models import SAE


class Best:
    """Each latent's n entries with the largest keys so far: activation values, global token
    indices and keys [d_sae, n]; a key of -inf marks an empty slot. With `window` > 1, entries are
    grouped by window (token // window) and each window keeps only its entry of largest key."""

    def __init__(self, d_sae: int, n: int, window: int = 1) -> None:
        self.values = torch.zeros(d_sae, n)
        self.tokens = torch.full((d_sae, n), -1, dtype=torch.long)
        self.keys = torch.full((d_sae, n), -torch.inf)
        self.window = window

    def merge(self, values: Tensor, tokens: Tensor, keys: Tensor) -> None:
        """Fold in new entries [d_sae, m] with one topk per latent (after dropping the weaker
        entries of a window already held, when one is split between batches)."""
        keys = torch.cat([self.keys, keys], 1)
        values = torch.cat([self.values, values], 1)
        tokens = torch.cat([self.tokens, tokens], 1)
        if self.window > 1:
            keys = keys.masked_fill(_outranked(tokens // self.window, keys), -torch.inf)
        best = keys.topk(self.keys.shape[1], dim=1).indices
        self.keys, self.values, self.tokens = (t.gather(1, best) for t in (keys, values, tokens))

    def entries(self, latent: int) -> tuple[Tensor, Tensor]:
        """(values, tokens) of a latent's filled slots, in key order."""
        filled = self.keys[latent] > -torch.inf
        return self.values[latent][filled], self.tokens[latent][filled]


def _outranked(groups: Tensor, keys: Tensor) -> Tensor:
    """[rows, m] masks: True where an entry's group (in its row) holds an entry of larger key, or
    of an equal key earlier in the row. Two stable sorts, by key and then by group, put each
    group's best entry first."""
    by_key = keys.argsort(dim=1, descending=True, stable=True)
    order = by_key.gather(1, groups.gather(1, by_key).argsort(dim=1, stable=True))
    sorted_groups = groups.gather(1, order)
    repeat = torch.zeros_like(sorted_groups, dtype=torch.bool)
    repeat[:, 1:] = sorted_groups[:, 1:] == sorted_groups[:, :-1]
    return torch.zeros_like(repeat).scatter(1, order, repeat)


class TopActivations:
    """add(z, first_token) per batch of codes [batch, d_sae] (row i is token first_token + i).

    `window`: scored tokens per context window (`ids.shape[1] - 1`), so that the top list holds
    each window at most once; 1 treats every token as its own window."""

    def __init__(
        self, d_sae: int, top: int = 20, sample: int = 200, seed: int = 0, window: int = 1
    ) -> None:
        self.top = Best(d_sae, top, window)
        self.sample = Best(d_sae, sample)
        self.fires = torch.zeros(d_sae, dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def add(self, z: Tensor, first_token: int) -> None:
        values = z.detach().float().cpu().T  # [d_sae, batch]
        silent = values <= 0
        self.fires += (~silent).sum(1)
        tokens = torch.arange(first_token, first_token + values.shape[1]).expand_as(values)
        peaks, peak_tokens = self._window_peaks(values, first_token)
        self.top.merge(peaks, peak_tokens, peaks.masked_fill(peaks <= 0, -torch.inf))
        keys = torch.rand(values.shape, generator=self.generator)
        self.sample.merge(values, tokens, (-keys).masked_fill(silent, -torch.inf))

    def _window_peaks(self, values: Tensor, first_token: int) -> tuple[Tensor, Tensor]:
        """Each window's largest value [d_sae, windows] in a batch of values [d_sae, batch] and
        its token: the top list's candidates, one per window (windows cut by the batch's ends
        padded with silent zeros), so that its merge sorts a few entries per window, not all."""
        window = self.top.window
        lead = first_token % window
        padded = torch.nn.functional.pad(values, (lead, -(lead + values.shape[1]) % window))
        peaks, positions = padded.reshape(len(values), -1, window).max(2)
        starts = torch.arange(first_token - lead, first_token + values.shape[1], window)
        return peaks, starts + positions

    @property
    def n_top(self) -> int:
        """How many top activations are kept per latent."""
        return self.top.keys.shape[1]

    def top_examples(self, latent: int) -> tuple[Tensor, Tensor]:
        """(values, tokens) of the latent's top activations, largest first, one per window."""
        return self.top.entries(latent)

    def shown_tokens(self, latent: int, top: int | None = None) -> list[int]:
        """The tokens whose contexts show a latent: its (first `top`) top and quantile examples."""
        tokens = self.top_examples(latent)[1][:top].tolist()
        for _, quantile_tokens in self.quantile_examples(latent):
            tokens += quantile_tokens.tolist()
        return tokens

    def quantile_examples(
        self, latent: int, bins: int = 4, per_bin: int = 3
    ) -> list[tuple[Tensor, Tensor]]:
        """The uniform sample split into `bins` activation quantiles (low to high), up to
        `per_bin` (values, tokens) spread evenly over each."""
        values, tokens = self.sample.entries(latent)
        order = values.argsort()
        values, tokens = values[order], tokens[order]
        out = []
        for chunk in torch.arange(len(values)).tensor_split(bins):
            picks = torch.linspace(0, len(chunk) - 1, min(per_bin, len(chunk))).long()
            out.append((values[chunk[picks]], tokens[chunk[picks]]))
        return out


def token_context(
    ids: Tensor, token: int, before: int = 16, after: int = 4
) -> tuple[list[int], int]:
    """The token ids around scored token number `token` (tokens numbered in scoring order:
    positions 1.. of each window of ids [n_windows, seq]), BOS left out, and that token's index
    in them."""
    window, position = divmod(token, ids.shape[1] - 1)
    position += 1
    start = max(1, position - before)
    return ids[window, start : position + after + 1].tolist(), position - start


def context_activations(
    ids: Tensor, token: int, window_acts: dict[int, list[float]]
) -> tuple[list[int], list[float], int]:
    """token_context, with a latent's activation at each of its tokens read from its
    per-window activations (as `activations_at` returns them)."""
    context, hit = token_context(ids, token)
    window, offset = divmod(token, ids.shape[1] - 1)
    first = offset - hit  # scored index of the context's first token
    return context, window_acts[window][first : first + len(context)], hit


# -- from a running model ------------------------------------------------------------------
Dictionary = SAE | LayeredDictionary
"""One SAE or transcoder, or a dictionary over several hookpoints (a CLT's latents are numbered
layer by layer: layer i's latent j is i * d_sae + j; a crosscoder's as its one encoder's)."""


def n_latents(d: Dictionary) -> int:
    return d.cfg.total_latents if isinstance(d, LayeredDictionary) else d.cfg.d_sae


def input_hooks(d: Dictionary) -> list[str]:
    return list(d.cfg.hook_names) if isinstance(d, LayeredDictionary) else [d.cfg.hook_name]


@torch.no_grad()
def encode_windows(lm: nn.Module, d: Dictionary, windows: Tensor) -> Tensor:
    """Codes [tokens, latents] of positions 1.. of each window. The forward pass stops at the
    deepest input hook: a layer-6 SAE's codes need 7 of SmolLM2's 30 blocks and no unembedding."""
    hooks = input_hooks(d)
    acts = capture(lm, hooks, input_ids=windows.to(next(d.parameters()).device))
    return d.encode(torch.cat([acts[h][:, 1:].float() for h in hooks], -1).flatten(0, 1))


@torch.no_grad()
def gather(lm: nn.Module, d: Dictionary, ids: Tensor, top: int, batch: int = 8) -> TopActivations:
    """One pass: each latent's top activations and a uniform sample of its activations."""
    examples = TopActivations(n_latents(d), top=top, window=ids.shape[1] - 1)
    n = 0
    for windows in ids.split(batch):
        z = encode_windows(lm, d, windows)
        examples.add(z, n)
        n += len(z)
    return examples


@torch.no_grad()
def activations_at(
    lm, d: Dictionary, ids: Tensor, tokens: list[int], latents: list[int]
) -> dict[int, dict]:
    """{latent: {window: [activation per position 1..]}} for the windows holding `tokens`."""
    per_window = ids.shape[1] - 1
    windows = sorted({t // per_window for t in tokens})
    out: dict[int, dict] = {latent: {} for latent in latents}
    for start in range(0, len(windows), 8):
        chunk = windows[start : start + 8]
        z = encode_windows(lm, d, ids[chunk]).view(len(chunk), per_window, -1)
        for i, w in enumerate(chunk):
            for latent in latents:
                out[latent][w] = z[i, :, latent].tolist()
    return out
