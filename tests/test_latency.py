"""The latency model and `nvila-lab latency`: every stage predicted for every named device, numbers that follow
from the roofline's inputs (checked against hand-computed bytes and the anchors' bandwidth floors), `--json`
consistent with the Python API, `--measure` on this CPU, and clear errors for unknown names."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nvila_lab.config import get_config, list_presets
from nvila_lab.hardware import HARDWARE, get_hardware
from nvila_lab.latency import Efficiency, predict_latency, weight_bytes

CMD = [sys.executable, "-m", "nvila_lab.cli", "latency"]


def cli(*args, timeout=300):
    return subprocess.run([*CMD, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("device", list(HARDWARE))
def test_every_device_every_preset(device):
    for preset in list_presets():
        cfg = get_config(preset)
        video = cfg.num_video_frames > 8 and "video" in preset
        p = predict_latency(preset, device, image=None if video else "1344x896",
                            video_frames=cfg.num_video_frames if video else None)
        assert set(p.stages) == {"vision", "projector", "prefill", "decode_per_token"}
        assert all(s.ms > 0 for s in p.stages.values())
        assert p.ttft_ms == pytest.approx(sum(p.stages[s].ms for s in ("vision", "projector", "prefill")))
        assert p.decode_tokens_per_s == pytest.approx(1e3 / p.stages["decode_per_token"].ms)


def test_decode_floor_matches_the_anchors():
    "efficiency-anchors: Qwen2-7B bf16 decode floor 4.71 ms a token at 3.0 TB/s (weights + lm_head, bf16)."
    cfg = get_config("nvila-8b")
    wb = weight_bytes(cfg)
    read = wb["llm_linear"] + cfg.vocab_size * cfg.llm_hidden * 2  # every projection + lm_head, once
    assert read / 3.0e12 * 1e3 == pytest.approx(4.71, rel=0.05)
    h100 = get_hardware("h100")
    p = predict_latency(cfg, h100, "448x448", new_tokens=2, efficiency=Efficiency(1.0, 3.0 / h100.mem_tbps, 0.0),
                        graphs=False)  # no launch cost at all: the pure bandwidth floor
    d = p.stages["decode_per_token"]
    assert d.bound == "memory"
    assert d.ms == pytest.approx(4.71, rel=0.06)  # + KV cache and activations, a few percent


def test_precisions_move_the_stage_they_should():
    base = predict_latency("nvila-8b", "h100", "1344x896")
    w4 = predict_latency("nvila-8b", "h100", "1344x896", llm="w4a16")
    w8 = predict_latency("nvila-8b", "h100", "1344x896", vit="w8a8", llm="w4a16")
    assert w4.stages["decode_per_token"].ms < base.stages["decode_per_token"].ms / 2
    assert w4.stages["vision"].ms == base.stages["vision"].ms
    assert w8.stages["vision"].ms < w4.stages["vision"].ms
    assert w8.memory_bytes < w4.memory_bytes < base.memory_bytes
    more = predict_latency("nvila-8b-video", "h100", video_frames=128)
    less = predict_latency("nvila-8b-video", "h100", video_frames=32)
    assert more.stages["vision"].ms > 3 * less.stages["vision"].ms  # 4x the frames through the tower


def test_cli_json_is_the_api():
    r = cli("--preset", "nvila-8b-video", "--device", "rtx4090", "--video", "--frames", "64", "--vit", "w8a8",
            "--llm", "w4a16", "--new-tokens", "64", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    p = predict_latency("nvila-8b-video", "rtx4090", video_frames=64, vit="w8a8", llm="w4a16", new_tokens=64)
    assert set(d["stages"]) == {"vision", "projector", "prefill", "decode_per_token"}
    assert d["stages"] == pytest.approx({k: v.ms for k, v in p.stages.items()})
    assert d["ttft_ms"] == pytest.approx(p.ttft_ms) and d["decode_tokens_per_s"] == pytest.approx(p.decode_tokens_per_s)
    assert d["input"] == "video 64 frames"


def test_cli_measure_on_this_cpu():
    r = cli("--preset", "tiny", "--device", "cpu", "--image", "448x448", "--measure", "--repeats", "2", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d["measured"]) == {"preprocess", "vision", "projector", "prefill", "decode_per_token"}
    assert all(v > 0 for v in d["measured"].values())
    assert d["measured_ttft_ms"] == pytest.approx(sum(d["measured"][k] for k in
                                                      ("preprocess", "vision", "projector", "prefill")))


@pytest.mark.parametrize("args,needle", [
    (["--device", "tpu"], "Choices: h100, h200, a100, rtx4090, l4, jetson-orin, cpu"),
    (["--preset", "nvila-9b"], "nvila-8b"),
    (["--llm", "w3a16"], "w4a16"),
    (["--device", "a100", "--vit", "fp8"], "no FP8"),
    (["--image", "1344x896", "--video"], "not both"),
    (["--frames", "8"], "add --video"),
    (["--preset", "nvila-8b", "--device", "cpu", "--measure"], "too large"),
])
def test_cli_errors(args, needle):
    r = cli(*args)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_ladder_dry_run(root):
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "latency_ladder.py"), "--dry-run"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert '"gpu": "unmeasured"' in r.stdout and "video + W8A8 ViT" in r.stdout
