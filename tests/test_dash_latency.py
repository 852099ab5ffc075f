"""Headless tests of the latency dashboard (nvila_lab.dash_latency): set widget values, read the HTML the page
shows and compare it with `predict_latency` of the same request written out by hand (or the saved results read
directly), so a wrong number fails.

Outside a kernel, ipywidgets 8 runs observers synchronously when a `.value` is set, so each check reads the new
outputs on the next line.
"""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")

from nvila_lab.config import get_config  # noqa: E402
from nvila_lab.dash_latency import (NO_MEASUREMENT, RESULTS_DIR, TABLE1_OVERRIDES, LatencyDashboard,  # noqa: E402
                                    LatencySettings, build_latency_dashboard, dashboard_numbers, fmt_num,
                                    load_measurements, load_quant_rows, load_table1, parse_shown, shown_tolerance)
from nvila_lab.latency import predict_latency  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def shown(html: str, css: str) -> str:
    "The text of the element with class `css` in an HTML fragment (the way the browser test reads the page)."
    m = re.search(f"class='{css}'[^>]*>([^<]*)<", html)
    assert m, f"no element of class {css!r} in {html[:300]}"
    return m.group(1)


def assert_shown(text: str, want: float) -> None:
    assert abs(parse_shown(text) - want) <= shown_tolerance(text), (text, want)


@pytest.fixture
def dash(tmp_path):
    d = build_latency_dashboard(results_folder=tmp_path)  # an empty folder: nothing measured, no accuracy files
    yield d
    d.close()


CASES = [  # (widget changes, the same request for predict_latency written out by hand)
    ({}, dict(preset="nvila-8b", device="h100", image=(1344, 896))),
    ({"device": "l4", "llm": "w4a16"}, dict(preset="nvila-8b", device="l4", image=(1344, 896), llm="w4a16")),
    ({"device": "h200", "vit": "fp8", "width": 448, "height": 448, "new_tokens": 512},
     dict(preset="nvila-8b", device="h200", image=(448, 448), vit="fp8", new_tokens=512)),
    ({"device": "cpu", "preset": "tiny"}, dict(preset="tiny", device="cpu", image=(1344, 896))),
    ({"device": "rtx4090", "compressor": "stc3x3", "vit": "w8a8"},
     dict(preset=get_config("nvila-8b").replace(projector="stc3x3"), device="rtx4090", image=(1344, 896), vit="w8a8")),
    ({"preset": "nvila-8b-video", "device": "jetson-orin"},
     dict(preset="nvila-8b-video", device="jetson-orin", image=None, video_frames=256)),
    ({"preset": "nvila-8b-video", "frames": 64, "pool": 4},
     dict(preset=get_config("nvila-8b-video").replace(temporal_pool=4), device="h100", image=None, video_frames=64)),
]


@pytest.mark.parametrize("changes,ref", CASES)
def test_shown_numbers_are_predict_latencys(dash, changes, ref):
    with dash.hold():
        for k, v in changes.items():
            getattr(dash, k).value = v
    p = predict_latency(**ref)
    assert dash.message == ""
    html = dash.summary.value
    assert_shown(shown(html, "nvila-ttft"), p.ttft_ms)
    assert_shown(shown(html, "nvila-decode"), p.decode_tokens_per_s)
    assert_shown(shown(html, "nvila-total"), p.total_ms)
    assert_shown(shown(html, "nvila-memory"), p.memory_bytes / 1e9)
    assert shown(html, "nvila-visual-tokens") == f"{p.budget.visual_tokens:,}"
    assert shown(html, "nvila-positions") == f"{p.budget.llm_positions:,}"
    assert shown(html, "nvila-passes") == str(p.budget.vit_passes)
    for stage, cost in p.stages.items():
        assert_shown(shown(dash.stages_table.value, f"nvila-stage-{stage}"), cost.ms)
    assert dash.numbers["ttft_ms"] == p.ttft_ms and dash.numbers["stages"] == {k: v.ms for k, v in p.stages.items()}
    assert NO_MEASUREMENT in dash.status.value
    assert bytes(dash.chart.value).startswith(PNG_MAGIC)


