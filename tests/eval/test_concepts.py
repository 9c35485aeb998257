"""Concept labels, purity scores and absorption against hand computations."""

import pytest
import torch
from torch.nn import functional as F

from eval.concepts import (
    AbsorptionConfig,
    SparseCodes,
    concept_names,
    f1,
    fit_probes,
    latent_purity,
    main_latents,
    purity_report,
    token_strings,
    window_labels,
    word_absorption,
)


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
    w, b = fit_probes(x, y.float())
    assert (f1((x @ w.T + b) > 0, y) > 0.95).all()
    assert w[0].abs().argmax() == 3


def test_main_latents_are_the_ones_that_carry_the_letter():
    torch.manual_seed(0)
    n, d_sae = 1200, 40
    letters = torch.randint(0, 3, (n,))
    y = F.one_hot(letters, 3).bool()
    z = torch.rand(n, d_sae) * (torch.rand(n, d_sae) < 0.1)
    z[:, 5] = (letters == 0) * (1 + torch.rand(n))  # letter 0: one clean latent
    half = torch.rand(n) < 0.5  # letter 1: split over two latents
    z[:, 9] = ((letters == 1) & half) * 1.0
    z[:, 11] = ((letters == 1) & ~half) * 1.0
    mains = main_latents(z[:900], z[900:], y[:900], y[900:], AbsorptionConfig(max_k=4))
    assert mains[0] == [5]
    assert sorted(mains[1]) == [9, 11]


def test_a_rare_weak_latent_does_not_outrank_the_letter_detector():
    """In raw units a latent firing rarely and weakly needs a huge probe weight for a tiny effect;
    candidates are ranked by the standardized weights, so the real detector comes first."""
    torch.manual_seed(0)
    n = 2000
    y = torch.zeros(n, 26, dtype=torch.bool)
    y[:, 0] = torch.rand(n) < 0.1
    y[:, 1:] = torch.rand(n, 25) < 0.04
    z = (torch.rand(n, 30) < 0.02) * 0.05 * torch.rand(n, 30)  # rare, tiny, unrelated latents
    z[:, 0] = (y[:, 0] & (torch.rand(n) < 0.9)) * (5 + torch.rand(n))  # letter 0's detector
    z[:, 1] = (y[:, 0] & (torch.rand(n) < 0.1)) * 0.05 * torch.rand(n)  # tiny, 10% of positives
    mains = main_latents(z[:1600], z[1600:], y[:1600], y[1600:], AbsorptionConfig())
    assert mains[0] == [0]


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
