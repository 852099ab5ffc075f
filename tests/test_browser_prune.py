"""The prune browser in a real browser: JupyterLab + Debian's chromium, driven by Playwright.

Reuses tests/test_browser.py's fixtures (a JupyterLab server on 127.0.0.1 over a temporary folder, Debian's
chromium or a clean skip; Playwright's own browser download is never used) and tests/test_dash_prune.py's tiny
dataset with hand-written scores. The notebook builds a PruneBrowser; the test reads the example ids on the page,
picks another kind in the kind dropdown and checks that the page then shows exactly that kind's examples, in score
order, with the summary strip's counts. Set NVILA_BROWSER_SCREENSHOT=/some/file.png to keep a screenshot.
"""
from __future__ import annotations

import json
import os

import pytest

from test_browser import CHROMIUM_ARGS, NOTEBOOK, chromium, lab, open_and_run  # noqa: F401  (fixtures)
from test_dash_prune import KEPT, TINY, _by_hand, tiny_set

SHOWN_JS = """() => Array.from(document.querySelectorAll('.nvl-prune-browser .nvl-prune-id'))
  .filter(e => e.offsetParent !== null).map(e => e.textContent)"""


def _notebook(root) -> None:
    _, rows = tiny_set(root / "data")
    (root / "scores.json").write_text(json.dumps(rows))
    nb = json.loads(json.dumps(NOTEBOOK))
    nb["cells"][0]["source"] = ("import json\nfrom types import SimpleNamespace\nfrom nvila_lab.dash_prune import PruneBrowser\n"
                                "scores = SimpleNamespace(rows=json.load(open('scores.json')))\n"
                                f"b = PruneBrowser(scores, 'data', kept_ids={KEPT!r})\nb")
    (root / "prune.ipynb").write_text(json.dumps(nb))


def _wait_shown(page, want: list[str]) -> None:
    page.wait_for_function(f"(want) => JSON.stringify(({SHOWN_JS})()) === JSON.stringify(want)", arg=want,
                           timeout=30_000)


@pytest.mark.browser
def test_prune_browser_filters_in_jupyterlab(chromium, lab, tmp_path):  # noqa: F811
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    _notebook(tmp_path / "root")
    everything = _by_hand("delta_sum", False)
    mislabelled = _by_hand("delta_sum", False, kinds={"mislabelled"})
    assert mislabelled == ["read_code_0_00001", "colour_0_00001"] and len(everything) == 8
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = open_and_run(browser, lab, "prune.ipynb", errors)
            page.locator(".nvl-prune-browser .nvl-prune-card").first.wait_for(timeout=60_000)
            _wait_shown(page, everything)  # all 8 on the first page, lowest delta_sum first

            # the kind dropdown (the fourth: score, order, subset, kind) -> only the mislabelled examples
            page.locator(".nvl-prune-browser .widget-dropdown select").nth(3).select_option(label="mislabelled")
            _wait_shown(page, mislabelled)
            summary = page.locator(".nvl-prune-browser .nvl-prune-summary").inner_text()
            assert "mislabelled" in summary and "easy" not in summary and "subset all, kind mislabelled" in summary
            assert set(page.locator(".nvl-prune-browser .nvl-prune-kind").all_inner_texts()) == {"mislabelled"}
            assert page.locator(".nvl-prune-browser .nvl-prune-true").all_inner_texts() == ["41", "red"]
            marks = page.locator(".nvl-prune-browser .nvl-prune-kept").all_inner_texts()
            assert marks == ["kept" if i in KEPT else "pruned" for i in mislabelled]

            # the kind "distracting" in descending order: the other dropdown follows too
            page.locator(".nvl-prune-browser .widget-dropdown select").nth(3).select_option(label="distracting")
            page.locator(".nvl-prune-browser .widget-dropdown select").nth(1).select_option(label="descending")
            _wait_shown(page, _by_hand("delta_sum", True, kinds={"distracting"}))
            # every shown card's image arrived and decoded
            page.wait_for_function("() => Array.from(document.querySelectorAll('.nvl-prune-browser img'))"
                                   ".filter(e => e.offsetParent !== null).every(e => e.complete && e.naturalWidth > 0)",
                                   timeout=15_000)
            shot = os.environ.get("NVILA_BROWSER_SCREENSHOT") or str(tmp_path / "prune.png")
            page.locator(".nvl-prune-browser").screenshot(path=shot)
        finally:
            browser.close()
    assert not [e for e in errors if "widget" in e.lower()], errors
    assert {TINY[i][0] for i in mislabelled} == {"mislabelled"}
