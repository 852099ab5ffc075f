"""The exact rules of NVILA's tiling, merging and projectors, and the tiny pipeline end to end."""
import math
import time

import pytest
import torch
from PIL import Image

from nvila_lab.compress import STC2x2, STC3x3, build_compressor, register_compressor, space_to_channel, TokenCompressor, COMPRESSORS
from nvila_lab.config import ConfigError, get_config
from nvila_lab.encoder import ImageEncoder
from nvila_lab.tiling import candidate_grids, closest_grid, cut_tiles, plan_dynamic, plan_dynamic_s2
from nvila_lab.vision import merge_scales, stitch, unstitch


def test_candidate_grids_cover_exactly_the_range():
    grids = candidate_grids(9, 12)
    assert sorted(grids) == sorted((c, r) for c in range(1, 13) for r in range(1, 13) if 9 <= c * r <= 12)
    areas = [c * r for c, r in grids]
    assert areas == sorted(areas)


def test_closest_grid_prefers_exact_aspect_and_tie_rule():
    assert closest_grid(1792, 1344, candidate_grids(9, 12), 448) == (4, 3)
    assert closest_grid(1344, 1792, candidate_grids(9, 12), 448) == (3, 4)
    # 2:1 ties between 2x1, 4x2 (and 6x3 beyond 12 tiles): larger grid only with enough pixels
    assert closest_grid(900, 450, candidate_grids(1, 12), 448) == (2, 1)
    assert closest_grid(1800, 900, candidate_grids(1, 12), 448) == (4, 2)


def test_plans_refuse_bad_sizes_and_configs():
    for bad in [(0, 10), (10, 0), (-1, 5), (1.5, 3)]:
        with pytest.raises(ValueError, match="positive integers"):
            plan_dynamic_s2(*bad)
    with pytest.raises(ConfigError):
        plan_dynamic_s2(100, 100, tile=448, scales=(448, 900))
    with pytest.raises(ConfigError):
        get_config("tiny", s2_scales=(128, 64))


def test_cut_tiles_order_and_thumbnail():
    img = Image.new("RGB", (1344, 896))
    for x in range(3):  # colour each 448-column band differently
        img.paste((80 * x, 0, 0), (448 * x, 0, 448 * (x + 1), 896))
    plan = plan_dynamic(*img.size)  # 3x2 + thumbnail, no resize needed for the main tiles
    tiles = cut_tiles(img, plan)
    assert len(tiles) == 7
    assert [t.getpixel((200, 200))[0] for t in tiles[:6]] == [0, 80, 160, 0, 80, 160]  # row-major
    assert tiles[-1].size == (448, 448)


def test_stc_channel_order_and_padding():
    x = torch.arange(9.0).reshape(1, 3, 3, 1)  # odd side: padded with zeros at bottom/right
    y = space_to_channel(x, 2)
    assert y.shape == (1, 2, 2, 4)
    assert y[0, 0, 0].tolist() == [0, 1, 3, 4]
    assert y[0, 0, 1].tolist() == [2, 0, 5, 0]
    assert y[0, 1, 1].tolist() == [8, 0, 0, 0]


def test_projector_weight_names_match_released_layout():
    assert list(STC2x2(8, 16).state_dict()) == [f"layers.{i}.{p}" for i in (1, 2, 4) for p in ("weight", "bias")]
    assert list(STC3x3(8, 16).state_dict()) == [f"layers.{i}.{p}" for i in (1, 2, 4, 5, 7) for p in ("weight", "bias")]


def test_merge_keeps_largest_scale_and_upsamples_smaller():
    plan = plan_dynamic_s2(1344, 896, tile=64, scales=(64, 128, 192))
    feats = torch.randn(plan.vit_passes, 8, 8, 4)
    (seg,) = merge_scales(feats, plan)
    big = stitch(seg, plan.grid)
    assert torch.equal(big[..., 8:], stitch(feats[5:], (4, 3)))
    # 448-scale map (8x8) area-upsampled to 24x32: each source cell covers a 3x4 block
    assert torch.allclose(big[:3, :4, :4], feats[0, 0, 0].expand(3, 4, 4))
    assert torch.equal(unstitch(stitch(seg, plan.grid), plan.grid), seg)


