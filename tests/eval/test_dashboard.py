"""`sae dashboard` on SmolLM2: the static site is complete, and loads in headless Chromium without
script errors."""

import re
import shutil
import subprocess

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
        patch.setattr(eval.report, "load_lm", lambda name, device="cpu": smollm2)
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
    assert "explained_variance" in index and "ce_loss_recovered" in index
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


def test_a_latent_with_nothing_to_judge_shows_as_unscored():
    """Auto-interp gives None for a latent without held-out contexts: the overview and its page
    say `unscored` (sorted below every score) instead of failing to format it."""
    d = make_sae("topk", d_sae=3)
    report = {
        "sparsity": {"density": [0.5, 0.25, 0.0], "log10_density_edges": [-1.0, 0.0],
                     "log10_density_histogram": [2], "dead_fraction": 1 / 3, "tokens": 4},
        "autointerp": {"0": {"detection": 0.75, "fuzzing": 0.5},
                       "1": {"detection": None, "fuzzing": None}},
        "explanations": {"0": "kings", "1": "queens"},
    }  # fmt: skip
    cells = re.findall(r"<td data-v='([^']*)'>([^<]*)</td></tr>", overview(d, report, [0, 1]))
    assert cells == [("0.75", "0.75"), ("-1", "unscored"), ("-1", "")]
    examples = TopActivations(3, top=2)
    z = torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    examples.add(z, 0)
    ids, strings = torch.tensor([[0, 1, 2, 3, 4]]), ["<s>", " a", " b", " c", " d"]
    lens = {"promoted": [1], "suppressed": [2]}
    page = latent_page(1, report, examples, {0: z[:, 1].tolist()}, ids, lens, strings)
    assert "Explanation: queens (detection unscored, fuzzing unscored)" in page


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
