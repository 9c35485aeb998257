"""`eval.evaluate` and `sae eval`: every score of one SAE in one pass over held-out text.

Each batch of token windows runs the clean model once (recording the SAE's hookpoint), then the
three edited passes of the spliced-in loss; the recorded activations feed reconstruction, sparsity
and concept purity, so every metric is computed on exactly the same tokens (positions 1..; the
attention sink at position 0 is never scored). First-letter absorption runs afterwards on its own
spelling prompts (SAEBench's, on words from the tokenizer's vocabulary). The report is a flat dict of headline
numbers plus one nested dict per detailed score (schema in docs/eval.md).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import sae as sae_lib
from eval.concepts import (
    AbsorptionConfig,
    AbsorptionUndefined,
    SparseCodes,
    concept_labels,
    first_letter_absorption,
    latent_purity,
    purity_report,
    spelling,
)
from eval.meta_sae import MetaConfig, meta_sae_score
from eval.reconstruction import ReconstructionStats
from eval.replacement import HEADLINE as REPLACEMENT_HEADLINE
from eval.replacement import replacement_report
from eval.sparse_probing import ProbingConfig, probing_tasks, sparse_probing
from eval.sparsity import SparsityStats
from eval.splice import SplicedLosses, sae_variants
from eval.top_activations import TopActivations, n_latents
from sae.cli import positional
from sae.hooks import record
from sae.io import CFG_FILE, check_writable, load_set, write_json
from sae.layered import LayeredDictionary
from sae.lm import DEFAULT_MODEL, check_context, load_lm, resolve_hook
from sae.models import SAE
from sae.progress import progress
from train.cache import ActivationCache
from train.config import TextOptions
from train.data import load_documents, token_windows
from train.device import resolve_device

SCHEMA = "sae-forge/eval/1"
HEADLINE = (
    "explained_variance", "fvu", "mse", "cosine", "l2_ratio",
    "ce_clean", "ce_sae", "ce_zero_ablation", "ce_mean_ablation", "ce_loss_recovered", "kl_score",
    "l0", "dead_fraction", "dense_fraction",
)  # fmt: skip


@dataclass
class EvalConfig(TextOptions):
    """Score an SAE on held-out text: reconstruction, spliced-in LM loss, sparsity, concept purity
    and first-letter absorption, optionally SAEBench's sparse probing and meta-SAE score (or, with
    --synthetic, recovery of known features)."""

    sae: str = positional()
    """The SAE: a directory, hf:..., saelens:... or wandb:... (anything sae.load takes); a CLT,
    or a folder of per-layer transcoders, is scored as the replacement model."""
    model: str = ""
    """LM to run (default: the SAE's model_name, else the cache's model, else smollm2-135m)."""
    split: str = "test"
    """Dataset split; shakespeare's `test` holds 4 plays never trained on."""
    cache: str = ""
    """Take the token windows from this activation cache instead of the dataset (e.g. the held-out
    cache of `sae demo`), so the scores are on exactly the harvested tokens (and its context size)."""
    tokens: int = 50_000
    """Tokens to score (positions 1.. of each window, rounded up to whole windows); 0: every whole
    window of the dataset split or cache."""
    batch_size: int = 8
    """Windows per forward pass."""
    device: str = "cpu"
    """Device for the LM and the SAE."""
    concepts: bool = True
    """Score concept purity."""
    absorption: bool = True
    """Score first-letter absorption (SAEBench)."""
    absorption_words: int = 3000
    """Words to spell for absorption, drawn from the tokenizer's alphabetic tokens (0: all of them,
    as SAEBench; each word is one LM pass of about 90 tokens)."""
    absorption_icl: int = 10
    """Solved examples before each spelled word (SAEBench: 10; fewer make shorter prompts)."""
    probing: bool = False
    """Score SAEBench's sparse probing: k = 1, 2, 5, 10, 20 latents vs a dense probe on the LM's
    activations, on sae-probes' binary tasks. Costly: per task, up to 5000 prompts of up to 1024
    tokens and 66 logistic-regression fits (on 2 CPU cores, SmolLM2 layer 6: 10-60 s for a task
    of short prompts, 10 min for a task of news articles, hours for all 113)."""
    probing_tasks: list[str] = field(default_factory=list)
    """sae-probes tasks to probe (e.g. 117_us_state_FL 125_world_country_Italy); none: all 113,
    as SAEBench."""
    probing_data: str = ""
    """A folder laid out as sae-probes' data/ (empty: the installed sae-probes package's)."""
    meta: bool = False
    """Score SAEBench's meta-SAE composition: a BatchTopK meta-SAE (a quarter as wide, k 4) trained
    for 1500 steps on the decoder rows; the fraction of their variance it explains (about 20 s on
    2 CPU cores for 2304 latents, proportional to d_sae squared)."""
    meta_steps: int = 1500
    """Training steps of the meta-SAE (SAEBench: 1500; fewer for a quick look, the score still
    rising)."""
    synthetic: str = ""
    """Score recovery of ground-truth features instead: a YAML/JSON file of
    eval.synthetic.SyntheticConfig fields, or `default`; the SAE must have been trained on it."""
    json: str = ""
    """Write the report here as JSON."""

    def __post_init__(self) -> None:
        if self.json and Path(self.json).is_dir():  # found now, not after the whole evaluation
            raise ValueError(f"--json {self.json} is a directory; give a file name (eval.json)")
        if self.meta_steps <= 0:
            raise ValueError(f"--meta-steps must be positive, got {self.meta_steps}")


