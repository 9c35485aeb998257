"""Monosemanticity on a real LM with labels read off the text itself, so no extra data is needed.

Concept purity. Every scored token gets concept labels from its text and the text around it (first
letter of the word it starts, capitalised word, speaker name in a `**NAME**` line, stage direction
in `_..._`, line start, newline, punctuation, digits, and the most frequent words). For each latent
that fired often enough we score every concept by AUROC of the latent's activation as a detector
of the concept over all tokens (exact Mann-Whitney statistic, the many zero activations tied), take
the best concept, and measure its precision among the latent's top activations. A latent is pure
when that precision reaches the threshold. AUROC alone rewards broad detectors and precision alone
rewards lucky tails; the pair says both what a latent detects and how cleanly.

First-letter absorption follows SAEBench (Chanin et al. 2024, with Till's absorption fraction):
single-token words in an in-context spelling prompt ("tape has the first letter: T" ...), a
linear probe per letter on the LM activation at the word, an L1 probe on the SAE latents to rank
candidate latents, k-sparse probes (k = 1..max_k) whose F1 jumps pick the letter's main latents,
then for every word the probe gets right: the share of the probe projection carried by other
latents aligned with the probe while the main latents fall short (absorption fraction), and
whether a single such latent takes over while the main ones are silent (full absorption).
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from dataclasses import dataclass
from itertools import chain, islice

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from sae.models import SAE
from train.harvest import capture

LETTERS = string.ascii_lowercase
SPEAKER = re.compile(r"\*\*([^*\n]+)\*\*")
# `_..._` emphasis as markdown reads it: the opening `_` is followed, the closing one preceded, by a
# non-space. Stage directions span lines (long entrances), and the flanking rule keeps a closing
# `_` from opening a false span when a window starts inside a direction.
STAGE = re.compile(r"(?<![A-Za-z0-9])_(?!\s)([^_]+)(?<!\s)_(?![A-Za-z0-9])")
WORD = re.compile(r"[^\W\d_]+")


# -- concept labels from text ----------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def token_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Each vocabulary id decoded alone; special tokens decode to "" (they carry no text).
    Cached per tokenizer: labels, absorption, dashboards and auto-interp all read it."""
    special = set(tokenizer.all_special_ids)
    return ["" if i in special else tokenizer.decode([i]) for i in range(len(tokenizer))]


def frequent_words(ids: Tensor, strings: list[str], n: int) -> list[str]:
    """The n most frequent whole-word tokens (lower-cased) among `ids`."""
    counts = Counter(
        w for i in ids.flatten().tolist() if (w := strings[i].strip().lower()).isalpha()
    )
    return [w for w, _ in counts.most_common(n)]


def concept_names(words: list[str]) -> list[str]:
    return [
        *(f"first_letter_{c}" for c in LETTERS),
        "capitalised",
        "speaker_name",
        "stage_direction",
        "line_start",
        "newline",
        "punctuation",
        "digit",
        *(f"word_{w}" for w in words),
    ]


def window_labels(ids: list[int], strings: list[str], words: list[str]) -> Tensor:
    """Concept labels [len(ids) - 1, n_concepts] for positions 1.. of one window (BOS first)."""
    pieces = [strings[i] for i in ids]
    text = "".join(pieces)
    starts = [0]
    for p in pieces:
        starts.append(starts[-1] + len(p))
    inside = torch.zeros(2, len(text) + 1, dtype=torch.bool)
    for row, pattern in enumerate((SPEAKER, STAGE)):
        for m in pattern.finditer(text):
            inside[row, m.start(1) : m.end(1)] = True
    word_index = {w: i for i, w in enumerate(words)}
    labels = torch.zeros(len(ids) - 1, 33 + len(words), dtype=torch.bool)
    for t in range(1, len(ids)):
        piece, begin, end = pieces[t], starts[t], starts[t + 1]
        row = labels[t - 1]
        body = piece.lstrip()
        first = begin + len(piece) - len(body)  # index of the first non-space character
        word_start = bool(body) and body[0].isalpha() and not text[first - 1 : first].isalpha()
        if word_start:
            if (c := body[0].lower()) in LETTERS:
                row[LETTERS.index(c)] = True
            word = WORD.match(text, first).group()  # the whole word: " H" + "otspur" is capitalised
            row[26] = word[0].isupper() and word[1:].islower()
            if (w := body.lower()) in word_index:
                row[33 + word_index[w]] = True
        row[27] = bool(inside[0, begin:end].any())
        row[28] = bool(inside[1, begin:end].any())
        line_begin = text.rfind("\n", 0, first) + 1
        row[29] = bool(body) and t > 1 and text[line_begin:first].strip() == ""
        row[30] = "\n" in piece
        row[31] = bool(piece.strip()) and all(c in string.punctuation for c in piece.strip())
        row[32] = any(c.isdigit() for c in piece)
    return labels


