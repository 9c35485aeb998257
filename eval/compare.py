"""`sae compare`: training runs side by side, and how alike their dictionaries are.

A run is a local run directory of `sae train` (metrics.jsonl, checkpoint/state.json, one folder
per SAE), an offline W&B run folder (`wandb/offline-run-*`), or a W&B run path `entity/project/id`
read through the W&B API (needs a key). Each SAE is a point on the L0 vs explained-variance
frontier, and on the L0 vs CE-loss-recovered one when `sae eval --json <sae>/eval.json` has scored
it (held-out numbers then replace the training ones). Dictionary similarity matches every decoder
row of one SAE to its most similar row in another (cosine): the share with a match above 0.9 says
how much of a dictionary another seed, layer or checkpoint reproduces.

Runs are labelled by their folder name, lengthened to the shortest path suffix that tells two runs
apart (numbered when the same run is given twice), since the labels key every table. compare.json
is strict JSON: a NaN or infinite metric is null, and shows as n/a.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from dataclasses import dataclass, field
from itertools import count, product
from pathlib import Path

import torch
from torch.nn import functional as F

import sae as sae_lib
from eval.report import fmt
from sae.io import atomic_write, write_json, write_text


@dataclass
class CompareConfig:
    """Put training runs side by side: config differences, final metrics, frontiers, and
    dictionary similarity between their SAEs. (Dictionaries of successive checkpoints of a
    model: `sae track` lines them up latent by latent.)"""

    runs: list[str] = field(default_factory=list, metadata={"positional": True})
    """Run directories, offline W&B run folders, or W&B run paths entity/project/id."""
    out: str = "compare"
    """Folder for compare.html, frontier.png and compare.json."""
    threshold: float = 0.9
    """Decoder cosine above which a latent counts as matched."""

    def __post_init__(self) -> None:
        if not -1 <= self.threshold <= 1:  # a cosine: above 1 nothing matches, not even itself
            raise ValueError(f"threshold is a cosine in [-1, 1], got {self.threshold}")


@dataclass
class Run:
    name: str
    """The run's label (unique among the runs compared, see unique_labels)."""
    path: Path
    """Where it was read from: its folder, or the W&B path."""
    config: dict
    history: list[dict]
    saes: dict[str, Path] = field(default_factory=dict)
    """SAE name -> local folder, where the run has them on disk."""

    def final(self) -> dict[str, float]:
        """The last logged value of every metric."""
        last: dict[str, float] = {}
        for row in self.history:
            last.update({k: v for k, v in row.items() if isinstance(v, (int, float))})
        return last


def load_run(ref: str) -> Run:
    path = Path(ref)
    if (path / "metrics.jsonl").exists():
        state = path / "checkpoint" / "state.json"
        config = json.loads(state.read_text()).get("config", {}) if state.exists() else {}
        history = [
            json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line
        ]
        saes = {p.parent.name: p.parent for p in sorted(path.glob("*/cfg.json"))}
        return Run(path.name, path.resolve(), config, history, saes)
    if path.is_dir() and list(path.glob("run-*.wandb")):
        from sae.wandb_offline import read_offline_run

        run = read_offline_run(path)
        return _wandb_run(f"{run.project}/{run.run_id}", path.resolve(), run.config, run.history)
    if not path.exists() and ref.count("/") == 2:
        import wandb

        try:
            api_run = wandb.Api().run(ref)
            return _wandb_run(ref, path, dict(api_run.config), list(api_run.scan_history()))
        except wandb.errors.Error as e:  # no key, refused, unreachable: a 27-line traceback
            raise RuntimeError(
                f"W&B run {ref}: {e} (log in with `wandb login` or WANDB_API_KEY, or compare the "
                "run's offline folder wandb/offline-run-* instead)"
            ) from e
    raise ValueError(
        f"{ref!r} is not a run: expected a `sae train` output folder (metrics.jsonl), an offline "
        f"W&B run folder (run-*.wandb) or a W&B path entity/project/run_id"
    )


def _wandb_run(name: str, path: Path, config: dict, history: list[dict]) -> Run:
    """Without W&B's own keys (`_wandb`, `_step`, `_runtime`, `_timestamp`, ...), which are not
    settings or metrics of the run."""

    def public(d: dict) -> dict:
        return {k: v for k, v in d.items() if not k.startswith("_")}

    return Run(name, path, public(config), [public(row) for row in history])


