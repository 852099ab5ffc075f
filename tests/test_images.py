"""Bad and awkward images: `nvila_lab.images.load_image` and the full tiny pipeline (`ImageEncoder("tiny")`).

Every file is generated in `tmp_path`. The rule (notebook 01): an image that cannot be used raises `ImageError`
(a `ValueError`) whose message names the source and the problem; every other image comes out as upright 8-bit
RGB, and the tiny encoder turns it into exactly the tokens the budget predicts.
"""
from __future__ import annotations

import gc
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from nvila_lab.budget import image_budget
from nvila_lab.images import DEFAULT_MAX_PIXELS, ImageError, load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture(scope="module")
def encoder():
    from nvila_lab.encoder import ImageEncoder
    torch.manual_seed(0)
    return ImageEncoder("tiny").eval()


def encode(encoder, src):
    "Run the tiny pipeline; check its token count against the budget of the loaded image's size."
    with torch.no_grad():
        vt = encoder(src)
    size = load_image(src).size
    b = image_budget(size, encoder.cfg)
    assert (vt.n_tokens, vt.n_positions) == (b.visual_tokens, b.llm_positions)
    assert all(torch.isfinite(s).all() for s in vt.segments)
    return vt


def px(img: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(img)[y, x])


def close(a, b, tol=8) -> bool:
    return all(abs(int(u) - int(v)) <= tol for u, v in zip(a, b))


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def noise(w=64, h=64, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


# ---------------------------------------------------------------- files that are not (whole) images

def test_corrupt_bytes(tmp_path):
    p = tmp_path / "photo.jpg"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError, match="not an image Pillow can read") as e:
        load_image(p)
    assert str(p) in str(e.value)


def test_png_signature_then_garbage(tmp_path):
    p = tmp_path / "fake.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ImageError, match="not an image Pillow can read"):
        load_image(p)


def test_corrupt_png_data(tmp_path):
    b = bytearray(encoded(noise(), "PNG"))
    i = b.find(b"IDAT")
    b[i + 40:i + 60] = bytes(20)  # zeros in the middle of the compressed pixels
    p = tmp_path / "broken.png"
    p.write_bytes(bytes(b))
    with pytest.raises(ImageError, match="corrupt or truncated") as e:
        load_image(p)
    assert str(p) in str(e.value)