def concept_labels(
    windows: Tensor, tokenizer: PreTrainedTokenizerBase, n_words: int = 12
) -> tuple[list[str], Tensor]:
    """Concept names and labels [n_windows * (seq - 1), n_concepts] for positions 1.. of each
    window, in the row order the activations are scored in."""
    strings = token_strings(tokenizer)
    words = frequent_words(windows[:, 1:], strings, n_words)
    rows = [window_labels(w.tolist(), strings, words) for w in windows]
    return concept_names(words), torch.cat(rows)


# -- purity -------------------------------------------------------------------------------------
class SparseCodes:
    """SAE codes of many tokens kept as (token, latent, value) triplets: the scores below need
    every activation, and storing only the non-zero ones keeps memory at tokens x L0."""

    def __init__(self, d_sae: int) -> None:
        self.d_sae, self.n = d_sae, 0
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []

    @torch.no_grad()
    def add(self, z: Tensor) -> None:
        z = z.reshape(-1, self.d_sae)
        rows, latents = z.nonzero(as_tuple=True)
        self.parts.append(
            ((rows + self.n).int().cpu(), latents.int().cpu(), z[rows, latents].float().cpu())
        )
        self.n += len(z)

    def sorted(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Triplets sorted by latent, then by value, and each latent's segment start."""
        rows, latents, values = (torch.cat(p) for p in zip(*self.parts, strict=True))
        order = values.argsort(stable=True)
        order = order[latents[order].argsort(stable=True)]
        rows, latents, values = rows[order], latents[order], values[order]
        counts = torch.bincount(latents, minlength=self.d_sae)
        return rows.long(), latents.long(), values, counts.cumsum(0) - counts


@dataclass
class PurityResult:
    concept: Tensor  # best concept per latent (-1 where not scored)
    auroc: Tensor  # that concept's AUROC (nan where not scored)
    precision: Tensor  # that concept's share of the latent's top activations (nan: not scored)


def mid_ranks(rank: Tensor, latents: Tensor, values: Tensor) -> Tensor:
    """Each run of equal values within a latent (sorted) gets the run's mean rank, as the zeros
    do: tied activations (common in bf16 codes) rank neither above nor below each other."""
    if not len(rank):
        return rank
    starts = torch.ones(len(rank), dtype=torch.bool)
    starts[1:] = (latents[1:] != latents[:-1]) | (values[1:] != values[:-1])
    run = starts.cumsum(0) - 1
    total = torch.zeros(int(run[-1]) + 1, dtype=rank.dtype).index_add_(0, run, rank)
    return (total / torch.bincount(run).to(rank.dtype))[run]


@torch.no_grad()
def latent_purity(
    codes: SparseCodes,
    labels: Tensor,
    top: int = 50,
    min_fires: int = 10,
    min_positives: int = 10,
    chunk: int = 1 << 18,
) -> PurityResult:
    """Best concept by AUROC for every latent that fired at least `min_fires` times, and its
    precision among the latent's `top` largest activations (see module doc)."""
    n, d_sae = codes.n, codes.d_sae
    if len(labels) != n:
        raise ValueError(f"{len(labels)} label rows for {n} coded tokens")
    rows, latents, values, seg_start = codes.sorted()
    nnz = torch.bincount(latents, minlength=d_sae)
    zeros = (n - nnz).double()
    rank = zeros[latents] + (torch.arange(len(rows)) - seg_start[latents]) + 1  # 1-based
    rank = mid_ranks(rank, latents, values)
    positives = labels.sum(0).double()  # [C]
    pos_rank = torch.zeros(d_sae, labels.shape[1], dtype=torch.double)
    pos_nonzero = torch.zeros_like(pos_rank)
    for i in range(0, len(rows), chunk):
        y = labels[rows[i : i + chunk]].double()
        pos_rank.index_add_(0, latents[i : i + chunk], rank[i : i + chunk, None] * y)
        pos_nonzero.index_add_(0, latents[i : i + chunk], y)
    pos_rank += (positives - pos_nonzero) * (zeros[:, None] + 1) / 2  # tied zeros: mid-rank
    auroc = (pos_rank - positives * (positives + 1) / 2) / (positives * (n - positives))
    usable = (positives >= min_positives) & (positives < n)
    auroc[:, ~usable] = float("nan")
    best_auroc, best = auroc.nan_to_num(-1.0).max(-1)

    from_end = (seg_start + nnz)[latents] - 1 - torch.arange(len(rows))
    in_top = from_end < top
    hits = labels[rows[in_top], best[latents[in_top]]].double()
    shown = torch.zeros(d_sae, dtype=torch.double).index_add_(0, latents[in_top], hits)
    precision = shown / nnz.clamp(max=top).clamp_min(1)

    scored = (nnz >= min_fires) & (best_auroc >= 0)
    nan = torch.tensor(float("nan"), dtype=torch.double)
    return PurityResult(
        torch.where(scored, best, -1),
        torch.where(scored, best_auroc, nan),
        torch.where(scored, precision, nan),
    )


def purity_report(result: PurityResult, names: list[str], threshold: float = 0.8) -> dict:
    """Distribution over the scored latents, the share above the purity threshold, and per-latent
    values (null where a latent was not scored) for dashboards."""
    scored = result.concept >= 0
    precision, auroc = result.precision[scored], result.auroc[scored]
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.double)

    def quantiles(v: Tensor) -> dict[str, float]:
        return {
            f"p{round(float(q) * 100)}": float(x) for q, x in zip(qs, v.quantile(qs), strict=True)
        }

    pure = scored & (result.precision >= threshold)
    best = Counter(names[i] for i in result.concept[pure].tolist())
    return {
        "latents_scored": int(scored.sum()),
        "purity_threshold": threshold,
        "pure_fraction": float(pure.sum() / scored.sum().clamp_min(1)),
        "precision_mean": float(precision.mean()) if len(precision) else None,
        "auroc_mean": float(auroc.mean()) if len(auroc) else None,
        "precision_quantiles": quantiles(precision) if len(precision) else {},
        "auroc_quantiles": quantiles(auroc) if len(auroc) else {},
        "precision_histogram": torch.histc(precision.float(), 10, 0, 1).long().tolist(),
        "pure_by_concept": dict(best.most_common()),
        "latent_concept": [names[c] if c >= 0 else None for c in result.concept.tolist()],
        "latent_auroc": [None if x != x else round(x, 4) for x in result.auroc.tolist()],
        "latent_precision": [None if x != x else round(x, 4) for x in result.precision.tolist()],
    }


