"""`sae track`: dictionaries trained on successive checkpoints of a model (one hookpoint, one width)
lined up in order, to see which features are born, persist, split, merge or die as it trains.

Between neighbours t and t+1 the latents are matched one to one by the Hungarian algorithm on
their decoder directions (scipy's linear_sum_assignment, maximising the summed cosine). A matched
pair whose cosine is at least `persist` is one feature that persists. Of the latents of t+1 left
over, one whose best cosine among t's is at least `related` to a latent that persists is split off
it (the old feature now has two or more latents); otherwise it is born. Of the latents of t left
over, one whose best cosine among t+1's is at least `related` to a latent that persists from
another has merged into it; otherwise it died. Lineages follow the persisting pairs: a latent of
the first dictionary, or one born or split off later, starts a lineage, and every latent it
persists into carries that lineage on.

Writes track.json (schema below, `schema: sae-forge-track/1`), track.png (the share of each
dictionary's latents that persist from the previous one, their mean cosine, and the counts of
each event) and track.html.

track.json:
  dictionaries   [{ref, model_name, model_revision, hook_name, d_sae}] in the order given
  thresholds     {persist, related}
  checkpoints    with --tokens, per dictionary on its own checkpoint: {model, revision,
                 explained_variance, ce_loss_recovered, l0, last_dictionary_explained_variance};
                 without, empty
  transitions    per neighbouring pair: {from, to, persists, born, split, died, merged,
                 persisting_share (persists / d_sae), mean_persisting_cosine,
                 mean_assigned_cosine (over every Hungarian pair)}; with --tokens also
                 mean_persisting_correlation (of the persisting pairs' activations) and
                 activation_agreement (the share of persisting pairs that the Hungarian matching
                 on activation correlation pairs the same way)
  latents        per dictionary, per latent: {lineage, status (first, persists, born or split),
                 parent (the previous dictionary's latent it persists or split from, else null),
                 cosine (to the parent), fate (persists, merged or died; null in the last),
                 child (the next dictionary's latent it persists or merged into, else null),
                 with --tokens correlation (its activations' with the parent's)}
  lineages       how many there are, and how many of the first dictionary's reach the last
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

import sae as sae_lib
from eval.compare import html_page, png_image, table
from eval.reconstruction import ReconstructionStats
from eval.report import EvalConfig, fmt, load_inputs, score
from sae.hooks import capture
from sae.io import atomic_write, write_json, write_text
from sae.layered import LayeredDictionary
from train.config import TextOptions

SCHEMA = "sae-forge-track/1"


@dataclass
class TrackConfig(TextOptions):
    """Line up dictionaries trained on successive checkpoints of a model (the same hookpoint and
    width): which latents persist, are born, split, merge or die from one checkpoint to the next."""

    dictionaries: list[str] = field(default_factory=list, metadata={"positional": True})
    """The dictionaries, earliest checkpoint first (anything sae.load takes)."""
    out: str = "track"
    """Folder for track.json, track.png and track.html."""
    model: str = ""
    """LM (default: each dictionary's model_name, run at its own model_revision)."""
    split: str = "test"
    """Dataset split; shakespeare's `test` holds 4 plays never trained on."""
    tokens: int = 0
    """Also run each dictionary on its own checkpoint over this many tokens of --dataset: its
    explained variance and CE loss recovered there, the last dictionary's explained variance on
    every checkpoint, and the activation correlation of the latents matched (0: decoder
    directions only, no model run)."""
    batch_size: int = 8
    """Windows per forward pass."""
    device: str = "cpu"
    """Device for the LMs and the dictionaries."""
    persist: float = 0.7
    """Decoder cosine at which a matched pair is one feature that persists."""
    related: float = 0.4
    """Decoder cosine at which an unmatched latent counts as split off, or merged into, a
    persisting one (below: born, or died)."""

    def __post_init__(self) -> None:
        if not -1 <= self.related <= self.persist <= 1:
            raise ValueError(
                f"thresholds are cosines with -1 <= related <= persist <= 1, got related "
                f"{self.related} and persist {self.persist}"
            )


def directions(d) -> torch.Tensor:
    """Unit decoder rows, in host memory (scipy matches them)."""
    return F.normalize(d.decoder_directions().detach().float(), dim=-1).cpu()


def check_alike(dictionaries: list, refs: list[str]) -> None:
    """One hookpoint, one rule, one width and one input width for all: what makes them the same
    dictionary at different checkpoints."""
    if len(dictionaries) < 2:
        raise ValueError(f"sae track needs at least two dictionaries, got {len(dictionaries)}")
    first = dictionaries[0].cfg
    for d, ref in zip(dictionaries[1:], refs[1:], strict=True):
        for key in ("hook_name", "hook_name_out", "hook_names", "hook_names_out",
                    "architecture", "d_sae", "d_in"):  # fmt: skip
            if getattr(d.cfg, key, None) != getattr(first, key, None):
                raise ValueError(
                    f"{ref} has {key} {getattr(d.cfg, key, None)!r} where {refs[0]} has "
                    f"{getattr(first, key, None)!r}: sae track lines up one dictionary's "
                    "checkpoints (the same hookpoint, rule and width)"
                )


@torch.no_grad()
def transition(a: torch.Tensor, b: torch.Tensor, persist: float, related: float) -> dict:
    """The events between two dictionaries' unit decoder directions a [F, d] and b [F, d]."""
    from scipy.optimize import linear_sum_assignment

    cosine = a @ b.T
    rows, cols = linear_sum_assignment(cosine.numpy(), maximize=True)
    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
    assigned = cosine[rows, cols]
    keep = assigned >= persist
    child = torch.full((len(a),), -1)
    parent = torch.full((len(b),), -1)
    child[rows[keep]], parent[cols[keep]] = cols[keep], rows[keep]
    persisting_a, persisting_b = child >= 0, parent >= 0
    best_in_a, nearest_a = cosine.max(0)  # for b's latents
    best_in_b, nearest_b = cosine.max(1)  # for a's latents
    split = ~persisting_b & (best_in_a >= related) & persisting_a[nearest_a]
    merged = ~persisting_a & (best_in_b >= related) & persisting_b[nearest_b]
    return {
        "cosine": cosine,
        "child": child,
        "parent": parent,
        "split": split,
        "merged": merged,
        "nearest_a": nearest_a,
        "nearest_b": nearest_b,
        "mean_assigned_cosine": float(assigned.mean()),
    }


@torch.no_grad()
def on_checkpoints(dictionaries: list, cfg: TrackConfig) -> tuple[list[dict], list[torch.Tensor]]:
    """Each dictionary run on its own checkpoint's activations over the same tokens: its
    evaluation there (explained variance, CE loss recovered, L0) and the last dictionary's
    explained variance on them (how much of the final basis already exists), and its codes."""
    last, scores, codes = dictionaries[-1], [], []
    for d in dictionaries:
        ecfg = EvalConfig(sae="", **cfg.text_options(), tokens=cfg.tokens, batch_size=cfg.batch_size,
                          device=cfg.device, concepts=False, absorption=False)  # fmt: skip
        lm, tokenizer, ids, name = load_inputs(d, ecfg)
        report = score(d.to(cfg.device), lm, tokenizer, ids, ecfg, name)
        hook, hook_out = d.cfg.hook_name, d.cfg.hook_name_out
        z, fixed = [], ReconstructionStats()
        for batch in ids.split(cfg.batch_size):
            acts = capture(lm, sorted({hook, hook_out}), input_ids=batch.to(cfg.device))
            x = acts[hook][:, 1:].reshape(-1, d.cfg.d_in).float()
            y = acts[hook_out][:, 1:].reshape(-1, d.cfg.d_out).float()
            z.append(d.encode(x).cpu())
            fixed.add(y, last.to(cfg.device)(x))
        codes.append(torch.cat(z))
        scores.append({
            "model": name, "revision": report["meta"].get("model_revision", ""),
            **{k: report[k] for k in ("explained_variance", "ce_loss_recovered", "l0")},
            "last_dictionary_explained_variance": fixed.result()["explained_variance"],
        })  # fmt: skip
    return scores, codes


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[F_a, F_b]: Pearson correlation of two sets of latents' activations on the same tokens
    (0 for a latent that never varies)."""
    za, zb = ((z - z.mean(0)) / z.std(0).clamp_min(1e-12) for z in (a, b))
    return za.T @ zb / (len(a) - 1)


def track(cfg: TrackConfig) -> dict:
    dictionaries = [sae_lib.load(ref) for ref in cfg.dictionaries]
    check_alike(dictionaries, cfg.dictionaries)
    if cfg.tokens and any(isinstance(d, LayeredDictionary) for d in dictionaries):
        raise ValueError(
            "--tokens runs dictionaries of one hookpoint; a cross-layer transcoder's or "
            "crosscoder's are lined up by their decoders alone (--tokens 0)"
        )
    scores, codes = on_checkpoints(dictionaries, cfg) if cfg.tokens else ([], [])
    units = [directions(d) for d in dictionaries]
    width = len(units[0])
    latents = [[{"lineage": i, "status": "first", "parent": None, "cosine": None}
                for i in range(width)]]  # fmt: skip
    transitions, lineages = [], width
    for t, (a, b) in enumerate(zip(units, units[1:], strict=False)):
        step = transition(a, b, cfg.persist, cfg.related)
        now = []
        for j in range(width):
            parent = int(step["parent"][j])
            if parent >= 0:
                status, lineage = "persists", latents[t][parent]["lineage"]
            else:
                status = "split" if step["split"][j] else "born"
                parent = int(step["nearest_a"][j]) if status == "split" else None
                lineage, lineages = lineages, lineages + 1
            cos = float(step["cosine"][parent, j]) if parent is not None else None
            now.append({"lineage": lineage, "status": status, "parent": parent, "cosine": cos})
        for i, latent in enumerate(latents[t]):
            child = int(step["child"][i])
            if child >= 0:
                latent.update(fate="persists", child=child)
            elif step["merged"][i]:
                latent.update(fate="merged", child=int(step["nearest_b"][i]))
            else:
                latent.update(fate="died", child=None)
        latents.append(now)
        persisting = [x["cosine"] for x in now if x["status"] == "persists"]
        activity = agreement(codes[t], codes[t + 1], now) if codes else {}
        transitions.append({
            "from": t, "to": t + 1, "persists": len(persisting),
            "born": sum(x["status"] == "born" for x in now),
            "split": sum(x["status"] == "split" for x in now),
            "died": sum(x["fate"] == "died" for x in latents[t]),
            "merged": sum(x["fate"] == "merged" for x in latents[t]),
            "persisting_share": len(persisting) / width,
            "mean_persisting_cosine": sum(persisting) / len(persisting) if persisting else None,
            "mean_assigned_cosine": step["mean_assigned_cosine"], **activity,
        })  # fmt: skip
    for latent in latents[-1]:
        latent.update(fate=None, child=None)
    return {
        "schema": SCHEMA,
        "dictionaries": [
            {
                "ref": ref,
                "model_name": d.cfg.model_name,
                "model_revision": getattr(d.cfg, "model_revision", ""),
                "hook_name": getattr(d.cfg, "hook_name", ""),
                "d_sae": d.cfg.d_sae,
            }
            for ref, d in zip(cfg.dictionaries, dictionaries, strict=True)
        ],  # fmt: skip
        "thresholds": {"persist": cfg.persist, "related": cfg.related},
        "checkpoints": scores,
        "transitions": transitions,
        "latents": latents,
        "lineages": {  # the first dictionary's lineages are numbered 0..width-1
            "count": lineages,
            "first_reaching_end": sum(x["lineage"] < width for x in latents[-1]),
        },
    }


def agreement(a: torch.Tensor, b: torch.Tensor, now: list[dict]) -> dict:
    """How the decoder matching looks in the activations: each persisting or split latent's
    correlation with its parent (into `now`), their mean over persisting pairs, and the share of
    persisting pairs that the Hungarian matching on activation correlation pairs the same way."""
    from scipy.optimize import linear_sum_assignment

    corr = correlation(a, b)
    rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
    by_activity = dict(zip(cols.tolist(), rows.tolist(), strict=True))
    for j, latent in enumerate(now):
        parent = latent["parent"]
        latent["correlation"] = float(corr[parent, j]) if parent is not None else None
    pairs = [
        (latent["parent"], j) for j, latent in enumerate(now) if latent["status"] == "persists"
    ]
    return {
        "mean_persisting_correlation": (
            sum(float(corr[i, j]) for i, j in pairs) / len(pairs) if pairs else None
        ),
        "activation_agreement": (
            sum(by_activity[j] == i for i, j in pairs) / len(pairs) if pairs else None
        ),
    }


def labels(result: dict) -> list[str]:
    """Each dictionary by its model revision, else its place in the order."""
    return [d["model_revision"] or f"#{i}" for i, d in enumerate(result["dictionaries"])]


def figure(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = [f"{a} > {b}" for a, b in zip(labels(result), labels(result)[1:], strict=False)]
    t, checkpoints = result["transitions"], result["checkpoints"]
    fig, axes = plt.subplots(1, 3 if checkpoints else 2, figsize=(16 if checkpoints else 11, 4))
    share, events = axes[:2]
    share.plot(steps, [x["persisting_share"] for x in t], marker="o", label="latents persisting")
    share.plot(steps, [x["mean_persisting_cosine"] for x in t], marker="s",
               label="their mean cosine")  # fmt: skip
    if checkpoints:
        share.plot(steps, [x["mean_persisting_correlation"] for x in t], marker="^",
                   label="their activation correlation")  # fmt: skip
        quality, floor = axes[2], -0.1
        for key, label in [("explained_variance", "explained variance"),
                           ("ce_loss_recovered", "CE loss recovered"),
                           ("last_dictionary_explained_variance", "last dictionary's EV")]:  # fmt: skip
            values = [c[key] for c in checkpoints]
            (line,) = quality.plot(labels(result), [max(v, floor) for v in values], marker="o",
                                   label=label)  # fmt: skip
            for name, v in zip(labels(result), values, strict=True):
                if v < floor:  # drawn at the floor with its value: the last dictionary on an
                    # untrained model's activations (another scale) is thousands below zero
                    quality.annotate(f"{v:.3g}", (name, floor), xytext=(4, 6), fontsize=8,
                                     textcoords="offset points", color=line.get_color())  # fmt: skip
        top = max([1.0] + [c["ce_loss_recovered"] for c in checkpoints])  # above 1 at times
        quality.set_ylim(floor - 0.05, top + 0.1)
        quality.legend()
        quality.set_title("each on its own checkpoint")
    share.set_ylim(0, 1.05)
    share.legend()
    share.set_title("from one checkpoint to the next")
    bottom = [0] * len(t)
    for event in ("persists", "born", "split", "merged", "died"):
        counts = [x[event] for x in t]
        events.bar(steps, counts, bottom=bottom, label=event)
        bottom = [a + b for a, b in zip(bottom, counts, strict=True)]
    events.legend()
    events.set_title("latents by event")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8, labelrotation=10)
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def page(result: dict, png: Path) -> str:
    names = labels(result)
    head = ["from", "to", "persist", "born", "split", "merged", "died", "share persisting",
            "mean cosine"]  # fmt: skip
    rows = [[names[x["from"]], names[x["to"]], x["persists"], x["born"], x["split"], x["merged"],
             x["died"], x["persisting_share"], x["mean_persisting_cosine"]]
            for x in result["transitions"]]  # fmt: skip
    sources = "".join(
        f"<li>{html.escape(n)}: {html.escape(d['ref'])}</li>"
        for n, d in zip(names, result["dictionaries"], strict=True)
    )
    lineages, thresholds = result["lineages"], result["thresholds"]
    scored = ""
    if result["checkpoints"]:
        scored = table(
            ["checkpoint", "explained variance", "CE loss recovered", "L0", "last dictionary's EV"],
            [[n, c["explained_variance"], c["ce_loss_recovered"], c["l0"],
              c["last_dictionary_explained_variance"]]
             for n, c in zip(names, result["checkpoints"], strict=True)],
        )  # fmt: skip
    return html_page(
        "sae track",
        f"<h1>Features across checkpoints</h1><ol start='0'>{sources}</ol>"
        f"{png_image(png, 'events')}{table(head, rows)}{scored}<p>{lineages['count']} lineages; "
        f"{lineages['first_reaching_end']} of the first dictionary's reach the last; thresholds: persist "
        f"{thresholds['persist']}, related {thresholds['related']}.</p>",
    )


def track_cli(cfg: TrackConfig) -> None:
    result = track(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "track.json", result)
    figure(result, out / "track.png")
    write_text(out / "track.html", page(result, out / "track.png"))
    names = labels(result)
    for x in result["transitions"]:
        print(f"{names[x['from']]} > {names[x['to']]}: {x['persists']} persist "
              f"({fmt(x['persisting_share'], '.1%')}, mean cosine "
              f"{fmt(x['mean_persisting_cosine'])}), {x['born']} born, {x['split']} split, "
              f"{x['merged']} merged, {x['died']} died")  # fmt: skip
    for n, c in zip(names, result["checkpoints"], strict=False):
        print(f"{n}: explained variance {fmt(c['explained_variance'])}, CE loss recovered "
              f"{fmt(c['ce_loss_recovered'])}, L0 {fmt(c['l0'])}; the last dictionary's explained "
              f"variance here {fmt(c['last_dictionary_explained_variance'])}")  # fmt: skip
    print(f"wrote {out / 'track.html'}, track.json, track.png")
