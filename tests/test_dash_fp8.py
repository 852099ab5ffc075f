"""Headless tests of the FP8 dashboard (nvila_lab.dash_fp8): set widget values, compare the state and the HTML with
the functions underneath (fp8_layer_report, adamw_state_bytes, nvila_lab.fp8.speed), so a wrong number fails.

Outside a kernel, ipywidgets 8 runs observers synchronously when a `.value` is set, so each check reads the new
outputs on the next line.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")

from nvila_lab.config import ConfigError  # noqa: E402
from nvila_lab.dash_fp8 import (DASH_RECIPES, FP8Dashboard, build_fp8_dashboard, layer_memory,  # noqa: E402
                                linear_memory, quant_error)
from nvila_lab.fp8 import speed  # noqa: E402
from nvila_lab.fp8.linear import fp8_layer_report  # noqa: E402
from nvila_lab.fp8.optim import adamw_state_bytes  # noqa: E402
from test_browser import chromium, lab  # noqa: E402,F401  (the browser test's fixtures: JupyterLab server, chromium)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def dash(tmp_path):
    # a custom, small layer keeps the CPU's quantisation-error runs fast; an empty results folder: unmeasured
    d = build_fp8_dashboard(layer="qwen2-1.5b/k_proj", seq=512, results_folder=tmp_path)
    yield d
    d.close()


def test_preset_fills_the_shape_and_the_numbers_are_the_functions(dash):
    assert isinstance(dash, FP8Dashboard)
    assert (dash.k.value, dash.n.value, dash.m.value) == (1536, 256, 512)
    assert list(dash.recipe.options) == list(DASH_RECIPES)
    r = fp8_layer_report(64, 1024, 256, "tensorwise")  # M and K capped for the CPU, N as is
    assert dash.report["computed_at"] == (64, 1024, 256) and dash.report["reduced"]
    for key in ("sqnr_out_db", "sqnr_dgrad_db", "sqnr_wgrad_db"):
        assert dash.report[key] == r[key]
        assert f"{r[key]:.1f} dB" in dash.quant.value
    assert "computed on this CPU at M x K x N = 64x1024x256 (of 512 x 1536 x 256)" in dash.quant.value
    assert dash.speed["layer_step"] == speed.expected_step_speedup("qwen2-1.5b", 512, "h200", "tensorwise", seq_len=512)
    assert dash.speed["gemm"] == speed.gemm_speedup(512, 1536, 256, "h200")
    assert dash.speed["measured"] is None
    assert "unmeasured" in dash.summary.value and speed.UNMEASURED in dash.summary.value
    assert f"{dash.speed['layer_step']:.2f}x" in dash.summary.value
    assert bytes(dash.chart.value).startswith(PNG_MAGIC)


def test_memory_matches_the_kits_state_bytes(dash):
    k, n, m = 1536, 256, 512
    lin = dash.memory["linear"]
    assert lin["optimizer states"] == (adamw_state_bytes(k * n)["fp32"],) * 2  # tensorwise keeps fp32 moments
    dash.recipe.value = "coat"
    lin = dash.memory["linear"]
    assert lin["optimizer states"] == (adamw_state_bytes(k * n)["fp32"], adamw_state_bytes(k * n)["fp8"])
    assert lin["saved input"] == (2 * m * k, m * k + 4)
    assert lin["weight (+ FP8 copy)"] == (2 * k * n, 3 * k * n + 4)
    lay = dash.memory["layer"]
    assert lay == layer_memory("qwen2-1.5b", m, "coat")
    assert lay["saved for backward"][1] == sum(speed.layer_saved_bytes("qwen2-1.5b", m, "coat").values())
    assert lay["optimizer states"][0] / lay["optimizer states"][1] > 3.8  # the goal
    assert "layer: optimizer states" in dash.mem.value
    assert dash.speed["layer_step"] == speed.expected_step_speedup("qwen2-1.5b", m, "h200", "coat")


def test_custom_sizes_rowwise_device_and_batch(dash):
    dash.k.value = 100  # typing a size makes the layer custom
    assert dash.layer.value == "custom" and dash.memory["layer"] is None and dash.speed["layer_step"] is None
    assert dash.report == quant_error(512, 100, 256, "tensorwise")
    assert "k padded by 12" in dash.quant.value
    dash.recipe.value = "rowwise"
    assert dash.report["sqnr_out_db"] == fp8_layer_report(64, 100, 256, "rowwise")["sqnr_out_db"]
    assert dash.speed["linear_step"] == speed.linear_step_speedup(512, 100, 256, "h200", "rowwise")
    dash.device.value = "h100"
    assert dash.speed["linear_step"] == speed.linear_step_speedup(512, 100, 256, "h100", "rowwise")
    with dash.hold():
        dash.batch.value, dash.seq.value = 4, 256
    assert dash.m.value == 1024 and dash.speed["gemm"] == speed.gemm_speedup(1024, 100, 256, "h100")
    dash.layer.value = "qwen2-7b/down_proj"
    assert (dash.k.value, dash.n.value) == (18944, 3584) and dash.speed["layer_step"] is not None


def test_bad_input_keeps_the_last_good_state(dash):
    before = (dash.report, dash.speed)
    dash.batch.value = 0
    assert "batch must be at least 1" in dash.message and "batch must be at least 1" in dash.msg.value
    assert (dash.report, dash.speed) == before
    dash.batch.value = 1
    assert dash.message == "" and dash.msg.value == ""
    dash.k.value = -5
    assert "K must be a positive" in dash.message
    with pytest.raises(ConfigError, match="qwen2-7b/q_proj"):
        FP8Dashboard(layer="qwen2-7b/q_porj")
    with pytest.raises(ConfigError, match="tensorwise"):
        FP8Dashboard(recipe="fp4")


def test_measured_numbers_come_from_committed_gpu_json(tmp_path):
    rows = [{"shape": "qwen2-1.5b", "tokens": 2048, "column": "bf16", "ms": 12.0},
            {"shape": "qwen2-1.5b", "tokens": 2048, "column": "kit-tensorwise", "ms": 10.0}]
    (tmp_path / "fp8_step_testgpu.json").write_text(json.dumps(
        {"mode": "gpu", "date": "2026-01-01", "device": {"name": "TestGPU"}, "steps": rows}))
    d = build_fp8_dashboard(layer="qwen2-1.5b/k_proj", seq=2048, results_folder=tmp_path)
    try:
        assert d.speed["measured"] == pytest.approx(1.2)
        assert "1.20x" in d.summary.value and "measured on TestGPU" in d.summary.value
        d.recipe.value = "coat"  # no coat column in that run
        assert d.speed["measured"] is None
        d.recipe.value = "tensorwise"
        d.batch.value = 2  # the benchmark ran one sequence
        assert d.speed["measured"] is None
    finally:
        d.close()


@pytest.mark.browser
def test_fp8_dashboard_updates_in_jupyterlab(chromium, lab, tmp_path):
    "The dashboard in a real JupyterLab (the token dashboard's server and browser fixtures): a recipe change redraws."
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    from test_browser import CHROMIUM_ARGS, NOTEBOOK, READY_JS
    nb = json.loads(json.dumps(NOTEBOOK))
    nb["cells"][0]["source"] = ("from nvila_lab.dash_fp8 import build_fp8_dashboard\n"
                                "d = build_fp8_dashboard(layer='qwen2-1.5b/k_proj', seq=512)\nd")
    (tmp_path / "root" / "fp8.ipynb").write_text(json.dumps(nb))
    want = {r: f"{speed.expected_step_speedup('qwen2-1.5b', 512, 'h200', r):.2f}x" for r in ("tensorwise", "coat")}
    assert want["tensorwise"] != want["coat"]
    sel = "document.querySelector('.nvl-fp8-dashboard .nvl-fp8-expected')"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1200})
            page.goto(f"{lab}/lab/tree/fp8.ipynb", timeout=30_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=30_000)
            assert page.evaluate(READY_JS) == "python3"
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells'); null")
            page.locator(".nvl-fp8-dashboard .nvl-fp8-expected").wait_for(timeout=60_000)
            page.wait_for_function(f"{sel} && {sel}.textContent === '{want['tensorwise']}'", timeout=15_000)
            assert "unmeasured" in page.locator(".nvl-fp8-dashboard .nvl-fp8-measured").inner_text()
            page.locator(".nvl-fp8-dashboard .widget-dropdown select").nth(1).select_option(label="coat")
            page.wait_for_function(f"{sel}.textContent === '{want['coat']}'", timeout=30_000)
        finally:
            browser.close()
