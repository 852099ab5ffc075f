#!/usr/bin/env python
"""Training-step time of one Qwen2 decoder layer in bf16 and in FP8 (the kit's and torchao's), on one GPU.

For each layer shape (Qwen2-7B's and Qwen2-1.5B's decoder layer: a transformers `Qwen2DecoderLayer` built from
`nvila_lab.model.qwen2_config` of the presets "nvila-8b" and "nvila-lite-2b", SDPA attention, causal, rotary
embeddings from `Qwen2RotaryEmbedding`) and token count (one sequence of 2048, 4096, 8192 tokens), one training
step = forward + backward (a fixed random output gradient) + optimizer step, timed with CUDA events after a
warm-up, median of `--steps`. Weights and activations are bf16; every column's optimizer holds fp32 master
weights (grads copied up, step, weights copied down), as NVILA trains; its learning rate is 0 (the same kernels
run, the weights stay the seeded ones, so every row's SQNR against bf16 compares the same weights). Columns, all in the same run:

  bf16                 the layer as transformers builds it, torch AdamW (fused on CUDA)
  kit-tensorwise       the kit's FP8 linears, `nvila_lab.fp8.linear.convert_to_fp8(recipe="tensorwise")`
  kit-rowwise          the same, recipe "rowwise"
  kit-coat             tensorwise FP8 linears + FP8 activations (`convert_activations_to_fp8`) + `FP8AdamW` states
  torchao-tensorwise   torchao's `convert_to_float8_training` (tensorwise recipe); skipped with a note without torchao

For each row: median ms, its ratio to bf16, peak memory (`torch.cuda.max_memory_allocated`, reset per row) and the
memory held before the step (weights, fp32 masters, optimizer states), the first forward's SQNR against the bf16
layer (same weights, same input) both of the output and of the layer's update (output minus the residual input,
which is exact in every column and so inflates the output's SQNR), and the analytical expectation of
`nvila_lab.fp8.speed` (on the nominal H200 and on the ceilings measured in this run). Also: the copy bandwidth and
an 8192^3 bf16 matmul rate (the practical ceilings), and the single-GEMM ratio bf16 `mm` against
`torch._scaled_mm` (per-tensor scales, second operand column-major) for each projection's shape, with and without
the quantise passes. Results: printed, and saved as JSON to `--out` (default benchmarks/results) as
fp8_step_<gpu>.json, rewritten after every column (`"complete": false` until the end), so a run killed by a time limit
keeps its rows. A column that fails (a kernel rejecting an operand pair, out of memory, a library API change) is
recorded in its rows' notes and the run goes on. On CUDA the kit's FP8 columns convert with `check_finite=False`
(no NaN checks or saturation counts: those sync the device inside the timed step). Meant to take under 6 minutes
on one H200 (`--max-seconds`, default 240, stops adding rows past a budget).

`--cpu-smoke` runs the same code on the CPU with the tiny preset's layer and 32 tokens in seconds: the numerics
path (FP8 on a CPU is emulated), so its times are labelled CPU and are not speed. tests/test_fp8_speed.py runs it.

    python benchmarks/fp8_step.py --out "$OUT"          # on a GPU machine (sm_89+ for the FP8 columns)
    pip install --no-deps wheels/torchao-*.whl          # first, for the torchao column (carry a wheel matching torch)
    python benchmarks/fp8_step.py --compile             # the layer's forward through torch.compile
    python benchmarks/fp8_step.py --cpu-smoke --out /tmp/fp8
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import inspect
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from nvila_lab.fp8 import speed  # noqa: E402  (torch-free: the analytical expectation)

SHAPE_PRESETS = {"qwen2-7b": "nvila-8b", "qwen2-1.5b": "nvila-lite-2b", "tiny": "tiny"}
COLUMNS = ("bf16", "kit-tensorwise", "kit-rowwise", "kit-coat", speed.TORCHAO_COLUMN)
RECIPE_OF = {v: k for k, v in speed.BENCH_COLUMNS.items()}  # column -> speed-model recipe
RECIPE_OF[speed.TORCHAO_COLUMN] = "tensorwise"


def version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def have_torchao() -> tuple[bool, str]:
    "Whether torchao's float8 training imports, and a note if not."
    try:
        from torchao.float8 import convert_to_float8_training  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"torchao not importable ({type(e).__name__}: {str(e)[:120]}): column skipped"
    return True, ""


# ---------------------------------------------------------------- timing
class Timer:
    "Per-call times in ms: CUDA events on a GPU (one sync at the end), perf_counter on the CPU."

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def run(self, fn, n: int) -> list[float]:
        if self.cuda:
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
            for a, b in ev:
                a.record()
                fn()
                b.record()
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in ev]
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out


def ceilings(device: torch.device, timer: Timer) -> dict:
    "Device-to-device copy bandwidth (1 GiB, read + write counted) and an 8192^3 bf16 matmul rate, measured now."
    if device.type != "cuda":
        return {"copy_tbps": None, "bf16_matmul_8192_tflops": None, "note": "CPU smoke run: no ceilings measured"}
    n = 2 ** 30 // 2
    src, dst = torch.empty(n, dtype=torch.bfloat16, device=device).normal_(), torch.empty(n, dtype=torch.bfloat16, device=device)
    timer.run(lambda: dst.copy_(src), 3)
    copy_ms = statistics.median(timer.run(lambda: dst.copy_(src), 20))
    del src, dst
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    timer.run(lambda: a @ b, 3)
    mm_ms = statistics.median(timer.run(lambda: a @ b, 20))
    del a, b
    torch.cuda.empty_cache()
    return {"copy_tbps": 2 * 2 ** 30 / (copy_ms * 1e-3) / 1e12, "bf16_matmul_8192_tflops": 2 * 8192 ** 3 / (mm_ms * 1e-3) / 1e12}


# ---------------------------------------------------------------- the layer and its columns
def build_layer(shape: str, device: torch.device, seed: int = 0):
    "A bf16 transformers Qwen2DecoderLayer of `shape` (SDPA attention) and its rotary embedding, seeded."
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    from nvila_lab.config import get_config
    c = get_config(SHAPE_PRESETS[shape])
    try:
        from nvila_lab.model import qwen2_config
        qc = qwen2_config(c)
    except ImportError:  # a GPU image without one of the model module's other imports: the same config by hand
        from transformers import Qwen2Config
        qc = Qwen2Config(hidden_size=c.llm_hidden, intermediate_size=c.llm_intermediate, num_hidden_layers=c.llm_layers,
                         num_attention_heads=c.llm_heads, num_key_value_heads=c.llm_kv_heads, vocab_size=c.vocab_size,
                         rope_theta=c.rope_theta, max_position_embeddings=c.max_length)
    qc._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        layer = Qwen2DecoderLayer(qc, layer_idx=0).to(torch.bfloat16)
        rope = Qwen2RotaryEmbedding(qc)
    return layer, rope


class MasterWeights:
    "fp32 master copies of bf16 parameters for an inner optimizer: grads copied up, step, weights copied down."

    def __init__(self, params, make_opt):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt = make_opt(self.master)

    def step(self) -> None:
        for m, p in zip(self.master, self.params):
            m.grad = p.grad.float() if p.grad is not None else None
        self.opt.step()
        with torch.no_grad():
            for m, p in zip(self.master, self.params):
                p.copy_(m)

    def zero_grad(self) -> None:
        for t in (*self.params, *self.master):
            t.grad = None


def _all_linears(name: str, module: nn.Module) -> bool:
    "Every nn.Linear of the bare layer (the kit's default filter looks for an LLM's qualified names)."
    return isinstance(module, nn.Linear)


def make_column(column: str, layer: nn.Module, device: torch.device) -> tuple[MasterWeights, str]:
    "Convert `layer` in place for `column` and build its optimizer; returns (optimizer, note). Raises ImportError."
    note = ""
    # lr 0: every kernel of the step runs as usual, but the weights stay the seeded ones, so each row's SQNR
    # against the bf16 layer compares the same weights
    adamw = (lambda ps: torch.optim.AdamW(ps, lr=0.0, fused=True)) if device.type == "cuda" else \
        (lambda ps: torch.optim.AdamW(ps, lr=0.0, foreach=True))
    if column.startswith("kit-"):
        from nvila_lab.fp8.linear import convert_to_fp8
        recipe = "rowwise" if column == "kit-rowwise" else "tensorwise"
        fast = {"check_finite": False} if device.type == "cuda" and \
            "check_finite" in inspect.signature(convert_to_fp8).parameters else {}  # no NaN checks, no syncs
        names = convert_to_fp8(layer, recipe=recipe, filter_fn=_all_linears, **fast)
        note = f"{len(names)} linears FP8 ({recipe}{', check_finite=False' if fast else ''})"
        if column == "kit-coat":
            from nvila_lab.fp8.activations import convert_activations_to_fp8
            from nvila_lab.fp8.optim import FP8AdamW
            acts = convert_activations_to_fp8(layer, group=16)
            note += f"; {len(acts)} activation module(s) FP8 (group 16): {', '.join(acts) or 'none matched'}; FP8AdamW"
            return MasterWeights(layer.parameters(), lambda ps: FP8AdamW(ps, lr=0.0, check_finite=False)), note
    elif column == speed.TORCHAO_COLUMN:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        cfg = Float8LinearConfig.from_recipe_name("tensorwise")
        if device.type != "cuda":
            import dataclasses
            cfg = dataclasses.replace(cfg, emulate=True)  # no FP8 GEMM on a CPU: torchao's emulation
        convert_to_float8_training(layer, config=cfg, module_filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
        note = "torchao float8, tensorwise" + (" (emulate=True)" if device.type != "cuda" else "")
    return MasterWeights(layer.parameters(), adamw), note


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.float(), x.float()
    err = (ref - x).norm()
    return float("inf") if err == 0 else float(20 * torch.log10(ref.norm() / err))


def time_column(shape: str, column: str, tokens: list[int], device: torch.device, timer: Timer, args, refs: dict,
                deadline: float) -> list[dict]:
    "Rows of one column on one shape: build, convert, then for each token count warm up and time the step."
    rows = []
    try:
        layer, rope = build_layer(shape, device)
        opt, note = make_column(column, layer, device)
    except ImportError as e:
        return [dict(shape=shape, tokens=t, column=column, ms=None, note=f"skipped: {e}") for t in tokens]
    except Exception as e:  # a broken conversion (or a transformers/torchao API change) costs one column, not the run
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return [dict(shape=shape, tokens=t, column=column, ms=None,
                     note=f"failed to build: {type(e).__name__}: {str(e)[:300]}") for t in tokens]
    if args.compile:
        # every column compiles Qwen2DecoderLayer.forward afresh: without a reset, the recompiles of earlier columns
        # fill dynamo's cache limit and later columns silently run eagerly
        torch._dynamo.reset()
        note += ("; " if note else "") + "forward via torch.compile"
    fwd = torch.compile(layer) if args.compile else layer
    for T in tokens:
        row = dict(shape=shape, tokens=T, column=column, ms=None, note=note)
        rows.append(row)
        if time.monotonic() > deadline:
            row["note"] = f"skipped: past --max-seconds {args.max_seconds}"
            continue
        g = torch.Generator(device=device).manual_seed(T)
        h = layer.hidden_size
        x = torch.randn(1, T, h, device=device, dtype=torch.bfloat16, generator=g).requires_grad_(True)
        dy = torch.randn(1, T, h, device=device, dtype=torch.bfloat16, generator=g)
        with torch.no_grad():
            pe = rope(x, torch.arange(T, device=device)[None])

        def forward():
            out = fwd(x, position_embeddings=pe)
            return out[0] if isinstance(out, tuple) else out  # transformers 4.x returned a tuple

        def step():
            forward().backward(dy)
            opt.step()
            opt.zero_grad()
            x.grad = None

        try:
            with torch.no_grad():  # numerics before any step: same weights and input as the bf16 column
                y = forward().float()
                # the layer's output is x + its update; the residual x is exact in every column, so the output's SQNR
                # overstates the FP8 error (by ~15 dB on the tiny layer): the update's SQNR is the honest one
                y = (y.cpu(), (y - x.float()).cpu())  # kept off the GPU so later columns' peak memory does not see it
            key = (shape, T)
            if column == "bf16":
                refs[key] = y
            elif key in refs:
                row["sqnr_vs_bf16_db"] = round(sqnr_db(refs[key][0], y[0]), 2)
                row["sqnr_update_vs_bf16_db"] = round(sqnr_db(refs[key][1], y[1]), 2)
            row["output_finite"] = bool(torch.isfinite(y[0]).all())
            del y
            if device.type == "cuda":
                torch.cuda.synchronize()
                row["mem_before_step_gib"] = torch.cuda.memory_allocated() / 2 ** 30  # weights, masters, states
                torch.cuda.reset_peak_memory_stats()
            timer.run(step, args.warmup)
            ms = timer.run(step, args.steps)
            row.update(ms=statistics.median(ms), ms_all=[round(v, 4) for v in ms])
            if device.type == "cuda":
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        except torch.cuda.OutOfMemoryError:
            row["note"] = (note + "; " if note else "") + "out of memory"
        except Exception as e:  # one column's failure must not lose the others' numbers
            row["note"] = (note + "; " if note else "") + f"failed: {type(e).__name__}: {str(e)[:300]}"
        finally:
            opt.zero_grad()  # a step that failed half-way leaves gradients behind: the next row must not carry them
            x.grad = None
            del x, dy, pe
            if device.type == "cuda" and row["ms"] is None:
                torch.cuda.empty_cache()
    del layer, rope, opt, fwd
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- single GEMMs
def gemm_rows(shape: str, m: int, device: torch.device, timer: Timer, args, deadline: float = math.inf) -> list[dict]:
    """bf16 x @ W^T against torch._scaled_mm on E4M3 operands (per-tensor inverse scales, W^T column-major), for each
    distinct (K, N) of the layer's projections at M = `m` tokens; also FP8 including the amax and cast of both."""
    from nvila_lab.fp8.formats import E4M3
    rows, seen = [], set()
    for proj, (k, n) in speed.layer_shape(shape).linears.items():
        if (k, n) in seen:
            continue
        seen.add((k, n))
        row = dict(shape=shape, proj=proj, m=m, k=k, n=n)
        rows.append(row)
        if any(v % 16 for v in (m, k, n)):
            row["note"] = "skipped: _scaled_mm needs M, K, N multiples of 16"
            continue
        if time.monotonic() > deadline:
            row["note"] = f"skipped: past --max-seconds {args.max_seconds}"
            continue

        def quant(t):  # per-tensor E4M3: q = fp8(t * s), _scaled_mm takes 1/s
            s = E4M3.max / t.abs().amax().float().clamp_min(1e-12)
            return (t.float() * s).clamp(-E4M3.max, E4M3.max).to(torch.float8_e4m3fn), s.reciprocal()

        x = w = x8 = w8 = wt8 = None
        try:
            g = torch.Generator(device=device).manual_seed(1)
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=g)
            w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=g) * 0.02
            x8, sx = quant(x)
            w8, sw = quant(w)
            wt8 = w8.t()  # [K, N], column-major: what _scaled_mm wants as its second operand
            bf = lambda: x @ w.t()  # noqa: E731
            f8 = lambda: torch._scaled_mm(x8, wt8, sx, sw, out_dtype=torch.bfloat16)  # noqa: E731

            def f8_cast():
                a, sa = quant(x)
                b, sb = quant(w)
                return torch._scaled_mm(a, b.t(), sa, sb, out_dtype=torch.bfloat16)

            row["sqnr_fp8_vs_bf16_db"] = round(sqnr_db(bf(), f8()), 2)
            for name, fn in (("bf16_ms", bf), ("fp8_ms", f8), ("fp8_with_cast_ms", f8_cast)):
                timer.run(fn, args.warmup)
                row[name] = statistics.median(timer.run(fn, args.steps if args.cpu_smoke else max(args.steps, 5)))
            row["ratio"] = row["bf16_ms"] / row["fp8_ms"]
            row["ratio_with_cast"] = row["bf16_ms"] / row["fp8_with_cast_ms"]
            row["expected_ratio_h200"] = speed.gemm_speedup(m, k, n, "h200")
        except Exception as e:
            row["note"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        del x, w, x8, w8, wt8
    return rows


# ---------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny layer on the CPU in seconds (numerics path; not speed)")
    ap.add_argument("--shapes", default=None, help="comma list of qwen2-7b, qwen2-1.5b (default both; smoke: tiny)")
    ap.add_argument("--tokens", default=None, help="comma list of token counts (default 2048,4096,8192; smoke: 32)")
    ap.add_argument("--columns", default=",".join(COLUMNS), help=f"comma list of {', '.join(COLUMNS)}")
    ap.add_argument("--steps", type=int, default=None, help="timed steps a row (default 10; smoke: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps a row (default 3; smoke: 1)")
    ap.add_argument("--compile", action="store_true", help="run the layer's forward through torch.compile")
    ap.add_argument("--max-seconds", type=float, default=240,
                    help="stop adding rows after this many seconds (default 240: the row in flight, the start-up "
                         "and the imports come on top, and all of it must fit in 6 minutes)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for the JSON (default: $OUT when that is a folder, as on the device machine, "
                         "else benchmarks/results); it is rewritten after every column, so a killed run keeps its rows")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    if args.out is None:
        env_out = os.environ.get("OUT")
        args.out = Path(env_out) if env_out and Path(env_out).is_dir() else ROOT / "benchmarks" / "results"
    smoke = args.cpu_smoke
    shapes = (args.shapes or ("tiny" if smoke else "qwen2-7b,qwen2-1.5b")).split(",")
    tokens = [int(t) for t in (args.tokens or ("32" if smoke else "2048,4096,8192")).split(",")]
    columns = args.columns.split(",")
    args.steps = args.steps or (2 if smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    for s in shapes:
        if s not in SHAPE_PRESETS:
            sys.exit(f"unknown shape {s!r}: pick from {', '.join(SHAPE_PRESETS)}")
    for c in columns:
        if c not in COLUMNS:
            sys.exit(f"unknown column {c!r}: pick from {', '.join(COLUMNS)}")
    if smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("no CUDA GPU here: run with --cpu-smoke for the numerics path (times are then not speed)")

    notes = []
    ao_ok, ao_note = have_torchao()
    if not ao_ok and speed.TORCHAO_COLUMN in columns:
        columns.remove(speed.TORCHAO_COLUMN)
        notes.append(ao_note)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability()
        dev_info = {"name": torch.cuda.get_device_name(), "capability": list(cap),
                    "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2 ** 30}
        if cap < (8, 9):
            notes.append(f"sm_{cap[0]}{cap[1]} has no FP8 Tensor Cores: FP8 columns skipped")
            columns = [c for c in columns if c == "bf16"]
    else:
        dev_info = {"name": f"CPU ({platform.processor() or platform.machine()})", "capability": None}
        notes.append("CPU smoke run: FP8 is emulated on a CPU; the times below are CPU times, NOT speed")
    timer = Timer(device)
    try:
        ceil = ceilings(device, timer)
    except Exception as e:  # the ceilings only calibrate the expectation: their failure must not cost the run
        ceil = {"copy_tbps": None, "bf16_matmul_8192_tflops": None, "note": f"failed: {type(e).__name__}: {str(e)[:300]}"}
        notes.append(f"ceilings not measured ({type(e).__name__})")
    print(f"device: {dev_info['name']}; torch {torch.__version__}, transformers {version('transformers')}, "
          f"torchao {version('torchao') or 'not installed'}")
    if ceil.get("copy_tbps"):
        print(f"ceilings: copy {ceil['copy_tbps']:.2f} TB/s, bf16 matmul 8192^3 {ceil['bf16_matmul_8192_tflops']:.0f} TFLOP/s")
    model_dev = speed.device_from_ceilings(dev_info["name"], ceil["bf16_matmul_8192_tflops"], ceil["copy_tbps"]) \
        if ceil.get("copy_tbps") else None
    deadline = t_start + args.max_seconds

    steps, gemms, refs = [], [], {}
    slug = "cpu_smoke" if smoke else re.sub(r"[^a-z0-9]+", "_", dev_info["name"].lower()).strip("_")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fp8_step_{slug}.json"

    def save(complete: bool) -> dict:
        "Add the ratios and expectations to the rows so far and (re)write the JSON: after every column and at the end."
        base = {(r["shape"], r["tokens"]): r["ms"] for r in steps if r["column"] == "bf16" and r["ms"]}
        for r in steps:
            b = base.get((r["shape"], r["tokens"]))
            r["speedup_vs_bf16"] = b / r["ms"] if b and r["ms"] else None
            recipe = RECIPE_OF.get(r["column"])
            if recipe:  # the smoke run's "tiny" shape too: it exercises the same path
                r["expected_speedup_h200"] = round(speed.expected_step_speedup(r["shape"], r["tokens"], "h200", recipe),
                                                   4) if recipe != "bf16" else 1.0
                if model_dev is not None:
                    r["expected_speedup_measured_ceilings"] = round(
                        speed.expected_step_speedup(r["shape"], r["tokens"], model_dev, recipe), 4) \
                        if recipe != "bf16" else 1.0
        result = {
            "benchmark": "fp8_step: one Qwen2 decoder-layer training step (forward + backward + AdamW), bf16 vs FP8",
            "mode": "cpu-smoke" if smoke else "gpu",
            "complete": complete,  # False: the run was cut short (killed, or still going when this was written)
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/fp8_step.py", *(argv if argv is not None else sys.argv[1:])]),
            "device": dev_info, "ceilings": ceil,
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                         "transformers": version("transformers"), "torchao": version("torchao"),
                         "nvila_lab": version("nvila-lab")},
            "settings": {"steps": args.steps, "warmup": args.warmup, "compile": args.compile, "batch": 1,
                         "max_seconds": args.max_seconds,
                         "weights": "bf16, fp32 master weights in the optimizer (lr 0)", "attention": "sdpa, causal",
                         "fp8_checks": "check_finite=False on CUDA (no NaN checks or saturation counts, no syncs)"},
            "time_unit": "ms (CPU times: not speed)" if smoke else "ms (CUDA events, median)",
            "notes": notes, "steps": steps, "gemms": gemms,
            "wall_seconds": round(time.monotonic() - t_start, 1),
        }
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        return result

    for shape in shapes:
        for column in (["bf16"] + [c for c in columns if c != "bf16"]) if "bf16" in columns else columns:
            steps += time_column(shape, column, tokens, device, timer, args, refs, deadline)
            save(False)
        refs.clear()
        gemms += gemm_rows(shape, max(tokens), device, timer, args, deadline)
        save(False)
    result = save(True)

    unit = "ms (CPU, not speed)" if smoke else "ms"
    print(f"\n{'shape':11s} {'tokens':>6s} {'column':20s} {unit:>20s} {'vs bf16':>8s} {'expected':>8s} {'peak GiB':>8s} {'SQNR dB':>7s} {'upd dB':>6s}  note")
    for r in steps:
        ms = f"{r['ms']:.3f}" if r["ms"] else "-"
        sp = f"{r['speedup_vs_bf16']:.3f}x" if r.get("speedup_vs_bf16") else "-"
        ex = f"{r['expected_speedup_h200']:.2f}x" if r.get("expected_speedup_h200") else "-"
        pk = f"{r['peak_mem_gib']:.2f}" if r.get("peak_mem_gib") else "-"
        sq = f"{r['sqnr_vs_bf16_db']:.1f}" if r.get("sqnr_vs_bf16_db") is not None else "-"
        su = f"{r['sqnr_update_vs_bf16_db']:.1f}" if r.get("sqnr_update_vs_bf16_db") is not None else "-"
        print(f"{r['shape']:11s} {r['tokens']:6d} {r['column']:20s} {ms:>20s} {sp:>8s} {ex:>8s} {pk:>8s} {sq:>7s} "
              f"{su:>6s}  {r.get('note', '')}")
    print(f"\n{'shape':11s} {'proj':10s} {'M,K,N':>18s} {'bf16 ms':>9s} {'fp8 ms':>9s} {'ratio':>6s} {'w/ cast':>7s} {'expected':>8s}")
    for r in gemms:
        if "ratio" in r:
            print(f"{r['shape']:11s} {r['proj']:10s} {r['m']:>6d},{r['k']:>5d},{r['n']:>5d} {r['bf16_ms']:9.4f} "
                  f"{r['fp8_ms']:9.4f} {r['ratio']:6.2f} {r['ratio_with_cast']:7.2f} {r['expected_ratio_h200']:8.2f}")
        else:
            print(f"{r['shape']:11s} {r['proj']:10s} {r.get('note', '')}")
    for n in notes:
        print("note:", n)
    print("note: SQNR dB is the layer output's (x + update; the exact residual x inflates it), upd dB the update's")

    print(f"saved {path} ({result['wall_seconds']} s)")
    return result


if __name__ == "__main__":
    main()
