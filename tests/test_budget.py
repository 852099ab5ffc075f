"""The token budget must agree with the shapes the real pipeline produces, for any image size."""
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

import subprocess
import sys

from nvila_lab.budget import BUILTIN_ARITHMETIC, image_budget, segment_cost, video_budget
from nvila_lab.compress import available_compressors, build_compressor
from nvila_lab.config import ConfigError, get_config
from nvila_lab.encoder import ImageEncoder
from nvila_lab.vision import build_vision_tower

TILINGS = ("dynamic_s2", "dynamic", "s2", "resize")
# every built-in, per tile and whole image (imagepool), with settings from the config (projector_kwargs)
PROJECTORS = {"stc2x2": {}, "stc3x3": {}, "avgpool": {"k": 3}, "tokenlearner": {"n_tokens": 9},
              "perceiver": {"n_latents": 6, "heads": 4, "depth": 1}, "imagepool": {"n_tokens": 20}}


def _encoder(tiling, projector, kw, tower=None):
    cfg = get_config("tiny", tiling=tiling, projector=projector, projector_kwargs=kw)
    enc = ImageEncoder(cfg, tower=tower).eval()  # the encoder builds the projector from the config's settings
    assert enc.projector.num_tokens(8, 8) == build_compressor(projector, cfg.mm_hidden, cfg.llm_hidden, **kw).num_tokens(8, 8)
    return enc


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    tower = build_vision_tower(get_config("tiny"))
    return {(t, p): _encoder(t, p, kw, tower) for t in TILINGS for p, kw in PROJECTORS.items()}


def test_every_builtin_is_in_the_property_test():
    assert set(available_compressors()) == set(PROJECTORS)
    assert {build_compressor(n, 8, 16, **kw).per_tile for n, kw in PROJECTORS.items()} == {True, False}  # both kinds


@pytest.mark.parametrize("preset,size,grid,passes,tokens,positions", [
    ("nvila-8b", (1344, 896), [4, 3], 17, 3072, 3073),
    ("nvila-8b", (448, 448), [3, 3], 14, 2304, 2305),
    ("nvila-lite-2b", (1344, 896), [3, 2], 7, 847, 861),  # two "\n" a tile, as NVILA-Lite's prompt expansion
    ("nvila-lite-2b", (448, 448), [1, 1], 1, 121, 123),
])
def test_worked_values(preset, size, grid, passes, tokens, positions):
    d = image_budget(size, preset).to_dict()
    assert (d["grid"], d["vit_passes"], d["visual_tokens"], d["llm_positions"]) == (grid, passes, tokens, positions)


def test_worked_values_video():
    b = video_budget(256, "nvila-8b-video", 8)
    assert (b.visual_tokens, b.separators, b.grid) == (8192, 32, None)
    assert video_budget(8, "nvila-8b", 1).visual_tokens == 2048  # Table 2: 8 frames, 2048 tokens
    assert video_budget(32, "nvila-8b", 4).visual_tokens == 2048  # 32 frames + 4x averaging
    with pytest.raises(ValueError, match=r"10 frames do not divide into groups of 4 \(VILA requires a multiple\); sample 8 or 12"):
        video_budget(10, "nvila-8b", 4)  # VILA's rule
    ext = get_config("nvila-8b", temporal_kwargs={"tail": "average"})  # the kit's extension, by name
    assert video_budget(10, ext, 4).separators == 3  # a last, shorter group is pooled alone


def test_bad_video_arguments():
    with pytest.raises(ValueError, match="frames must be a positive integer"):
        video_budget(0, "nvila-8b")
    with pytest.raises(ValueError, match="temporal_pool must be a positive integer"):
        video_budget(8, "nvila-8b", 0)


def test_text_tokens_add_positions_and_flops():
    a, b = image_budget((1344, 896), "nvila-8b"), image_budget((1344, 896), "nvila-8b", text_tokens=100)
    assert b.llm_positions == a.llm_positions + 100 and b.llm_prefill_flops > a.llm_prefill_flops
    assert b.vit_flops == a.vit_flops


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(w=st.integers(1, 3000), h=st.integers(1, 3000), tiling=st.sampled_from(TILINGS),
       projector=st.sampled_from(list(PROJECTORS)))
