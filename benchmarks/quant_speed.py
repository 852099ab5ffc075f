#!/usr/bin/env python
"""Batch-1 decode of Qwen2-shaped LLMs in bf16 against W4A16, and a SigLIP tower in bf16 against W8A8 (INT8, FP8).

GPU mode (CUDA available; meant to take under 6 minutes on one H200, `--max-seconds` guards it):

* the practical ceiling: a device-to-device copy of a 1 GiB bf16 tensor (read + write counted, TB/s);
* decode: Qwen2-7B-shaped (hidden 3584, intermediate 18944, 28 layers, 28 heads / 4 kv heads, vocab 152064) and
  Qwen2-1.5B-shaped (hidden 1536, intermediate 8960, 28 layers, 12 / 2 heads, vocab 151936) transformers
  `Qwen2ForCausalLM`s with random weights, bf16 against W4A16 (round-to-nearest, group 128, every decoder-layer
  linear; lm_head and embeddings bf16) with the `"triton"` fused dequantise-GEMV kernel of
  `nvila_lab.quant.kernels` and, on the same weights, `"tinygemm"` (PyTorch's CUDA int4 GEMM, the kernel torchao's
  int4 weight-only path runs; `--kernels` changes the list). Greedy decode with a static KV cache, one CUDA graph a step
  (`nvila_lab.quant.kernels.decode_speed`); tokens/s, the ratio to bf16 in the same run, the effective bandwidth
  (weight bytes a step / step time) and its fraction of the copy bandwidth; and a numerics check (the W4A16
  model's prompt logits under "triton" against "reference": cosine, relative error);
* the vision tower: transformers `SiglipVisionModel` (So400m: hidden 1152, intermediate 4304, 27 layers, 16 heads,
  384 px, patch 14 -> 729 tokens a tile) on 16 tiles, bf16 against `W8A8Linear` INT8 and FP8 in every encoder
  linear (`nvila_lab.quant.integer.replace_linears`); forward time, ratios, output cosine against bf16;
* goals with pass / fail: 7B decode >= 2.5x, 1.5B decode >= 1.6x (the better kernel, named in `best_kernel`),
  tower >= 1.3x (the better of INT8 and FP8).

CPU mode (no CUDA, or `--device cpu`): the same code on smaller shapes (a ~0.3B-shaped LLM: hidden 1024, 24 layers,
vocab 32000; a reduced tower of 4 layers, 2 tiles of 224 px) with the `"cpu"` kernel (PyTorch's int4 CPU GEMM), in
under 3 minutes on 2 cores; `--quick` is a < 60 s version (tests run it). CPU figures say nothing about GPU speed: the
JSON has `"gpu": "unmeasured"` until a GPU run writes quant_speed_gpu.json. On the CPU, torch uses `--threads`
threads (default 1: on a shared 2-core machine a second thread turns OpenMP barriers into ~8 ms stalls).

Results: printed, and written as JSON to `--out` (a .json file, or a folder: quant_speed_{cpu|gpu}.json in it;
default benchmarks/results), rewritten after every section (`"complete": false` until the end).

    python benchmarks/quant_speed.py --out "$OUT"       # on a GPU machine (needs triton, which CUDA torch brings)
    .venv/bin/python benchmarks/quant_speed.py           # CPU mode, writes benchmarks/results/quant_speed_cpu.json
    .venv/bin/python benchmarks/quant_speed.py --quick --out /tmp/q.json
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nvila_lab.quant.integer import W8A8Linear, quantized_bytes, replace_linears  # noqa: E402
from nvila_lab.quant.kernels import decode_speed, quantize_llm_w4a16, set_int4_kernel, time_ms  # noqa: E402

GOALS = {"qwen2-7b": 2.5, "qwen2-1.5b": 1.6, "tower": 1.3}  # GPU goals: decode W4A16 / bf16, tower W8A8 / bf16
LLM_SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "qwen2-7b": (3584, 18944, 28, 28, 4, 152064),
    "qwen2-1.5b": (1536, 8960, 28, 12, 2, 151936),
    "cpu-0.3b": (1024, 2816, 24, 16, 4, 32000),
    "cpu-quick": (512, 1408, 4, 8, 2, 8000),
}
TOWER_SHAPES = {  # hidden, intermediate, layers, heads, image, patch, tiles
    "siglip-so400m": (1152, 4304, 27, 16, 384, 14, 16),
    "cpu-tower": (384, 1536, 4, 6, 224, 16, 2),
    "cpu-tower-quick": (192, 768, 2, 3, 224, 16, 1),
}


def version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def machine(device: torch.device) -> dict:
    "What the figures depend on: the device's name, library versions, threads, the load, the date."
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {"device": device.type, "device_name": name, "torch": torch.__version__,
            "transformers": version("transformers"), "triton": version("triton"), "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def copy_bandwidth(device: torch.device, nbytes: int) -> dict:
    "A large tensor copy, read + write counted: the practical bandwidth ceiling (TB/s on a GPU, GB/s reported too)."
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, repeats=10, device=device)
    del src, dst
    gbps = 2 * nbytes / (ms * 1e-3) / 1e9
    return {"bytes": nbytes, "ms": ms, "gbps": gbps, "tbps": gbps / 1e3}


def build_llm(shape: str, device: torch.device, seed: int = 0):
    "A bf16 `Qwen2ForCausalLM` of `shape` with transformers' random init (lm_head untied), in eval mode."
    from transformers import Qwen2Config, Qwen2ForCausalLM
    h, i, nl, nh, kv, vocab = LLM_SHAPES[shape]
    qc = Qwen2Config(hidden_size=h, intermediate_size=i, num_hidden_layers=nl, num_attention_heads=nh,
                     num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False)
    qc._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built directly in bf16: no fp32 copy of a 7B model
    try:
        with torch.device(device):
            llm = Qwen2ForCausalLM(qc)
    finally:
        torch.set_default_dtype(old)
    return llm.to(torch.bfloat16).eval()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def llm_rows(shape: str, device: torch.device, kernels: list[str], args, bw: dict | None) -> dict:
    """bf16 against W4A16 decode of one LLM shape, one W4A16 row per kernel (the same quantised weights), and each
    kernel's prompt logits against the reference kernel's."""
    t0 = time.monotonic()
    llm = build_llm(shape, device)
    out: dict = {"shape": shape, "dims": dict(zip(("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"),
                                                  LLM_SHAPES[shape])),
                 "params": sum(p.numel() for p in llm.parameters()), "kernels": kernels, "group_size": 128,
                 "new_tokens": args.new_tokens, "prompt_len": args.prompt_len}
    bf = decode_speed(llm, args.new_tokens, args.prompt_len, repeats=args.repeats)
    out["bf16"] = bf.to_dict()
    if bw:
        out["bf16"]["fraction_of_copy_bandwidth"] = bf.effective_gbps / bw["gbps"]
    quantize_llm_w4a16(llm, 128, kernels[0])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ids = torch.randint(0, llm.config.vocab_size, (1, args.prompt_len), device=device)
    with torch.no_grad():
        set_int4_kernel(llm, "reference")
        y_ref = llm(input_ids=ids, use_cache=False).logits  # [1, P, V]
    out["w4a16"] = {}
    for kernel in kernels:
        row: dict = {}
        out["w4a16"][kernel] = row
        try:
            set_int4_kernel(llm, kernel)
            with torch.no_grad():
                y = llm(input_ids=ids, use_cache=False).logits
            row["logits_vs_reference_kernel"] = {"cosine": cosine(y, y_ref), "rel_err": rel_err(y, y_ref)}
            del y
            q = decode_speed(llm, args.new_tokens, args.prompt_len, repeats=args.repeats)
            row.update(q.to_dict())
            row["speedup"] = bf.ms_per_token / q.ms_per_token
            row["bytes_ratio"] = bf.weight_bytes / q.weight_bytes  # the bandwidth-bound ceiling of the speed-up
            row["tokens_agree_with_bf16"] = sum(a == b for a, b in zip(bf.tokens, q.tokens)) / len(bf.tokens)
            if bw:
                row["fraction_of_copy_bandwidth"] = q.effective_gbps / bw["gbps"]
        except Exception as e:  # a kernel that fails (no triton, a shape it refuses) costs its row, not the shape
            row["note"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    done = {k: r["speedup"] for k, r in out["w4a16"].items() if "speedup" in r}
    out["best_kernel"] = max(done, key=done.get) if done else None
    out["speedup"] = done[out["best_kernel"]] if done else None
    goal = GOALS.get(shape)
    out["goal"] = goal
    out["pass"] = None if goal is None or not done else bool(out["speedup"] >= goal)
    out["seconds"] = time.monotonic() - t0
    del llm, y_ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def build_tower(shape: str, device: torch.device, seed: int = 0):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    h, i, nl, nh, img, patch, tiles = TOWER_SHAPES[shape]
    vc = SiglipVisionConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=nl, num_attention_heads=nh,
                            image_size=img, patch_size=patch)
    vc._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        tower = SiglipVisionModel(vc)
    return tower.to(torch.bfloat16).eval(), tiles, img


def tower_rows(shape: str, device: torch.device, args) -> dict:
    "Forward time of the tower on its tiles: bf16, then W8A8 INT8 and FP8 in every encoder linear."
    t0 = time.monotonic()
    tower, tiles, img = build_tower(shape, device)
    h, i, nl, nh, _, patch, _ = TOWER_SHAPES[shape]
    x = torch.randn(tiles, 3, img, img, device=device, dtype=torch.bfloat16)  # [tiles, 3, H, W]
    out: dict = {"shape": shape, "dims": {"hidden": h, "intermediate": i, "layers": nl, "heads": nh, "image": img,
                                          "patch": patch, "tokens_per_tile": (img // patch) ** 2, "tiles": tiles}}

    def fwd(model):
        with torch.no_grad():
            return model(pixel_values=x).last_hidden_state

    y_bf = fwd(tower)
    out["bf16"] = {"ms": time_ms(lambda: fwd(tower), args.tower_warmup, args.tower_repeats, device),
                   "bytes": quantized_bytes(tower)}
    for mode in ("int8", "fp8"):
        q = copy.deepcopy(tower)
        try:
            enc = getattr(q, "vision_model", q).encoder  # transformers 4.x wraps the tower in .vision_model
            names = replace_linears(enc, lambda n, lin: W8A8Linear.from_float(lin, mode))
            y = fwd(q)
            out[mode] = {"ms": time_ms(lambda: fwd(q), args.tower_warmup, args.tower_repeats, device),
                         "linears": len(names), "bytes": quantized_bytes(q), "cosine_vs_bf16": cosine(y, y_bf)}
            out[mode]["speedup"] = out["bf16"]["ms"] / out[mode]["ms"]
        except Exception as e:  # a kernel refusing a shape or dtype costs one column, not the run
            out[mode] = {"ms": None, "note": f"failed: {type(e).__name__}: {str(e)[:300]}"}
        del q
        if device.type == "cuda":
            torch.cuda.empty_cache()
    best = max((out[m].get("speedup") or 0.0) for m in ("int8", "fp8"))
    out["best_speedup"] = best
    out["goal"] = GOALS["tower"] if shape == "siglip-so400m" else None
    out["pass"] = None if out["goal"] is None else bool(best >= out["goal"])
    out["seconds"] = time.monotonic() - t0
    del tower
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quick", action="store_true", help="the smallest shapes, < 60 s on a CPU")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="a .json file or a folder")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU mode)")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--kernels", default=None, help="comma-separated int4 kernels (default: triton,tinygemm on CUDA, cpu)")
    p.add_argument("--max-seconds", type=float, default=300, help="stop adding sections past this budget")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(args.threads)
    if args.new_tokens is None:
        args.new_tokens = 64 if cuda else (8 if args.quick else 32)
    if args.repeats is None:
        args.repeats = 3 if cuda else (1 if args.quick else 3)
    args.tower_warmup, args.tower_repeats = (3, 10) if cuda else (1, 2 if args.quick else 3)
    if cuda:
        llms, tower, kernels, copy_bytes = ["qwen2-7b", "qwen2-1.5b"], "siglip-so400m", ["triton", "tinygemm"], 2 ** 30
    elif args.quick:
        llms, tower, kernels, copy_bytes = ["cpu-quick"], "cpu-tower-quick", ["cpu"], 2 ** 24
    else:
        llms, tower, kernels, copy_bytes = ["cpu-0.3b"], "cpu-tower", ["cpu"], 2 ** 27
    if args.kernels:
        kernels = args.kernels.split(",")
    out_path = Path(args.out)
    if out_path.suffix != ".json":
        out_path = out_path / f"quant_speed_{'gpu' if cuda else 'cpu'}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {"benchmark": "quant_speed", "complete": False, "mode": "gpu" if cuda else ("cpu-quick" if args.quick else "cpu"),
                 "machine": machine(device), "settings": {k: v for k, v in vars(args).items() if k != "out"},
                 "goals": GOALS, "llm": [], "tower": None}
    if not cuda:
        res["gpu"] = "unmeasured"
        res["note"] = ("CPU run: the int4 'cpu' kernel (aten._weight_int4pack_mm_for_cpu) on reduced shapes; goals are "
                       "GPU goals and are not judged here. GPU figures: run this script on a CUDA machine.")

    def save():
        out_path.write_text(json.dumps(res, indent=1, default=str) + "\n")

    start = time.monotonic()
    res["copy_bandwidth"] = bw = copy_bandwidth(device, copy_bytes)
    print(f"{res['machine']['device_name']} | torch {torch.__version__} | copy {bw['gbps']:.1f} GB/s")
    save()
    for shape in llms:
        if time.monotonic() - start > args.max_seconds:
            res["llm"].append({"shape": shape, "note": f"skipped: past --max-seconds {args.max_seconds}"})
            continue
        try:
            r = llm_rows(shape, device, kernels, args, bw)
        except Exception as e:  # one shape's failure (out of memory, a missing triton) must not lose the others
            r = {"shape": shape, "note": f"failed: {type(e).__name__}: {str(e)[:300]}"}
            if cuda:
                torch.cuda.empty_cache()
        res["llm"].append(r)
        if "bf16" in r:
            print(f"decode {shape}: bf16 {r['bf16']['tokens_per_s']:.1f} tok/s ({r['bf16']['effective_gbps']:.0f} GB/s, "
                  f"{r['bf16']['mode']})")
            for k, w in r["w4a16"].items():
                if "speedup" in w:
                    print(f"  W4A16 {k}: {w['tokens_per_s']:.1f} tok/s ({w['effective_gbps']:.0f} GB/s, {w['mode']}): "
                          f"{w['speedup']:.2f}x (bytes {w['bytes_ratio']:.2f}x) | logits vs reference kernel cos "
                          f"{w['logits_vs_reference_kernel']['cosine']:.5f}" + (f" | {w['note']}" if w.get("note") else ""))
                else:
                    print(f"  W4A16 {k}: {w.get('note')}")
            if r["goal"]:
                print(f"  goal {r['goal']}x: best {r['best_kernel']} "
                      + ("unmeasured" if r["speedup"] is None else f"{r['speedup']:.2f}x {'PASS' if r['pass'] else 'FAIL'}"))
        else:
            print(f"decode {shape}: {r['note']}")
        save()
    if time.monotonic() - start > args.max_seconds:
        res["tower"] = {"shape": tower, "note": f"skipped: past --max-seconds {args.max_seconds}"}
    else:
        try:
            res["tower"] = t = tower_rows(tower, device, args)
            print(f"tower {tower}: bf16 {t['bf16']['ms']:.2f} ms; " + "; ".join(
                f"{m} {t[m]['ms']:.2f} ms {t[m]['speedup']:.2f}x cos {t[m]['cosine_vs_bf16']:.4f}"
                if t[m].get("ms") else f"{m} {t[m]['note']}" for m in ("int8", "fp8"))
                + (f" | goal {t['goal']}x {'PASS' if t['pass'] else 'FAIL'}" if t["goal"] else ""))
        except Exception as e:
            res["tower"] = {"shape": tower, "note": f"failed: {type(e).__name__}: {str(e)[:300]}"}
            print(f"tower {tower}: {res['tower']['note']}")
    res["seconds"] = time.monotonic() - start
    res["complete"] = True
    save()
    print(f"wrote {out_path} ({res['seconds']:.1f} s)")
    return res


if __name__ == "__main__":
    main()