# -- first-letter absorption -------------------------------------------------------------------
@dataclass
class AbsorptionConfig:
    """SAEBench's settings, named as there."""

    words: int = 3000
    """Single-token words to spell (those of the evaluated text first), split 4:1 into
    probe-training and scored words."""
    icl_examples: int = 4
    """Solved examples in each spelling prompt."""
    max_k: int = 10
    """Largest k of the k-sparse latent probes."""
    f1_jump: float = 0.03
    """A latent joins a letter's main latents while adding it raises the probe's F1 this much."""
    min_probe_f1: float = 0.6
    """Letters whose LM probe scores below this F1 on held-out words are left out."""
    min_words: int = 5
    """Letters with fewer held-out words than this are left out."""
    absorber_cos: float = 0.1
    """An absorbing latent's decoder row has at least this cosine with the probe (fraction)."""
    full_absorber_cos: float = 0.025
    """The same, for full absorption by the top latent."""
    projection_share: float = 0.4
    """Absorbers must carry at least this share of the probe projection."""
    max_absorbers: int = 3
    """Latents that may share the absorption of one word."""
    batch_size: int = 64
    seed: int = 0


def spelling_vocab(ids: Tensor, strings: list[str], n: int) -> list[int]:
    """n single-token words (a space and 2+ letters): those of the text by frequency, then the
    rest of the tokenizer's vocabulary in id order (byte-pair merges come roughly by frequency).
    The probes need thousands of words; a short text alone has too few."""
    is_word = [bool(re.fullmatch(r" [A-Za-z]{2,}", s)) for s in strings]
    in_text = [i for i, _ in Counter(ids.flatten().tolist()).most_common() if is_word[i]]
    seen = set(in_text)
    rest = (i for i, w in enumerate(is_word) if w and i not in seen)
    return list(islice(chain(in_text, rest), n))


