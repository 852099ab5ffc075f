"""Measure the stages of one request on this CPU for a grid of small configs and precisions (random weights), the
data notebook 52 calibrates the latency model's CPU efficiency factors on.

    .venv/bin/python benchmarks/latency_cpu.py              # ~2 min on 2 cores -> nbs/results/latency_cpu.jsonl
    .venv/bin/python benchmarks/latency_cpu.py --quick --out /tmp/lat.jsonl

Every record carries the full config, so the prediction for it can be rebuilt exactly.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nvila_lab.config import get_config  # noqa: E402
from nvila_lab.latency_measure import measure_preset, save_records  # noqa: E402

MEDIUM = dict(name="cpu-medium", image_size=224, patch_size=16, s2_scales=(224, 448), max_tiles=4,
              vision_hidden=384, vision_intermediate=1536, vision_layers=6, vision_heads=6,
              llm_hidden=1024, llm_layers=8, llm_intermediate=2816, llm_heads=16, llm_kv_heads=4)
LARGE = dict(MEDIUM, name="cpu-large", vision_hidden=768, vision_intermediate=3072, vision_layers=8, vision_heads=12,
             llm_hidden=1536, llm_layers=12, llm_intermediate=4096, llm_heads=12, llm_kv_heads=2)


def grid(quick: bool):
    tiny = get_config("tiny")
    cfgs = [("tiny", tiny, "448x448"), ("tiny", tiny, "192x192"), ("cpu-medium", tiny.replace(**MEDIUM), "448x448"),
            ("cpu-medium", tiny.replace(**MEDIUM), "224x224"), ("cpu-large", tiny.replace(**LARGE), "448x448")]
    precisions = [("bf16", "bf16"), ("w8a8", "w4a16")]
    if quick:
        cfgs, precisions = cfgs[:1] + cfgs[2:3], precisions
    return [(n, c, i, v, l) for n, c, i in cfgs for v, l in precisions]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "nbs" / "results" / "latency_cpu.jsonl")
    a = ap.parse_args(argv)
    repeats = a.repeats or (2 if a.quick else 7)
    t0, records = time.time(), []
    for name, cfg, image, vit, llm in grid(a.quick):
        m = measure_preset(cfg, image, vit=vit, llm=llm, new_tokens=8, warmup=2, repeats=repeats, device="cpu")
        for r in m.records():
            records.append(r | {"config": dataclasses.asdict(cfg)})
        print(f"{name:10s} {image:8s} {vit:5s}/{llm:5s} " + "  ".join(f"{k} {v.median_ms:7.2f}" for k, v in m.stages.items()),
              flush=True)
    out = a.out
    if out.exists():
        out.unlink()
    save_records(records, out, append=False)
    print(f"{len(records)} records in {time.time() - t0:.0f} s -> {out} (torch threads {torch.get_num_threads()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
