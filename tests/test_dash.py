"""Headless tests of the token-budget dashboard (nvila_lab.dash): set widget values, check the state and the HTML.

Outside a kernel, ipywidgets 8 runs observers synchronously when a `.value` is set, so every check can read
the new outputs on the next line. The browser test (tests/test_browser.py) checks the same thing in JupyterLab.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")

from nvila_lab.budget import image_budget  # noqa: E402
from nvila_lab.budget import prompt_budget  # noqa: E402  (the budget's, not a copy in the dashboard)
from nvila_lab.config import list_presets  # noqa: E402
from nvila_lab.dash import (TokenDashboard, build_token_dashboard, build_video_dashboard, default_images,  # noqa: E402
                            human_flops, parse_scales, parse_settings)

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def as_upload(name: str, data: bytes) -> tuple[dict, ...]:
    "What ipywidgets 8's FileUpload holds after a user picks one file."
    return ({"name": name, "type": "", "size": len(data), "content": memoryview(data),
             "last_modified": datetime.datetime.now(datetime.timezone.utc)},)


def png_bytes(size=(800, 600), colour="teal") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def samples():
    return default_images()


@pytest.fixture
def dash(samples):
    d = build_token_dashboard(samples)
    yield d
    d.close()


def test_defaults_show_nvila_8b_on_the_document(dash):
    assert isinstance(dash, TokenDashboard)
    assert (dash.image.value, dash.preset.value, dash.mode.value) == ("document.png", "nvila-8b", "dynamic_s2")
    assert (dash.scales.value, dash.compressor.value, dash.max_tiles.value) == ("448,896,1344", "stc2x2", 12)
    b = dash.budget
    assert (b.grid, b.vit_passes, b.visual_tokens, b.separators) == ((4, 3), 17, 3072, 1)
    assert b.llm_positions == 3072 + 1 + dash.text_tokens.value
    assert dash.message == "" and dash.msg.value == ""
    assert "3,072" in dash.summary.value and "3,072" in dash.table.value
    assert "TFLOPs" in dash.table.value
    assert bytes(dash.picture.value).startswith(PNG_MAGIC) and bytes(dash.chart.value).startswith(PNG_MAGIC)
    # the numbers are image_budget's, for the same config
    assert dash.budget == image_budget((1344, 896), dash.config, text_tokens=dash.text_tokens.value)


def test_controls_cover_presets_modes_and_compressors(dash):
    from nvila_lab.compress import available_compressors
    from nvila_lab.config import TILING_MODES
    assert list(dash.preset.options) == list_presets()
    assert [v for _, v in dash.mode.options] == list(TILING_MODES)
    assert set(available_compressors()) <= set(dash.compressor.options)
    assert [v for _, v in dash.image.options] == ["document.png", "grace_hopper.jpg", "panorama.png"]


def test_preset_switch_resets_the_controls(dash):
    dash.preset.value = "nvila-lite-2b"
    assert (dash.mode.value, dash.compressor.value, dash.max_tiles.value) == ("dynamic", "stc3x3", 12)
    assert (dash.budget.tiles, dash.budget.visual_tokens, dash.budget.vit_passes) == (7, 847, 7)
    assert "847" in dash.summary.value
    assert dash.scales.disabled and not dash.max_tiles.disabled
    dash.preset.value = "nvila-8b"
    assert dash.budget.visual_tokens == 3072 and not dash.scales.disabled


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_gives_a_budget(dash, preset):
    dash.preset.value = preset
    assert dash.message == ""
    assert dash.budget.preset == preset and dash.budget.visual_tokens > 0


def test_scales_change_the_passes_and_the_slider_bounds(dash):
    assert dash.max_tiles.min == 9
    dash.scales.value = "448,896"
    assert dash.max_tiles.min == 4
    assert (dash.budget.grid, dash.budget.vit_passes) == ((3, 2), 1 + 6)
    dash.max_tiles.value = 4
    assert (dash.budget.grid, dash.budget.vit_passes, dash.budget.visual_tokens) == ((2, 2), 5, 4 * 256)
    dash.scales.value = "448,896,1344,1792"  # at least 16 tiles at 1792: the value follows the new minimum
    assert (dash.max_tiles.min, dash.max_tiles.value) == (16, 16)
    assert dash.max_tiles.max >= 16 + 12
    assert dash.budget.vit_passes == 1 + 4 + 9 + 16
    dash.scales.value = "448, 896, 1344"
    assert dash.max_tiles.min == 9 and dash.max_tiles.value == 16  # a larger value stays allowed
    dash.max_tiles.value = 9
    assert (dash.budget.grid, dash.budget.visual_tokens) == ((3, 3), 2304)


def test_slider_bounds_follow_the_mode(dash):
    dash.mode.value = "dynamic"
    assert dash.max_tiles.min == 1 and not dash.max_tiles.disabled
    dash.max_tiles.value = 1
    assert (dash.budget.vit_passes, dash.budget.visual_tokens) == (1, 256)  # one tile, no thumbnail
    for mode in ("s2", "resize"):
        dash.mode.value = mode
        assert dash.max_tiles.disabled
    assert (dash.budget.vit_passes, dash.budget.visual_tokens) == (1, 256)
    dash.mode.value = "s2"
    assert not dash.scales.disabled
    assert (dash.budget.vit_passes, dash.budget.visual_tokens) == (1 + 4 + 9, 256)  # merged to the smallest scale


@pytest.mark.parametrize("text, words", [("448,abc", "not pixel sizes"), ("", "not pixel sizes"),
                                         ("448,900", "multiple"), ("896,448", "increasing"), ("0,448", "positive"),
                                         ("448,8960", "larger than this dashboard allows")])
def test_invalid_scales_show_a_message_and_keep_the_state(dash, text, words):
    before = (dash.budget, dash.table.value, dash.picture.value, dash.max_tiles.min)
    dash.scales.value = text
    assert words in dash.message, dash.message
    assert "#a02020" in dash.msg.value and words in dash.msg.value  # shown, in red
    assert (dash.budget, dash.table.value, dash.picture.value, dash.max_tiles.min) == before
    dash.scales.value = "448,896,1344"
    assert dash.message == "" and dash.msg.value == ""


def test_compressor_and_text_tokens(dash):
    dash.compressor.value = "stc3x3"
    assert dash.budget.visual_tokens == 12 * 121
    dash.compressor.value = "avgpool"
    assert dash.budget.visual_tokens == 3072
    assert dash.budget.projector_flops < image_budget((1344, 896), "nvila-8b").projector_flops
    dash.compressor.value = "tokenlearner"
    assert dash.budget.visual_tokens == 12 * 121
    dash.text_tokens.value = 1024
    assert dash.budget.llm_positions == 12 * 121 + 1 + 1024


def test_change_column_and_references(dash):
    dash.max_tiles.value = 9
    assert "\u2212768" in dash.table.value  # 4x3 -> 3x3 tiles: 768 visual tokens fewer
    assert "was 4 x 3" in dash.table.value
    refs = dash.references
    assert set(refs) == {"nvila-8b as shipped", "resize baseline (1 tile)"}
    assert refs["nvila-8b as shipped"].visual_tokens == 3072
    assert (refs["resize baseline (1 tile)"].vit_passes, refs["resize baseline (1 tile)"].visual_tokens) == (1, 256)


def test_image_choice_and_upload(dash):
    dash.image.value = "panorama.png"
    assert dash.budget.input == "1600x400" and dash.budget.grid == (6, 2)
    dash.upload.value = as_upload("tall.png", png_bytes((300, 1800)))
    assert dash.message == ""
    assert dash.image.value == "upload: tall.png" and dash.budget.input == "300x1800"
    assert "upload: tall.png" in [v for _, v in dash.image.options]
    assert dash.upload.value == ()  # cleared, so the same file can be picked again


@pytest.mark.parametrize("data", [b"", b"not an image at all", png_bytes()[:60]])
def test_bad_upload_shows_the_image_error(dash, data):
    before = (dash.image.value, dash.budget)
    dash.upload.value = as_upload("broken.png", data)  # must not raise
    assert dash.message.startswith("upload 'broken.png': "), dash.message
    assert "broken.png" in dash.msg.value
    assert (dash.image.value, dash.budget) == before
    assert "upload: broken.png" not in [v for _, v in dash.image.options]


def test_add_image_api(dash):
    from nvila_lab.images import ImageError
    assert dash.add_image("square", Image.new("RGB", (448, 448))) == "square"
    assert (dash.image.value, dash.budget.grid, dash.budget.visual_tokens) == ("square", (3, 3), 2304)
    with pytest.raises(ImageError):
        dash.add_image("bad", b"nope")


def test_hold_updates_once(dash, monkeypatch):
    n = []
    monkeypatch.setattr(dash, "_chart_png", lambda real=dash._chart_png: n.append(1) or real())
    with dash.hold():
        dash.preset.value = "nvila-lite-2b"
        dash.max_tiles.value = 6
        assert dash.budget.visual_tokens == 3072 and n == []  # nothing recomputed inside the block
    assert (dash.budget.preset, dash.budget.vit_passes) == ("nvila-lite-2b", 6 + 1)
    assert len(n) == 1


def test_fallback_images_without_the_samples_folder(tmp_path):
    imgs = default_images(tmp_path / "missing")
    assert sorted(imgs) == ["document (drawn)", "panorama (drawn)"]
    d = build_token_dashboard(imgs, preset="nvila-lite-2b")
    assert d.image.value == "document (drawn)" and d.budget.visual_tokens == 847
    d.close()


def test_unknown_preset_raises_at_build():
    from nvila_lab.config import ConfigError
    with pytest.raises(ConfigError, match="did you mean 'nvila-8b'"):
        build_token_dashboard(preset="nvila-8")


def test_static_copy_and_repr(dash):
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "3,072" in bundle["text/html"] and "data:image/png;base64," in bundle["text/html"]
    assert repr(dash) == "TokenDashboard(nvila-8b, document.png: 3072 visual tokens, 17 vision passes)"


def test_helpers():
    assert human_flops(61.8e12) == "61.8 TFLOPs" and human_flops(5e6) == "5 MFLOPs"
    assert parse_scales("448 896\t1344") == (448, 896, 1344)
    with pytest.raises(ValueError, match="not pixel sizes"):
        parse_scales("448,-896")


def test_updates_are_fast(dash):
    "An update at the real presets' sizes takes well under a second (about 50 ms on a 2-core CPU)."
    moves = [("max_tiles", 9), ("max_tiles", 12), ("compressor", "stc3x3"), ("compressor", "stc2x2"),
             ("image", "grace_hopper.jpg"), ("image", "document.png"), ("scales", "448,896"),
             ("scales", "448,896,1344"), ("text_tokens", 1024)]
    times = []
    for attr, value in moves * 2:
        t0 = time.perf_counter()
        getattr(dash, attr).value = value
        times.append(time.perf_counter() - t0)
    times.sort()
    assert times[len(times) // 2] < 0.5, times


def _core_modules() -> list[str]:
    "Every module of the package except the dashboards (dash*), the CLI and _modidx, subpackages included."
    pkg = ROOT / "nvila_lab"
    mods = [".".join(("nvila_lab", *p.relative_to(pkg).with_suffix("").parts)) for p in sorted(pkg.rglob("*.py"))]
    mods = [m.removesuffix(".__init__") for m in mods]
    return [m for m in mods if m != "nvila_lab" and not m.split(".")[1].startswith(("dash", "cli", "_modidx"))]


def test_core_modules_never_import_the_dashboard():
    "Importing every core module loads no dashboard module (nvila_lab.dash*) and neither ipywidgets nor matplotlib."
    core = _core_modules()
    assert "nvila_lab.fp8.linear" in core and "nvila_lab.dash_fp8" not in core and len(core) > 20
    code = ("import importlib, json, sys\n"
            f"for m in ['nvila_lab'] + {core!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('nvila_lab.dash') or "
            "m.split('.')[0] in ('ipywidgets', 'matplotlib'))))\n")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
    # and no core source mentions a dashboard module
    for m in core:
        p = ROOT / (m.replace(".", "/") + ".py")
        p = p if p.exists() else ROOT / m.replace(".", "/") / "__init__.py"
        assert "nvila_lab.dash" not in p.read_text() and "import ipywidgets" not in p.read_text(), p


# ---------------------------------------------------------------- the video dashboard
def test_video_dashboard_follows_video_budget_and_the_table2_settings():
    from nvila_lab.budget import video_budget
    from nvila_lab.dash import build_video_dashboard
    v = build_video_dashboard()
    try:
        assert v.budget == video_budget(256, "nvila-8b-video", 8, text_tokens=64)
        for frames, pool in ((8, 1), (32, 1), (32, 4), (16, 4), (32, 32)):
            v.frames.value, v.pool.value = frames, pool
            assert v.budget == video_budget(frames, "nvila-8b-video", pool, text_tokens=64)
            assert bytes(v.chart.value).startswith(PNG_MAGIC)
            assert f">{v.budget.visual_tokens:,}<" in v.table.value
        v.frames.value, v.pool.value = 32, 4  # Table 2: 32 frames / 4 cost what 8 frames cost unpooled
        assert v.references["fewer frames, same tokens"].visual_tokens == v.budget.visual_tokens == 2048
        assert v.references["no pooling"].vit_passes == v.budget.vit_passes == 32
        assert v.message == ""
        v.text_tokens.value, v.frames.value, v.pool.value = 8192, 512, 1
        assert "exceed the LLM's context of 32,768" in v.message
        v.preset.value = "tiny-video"
        assert (v.frames.value, v.pool.value) == (32, 4) and v.budget.visual_tokens == 8 * 16
        assert "tiny-video: 32 frames / p4" in repr(v)
    finally:
        v.close()


def test_video_dashboard_follows_vilas_divisibility_rule_unless_asked():
    "VILA refuses a frame count the pool does not divide; the kit's tail averaging is a visible, explicit option."
    from nvila_lab.budget import video_budget
    from nvila_lab.config import get_config
    from nvila_lab.dash import build_video_dashboard
    v = build_video_dashboard()
    try:
        v.frames.value, v.pool.value = 32, 4
        good = v.budget
        v.frames.value = 33
        assert "do not divide into groups of 4" in v.message and v.budget == good
        assert "#a02020" in v.msg.value
        v.tail.value = True
        assert "last group averages 1 frame(s) alone" in v.message and "VILA refuses" in v.message
        cfg = get_config("nvila-8b-video", temporal_kwargs={"tail": "average"})
        assert v.budget == video_budget(33, cfg, 4, text_tokens=64) and v.budget.visual_tokens == 9 * 256
        v.frames.value = 32
        assert v.message == "" and v.budget.visual_tokens == 8 * 256
        v.tail.value = False
        assert v.config.temporal_kwargs == {}
    finally:
        v.close()


def test_video_dashboard_refuses_an_unknown_preset():
    from nvila_lab.config import ConfigError
    from nvila_lab.dash import build_video_dashboard
    with pytest.raises(ConfigError, match="unknown preset"):
        build_video_dashboard("nvila-8b-vidoe")


# ---------------------------------------------------------------- several images, compressor settings, plug-ins
def test_several_images_are_one_tile_each_unless_asked(dash):
    with dash.hold():
        dash.extra.value = ("panorama.png", "grace_hopper.jpg")
    sizes = [dash.sizes[n] for n in dash.prompt]
    assert dash.prompt == ["document.png", "panorama.png", "grace_hopper.jpg"]
    assert [(b.vit_passes, b.visual_tokens, b.separators) for b in dash.image_budgets] == [(1, 256, 1)] * 3
    assert (dash.budget.visual_tokens, dash.budget.llm_positions) == (768, 768 + 3 + 64)
    assert dash.budget == prompt_budget(sizes, "nvila-8b", text_tokens=64)[0]
    assert dash.references["resize baseline (1 tile)"].visual_tokens == 768  # VILA's rule is the resize baseline
    assert "3 images" in repr(dash)
    dash.tile_all.value = True
    assert [b.visual_tokens for b in dash.image_budgets] == [image_budget(s, "nvila-8b").visual_tokens for s in sizes]
    assert dash.budget.vit_passes == sum(image_budget(s, "nvila-8b").vit_passes for s in sizes)
    assert "every image tiled" in dash.static_html()
    dash.preset.value = "nvila-lite-2b"  # the same rule under another preset
    assert dash.budget == prompt_budget(sizes, "nvila-lite-2b", tile_all=True, text_tokens=64)[0]
    dash.tile_all.value = False
    assert dash.budget.visual_tokens == 3 * 121
    dash.extra.value = ("document.png",)  # the chosen image itself is not counted twice
    assert dash.prompt == ["document.png"] and dash.tile_all.disabled and dash.budget.visual_tokens == 847


def test_add_size_uses_the_kits_size_parser(dash):
    import nvila_lab.dash as dash_module
    from nvila_lab.tiling import MAX_SIDE, parse_size
    assert dash_module.parse_size is parse_size  # the one parser, not a copy
    assert not [n for n in vars(dash_module) if "size" in n.lower() and n.startswith("parse") and n != "parse_size"]
    assert dash.add_size(" 2000X500 ") == "size 2000x500"
    assert (dash.image.value, dash.budget.input, dash.budget.grid) == ("size 2000x500", "2000x500", (6, 2))
    before = dash.budget
    for bad, words in (("2000x", "not WIDTHxHEIGHT"), ("0x10", "at least 1 pixel"),
                       (f"{MAX_SIDE + 1}x5", "at most")):
        dash.add_size_box.value = bad
        assert words in dash.message, dash.message
        assert dash.budget == before and dash.add_size_box.value == bad  # kept, to correct it
    dash.add_size_box.value = f"{MAX_SIDE}x{MAX_SIDE}"  # huge, yet only a small blank preview is drawn
    assert dash.message == "" and dash.budget.input == f"{MAX_SIDE}x{MAX_SIDE}"
    assert max(dash._previews[dash.image.value].size) <= 480


def test_compressor_settings_are_shown_and_budgeted(dash):
    from nvila_lab.config import get_config
    assert dash.settings.value == "" and "Settings: none" in dash.compressor_info.value  # stc2x2 takes none
    dash.compressor.value = "tokenlearner"
    assert "n_tokens=121" in dash.compressor_info.value and dash.budget.visual_tokens == 12 * 121
    dash.settings.value = "n_tokens=16"
    assert dash.config.projector_kwargs == {"n_tokens": 16} and dash.budget.visual_tokens == 12 * 16
    cfg = get_config("nvila-8b", projector="tokenlearner", projector_kwargs={"n_tokens": 16})
    assert dash.budget == image_budget((1344, 896), cfg, text_tokens=64)
    before = dash.budget
    for bad, words in (("n_tokens=16 bogus=1", "bogus"), ("n_tokens", "KEY=VALUE"), ("n_tokens=0", "n_tokens")):
        dash.settings.value = bad
        assert words in dash.message and dash.budget == before, (bad, dash.message)
    dash.compressor.value = "stc3x3"  # a new compressor starts from its defaults
    assert dash.settings.value == "" and dash.message == "" and dash.budget.visual_tokens == 12 * 121


def test_a_preset_with_compressor_settings_shows_them(monkeypatch, samples):
    import nvila_lab.config as config
    from nvila_lab.config import get_config
    base = get_config("nvila-8b")
    custom = base.replace(name="custom-tl", projector="tokenlearner", projector_kwargs={"n_tokens": 4})
    real = config.get_config
    import nvila_lab.dash as dash_module
    monkeypatch.setattr(dash_module, "get_config", lambda name, **kw: custom.replace(**kw) if name == "custom-tl"
                        else real(name, **kw))
    monkeypatch.setattr(dash_module, "list_presets", lambda: config.list_presets() + ["custom-tl"])
    d = build_token_dashboard(samples, preset="custom-tl")
    try:
        assert (d.compressor.value, d.settings.value) == ("tokenlearner", "n_tokens=4")
        assert d.budget.visual_tokens == 12 * 4 and d.config.projector_kwargs == {"n_tokens": 4}
    finally:
        d.close()


def test_plugin_compressors_appear_and_are_budgeted(dash):
    import math
    import torch
    from nvila_lab.compress import COMPRESSORS, TokenCompressor, register_compressor

    @register_compressor("test_rowpool")
    class RowPool(TokenCompressor):
        "Test plug-in: one token per row of patches."
        def __init__(self, in_dim, out_dim, stride: int = 1):
            super().__init__(in_dim, out_dim)
            self.stride = stride
            self.proj = torch.nn.Linear(in_dim, out_dim)
        def output_grid(self, h, w):
            return (math.ceil(h / self.stride), 1)
        def forward(self, x):  # [N, h, w, C] -> [N, h/stride, D]
            return self.proj(x[:, ::self.stride].mean(2))
    try:
        dash.text_tokens.value = 128  # any update re-reads the registry
        assert "test_rowpool" in dash.compressor.options
        dash.compressor.value = "test_rowpool"
        assert dash.message == "" and dash.budget.visual_tokens == 12 * 32
        assert "plug-in from" in dash.compressor_info.value and "stride=1" in dash.compressor_info.value
        dash.settings.value = "stride=4"
        assert dash.budget.visual_tokens == 12 * 8
    finally:
        del COMPRESSORS["test_rowpool"]


def test_parse_settings():
    assert parse_settings("n_tokens=9, hidden=64") == {"n_tokens": 9, "hidden": 64}
    assert parse_settings("name=abc x=1.5 ok=False") == {"name": "abc", "x": 1.5, "ok": False}
    for bad in ("=3", "n_tokens", "1x=2", "a=1, a=2"):
        with pytest.raises(ValueError):
            parse_settings(bad)


@pytest.mark.parametrize("hidden", ["ipywidgets", "matplotlib"])
def test_missing_lab_extra_is_one_line(hidden):
    "Without ipywidgets or matplotlib, importing the dashboards raises MissingExtra: one line naming the extra."
    code = (f"import sys; sys.modules[{hidden!r}] = None\n"
            "import nvila_lab.dash\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("nvila_lab.config.MissingExtra: ") and hidden in last
    assert "pip install 'nvila-lab[lab]'" in last
    code = (f"import sys; sys.modules[{hidden!r}] = None\n"
            "from nvila_lab.config import MissingExtra\n"
            "try:\n    import nvila_lab.dash\nexcept MissingExtra as e:\n    print(str(e))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1, (r.stdout, r.stderr)
