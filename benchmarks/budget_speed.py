#!/usr/bin/env python
"""How long `nvila-lab budget 1920x1080` takes against `python -c "import torch"`, on this machine's CPU.

The token budget is arithmetic (tiling, config and the built-in compressors' closed forms, notebook 06), so the
command should not pay for importing PyTorch. Goal (issue 11): the budget command at most 0.5x the time of
importing torch, median of 10 runs each. Both are timed as fresh processes, wall clock, from start to exit, one
warm-up run each first (so the file cache is warm for both), the two commands interleaved run by run so that
machine noise hits both alike.

Each budget run also checks its JSON (`--json`): 3072 visual tokens for NVILA-8B at 1920x1080 and a positive
projector FLOP count, so a fast but broken command does not pass.

Results go to benchmarks/results/budget_speed_cpu.json (`--out` changes the folder) with the machine's details.

    .venv/bin/python benchmarks/budget_speed.py [--runs 10] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"


def timed(cmd: list[str]) -> tuple[float, str]:
    "Wall seconds of one fresh process running `cmd`, and its stdout; a failure stops the benchmark with its stderr."
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    dt_s = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (status {r.returncode}):\n{r.stderr.strip()}")
    return dt_s, r.stdout


def check_budget_output(out: str) -> None:
    "The budget's JSON must hold NVILA-8B's numbers for 1920x1080 (3072 visual tokens) and its projector FLOPs."
    data = json.loads(out)
    b = data[0] if isinstance(data, list) and data else data  # a list of budgets (one per size), or one
    if not isinstance(b, dict) or b.get("visual_tokens") != 3072 or not b.get("projector_flops", 0) > 0:
        sys.exit(f"unexpected budget output (want 3072 visual tokens and projector FLOPs > 0): {out[:500]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="timed runs of each command (default 10)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for budget_speed_cpu.json")
    args = ap.parse_args()
    if args.runs < 1:
        sys.exit("--runs must be at least 1")
    cli = VENV_BIN / "nvila-lab"
    python = VENV_BIN / "python"
    for exe in (cli, python):
        if not exe.exists():
            sys.exit(f"{exe} not found: run `make setup` first (the benchmark times the .venv's console script)")
    budget_cmd = [str(cli), "budget", "1920x1080", "--json"]
    torch_cmd = [str(python), "-c", "import torch"]

    _, out = timed(budget_cmd)  # warm-up runs (file cache), and the output check
    check_budget_output(out)
    timed(torch_cmd)
    budget_s, torch_s = [], []
    for _ in range(args.runs):
        budget_s.append(timed(budget_cmd)[0])
        torch_s.append(timed(torch_cmd)[0])
    mb, mt = statistics.median(budget_s), statistics.median(torch_s)
    ratio = mb / mt

    # does the command import torch at all? (a direct check, beside the timing)
    probe = subprocess.run([str(python), "-X", "importtime", "-c",
                            "import sys; sys.argv = ['nvila-lab', 'budget', '1920x1080', '--json']\n"
                            "from nvila_lab.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass"],
                           capture_output=True, text=True, cwd=ROOT)
    imports_torch = any(line.rsplit("|", 1)[-1].strip() == "torch" for line in probe.stderr.splitlines())

    print(f"nvila-lab budget 1920x1080: median {mb:.3f} s over {args.runs} runs (min {min(budget_s):.3f}, max {max(budget_s):.3f})")
    print(f"python -c 'import torch':   median {mt:.3f} s over {args.runs} runs (min {min(torch_s):.3f}, max {max(torch_s):.3f})")
    print(f"ratio budget / import torch: {ratio:.3f} (goal <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'}); "
          f"the command imports torch: {imports_torch}")

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    result = {
        "benchmark": "nvila-lab budget 1920x1080 vs python -c 'import torch'",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "runs": args.runs,
        "budget_command": " ".join(["nvila-lab", *budget_cmd[1:]]),
        "budget_seconds": budget_s, "import_torch_seconds": torch_s,
        "budget_median_s": mb, "import_torch_median_s": mt, "ratio": ratio, "goal_ratio": 0.5, "goal_met": ratio <= 0.5,
        "budget_imports_torch": imports_torch,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": version("torch"), "nvila_lab": version("nvila-lab"),
                    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "budget_speed_cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
