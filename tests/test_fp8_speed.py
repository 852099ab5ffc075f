"""The FP8 speed model (nvila_lab.fp8.speed) against hand-computed cases, and benchmarks/fp8_step.py in its CPU
smoke mode (so the GPU script cannot rot): it runs, writes its JSON, every column gives a finite output close to
bf16, and it still runs without torchao (that column skipped with a note)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nvila_lab.config import ConfigError
from nvila_lab.fp8 import speed
from nvila_lab.fp8.speed import (SHAPES, LayerShape, Op, expected_step_speedup, gemm_speedup, get_device,
                                 layer_saved_bytes, layer_step_ops, linear_ops, linear_step_speedup,
                                 optimizer_bytes_per_param, step_estimate)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "fp8_step.py"


def test_roofline_of_one_op_by_hand():
    d = get_device("h100")
    # 4096^3 bf16 GEMM: 2*4096^3 / (989e12 * 0.78) s, compute-bound
    op = Op("g", "gemm", 2 * 4096 ** 3, 2 * 3 * 4096 ** 2)
    assert op.time(d) == pytest.approx(2 * 4096 ** 3 / (989e12 * 0.78), rel=1e-12)
    # a 1 GB copy on the H100: 1e9 / (3.35e12 * 0.92)
    assert Op("c", "elementwise", bytes=1e9).time(d) == pytest.approx(1e9 / 3.082e12, rel=1e-12)
    assert Op("tiny", "quantise", bytes=8).time(d) == pytest.approx(2e-6)  # the launch floor
    with pytest.raises(ConfigError, match="h200"):
        get_device("h300")


def test_linear_bytes_by_hand():
    m, k, n = 32, 64, 48
    bf = linear_ops(m, k, n, "bf16")
    assert [o.flops for o in bf] == [2 * m * k * n] * 3
    assert sum(o.bytes for o in bf) == 2 * 3 * (m * k + k * n + m * n)
    tw = linear_ops(m, k, n, "tensorwise")
    # 3 amax passes read bf16 (2 B), 3 casts read 2 + write 1, 3 FP8 transposes read 1 + write 1,
    # 3 FP8 GEMMs read two FP8 operands and write one bf16 result; W is cast again in backward (read 2 + write 1)
    sizes = (m * k, k * n, m * n)
    want = sum(2 * s + 3 * s + 2 * s for s in sizes) + sum(sizes) * 2 + 2 * sum(sizes) + 3 * k * n
    assert sum(o.bytes for o in tw) == want
    assert sum(o.fp8 for o in tw) == 3


def test_gemm_limit_and_small_shapes():
    assert gemm_speedup(16384, 16384, 16384) == pytest.approx(1979 / 989, rel=1e-9)  # the GEMM-only limit
    assert linear_step_speedup(1024, 1024, 1024) < 1 < linear_step_speedup(8192, 8192, 8192) < 2


def test_layer_step_counts():
    s = SHAPES["qwen2-7b"]
    T = 4096
    ops = layer_step_ops(s, T)
    gemm = sum(o.flops for o in ops if o.kind == "gemm")
    assert gemm == 6 * T * sum(k * n for k, n in s.linears.values())
    attn = sum(o.flops for o in ops if o.kind == "attention")
    assert attn == 3.5 * 2 * T * T * s.head_dim * s.heads  # causal forward + 2.5x backward
    opt = [o for o in ops if o.kind == "optimizer"]
    assert len(opt) == 1 and opt[0].bytes == 28 * s.params
    coat_opt = [o for o in layer_step_ops(s, T, "coat") if o.kind == "optimizer"][0]
    assert coat_opt.bytes == pytest.approx((12 + 2 * 2 * (1 + 5 / 128)) * s.params)
    with pytest.raises(ConfigError, match="tensorwise"):
        layer_step_ops(s, T, "fp4")


def test_optimizer_state_bytes_match_the_kit():
    optim = pytest.importorskip("nvila_lab.fp8.optim")
    for numel in (128 * 1000, 3584 * 512):
        b = optim.adamw_state_bytes(numel)
        # the model's per-parameter state bytes = the kit's analytic state bytes / numel (numel a multiple of 128)
        assert (optimizer_bytes_per_param("fp8") - 12) / 2 * numel == pytest.approx(b["fp8"])
        assert (optimizer_bytes_per_param("fp32") - 12) / 2 * numel == b["fp32"]


def test_expected_speedups_match_the_anchors():
    s7 = [expected_step_speedup("qwen2-7b", t, "h200") for t in (2048, 4096, 8192)]
    s15 = [expected_step_speedup("qwen2-1.5b", t, "h200") for t in (2048, 4096, 8192)]
    assert all(1.2 <= v <= 1.45 for v in s7), s7
    assert all(1.0 < a < b for a, b in zip(s15, s7)), (s15, s7)
    # where the time goes: the attention core does not move, the GEMMs halve
    bf, tw = step_estimate("qwen2-7b", 8192), step_estimate("qwen2-7b", 8192, recipe="tensorwise")
    assert tw.by_kind["attention"] == bf.by_kind["attention"]
    assert tw.by_kind["gemm"] == pytest.approx(bf.by_kind["gemm"] * 989 / 1979)


def test_saved_bytes_by_hand():
    s = LayerShape("x", 64, 128, 4, 2, 16)
    b = layer_saved_bytes(s, 10, "bf16")
    assert b["SwiGLU"] == 3 * 128 * 2 * 10 and b["weight scales"] == 0
    assert b["norm inputs"] == 2 * (6 * 64 + 4) * 10
    c = layer_saved_bytes(s, 10, "coat")
    assert c["SwiGLU"] == 2 * 128 * 1.25 * 10 and c["weight scales"] == 7 * 4  # weights saved as themselves
    # one FP8 copy per distinct input (q/k/v's, o_proj's, gate/up's, down_proj's) and a scale each
    assert c["linear inputs"] == (64 + s.q_dim + 64 + 128) * 10 + 4 * 4


def test_results_loader_reads_only_gpu_runs(tmp_path):
    assert speed.gpu_speed_status(tmp_path) == speed.UNMEASURED
    (tmp_path / "fp8_step_cpu_smoke.json").write_text(json.dumps({"mode": "cpu-smoke", "steps": []}))
    (tmp_path / "fp8_step_broken.json").write_text("{not json")
    assert speed.load_gpu_results(tmp_path) == []


def test_speed_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, nvila_lab.fp8.speed; print('torch' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


def _load_script():
    spec = importlib.util.spec_from_file_location("fp8_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_cpu_smoke(tmp_path, capsys):
    pytest.importorskip("transformers")
    bench = _load_script()
    res = bench.main(["--cpu-smoke", "--out", str(tmp_path), "--steps", "1"])
    out = capsys.readouterr().out
    assert "CPU times, NOT speed" in out and "ms (CPU, not speed)" in out
    saved = json.loads((tmp_path / "fp8_step_cpu_smoke.json").read_text())
    assert saved["mode"] == "cpu-smoke" and saved["device"]["name"].startswith("CPU")
    assert saved["versions"]["torch"] and saved["ceilings"]["copy_tbps"] is None
    rows = {r["column"]: r for r in saved["steps"]}
    assert rows["bf16"]["ms"] > 0 and rows["bf16"]["speedup_vs_bf16"] == 1.0
    for col, r in rows.items():
        if r["note"].startswith("skipped"):
            continue  # a kit module not built (yet)
        assert r["ms"] > 0 and r["output_finite"], r
        if col != "bf16":
            assert r["sqnr_vs_bf16_db"] > 20, r  # the FP8 layer's output is the bf16 layer's, to FP8 precision
            # the update (output minus the exact residual) carries the FP8 error undiluted: lower, still FP8-sized
            assert 15 < r["sqnr_update_vs_bf16_db"] < r["sqnr_vs_bf16_db"] - 5, r
            assert r["expected_speedup_h200"] > 0
    assert speed.load_gpu_results(tmp_path) == []  # a smoke run never counts as a GPU measurement
    g = {r["proj"]: r for r in saved["gemms"]}
    assert set(g) == {"q_proj", "k_proj", "gate_proj", "down_proj"}  # distinct (K, N) of the tiny layer
    assert all(r["sqnr_fp8_vs_bf16_db"] > 20 for r in g.values())  # _scaled_mm path, column-major operand
    assert res["steps"] == saved["steps"]
    assert saved["complete"] is True


def test_benchmark_survives_a_failing_column(tmp_path, monkeypatch, capsys):
    """What a GPU may do: a kernel rejects the rowwise backward's operands (here a fake fp8_mm refuses row-scaled E5M2),
    and a conversion raises. Those rows record the error; the others, the GEMM rows and the JSON are all there."""
    pytest.importorskip("transformers")
    linear = pytest.importorskip("nvila_lab.fp8.linear")
    real = linear.fp8_mm

    def picky(a, b, a_scale, b_scale, *args, **kw):
        if a.dtype == torch.float8_e5m2 and a_scale.dim():
            raise RuntimeError("fake kernel: row-wise E5M2 x E4M3 not supported")
        return real(a, b, a_scale, b_scale, *args, **kw)

    import torch
    monkeypatch.setattr(linear, "fp8_mm", picky)
    bench = _load_script()
    real_make = bench.make_column

    def make(column, layer, device):
        if column == "kit-coat":
            raise TypeError("fake API change")
        return real_make(column, layer, device)

    monkeypatch.setattr(bench, "make_column", make)
    bench.main(["--cpu-smoke", "--out", str(tmp_path), "--steps", "1", "--columns", "bf16,kit-tensorwise,kit-rowwise,kit-coat"])
    saved = json.loads((tmp_path / "fp8_step_cpu_smoke.json").read_text())
    rows = {r["column"]: r for r in saved["steps"]}
    assert saved["complete"] is True and rows["bf16"]["ms"] > 0 and rows["kit-tensorwise"]["ms"] > 0
    assert rows["kit-rowwise"]["ms"] is None and "fake kernel" in rows["kit-rowwise"]["note"]
    assert rows["kit-rowwise"]["sqnr_vs_bf16_db"] > 20  # its forward (E4M3 x E4M3) still ran
    assert rows["kit-coat"]["ms"] is None and rows["kit-coat"]["note"].startswith("failed to build: TypeError")
    assert len(saved["gemms"]) == 4 and all("ratio" in g for g in saved["gemms"])


def test_benchmark_time_budget(tmp_path):
    pytest.importorskip("transformers")
    bench = _load_script()
    bench.main(["--cpu-smoke", "--out", str(tmp_path), "--max-seconds", "0", "--columns", "bf16"])
    saved = json.loads((tmp_path / "fp8_step_cpu_smoke.json").read_text())
    assert saved["complete"] is True and saved["settings"]["max_seconds"] == 0
    assert [r["ms"] for r in saved["steps"]] == [None] and "past --max-seconds" in saved["steps"][0]["note"]
    assert all(g["note"].startswith("skipped: past --max-seconds") for g in saved["gemms"])


def test_benchmark_runs_without_torchao(tmp_path):
    pytest.importorskip("transformers")
    code = ("import sys, runpy; sys.modules['torchao'] = None\n"
            f"sys.argv = ['fp8_step.py', '--cpu-smoke', '--columns', 'bf16,torchao-tensorwise', '--steps', '1', "
            f"'--out', {str(tmp_path)!r}]\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((tmp_path / "fp8_step_cpu_smoke.json").read_text())
    assert [row["column"] for row in saved["steps"]] == ["bf16"]
    assert any("torchao not importable" in n for n in saved["notes"]), saved["notes"]
    assert "torchao not importable" in r.stdout


def test_benchmark_refuses_without_gpu_and_bad_names():
    pytest.importorskip("transformers")
    import torch
    bench = _load_script()
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--cpu-smoke"):
            bench.main(["--steps", "1"])
    with pytest.raises(SystemExit, match="qwen2-7b"):
        bench.main(["--cpu-smoke", "--shapes", "qwen2-8b"])
    with pytest.raises(SystemExit, match="kit-coat"):
        bench.main(["--cpu-smoke", "--columns", "bf16,fp4"])
