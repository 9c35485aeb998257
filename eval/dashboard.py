"""`sae dashboard`: a static HTML site about one SAE that opens from disk (no server, no CDN).

index.html: the headline scores of `eval.evaluate` (all of them in report.json), the log-density
histogram and a sortable table of latents (density, best concept and its purity), linking every
page. latents/<i>.html for the most active latents and any chosen by id: top contexts (one per
window) and quantile contexts with per-token highlighting, the activation histogram, the logit-lens
effects of the decoder direction (tokens it promotes and suppresses through the unembedding), and
the explanation when auto-interp has written one.

Two passes keep memory bounded: the first is eval.report's scoring pass, which also keeps per-latent
top activations and samples (eval/top_activations.py); the second runs the model again on just the
windows those examples come from, to colour every token of each shown context. With --report the
first pass only gathers examples, on the windows the report scored (its meta names them), so that
every count and density on the pages is on one set of tokens.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import sae as sae_lib
from eval.autointerp import LLMClient, LocalClient, OpenAIClient, interpret
from eval.concepts import token_strings
from eval.replacement import hookpoints
from eval.report import (
    EvalConfig,
    fmt,
    headline,
    load_inputs,
    replacement_score,
    score,
    summaries,
)
from eval.top_activations import (
    Dictionary,
    TopActivations,
    activations_at,
    context_activations,
    gather,
    input_hooks,
    n_latents,
)
from sae.cli import positional
from sae.clt import CrossLayerTranscoder
from sae.io import check_writable, write_json, write_text
from sae.layered import LayeredDictionary
from sae.lm import DEFAULT_MODEL
from train.config import TextOptions
from train.device import resolve_device


@dataclass
class DashboardConfig(TextOptions):
    """Write a static HTML dashboard of an SAE: overview, latent table and a page per latent."""

    sae: str = positional()
    """The SAE (anything sae.load takes)."""
    out: str = "dashboard"
    """Folder to write index.html, report.json (the scores shown) and latents/ into."""
    model: str = ""
    """LM (default: the SAE's model_name, else smollm2-135m)."""
    split: str = "test"
    """Dataset split; shakespeare's `test` holds 4 plays never trained on."""
    cache: str = ""
    """Take the token windows from this activation cache instead (e.g. runs/demo/heldout)."""
    tokens: int = 20_000
    """Tokens streamed for examples and scores."""
    context_size: int = 64
    """Tokens per window, BOS included."""
    latents: int = 50
    """Pages for this many latents, the most frequently firing first."""
    latent_ids: list[int] = field(default_factory=list)
    """Pages also for these latents (0..d_sae-1), say ones a steering run, `sae compare` or
    auto-interp named: in addition to the --latents most frequent, so that each option keeps its
    meaning (--latents 0 for these alone). One that never fired on the scored tokens gets a page
    saying so."""
    top: int = 10
    """Top-activating contexts per page."""
    report: str = ""
    """An `sae eval --json` report of this SAE to show instead of scoring it here; the examples
    are then gathered on the windows it scored (model, dataset or cache, tokens and context size
    from its meta), so --model, --dataset, --split, --cache, --tokens and --context-size are
    ignored. By default the overview is scored on --tokens (absorption left out for speed)."""
    device: str = "cpu"
    """Device for the LM and the SAE (cpu, cuda, cuda:N, auto); the pages are the same on any."""
    autointerp: str = ""
    """Explain and score the paged latents: `local` (the embedded SmolLM2-Instruct, offline),
    `openai:MODEL` (OPENAI_BASE_URL / OPENAI_API_KEY), or empty for none."""

    def __post_init__(self) -> None:
        for name in ("latents", "top"):  # --latents -1 paged 1023 latents (a slice from the end)
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")


def build_dashboard(cfg: DashboardConfig) -> Path:
    device = str(resolve_device(cfg.device))  # no CUDA here: one line, before any loading
    d = sae_lib.load(cfg.sae).eval()
    if bad := [i for i in cfg.latent_ids if not 0 <= i < n_latents(d)]:
        raise ValueError(
            f"--latent-ids {bad[0]} is not a latent of {cfg.sae}: it has {n_latents(d)} (d_sae), "
            f"so ids run from 0 to {n_latents(d) - 1}"
        )
    check_writable(Path(cfg.out) / "latents")  # before the evaluation, not after it
    report = read_report(cfg.report) if cfg.report else None
    scoring = (
        scored_windows(report, d, cfg)
        if cfg.report
        else EvalConfig(sae=cfg.sae, **cfg.text_options(), cache=cfg.cache, tokens=cfg.tokens,
                        absorption=False)
    )  # fmt: skip
    scoring.device = device
    lm, tokenizer, ids, name = load_inputs(d, scoring)
    d.to(device)
    if cfg.report:
        examples = gather(lm, d, ids, top=cfg.top)
    else:  # one pass over the windows gives the scores and the examples
        examples = TopActivations(n_latents(d), top=cfg.top, window=ids.shape[1] - 1)
        scorer = replacement_score if isinstance(d, LayeredDictionary) else score
        report = scorer(d, lm, tokenizer, ids, scoring, name, examples)
    frequent = examples.fires.argsort(descending=True)[: cfg.latents]
    chosen = list(dict.fromkeys(frequent[examples.fires[frequent] > 0].tolist() + cfg.latent_ids))
    strings = token_strings(tokenizer)
    rows = decoder_rows(d, chosen)
    lens = logit_lens(lm, rows, chosen)
    if cfg.autointerp:
        client = make_client(cfg.autointerp, (lm, tokenizer) if name == DEFAULT_MODEL else None)
        scores = interpret(lm, tokenizer, d, ids, chosen, client, examples=examples)
        report["autointerp"] = {str(latent): r for latent, r in scores.items()}
        report["explanations"] = {str(latent): r["explanation"] for latent, r in scores.items()}

    out = Path(cfg.out)
    (out / "latents").mkdir(parents=True, exist_ok=True)
    write_text(out / "index.html", overview(d, report, chosen))
    write_json(out / "report.json", report)
    shown = {latent: examples.shown_tokens(latent) for latent in chosen}
    acts = activations_at(lm, d, ids, sorted({t for ts in shown.values() for t in ts}), chosen)
    for latent, latent_rows in zip(chosen, rows, strict=True):
        here = where(d, latent, latent_rows.norm(dim=-1).tolist())
        page = latent_page(latent, report, examples, acts[latent], ids, lens[latent], strings, here)
        write_text(out / "latents" / f"{latent}.html", page)
    written = {f"{latent}.html" for latent in chosen}
    for page in (out / "latents").glob("*.html"):  # an earlier dashboard's, of other latents
        if page.stem.isdigit() and page.name not in written:
            page.unlink()
    return out


def what_reads(d: Dictionary) -> str:
    """The heading: rule, latents and hookpoints (a transcoder's input and output)."""
    c = d.cfg
    if isinstance(d, LayeredDictionary):
        if c.is_transcoder:
            return (f"{c.architecture} cross-layer transcoder, {c.n_layers} x {c.d_sae} latents "
                    f"reading {c.hook_names[0]} .. {c.hook_names[-1]}, each writing its layer's "
                    f"{c.hook_names_out[0].split('.', 2)[-1]} and every later one's")  # fmt: skip
        return f"{c.architecture} crosscoder, {c.d_sae} latents over {', '.join(c.hook_names)}"
    if c.is_transcoder:
        return f"{c.architecture} transcoder, {c.d_sae} latents reading {c.hook_name}, writing {c.hook_name_out}"
    return f"{c.architecture} SAE, {c.d_sae} latents on {c.hook_name}"


@torch.no_grad()
def decoder_rows(d: Dictionary, latents: list[int]) -> Tensor:
    """The latents' decoder directions at every hookpoint they write [latents, outputs, d] (in the
    model's units; a CLT latent's rows before its own layer are zero), built for these latents
    only (a CLT's whole decoder would be n x F x n x d)."""
    if isinstance(d, CrossLayerTranscoder):
        return d.decoder_directions(latents).float().cpu().unflatten(-1, (d.cfg.n_layers, -1))
    if isinstance(d, LayeredDictionary):  # a crosscoder: one decoder over its hookpoints
        return d.decoder_directions()[latents].unflatten(-1, (d.cfg.n_layers, -1))
    return d.W_dec[latents][:, None]


def where(d: Dictionary, latent: int, norms: list[float]) -> str:
    """What a latent of a dictionary over several hookpoints reads, and how strongly it writes
    each hookpoint (its decoder norms); nothing for an SAE or transcoder (the heading says it)."""
    if not isinstance(d, LayeredDictionary):
        return ""
    layer, own = divmod(latent, d.cfg.d_sae)
    reads = (f"the CLT's layer {layer} ({d.cfg.hook_names[layer]}), its latent {own}"
             if d.cfg.is_transcoder else f"{', '.join(d.cfg.hook_names)} together")  # fmt: skip
    rows = "".join(
        f"<tr><td>{html.escape(hook)}</td><td>{norm:.3f}</td></tr>"
        for hook, norm in zip(hookpoints(d)[1], norms, strict=True)
    )
    return (f"<p>reads {html.escape(reads, quote=False)}</p><h2>Decoder norm at each hookpoint it writes</h2>"
            f"<table><tr><th>hookpoint</th><th>norm</th></tr>{rows}</table>")  # fmt: skip


def scored_windows(report: dict, d: Dictionary, cfg: DashboardConfig) -> EvalConfig:
    """The windows `sae eval` scored for `report`, read from its meta; a report without one, or of
    an SAE of another width or hookpoint, is refused (its densities would not be this SAE's)."""
    meta = report.get("meta", {})
    if "windows" not in meta:
        raise ValueError(
            f"--report {cfg.report} has no meta naming the windows it scored: "
            "write it with `sae eval SAE --json FILE`"
        )
    for key, value in (("d_sae", n_latents(d)), ("hook_name", "+".join(input_hooks(d)))):
        if meta.get(key) != value:
            raise ValueError(
                f"--report {cfg.report} scored a dictionary with {key} {meta.get(key)!r}, but "
                f"{cfg.sae} has {key} {value!r}"
            )
    return EvalConfig(sae=cfg.sae, model=meta["model"], dataset=meta["dataset"],
                      split=meta["split"], cache="" if meta["split"] else meta["dataset"],
                      tokens=meta["tokens"], context_size=meta["context_size"])  # fmt: skip


def make_client(spec: str, local_lm: tuple[Any, Any] | None = None) -> LLMClient:
    """`local_lm`: the local judge's model and tokenizer, when they are already loaded."""
    if spec == "local":
        return LocalClient(loaded=local_lm)
    if spec.startswith("openai:"):
        return OpenAIClient(spec.removeprefix("openai:"))
    raise ValueError(f"--autointerp takes `local` or `openai:MODEL`, not {spec!r}")


def read_report(path: str) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--report {path} is not an `sae eval --json` report: {e}") from e
    if not isinstance(report, dict):
        raise ValueError(f"--report {path} holds a JSON {type(report).__name__}, not a report")
    return report


def dashboard_cli(cfg: DashboardConfig) -> None:
    out = build_dashboard(cfg)
    print(f"dashboard written to {out}/index.html (open it from disk)")


@torch.no_grad()
def logit_lens(lm, rows: Tensor, latents: list[int], n: int = 10) -> dict[int, dict[str, list]]:
    """Tokens each latent's decoder direction (rows: decoder_rows) promotes and suppresses most
    through the unembedding; over several hookpoints, its direction at the last one, nearest the
    logits."""
    unembed = lm.get_output_embeddings().weight.float()  # [vocab, d_model]
    effects = rows[:, -1].to(unembed) @ unembed.T  # [n_latents, vocab]
    return {
        latent: {
            "promoted": effects[i].topk(n).indices.tolist(),
            "suppressed": (-effects[i]).topk(n).indices.tolist(),
        }
        for i, latent in enumerate(latents)
    }


# -- HTML ---------------------------------------------------------------------------------------
STYLE = """body{font:14px system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}th{cursor:pointer;background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.ctx{font-family:monospace;white-space:pre-wrap;margin:3px 0;
padding:3px;border:1px solid #eee}.tok{border-radius:2px}.hit{outline:1px solid #c00}.muted{color:#888}"""

SORT_SCRIPT = """document.querySelectorAll('th').forEach((th,i)=>th.onclick=()=>{
const body=th.closest('table').tBodies[0],rows=[...body.rows],dir=th.dataset.dir=th.dataset.dir==='d'?'a':'d';
const key=r=>{const v=r.cells[i].dataset.v??r.cells[i].textContent;const f=parseFloat(v);return isNaN(f)?v:f};
rows.sort((a,b)=>(key(a)>key(b)?1:key(a)<key(b)?-1:0)*(dir==='d'?-1:1));rows.forEach(r=>body.appendChild(r));});
const s=location.hash.match(/sort=(\d+)/);if(s)document.querySelectorAll('#latents th')[+s[1]].click();"""
"""Click a header to sort by it (again to reverse); index.html#sort=N opens sorted by column N."""


def _page(title: str, body: str, script: str = "") -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}<script>{script}</script></body></html>"
    )