def test_truncated_jpeg(tmp_path):
    b = encoded(noise(256, 256), "JPEG")
    p = tmp_path / "half.jpg"
    p.write_bytes(b[: len(b) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated") as e:
        load_image(p)
    assert "truncated" in str(e.value) and str(p) in str(e.value)


def test_truncated_png(tmp_path):
    b = encoded(noise(256, 256), "PNG")
    p = tmp_path / "half.png"
    p.write_bytes(b[: len(b) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated") as e:
        load_image(p)
    assert "truncated" in str(e.value)


@pytest.mark.parametrize("fmt,cut", [("JPEG", 300), ("PNG", 20), ("BMP", 30)])
def test_truncated_inside_header(tmp_path, fmt, cut):
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(encoded(noise(), fmt)[:cut])
    with pytest.raises(ImageError, match="truncated|corrupt|not an image"):
        load_image(p)


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_truncated_webp(tmp_path):
    b = encoded(noise(), "WEBP")
    p = tmp_path / "half.webp"
    p.write_bytes(b[: len(b) // 2])
    with pytest.raises(ImageError, match="truncated|corrupt"):
        load_image(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file") as e:
        load_image(p)
    assert str(p) in str(e.value)
    with pytest.raises(ImageError, match="<bytes>: empty"):
        load_image(b"")


def test_folder(tmp_path):
    with pytest.raises(ImageError, match="is a folder, not an image file"):
        load_image(tmp_path)


def test_missing_path(tmp_path):
    p = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="no such file") as e:
        load_image(p)
    assert str(p) in str(e.value)
    with pytest.raises(ImageError, match="no such file"):
        load_image(str(p))


# ---------------------------------------------------------------- sizes

def test_1x1_works_end_to_end(tmp_path, encoder):
    "Documented: a 1x1 image is accepted and upscaled; Dynamic-S2 still pays its 9-tile floor."
    p = save(Image.new("RGB", (1, 1), (10, 20, 30)), tmp_path / "dot.png")
    img = load_image(p)
    assert (img.mode, img.size, px(img, 0, 0)) == ("RGB", (1, 1), (10, 20, 30))
    vt = encode(encoder, p)
    assert vt.plan.grid == (3, 3) and vt.plan.vit_passes == 1 + 4 + 9


@pytest.mark.parametrize("size,grid", [((1, 4000), (1, 12)), ((4000, 1), (12, 1))])
def test_extreme_aspect_works_with_a_warning(tmp_path, encoder, size, grid):
    p = save(Image.new("RGB", size, RED), tmp_path / "strip.png")
    assert load_image(p).size == size  # the loader accepts it as is
    with pytest.warns(UserWarning, match="stretches it"):
        vt = encode(encoder, p)
    assert vt.plan.grid == grid


# ---------------------------------------------------------------- transparency: composited on white

def test_rgba_on_white(tmp_path, encoder):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 255  # red everywhere...
    a[:, :4, 3] = 255  # ...opaque on the left, transparent on the right...
    a[0, 4:, 3] = 128  # ...and half transparent on the top row's right half
    p = save(Image.fromarray(a, "RGBA"), tmp_path / "rgba.png")
    img = load_image(p)
    assert img.mode == "RGB"
    assert px(img, 0, 4) == RED
    assert px(img, 7, 4) == WHITE  # fully transparent -> white, not black
    assert close(px(img, 7, 0), (255, 127, 127), tol=1)  # half red over white
    encode(encoder, p)


def test_la_on_white(tmp_path):
    a = np.zeros((4, 4, 2), np.uint8)  # black...
    a[:2, :, 1] = 255  # ...opaque on the top half only
    p = save(Image.fromarray(a, "LA"), tmp_path / "la.png")
    img = load_image(p)
    assert px(img, 0, 0) == (0, 0, 0) and px(img, 0, 3) == WHITE


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_on_white(tmp_path, fmt, encoder):
    im = Image.new("P", (6, 6), 1)
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * (3 * 254))  # index 0 black (transparent), 1 green
    im.paste(0, (0, 0, 3, 6))  # left half index 0
    p = tmp_path / f"pal.{fmt.lower()}"
    im.save(p, transparency=0)
    with Image.open(p) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    img = load_image(p)
    assert px(img, 0, 0) == WHITE  # transparent black -> white
    assert px(img, 5, 5) == (0, 255, 0)
    encode(encoder, p)


# ---------------------------------------------------------------- greyscale and high bit depths

def test_greyscale_l(tmp_path, encoder):
    p = save(Image.new("L", (5, 3), 77), tmp_path / "grey.png")
    img = load_image(p)
    assert (img.mode, img.size, px(img, 4, 2)) == ("RGB", (5, 3), (77, 77, 77))
    encode(encoder, p)


def test_one_bit(tmp_path, encoder):
    a = np.zeros((4, 4), bool)
    a[::2, ::2] = True
    p = save(Image.fromarray(a), tmp_path / "bits.png")
    with Image.open(p) as raw:
        assert raw.mode == "1"
    img = load_image(p)
    assert px(img, 0, 0) == WHITE and px(img, 1, 0) == (0, 0, 0)
    encode(encoder, p)


def test_16_bit_png_keeps_full_range(tmp_path, encoder):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None].repeat(64, 0)  # 256x64: no stretch warning
    ramp[1, 0] = 32768
    p = save(Image.fromarray(ramp), tmp_path / "ramp16.png")
    with Image.open(p) as raw:
        assert raw.mode.startswith("I")  # Pillow reads 16-bit PNG as I;16 (or I)
    a = np.asarray(load_image(p))
    assert a.shape == (64, 256, 3)
    assert (a.min(), a.max()) == (0, 255)  # Pillow's own convert("RGB") clips this to white
    assert (np.diff(a[0, :, 0].astype(int)) >= 0).all()  # still a ramp
    assert a[1, 0, 0] == 128  # mid-range -> mid-grey
    encode(encoder, p)


def test_32_bit_float_tiff(tmp_path, encoder):
    ramp = np.linspace(0, 1, 64, dtype=np.float32)[None].repeat(4, 0)
    ramp[1, 0] = 0.5
    p = save(Image.fromarray(ramp), tmp_path / "ramp.tif")
    with Image.open(p) as raw:
        assert raw.mode == "F"
    a = np.asarray(load_image(p))
    assert (a.min(), a.max()) == (0, 255)
    assert a[1, 0, 0] == 128
    encode(encoder, p)


def test_float_tiff_with_nan(tmp_path):
    a = np.full((4, 4), np.nan, np.float32)
    a[0, 0], a[3, 3] = 1.0, 0.0
    p = save(Image.fromarray(a), tmp_path / "nan.tif")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            img = load_image(p)
    except ImageError as e:
        assert "nan" in str(e).lower()
        return
    assert px(img, 0, 0) == WHITE and px(img, 3, 3) == (0, 0, 0)


def test_cmyk_jpeg(tmp_path, encoder):
    p = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "print.jpg", quality=95)
    with Image.open(p) as raw:
        assert raw.mode == "CMYK"
    img = load_image(p)
    assert img.mode == "RGB" and close(px(img, 8, 8), RED, tol=40)
    encode(encoder, p)


# ---------------------------------------------------------------- EXIF orientation

@pytest.mark.parametrize("orientation,size,red_corner", [
    (1, (80, 40), "top-left"),
    (3, (80, 40), "bottom-right"),  # rotate 180
    (6, (40, 80), "top-right"),  # "rotate 90 clockwise to view": the stored top-left ends top-right
    (8, (40, 80), "bottom-left"),  # "rotate 90 counter-clockwise to view"
])
def test_exif_orientation(tmp_path, encoder, orientation, size, red_corner):
    im = Image.new("RGB", (80, 40), BLUE)  # stored landscape, blue...
    im.paste(RED, (0, 0, 20, 20))  # ...with a red square in the stored top-left corner
    exif = im.getexif()
    exif[0x0112] = orientation
    p = save(im, tmp_path / f"o{orientation}.jpg", exif=exif.tobytes(), quality=95)
    img = load_image(p)
    assert img.size == size
    w, h = size
    corners = {"top-left": (5, 5), "top-right": (w - 6, 5), "bottom-left": (5, h - 6), "bottom-right": (w - 6, h - 6)}
    for name, (x, y) in corners.items():
        assert close(px(img, x, y), RED if name == red_corner else BLUE, tol=40), (name, px(img, x, y))
    vt = encode(encoder, p)
    assert vt.plan.image_size == size  # the tiler sees the upright image


# ---------------------------------------------------------------- decompression bombs

def test_max_pixels_guard_on_file(tmp_path):
    p = save(Image.new("RGB", (200, 100)), tmp_path / "big.png")
    with pytest.raises(ImageError) as e:
        load_image(p, max_pixels=10_000)
    msg = str(e.value)
    assert str(p) in msg and "200x100 = 20,000 pixels" in msg and "max_pixels=10,000" in msg
    assert load_image(p, max_pixels=20_000).size == (200, 100)  # the limit is inclusive
    assert load_image(p, max_pixels=None).size == (200, 100)


def test_max_pixels_guard_on_pil_image():
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(Image.new("RGB", (5000, 5000)), max_pixels=1_000_000)


def test_bomb_file_refused_by_default(tmp_path):
    "A 20000x20000 1-bit PNG is ~50 kB on disk but 400 MP (1.2 GB as RGB): refused before decoding."
    p = save(Image.new("1", (20000, 20000)), tmp_path / "bomb.png")
    assert p.stat().st_size < 1_000_000
    assert 20000 * 20000 > DEFAULT_MAX_PIXELS
    with pytest.raises(ImageError) as e:
        load_image(p)
    msg = str(e.value)
    assert str(p) in msg and "max_pixels" in msg and "decompression-bomb" in msg


@pytest.mark.parametrize("side", [400, 1000])  # over Pillow's (patched) limit by 1.6x (warning) and 10x (error)
def test_bomb_file_loads_when_trusted(tmp_path, monkeypatch, side):
    # Pillow's limit shrunk to 100,000 pixels, so a small file exercises the same path as a 90+ MP one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    p = save(Image.new("1", (side, side)), tmp_path / "trusted.png")
    assert load_image(p, max_pixels=None).size == (side, side)


# ---------------------------------------------------------------- animated GIF, arrays

def test_animated_gif_first_frame(tmp_path, encoder):
    "Documented here: an animated GIF loads as its first frame (video goes through the video path)."
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, (0, 255, 0), BLUE)]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(p) as raw:
        assert raw.n_frames == 3
    img = load_image(p)
    assert img.size == (8, 8) and px(img, 4, 4) == RED
    encode(encoder, p)


def test_animated_gif_closes_its_file(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        load_image(p)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.mark.parametrize("shape", [(4,), (4, 4, 2), (4, 4, 5), (0, 4, 3), (4, 0), (2, 3, 4, 3)])
def test_array_of_wrong_shape(shape):
    with pytest.raises(ImageError, match=r"array of shape .* is not an image: expected HxW, HxWx1, HxWx3 or HxWx4") as e:
        load_image(np.zeros(shape, np.uint8))
    assert str(tuple(shape)) in str(e.value)


def test_arrays_that_work(encoder):
    a = np.zeros((6, 8, 3), np.uint8)
    a[..., 2] = 255
    assert load_image(a).size == (8, 6) and px(load_image(a), 0, 0) == BLUE
    assert px(load_image(np.full((4, 4), 9, np.uint8)), 0, 0) == (9, 9, 9)
    assert px(load_image(np.full((4, 4, 1), 9, np.uint8)), 0, 0) == (9, 9, 9)
    encode(encoder, a)


@pytest.mark.parametrize("dtype", ["float64", "uint16", "int64"])
def test_array_of_unsupported_dtype(dtype):
    a = np.zeros((4, 4, 3), dtype)
    try:
        img = load_image(a)
    except ImageError as e:
        assert dtype in str(e)
        return
    assert (img.mode, img.size) == ("RGB", (4, 4))


def test_one_font_helper_for_the_kit():
    """images.font/font_file are the kit's font helpers; the data module uses the same ones (no copy)."""
    import nvila_lab.data as data
    from nvila_lab import images
    assert data.font is images.font and data.font_file is images.font_file
    assert data.font_file().endswith("DejaVuSans-Bold.ttf")
    with pytest.warns(UserWarning, match="no-such-font.ttf not found"):
        f = images.font.__wrapped__(12, "no-such-font.ttf")  # uncached call: Pillow's built-in font
    assert f is not None and images.font_file("no-such-font.ttf") is None


def test_images_module_imports_no_torch():
    import subprocess
    import sys
    code = "import sys, nvila_lab.images, nvila_lab.data; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