def test_custom_compressor_registers_and_runs():
    @register_compressor("test_first_patch")
    class FirstPatch(TokenCompressor):
        def output_grid(self, h, w):
            return (1, 1)

        def forward(self, x):
            return torch.nn.functional.pad(x[:, :1, :1].flatten(1, 2), (0, self.out_dim - self.in_dim))

    try:
        enc = ImageEncoder(get_config("tiny", projector="test_first_patch"))
        with torch.no_grad():
            vt = enc(Image.new("RGB", (64, 64)))
        assert vt.n_tokens == 9  # one token a tile; a square image gets a 3x3 grid at the largest scale
        assert vt.segments[0].shape == (9, enc.cfg.llm_hidden)
    finally:
        COMPRESSORS.pop("test_first_patch", None)


def test_unknown_compressor_message():
    with pytest.raises(ConfigError, match="unknown compressor 'stc_2x2'; did you mean 'stc2x2'.*Choices: stc2x2, stc3x3"):
        build_compressor("stc_2x2", 4, 4)


def test_tiny_pipeline_end_to_end_is_fast_and_finite():
    enc = ImageEncoder("tiny").eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        vt = enc("data_samples/images/document.png")
    assert time.perf_counter() - t0 < 30  # generous: "seconds", not a benchmark
    assert vt.n_tokens == 16 * 12 and vt.n_separators == 1
    assert all(torch.isfinite(s).all() for s in vt.segments)


def test_training_signal_flows_through_the_encoder():
    enc = ImageEncoder("tiny")
    vt = enc(Image.new("RGB", (100, 60), "white"))
    vt.with_separators(torch.zeros(enc.cfg.llm_hidden)).sum().backward()
    assert enc.tower.embeddings.patch_embedding.weight.grad is not None
    assert enc.projector.layers[2].weight.grad is not None


def test_flops_are_counted_for_compressors_without_linear_layers():
    """The old count summed nn.Linear only and reported 0 here; the meta-device counter sees the conv and the einsum."""
    class ConvMix(TokenCompressor):
        def __init__(self, in_dim, out_dim):
            super().__init__(in_dim, out_dim)
            self.conv = torch.nn.Conv2d(in_dim, out_dim, 2, stride=2, bias=False)
            self.mix = torch.nn.Parameter(torch.eye(out_dim))

        def output_grid(self, h, w):
            return (h // 2, w // 2)

        def forward(self, x):  # [N, h, w, C] -> [N, L, D]
            y = self.conv(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
            return torch.einsum("nld,de->nle", y, self.mix)

    comp = ConvMix(6, 10)
    assert comp.flops_per_tile(8, 8) == 2 * 16 * (4 * 6 * 10 + 10 * 10)
    assert comp.segment_flops(8, 8, (3, 2)) == 6 * comp.flops_per_tile(8, 8)


def test_perceiver_resampler_shapes_and_settings():
    p = build_compressor("perceiver", 12, 16, n_latents=5, depth=2, heads=4)
    assert p(torch.randn(3, 8, 8, 12)).shape == (3, 5, 16) and p.num_tokens(8, 8) == 5 and p.output_grid(8, 8) is None
    with pytest.raises(ValueError, match="does not divide into 3 heads"):
        build_compressor("perceiver", 12, 16, heads=3)
    enc = ImageEncoder(get_config("tiny", projector="perceiver"),
                       projector=build_compressor("perceiver", 192, 128, n_latents=4, heads=4))
    with torch.no_grad():
        vt = enc(Image.new("RGB", (64, 64)))
    assert vt.n_tokens == 9 * 4  # 3x3 tiles, 4 latents each


def test_whole_image_compressor_sees_across_tiles():
    ip = build_compressor("imagepool", 4, 8, n_tokens=3)
    assert not ip.per_tile
    x = torch.zeros(1, 8, 16, 4)  # two 8x8 tiles side by side
    x[0, :, 5:11] = 1.0  # a band straddling the tile edge at column 8
    out = ip(x, (2, 1))
    assert out.shape == (1, 3, 8) and ip.segment_tokens(8, 8, (2, 1)) == 3
    pooled_middle = ip.mlp(torch.ones(4))  # window 1 of 3 covers columns 5..10: exactly the band
    assert torch.allclose(out[0, 1], pooled_middle, atol=1e-6)
    with pytest.raises(TypeError, match="looks across tiles"):
        ip(torch.randn(2, 8, 8, 4))
