"""DeltaLoss scoring (nbs/30_prune_score.ipynb) as a user runs it: a scoring process SIGKILLed mid-way and started
again scores every example exactly once and gives the uninterrupted result bit for bit; two processes under
`accelerate launch` give the one-process scores; bad inputs (mismatched tokenizers or vocabularies, a scores file
of another dataset or pair, an empty dataset, a file that is not a scores file) are one-line PruneErrors.

The subprocesses run with OMP_NUM_THREADS=1 (as does the reference they are compared with), so the float
arithmetic of a batch is the same in every run: the comparisons are exact (==), not within a tolerance.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nvila_lab.checkpoint import save_nvila
from nvila_lab.config import get_config
from nvila_lab.data import build_tokenizer, data_samples_dir, load_dataset, load_tokenizer, make_dataset
from nvila_lab.model import NVILAModel
from nvila_lab.prune.score import (SCORE_COLUMNS, PruneError, ScoreTable, check_pair, fingerprint_dataset,
                                   read_scores, score_dataset)

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
LARGE = data_samples_dir() / "checkpoints" / "nano-nvila"
ENV = os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

# One scoring job: counts how many batches this process scored (answer_logprobs is called once per model and batch)
# and optionally sleeps in each call, so that a test can kill it while it runs.
JOB = '''
import json, sys, time
import nvila_lab.prune.score as S
large, small, data, out, bs, delay = sys.argv[1:7]
calls = [0]
orig = S.answer_logprobs
def counted(*a, **k):
    calls[0] += 1
    time.sleep(float(delay))
    return orig(*a, **k)
S.answer_logprobs = counted
t = S.score_dataset(large, small, data, out, batch_size=int(bs), progress=False)
st = S._state()
print(json.dumps({"rank": st.process_index, "world": st.num_processes, "batches": calls[0] // 2, "n": len(t)}))
'''


def job(ws: Path, out: str, bs: int = 2, delay: float = 0.0) -> list[str]:
    return [str(ws / "job.py"), str(LARGE), str(ws / "small"), str(ws / "set"), str(ws / out), str(bs), str(delay)]


def stats(stdout: str) -> list[dict]:
    return [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    "A workspace: 16 rows (colour, read_code), a small model (the shipped one if present), the job script."
    ws = tmp_path_factory.mktemp("score")
    make_dataset(["colour", "read_code"], n=8, seed=5, out_dir=ws / "set", progress=False)
    shipped = data_samples_dir() / "checkpoints" / "nano-nvila-small"
    if (shipped / "config.json").is_file():
        (ws / "small").symlink_to(shipped)
    else:  # stand-in: a fresh model of the same preset and tokenizer
        torch.manual_seed(0)
        save_nvila(NVILAModel("tiny", load_tokenizer()), ws / "small")
    (ws / "job.py").write_text(JOB)
    r = subprocess.run([sys.executable, *job(ws, "ref.parquet")], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert stats(r.stdout)[0]["batches"] == 8
    return ws


def test_reference_run(ws):
    t = read_scores(ws / "ref.parquet", data=ws / "set", large=LARGE, small=ws / "small")
    assert isinstance(t, ScoreTable) and len(t) == 16
    assert [r["id"] for r in t.rows] == [r["id"] for r in load_dataset(ws / "set")]
    assert list(t.rows[0]) == list(SCORE_COLUMNS)
    assert {r["kind"] for r in t.rows} <= {"", "easy", "informative"}
    assert "16 examples" in repr(t)
    assert not (ws / "ref.parquet.parts").exists()


def test_kill_and_resume(ws):
    "SIGKILL a run once 3 of its 8 parts exist; the restart scores the 5 others only and equals the reference exactly."
    parts = ws / "killed.parquet.parts"
    p = subprocess.Popen([sys.executable, *job(ws, "killed.parquet", delay=0.4)], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len(list(parts.glob("part-*.parquet"))) < 3:
            assert p.poll() is None, p.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the scoring job wrote no parts"
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    before = len(list(parts.glob("part-*.parquet")))
    assert 3 <= before < 8 and not (ws / "killed.parquet").exists()
    with pytest.raises(PruneError, match="unfinished run"):
        read_scores(ws / "killed.parquet")
    r = subprocess.run([sys.executable, *job(ws, "killed.parquet")], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert stats(r.stdout)[0]["batches"] == 8 - before  # only the missing batches: every example scored once
    got, ref = read_scores(ws / "killed.parquet"), read_scores(ws / "ref.parquet")
    ids = [r["id"] for r in got.rows]
    assert len(ids) == len(set(ids)) == 16
    assert got.rows == ref.rows and got.fingerprint == ref.fingerprint  # exact, float for float
    assert not parts.exists()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes(ws):
    "accelerate launch, 2 CPU processes (gloo): each scores 4 of the 8 batches; the merged file equals one process's."
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *job(ws, "two.parquet")]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    st = sorted(stats(r.stdout), key=lambda d: d["rank"])
    assert [(d["rank"], d["world"], d["batches"], d["n"]) for d in st] == [(0, 2, 4, 16), (1, 2, 4, 16)]
    assert read_scores(ws / "two.parquet").rows == read_scores(ws / "ref.parquet").rows  # exact


def test_mismatched_pairs(ws, tmp_path):
    other = save_nvila(NVILAModel("tiny", build_tokenizer(["colour"], vocab_size=300)), tmp_path / "other_tok")
    with pytest.raises(PruneError, match="different tokenizers"):
        score_dataset(LARGE, other, ws / "set", tmp_path / "s.parquet", progress=False)
    tok = load_tokenizer()
    wide = NVILAModel(get_config("tiny", vocab_size=get_config("tiny").vocab_size + 64), tok)
    with pytest.raises(PruneError, match="vocabulary sizes"):
        check_pair(NVILAModel("tiny", tok), wide)
    assert not (tmp_path / "s.parquet").exists() and not (tmp_path / "s.parquet.parts").exists()


def test_scores_of_another_pair_or_dataset(ws, tmp_path):
    ref = ws / "ref.parquet"
    with pytest.raises(PruneError, match="another large model and small model"):
        read_scores(ref, large=ws / "small", small=LARGE)
    make_dataset(["colour", "read_code"], n=8, seed=6, out_dir=tmp_path / "set6", progress=False)
    assert fingerprint_dataset(tmp_path / "set6") != fingerprint_dataset(ws / "set")
    with pytest.raises(PruneError, match="another dataset"):
        read_scores(ref, data=tmp_path / "set6")
    with pytest.raises(PruneError, match="already holds scores of another dataset"):
        score_dataset(LARGE, ws / "small", tmp_path / "set6", ref, batch_size=2, progress=False)
    # an unfinished run of another pair is never mixed in: its parts stay, untouched
    (tmp_path / "s.parquet.parts").mkdir()
    run = {"fingerprint": {"data": "0" * 16, "large": "1" * 16, "small": "2" * 16}, "batch_size": 2, "n_rows": 16}
    (tmp_path / "s.parquet.parts" / "run.json").write_text(json.dumps(run))
    with pytest.raises(PruneError, match="unfinished run of another dataset and large model and small model"):
        score_dataset(LARGE, ws / "small", ws / "set", tmp_path / "s.parquet", batch_size=2, progress=False)
    assert not (tmp_path / "s.parquet").exists()
    assert json.loads((tmp_path / "s.parquet.parts" / "run.json").read_text()) == run


def test_empty_or_broken_input(ws, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.jsonl").write_text("\n")
    with pytest.raises(PruneError, match="no examples"):
        score_dataset(LARGE, ws / "small", tmp_path / "empty", tmp_path / "e.parquet", progress=False)
    with pytest.raises(PruneError, match="no such folder"):
        score_dataset(LARGE, ws / "small", tmp_path / "nowhere", tmp_path / "e.parquet", progress=False)
    with pytest.raises(PruneError, match="not a checkpoint folder"):
        score_dataset(tmp_path, ws / "small", ws / "set", tmp_path / "e.parquet", progress=False)
    with pytest.raises(PruneError, match="batch_size must be >= 1"):
        score_dataset(LARGE, ws / "small", ws / "set", tmp_path / "e.parquet", batch_size=0, progress=False)
    import pyarrow as pa, pyarrow.parquet as pq
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "plain.parquet")
    with pytest.raises(PruneError, match="not a scores file"):
        read_scores(tmp_path / "plain.parquet")
    with pytest.raises(PruneError, match="no scores file"):
        read_scores(tmp_path / "missing.parquet")
    assert not (tmp_path / "e.parquet").exists()
