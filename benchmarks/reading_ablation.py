#!/usr/bin/env python
"""What lets the tiny model learn to read a 2-digit code on a full page: an ablation on this machine's CPU.

`read_code` prints a 2-digit code ~10 px tall in a small box somewhere on a 256x192 page; with Dynamic-S2 and
the 2x2 projector the page becomes 192 visual tokens, and the code lives in one or two of them. Trained end to
end from random weights, the tiny model stays at chance on it (notebook 10). This script trains four arms, each
on read_code alone, from the same seed, and scores 100 held-out questions (a seed never trained on):

    A  random tower, no warm-up          --full-steps on full pages
    B  pretrained tower (notebook 09a), no warm-up
    C  pretrained tower + --warmup-steps on 64x64 pages encoded as one tile (16 tokens), then full pages
    D  as C with a 2-layer LLM instead of tiny's 4 (does reading the second digit need the depth?)

Arms run one after another with the same learning rate (1e-3) and batch (16). Results go to
benchmarks/results/reading_ablation_cpu.{json,md}. About 20 minutes on 2 CPU cores with the defaults.

    .venv/bin/python benchmarks/reading_ablation.py [--full-steps 400] [--warmup-steps 600] [--arms ABCD]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from nvila_lab.config import get_config  # noqa: E402
from nvila_lab.data import SyntheticVQA, load_tokenizer  # noqa: E402
from nvila_lab.evaluate import evaluate  # noqa: E402
from nvila_lab.model import NVILAModel  # noqa: E402
from nvila_lab.tower_pretrain import load_pretrained_tower  # noqa: E402
from nvila_lab.train import TrainConfig, train  # noqa: E402

ARMS = {  # key: (description, pretrained tower, one-tile warm-up, LLM layers or None for tiny's)
    "A": ("random tower, no warm-up", False, False, None),
    "B": ("pretrained tower, no warm-up", True, False, None),
    "C": ("pretrained tower + one-tile warm-up", True, True, None),
    "D": ("as C, 2-layer LLM", True, True, 2),
}


def run_arm(key: str, full_steps: int, warmup_steps: int, held_out, tok, lr: float) -> dict:
    what, pretrained, warm, layers = ARMS[key]
    cfg = get_config("tiny", **({"llm_layers": layers} if layers else {}))
    torch.manual_seed(0)
    model = NVILAModel(cfg, tok)
    if pretrained:
        model.encoder.tower.load_state_dict(load_pretrained_tower().state_dict())
    t0, warm_loss = time.perf_counter(), None
    if warm:
        small = SyntheticVQA(["read_code"], n=warmup_steps * 16 + 16, seed=3, size=(64, 64))
        h = train(model, small, TrainConfig(steps=warmup_steps, batch_size=16, lr=lr, tiling="resize", log_every=50),
                  progress=False)
        warm_loss = h.records[-1]["loss"]
    full = SyntheticVQA(["read_code"], n=full_steps * 16 + 16, seed=1)
    h = train(model, full, TrainConfig(steps=full_steps, batch_size=16, lr=lr, log_every=50), progress=False)
    report = evaluate(model, held_out, progress=False)
    out = {"arm": key, "what": what, "llm_layers": cfg.llm_layers, "warmup_steps": warmup_steps if warm else 0,
           "full_page_steps": full_steps, "warmup_final_loss": warm_loss, "final_loss": h.records[-1]["loss"],
           "held_out_accuracy": report.tasks["read_code"].accuracy, "chance": report.tasks["read_code"].chance,
           "seconds": time.perf_counter() - t0}
    print(f"{key} {what:<38} warm-up loss {warm_loss if warm_loss is None else round(warm_loss, 3)!s:>6}  "
          f"final loss {out['final_loss']:.3f}  held-out {out['held_out_accuracy']:.0%}  {out['seconds']:.0f}s",
          flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full-steps", type=int, default=400)
    ap.add_argument("--warmup-steps", type=int, default=600)
    ap.add_argument("--arms", default="ABCD")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--held-out", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    bad = set(a.arms) - set(ARMS)
    if bad:
        ap.error(f"unknown arm(s) {''.join(sorted(bad))}; arms are {''.join(ARMS)}")
    tok = load_tokenizer()
    held_out = SyntheticVQA(["read_code"], n=a.held_out, seed=777)
    rows = [run_arm(k, a.full_steps, a.warmup_steps, held_out, tok, a.lr) for k in a.arms]
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor()
            or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(), "lr": a.lr,
            "batch_size": 16, "held_out": a.held_out}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reading_ablation_cpu.json").write_text(json.dumps({"meta": meta, "arms": rows}, indent=1))
    lines = ["| arm | setting | LLM layers | warm-up steps (64x64, 16 tokens) | full-page steps | held-out read_code | chance |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['what']} | {r['llm_layers']} | {r['warmup_steps']} | {r['full_page_steps']} | "
              f"{r['held_out_accuracy']:.0%} | {r['chance']:.0%} |" for r in rows]
    (out / "reading_ablation_cpu.md").write_text(f"Measured {meta['date']} on {meta['machine']}, torch {meta['torch']}, "
                                                 f"{meta['threads']} threads, lr {a.lr}, batch 16, "
                                                 f"{a.held_out} held-out questions (seed 777).\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
