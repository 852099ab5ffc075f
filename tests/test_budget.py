"""The token budget must agree with the shapes the real pipeline produces, for any image size."""
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from nvila_lab.budget import image_budget, video_budget
from nvila_lab.config import get_config
from nvila_lab.encoder import ImageEncoder

TILINGS = ("dynamic_s2", "dynamic", "s2", "resize")
PROJECTORS = ("stc2x2", "stc3x3", "avgpool", "tokenlearner")


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    return {(t, p): ImageEncoder(get_config("tiny", tiling=t, projector=p)).eval() for t in TILINGS for p in PROJECTORS}


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
    assert video_budget(10, "nvila-8b", 4).separators == 3  # a last, shorter group is pooled alone


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
       projector=st.sampled_from(PROJECTORS))
def test_budget_equals_pipeline(encoders, w, h, tiling, projector):
    enc = encoders[(tiling, projector)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vt = enc(Image.new("RGB", (w, h), (w % 256, h % 256, 7)))
    b = image_budget((w, h), enc.cfg)
    assert b.vit_passes == vt.plan.vit_passes
    assert (b.visual_tokens, b.separators, b.llm_positions) == (vt.n_tokens, vt.n_separators, vt.n_positions)
    assert all(s.shape[-1] == enc.cfg.llm_hidden for s in vt.segments)


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