def evaluate(
    d: SAE | str,
    model: str = "",
    dataset: str = "shakespeare",
    split: str = "test",
    tokens: int = 50_000,
    **settings,
) -> dict:
    """Every score of one SAE as a dict (the same as `sae eval --json`); keywords as EvalConfig."""
    cfg = EvalConfig(
        sae=str(d) if isinstance(d, (str, Path)) else "",
        model=model,
        dataset=dataset,
        split=split,
        tokens=tokens,
        **settings,
    )
    if cfg.tokens < 0:  # before any model loads
        raise ValueError(f"--tokens must be positive, or 0 for every whole window; got {tokens}")
    if cfg.json:
        check_writable(Path(cfg.json).parent)
    cfg.device = str(resolve_device(cfg.device))  # no CUDA here: one line, not torch's assert
    d = load_dictionary(d) if isinstance(d, (str, Path)) else d
    if cfg.synthetic:
        return _synthetic_report(d, cfg)
    lm, tokenizer, ids, name = load_inputs(d, cfg)
    if isinstance(d, (LayeredDictionary, list)):
        return replacement_score(d, lm, tokenizer, ids, cfg, name)
    return score(d.to(cfg.device).eval(), lm, tokenizer, ids, cfg, name)


def load_dictionary(source: str | Path) -> SAE | LayeredDictionary | list[SAE]:
    """What `sae eval` scores: one dictionary (anything sae.load takes), or a local folder of
    per-layer transcoders (a training run's), scored together as the replacement model."""
    if Path(source).is_dir() and not (Path(source) / CFG_FILE).exists():
        found = load_set(source)
        return found[0] if len(found) == 1 else found
    return sae_lib.load(source)


class LatentCounts:
    """What a scoring pass counts per latent, batch by batch of codes [tokens, latents]: firing
    densities, the codes concept purity reads (tokens x L0 entries, kept only when asked), and a
    dashboard's examples when given."""

    def __init__(self, latents: int, concepts: bool, examples: TopActivations | None) -> None:
        self.sparsity = SparsityStats(latents)
        self.codes = SparseCodes(latents) if concepts else None
        self.examples, self.scored = examples, 0

    def add(self, z: Tensor) -> None:
        self.sparsity.add(z)
        if self.codes is not None:
            self.codes.add(z)
        if self.examples is not None:
            self.examples.add(z, self.scored)
        self.scored += len(z)

    def result(self, ids: Tensor, tokenizer) -> dict:
        """`sparsity`, and `concepts` when kept, over the tokens of windows `ids`."""
        out = {"sparsity": self.sparsity.result()}
        if self.codes is not None:
            out["concepts"] = concept_report(self.codes, ids, tokenizer)
        return out


