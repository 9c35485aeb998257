"""Monosemanticity on a real LM with labels read off the text itself, so no extra data is needed.

Concept purity. Every scored token gets concept labels from its text and the text around it (first
letter of the word it starts, capitalised word, speaker name in a `**NAME**` line, stage direction
in `_..._`, line start, newline, punctuation, digits, and the most frequent words). For each latent
that fired often enough we score every concept by AUROC of the latent's activation as a detector
of the concept over all tokens (exact Mann-Whitney statistic, the many zero activations tied), take
the best concept, and measure its precision among the latent's top activations. A latent is pure
when that precision reaches the threshold. AUROC alone rewards broad detectors and precision alone
rewards lucky tails; the pair says both what a latent detects and how cleanly.

First-letter absorption is SAEBench's (Chanin et al. 2024, with Till's absorption fraction), the
same computation on the same kind of sample: words from the tokenizer's alphabetic tokens in
in-context spelling prompts ("\\ntape has the first letter: T\\n ... {word} has the first letter:"),
a logistic probe per letter on the LM activation at the word, an L1 probe on the SAE latents to
rank candidates, k-sparse probes (k = 1..max_k) whose F1 jumps pick the letter's main latents,
then for every held-out word the probe gets right: the share of the probe projection carried by
other latents aligned with the probe while the main latents fall short (absorption fraction), and
whether a single such latent takes over while the main ones are silent (full absorption). With
the same words and seed the random draws are SAEBench's too (tests/eval/test_saebench_agreement.py
runs SAEBench itself and compares).
"""

from __future__ import annotations

import functools
import math
import random
import re
import string
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from eval.probes import (
    ProbeFit,
    encode_rows,
    f1,
    last_token_activations,
    logistic_regression,
    train_probes,
)
from sae.models import SAE

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
PROMPT = "{word} has the first letter:"


@dataclass
class AbsorptionConfig:
    """SAEBench's `absorption` settings (its defaults); `words` and `icl_examples` set the cost
    (the sample), never the definition."""

    words: int = 3000
    """Words to spell, drawn at random from SAEBench's vocabulary (every token that is letters,
    with or without one leading space); 0 takes all of it, as SAEBench does."""
    min_words_per_letter: int = 10
    """Each letter gets at least this many words (topped up from the rest of the vocabulary)."""
    icl_examples: int = 10
    """Solved examples before the word in each prompt."""
    max_k: int = 10
    """Largest k of the k-sparse latent probes."""
    f1_jump: float = 0.03
    """A latent joins a letter's main latents while adding it raises the probe's F1 by more."""
    min_probe_f1: float = 0.6
    """Letters whose LM probe scores no more than this F1 on held-out words are left out."""
    min_letters: int = 20
    """Fewer letters passing the LM probe than this leaves absorption undefined (SAEBench stops)."""
    l1: float = 0.01
    """L1 weight of the probe on all latents that ranks candidate main latents."""
    absorber_cos: float = 0.1
    """An absorbing latent's decoder row has at least this cosine with the probe (fraction)."""
    full_absorber_cos: float = 0.025
    """The same, for full absorption by the top latent."""
    projection_share: float = 0.4
    """Absorbers must carry at least this share of the probe projection."""
    max_absorbers: int = 3
    """Latents that may share the absorption of one word."""
    batch_size: int = 64
    seed: int = 42


@functools.lru_cache(maxsize=4)
def alphabetic_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """SAEBench's spelling vocabulary, in id order: every token whose text is ASCII letters, with or
    without one leading space (a sentencepiece "▁" reads as that space)."""
    words = []
    for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        text = tokenizer.convert_tokens_to_string([token])
        if token.startswith("▁") and not text.startswith(" "):
            text = " " + text
        body = text[1:] if text.startswith(" ") else text
        if body and all(c in string.ascii_letters for c in body):
            words.append(text)
    return words


def letter_of(word: str) -> str:
    return word.strip()[0].lower()


def spelling_words(tokenizer: PreTrainedTokenizerBase, cfg: AbsorptionConfig) -> list[str]:
    """`cfg.words` words of the vocabulary at random (all for 0), at least
    `cfg.min_words_per_letter` of every letter, in vocabulary order."""
    vocab = alphabetic_tokens(tokenizer)
    by_letter: dict[str, list[int]] = {c: [] for c in LETTERS}
    for i, w in enumerate(vocab):
        by_letter[letter_of(w)].append(i)
    short = {c: len(ids) for c, ids in by_letter.items() if len(ids) < cfg.min_words_per_letter}
    if short:
        have = ", ".join(f"{c}: {n}" for c, n in short.items())
        raise ValueError(
            f"the tokenizer's vocabulary has too few single-token words for letters {have}; "
            f"first-letter absorption needs {cfg.min_words_per_letter} per letter "
            "(AbsorptionConfig.min_words_per_letter)"
        )
    if not cfg.words or cfg.words >= len(vocab):
        return vocab
    rng = random.Random(cfg.seed)
    chosen = set(rng.sample(range(len(vocab)), cfg.words))
    for ids in by_letter.values():
        missing = cfg.min_words_per_letter - len(chosen.intersection(ids))
        if missing > 0:
            chosen.update(rng.sample([i for i in ids if i not in chosen], missing))
    return [vocab[i] for i in sorted(chosen)]


