"""NVILA's Figure 5 ladder on a GPU: NVILA-8B-shaped model (random weights), one image and a 64-frame video,
bf16 -> + token compression -> + W4A16 LLM -> + W8A8 (INT8) or FP8 vision tower; every stage measured with CUDA
events (notebook 51's harness) beside the roofline's prediction (notebook 50), ratios against the bf16 row of the
same run, saved with the GPU's name.

    python benchmarks/latency_ladder.py --out DIR          # on a GPU machine, < 6 minutes on an H200
    python benchmarks/latency_ladder.py --dry-run          # anywhere: the plan and the predictions only

Writes DIR/latency_ladder_gpu.json (summary) and DIR/latency_gpu.jsonl (one record per stage, the format notebook 52
calibrates on and the latency dashboard overlays).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nvila_lab.config import get_config  # noqa: E402
from nvila_lab.hardware import HARDWARE  # noqa: E402
from nvila_lab.latency import predict_latency  # noqa: E402

IMAGE = "1344x896"
FRAMES = 64


def ladder() -> list[dict]:
    "The rows: (label, config, input, vit, llm) for the image and the video."
    img, vid = get_config("nvila-8b"), get_config("nvila-8b-video")
    rows = []
    for kind, base, comp in (("image", img.replace(projector="stc2x2"), img.replace(projector="stc3x3")),
                             ("video", vid.replace(temporal_pool=1), vid.replace(temporal_pool=8))):
        rows += [{"kind": kind, "label": "bf16", "cfg": base, "vit": "bf16", "llm": "bf16"},
                 {"kind": kind, "label": "+ token compression", "cfg": comp, "vit": "bf16", "llm": "bf16"},
                 {"kind": kind, "label": "+ W4A16 LLM", "cfg": comp, "vit": "bf16", "llm": "w4a16"},
                 {"kind": kind, "label": "+ W8A8 ViT", "cfg": comp, "vit": "w8a8", "llm": "w4a16"},
                 {"kind": kind, "label": "+ FP8 ViT", "cfg": comp, "vit": "fp8", "llm": "w4a16"}]
    return rows


def predicted(row: dict, device: str) -> dict:
    v = row["kind"] == "video"
    p = predict_latency(row["cfg"], device, image=None if v else IMAGE, video_frames=FRAMES if v else None,
                        vit=row["vit"], llm=row["llm"], new_tokens=32)
    return p.to_dict()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "nbs" / "results")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and predictions; measure nothing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=330, help="stop adding rows after this long")
    a = ap.parse_args(argv)
    t0 = time.time()
    gpu = torch.cuda.is_available() and not a.dry_run
    dev_key = "h200"  # the lent machine's GPU; a dry run predicts for it
    if gpu:
        flat = torch.cuda.get_device_name().lower().replace(" ", "").replace("-", "")
        hits = [k for k in HARDWARE if k != "cpu" and k.replace("-", "").replace("jetson", "") in flat]
        dev_key = max(hits, key=len) if hits else None
        if dev_key is None:
            raise SystemExit(f"{torch.cuda.get_device_name()} is not in the hardware table (nvila_lab/hardware.py); "
                             "add its row to compare the prediction")
    rows, records = [], []
    for row in ladder():
        out = {k: row[k] for k in ("kind", "label", "vit", "llm")} | {"preset": row["cfg"].name,
                                                                       "projector": row["cfg"].projector,
                                                                       "temporal_pool": row["cfg"].temporal_pool}
        out["predicted"] = predicted(row, dev_key)
        if gpu and time.time() - t0 < a.max_seconds:
            from nvila_lab.latency_measure import measure_preset
            try:
                m = measure_preset(row["cfg"], IMAGE, FRAMES if row["kind"] == "video" else None, row["vit"],
                                   row["llm"], new_tokens=16, warmup=2, repeats=a.repeats, device="cuda")
                out["measured"] = {k: v.median_ms for k, v in m.stages.items()} | {"ttft_ms": m.ttft_ms,
                                                                                   "peak_memory_gb": m.peak_memory_bytes / 1e9}
                records += [r | {"label": row["label"], "kind": row["kind"], "config": dataclasses.asdict(row["cfg"])}
                            for r in m.records()]
            except Exception as e:  # one failing row is a note, not a lost run
                out["measured"] = None
                out["note"] = f"{type(e).__name__}: {e}"
            gc.collect(); torch.cuda.empty_cache()
        rows.append(out)
        meas = out.get("measured") or {}
        print(f"{row['kind']:5s} {row['label']:20s} predicted TTFT {out['predicted']['ttft_ms']:8.1f} ms, "
              f"decode {out['predicted']['decode_tokens_per_s']:6.0f} tok/s"
              + (f" | measured TTFT {meas['ttft_ms']:8.1f} ms, decode {1e3 / meas['decode_per_token']:6.0f} tok/s"
                 if meas else ""), flush=True)
    for kind in ("image", "video"):
        base = next(r for r in rows if r["kind"] == kind and r["label"] == "bf16")
        for r in rows:
            if r["kind"] != kind:
                continue
            r["predicted_ttft_ratio"] = base["predicted"]["ttft_ms"] / r["predicted"]["ttft_ms"]
            if r.get("measured") and base.get("measured"):
                r["measured_ttft_ratio"] = base["measured"]["ttft_ms"] / r["measured"]["ttft_ms"]
                r["measured_decode_ratio"] = base["measured"]["decode_per_token"] / r["measured"]["decode_per_token"]
    res = {"benchmark": "latency_ladder", "gpu": torch.cuda.get_device_name() if gpu else "unmeasured",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "image": IMAGE, "frames": FRAMES, "predicted_for": dev_key,
           "seconds": round(time.time() - t0, 1), "rows": rows, "complete": True}
    if a.dry_run:
        print(json.dumps({k: v for k, v in res.items() if k != "rows"}))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = a.out / "latency_ladder_gpu.json.partial"
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(a.out / "latency_ladder_gpu.json")
    if records:
        from nvila_lab.latency_measure import save_records
        save_records(records, a.out / "latency_gpu.jsonl", append=False)
    print(f"total {res['seconds']:.0f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
