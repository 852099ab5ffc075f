"""The int4 kernels of nvila_lab.quant.kernels against an independent dense reference, the kernel switch, the
Triton kernel's CUDA guard (and its arithmetic under Triton's CPU interpreter when triton is installed), the
decode timer, and benchmarks/quant_speed.py --quick end to end (so the GPU script cannot rot)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nvila_lab.quant.integer import INT4_KERNELS, QuantError, W4A16Linear, unpack_int4
from nvila_lab.quant.kernels import (cpu_int4, decode_speed, quantize_llm_w4a16, set_int4_kernel, time_ms,
                                     tinygemm_int4, triton_int4)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "quant_speed.py"


def dense_by_hand(layer: W4A16Linear) -> torch.Tensor:
    "W = (q - z) * s in float64, from the packed bytes, written out independently of the layer's own methods."
    lo, hi = (layer.qweight & 15).double(), (layer.qweight >> 4).double()  # [N, K/2]
    q = torch.empty(layer.out_features, layer.in_features, dtype=torch.float64)
    q[:, 0::2], q[:, 1::2] = lo, hi
    g = layer.group_size
    z = layer.zeros.double().repeat_interleave(g, dim=1)  # [N, K]
    s = layer.scales.double().repeat_interleave(g, dim=1)
    return (q - z) * s


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm())


@pytest.mark.parametrize("n,k,g,bias,rows", [(32, 160, 32, True, 1), (80, 640, 128, False, 5), (16, 512, 64, True, 2),
                                             (136, 256, 256, True, 1)])
def test_cpu_kernel_matches_dense_reference(n, k, g, bias, rows):
    torch.manual_seed(n + k)
    layer = W4A16Linear.from_float(nn.Linear(k, n, bias=bias), g)
    x = torch.randn(rows, k)
    want = x.double() @ dense_by_hand(layer).t() + (layer.bias.double() if bias else 0)  # [rows, N]
    assert torch.allclose(dense_by_hand(layer).float(), layer.dequantized_weight(torch.float32), atol=1e-6)
    layer.kernel = "cpu"
    for xin in (x.bfloat16(), x):
        y = layer(xin)
        assert y.shape == (rows, n) and y.dtype == xin.dtype
        assert rel(y, want) < 1e-2  # bf16 activations and output: ~0.3% relative error
    # a layer whose zero points are off by one must fail the same comparison
    layer.set_quantized(layer.int_weight(), layer.scales, (layer.zeros.int() + 1).clamp(max=15))
    assert rel(layer(x), want) > 0.05


def test_cpu_kernel_refuses_clearly():
    with pytest.raises(QuantError, match="group sizes"):
        cpu_int4(W4A16Linear(64, 32, group_size=16), torch.randn(1, 64))
    with pytest.raises(QuantError, match="bfloat16"):
        cpu_int4(W4A16Linear(64, 32, group_size=32), torch.randn(1, 64, dtype=torch.float64))


def test_set_int4_kernel_counts_and_errors():
    m = nn.Sequential(W4A16Linear(64, 32, 32), nn.Linear(4, 4), nn.ModuleList([W4A16Linear(64, 16, 32)] * 1))
    assert set_int4_kernel(m, "cpu") == 2 and m[0].kernel == "cpu" and m[2][0].kernel == "cpu"
    assert {"reference", "cpu", "triton", "tinygemm"} <= set(INT4_KERNELS)
    with pytest.raises(QuantError) as e:
        set_int4_kernel(m, "marlin")
    assert "reference" in str(e.value) and "cpu" in str(e.value) and "triton" in str(e.value)
    assert m[0].kernel == "cpu"  # unchanged after the refusal


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-side refusal")
def test_triton_kernel_needs_cuda():
    layer = W4A16Linear.from_float(nn.Linear(128, 64), 64)
    for kernel in (triton_int4, tinygemm_int4):
        with pytest.raises(QuantError, match="needs a CUDA GPU"):
            kernel(layer, torch.randn(1, 128))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernel_matches_reference_on_cuda():
    torch.manual_seed(0)
    for n, k, g in ((512, 3584, 128), (100, 256, 64)):
        layer = W4A16Linear.from_float(nn.Linear(k, n, bias=True), g)
        x = torch.randn(1, k, dtype=torch.bfloat16)
        want = (x.double() @ dense_by_hand(layer).t() + layer.bias.double()).cuda()  # on the CPU, in float64
        layer, x = layer.cuda(), x.cuda()
        for kernel in ("triton", "tinygemm"):
            if kernel == "tinygemm" and n % 8:
                continue
            layer.kernel = kernel
            assert rel(layer(x), want) < 1e-2, kernel


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernel_arithmetic_under_the_interpreter():
    "The fused kernel's arithmetic on the CPU with TRITON_INTERPRET=1 (split-K, masking of a ragged N, bias)."
    code = textwrap.dedent("""
        import torch
        from torch import nn
        from nvila_lab.quant.integer import W4A16Linear, reference_int4
        from nvila_lab.quant.kernels import triton_w4_gemv
        torch.manual_seed(0)
        for n, k, g, bias in ((50, 256, 64, True), (32, 128, 32, False)):
            layer = W4A16Linear.from_float(nn.Linear(k, n, bias=bias), g)
            x = torch.randn(2, k)
            err = (triton_w4_gemv(layer, x) - reference_int4(layer, x)).abs().max().item()
            assert err < 1e-4, err
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_time_ms_counts_calls():
    calls = []
    t = time_ms(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and 0 <= t < 50
    assert len(time_ms(lambda: None, 0, 3, all_times=True)) == 3


def test_decode_speed_w4a16_matches_reference_tokens():
    from nvila_lab.config import get_config
    from nvila_lab.model import build_llm
    torch.set_num_threads(1)
    llm = build_llm(get_config("tiny"), dtype=torch.bfloat16).eval()
    torch.manual_seed(1)
    llm.lm_head.weight = nn.Parameter(torch.randn_like(llm.lm_head.weight))  # untied: a random model then varies
    quantize_llm_w4a16(llm, group_size=64, kernel="reference")
    ref = decode_speed(llm, new_tokens=6, prompt_len=5, repeats=1, static=True)
    set_int4_kernel(llm, "cpu")
    fast = decode_speed(llm, new_tokens=6, prompt_len=5, repeats=1)
    assert fast.tokens == ref.tokens and len(fast.tokens) == 6
    assert fast.ms_per_token > 0 and math.isfinite(fast.effective_gbps)
    with pytest.raises(QuantError, match="at least 2"):
        decode_speed(llm, new_tokens=1)


def test_static_decode_step_is_one_graph():
    "No host reads in a static-cache step (what CUDA graph capture needs): dynamo traces it with fullgraph=True."
    from nvila_lab.config import get_config
    from nvila_lab.model import build_llm
    from nvila_lab.quant.kernels import StaticDecoder, _prompt
    llm = build_llm(get_config("tiny")).eval()
    torch.manual_seed(2)
    llm.lm_head.weight = nn.Parameter(torch.randn_like(llm.lm_head.weight))
    quantize_llm_w4a16(llm, group_size=32, kernel="reference")
    ids = _prompt(llm, 6, torch.device("cpu"))
    dec = StaticDecoder(llm, 6, 5, cuda_graph=False)
    want, _ = dec.run(ids)
    dec.prefill(ids)
    traced = torch.compile(dec._step, backend="eager", fullgraph=True)
    try:
        with torch.no_grad():
            for _ in range(4):
                traced()
    finally:
        torch._dynamo.reset()
    assert dec.out[0, :5].tolist() == want


def test_benchmark_quick_writes_json(tmp_path):
    out = tmp_path / "q.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["complete"] and res["mode"] == "cpu-quick" and res["gpu"] == "unmeasured"
    m = res["machine"]
    assert m["device"] == "cpu" and m["device_name"] and m["torch"] == torch.__version__ and m["date"]
    assert res["copy_bandwidth"]["gbps"] > 0
    (llm,) = res["llm"]
    assert llm["shape"] == "cpu-quick" and llm["kernels"] == ["cpu"] and llm["best_kernel"] == "cpu"
    w = llm["w4a16"]["cpu"]
    assert w["speedup"] > 0 and math.isfinite(w["speedup"]) and llm["speedup"] == w["speedup"]
    assert w["speedup"] == pytest.approx(llm["bf16"]["ms_per_token"] / w["ms_per_token"])
    assert w["weight_bytes"] < 0.6 * llm["bf16"]["weight_bytes"]
    assert w["bytes_ratio"] == pytest.approx(llm["bf16"]["weight_bytes"] / w["weight_bytes"])
    assert w["logits_vs_reference_kernel"]["cosine"] > 0.999  # the fast kernel computes what the reference does
    assert llm["goal"] is None and llm["pass"] is None  # GPU goals are not judged on a CPU
    t = res["tower"]
    for mode in ("int8", "fp8"):
        assert t[mode]["speedup"] > 0 and t[mode]["cosine_vs_bf16"] > 0.99
    assert "decode cpu-quick" in r.stdout