def replacement_score(
    d: LayeredDictionary | list[SAE],
    lm: nn.Module,
    tokenizer,
    ids: Tensor,
    cfg: EvalConfig,
    name: str,
    examples: TopActivations | None = None,
) -> dict:
    """A CLT's, a crosscoder's or a transcoder set's report: eval.replacement's scores with every
    hookpoint it writes replaced at once, and per latent (numbered as eval.top_activations does)
    its density and, with cfg.concepts, concept purity at the layer it reads; `examples`, when
    given, collects each latent's top activations (the dashboard's pages). Absorption is a score
    of one dictionary at one hookpoint, not computed here."""
    parts = d if isinstance(d, list) else [d]
    for part in parts:
        part.to(cfg.device).eval()
    total = sum(n_latents(part) for part in parts)
    counts = LatentCounts(total, cfg.concepts, examples)
    report = replacement_report(d, lm, ids, cfg.batch_size, cfg.device, on_codes=counts.add)
    report |= counts.result(ids, tokenizer)
    first = parts[0].cfg
    hooks = first.hook_names if isinstance(d, LayeredDictionary) else [p.cfg.hook_name for p in d]
    report["meta"] = {
        "schema": SCHEMA, "sae": cfg.sae, "architecture": first.architecture,
        "dictionary": d.kind if isinstance(d, LayeredDictionary) else "transcoder_set",
        "d_sae": total, "hook_name": "+".join(hooks),
        "hook_names_out": [layer["hook_name_out"] for layer in report["layers"]],
        "model": name, "dataset": cfg.cache or cfg.dataset, "split": "" if cfg.cache else cfg.split,
        "windows": len(ids), "context_size": ids.shape[1], "tokens": ids[:, 1:].numel(),
    }  # fmt: skip
    _write(report, cfg.json)
    return report


def load_inputs(d: SAE, cfg: EvalConfig) -> tuple[nn.Module, Any, Tensor, str]:
    """The LM (refused before any forward pass if the SAE does not fit it), its tokenizer, the
    token windows to score [n, context_size] and the model's name. A cache's windows keep the
    length they were harvested with: cfg.context_size is set from it."""
    cache = ActivationCache(cfg.cache) if cfg.cache else None
    if cache:
        cfg.context_size = cache.manifest["context_size"]
    first = d[0] if isinstance(d, list) else d
    name = (
        cfg.model or first.cfg.model_name or (cache.manifest["model"] if cache else DEFAULT_MODEL)
    )
    lm, tokenizer = load_lm(name, device=cfg.device, revision=revision_for(first, cfg))
    check_fits(d, lm, name)
    check_context(lm, cfg.context_size)
    windows = (
        cache_windows(cache, tokenizer.bos_token_id) if cache else dataset_windows(tokenizer, cfg)
    )
    ids = take_tokens(
        windows, cfg.tokens, cfg.context_size, source=cfg.cache or f"{cfg.dataset} ({cfg.split})"
    )
    return lm, tokenizer, ids, name


def score(
    d: SAE,
    lm: nn.Module,
    tokenizer,
    ids: Tensor,
    cfg: EvalConfig,
    name: str,
    examples: TopActivations | None = None,
) -> dict:
    """The report on windows `ids`; `examples`, when given, also collects each latent's top
    activations and sample from the same pass (the dashboard's pages)."""
    recon, losses = ReconstructionStats(), SplicedLosses()
    counts = LatentCounts(d.cfg.d_sae, cfg.concepts, examples)
    hook, hook_out = d.cfg.hook_name, d.cfg.hook_name_out
    with progress(total=ids[:, 1:].numel(), unit="tok", desc="eval") as bar:
        for batch in ids.split(cfg.batch_size):
            batch = batch.to(cfg.device)
            with torch.no_grad(), record(lm, sorted({hook, hook_out})) as acts:
                logits = lm(batch).logits
            x = acts[hook][:, 1:].reshape(-1, d.cfg.d_in).float()
            y = acts[hook_out][:, 1:].reshape(-1, d.cfg.d_out).float()  # an SAE's: x
            with torch.no_grad():
                z = d.encode(x)
                recon.add(y, d.predict(x, z))
            counts.add(z)
            losses.add(lm, batch, logits, sae_variants(lm, d, acts[hook_out]))
            bar.update(len(x))

    counted = counts.result(ids, tokenizer)
    spars = counted["sparsity"]
    report = {
        **recon.result(),
        **losses.result(),
        **{k: spars[k] for k in ("l0", "dead_fraction", "dense_fraction")},
        **counted,
    }
    if cfg.absorption:
        absorption_cfg = AbsorptionConfig(
            words=cfg.absorption_words, icl_examples=cfg.absorption_icl
        )
        data = spelling(lm, tokenizer, d.cfg.hook_name, absorption_cfg)
        try:
            report["absorption"] = first_letter_absorption(d, data, absorption_cfg)
        except AbsorptionUndefined as e:  # a property of the model and layer: keep the rest
            report["absorption"] = {"undefined": str(e)}
            print(f"absorption left undefined: {e}", file=sys.stderr)
    if cfg.probing:
        probing_cfg = ProbingConfig(tasks=cfg.probing_tasks, data=cfg.probing_data)
        tasks = probing_tasks(lm, tokenizer, d.cfg.hook_name, probing_cfg)
        report["probing"] = sparse_probing(d, tasks, probing_cfg)
    if cfg.meta:
        report["meta_sae"] = meta_sae_score(d, MetaConfig(steps=cfg.meta_steps), cfg.device)
    report["meta"] = meta(d, cfg, name, ids)
    _write(report, cfg.json)
    return report


