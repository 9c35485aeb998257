"""Concept labels, purity scores and absorption against hand computations."""

import random

import pytest
import torch
from torch.nn import functional as F

from eval.concepts import (
    LETTERS,
    AbsorptionConfig,
    SparseCodes,
    Spelling,
    concept_names,
    first_letter_absorption,
    latent_purity,
    main_latents,
    purity_report,
    spelling_prompt,
    spelling_words,
    token_strings,
    window_labels,
    word_absorption,
)
from eval.probes import ProbeFit, f1, logistic_regression, train_probes


def test_labels_read_off_the_text(smollm2):
    tokenizer = smollm2[1]
    text = "**EGEUS**\nHappy be Theseus, our 12 dukes!\n_Exit PHILOSTRATE_\nthe end"
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]
    strings = token_strings(tokenizer)
    names = concept_names(["the"])
    labels = window_labels(ids, strings, ["the"])
    got = {
        (strings[i], names[j])
        for i, row in zip(ids[1:], labels, strict=True)
        for j in row.nonzero()
    }
    assert "".join(strings[i] for i, row in zip(ids[1:], labels, strict=True) if row[27]) == "EGEUS"
    stage = "".join(strings[i] for i, row in zip(ids[1:], labels, strict=True) if row[28])
    assert stage == "Exit PHILOSTRATE"
    expected = {
        ("Happy", "line_start"),
        ("Happy", "capitalised"),
        ("Happy", "first_letter_h"),
        (" be", "first_letter_b"),
        (" our", "first_letter_o"),
        ("1", "digit"),
        ("!", "punctuation"),
        ("\n", "newline"),
        ("the", "word_the"),
        ("the", "line_start"),
        (" end", "first_letter_e"),
    }
    assert expected <= got
    assert ("ukes", "first_letter_u") not in {(s, n) for s, n in got}  # inside a word
    assert (" be", "capitalised") not in got and (" PH", "capitalised") not in got


def labelled(pieces: str, concept: str) -> list[str]:
    """The tokens of `pieces` ("|"-separated, BOS first) that carry `concept`, read off the text."""
    strings = pieces.split("|")
    labels = window_labels(list(range(len(strings))), strings, [])
    column = concept_names([]).index(concept)
    return [p for p, row in zip(strings[1:], labels, strict=True) if row[column]]


def test_a_stage_direction_spans_lines():
    got = labelled("|_|Enter| KING|,| SIR|\n|WAL|TER|_|\n|So| _|Exit|_", "stage_direction")
    assert got == ["Enter", " KING", ",", " SIR", "\n", "WAL", "TER", "Exit"]
    # a window that starts inside a direction: its closing `_` opens nothing
    assert labelled("|others|_|\n|Say| so|.|\n|_|Exit|_", "stage_direction") == ["Exit"]


def test_capitalised_reads_the_whole_word():
    pieces = "| H|otspur| K|ING| I| O|'|er| hot|Spur"
    assert labelled(pieces, "capitalised") == [" H"]
    assert labelled(pieces, "first_letter_h") == [" H", " hot"]
    assert labelled("| Él|an| ça", "capitalised") == [" Él"]  # and no first_letter_ column