def unique_labels(runs: list[Run]) -> list[str]:
    """Each run's name; runs at different paths that share a name are told apart by the shortest
    suffix of their paths that differs (`a/run`, `other/run`), and the same run given twice is
    numbered (`run#1`, `run#2`)."""
    names = {r.path: r.name for r in runs}
    for name in set(names.values()):
        group = [path for path in names if names[path] == name]
        if len(group) > 1:  # distinct paths: some suffix of them differs
            n = next(n for n in count(2) if len({p.parts[-n:] for p in group}) == len(group))
            names.update({path: "/".join(path.parts[-n:]) for path in group})
    counts, seen = Counter(r.path for r in runs), Counter()
    labels = []
    for r in runs:
        seen[r.path] += 1
        labels.append(f"{names[r.path]}#{seen[r.path]}" if counts[r.path] > 1 else names[r.path])
    return labels


def config_differences(runs: list[Run]) -> dict[str, list]:
    """Config keys whose values are not the same in every run (missing counts as None)."""
    keys = sorted({k for r in runs for k in r.config})
    values = {k: [r.config.get(k) for r in runs] for k in keys}
    return {k: v for k, v in values.items() if any(x != v[0] for x in v)}


def points(run: Run) -> list[dict]:
    """One frontier point per SAE: L0, explained variance and CE recovered (held-out when an
    eval.json sits beside the SAE, else the last training values)."""
    final = run.final()
    # the SAEs: local folders, else (a W&B run) the names that suffix a multi-SAE run's metrics
    logged = [k.removeprefix("metrics/l0/") for k in final if k.startswith("metrics/l0/")]
    names = run.saes or dict.fromkeys(logged or [""])
    out = []
    for name, folder in names.items():
        suffix = f"/{name}" if f"metrics/l0/{name}" in final else ""
        point = {
            "run": run.name,
            "sae": name,
            "l0": final.get(f"metrics/l0{suffix}"),
            "explained_variance": final.get(f"metrics/explained_variance{suffix}"),
            "ce_loss_recovered": None,
            "source": "training",
        }
        if folder is not None and (folder / "eval.json").exists():
            report = json.loads((folder / "eval.json").read_text())
            point.update(
                {k: report.get(k) for k in ("l0", "explained_variance", "ce_loss_recovered")}
            )
            point["source"] = "eval.json"
        out.append(point)
    return out


SIMILARITY = (
    "matched_a_in_b", "matched_b_in_a", "mean_max_cosine_a_in_b", "mean_max_cosine_b_in_a",
)  # fmt: skip


@torch.no_grad()
def dictionary_similarity(a, b, threshold: float = 0.9, chunk: int = 4096) -> dict:
    """Share of a's decoder rows whose best cosine match among b's exceeds `threshold`, and the
    other way round, with the mean best cosines (chunked: memory chunk x d_sae). Dictionaries of
    different d_in are not comparable: null scores and the reason."""
    da, db = (F.normalize(d.decoder_directions().float(), dim=-1) for d in (a, b))
    if da.shape[1] != db.shape[1]:
        return {**dict.fromkeys(SIMILARITY), "reason": f"d_in {da.shape[1]} vs {db.shape[1]}"}

    def best(x, y):
        return torch.cat([(part @ y.T).max(1).values for part in x.split(chunk)])

    ab, ba = best(da, db), best(db, da)
    return {
        "matched_a_in_b": float((ab > threshold).double().mean()),
        "matched_b_in_a": float((ba > threshold).double().mean()),
        "mean_max_cosine_a_in_b": float(ab.mean()),
        "mean_max_cosine_b_in_a": float(ba.mean()),
    }