def spelling_prompts(
    tokenizer: PreTrainedTokenizerBase, words: list[int], cfg: AbsorptionConfig
) -> tuple[Tensor, int]:
    """Token ids [n_words, seq] of "<bos>{w} has the first letter: {W}\\n ... {word} has the first
    letter:", every prompt the same length, and the position of the word being spelled."""
    strings = token_strings(tokenizer)
    suffix = tokenizer(" has the first letter:", add_special_tokens=False).input_ids
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    letter = {c: tokenizer(" " + c.upper(), add_special_tokens=False).input_ids for c in LETTERS}
    g = torch.Generator().manual_seed(cfg.seed)
    rows = []
    for w in words:
        examples = [
            words[int(j)] for j in torch.randperm(len(words), generator=g)[: cfg.icl_examples + 1]
        ]
        examples = [e for e in examples if e != w][: cfg.icl_examples]
        ids = [tokenizer.bos_token_id]
        for e in examples:
            ids += [e, *suffix, *letter[strings[e][1].lower()], *newline]
        rows.append([*ids, w, *suffix])
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError("spelling prompts differ in length: letters must be single tokens")
    return torch.tensor(rows), len(rows[0]) - len(suffix) - 1


def fit_probes(
    x: Tensor, y: Tensor, l1: float = 0.0, l2: float = 1e-2, steps: int = 300
) -> tuple[Tensor, Tensor]:
    """Class-balanced logistic regressions, one per column of y [n, P] (or one per leading batch
    entry of x [P, n, f] with y [n, P]), on standardized inputs; returns weights [P, f] and biases
    [P] in the units of x. Full-batch Adam: small problems, and L1 needs no smooth solver."""
    batched = x.dim() == 3
    xs = x if batched else x[None]
    mean, std = xs.mean(1, keepdim=True), xs.std(1, keepdim=True).clamp_min(1e-6)
    xs = (xs - mean) / std
    p = y.shape[1]
    w = torch.zeros(p, xs.shape[-1], requires_grad=True)
    b = torch.zeros(p, requires_grad=True)
    pos = y.sum(0).clamp_min(1)
    pos_weight = (len(y) - pos) / pos
    opt = torch.optim.Adam([w, b], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            logits = (torch.einsum("pnf,pf->np", xs, w) if batched else xs[0] @ w.T) + b
            loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
            loss = loss + l1 * w.abs().sum(-1).mean() + l2 * w.pow(2).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    w, b = w.detach(), b.detach()
    w_units = w / std.squeeze(1)
    return w_units, b - (w_units * mean.squeeze(1)).sum(-1)


def f1(pred: Tensor, y: Tensor) -> Tensor:
    """F1 per column of boolean predictions and labels [n, P]."""
    tp = (pred & y).sum(0).double()
    return 2 * tp / (pred.sum(0) + y.sum(0)).double().clamp_min(1)


def main_latents(
    z_train: Tensor, z_test: Tensor, y_train: Tensor, y_test: Tensor, cfg: AbsorptionConfig
) -> list[list[int]]:
    """Per letter, the latents of the k-sparse probe at which F1 stops jumping by `f1_jump`.

    Candidates are ranked by an L1 probe on all latents; the probes for every k and letter are fit
    at once, the k-probe seeing its letter's first k candidates (the others zeroed)."""
    w_units, _ = fit_probes(z_train, y_train.float(), l1=0.01)
    # Rank by the weights on standardized latents, the ones the L1 penalty weighed: in raw units a
    # latent that fires rarely and weakly (tiny std) gets a huge weight for a tiny effect.
    ranking = w_units * z_train.std(0)
    candidates = ranking.topk(cfg.max_k, dim=-1).indices  # [letters, max_k]
    first_k = torch.arange(cfg.max_k)[None] < torch.arange(1, cfg.max_k + 1)[:, None]  # [k, max_k]

    def inputs(z: Tensor) -> Tensor:  # [max_k * letters, n, max_k]
        chosen = z[:, candidates].permute(1, 0, 2)  # [letters, n, max_k]
        return (chosen[None] * first_k[:, None, None]).flatten(0, 1)

    labels = y_train.float().repeat(1, cfg.max_k)  # column k * letters + letter
    w, b = fit_probes(inputs(z_train), labels)
    logits = torch.einsum("pnf,pf->np", inputs(z_test), w) + b
    scores = f1(logits > 0, y_test.repeat(1, cfg.max_k)).view(cfg.max_k, -1)  # [k, letters]
    result = []
    for letter in range(len(candidates)):
        best, k_main = -1.0, 0
        for k in range(cfg.max_k):
            if scores[k, letter] <= best + cfg.f1_jump:
                break
            best, k_main = float(scores[k, letter]), k + 1
        result.append(candidates[letter, :k_main].tolist())
    return result


def word_absorption(
    x_proj: Tensor, z: Tensor, cos: Tensor, main: list[int], cfg: AbsorptionConfig
) -> tuple[Tensor, Tensor]:
    """SAEBench's absorption fraction and full-absorption flag for each word.

    x_proj [n]: the LM activation's projection on the unit probe direction; z [n, d_sae]: codes;
    cos [d_sae]: decoder rows' cosine with the probe; main: the letter's main latents."""
    proj = z * cos  # each latent's contribution to the probe projection
    is_main = torch.zeros(len(cos), dtype=torch.bool)
    is_main[main] = True
    main_proj = proj[:, is_main].sum(-1)
    candidates = (~is_main & (cos >= cfg.absorber_cos))[None] & (proj > 0)
    absorbed = (
        torch.where(candidates, proj, 0.0).topk(min(cfg.max_absorbers, len(cos)), -1).values.sum(-1)
    )
    fraction = absorbed.clamp(max=(x_proj - main_proj).clamp_min(0))
    fraction = (fraction / (fraction + main_proj.clamp_min(0))).nan_to_num(0.0).clamp(0, 1)
    fraction = torch.where(main_proj <= 0, 1.0, fraction)
    none = (main_proj >= x_proj) | (absorbed / x_proj < cfg.projection_share) | (x_proj <= 0)
    fraction = torch.where(none, 0.0, fraction)

    top_proj, top = proj.max(-1)
    full = (
        (z[:, is_main] < 1e-8).all(-1)
        & (cos[top] >= cfg.full_absorber_cos)
        & (x_proj >= 0)
        & (top_proj / x_proj >= cfg.projection_share)
    )
    return fraction, full


@torch.no_grad()
def first_letter_absorption(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sae: SAE,
    text_ids: Tensor,
    cfg: AbsorptionConfig | None = None,
) -> dict:
    """SAEBench's first-letter absorption of `sae` (see module doc) on words from `text_ids`."""
    cfg = cfg or AbsorptionConfig()
    strings = token_strings(tokenizer)
    words = spelling_vocab(text_ids, strings, cfg.words)
    prompts, position = spelling_prompts(tokenizer, words, cfg)
    device = next(model.parameters()).device
    hook = sae.cfg.hook_name
    x = torch.cat(
        [
            capture(model, [hook], input_ids=batch.to(device))[hook][:, position].float().cpu()
            for batch in prompts.split(cfg.batch_size)
        ]
    )
    z = torch.cat([sae.encode(b.to(sae.W_enc.device)).float().cpu() for b in x.split(1024)])
    letters = torch.tensor([LETTERS.index(strings[w][1].lower()) for w in words])
    y = F.one_hot(letters, 26).bool()
    test = (
        torch.randperm(len(words), generator=torch.Generator().manual_seed(cfg.seed))
        < len(words) // 5
    )
    probe_w, probe_b = fit_probes(x[~test], y[~test].float())
    probe_correct = (x[test] @ probe_w.T + probe_b) > 0
    probe_f1 = f1(probe_correct, y[test])
    mains = main_latents(z[~test], z[test], y[~test], y[test], cfg)

    direction = F.normalize(probe_w, dim=-1)
    cos = F.normalize(sae.W_dec.detach().float().cpu(), dim=-1) @ direction.T  # [d_sae, 26]
    per_letter = {}
    for i, c in enumerate(LETTERS):
        n_words = int(y[test][:, i].sum())
        if n_words < cfg.min_words or probe_f1[i] < cfg.min_probe_f1:
            continue
        hit = y[test][:, i] & probe_correct[:, i]  # words of this letter the probe gets right
        fraction, full = word_absorption(
            x[test][hit] @ direction[i], z[test][hit], cos[:, i], mains[i], cfg
        )
        per_letter[c] = {
            "probe_f1": float(probe_f1[i]),
            "words": n_words,
            "probe_true_positives": int(hit.sum()),
            "main_latents": mains[i],
            "absorption_fraction": float(fraction.mean()) if hit.any() else 0.0,
            "full_absorption_rate": float(full.double().mean()) if hit.any() else 0.0,
        }
    if not per_letter:
        raise ValueError(
            f"no letter could be scored: the LM probe reached F1 >= {cfg.min_probe_f1} on "
            f"no letter with >= {cfg.min_words} held-out words ({len(words)} words in the text)"
        )

    def mean(key: str) -> float:
        return sum(v[key] for v in per_letter.values()) / len(per_letter)

    return {
        "mean_absorption_fraction": mean("absorption_fraction"),
        "mean_full_absorption_rate": mean("full_absorption_rate"),
        "mean_main_latents": sum(len(v["main_latents"]) for v in per_letter.values())
        / len(per_letter),
        "probe_f1_mean": float(probe_f1.mean()),
        "words": len(words),
        "letters": per_letter,
    }