def brute_auroc(scores: torch.Tensor, y: torch.Tensor) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie), over every pair."""
    pos, neg = scores[y], scores[~y]
    diff = pos[:, None] - neg[None]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def test_purity_matches_brute_force_auroc_and_precision():
    torch.manual_seed(0)
    n, d_sae, top = 400, 6, 5
    labels = torch.rand(n, 4) < torch.tensor([0.1, 0.3, 0.05, 0.5])
    z = torch.rand(n, d_sae) * (torch.rand(n, d_sae) < 0.2)  # sparse, many tied zeros
    z[:, 0] = labels[:, 2] * (1 + torch.rand(n))  # a perfect detector of concept 2
    z[:, 1] = 0
    z[:3, 1] = 1.0  # fires three times: below min_fires
    codes = SparseCodes(d_sae)
    for chunk in z.split(64):
        codes.add(chunk)
    result = latent_purity(codes, labels, top=top, min_fires=10, min_positives=5, chunk=17)
    assert result.concept[0] == 2 and result.auroc[0] == pytest.approx(1.0)
    assert result.precision[0] == 1.0
    assert result.concept[1] == -1 and result.auroc[1].isnan()
    for j in range(2, d_sae):
        aurocs = [brute_auroc(z[:, j], labels[:, c]) for c in range(4)]
        best = max(range(4), key=aurocs.__getitem__)
        assert result.concept[j] == best
        assert result.auroc[j] == pytest.approx(aurocs[best], abs=1e-9)
        top_rows = z[:, j].topk(top).indices
        assert result.precision[j] == pytest.approx(labels[top_rows, best].double().mean())
    report = purity_report(result, ["a", "b", "c", "d"], threshold=0.99)
    assert report["latents_scored"] == d_sae - 1
    assert report["pure_by_concept"] == {"c": 1}
    assert report["latent_concept"][:2] == ["c", None]


def test_purity_mid_ranks_tied_activations():
    """Codes on a coarse grid (as bf16 gives) tie often; AUROC counts a tie as half, as the
    brute-force pair count does."""
    torch.manual_seed(1)
    n, d_sae = 300, 5
    labels = torch.rand(n, 3) < torch.tensor([0.2, 0.4, 0.1])
    z = (torch.rand(n, d_sae) * 4).round() / 4 * (torch.rand(n, d_sae) < 0.5)  # 4 levels
    z[:, 0] += labels[:, 1] * 0.25  # some signal, still tied
    codes = SparseCodes(d_sae)
    codes.add(z)
    result = latent_purity(codes, labels, min_fires=5, min_positives=5)
    for j in range(d_sae):
        aurocs = [brute_auroc(z[:, j], labels[:, c]) for c in range(3)]
        assert result.auroc[j] == pytest.approx(max(aurocs), abs=1e-9)


def test_probes_find_a_planted_direction():
    torch.manual_seed(0)
    x = torch.randn(600, 20) * 3 + 5
    y = torch.stack([x[:, 3] > 5, x[:, 7] - x[:, 2] > 0], 1)
    w, b = train_probes(x, y, ProbeFit(), torch.Generator().manual_seed(0))
    assert (f1((x @ w.T + b) > 0, y) > 0.9).all()
    assert w[0].abs().argmax() == 3


def test_probe_draws_follow_the_seed():
    x, y = torch.randn(200, 8), torch.rand(200, 2) < 0.3
    fit = ProbeFit(epochs=3)
    first, again = (train_probes(x, y, fit, torch.Generator().manual_seed(5)) for _ in range(2))
    other = train_probes(x, y, fit, torch.Generator().manual_seed(6))
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])


def test_logistic_regression_reaches_the_optimum():
    """At the optimum of ||w||²/2 + Σ s_i loss_i the gradient vanishes: w = -Σ s_i (p_i - y_i) x_i
    and Σ s_i (p_i - y_i) = 0 (the bias is unpenalised). Zero columns get zero weight."""
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(3, 400, 5, generator=g)).double()
    x[1, :, 4] = 0
    y = torch.rand(3, 400, generator=g) < torch.sigmoid(x[..., 0] - x[..., 1])
    w, b = logistic_regression(x, y)
    p = torch.sigmoid(torch.einsum("pnf,pf->pn", x, w) + b[:, None])
    pos = y.sum(1, keepdim=True)
    s = torch.where(y, 400 / (2 * pos.double()), 400 / (2 * (400 - pos.double())))
    residual = s * (p - y.double())
    assert torch.allclose(w, -torch.einsum("pnf,pn->pf", x, residual), atol=1e-8)
    assert residual.sum(1).abs().max() < 1e-8
    assert w[1, 4] == 0


def test_main_latents_are_the_ones_that_carry_the_letter():
    torch.manual_seed(0)
    n, d_sae = 16_000, 40  # SAEBench's L1 probe takes batches of 4096 for 50 epochs
    letters = torch.randint(0, 3, (n,))
    y = F.one_hot(letters, 3).bool()
    z = torch.rand(n, d_sae) * (torch.rand(n, d_sae) < 0.1)
    z[:, 5] = (letters == 0) * (1 + torch.rand(n))  # letter 0: one clean latent
    half = torch.rand(n) < 0.5  # letter 1: split over two latents
    z[:, 9] = ((letters == 1) & half) * 1.0
    z[:, 11] = ((letters == 1) & ~half) * 1.0
    cfg = AbsorptionConfig(max_k=4)
    g = torch.Generator().manual_seed(0)
    mains = main_latents(z[:12_000], z[12_000:], y[:12_000], y[12_000:], cfg, g)
    assert mains[0] == [5]
    assert sorted(mains[1]) == [9, 11]


def test_spelling_prompt_is_saebenchs():
    """SAEBench's create_icl_prompt with its first-letter formatter and separator prepended."""
    words = [" cat", "Dog", " eel", " fox"]
    prompt = spelling_prompt(" cat", words, 2, random.Random(0))
    shown = random.Random(0).sample(words, 2)
    assert " cat" not in shown  # the first draw has no contamination, so it is kept
    e1, e2 = shown
    assert prompt == (
        f"\n{e1} has the first letter: {e1.strip()[0].upper()}\n{e2} has the first letter: "
        f"{e2.strip()[0].upper()}\n cat has the first letter:"
    )


