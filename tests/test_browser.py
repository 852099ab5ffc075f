"""The token-budget dashboard in a real browser: JupyterLab + Debian's chromium, driven by Playwright.

Starts JupyterLab on a free port of 127.0.0.1 over a temporary folder holding one small notebook, runs it,
moves the max-tiles slider with the keyboard, picks another preset, adds a second image to the prompt and ticks
"tile every image", and checks that the visual-token count on the page follows. Needs chromium from the system
(`apt-get install -y chromium`); Playwright's own browser download is never used. Set
NVILA_BROWSER_SCREENSHOT=/some/file.png to keep a screenshot.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# The kit's JupyterLab settings override (overrides.json: no news popup, no update check); `make lab` passes the same.
LAB_SETTINGS_DIR = Path(__file__).resolve().parent.parent / "nbs" / ".jupyter" / "lab" / "settings"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": "dash", "metadata": {}, "outputs": [],
               "source": "from nvila_lab.dash import build_token_dashboard\nd = build_token_dashboard()\nd"}],
    "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}},
    "nbformat": 4, "nbformat_minor": 5,
}

# Resolves to the kernel's name once the current notebook's session is ready (null if it has none after 30 s).
READY_JS = """async () => {
  const timeout = new Promise(resolve => setTimeout(() => resolve(null), 30000));
  const ready = (async () => {
    const app = window.jupyterapp;
    while (!app.shell.currentWidget || !app.shell.currentWidget.sessionContext) {
      await new Promise(r => setTimeout(r, 100));
    }
    const ctx = app.shell.currentWidget.sessionContext;
    await ctx.ready;
    while (!ctx.session || !ctx.session.kernel || ctx.session.kernel.connectionStatus !== 'connected') {
      await new Promise(r => setTimeout(r, 100));
    }
    return ctx.session.kernel.name;
  })();
  return Promise.race([ready, timeout]);
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 45) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"JupyterLab did not answer at {url} within {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    "Stop the server we started, by its PID (it shuts its kernels down); its own process group as a last resort."
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group is the server's own (start_new_session): leftover kernels
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server over tmp_path/root with empty user settings and the repo's settings override (news and
    update checks off, as `make lab` runs it); yields its base URL."""
    pytest.importorskip("jupyterlab")
    pytest.importorskip("ipywidgets")
    root = tmp_path / "root"
    root.mkdir()
    (root / "dash.ipynb").write_text(json.dumps(NOTEBOOK))
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "MPLBACKEND": "Agg"}
    port = _free_port()
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", "--ServerApp.token=", "--ServerApp.password=",
           f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           f"--LabApp.app_settings_dir={LAB_SETTINGS_DIR}"]
    if os.getuid() == 0:
        cmd.append("--allow-root")
    log = tmp_path / "jupyterlab.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_server(f"{url}/api/status", proc, log)
        yield url
    finally:
        _stop(proc)


@pytest.fixture
def chromium() -> str:
    "Debian's chromium (never a browser Playwright downloads), or a skip that says how to get it."
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed: apt-get install -y chromium")
    return path


def _tile_all_tokens() -> int:
    "Visual tokens of the document and the panorama, each tiled on its own under NVILA-Lite (the checkbox's option)."
    from nvila_lab.budget import image_budget
    return image_budget((1344, 896), "nvila-lite-2b").visual_tokens + image_budget((1600, 400), "nvila-lite-2b").visual_tokens


TILE_ALL_TOKENS = _tile_all_tokens()


def open_and_run(browser, lab: str, notebook: str, errors: list):
    "A new page on `notebook` in the running JupyterLab: wait for its python3 kernel, then run all its cells."
    page = browser.new_page(viewport={"width": 1440, "height": 1400})
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{lab}/lab/tree/{notebook}", timeout=30_000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=30_000)
    kernel = page.evaluate(READY_JS)  # the notebook's kernel (python3, from its metadata) connected
    assert kernel == "python3", f"no python3 kernel in JupyterLab (got {kernel!r})"
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells'); null")
    return page


@pytest.mark.browser
def test_dashboard_updates_in_jupyterlab(chromium, lab, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = open_and_run(browser, lab, "dash.ipynb", errors)

            tokens = page.locator(".nvl-token-dashboard .nvl-tokens")
            tokens.wait_for(timeout=40_000)
            assert tokens.inner_text() == "3,072"  # NVILA-8B, 1344x896 document: 4x3 tiles of 256 tokens

            # the max-tiles slider (the dashboard's first slider), by keyboard: 12 -> 11 leaves 3x3 tiles
            handle = page.locator(".nvl-token-dashboard .widget-slider .noUi-handle").first
            handle.focus()
            handle.press("ArrowLeft")
            page.wait_for_function("document.querySelector('.nvl-token-dashboard .nvl-tokens').textContent === '2,304'",
                                   timeout=15_000)

            # a dropdown: NVILA-Lite's preset (its own tiling and 3x3 compressor): 847 tokens
            preset = page.locator(".nvl-token-dashboard .widget-dropdown select").nth(1)
            preset.select_option(label="nvila-lite-2b")
            page.wait_for_function("document.querySelector('.nvl-token-dashboard .nvl-tokens').textContent === '847'",
                                   timeout=15_000)
            # the table is redrawn just after the headline number: wait for it too, then read it
            page.wait_for_function("document.querySelector('.nvl-token-dashboard table.nvl-budget').textContent"
                                   ".includes('847')", timeout=15_000)
            assert "847" in page.locator(".nvl-token-dashboard table.nvl-budget").inner_text()

            # a second image in the same prompt: VILA's rule, one tile each (2 x 121 tokens under NVILA-Lite)
            page.locator(".nvl-token-dashboard .widget-select-multiple select").select_option(label="panorama.png  (1600x400)")
            page.wait_for_function("document.querySelector('.nvl-token-dashboard .nvl-tokens').textContent === '242'",
                                   timeout=15_000)
            # the checkbox tiles every image instead (the kit's option): 847 + the panorama's own Lite tiling
            page.locator(".nvl-token-dashboard .widget-checkbox input").check()
            page.wait_for_function("document.querySelector('.nvl-token-dashboard .nvl-tokens').textContent === '"
                                   f"{TILE_ALL_TOKENS:,}'", timeout=15_000)

            page.wait_for_timeout(300)  # let the images settle for the screenshot
            shot = os.environ.get("NVILA_BROWSER_SCREENSHOT") or str(tmp_path / "dashboard.png")
            page.locator(".nvl-token-dashboard").screenshot(path=shot)
        finally:
            browser.close()
    assert not [e for e in errors if "widget" in e.lower()], errors