def concept_report(codes: SparseCodes, ids: Tensor, tokenizer) -> dict:
    """Concept purity of every latent over the tokens of windows `ids` (positions 1..)."""
    names, labels = concept_labels(ids, tokenizer)
    return {
        "names": names,
        "positives": labels.sum(0).tolist(),
        **purity_report(latent_purity(codes, labels), names),
    }


def hook_widths(d: SAE | LayeredDictionary | list[SAE]) -> list[tuple[str, int, str]]:
    """(hookpoint, width, which width) for every hookpoint the dictionary reads or writes."""
    if isinstance(d, list):
        return [entry for part in d for entry in hook_widths(part)]
    if isinstance(d, LayeredDictionary):
        outputs = getattr(d.cfg, "hook_names_out", [])  # a crosscoder writes what it reads
        return [(h, d.cfg.d_in, "d_in") for h in d.cfg.hook_names] + [
            (h, d.cfg.d_out, "d_out") for h in outputs
        ]
    return [(d.cfg.hook_name, d.cfg.d_in, "d_in"), (d.cfg.hook_name_out, d.cfg.d_out, "d_out")]


def check_fits(d: SAE | LayeredDictionary | list[SAE], lm: nn.Module, name: str) -> None:
    """Refuse, before any forward pass, a dictionary whose hookpoints or widths the model does not
    have (a transcoder's output too)."""
    for hook, size, what in hook_widths(d):
        point = resolve_hook(lm, hook)  # unknown hookpoints raise, listing valid ones
        width = point.width  # unknown for some module paths: the SAE's encode names a mismatch
        if width is not None and size != width:
            raise ValueError(
                f"SAE {what}={size} does not fit {name}'s hookpoint {hook!r}, which is {width} wide"
            )


def dataset_windows(tokenizer, cfg: EvalConfig) -> Iterator[Tensor]:
    docs = enumerate(load_documents(cfg.dataset, cfg.split, cfg.text_column))
    return (torch.from_numpy(w.tokens) for w in token_windows(tokenizer, docs, cfg.context_size))


def cache_windows(cache: ActivationCache, bos: int) -> Iterator[Tensor]:
    """The cache's windows as token ids (BOS, then the window's rows by position), in cache order.
    Harvest writes whole windows per shard and drops only position 0 and padding."""
    for i in range(len(cache.shards)):
        shard = cache.read_shard(i)
        order = torch.argsort(shard["windows"].long() * (1 << 20) + shard["positions"].long())
        windows, tokens = shard["windows"][order], shard["tokens"][order].long()
        counts = torch.unique_consecutive(windows, return_counts=True)[1]
        for span in tokens.split(counts.tolist()):
            yield torch.cat([torch.tensor([bos]), span])