def histogram_svg(counts: list[int], labels: list[str], width: int = 480, height: int = 120) -> str:
    """Bars for counts, with the first and last labels under the axis."""
    top = max(max(counts), 1)
    w = width / max(len(counts), 1)
    bars = "".join(
        f"<rect x='{i * w:.1f}' y='{height - c / top * height:.1f}' width='{w * 0.9:.1f}' "
        f"height='{c / top * height:.1f}' fill='#4a7'><title>{html.escape(label)}: {c}</title></rect>"
        for i, (c, label) in enumerate(zip(counts, labels, strict=True))
    )
    axis = (
        f"<text x='0' y='{height + 14}' font-size='11'>{html.escape(labels[0])}</text>"
        f"<text x='{width}' y='{height + 14}' font-size='11' text-anchor='end'>{html.escape(labels[-1])}</text>"
        if labels
        else ""
    )
    return f"<svg width='{width}' height='{height + 18}'>{bars}{axis}</svg>"


def overview(d: Dictionary, report: dict, pages: list[int]) -> str:
    scores = "".join(
        f"<tr><td>{k}</td><td>{fmt(report[k], '.4f')}</td></tr>" for k in headline(report)
    ) + "".join(
        f"<tr><td>{name}</td><td>{value}</td><td>{html.escape(detail)}</td></tr>"
        for name, value, detail in summaries(report)
    )
    meta = report.get("meta", {})
    scored = (
        f"<p>Scored on {meta['tokens']:,} tokens of {html.escape(str(meta['dataset']))} "
        f"({meta['windows']} windows of {meta['context_size']}) through {html.escape(meta['model'])}.</p>"
        if "tokens" in meta
        else ""
    )
    sparsity = report["sparsity"]
    edges = sparsity["log10_density_edges"]
    labels = [f"10^{a:g} to 10^{b:g}" for a, b in zip(edges, edges[1:], strict=False)]
    density_svg = histogram_svg(sparsity["log10_density_histogram"], labels)
    concepts = report.get("concepts", {})
    autointerp = report.get("autointerp", {})
    unscored, linked = [None] * len(sparsity["density"]), set(pages)
    columns = zip(sparsity["density"], concepts.get("latent_concept") or unscored,
                  concepts.get("latent_precision") or unscored, strict=True)  # fmt: skip
    rows = []
    for latent, (density, concept, precision) in enumerate(columns):
        name = f"<a href='latents/{latent}.html'>{latent}</a>" if latent in linked else str(latent)
        rows.append(
            f"<tr><td data-v='{latent}'>{name}</td><td>{density:.2e}</td>"
            f"<td>{html.escape(concept or '')}</td><td data-v='{precision if precision is not None else -1}'>"
            f"{'' if precision is None else f'{precision:.2f}'}</td>"
            f"{_score_cell(autointerp.get(str(latent)))}</tr>"
        )
    body = (
        f"<h1>{html.escape(what_reads(d))}</h1>"
        f"{scored}<table id='scores'>{scores}</table><h2>Firing density (log10, live latents)</h2>{density_svg}"
        f"<p>{sparsity['dead_fraction']:.1%} dead on {sparsity['tokens']:,} tokens.</p>"
        f"<h2>Latents</h2><table id='latents'><thead><tr><th>latent</th><th>density</th><th>concept</th>"
        f"<th>purity</th><th>auto-interp (detection)</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return _page("SAE dashboard", body, SORT_SCRIPT)


def _score_cell(result: dict | None) -> str:
    """The detection score; empty where the latent was not explained, `unscored` where it had no
    held-out contexts to judge (both sort below every score)."""
    detection = None if result is None else result["detection"]
    text = "" if result is None else _two(detection)
    return f"<td data-v='{-1 if detection is None else detection}'>{text}</td>"


def _two(score: float | None) -> str:
    return "unscored" if score is None else f"{score:.2f}"


def context_html(
    tokens: list[int], values: list[float], hit: int, strings: list[str], peak: float
) -> str:
    """Tokens with a background whose opacity is the activation relative to the latent's peak."""
    spans = []
    for i, (t, v) in enumerate(zip(tokens, values, strict=True)):
        alpha = min(max(v / peak, 0.0), 1.0) if peak > 0 else 0.0
        cls = "tok hit" if i == hit else "tok"
        spans.append(
            f"<span class='{cls}' style='background:rgba(255,120,0,{alpha:.2f})' "
            f"title='{v:.3f}'>{html.escape(strings[t].replace(chr(10), '↵' + chr(10)))}</span>"
        )
    return f"<div class='ctx'>{''.join(spans)}</div>"


def latent_page(
    latent: int,
    report: dict,
    examples: TopActivations,
    acts: dict[int, list[float]],
    ids: Tensor,
    lens: dict[str, list],
    strings: list[str],
    where: str = "",
) -> str:
    density = report["sparsity"]["density"][latent]
    concepts = report.get("concepts", {})
    concept = (concepts.get("latent_concept") or [None] * (latent + 1))[latent]
    purity = (
        f"best concept <b>{html.escape(concept)}</b>: AUROC {concepts['latent_auroc'][latent]:.2f}, "
        f"precision on top activations {concepts['latent_precision'][latent]:.2f}"
        if concept
        else "<span class='muted'>no concept scored</span>"
    )
    words = {k: ", ".join(html.escape(repr(strings[t])) for t in v) for k, v in lens.items()}
    explanation = report.get("explanations", {}).get(str(latent))
    if explanation and str(latent) in report.get("autointerp", {}):
        scores = report["autointerp"][str(latent)]
        explanation += (
            f" (detection {_two(scores['detection'])}, fuzzing {_two(scores['fuzzing'])})"
        )
    activity = (
        _activity(latent, examples, acts, ids, strings)
        if examples.fires[latent] > 0
        else f"<p class='muted'>Never fired on the {report['sparsity']['tokens']:,} scored tokens: "
        "no activations or contexts to show.</p>"
    )
    body = (
        f"<p><a href='../index.html'>overview</a></p><h1>Latent {latent}</h1>"
        f"<p>fires on {density:.3%} of tokens ({int(examples.fires[latent])}); {purity}</p>{where}"
        + (f"<p>Explanation: {html.escape(explanation)}</p>" if explanation else "")
        + f"<h2>Logit lens</h2><p>promotes: {words['promoted']}</p>"
        f"<p>suppresses: {words['suppressed']}</p>{activity}"
    )
    return _page(f"latent {latent}", body)


def _activity(
    latent: int,
    examples: TopActivations,
    acts: dict[int, list[float]],
    ids: Tensor,
    strings: list[str],
) -> str:
    """A latent's activation histogram, top and quantile contexts (it fired at least once)."""
    top_values, top_tokens = examples.top_examples(latent)
    peak = float(top_values.max())

    def contexts(tokens: Tensor) -> str:
        divs = []
        for token in tokens.tolist():
            context, values, hit = context_activations(ids, token, acts)
            divs.append(context_html(context, values, hit, strings, peak))
        return "".join(divs)

    bins = examples.quantile_examples(latent)
    sections = [("Top activations (one per window)", top_tokens)] + [
        (f"Quantile {i + 1} of {len(bins)} (activation {v.min():.2f} to {v.max():.2f})", t)
        for i, (v, t) in reversed(list(enumerate(bins)))
        if len(t)
    ]
    sample = examples.sample.entries(latent)[0]
    counts = torch.histc(sample, 20, 0, float(sample.max())).long().tolist()
    edges = torch.linspace(0, float(sample.max()), 21).tolist()
    hist = histogram_svg(counts, [f"{a:.2f}–{b:.2f}" for a, b in pairwise(edges)])
    return f"<h2>Activation histogram (sample of {len(sample)})</h2>{hist}" + "".join(
        f"<h2>{html.escape(title)}</h2>{contexts(t)}" for title, t in sections
    )