def test_a_flipped_precision_moves_the_right_stage(dash):
    before = dict(dash.numbers["stages"])
    dash.llm.value = "w4a16"  # decode is weight-bound: faster; the tower is untouched
    after = dash.numbers["stages"]
    assert after["decode_per_token"] < before["decode_per_token"] / 2 and after["vision"] == before["vision"]
    dash.vit.value = "fp8"  # the tower's linears at the FP8 rate: the tower is faster, decode unchanged
    assert dash.numbers["stages"]["vision"] < after["vision"]
    assert dash.numbers["stages"]["decode_per_token"] == after["decode_per_token"]


def test_fp8_on_a100_shows_the_models_message(dash):
    dash.device.value = "a100"
    dash.vit.value = "fp8"
    with pytest.raises(Exception) as e:
        predict_latency("nvila-8b", "a100", vit="fp8")
    assert dash.message == str(e.value) and "no FP8 units" in dash.msg.value
    assert dash.numbers is None and dash.prediction is None
    assert shown(dash.summary.value, "nvila-ttft") == "\u2013"  # no stale number under the new setting
    assert dash._fig.texts[0].get_text() == "refused: " + str(e.value)  # nor a stale chart
    assert not dash._fig.axes
    assert "a100" in repr(dash) and "refused" in repr(dash)
    dash.vit.value = "w8a8"  # back to a setting it accepts
    assert len(dash._fig.axes) == 1 and not dash._fig.texts
    assert dash.message == "" and dash.numbers["ttft_ms"] == predict_latency("nvila-8b", "a100", vit="w8a8").ttft_ms
    for device in ("jetson-orin",):
        dash.device.value, dash.vit.value = device, "fp8"
        assert "no FP8 units" in dash.message


def test_frames_not_a_multiple_of_the_pooling(dash):
    dash.preset.value = "nvila-8b-video"
    assert (dash.input_kind.value, dash.frames.value, dash.pool.value) == ("video", 256, 8)
    assert dash.width.disabled and not dash.frames.disabled
    dash.frames.value = 30
    assert "multiple" in dash.message and dash.numbers is None
    dash.pool.value = 2
    assert dash.message == ""
    dash.preset.value = "nvila-8b"  # back to an image preset: its compressor and pooling, image input
    assert (dash.input_kind.value, dash.compressor.value, dash.pool.value) == ("image", "stc2x2", 1)


def test_the_cli_line_is_the_same_request(dash):
    dash.device.value, dash.llm.value = "l4", "w4a16"
    assert "nvila-lab latency --preset nvila-8b --device l4 --image 1344x896 --vit bf16 --llm w4a16" in dash.cli.value
    dash.compressor.value = "imagepool"
    assert "no CLI flag" in dash.cli.value