def frontier_figure(all_points: list[dict]):
    """L0 vs explained variance and L0 vs CE loss recovered: one colour per run on both panels,
    filled markers for held-out eval.json scores and hollow ones for the last training values
    (which read higher: they are on the training tokens)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    runs = dict.fromkeys(p["run"] for p in all_points)
    colours = {run: f"C{i % 10}" for i, run in enumerate(runs)}
    fig = Figure(figsize=(10, 4.6))
    panels = ("explained_variance", "ce_loss_recovered")
    for ax, metric in zip(fig.subplots(1, 2), panels, strict=True):
        known = [p for p in all_points if p["l0"] is not None and p[metric] is not None]
        for run, source in product(runs, ("training", "eval.json")):
            mine = [p for p in known if p["run"] == run and p["source"] == source]
            if not mine:
                continue
            face = colours[run] if source == "eval.json" else "none"
            ax.scatter([p["l0"] for p in mine], [p[metric] for p in mine], edgecolors=colours[run],
                       facecolors=face)  # fmt: skip
        ax.set(xlabel="L0", ylabel=metric, xscale="log" if known else "linear")
        if not known:
            ax.text(0.5, 0.5, "no SAE scored yet:\nsae eval SAE --json SAE/eval.json",
                    ha="center", va="center", transform=ax.transAxes)  # fmt: skip
        ax.grid(alpha=0.3)

    def marker(label, colour, face):
        return Line2D([], [], ls="", marker="o", mec=colour, mfc=face, label=label)

    handles = [marker(run, c, c) for run, c in colours.items()] + [
        marker("held-out (eval.json)", "grey", "grey"),
        marker("training (no eval.json)", "grey", "none"),
    ]
    rows = -(-len(handles) // 4)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8)
    fig.tight_layout(rect=(0, 0.05 * rows, 1, 1))
    return fig


def compare(cfg: CompareConfig) -> dict:
    if len(cfg.runs) < 1:
        raise ValueError("give at least one run to compare")
    runs = [load_run(r) for r in cfg.runs]
    for run, label in zip(runs, unique_labels(runs), strict=True):
        run.name = label
    result = {
        "runs": [r.name for r in runs],
        "config_differences": config_differences(runs),
        "final_metrics": {r.name: r.final() for r in runs},
        "points": [p for r in runs for p in points(r)],
        "similarity": [],
    }
    saes = [(sae_label(r.name, n), sae_lib.load(f)) for r in runs for n, f in r.saes.items()]
    for i, (name_a, a) in enumerate(saes):
        for name_b, b in saes[i + 1 :]:
            sim = dictionary_similarity(a, b, cfg.threshold)
            result["similarity"].append({"a": name_a, "b": name_b, **sim})
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    fig = frontier_figure(result["points"])
    atomic_write(out / "frontier.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    write_json(out / "compare.json", result)  # strict: NaN and inf as null
    html_text = page(result, out / "frontier.png")
    write_text(out / "compare.html", html_text)
    return result


def sae_label(run: str, sae: str) -> str:
    """`run/sae`, or just `run` for a run's one unnamed SAE (a single-SAE W&B run)."""
    return f"{run}/{sae}" if sae else run


def table(header: list[str], rows: list[list]) -> str:
    """An HTML table of numbers and text, numbers as `fmt` writes them."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def html_page(title: str, body: str) -> str:
    """A page of `sae compare`'s and `sae track`'s plain style around `body`."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font:14px system-ui,sans-serif;margin:2em}td,th{padding:2px 8px;"
        f"border-bottom:1px solid #ddd}}</style></head><body>{body}</body></html>"
    )


def png_image(png: Path, alt: str) -> str:
    """The PNG inlined, so the page is one file."""
    import base64

    return f"<img alt='{alt}' src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}'>"


def page(result: dict, png: Path) -> str:
    metrics = sorted({k for m in result["final_metrics"].values() for k in m})
    return html_page(
        "sae compare",
        "<h1>Runs compared</h1>"
        f"<h2>Config differences</h2>{table(['key', *result['runs']], [[k, *v] for k, v in result['config_differences'].items()])}"
        f"<h2>Final training metrics</h2>{table(['metric', *result['runs']], [[k, *(result['final_metrics'][r].get(k) for r in result['runs'])] for k in metrics])}"
        f"<h2>Frontiers</h2>{png_image(png, 'frontiers')}"
        f"{table(['run', 'sae', 'L0', 'explained variance', 'CE recovered', 'from'], [[p['run'], p['sae'], p['l0'], p['explained_variance'], p['ce_loss_recovered'], p['source']] for p in result['points']])}"
        f"<h2>Dictionary similarity (decoder cosine &gt; threshold)</h2>"
        f"{table(['a', 'b', 'a matched in b', 'b matched in a', 'note'], [[s['a'], s['b'], s['matched_a_in_b'], s['matched_b_in_a'], s.get('reason', '')] for s in result['similarity']])}",
    )


def compare_cli(cfg: CompareConfig) -> None:
    result = compare(cfg)
    for key, values in result["config_differences"].items():
        print(f"{key:<24} " + "  ".join(fmt(v) for v in values))
    for p in result["points"]:
        print(
            f"{sae_label(p['run'], p['sae'])}: L0 {fmt(p['l0'])}, explained variance {fmt(p['explained_variance'])}, CE recovered {fmt(p['ce_loss_recovered'])} ({p['source']})"
        )
    for s in result["similarity"]:
        matched = f"{fmt(s['matched_a_in_b'], '.1%')} / {fmt(s['matched_b_in_a'], '.1%')}"
        reason = f" (not comparable: {s['reason']})" if "reason" in s else ""
        print(f"{s['a']} vs {s['b']}: {matched} of latents matched{reason}")
    print(f"written to {cfg.out}/compare.html, frontier.png, compare.json")
