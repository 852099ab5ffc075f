#!/usr/bin/env python
"""How fast each video backend (decord, PyAV) decodes N uniformly sampled frames, on this machine's CPU.

NVILA samples N frames uniformly (indices round(linspace(0, n_frames - 1, N))); with N = 256 the decoder sits on
the data loader's critical path. This script reads N = 8, 32, 64 uniform frames with
`nvila_lab.video.read_frames(path, num_frames=N, backend=...)` (file open included, as in a data loader) from

* the shipped clips in `data_samples/videos/` (64 frames, 64x64, lossless H.264 4:4:4; made first if absent);
* a longer generated clip: 1800 frames of 320x240 at 30 fps (60 s), ordinary H.264 4:2:0 at crf 23 with a
  keyframe every 2 s, written into a temporary folder.

Each case runs `--repeats` times after one warm-up read; the median wall time is reported, with frames/s
(frames returned per second) and the speed ratio decord/pyav measured in the same run (> 1: decord is faster).
Both backends must return the same frames: the long clip's frames carry their index, which is checked.

Results go to benchmarks/results/decode_speed_cpu.{json,md} (`--name` changes the file name). CPU only; under a
minute on 2 cores. The script works with decord 0.6, decord2 (same `import decord`) or PyAV alone.

    .venv/bin/python benchmarks/decode_speed.py [--repeats 5] [--long-frames 1800] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from nvila_lab.video import (available_backends, frame_number, numbered_frame, read_frames,  # noqa: E402
                             sample_indices, video_info, write_video)
from nvila_lab.video_data import VIDEO_DEFAULT_TASKS, load_video_dataset, make_video_dataset  # noqa: E402

NS = (8, 32, 64)


def machine() -> dict:
    "CPU model and cores, OS, Python and library versions, date: what the figures depend on."
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or "unknown"
    versions = {}
    for dist in ("numpy", "av", "decord", "decord2"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        import av
        versions["ffmpeg (PyAV's libavcodec)"] = ".".join(map(str, av.library_versions["libavcodec"]))
    except Exception:
        pass
    return {"cpu": model, "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "os": platform.platform(), "python": platform.python_version(), "versions": versions,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def scene_frames(n: int, h: int = 240, w: int = 320, seed: int = 0):
    "n frames [h, w, 3] uint8: two textures sliding opposite ways plus grain (work for the codec), index on top."
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w + 3 * n]
    far = np.sin(xx / 9.0) * np.cos(yy / 13.0)  # [h, w + 3n], slides left 2 px a frame
    near = np.sin((xx + 2 * yy) / 17.0) * np.sin(yy / 5.0 + xx / 31.0)  # [h, w + 3n], slides right 3 px a frame
    tint_far, tint_near = np.array([1.0, 0.6, 0.3]), np.array([0.3, 0.7, 1.0])
    grain = rng.integers(-6, 7, (8, h, w, 1)).astype(np.int16)  # [8, h, w, 1], cycled
    band = 2 * max(2, h // 8)
    for i in range(n):
        img = (127 + 45 * far[:, 2 * i:2 * i + w, None] * tint_far
               + 35 * near[:, 3 * (n - i):3 * (n - i) + w, None] * tint_near)  # [h, w, 3]
        img = np.clip(img + grain[i % 8], 0, 255).astype(np.uint8)
        img[:band] = numbered_frame(i, h, w)[:band]
        yield img


def time_case(paths: list[Path], n: int, backend: str, repeats: int) -> tuple[float, list[np.ndarray]]:
    "Median seconds to read n uniform frames from every file in `paths` (one warm-up first), and the frames read."
    read_frames(paths[0], num_frames=n, backend=backend)  # warm-up: library init, file cache
    times, first = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        out = [read_frames(p, num_frames=n, backend=backend) for p in paths]  # each [n, H, W, 3]
        times.append(time.perf_counter() - t0)
        first = first or out
    return statistics.median(times), first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--long-frames", type=int, default=1800)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="decode_speed_cpu", help="file name (without extension) of the results")
    args = ap.parse_args(argv)
    backends = [b for b in ("decord", "pyav") if b in available_backends()]
    if "pyav" not in backends:
        print("PyAV is needed (pip install av)", file=sys.stderr)
        return 1
    info = machine()
    print(f"{info['cpu']}, {info['usable_cores']} usable cores, load {info['load_average_at_start']}; "
          f"{info['versions']}; backends {backends}")

    shipped = ROOT / "data_samples" / "videos"
    if not (shipped / "data.jsonl").exists():
        print(f"making the shipped sample in {shipped}")
        make_video_dataset(shipped, VIDEO_DEFAULT_TASKS, n=4, seed=0, progress=False)
    clips = [Path(r["video_path"]) for r in load_video_dataset(shipped)]

    results = []
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        long = write_video(scene_frames(args.long_frames), Path(d) / "long.mp4", fps=30, pix_fmt="yuv420p", crf=23,
                           options={"g": "60"})
        t_write = time.perf_counter() - t0
        li = video_info(long)
        print(f"generated {li} ({long.stat().st_size / 2**20:.1f} MB) in {t_write:.1f} s")
        ci = video_info(clips[0])
        sources = [(f"shipped clips ({len(clips)} x {ci.n_frames} frames {ci.width}x{ci.height}, {ci.codec} 4:4:4 lossless)",
                    clips, ci), (f"long clip ({li.n_frames} frames {li.width}x{li.height} @ {li.fps:g} fps, "
                                 f"{li.codec} 4:2:0 crf 23, keyframe every 2 s)", [long], li)]
        for label, paths, vi in sources:
            for n in NS:
                row = {"source": label, "files": len(paths), "n_frames_in_file": vi.n_frames, "N": n}
                got = {}
                for b in backends:
                    sec, got[b] = time_case(paths, n, b, args.repeats)
                    row[f"{b}_s"] = sec  # for all files together
                    row[f"{b}_frames_per_s"] = n * len(paths) / sec
                if paths == [long]:  # the right frames: each carries its index
                    for b, (frames,) in got.items():
                        assert [frame_number(f) for f in frames] == sample_indices(vi.n_frames, n), b
                if len(got) == 2:  # the same frames from both backends
                    row["max_pixel_difference"] = max(int(np.abs(a.astype(int) - c.astype(int)).max())
                                                      for a, c in zip(got["decord"], got["pyav"]))
                    assert row["max_pixel_difference"] <= 2, row
                row["decord_over_pyav_speed"] = row["pyav_s"] / row["decord_s"] if "decord_s" in row else None
                results.append(row)
                print(f"{label[:13]:<13} N={n:<3} " + "  ".join(
                    f"{b} {row[f'{b}_s'] * 1000:8.1f} ms {row[f'{b}_frames_per_s']:7.0f} fr/s" for b in backends)
                    + (f"  decord/pyav x{row['decord_over_pyav_speed']:.2f}" if row["decord_over_pyav_speed"] else ""))

    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "decode N uniform frames (nvila_lab.video.read_frames, file open included)",
           "repeats": args.repeats, "statistic": "median wall seconds over repeats, after one warm-up read",
           "machine": info, "long_clip_write_s": round(t_write, 2), "results": results}
    (args.out / f"{args.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# Video decode speed on CPU ({info['date'][:10]})", "",
             f"Machine: {info['cpu']}, {info['usable_cores']} usable cores (load average at start "
             f"{info['load_average_at_start']}); {info['os']}; Python {info['python']}; "
             + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".", "",
             f"Reading N uniform frames with `read_frames(path, num_frames=N, backend=...)`, file open included; median "
             f"of {args.repeats} runs after a warm-up. Frames/s counts frames returned. Ratio = decord speed / PyAV "
             "speed in the same run (> 1: decord faster). Produced by `benchmarks/decode_speed.py`.", "",
             "| source | N | " + " | ".join(f"{b} ms | {b} frames/s" for b in backends) + " | decord/pyav |",
             "|---|---|" + "---|---|" * len(backends) + "---|"]
    for r in results:
        ratio = f"{r['decord_over_pyav_speed']:.2f}" if r["decord_over_pyav_speed"] else "n/a"
        lines.append(f"| {r['source']} | {r['N']} | " + " | ".join(
            f"{r[f'{b}_s'] * 1000:.1f} | {r[f'{b}_frames_per_s']:.0f}" for b in backends) + f" | {ratio} |")
    lines += ["", "Times for the shipped clips are for all of them together (one read per clip)."]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / args.name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