def test_budget_equals_pipeline(encoders, w, h, tiling, projector):
    enc = encoders[(tiling, projector)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vt = enc(Image.new("RGB", (w, h), (w % 256, h % 256, 7)))
    b = image_budget((w, h), enc.cfg)
    assert b.vit_passes == vt.plan.vit_passes
    assert (b.visual_tokens, b.separators, b.llm_positions) == (vt.n_tokens, vt.n_separators, vt.n_positions)
    assert all(s.shape[-1] == enc.cfg.llm_hidden for s in vt.segments)


@pytest.mark.parametrize("tiling", TILINGS)
def test_budget_equals_pipeline_whole_image_compressor(tiling):
    """The whole-image kind (imagepool): one pool over each segment's stitched map, at the extremes of aspect ratio."""
    enc = _encoder(tiling, "imagepool", {"n_tokens": 20})
    for w, h in [(1344, 896), (100, 700), (1, 1), (3000, 2), (2, 3000)]:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vt = enc(Image.new("RGB", (w, h)))
        b = image_budget((w, h), enc.cfg)
        assert (b.visual_tokens, b.separators, b.llm_positions) == (vt.n_tokens, vt.n_separators, vt.n_positions)


def test_budget_honours_projector_kwargs_from_the_config():
    base = get_config("nvila-8b")
    tl = base.replace(projector="tokenlearner", projector_kwargs={"n_tokens": 9})
    assert image_budget((1344, 896), tl).visual_tokens == 12 * 9
    assert image_budget((1344, 896), base.replace(projector="avgpool", projector_kwargs={"k": 4})).visual_tokens == 12 * 64
    with pytest.raises(TypeError):
        image_budget((1344, 896), base, projector_kwargs={"n_tokens": 9})  # the argument is gone: settings live in the config
    with pytest.raises(ConfigError, match="does not accept the settings"):
        image_budget((1344, 896), base.replace(projector_kwargs={"k": 3}))


def test_nvila8b_projector_flops_are_stc_formula_and_counter():
    with torch.device("meta"):
        p = build_compressor("stc2x2", 3456, 3584)
    formula = 2 * 256 * (4 * 3456 * 3584 + 3584 * 3584)
    assert p.flops_per_tile(32, 32) == formula
    assert image_budget((1344, 896), "nvila-8b").projector_flops == 12 * formula


def test_table_matches_modules_for_every_builtin():
    assert set(BUILTIN_ARITHMETIC) == set(available_compressors())
    cfg = get_config("tiny")
    for name in BUILTIN_ARITHMETIC:
        comp = build_compressor(name, cfg.mm_hidden, cfg.llm_hidden)
        for grid in [(1, 1), (3, 4)]:
            assert segment_cost(cfg.replace(projector=name), grid) == (comp.segment_tokens(8, 8, grid), comp.segment_flops(8, 8, grid))


def test_budget_imports_no_torch():
    code = ("import sys\nfrom nvila_lab.budget import image_budget, video_budget\n"
            "b = image_budget((1920, 1080), 'nvila-8b')\nassert b.projector_flops > 0\nvideo_budget()\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 20000), h=st.integers(1, 20000), preset=st.sampled_from(["nvila-8b", "nvila-lite-2b"]))
def test_budget_bounds(w, h, preset):
    """Dynamic-S2 always spends 9-12 tiles at the largest scale; Lite 1-12 tiles plus a thumbnail beyond one."""
    b = image_budget((w, h), preset)
    cols, rows = b.grid
    if preset == "nvila-8b":
        assert 9 <= cols * rows <= 12 and b.vit_passes == 5 + cols * rows and b.visual_tokens == 256 * cols * rows
    else:
        assert 1 <= cols * rows <= 12 and b.tiles == cols * rows + (cols * rows > 1) and b.visual_tokens == 121 * b.tiles