def test_measurement_overlay_matches_a_fake_jsonl(tmp_path):
    rec = dict(device="NVIDIA H100 80GB HBM3", device_kind="gpu", preset="nvila-8b", input="448x448", vit="bf16",
               llm="bf16")
    lines = [dict(rec, stage="preprocess", median_ms=3.0, min_ms=2.5, max_ms=3.5),
             dict(rec, stage="vision", median_ms=99.0, min_ms=98.0, max_ms=100.0),
             dict(rec, stage="vision", median_ms=21.5, min_ms=21.0, max_ms=22.0),  # the later record wins
             dict(rec, stage="prefill", median_ms=48.25, min_ms=47.0, max_ms=49.0),
             dict(rec, llm="awq", stage="decode_per_token", median_ms=2.0, min_ms=1.9, max_ms=2.1),
             dict(rec, input="1344x896", stage="projector", median_ms=1.0, min_ms=1.0, max_ms=1.0)]
    (tmp_path / "latency_h100.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\nnot json\n")
    assert len(load_measurements(tmp_path)) == len(lines)
    d = build_latency_dashboard(results_folder=tmp_path, image=(448, 448))
    try:
        assert {k: r["median_ms"] for k, r in d.measured.items()} == {"preprocess": 3.0, "vision": 21.5, "prefill": 48.25}
        assert shown(d.stages_table.value, "nvila-measured-vision") == fmt_num(21.5) == "21.50"
        assert shown(d.stages_table.value, "nvila-measured-prefill") == "48.25"
        assert "3 stage(s) from latency_h100.jsonl" in d.status.value and NO_MEASUREMENT not in d.status.value
        ax = d._fig.axes[0]
        assert sorted(round(p.get_width(), 6) for p in ax.patches if p.get_hatch()) == [3.0, 21.5, 48.25]
        d.llm.value = "w4a16"  # the AWQ record counts as w4a16: only its decode step matches
        assert {k: r["median_ms"] for k, r in d.measured.items()} == {"decode_per_token": 2.0}
        d.device.value = "h200"
        assert d.measured == {} and NO_MEASUREMENT in d.status.value
    finally:
        d.close()


def test_accuracy_view_loads_the_saved_results():
    d = build_latency_dashboard(device="h200")
    try:
        raw = json.loads((RESULTS_DIR / "quant_table7.json").read_text())["rows"]
        pts = d.accuracy_points
        assert [(r["label"], r["accuracy"], r["ttft_ms"]) for r in pts["quant"]] == \
            [(r["label"], r["accuracy"], r["ttft"]["median_ms"]) for r in raw]
        rows, metrics = load_table1()
        assert "fine_accuracy" in metrics and "count" in metrics and "visual_tokens" not in metrics
        assert [p["setting"] for p in pts["table1"]] == [r["setting"] for r in rows]
        for p, r in zip(pts["table1"], rows):
            cfg = get_config("nvila-8b").replace(**TABLE1_OVERRIDES[r["setting"]])
            assert p["ttft_ms"] == predict_latency(cfg, "h200", image=(1792, 1344)).ttft_ms
            assert p["accuracy"] == r["fine_accuracy"]
        d.metric.value = "count"
        assert [p["accuracy"] for p in d.accuracy_points["table1"]] == [r["count"] for r in rows]
        assert "count" in d.acc_table.value and "TTFT ms on H200" in d.acc_table.value
        d.device.value = "l4"  # the Table 1 TTFTs follow the device
        assert d.accuracy_points["table1"][1]["ttft_ms"] == predict_latency("nvila-8b", "l4", image=(1792, 1344)).ttft_ms
        assert bytes(d.acc_chart.value).startswith(PNG_MAGIC)
        assert len(load_quant_rows()) == len(raw) == 6
    finally:
        d.close()


def test_settings_and_numbers_without_widgets():
    s = LatencySettings("nvila-lite-2b", "l4", (896, 448), llm="w4a16", new_tokens=32)
    n, p = dashboard_numbers(s), predict_latency("nvila-lite-2b", "l4", image=(896, 448), llm="w4a16", new_tokens=32)
    assert n["ttft_ms"] == p.ttft_ms and n["memory_gb"] == p.memory_bytes / 1e9 and n["fits"]
    assert s.cli_args() == ["latency", "--preset", "nvila-lite-2b", "--device", "l4", "--image", "896x448", "--vit",
                            "bf16", "--llm", "w4a16", "--new-tokens", "32", "--json"]
    assert not dashboard_numbers(LatencySettings("nvila-8b-video", "l4", video_frames=512, new_tokens=2048,
                                                 temporal_pool=1))["fits"]  # 24 GB is too little there


def test_unknown_names_raise_before_any_widget():
    with pytest.raises(Exception, match="preset"):
        LatencyDashboard(LatencySettings(preset="nvila-9b"))
    with pytest.raises(Exception, match="device"):
        LatencyDashboard(LatencySettings(device="h300"))
