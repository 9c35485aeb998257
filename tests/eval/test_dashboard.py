"""`sae dashboard` on SmolLM2: the static site is complete, and loads in headless Chromium without
script errors."""

import errno
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import eval.dashboard
import eval.report
from eval.autointerp import ScriptedClient
from eval.dashboard import DashboardConfig, build_dashboard, latent_page, overview
from eval.top_activations import TopActivations
from tests.conftest import make_sae

CHROMIUM = shutil.which("chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def site(trained_sae, smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    trained_sae.save(root / "sae")
    with pytest.MonkeyPatch.context() as patch:  # the session's SmolLM2, not a second copy
        patch.setattr(eval.report, "load_lm", lambda name, device="cpu", revision="": smollm2)
        judge = ScriptedClient(lambda p: "line ends" if "short phrase" in p else "[1, 0, 1, 0, 1]")
        judges = []
        patch.setattr(
            eval.dashboard, "make_client", lambda spec, local_lm: judges.append(local_lm) or judge
        )
        cfg = DashboardConfig(
            sae=str(root / "sae"), out=str(root / "site"), tokens=16 * 63, latents=4,
            autointerp="local",
        )  # fmt: skip
        built = build_dashboard(cfg)
        assert judges == [smollm2], "the local judge is the LM already loaded, not a second copy"
        return built, trained_sae


def test_overview_lists_every_latent_and_links_the_pages(site):
    out, d = site
    index = (out / "index.html").read_text()
    pages = sorted(int(p.stem) for p in (out / "latents").glob("*.html"))
    assert len(pages) == 4
    assert index.count("<tr><td data-v=") == d.cfg.d_sae
    assert sorted(int(i) for i in re.findall(r"href='latents/(\d+)\.html'", index)) == pages
    for score in ("explained_variance", "fvu", "mse", "cosine", "ce_clean", "ce_sae", "kl_score"):
        assert f"<tr><td>{score}</td>" in index, score
    assert re.search(r"Scored on 1,008 tokens of shakespeare \(16 windows of 64\) through ", index)
    # the auto-interp column: a busy latent may have no silent context to judge (unscored)
    scores = re.findall(r"<td data-v='[-\d.]+'>(\d\.\d\d|unscored)</td></tr>", index)
    assert len(scores) == 4 and any(s != "unscored" for s in scores)


def test_latent_pages_show_highlighted_contexts_and_logit_lens(site):
    out, _ = site
    for page in (out / "latents").glob("*.html"):
        text = page.read_text()
        assert "Top activations" in text and "Quantile" in text and "promotes:" in text
        assert "Explanation: line ends (detection" in text
        hits = re.findall(r"class='tok hit' style='background:rgba\(255,120,0,([\d.]+)\)'", text)
        assert hits and max(float(a) for a in hits) == 1.0  # the peak token is fully coloured


def tiny_report(**scores) -> dict:
    """The report of a 3-latent SAE on 4 tokens (latent 2 dead), plus `scores`."""
    return {
        "sparsity": {"density": [0.5, 0.25, 0.0], "log10_density_edges": [-1.0, 0.0],
                     "log10_density_histogram": [2], "dead_fraction": 1 / 3, "tokens": 4},
        **scores,
    }  # fmt: skip


def tiny_page(latent: int, report: dict) -> str:
    """`latent`'s page, from the activations z [4 tokens, 3 latents] of one window."""
    examples = TopActivations(3, top=2, window=4)
    z = torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    examples.add(z, 0)
    ids, strings = torch.tensor([[0, 1, 2, 3, 4]]), ["<s>", " a", " b", " c", " d"]
    lens = {"promoted": [1], "suppressed": [2]}
    return latent_page(latent, report, examples, {0: z[:, latent].tolist()}, ids, lens, strings)


def test_a_latent_with_nothing_to_judge_shows_as_unscored():
    """Auto-interp gives None for a latent without held-out contexts: the overview and its page
    say `unscored` (sorted below every score) instead of failing to format it."""
    d = make_sae("topk", d_sae=3)
    report = tiny_report(
        autointerp={"0": {"detection": 0.75, "fuzzing": 0.5},
                    "1": {"detection": None, "fuzzing": None}},
        explanations={"0": "kings", "1": "queens"},
    )  # fmt: skip
    cells = re.findall(r"<td data-v='([^']*)'>([^<]*)</td></tr>", overview(d, report, [0, 1]))
    assert cells == [("0.75", "0.75"), ("-1", "unscored"), ("-1", "")]
    page = tiny_page(1, report)
    assert "Explanation: queens (detection unscored, fuzzing unscored)" in page


def test_a_missing_or_nan_headline_score_shows_as_na():
    """A report read from strict JSON has null where a score was NaN."""
    report = tiny_report(explained_variance=None, kl_score=math.nan, l0=2.0)
    index = overview(make_sae("topk", d_sae=3), report, [])
    assert re.findall(r"<tr><td>(\w+)</td><td>([^<]*)</td></tr>", index) == [
        ("explained_variance", "n/a"), ("kl_score", "n/a"), ("l0", "2.0000"),
    ]  # fmt: skip


def test_a_window_is_shown_once_among_the_top_activations():
    """Latent 0 fires on three tokens of the one window: one top context, at its peak 2.0 (the
    window was shown twice, with top 2)."""
    page = tiny_page(0, tiny_report())
    top = page.split("<h2>Top activations")[1].split("<h2>")[0]
    assert top.count("<div class='ctx'>") == 1
    assert re.findall(r"class='tok hit' style='[^']*' title='([\d.]+)'", top) == ["2.000"]


def test_a_latent_that_never_fired_gets_a_page_saying_so():
    """Latent 2 is silent on all 4 tokens: no histogram or context sections (they failed on the
    empty activations), but its logit lens."""
    page = tiny_page(2, tiny_report())
    assert "Never fired on the 4 scored tokens" in page and "promotes: &#x27; a&#x27;" in page
    assert "<h2>" in page and not re.search(r"<h2>(Activation|Top|Quantile)", page)


def test_the_activation_histogram_labels_each_bar_with_its_range():
    """Latent 0 fires at 1.0, 0.5 and 2.0: 20 bars of width 0.1 from 0 to its peak 2.0."""
    bars = re.findall(r"<title>([^<]*): (\d+)</title>", tiny_page(0, tiny_report()))
    assert len(bars) == 20 and bars[0] == ("0.00–0.10", "0") and bars[-1] == ("1.90–2.00", "1")
    assert [label for label, n in bars if n != "0"] == ["0.50–0.60", "1.00–1.10", "1.90–2.00"]


class CountedLen(list):
    """A list that counts how often its length is taken."""

    lens = 0

    def __len__(self):
        self.lens += 1
        return super().__len__()


def test_the_latent_table_is_linear_in_d_sae():
    """The empty concept columns were rebuilt per row: quadratic, 2.2 s at 32768 latents."""
    density = CountedLen([0.01] * 4096)
    report = tiny_report()
    report["sparsity"]["density"] = density
    index = overview(make_sae("topk", d_sae=4096), report, [])
    assert index.count("<tr><td data-v=") == 4096 and density.lens <= 2


def saved_sae(d, folder):
    d.save(folder)
    return str(folder)


def test_a_report_fixes_the_windows_of_the_pages(trained_sae, smollm2, tmp_path, monkeypatch):
    """The pages' counts were on the dashboard's own --tokens and --context-size (20k, 64) but
    the densities on the report's: `fires on 7.953% of tokens (69)`, 69 of 630 being 10.95%."""
    monkeypatch.setattr(eval.report, "load_lm", lambda name, device="cpu", revision="": smollm2)
    sae_dir = saved_sae(trained_sae, tmp_path / "sae")
    report = eval.report.evaluate(sae_dir, tokens=8 * 31, context_size=32, concepts=False,
                                  absorption=False, json=str(tmp_path / "e.json"))  # fmt: skip
    cfg = DashboardConfig(sae=sae_dir, out=str(tmp_path / "site"), report=str(tmp_path / "e.json"),
                          tokens=16 * 63, latents=3)  # fmt: skip
    out = build_dashboard(cfg)
    pages = {int(p.stem): p.read_text() for p in (out / "latents").glob("[0-9]*.html")}
    assert len(pages) == 3 and report["meta"]["tokens"] == 8 * 31
    for latent, page in pages.items():
        percent, count = re.search(r"fires on ([\d.]+)% of tokens \((\d+)\)", page).groups()
        assert int(count) == round(report["sparsity"]["density"][latent] * 8 * 31)
        assert float(percent) == pytest.approx(100 * int(count) / (8 * 31), abs=1e-3)

    # a disk that fills mid-write leaves the old pages whole, with no temporary file beside
    index = (out / "index.html").read_text()
    write_text = Path.write_text

    def disk_full_in(folder: str):
        def write(self, text, *args, **kwargs):
            if self.parent.name == folder:
                write_text(self, text[: len(text) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            return write_text(self, text, *args, **kwargs)

        return write

    for folder in (out.name, "latents"):  # index.html first, then the first latent page
        monkeypatch.setattr(Path, "write_text", disk_full_in(folder))
        with pytest.raises(OSError, match="No space"):
            build_dashboard(cfg)
        assert (out / "index.html").read_text() == index
        assert {int(p.stem): p.read_text() for p in (out / "latents").glob("*.html")} == pages
        assert not list(out.rglob("*.tmp"))


def test_one_pass_pages_equal_the_pages_of_an_eval_then_a_gather_pass(
    trained_sae, smollm2, tmp_path, monkeypatch
):
    """Without --report the dashboard's evaluation also fills the top-activation buffers (one pass
    over the windows); with a report of the same windows it gathers them in a pass of its own.
    The pages are the same, so the single pass costs nothing in what is shown."""
    monkeypatch.setattr(eval.report, "load_lm", lambda name, device="cpu", revision="": smollm2)
    sae_dir = saved_sae(trained_sae, tmp_path / "sae")
    windows = {"tokens": 8 * 63, "context_size": 64}
    eval.report.evaluate(sae_dir, **windows, absorption=False, json=str(tmp_path / "e.json"))
    one = build_dashboard(
        DashboardConfig(sae=sae_dir, out=str(tmp_path / "one"), latents=4, **windows)
    )
    two = build_dashboard(DashboardConfig(sae=sae_dir, out=str(tmp_path / "two"), latents=4,
                                          report=str(tmp_path / "e.json")))  # fmt: skip

    def pages(out: Path) -> dict[str, str]:
        return {p.name: p.read_text() for p in (out / "latents").glob("*.html")}

    assert len(pages(one)) == 4 and pages(one) == pages(two)


def test_latents_chosen_by_id_get_pages(trained_sae, smollm2, tmp_path, monkeypatch):
    """--latent-ids pages a rare latent and a dead one (`--latents 0`: these alone), both linked
    from the overview; the dead one is not sent to auto-interp and its page says it never fired.
    A page an earlier dashboard left in the folder, linked from nowhere now, is removed."""
    monkeypatch.setattr(eval.report, "load_lm", lambda name, device="cpu", revision="": smollm2)
    judge = ScriptedClient(lambda p: "rare things" if "short phrase" in p else "[1, 0, 1, 0]")
    monkeypatch.setattr(eval.dashboard, "make_client", lambda spec, local_lm: judge)
    sae_dir = saved_sae(trained_sae, tmp_path / "sae")
    report = eval.report.evaluate(sae_dir, tokens=8 * 31, context_size=32, concepts=False,
                                  absorption=False, json=str(tmp_path / "e.json"))  # fmt: skip
    density = report["sparsity"]["density"]
    rare = min((p, i) for i, p in enumerate(density) if p > 0)[1]
    dead = density.index(0.0)
    cfg = DashboardConfig(sae=sae_dir, out=str(tmp_path / "site"), report=str(tmp_path / "e.json"),
                          latents=0, latent_ids=[dead, rare, dead], autointerp="local")  # fmt: skip
    stale = tmp_path / "site" / "latents" / "9999.html"  # an earlier dashboard's page
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    (stale.parent / "notes.html").write_text("mine")  # not a page: kept
    out = build_dashboard(cfg)
    pages = {int(p.stem): p.read_text() for p in (out / "latents").glob("[0-9]*.html")}
    assert (out / "latents" / "notes.html").read_text() == "mine"
    assert sorted(pages) == sorted([rare, dead])
    index = (out / "index.html").read_text()
    assert sorted(int(i) for i in re.findall(r"href='latents/(\d+)\.html'", index)) == sorted(pages)
    assert "Top activations" in pages[rare] and "Explanation: rare things" in pages[rare]
    assert "Never fired on the 248 scored tokens" in pages[dead]
    assert "Explanation" not in pages[dead] and "Top activations" not in pages[dead]


def test_latent_ids_out_of_range_are_refused_before_running_the_model(
    trained_sae, tmp_path, monkeypatch
):
    def no_forward_pass(*args):
        raise AssertionError("the model ran before the ids were checked")

    monkeypatch.setattr(eval.dashboard, "load_inputs", no_forward_pass)
    sae_dir, d_sae = saved_sae(trained_sae, tmp_path / "sae"), trained_sae.cfg.d_sae
    for bad in (d_sae, -1):
        cfg = DashboardConfig(sae=sae_dir, out=str(tmp_path / "site"), latent_ids=[3, bad])
        with pytest.raises(
            ValueError, match=rf"--latent-ids {bad} is not a latent .* it has {d_sae} \(d_sae\)"
        ):
            build_dashboard(cfg)
    assert not (tmp_path / "site").exists()


def test_a_device_the_machine_lacks_is_refused_before_anything_loads(trained_sae, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = DashboardConfig(sae=saved_sae(trained_sae, tmp_path / "sae"), out=str(tmp_path / "site"),
                          device="cuda")  # fmt: skip
    with pytest.raises(ValueError, match="--device cuda: this machine has no CUDA device"):
        build_dashboard(cfg)
    assert not (tmp_path / "site").exists()


def test_a_report_of_another_sae_or_without_meta_is_refused(trained_sae, tmp_path):
    sae_dir = saved_sae(trained_sae, tmp_path / "sae")
    meta = {"d_sae": trained_sae.cfg.d_sae, "hook_name": trained_sae.cfg.hook_name, "windows": 1}
    for report, refusal in [
        ({}, "has no meta naming the windows"),
        ({"meta": {**meta, "d_sae": 7}}, f"d_sae 7, but .* has d_sae {trained_sae.cfg.d_sae}"),
        ({"meta": {**meta, "hook_name": "blocks.1.hook_resid_post"}},
         f"hook_name 'blocks.1.hook_resid_post', but .* has hook_name '{trained_sae.cfg.hook_name}'"),
    ]:  # fmt: skip
        (tmp_path / "e.json").write_text(json.dumps(report))
        cfg = DashboardConfig(
            sae=sae_dir, out=str(tmp_path / "site"), report=str(tmp_path / "e.json")
        )
        with pytest.raises(ValueError, match=refusal):
            build_dashboard(cfg)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make install adds it)")
def test_pages_load_in_headless_chromium_without_script_errors(site, tmp_path):
    out, d = site
    for page in [out / "index.html", *sorted((out / "latents").glob("*.html"))[:1]]:
        run = subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path}", "--enable-logging=stderr", "--v=0",
             "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        assert "Uncaught" not in run.stderr, run.stderr[-2000:]
        assert "</body>" in run.stdout
        if page.name == "index.html":
            assert run.stdout.count("<tr><td data-v=") == d.cfg.d_sae


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make install adds it)")
def test_the_latent_table_sorts_in_the_browser(site, tmp_path):
    out, _ = site
    url = (out / "index.html").as_uri() + "#sort=1"  # by density, largest first
    run = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    table = run.stdout.split('id="latents"')[1]
    rows = re.findall(r'<tr><td data-v="\d+">.*?</td><td>([^<]+)</td>', table)
    densities = [float(v) for v in rows]
    assert len(densities) > 100 and densities == sorted(densities, reverse=True)


def test_a_transcoders_dashboard_reads_its_input_and_scores_its_output(
    smollm2, tmp_path, monkeypatch
):
    """Pages of latents read at the MLP's input, with the output's explained variance and the CE
    loss with the MLP's output replaced; auto-interp explains and scores them like an SAE's."""
    monkeypatch.setattr(eval.report, "load_lm", lambda name, device="cpu", revision="": smollm2)
    monkeypatch.setattr(eval.dashboard, "make_client", lambda spec, local_lm: ScriptedClient(
        lambda p: "line ends" if "short phrase" in p else "[1, 0, 1, 0, 1]"))  # fmt: skip
    t = make_sae("topk", d_in=576, d_sae=48, k=4, hook_name="blocks.3.mlp.hook_in",
                 hook_name_out="blocks.3.hook_mlp_out", apply_b_dec_to_input=False,
                 model_name="smollm2-135m")  # fmt: skip
    t.save(tmp_path / "t")
    out = build_dashboard(DashboardConfig(sae=str(tmp_path / "t"), out=str(tmp_path / "site"),
                                          tokens=4 * 63, latents=3, autointerp="local"))  # fmt: skip
    index = (out / "index.html").read_text()
    assert (
        "transcoder, 48 latents reading blocks.3.mlp.hook_in, writing blocks.3.hook_mlp_out"
        in index
    )
    pages = sorted((out / "latents").glob("*.html"))
    assert len(pages) == 3 and "line ends" in pages[0].read_text()
    report = eval.report.evaluate(
        t, tokens=4 * 63, context_size=64, concepts=False, absorption=False
    )
    assert report["ce_sae"] > report["ce_clean"], (
        "the MLP's output replaced by a random transcoder's"
    )


def random_layered(kind: str):
    """A CLT over SmolLM2's MLPs 2 and 3, or a crosscoder over its residual stream after blocks 2
    and 3, TopK with random weights (the pages' plumbing, not what they find, is tested)."""
    from sae.clt import CLTConfig, CrossLayerTranscoder
    from sae.crosscoder import Crosscoder, CrosscoderConfig

    torch.manual_seed(0)
    if kind == "clt":
        d = CrossLayerTranscoder(CLTConfig(architecture="topk", d_in=576, d_sae=16, k=4,
            hook_names=["blocks.2.mlp.hook_in", "blocks.3.mlp.hook_in"],
            hook_names_out=["blocks.2.hook_mlp_out", "blocks.3.hook_mlp_out"],
            model_name="smollm2-135m"))  # fmt: skip
    else:
        d = Crosscoder(CrosscoderConfig(architecture="topk", d_in=576, d_sae=32, k=4,
            hook_names=["blocks.2.hook_resid_post", "blocks.3.hook_resid_post"],
            model_name="smollm2-135m"))  # fmt: skip
    with torch.no_grad():
        for t in d.parameters():
            t.normal_(0, 0.05)
    return d


@pytest.mark.parametrize("kind", ["clt", "crosscoder"])
def test_a_dictionary_over_several_layers_gets_pages_of_every_layers_latents(
    kind, smollm2, tmp_path, monkeypatch
):
    """Latents numbered layer by layer (a CLT's layer i latent j is i * d_sae + j), densities,
    concepts and examples from the replacement model's pass, and each page's decoder norm at every
    hookpoint the latent writes (a CLT latent: its own layer and the later ones)."""
    monkeypatch.setattr(eval.report, "load_lm", lambda name, device="cpu", revision="": smollm2)
    d = random_layered(kind)
    d.save(tmp_path / kind)
    n = d.cfg.total_latents
    chosen = [n - 1] if kind == "clt" else [0]  # a CLT's last layer: it writes only its own
    out = build_dashboard(DashboardConfig(sae=str(tmp_path / kind), out=str(tmp_path / "site"),
                                          tokens=4 * 63, latents=3, latent_ids=chosen))  # fmt: skip
    index = (out / "index.html").read_text()
    heading = (
        "cross-layer transcoder, 2 x 16 latents" if kind == "clt" else "crosscoder, 32 latents"
    )
    assert heading in index and "<td>ce_replacement</td>" in index and "pure_fraction" in index
    assert index.count("<tr><td data-v=") == n, "a row per latent of every layer"
    pages = {int(p.stem): p.read_text() for p in (out / "latents").glob("*.html")}
    assert chosen[0] in pages and 3 <= len(pages) <= 4  # the chosen may be among the 3 busiest
    norms = re.findall(r"<tr><td>(blocks\.\d\.[\w.]+)</td><td>([\d.]+)</td></tr>", pages[chosen[0]])
    directions = d.decoder_directions()[chosen[0]].unflatten(0, (2, 576)).norm(dim=-1)
    assert [float(v) for _, v in norms] == pytest.approx(directions.tolist(), abs=1e-3)
    if kind == "clt":
        assert "reads the CLT's layer 1 (blocks.3.mlp.hook_in), its latent 15" in pages[n - 1]
        assert [h for h, _ in norms] == ["blocks.2.hook_mlp_out", "blocks.3.hook_mlp_out"]
        assert float(norms[0][1]) == 0, "layer 1's latent writes nothing to layer 0's output"
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["l0"] == pytest.approx(report["l0"])  # per latent, per layer
    assert len(report["concepts"]["latent_concept"]) == n


def test_decoder_rows_of_chosen_latents_are_the_dictionarys_directions():
    """Read per latent (a CLT's whole decoder_directions() would not fit for wide ones), in the
    model's units whatever the scales."""
    from eval.dashboard import decoder_rows
    from tests.sae.test_clt import make_clt
    from tests.sae.test_crosscoder import SCALED, make_crosscoder

    clt = make_clt("topk", normalize_activations="expected_average_only_in",
                   norm_scaling_factors=[0.5, 2.0, 1.5], norm_scaling_factors_out=[3.0, 0.7, 1.1])  # fmt: skip
    for d in (clt, make_crosscoder(**SCALED)):
        latents = [0, d.cfg.total_latents - 1, d.cfg.total_latents // 2 + 1]
        expected = d.decoder_directions()[latents].unflatten(-1, (d.cfg.n_layers, -1))
        torch.testing.assert_close(decoder_rows(d, latents), expected)
    # the CLT's rows are its saved (folded) decoder blocks, zero before each latent's own layer
    folded = clt.folded_state_dict()
    n, f, width = clt.cfg.n_layers, clt.cfg.d_sae, clt.cfg.d_out
    whole = torch.cat([torch.nn.functional.pad(folded[f"layers.{i}.W_dec"], (i * width, 0))
                       for i in range(n)])  # fmt: skip
    torch.testing.assert_close(clt.decoder_directions(), whole)
    assert whole.shape == (n * f, n * width)
