"""The latency dashboard in a real browser: JupyterLab + Debian's chromium, driven by Playwright.

Reuses tests/test_browser.py's fixtures (a JupyterLab server on 127.0.0.1 over a temporary folder, started with
the repo's settings override as `make lab` is; Debian's chromium or a clean skip; Playwright's own browser
download is never used). The notebook builds a LatencyDashboard; the test moves a device dropdown, a precision
dropdown, the image-width slider and (after picking a video preset) the frames slider, by keyboard, reads the TTFT and decode tokens/s shown on the page and checks
them against `nvila-lab latency ... --json` for the same settings, within the display's rounding (half a unit of
the last digit shown). It also checks that fp8 on an A100 shows the CLI's own error, that the accuracy tab lists
the saved Table 7 rows, and that JupyterLab's news question never appears. Screenshots of each step go to
$NVILA_BROWSER_SCREENSHOTS (a folder) or to tmp_path/screenshots.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_browser import CHROMIUM_ARGS, NOTEBOOK, chromium, lab, open_and_run  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
DASH = ".nvila-latency-dashboard"
SHOWN_JS = "(css) => { const e = document.querySelector('" + DASH + " .' + css); return e ? e.textContent : null; }"


def _cli_has_latency() -> bool:
    return '"latency"' in (ROOT / "nvila_lab" / "cli.py").read_text()


def expected(settings) -> dict:
    """`nvila-lab latency ... --json` for `settings` (a LatencySettings), run as a separate process; before the CLI
    had the subcommand, `predict_latency(...).to_dict()` in-process (the same dict the CLI prints)."""
    if not _cli_has_latency():
        return settings.predict().to_dict()
    r = subprocess.run([sys.executable, "-m", "nvila_lab.cli", *settings.cli_args()], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"nvila-lab {' '.join(settings.cli_args())} failed:\n{r.stderr}"
    return json.loads(r.stdout)


def cli_error(settings) -> str:
    "The one-line error `nvila-lab latency` prints for a setting it refuses."
    r = subprocess.run([sys.executable, "-m", "nvila_lab.cli", *settings.cli_args()], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0, r.stdout
    return r.stderr.strip().splitlines()[-1]


def _notebook(root: Path) -> None:
    nb = json.loads(json.dumps(NOTEBOOK))
    nb["cells"][0]["source"] = "from nvila_lab.dash_latency import build_latency_dashboard\nd = build_latency_dashboard()\nd"
    (root / "latency.ipynb").write_text(json.dumps(nb))


def wait_for_numbers(page, want: dict, timeout: int = 30_000) -> dict:
    """Wait until the page's TTFT and decode tokens/s are within display rounding of `want` (the CLI's dict);
    return what the page shows. On a timeout, fail with the shown and expected numbers."""
    from nvila_lab.dash_latency import parse_shown, shown_tolerance
    check = """([dash, ttft, tps]) => {
      const read = css => { const e = document.querySelector(dash + ' .' + css); return e ? e.textContent : null; };
      const ok = (t, v) => { if (!t || !/[0-9]/.test(t)) return false; const s = t.replace(/,/g, '');
        const dec = s.includes('.') ? s.split('.')[1].length : 0;
        const tol = s.includes('.') ? 0.5 * 10 ** -dec : 0.5 * 10 ** Math.max(0, s.replace('-', '').length - 4);
        return Math.abs(parseFloat(s) - v) <= tol * (1 + 1e-9); };
      return ok(read('nvila-ttft'), ttft) && ok(read('nvila-decode'), tps); }"""
    try:
        page.wait_for_function(check, arg=[DASH, want["ttft_ms"], want["decode_tokens_per_s"]], timeout=timeout)
    except Exception:  # noqa: BLE001  (report the numbers, not Playwright's timeout)
        pass
    got = {css: page.evaluate(SHOWN_JS, css) for css in ("nvila-ttft", "nvila-decode", "nvila-visual-tokens")}
    for css, key in (("nvila-ttft", "ttft_ms"), ("nvila-decode", "decode_tokens_per_s")):
        text = got[css]
        assert text is not None and abs(parse_shown(text) - want[key]) <= shown_tolerance(text), \
            f"{css}: the page shows {text!r}, the CLI says {want[key]!r}"
    assert got["nvila-visual-tokens"] == f"{want['visual_tokens']:,}", (got, want["visual_tokens"])
    return got


def snap(page, path: Path) -> None:
    "A screenshot of the dashboard once its images have arrived and decoded."
    page.wait_for_function("() => Array.from(document.querySelectorAll('" + DASH + " img'))"
                           ".filter(e => e.offsetParent !== null).every(e => e.complete && e.naturalWidth > 0)",
                           timeout=15_000)
    page.wait_for_timeout(300)
    page.locator(DASH).screenshot(path=str(path))


@pytest.mark.browser
def test_latency_dashboard_matches_the_cli_in_jupyterlab(chromium, lab, tmp_path):  # noqa: F811
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    from nvila_lab.dash_latency import LatencySettings
    _notebook(tmp_path / "root")
    shots = Path(os.environ.get("NVILA_BROWSER_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = open_and_run(browser, lab, "latency.ipynb", errors)
            page.locator(f"{DASH} .nvila-ttft").wait_for(timeout=60_000)
            dropdown = lambda i: page.locator(f"{DASH} .widget-dropdown select").nth(i)  # noqa: E731
            # preset 0, device 1, compressor 2, temporal pool 3, ViT 4, LLM 5 (then the accuracy tab's metric)

            s = LatencySettings()  # NVILA-8B, H100, 1344x896, bf16 / bf16, 128 new tokens
            wait_for_numbers(page, expected(s))
            snap(page, shots / "1-h100-bf16.png")

            dropdown(1).select_option(label="L4")  # a device
            s = LatencySettings(device="l4")
            wait_for_numbers(page, expected(s))

            dropdown(5).select_option(label="w4a16")  # a precision: decode reads 4-bit weights
            s = LatencySettings(device="l4", llm="w4a16")
            shown = wait_for_numbers(page, expected(s))
            assert float(shown["nvila-decode"].replace(",", "")) > expected(LatencySettings(device="l4"))[
                "decode_tokens_per_s"] * 2  # the whole point of W4A16 on a bandwidth-starved GPU
            snap(page, shots / "2-l4-w4a16.png")

            # the image width (the first slider), by keyboard: 1344 -> 896 in seven 64-px steps
            handle = page.locator(f"{DASH} .widget-slider .noUi-handle").first
            handle.focus()
            for _ in range(7):
                handle.press("ArrowLeft")
            page.wait_for_function(f"document.querySelector('{DASH} .widget-slider .widget-readout').textContent"
                                   ".trim() === '896'", timeout=15_000)
            s = LatencySettings(device="l4", llm="w4a16", image=(896, 896))
            wait_for_numbers(page, expected(s))
            snap(page, shots / "3-l4-w4a16-896x896.png")

            # fp8 on an A100: the page shows the CLI's own refusal, and no number
            dropdown(1).select_option(label="A100 SXM 80GB")
            dropdown(4).select_option(label="fp8")
            message = cli_error(LatencySettings(device="a100", vit="fp8", llm="w4a16", image=(896, 896)))
            assert "no FP8 units" in message
            page.wait_for_function("(m) => { const e = document.querySelector('" + DASH + " .nvila-message');"
                                   " return e && m.includes(e.textContent.trim()) && e.textContent.trim().length > 10; }",
                                   arg=message, timeout=15_000)
            # the numbers are replaced by dashes (they may update a moment after the message: wait, do not race)
            page.wait_for_function("() => { const e = document.querySelector('" + DASH + " .nvila-ttft');"
                                   " return e && e.textContent.trim() === '\u2013'; }", timeout=15_000)
            assert page.evaluate(SHOWN_JS, "nvila-ttft") == "\u2013"

            snap(page, shots / "4-a100-fp8-refused.png")
            dropdown(4).select_option(label="w8a8")
            wait_for_numbers(page, expected(LatencySettings(device="a100", vit="w8a8", llm="w4a16", image=(896, 896))))

            # a video preset switches the input to video (its 256 frames, p = 8); then 8 more frames by keyboard
            dropdown(0).select_option(label="nvila-8b-video")
            v = dict(preset="nvila-8b-video", device="a100", vit="w8a8", llm="w4a16")
            wait_for_numbers(page, expected(LatencySettings(**v, video_frames=256)))
            frames = page.locator(f"{DASH} .widget-slider .noUi-handle").nth(2)  # width, height, frames, new tokens
            frames.focus()
            for _ in range(8):
                frames.press("ArrowRight")
            page.wait_for_function(f"document.querySelectorAll('{DASH} .widget-slider .widget-readout')[2].textContent"
                                   ".trim() === '264'", timeout=15_000)
            wait_for_numbers(page, expected(LatencySettings(**v, video_frames=264)))
            snap(page, shots / "5-video-264-frames.png")

            # the accuracy tab: Table 7's six saved rows and Table 1's settings
            page.locator(f"{DASH} .lm-TabBar-tab", has_text="accuracy vs latency").click()
            page.locator(f"{DASH} .nvila-quant-table").wait_for(state="visible", timeout=15_000)
            rows = json.loads((ROOT / "nbs" / "results" / "quant_table7.json").read_text())["rows"]
            text = page.locator(f"{DASH} .nvila-quant-table").inner_text()
            assert all(r["label"] in text for r in rows), text
            assert "TokenLearner" in page.locator(f"{DASH} .nvila-table1-table").inner_text()
            snap(page, shots / "6-accuracy-vs-latency.png")

            # the repo's settings override reached JupyterLab: no news question, ever
            fetch_news = page.evaluate("async () => (await (await fetch('/lab/api/settings/"
                                       "@jupyterlab/apputils-extension:notification')).json())"
                                       ".schema.properties.fetchNews.default")
            assert fetch_news == "false", fetch_news
            assert page.get_by_text("official Jupyter news").count() == 0
        finally:
            browser.close()
    assert not [e for e in errors if "widget" in e.lower()], errors
    assert len(list(shots.glob("*.png"))) >= 6
