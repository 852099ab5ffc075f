"""Video reading/writing (nvila_lab.video) and the synthetic video tasks (nvila_lab.video_data)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from nvila_lab.data import DatasetError, make_dataset
from nvila_lab.video import (VideoError, available_backends, fps_indices, frame_number, numbered_frame, read_frames,
                             sample_indices, video_info, write_video)
from nvila_lab.video_data import (VIDEO_DEFAULT_TASKS, VIDEO_TASKS, flash_starts, load_video_dataset,
                                  make_video_dataset, make_video_sample)

av = pytest.importorskip("av")

N = 40  # frames in the test clips
CLIP = np.stack([numbered_frame(i) for i in range(N)])  # [40, 64, 64, 3], frame i shows the number i
BACKENDS = ["pyav", "decord"]


def _backend(name: str) -> str:
    "Skip cleanly when the backend is not installed."
    if name == "decord":
        pytest.importorskip("decord")
    return name


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def _write_mkv(path: Path, frames: np.ndarray) -> Path:
    "A Matroska file: the container stores no frame count (PyAV reports stream.frames == 0)."
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=16)
        s.width, s.height, s.pix_fmt, s.options = 64, 64, "yuv444p", {"crf": "0"}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    return {"mp4": write_video(CLIP, d / "numbered.mp4", fps=16),
            "mp4-420-lossy": write_video(CLIP, d / "lossy.mp4", fps=16, pix_fmt="yuv420p", crf=23),
            "mkv": _write_mkv(d / "numbered.mkv", CLIP)}


# --- which frames -------------------------------------------------------------------------------------------------

def test_sample_indices_is_nvilas_uniform_rule():
    assert sample_indices(64, 8) == [0, 9, 18, 27, 36, 45, 54, 63]
    for n, k in ((64, 32), (1800, 256), (7, 3)):
        assert sample_indices(n, k) == np.round(np.linspace(0, n - 1, k)).astype(int).tolist()
    assert sample_indices(6, 3) == [0, 2, 5]  # 2.5 rounds to even


def test_fewer_frames_than_asked_repeat_frames():
    "A short clip still gives exactly num_frames frames (fixed token budget); indices repeat, in order."
    assert sample_indices(5, 8) == [0, 1, 1, 2, 2, 3, 3, 4]
    assert sample_indices(1, 3) == [0, 0, 0]
    for n in range(1, 12):
        idx = sample_indices(n, 16)
        assert len(idx) == 16 and idx == sorted(idx) and set(idx) == set(range(n))


def test_fewer_frames_than_asked_when_reading(clips):
    for b in ("pyav", *(["decord"] if "decord" in available_backends() else [])):
        frames = read_frames(clips["mp4"], num_frames=64, backend=b)
        assert frames.shape == (64, 64, 64, 3)
        assert [frame_number(f) for f in frames] == sample_indices(N, 64)


def test_index_rules_reject_bad_arguments():
    for bad in ((0, 8), (8, 0), (-1, 2), (2.0, 2), (True, 2)):
        with pytest.raises(VideoError, match="must be a positive integer"):
            sample_indices(*bad)
    for kw in (dict(video_fps=0), dict(target_fps=float("inf")), dict(max_frames=0), dict(n_frames=0)):
        with pytest.raises(VideoError, match="must be a positive"):
            fps_indices(**(dict(n_frames=10, video_fps=30, target_fps=2) | kw))


def test_fps_indices():
    assert fps_indices(64, 16, 2) == [0, 8, 16, 24, 32, 40, 48, 56]  # 4 s at 2 fps
    assert fps_indices(10, 30, 8) == [0, 4, 8]  # one every 3.75 frames, nearest
    assert len(fps_indices(1800, 30, 8)) == 480 and fps_indices(1800, 30, 8)[-1] <= 1799
    assert fps_indices(1800, 30, 8, max_frames=4) == [0, 600, 1196, 1796]  # capped by uniform subsampling
    assert fps_indices(64, 16, 16) == list(range(64))
    assert fps_indices(4, 8, 16) == [0, 1, 1, 2, 2, 3, 3]  # above the video's rate: repeats
    assert fps_indices(64, 16, 2, max_frames=100) == fps_indices(64, 16, 2)


# --- writing ------------------------------------------------------------------------------------------------------

def test_write_read_round_trip(tmp_path):
    p = write_video(CLIP, tmp_path / "a" / "clip.mp4", fps=16)
    assert p == tmp_path / "a" / "clip.mp4" and sorted(os.listdir(p.parent)) == ["clip.mp4"]
    assert p.stat().st_size < 20_000  # KB-sized
    back = read_frames(p, indices=range(N), backend="pyav")
    assert _diff(back, CLIP) <= 2  # lossless but for RGB <-> YUV rounding
    info = video_info(p)
    assert (info.n_frames, info.fps, info.width, info.height, info.codec, info.counted) == (N, 16.0, 64, 64, "h264", False)
    assert "numbered" not in repr(info) and "40 frames, 64x64 @ 16 fps, 2.50 s, h264" in repr(info)
    from PIL import Image  # a list of PIL images, odd sizes in yuv444p
    q = write_video([Image.fromarray(f[:63, :61]) for f in CLIP[:5]], tmp_path / "odd.mp4")
    assert _diff(read_frames(q, indices=range(5), backend="pyav"), CLIP[:5, :63, :61]) <= 2


def test_write_refuses_bad_frames(tmp_path):
    cases = [(CLIP[0], "pass frames\\[None\\]"), (CLIP / 255, "dtype float64"), ([], "no frames"),
             ([CLIP[0], CLIP[0, :32]], "frame 1 is 64x32 but frame 0 is 64x64"), (CLIP[..., :2], "RGB")]
    for frames, msg in cases:
        with pytest.raises(VideoError, match=msg):
            write_video(frames, tmp_path / "x.mp4")
    with pytest.raises(VideoError, match="needs an even width and height"):
        write_video(CLIP[:, :63], tmp_path / "x.mp4", pix_fmt="yuv420p")
    with pytest.raises(VideoError, match="not in this PyAV build"):
        write_video(CLIP, tmp_path / "x.mp4", codec="no-such-codec")
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic(tmp_path):
    "A write that fails half-way leaves an existing file as it was and no temporary file behind."
    target = write_video(CLIP[:3], tmp_path / "clip.mp4")
    before = target.read_bytes()
    bad = (CLIP[i] if i < 5 else CLIP[i, :8] for i in range(10))  # frame 5 has the wrong size
    with pytest.raises(VideoError, match="frame 5"):
        write_video(bad, target)
    assert target.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["clip.mp4"]


# --- reading: the backends agree ----------------------------------------------------------------------------------

REQUESTS = [(dict(num_frames=8), sample_indices(N, 8)), (dict(num_frames=3), sample_indices(N, 3)),
            (dict(num_frames=6, fps=3), [0, 5, 10, 16, 21, 26]),  # VILA's fps rule: int(k/3 * 16), the first 6
            (dict(num_frames=64, fps=8), list(range(0, 40, 2))),  # 2.5 s at 8 fps: 20 frames, fewer than asked
            (dict(fps=4, rule="uniform"), fps_indices(N, 16, 4)),
            (dict(fps=4, max_frames=3, rule="uniform"), fps_indices(N, 16, 4, 3)),
            (dict(indices=[39, 0, 5, 5, 20]), [39, 0, 5, 5, 20])]


@pytest.mark.parametrize("kind", ["mp4", "mp4-420-lossy", "mkv"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_returns_the_asked_frames(clips, kind, backend):
    for ask, want in REQUESTS:
        frames = read_frames(clips[kind], backend=_backend(backend), **ask)
        assert frames.shape == (len(want), 64, 64, 3) and frames.dtype == np.uint8
        assert [frame_number(f) for f in frames] == want, (kind, ask)  # identity of every frame, in order
        if kind != "mp4-420-lossy":
            assert _diff(frames, CLIP[want]) <= 2


@pytest.mark.parametrize("kind", ["mp4", "mp4-420-lossy", "mkv"])
def test_decord_and_pyav_return_the_same_frames(clips, kind):
    pytest.importorskip("decord")
    for ask, want in REQUESTS:
        d, p = read_frames(clips[kind], backend="decord", **ask), read_frames(clips[kind], backend="pyav", **ask)
        assert [frame_number(f) for f in d] == [frame_number(f) for f in p] == want
        assert _diff(d, p) <= 2, (kind, ask)


def test_auto_backend(clips):
    frames = read_frames(clips["mp4"], num_frames=4)
    assert [frame_number(f) for f in frames] == sample_indices(N, 4)
    assert available_backends()[-1] == "pyav"


def test_matroska_frame_count_is_counted(clips):
    with av.open(str(clips["mkv"])) as c:
        assert c.streams.video[0].frames == 0  # the container stores no count
    info = video_info(clips["mkv"])
    assert (info.n_frames, info.counted) == (N, True) and "(counted)" in repr(info)


# --- reading: errors ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.mp4").write_text("not a video\n" * 20)
    (d / "empty.mp4").touch()
    with av.open(str(d / "tone.m4a"), "w") as c:  # audio only
        s = c.add_stream("aac", rate=16000)
        for k in range(3):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 16000, 1024 * k
            c.mux(s.encode(fr))
        c.mux(s.encode())
    ffv1 = write_video(CLIP[:4], d / "ffv1.mkv", codec="ffv1", pix_fmt="bgr0").read_bytes()
    assert ffv1.count(b"V_FFV1") == 1
    (d / "unknown.mkv").write_bytes(ffv1.replace(b"V_FFV1", b"V_QQQ1"))  # a codec id FFmpeg does not know
    return {"dir": d, "missing": d / "missing.mp4", "notes": d / "notes.mp4", "empty": d / "empty.mp4",
            "audio": d / "tone.m4a", "unknown": d / "unknown.mkv"}


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_bad_files_raise_clear_errors(bad_files, backend):
    if backend != "auto":
        _backend(backend)
    cases = [("missing", "missing.mp4: no such file"), ("notes", "not a video FFmpeg can read"),
             ("empty", "empty file"), ("audio", "no video stream \\(it holds audio"),
             ("unknown", "unsupported codec"), ("dir", "is a folder")]
    for key, msg in cases:
        with pytest.raises(VideoError, match=msg) as e:
            read_frames(bad_files[key], num_frames=4, backend=backend)
        assert key == "dir" or bad_files[key].name in str(e.value)  # the message names the file


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_out_of_range(clips, backend):
    with pytest.raises(VideoError, match="frame index 40 out of range: the video has 40 frames \\(0..39\\)"):
        read_frames(clips["mp4"], indices=[0, 40], backend=_backend(backend))


def test_bad_requests(clips):
    p = clips["mp4"]
    for kw, msg in ((dict(rule="uniform"), "exactly one of num_frames, fps or indices \\(got none\\)"),
                    (dict(), "rule='vila' takes num_frames"), (dict(fps=2), "for a rate alone use rule='uniform'"),
                    (dict(num_frames=4, max_frames=2), "max_frames belongs to rule='uniform'"),
                    (dict(num_frames=4, fps=-1), "fps must be 0 \\(uniform\\) or a positive number"),
                    (dict(num_frames=4, rule="opencv"), "rule must be one of vila, uniform"),
                    (dict(num_frames=4, indices=[1]), "got num_frames, indices"),
                    (dict(num_frames=4, max_frames=2, rule="uniform"), "max_frames caps fps"),
                    (dict(indices=[-1]), "negative indices are not supported"), (dict(indices=[]), "indices is empty"),
                    (dict(indices=[1.5]), "must be integers"), (dict(fps=0, rule="uniform"), "fps must be a positive number"),
                    (dict(num_frames=4, backend="opencv"), "backend must be one of")):
        with pytest.raises(VideoError, match=msg):
            read_frames(p, **kw)


def test_cut_file_header_promises_more_frames(tmp_path):
    "A faststart MP4 cut at 60%: its header says 40 frames; PyAV re-chooses among those that decode, with a warning."
    rng = np.random.default_rng(0)
    noisy = CLIP.copy()
    noisy[:, 16:] = rng.integers(0, 256, (N, 48, 64, 3), dtype=np.uint8)
    with av.open(str(tmp_path / "full.mp4"), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=16)
        s.width, s.height, s.pix_fmt, s.options = 64, 64, "yuv444p", {"crf": "0", "g": "5"}
        for f in noisy:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    raw = (tmp_path / "full.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(raw[:int(len(raw) * 0.6)])
    assert video_info(cut).n_frames == N
    with pytest.warns(UserWarning, match="header says 40 frames but only"):
        frames = read_frames(cut, num_frames=8, backend="pyav")
    n_real = frame_number(frames[-1]) + 1
    assert 10 < n_real < N and [frame_number(f) for f in frames] == sample_indices(n_real, 8)
    with pytest.raises(VideoError, match="past the last readable frame"):
        read_frames(cut, indices=[0, N - 1], backend="pyav")


def test_codec_decord_cannot_decode(tmp_path):
    "AV1: decord 0.6's FFmpeg has no decoder (the error names the codec); decord2 reads it; auto falls back to PyAV."
    if "libsvtav1" not in av.codecs_available:
        pytest.skip("this PyAV build has no AV1 encoder")
    os.environ.setdefault("SVT_LOG", "1")
    p = write_video(CLIP[:12], tmp_path / "av1.mp4", fps=16, codec="libsvtav1", pix_fmt="yuv420p")
    assert video_info(p).codec == "av1"
    assert [frame_number(f) for f in read_frames(p, indices=[0, 11], backend="pyav")] == [0, 11]
    pytest.importorskip("decord")
    try:
        frames = read_frames(p, indices=[0, 11], backend="decord")
    except VideoError as e:
        assert "av1" in str(e) and "backend='pyav'" in str(e)
        with pytest.warns(UserWarning, match="reading it with PyAV instead"):
            frames = read_frames(p, indices=[0, 11])
    assert [frame_number(f) for f in frames] == [0, 11]


# --- synthetic video tasks ----------------------------------------------------------------------------------------

def _saturation(frames: np.ndarray) -> np.ndarray:
    r, g, b = (frames[..., c].astype(np.int16) for c in range(3))
    return np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)


def test_samples_are_deterministic():
    for task in VIDEO_DEFAULT_TASKS:
        a, b = make_video_sample(task, seed=3, index=5), make_video_sample(task, seed=3, index=5)
        assert np.array_equal(a["frames"], b["frames"]) and (a["question"], a["answer"]) == (b["question"], b["answer"])
        assert a["id"] == f"{task}_3_00005" and a["frames"].shape == (64, 64, 64, 3) and a["frames"].dtype == np.uint8
        assert not np.array_equal(a["frames"], make_video_sample(task, seed=4, index=5)["frames"])
    with pytest.raises(DatasetError, match="did you mean 'flash'"):
        make_video_sample("flsh")


def test_flash_is_missed_by_8_frames_and_caught_by_32():
    eight, thirty_two = sample_indices(64, 8), sample_indices(64, 32)
    assert flash_starts() and all(not {s, s + 1} & set(eight) for s in flash_starts())
    for seed in range(3):
        for i in range(10):
            s = make_video_sample("flash", seed=seed, index=i)
            on = _saturation(s["frames"]).reshape(64, -1).max(-1) > 60  # [64]: frames showing the flash
            assert on.sum() == 2 and not on[eight].any() and on[thirty_two].any()


def test_answers_are_balanced():
    for task in VIDEO_DEFAULT_TASKS:
        t = VIDEO_TASKS[task]
        answers = [make_video_sample(task, seed, i)["answer"] for seed in range(4) for i in range(60)]
        counts = [answers.count(a) for a in t.answers]
        assert min(counts) > 0.5 * len(answers) * t.chance and max(counts) < 1.5 * len(answers) * t.chance, (task, counts)


def test_dataset_round_trip_and_determinism(tmp_path):
    a = make_video_dataset(tmp_path / "a", ["flash", "direction"], n=2, seed=7, progress=False)
    b = make_video_dataset(tmp_path / "b", ["flash", "direction"], n=2, seed=7, progress=False)
    ra, rb = load_video_dataset(a), load_video_dataset(b)
    assert [r["id"] for r in ra] == ["flash_7_00000", "direction_7_00000", "flash_7_00001", "direction_7_00001"]
    assert [{k: r[k] for k in ("id", "question", "answer", "video")} for r in ra] == \
           [{k: r[k] for k in ("id", "question", "answer", "video")} for r in rb]
    meta = json.loads((a / "meta.json").read_text())
    assert (meta["n_frames"], meta["fps"], meta["seed"], meta["tasks"]) == (64, 16, 7, ["flash", "direction"])
    for r in ra:
        back = read_frames(r["video_path"], indices=range(64), backend="pyav")
        assert _diff(back, make_video_sample(r["task"], r["seed"], r["index"])["frames"]) <= 2


def test_dataset_never_overwrites_by_accident(tmp_path):
    out = make_video_dataset(tmp_path / "set", "order", n=2, seed=0, progress=False)
    with pytest.raises(FileExistsError, match="not empty"):
        make_video_dataset(out, "order", n=1, progress=False)
    (out / "mine.txt").write_text("keep")
    make_video_dataset(out, "direction", n=1, seed=0, overwrite=True, progress=False)
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["direction_0_00000.mp4"]
    assert (out / "mine.txt").read_text() == "keep"
    images = make_dataset("colour", n=1, seed=0, out_dir=tmp_path / "images", progress=False)
    with pytest.raises(FileExistsError, match="nothing was deleted"):
        make_video_dataset(images, "order", n=1, overwrite=True, progress=False)
    assert len(list((images / "images").iterdir())) == 1 and (images / "data.jsonl").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="is a file"):
        make_video_dataset(tmp_path / "file", "order", n=1, progress=False)


def test_shipped_sample_is_what_the_code_makes(root):
    "data_samples/videos decodes to exactly the frames the generator makes today (within YUV rounding)."
    folder = root / "data_samples" / "videos"
    rows = load_video_dataset(folder)
    meta = json.loads((folder / "meta.json").read_text())
    assert len(rows) == meta["n_per_task"] * len(meta["tasks"]) and sum(p.stat().st_size for p in folder.rglob("*")) < 200_000
    for r in rows:
        s = make_video_sample(r["task"], r["seed"], r["index"], meta["n_frames"])
        assert (s["id"], s["question"], s["answer"]) == (r["id"], r["question"], r["answer"])
        assert _diff(read_frames(r["video_path"], indices=range(meta["n_frames"]), backend="pyav"), s["frames"]) <= 2


# --- VILA's frame rule ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, k, video_fps, fps, want", [
    (40, 8, 16, 0, [0, 6, 11, 17, 22, 28, 33, 39]),  # fps 0: round(linspace(0, 39, 8)) (5.57 -> 6, 11.14 -> 11, ...)
    (3, 5, 30, 0, [0, 0, 1, 2, 2]),  # fewer frames than asked: repeats (linspace 0, .5, 1, 1.5, 2; halves to even)
    (90, 4, 30, 2, [0, 15, 30, 45]),  # t = 0, .5, 1, 1.5 s (of 3 s): the first 4 only
    (25, 16, 25, 4, [0, 6, 12, 18]),  # 1 s clip: t = 0, .25, .5, .75 -> 0, 6.25, 12.5, 18.75 truncated; 4 < 16
    (1, 8, 30, 30, [0]),  # one frame: one timestamp
])
def test_vila_indices_by_hand(n, k, video_fps, fps, want):
    from nvila_lab.video import vila_indices
    assert vila_indices(n, k, video_fps, fps) == want


def test_vila_rule_is_the_default_and_uniform_the_option(clips):
    from nvila_lab.video import vila_indices
    p = clips["mp4"]  # 40 frames at 16 fps
    assert [frame_number(f) for f in read_frames(p, num_frames=5, fps=4)] == vila_indices(N, 5, 16, 4) == [0, 4, 8, 12, 16]
    # the kit's rate rule spreads over the whole clip instead of keeping its start
    assert [frame_number(f) for f in read_frames(p, fps=4, max_frames=5, rule="uniform")] == fps_indices(N, 16, 4, 5)
    assert fps_indices(N, 16, 4, 5) != vila_indices(N, 5, 16, 4)


# --- optional decoders: one line naming the extra -------------------------------------------------------------------

def test_missing_decoders_are_one_line(clips, monkeypatch):
    import sys
    from nvila_lab.config import MissingExtra
    from nvila_lab import video
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    monkeypatch.setitem(sys.modules, "decord", None)
    cases = [(lambda: read_frames(clips["mp4"], num_frames=4), "reading video needs PyAV or decord2"),
             (lambda: read_frames(clips["mp4"], num_frames=4, backend="decord"), "backend='decord' needs decord2"),
             (lambda: write_video(CLIP[:2], clips["mp4"].parent / "x.mp4"), "with PyAV needs PyAV (av)"),
             (lambda: video.video_info(clips["mp4"]), "with PyAV needs PyAV (av)"),
             (lambda: video._read_decord(clips["mp4"], lambda p, n, f: [0]), "backend='decord' needs decord2")]
    for call, msg in cases:
        with pytest.raises(MissingExtra) as e:
            call()
        assert msg in str(e.value) and "pip install 'nvila-lab[video]'" in str(e.value) and "\n" not in str(e.value)


def test_video_data_without_pyav_is_one_line(tmp_path, monkeypatch):
    import sys
    from nvila_lab.config import MissingExtra
    from nvila_lab.video_data import make_video_dataset
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(MissingExtra, match=r"pip install 'nvila-lab\[video\]'"):
        make_video_dataset(tmp_path / "v", ["flash"], n=1, progress=False)