def spelling_prompt(word: str, examples: list[str], n: int, rng: random.Random) -> str:
    """SAEBench's prompt: a newline, n solved examples drawn from `examples` (never the word
    itself), then the word: "\\n{e} has the first letter: E\\n ... {word} has the first letter:"."""
    for _ in range(1000):
        shown = rng.sample(examples, n)
        if word not in shown:
            break
    else:
        raise ValueError(f"no {n} in-context examples without {word!r} in 1000 draws")
    solved = [PROMPT.format(word=e) + " " + letter_of(e).upper() for e in shown]
    return "\n" + "\n".join([*solved, PROMPT.format(word=word)])


def word_activations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    hook: str,
    batch_size: int,
) -> Tensor:
    """The activation at `hook` on each prompt's word token (the one before the template's tail),
    BOS first. The tail is not run: under the causal mask it cannot change the word's activation."""
    tail = len(tokenizer(PROMPT.format(word=""), add_special_tokens=False).input_ids)
    ids = [tokenizer(p, add_special_tokens=False).input_ids[:-tail] for p in prompts]
    rows = [[tokenizer.bos_token_id, *row] for row in ids]
    return last_token_activations(model, rows, hook, batch_size)


def main_latents(
    z_train: Tensor,
    z_test: Tensor,
    y_train: Tensor,
    y_test: Tensor,
    cfg: AbsorptionConfig,
    generator: torch.Generator,
) -> list[list[int]]:
    """Per letter, SAEBench's main latents: an L1 probe on all latents ranks candidates by weight;
    the k-sparse probe on the first k (k = 1..max_k) is fit to optimum; k grows while the held-out
    F1 rises by more than `f1_jump`."""
    l1_fit = ProbeFit(batch_size=4096, weight_decay=1e-6, l1=cfg.l1)
    ranking, _ = train_probes(z_train, y_train, l1_fit, generator)
    candidates = ranking.topk(cfg.max_k, dim=-1).indices  # [letters, max_k]
    first_k = torch.arange(cfg.max_k)[None] < torch.arange(1, cfg.max_k + 1)[:, None]  # [k, max_k]

    def inputs(z: Tensor) -> Tensor:  # [max_k * letters, n, max_k], problem k * letters + letter
        chosen = z[:, candidates].permute(1, 0, 2)  # [letters, n, max_k]
        return (chosen[None] * first_k[:, None, None]).flatten(0, 1)

    # Zeroed columns get zero weight at the optimum, so one fit with max_k columns is the k-probe.
    w, b = logistic_regression(inputs(z_train), y_train.T.repeat(cfg.max_k, 1))
    logits = torch.einsum("pnf,pf->np", inputs(z_test).double(), w) + b
    scores = f1(logits > 0, y_test.repeat(1, cfg.max_k)).view(cfg.max_k, -1)  # [k, letters]
    result = []
    for letter in range(len(candidates)):
        best, k_main = -math.inf, 0
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


class AbsorptionUndefined(ValueError):
    """Too few letters pass the LM probe for absorption to mean anything (SAEBench stops too)."""


@dataclass
class Spelling:
    """What absorption needs from the LM at one hookpoint, the same for every SAE there: the
    probe-training and held-out words with their activations, the LM's letter probe, and for each
    letter the activations of fresh prompts for the held-out words the probe gets right."""

    hook: str
    words: list[str]
    split: dict[str, list[str]]  # "train" / "test": the words in SAEBench's shuffled order
    x: dict[str, Tensor]  # activations at the words [n, d]
    y: dict[str, Tensor]  # one-hot letters [n, 26]
    probe_w: Tensor  # [26, d]
    probe_b: Tensor  # [26]
    probe_f1: Tensor  # [26] on the held-out words
    hits: list[Tensor]  # per letter [n_hits, d]
    generator: torch.Generator  # where the latent probes continue SAEBench's torch draws


