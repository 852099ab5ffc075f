"""`nvila-lab train` under `accelerate launch`: two CPU processes (gloo) equal one, and a plug-in compressor goes
from a file the kit has never seen to a budgeted, trained, saved, reloaded, evaluated and asked checkpoint, all
through the shell commands.

accelerate's `--cpu` launcher starts ONE process unless MPI is set up (it only sets MASTER_ADDR/PORT), so the
two-process runs use `--multi_gpu` with no visible GPU: torch's elastic launcher starts 2 processes and
`Accelerator(cpu=True)` joins them over gloo. The JSON's `processes` field proves there were two.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

PY = [sys.executable, "-m", "nvila_lab.cli"]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch2() -> list[str]:
    "`accelerate launch` of the CLI in 2 processes (gloo on CPU), on a free port: other test runs may share the machine."
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
            "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "nvila_lab.cli"]

PLUGIN = '''
"A compressor nvila-lab does not ship: k x k average pooling of each tile, then one linear map."
from torch import nn
from nvila_lab.compress import TokenCompressor, register_compressor


@register_compressor("test_pool")
class TestPool(TokenCompressor):
    def __init__(self, in_dim, out_dim, k: int = 2):
        super().__init__(in_dim, out_dim)
        self.k = k
        self.proj = nn.Linear(in_dim, out_dim)

    def output_grid(self, h, w):
        return (h // self.k, w // self.k)

    def forward(self, x, **kw):  # [N, h, w, C] -> [N, (h/k)(w/k), D]
        x = nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), self.k).permute(0, 2, 3, 1)
        return self.proj(x.flatten(1, 2))
'''


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def train_args(ws: Path, out: str) -> list[str]:
    return ["train", "--import", str(ws / "test_pool.py"), "--projector", "test_pool", "--projector-arg", "k=4",
            "--preset", "tiny", "--data", str(ws / "set"), "--steps", "3", "--batch-size", "5", "--log-every", "1",
            "--lr", "3e-3", "--seed", "7", "--out", str(ws / out), "--json"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    "A workspace: the plug-in file, a small mixed set (answers of 1, 2 and 3 tokens), one run of 1 and one of 2 processes."
    ws = tmp_path_factory.mktemp("accel")
    (ws / "test_pool.py").write_text(PLUGIN)
    r = run([*PY, "make-data", "--task", "colour", "--task", "position", "--task", "read_code", "--n", "4",
             "--seed", "3", "--out", str(ws / "set")])
    assert r.returncode == 0, r.stderr
    one = run([*PY, *train_args(ws, "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run([*launch2(), *train_args(ws, "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    return ws, json.loads(one.stdout), json.loads(two.stdout)


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return {f"{f.parent.name}/{k}": v for f in sorted(ckpt.glob("*/*.safetensors")) for k, v in load_file(f).items()}


def test_two_processes_really_ran(ws):
    _, one, two = ws
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["steps"] == two["steps"] == 3 and not two["stopped"]


def test_same_loss_at_every_step(ws):
    _, one, two = ws
    h1, h2 = one["stages"][0]["history"], two["stages"][0]["history"]
    assert [r["step"] for r in h1] == [r["step"] for r in h2] == [1, 2, 3]
    for a, b in zip(h1, h2):  # a global batch of 5 over 2 processes: slices of 3 and 2 rows, uneven answer tokens
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
        assert a["lr"] == b["lr"]
    assert h1[0]["loss"] != h1[-1]["loss"]  # the weights really moved


def test_same_final_weights(ws):
    d, one, two = ws
    w1, w2 = weights(Path(one["checkpoint"])), weights(Path(two["checkpoint"]))
    assert w1.keys() == w2.keys() and len(w1) > 50
    start = {k: v for k, v in w1.items()}
    worst = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    assert worst < 1e-4, worst
    init = run([*PY, "train", "--import", str(d / "test_pool.py"), "--projector", "test_pool", "--projector-arg", "k=4",
                "--preset", "tiny", "--data", str(d / "set"), "--steps", "1", "--batch-size", "5", "--lr", "1e-9",
                "--seed", "7", "--out", str(d / "nearly-init"), "--json"])
    assert init.returncode == 0, init.stderr[-2000:]
    w0 = weights(Path(json.loads(init.stdout)["checkpoint"]))
    moved = max((start[k].float() - w0[k].float()).abs().max().item() for k in w1)
    assert moved > 100 * max(worst, 1e-7), (moved, worst)  # the tolerance is far below what 3 steps change


def test_plugin_end_to_end(ws):
    "Budgeted, trained on 2 processes (above), saved, reloaded with its settings, evaluated and asked: all from the shell."
    d, _, two = ws
    plugin = str(d / "test_pool.py")
    r = run([*PY, "budget", "--import", plugin, "--projector", "test_pool", "--projector-arg", "k=4", "--preset", "tiny",
             "448x448", "--json"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["visual_tokens"] == 9 * (8 // 4) ** 2  # 3x3 tiles of 8x8 patches, pooled 4x4
    cfg = json.loads((Path(two["checkpoint"]) / "config.json").read_text())
    assert '"test_pool"' in json.dumps(cfg) and '"k": 4' in json.dumps(cfg)  # the settings travel in config.json
    assert (two["projector"], two["projector_kwargs"]) == ("test_pool", {"k": 4})
    code = ("import sys, importlib.util as u; s = u.spec_from_file_location('p', sys.argv[1]); "
            "s.loader.exec_module(u.module_from_spec(s)); from nvila_lab.checkpoint import load_nvila; "
            "m = load_nvila(sys.argv[2]); print(m.cfg.projector, m.cfg.projector_kwargs, m.encoder.projector.k)")
    r = run([sys.executable, "-c", code, plugin, two["checkpoint"]])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["test_pool", "{'k':", "4}", "4"]
    r = run([*PY, "eval", "--checkpoint", two["out"], "--data", str(d / "set"), "--import", plugin, "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["n"] == 12
    image = sorted((d / "set" / "images").iterdir())[0]
    r = run([*PY, "ask", "--checkpoint", two["out"], "--import", plugin, str(image), "Which colour is the large shape?"])
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    r = run([*PY, "eval", "--checkpoint", two["out"], "--data", str(d / "set")])  # without the plug-in: one clear line
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "unknown compressor 'test_pool'" in r.stderr and "--import" in r.stderr


def test_cpu_flag_launches_one_process_and_says_so(ws):
    d, _, _ = ws
    r = run([ACCELERATE, "launch", "--num_processes", "2", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no", "-m", "nvila_lab.cli", "train", "--preset", "tiny", "--data", str(d / "set"),
             "--steps", "1", "--batch-size", "2", "--out", str(d / "cpu-flag"), "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["processes"] == 1
    assert "accelerate launched one process" in r.stderr
