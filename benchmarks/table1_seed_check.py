#!/usr/bin/env python
"""Is a Table 1 row (notebook 90) a property of its setting or of its seed? Rerun rows with other seeds.

Notebook 90 trains each visual setting once, with seed 0, and learning to read is a jump that a short run
makes or misses. This script reruns chosen settings with the notebook's full-run recipe (pretrained tower,
600 one-tile `read_code` warm-up steps, 300 SFT steps on full pages of read_code/count/colour, batch 16,
lr 1e-3, 100 held-out questions per task, seed 4242) under other model seeds, and saves what it measured.

    .venv/bin/python benchmarks/table1_seed_check.py [--settings s2-2x2,tokenlearner] [--seeds 1] [--threads 1]

Several invocations can run side by side (one thread each); results are appended to
benchmarks/results/table1_seed_check_cpu.jsonl, one line per (setting, seed).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from nvila_lab.config import get_config  # noqa: E402
from nvila_lab.data import SyntheticVQA, load_tokenizer  # noqa: E402
from nvila_lab.experiment import run_setting  # noqa: E402
from nvila_lab.tower_pretrain import load_pretrained_tower  # noqa: E402
from nvila_lab.train import TrainConfig  # noqa: E402

SETTINGS = {  # key: (notebook 90's row name, config overrides, projector kwargs)
    "low-res": ("low-res + 2x2", dict(tiling="resize"), {}),
    "s2-2x2": ("Dynamic-S2 + 2x2", {}, {}),
    "s2-3x3": ("Dynamic-S2 + 3x3", dict(projector="stc3x3"), {}),
    "tokenlearner": ("Dynamic-S2 + TokenLearner 9/tile", dict(projector="tokenlearner"), {"n_tokens": 9}),
    "avgpool": ("Dynamic-S2 + avg-pool 3x3", dict(projector="avgpool"), {"k": 3}),
}
TASKS = ("read_code", "count", "colour")
WARMUP, STEPS, N_EVAL, BATCH = 600, 300, 100, 16  # notebook 90's full run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default="s2-2x2,tokenlearner", help=f"comma-separated, from {', '.join(SETTINGS)}")
    ap.add_argument("--seeds", default="1", help="comma-separated model seeds (notebook 90 uses 0)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "table1_seed_check_cpu.jsonl"))
    a = ap.parse_args()
    keys = a.settings.split(",")
    bad = [k for k in keys if k not in SETTINGS]
    if bad:
        ap.error(f"unknown setting(s) {bad}; choose from {', '.join(SETTINGS)}")
    seeds = [int(s) for s in a.seeds.split(",")]
    torch.set_num_threads(a.threads)
    tok, tower = load_tokenizer(), load_pretrained_tower()
    small_pages = SyntheticVQA(["read_code"], n=WARMUP * BATCH + BATCH, seed=3, size=(64, 64))
    train_data = SyntheticVQA(TASKS, n=STEPS * BATCH // len(TASKS) + BATCH, seed=1)
    held_out = SyntheticVQA(TASKS, n=N_EVAL, seed=4242)
    recipe = [(TrainConfig(steps=WARMUP, batch_size=BATCH, lr=1e-3, tiling="resize", log_every=60), small_pages),
              TrainConfig(steps=STEPS, batch_size=BATCH, lr=1e-3, log_every=30)]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for key in keys:
        name, over, kw = SETTINGS[key]
        for seed in seeds:
            r = run_setting(name, get_config("tiny", **over).replace(projector_kwargs=kw or {}), tok, train_data,
                            held_out, recipe, seed=seed, tower=tower)
            r |= {"seed": seed, "threads": a.threads, "torch": torch.__version__,
                  "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            with out.open("a") as f:
                f.write(json.dumps(r) + "\n")
            acc = "  ".join(f"{t} {r['accuracy'][t]:.0%}" for t in TASKS)
            print(f"{name:34s} seed {seed} | {acc} | {r['train_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