def take_tokens(windows: Iterator[Tensor], tokens: int, context_size: int, source: str) -> Tensor:
    """Stack whole windows until `tokens` scored tokens (0: every whole window the source has);
    say how many were needed when the text is short."""
    if context_size < 2:
        raise ValueError(
            f"context_size must be at least 2 (BOS is never scored), got {context_size}"
        )
    per_window = context_size - 1
    whole = (w for w in windows if len(w) == context_size)
    if tokens == 0:
        chosen = list(whole)
        if not chosen:
            raise ValueError(f"{source} has no whole window of {context_size} tokens to score")
        return torch.stack(chosen)
    needed = -(-tokens // per_window)
    chosen = list(islice(whole, needed))
    if len(chosen) < needed:
        raise ValueError(
            f"{source} gave {len(chosen) * per_window} tokens in windows of {context_size}; "
            f"the evaluation needs {needed * per_window} (--tokens {tokens}, in whole windows): "
            "lower --tokens, or --tokens 0 for all of it"
        )
    return torch.stack(chosen)


def revision_for(d: SAE | LayeredDictionary, cfg: EvalConfig) -> str:
    """The model revision to run: the one the dictionary was trained on, unless another model or
    revision is asked for."""
    own = cfg.model in ("", d.cfg.model_name)
    return cfg.revision or (d.cfg.model_revision if own else "")


def meta(d: SAE, cfg: EvalConfig, model: str, ids: Tensor) -> dict:
    return {
        "schema": SCHEMA,
        "sae": cfg.sae,
        "architecture": d.cfg.architecture,
        "hook_name": d.cfg.hook_name,
        "d_in": d.cfg.d_in,
        "d_sae": d.cfg.d_sae,
        "model": model,
        "model_revision": revision_for(d, cfg),
        "dataset": cfg.cache or cfg.dataset,
        "split": "" if cfg.cache else cfg.split,
        "windows": len(ids),
        "context_size": ids.shape[1],
        "tokens": ids[:, 1:].numel(),
    }


def _synthetic_report(d: SAE, cfg: EvalConfig) -> dict:
    from eval.synthetic import SyntheticConfig, SyntheticData, recovery

    fields = {} if cfg.synthetic == "default" else _read_options(cfg.synthetic)
    data = SyntheticData(SyntheticConfig(**fields))
    try:
        scores = recovery(d, data)
    except ValueError as e:  # say which spec did not fit the SAE
        raise ValueError(f"--synthetic {cfg.synthetic}: {e}") from e
    report = {
        "synthetic": scores,
        "meta": {"schema": SCHEMA, "sae": cfg.sae, "synthetic": fields},
    }
    _write(report, cfg.json)
    return report


def _read_options(path: str) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text()) or {}


def _write(report: dict, path: str) -> None:
    if path:
        write_json(path, report)  # undefined scores (NaN in the returned dict) are null


def fmt(value: Any, spec: str = ".4g") -> str:
    """A report value for display: floats by `spec`, `n/a` where missing or NaN (null in the JSON
    files, decision 39)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec) if isinstance(value, float) else str(value)


def summaries(report: dict) -> list[tuple[str, str, str]]:
    """(name, value, detail) for each detailed score in the report: the lines of `table` and the
    rows of the dashboard's overview."""
    rows = []
    if "concepts" in report:
        c = report["concepts"]
        rows.append(("pure_fraction", f"{c['pure_fraction']:.4f}",
                     f"{c['latents_scored']} latents scored, precision >= {c['purity_threshold']}"))  # fmt: skip
    if "undefined" in report.get("absorption", {}):
        rows.append(("absorption_fraction", "undefined", report["absorption"]["undefined"]))
    elif "absorption" in report:
        a = report["absorption"]
        rows.append(("absorption_fraction", f"{a['mean_absorption_fraction']:.4f}",
                     f"full {a['mean_full_absorption_rate']:.4f}, {len(a['letters'])} letters"))  # fmt: skip
    if "probing" in report:
        p = report["probing"]
        for k in p["ks"]:
            rows.append((f"probing_top_{k}_accuracy", f"{p[f'sae_top_{k}_test_accuracy']:.4f}",
                         f"dense probe {p['llm_test_accuracy']:.4f}, {len(p['tasks'])} tasks"))  # fmt: skip
    if "meta_sae" in report:
        m = report["meta_sae"]
        rows.append(("meta_sae_fve", f"{m['decoder_fraction_variance_explained']:.4f}",
                     f"{m['meta_d_sae']} meta-latents, k {m['k']}"))  # fmt: skip
    rows += [
        (k, f"{v:.4f}", "") for k, v in report.get("synthetic", {}).items() if isinstance(v, float)
    ]
    return rows


def headline(report: dict) -> list[str]:
    """The headline scores a report has (a replacement model's or one dictionary's)."""
    return [k for k in (REPLACEMENT_HEADLINE if "layers" in report else HEADLINE) if k in report]


def table(report: dict) -> str:
    """The headline numbers and the summary of each detailed score, one line each."""
    lines = [f"{k:<22} {report[k]:.4f}" for k in headline(report)]
    lines += [
        f"{name:<22} {value}" + (f"  ({detail})" if detail else "")
        for name, value, detail in summaries(report)
    ]
    return "\n".join(lines)


def eval_cli(cfg: EvalConfig) -> None:
    settings = {
        k: v
        for k, v in asdict(cfg).items()
        if k not in ("sae", "model", "dataset", "split", "tokens")
    }
    report = evaluate(cfg.sae, cfg.model, cfg.dataset, cfg.split, cfg.tokens, **settings)
    print(table(report))
    if cfg.json:
        print(f"report written to {cfg.json}")