@torch.no_grad()
def spelling(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    hook: str,
    cfg: AbsorptionConfig | None = None,
    words: list[str] | None = None,
) -> Spelling:
    """Prompts, activations and the LM's letter probe, drawn as SAEBench draws them.

    Python's `random` seeded with `cfg.seed` shuffles and splits the words 4:1 and picks each
    prompt's examples (from its own split; for the absorption prompts from all words), in
    SAEBench's order; torch's draws for the probes follow SAEBench's too. So `words` in SAEBench's
    vocabulary order give SAEBench's prompts and probe; without `words`, `spelling_words` draws them."""
    cfg = cfg or AbsorptionConfig()
    words = words if words is not None else spelling_words(tokenizer, cfg)
    rng = random.Random(cfg.seed)
    shuffled = rng.sample(words, len(words))
    cut = int(len(shuffled) * 0.8)
    split = {"train": shuffled[:cut], "test": shuffled[cut:]}

    def activations(prompts: list[str]) -> Tensor:
        return word_activations(model, tokenizer, prompts, hook, cfg.batch_size)

    x, y = {}, {}
    for part, ws in split.items():
        x[part] = activations([spelling_prompt(w, ws, cfg.icl_examples, rng) for w in ws])
        y[part] = F.one_hot(torch.tensor([LETTERS.index(letter_of(w)) for w in ws]), 26).bool()
    missing = [c for i, c in enumerate(LETTERS) if not y["train"][:, i].any()]
    if missing:
        raise ValueError(f"no probe-training word starts with {', '.join(missing)}: use more words")
    g = torch.Generator().manual_seed(cfg.seed)
    probe_w, probe_b = train_probes(x["train"], y["train"], ProbeFit(), g)
    logits = x["test"] @ probe_w.T + probe_b
    hits = []
    for i in range(26):  # every letter, in order, so the prompt draws stay SAEBench's
        hit = (y["test"][:, i] & (logits[:, i] > 0)).tolist()
        found = [w for w, h in zip(split["test"], hit, strict=True) if h]
        prompts = [spelling_prompt(w, words, cfg.icl_examples, rng) for w in found]
        hits.append(activations(prompts) if prompts else x["test"][:0])
    probe_f1 = f1(logits > 0, y["test"])
    return Spelling(hook, words, split, x, y, probe_w, probe_b, probe_f1, hits, g)


@torch.no_grad()
def first_letter_absorption(sae: SAE, data: Spelling, cfg: AbsorptionConfig | None = None) -> dict:
    """SAEBench's first-letter absorption of `sae` on `data` (see module doc and docs/eval.md)."""
    cfg = cfg or AbsorptionConfig()
    if sae.cfg.hook_name != data.hook:
        raise ValueError(
            f"the SAE reads {sae.cfg.hook_name}; the spelling data is from {data.hook}"
        )
    passing = data.probe_f1 > cfg.min_probe_f1
    if int(passing.sum()) < cfg.min_letters:
        scores = ", ".join(
            f"{c} {float(v):.2f}" for c, v in zip(LETTERS, data.probe_f1, strict=True)
        )
        raise AbsorptionUndefined(
            f"the LM probe passes F1 > {cfg.min_probe_f1} on {int(passing.sum())} letters, fewer "
            f"than the {cfg.min_letters} absorption needs (SAEBench's min_feats_for_eval) at "
            f"{data.hook} with {len(data.words)} words: {scores}. Use more words or a later layer."
        )
    z = {part: encode_rows(sae, v) for part, v in data.x.items()}
    generator = torch.Generator().set_state(data.generator.get_state())  # every SAE the same draws
    mains = main_latents(z["train"], z["test"], data.y["train"], data.y["test"], cfg, generator)
    direction = F.normalize(data.probe_w, dim=-1)
    cos = F.normalize(sae.W_dec.detach().float().cpu(), dim=-1) @ direction.T  # [d_sae, 26]
    per_letter, left_out = {}, {}
    for i, c in enumerate(LETTERS):
        xa = data.hits[i]
        if not passing[i] or not len(xa):
            left_out[c] = float(data.probe_f1[i])
            continue
        fraction, full = word_absorption(
            xa @ direction[i], encode_rows(sae, xa), cos[:, i], mains[i], cfg
        )
        per_letter[c] = {
            "probe_f1": float(data.probe_f1[i]),
            "words": int(data.y["test"][:, i].sum()),
            "probe_true_positives": len(xa),
            "main_latents": mains[i],
            "absorption_fraction": float(fraction.mean()),
            "full_absorption_rate": float(full.double().mean()),
            "full_absorptions": int(full.sum()),
        }

    def mean_std(values: list[float]) -> tuple[float, float]:
        v = torch.tensor(values, dtype=torch.double)
        return float(v.mean()), float(v.std()) if len(v) > 1 else 0.0

    rows = per_letter.values()
    fraction_mean, fraction_std = mean_std([r["absorption_fraction"] for r in rows])
    full_mean, full_std = mean_std([r["full_absorption_rate"] for r in rows])
    main_mean, main_std = mean_std([len(r["main_latents"]) for r in rows])
    return {
        "mean_absorption_fraction": fraction_mean,
        "std_absorption_fraction": fraction_std,
        "mean_full_absorption_rate": full_mean,
        "std_full_absorption_rate": full_std,
        "mean_main_latents": main_mean,
        "std_main_latents": main_std,
        "probe_f1_mean": float(data.probe_f1.mean()),
        "words": len(data.words),
        "icl_examples": cfg.icl_examples,
        "letters": per_letter,
        "letters_left_out": left_out,
    }