class Vocabulary:
    """A tokenizer's vocabulary and nothing else (hashable, as the vocabulary cache needs)."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens).replace("Ġ", " ")


def test_every_letter_gets_its_words():
    tokens = [f"Ġ{c}{i:c}x" for c in LETTERS for i in range(97, 97 + 20)] + ["12", "Ġ!", "ĠaÃ"]
    words = spelling_words(Vocabulary(tokens), AbsorptionConfig(words=100, min_words_per_letter=6))
    per_letter = [sum(w[1] == c for w in words) for c in LETTERS]
    assert min(per_letter) >= 6 and len(words) >= 100
    assert all(w.startswith(" ") and w[1:].isalpha() for w in words)


def test_a_vocabulary_short_of_a_letter_is_refused_by_name():
    tokens = [f"Ġ{c}{i:c}" for c in LETTERS for i in range(97, 107) if c not in "qx"] + [
        "Ġqa",
        "Ġqu",
    ]
    with pytest.raises(ValueError, match=r"letters q: 2, x: 0.*needs 10 per letter"):
        spelling_words(Vocabulary(tokens), AbsorptionConfig())


def test_too_few_letters_passing_the_probe_is_refused():
    d = 8
    data = Spelling("h", ["w"], {}, {}, {}, torch.zeros(26, d), torch.zeros(26),
                    torch.full((26,), 0.5), [], torch.Generator())  # fmt: skip
    model = type("Stub", (), {"cfg": type("Cfg", (), {"hook_name": "h"})})()
    with pytest.raises(ValueError, match=r"passes F1 > 0.6 on 0 letters, fewer than the 20"):
        first_letter_absorption(model, data)


def test_word_absorption_follows_saebench_cases():
    cfg = AbsorptionConfig()
    cos = torch.tensor([0.9, 0.5, 0.02, 0.3])  # latent 0 is the letter's main latent
    z = torch.tensor(
        [
            [2.0, 0.0, 0.0, 0.0],  # the main latent carries it all: no absorption
            [0.0, 3.0, 0.0, 0.0],  # main silent, latent 1 carries 1.5 of 1.6: full absorption
            [1.0, 1.0, 0.0, 0.0],  # partial: main 0.9, absorber 0.5 capped at 1.2 - 0.9
            [0.0, 0.0, 30.0, 0.0],  # only a latent below both cosine bars: no absorption
            [0.0, 0.2, 0.0, 0.0],  # absorber carries 0.1 of 1.0: below the 40% share
        ]
    )
    x_proj = torch.tensor([1.8, 1.6, 1.2, 1.0, 1.0])
    fraction, full = word_absorption(x_proj, z, cos, [0], cfg)
    assert fraction.tolist() == pytest.approx([0.0, 1.0, 0.3 / 1.2, 0.0, 0.0])
    assert full.tolist() == [False, True, False, False, False]
