"""NVILA's Table 7 in miniature: nano-nvila in bf16, with a W4A16 LLM (AWQ and RTN side by side), and with a W8A8 or
FP8 vision tower on top; accuracy per task on held-out synthetic questions and time to first token on this machine.

    .venv/bin/python benchmarks/quant_table7.py                  # the full run (~2 min on 2 CPU cores)
    .venv/bin/python benchmarks/quant_table7.py --quick --out /tmp/t7   # the reduced run the tests use

Writes quant_table7.json and quant_table7.csv to --out (default nbs/results). Every row is quantised from the
same float checkpoint in the same run, so the ratios compare like with like. GPU figures: only from a GPU run.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nvila_lab.checkpoint_load import load_nvila  # noqa: E402
from nvila_lab.data import SyntheticVQA, row_media  # noqa: E402
from nvila_lab.evaluate import evaluate  # noqa: E402
from nvila_lab.quant.awq import llm_calibration, quantize_llm  # noqa: E402
from nvila_lab.quant.kernels import set_int4_kernel, time_ms  # noqa: E402
from nvila_lab.quant.smoothquant import calibrate_tower, calibration_media, quantize_tower  # noqa: E402

CHECKPOINT = ROOT / "data_samples" / "checkpoints" / "nano-nvila"
CALIB = ROOT / "data_samples" / "vqa"
# (label, vision tower, LLM): NVILA's three rows, FP8 for Hopper, and RTN beside AWQ
ROWS = [("bf16", "bf16", "bf16"), ("W4A16 RTN", "bf16", "rtn"), ("W4A16 AWQ", "bf16", "awq"),
        ("W8A8 + W4A16 RTN", "w8a8", "rtn"), ("W8A8 + W4A16 AWQ", "w8a8", "awq"), ("FP8 + W4A16 AWQ", "fp8", "awq")]
QUICK_ROWS = ["bf16", "W4A16 AWQ", "W8A8 + W4A16 AWQ"]
# Table 7 (RTX 4090): AI2D, MMMU, VideoMME, time to first token
PAPER = {"bf16": {"AI2D": 91.0, "MMMU": 50.7, "VideoMME": 63.9, "ttft_s": 0.90},
         "W4A16 AWQ": {"AI2D": 90.9, "MMMU": 49.2, "VideoMME": 62.0, "ttft_s": 0.77},
         "W8A8 + W4A16 AWQ": {"AI2D": 90.9, "MMMU": 49.3, "VideoMME": 62.1, "ttft_s": 0.65}}
TOLERANCE = 0.05  # "keeps accuracy": within 5 points of bf16 (the paper's worst drop is 1.9 points; our 200 questions
#                   resolve about +-2.5) and no more questions lost than the paired sign test's noise band


def build(base, calib_media, llm_calib, vit: str, llm: str, alpha: float) -> tuple[object, dict]:
    "A copy of the float model with its tower and LLM quantised as asked, and the quantisation reports."
    m, reps = copy.deepcopy(base), {}
    if vit != "bf16":
        stats = calibrate_tower(m, calib_media)
        reps["vision_tower"] = quantize_tower(m, stats, alpha=alpha, mode="int8" if vit == "w8a8" else "fp8").to_dict()
    if llm != "bf16":
        reps["llm"] = quantize_llm(m.llm, llm_calib, llm, 128).to_dict()
        set_int4_kernel(m.llm, "cpu" if not torch.cuda.is_available() else "reference")
    return m, reps


def ttft_ms(models: dict, row, repeats: int) -> dict[str, dict]:
    """Time to first token of one image question (vision tower, projector, prefill, one token) for each model,
    interleaved (one call of each model per round) so that drift in the machine's speed hits every row alike."""
    media, q = row_media(row), row["question"]
    calls = {k: (lambda m=m: m.generate(media, q, max_new_tokens=1)) for k, m in models.items()}
    for fn in calls.values():
        time_ms(fn, warmup=2, repeats=1)
    ts = {k: [] for k in models}
    for _ in range(repeats):
        for k, fn in calls.items():
            ts[k].append(time_ms(fn, warmup=0, repeats=1))
    return {k: {"median_ms": sorted(v)[len(v) // 2], "min_ms": min(v), "max_ms": max(v), "repeats": repeats}
            for k, v in ts.items()}


def cpu_name() -> str:
    "The CPU's model name (Linux), else the platform's machine type."
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def verdict(res: dict) -> list[dict]:
    "Paper vs kit, claim by claim."
    acc = {r["label"]: r["accuracy"] for r in res["rows"]}
    rows = {r["label"]: r for r in res["rows"]}
    base = acc["bf16"]
    out = []
    for label in ("W4A16 AWQ", "W8A8 + W4A16 AWQ"):
        if label in acc:
            d = acc[label] - base
            a, r = set(rows[label].get("right_ids", [])), set(rows["bf16"].get("right_ids", []))
            lost, gained = len(r - a), len(a - r)  # paired: questions bf16 answers and the quantised model does not
            band = 2 * (lost + gained) ** 0.5
            tasks = ", ".join(f"{t} {100 * (rows[label]['tasks'][t] - rows['bf16']['tasks'][t]):+.0f}"
                              for t in rows["bf16"]["tasks"])
            out.append({"claim": f"{label} keeps bf16 accuracy", "paper": "within 1.9 points on AI2D/MMMU/VideoMME",
                        "kit": f"{d * 100:+.1f} points ({acc[label]:.1%} vs {base:.1%}; per task {tasks}); "
                               f"{lost} question(s) lost, {gained} gained (sign-test band +-{band:.1f})",
                        "verdict": ("does not" if abs(d) > TOLERANCE or lost - gained > band else
                                    "borderline (at the edge of the noise band)" if lost - gained >= 0.75 * band else
                                    "reproduces")})
    by = {r["label"]: r for r in res["rows"]}
    if "W4A16 RTN" in by and "W4A16 AWQ" in by:
        awq, rtn = by["W4A16 AWQ"], by["W4A16 RTN"]
        ratio = rtn["reports"]["llm"]["mean"] / awq["reports"]["llm"]["mean"]
        out.append({"claim": "AWQ beats RTN on the LLM's block error", "paper": "AWQ's objective (llm-awq)",
                    "kit": f"mean relative MSE of the decoder layer outputs: RTN {ratio:.2f}x AWQ's",
                    "verdict": "reproduces" if ratio > 1 else "does not"})
        a, r = set(awq["right_ids"]), set(rtn["right_ids"])
        b, c = len(a - r), len(r - a)  # questions only AWQ gets right, only RTN gets right
        noise = 2 * (b + c) ** 0.5  # a sign test's ~95% band on the difference of the discordant pairs
        out.append({"claim": "AWQ beats RTN on accuracy at W4 g128", "paper": "AWQ paper: RTN loses more; NVILA reports AWQ only",
                    "kit": f"AWQ {awq['accuracy']:.1%} vs RTN {rtn['accuracy']:.1%}: {b} question(s) only AWQ answers, "
                           f"{c} only RTN (difference {b - c:+d}, noise band +-{noise:.1f})",
                    "verdict": "reproduces" if b - c > noise else ("does not" if c - b > noise else "within noise")})
    t = {r["label"]: r["ttft"]["median_ms"] for r in res["rows"]}
    for label in ("W4A16 AWQ", "W8A8 + W4A16 AWQ"):
        if label in t:
            ratio = t["bf16"] / t[label]
            paper = PAPER["bf16"]["ttft_s"] / PAPER[label]["ttft_s"]
            out.append({"claim": f"{label} lowers time to first token", "paper": f"{paper:.2f}x on an RTX 4090 (8B)",
                        "kit": f"{ratio:.2f}x on {res['meta']['device']} (nano-nvila, {t[label]:.1f} vs "
                               f"{t['bf16']:.1f} ms)",
                        "verdict": "reproduces" if ratio >= 1.05 else "does not"})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rows, 5 questions a task, 3 repeats (tests)")
    ap.add_argument("--n-eval", type=int, default=None, help="questions per task (default 50; 5 with --quick)")
    ap.add_argument("--n-calib", type=int, default=32, help="calibration rows (default 32)")
    ap.add_argument("--alpha", type=float, default=0.3, help="SmoothQuant alpha (default 0.3, NVILA's demo)")
    ap.add_argument("--out", type=Path, default=ROOT / "nbs" / "results")
    a = ap.parse_args(argv)
    n_eval = a.n_eval or (5 if a.quick else 50)
    repeats = 3 if a.quick else 15
    t0 = time.time()
    torch.manual_seed(0)
    base = load_nvila(CHECKPOINT, dtype=torch.bfloat16)
    a.n_calib = 8 if a.quick and a.n_calib == 32 else a.n_calib
    calib_media = calibration_media(CALIB, a.n_calib)
    llm_calib = llm_calibration(base, CALIB, n=a.n_calib)
    eval_set = SyntheticVQA(n=n_eval, seed=9191)  # questions no calibration row or training row used
    probe = eval_set[0]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu_name()}, {torch.get_num_threads()} threads"
    rows, models = [], {}
    for label, vit, llm in ROWS:
        if a.quick and label not in QUICK_ROWS:
            continue
        tq = time.time()
        m, reps = build(base, calib_media, llm_calib, vit, llm, a.alpha)
        quant_s = time.time() - tq
        r = evaluate(m, eval_set, progress=False)
        models[label] = m
        rows.append({"label": label, "vit": vit, "llm": llm, "accuracy": r.accuracy,
                     "tasks": {t: s.accuracy for t, s in r.tasks.items()}, "correct": r.correct, "n": r.n,
                     "right_ids": sorted(p["id"] for p in r.predictions if p["correct"]),
                     "quantize_seconds": quant_s, "reports": reps})
        print(f"{label:18s} acc {r.accuracy:6.1%}  " + "  ".join(f"{t} {s.accuracy:4.0%}" for t, s in r.tasks.items()),
              flush=True)
    times = ttft_ms(models, probe, repeats)
    for r in rows:
        r["ttft"] = times[r["label"]]
        print(f"{r['label']:18s} TTFT median {r['ttft']['median_ms']:.1f} ms (min {r['ttft']['min_ms']:.1f}, "
              f"max {r['ttft']['max_ms']:.1f}, {repeats} rounds)")
    res = {"meta": {"command": "python benchmarks/quant_table7.py" + (" --quick" if a.quick else ""),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "device": device, "torch": torch.__version__, "dtype": "bfloat16", "n_eval": len(eval_set),
                    "eval": f"SyntheticVQA(n={n_eval}, seed=9191)", "calib_rows": a.n_calib, "alpha": a.alpha,
                    "group_size": 128, "int4_kernel": "cpu" if not torch.cuda.is_available() else "reference",
                    "gpu": "unmeasured" if not torch.cuda.is_available() else device,
                    "seconds": round(time.time() - t0, 1), "complete": True},
           "paper": PAPER, "rows": rows}
    res["verdict"] = verdict(res)
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = a.out / "quant_table7.json.partial"
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(a.out / "quant_table7.json")  # a half-written result never looks finished
    tasks = list(rows[0]["tasks"])
    with open(a.out / "quant_table7.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "vit", "llm", "accuracy", *tasks, "ttft_ms", "device"])
        for r in rows:
            w.writerow([r["label"], r["vit"], r["llm"], f"{r['accuracy']:.4f}", *(f"{r['tasks'][t]:.4f}" for t in tasks),
                        f"{r['ttft']['median_ms']:.2f}", device])
    for v in res["verdict"]:
        print(f"- {v['claim']}: paper {v['paper']}; kit {v['kit']} -> {v['verdict']}")
    print(f"total {res['meta']['seconds']:.0f} s; wrote {a.out / 'quant_table7.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
