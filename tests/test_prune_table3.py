"""benchmarks/prune_table3.py (NVILA's Table 3 in miniature, issue 13): the reduced run works end to end and writes
a complete, self-consistent JSON and CSV; the full run's sizes stay within the stated budget."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "prune_table3.py"
spec = importlib.util.spec_from_file_location("prune_table3", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_settings_list():
    names = [s["name"] for s in bench.settings_list()]
    assert names[0] == "full-100" and len(names) == len(set(names)) == 1 + 3 * (1 + 3 + 1)
    assert [s["seed"] for s in bench.settings_list() if s["method"] == "random" and s["keep"] == 0.3] == [0, 1, 2]


def test_reduced_needs_out(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--reduced"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("t3")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(SCRIPT), "--reduced", "--out", str(out), "--work", str(out / "work")],
                       capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((out / "prune_table3.json").read_text())


def test_reduced_json_complete(reduced):
    out, res = reduced
    meta = res["meta"]
    assert meta["complete"] is True and meta["reduced"] is True and meta["size"] == "reduced"
    assert "--reduced" in meta["command"]
    n = meta["sizes"]["n_train"]
    assert meta["n_rows"] == n * len(meta["tasks"])
    want = [s["name"] for s in bench.settings_list()]
    assert [s["name"] for s in res["settings"]] == want
    for s in res["settings"]:
        assert set(s["accuracy"]) == set(meta["tasks"]), s["name"]
        assert math.isclose(s["mean_accuracy"], sum(s["accuracy"].values()) / len(s["accuracy"]))
        assert sum(s["counts"]["kinds"].values()) == s["n_kept"] == sum(s["counts"]["subsets"].values())
        assert s["steps"] == max(1, round(meta["sizes"]["epochs"] * s["n_kept"] / meta["sizes"]["batch_size"]))
        assert s["train_seconds"] > 0
    assert set(res["reference"]) == {"nano-nvila (large)", "nano-nvila-small (start)"}
    assert set(res["random_summary"]) == {str(k) for k in meta["keeps"]}


def test_reduced_counts_per_subset(reduced):
    "Every method keeps ceil(rho * n) of every subset (the same counts for all); 100% keeps everything."
    _, res = reduced
    n = res["meta"]["sizes"]["n_train"]
    for s in res["settings"]:
        want = n if s["method"] == "full" else math.ceil(round(s["keep"] * n, 9))
        assert s["counts"]["subsets"] == {t: want for t in res["meta"]["tasks"]}, s["name"]
    full = res["settings"][0]["counts"]["kinds"]
    # the mixed set really is mixed: every kind of the mix is there at 100%
    assert {k for k, f in res["meta"]["mix"].items() if f > 0} <= set(full)


def test_reduced_csv(reduced):
    out, res = reduced
    rows = list(csv.DictReader((out / "prune_table3.csv").open()))
    assert len(rows) == len(res["settings"]) + len(res["meta"]["keeps"])
    by = {r["name"]: r for r in rows}
    for s in res["settings"]:
        assert float(by[s["name"]]["acc_mean"]) == pytest.approx(s["mean_accuracy"])
        assert int(by[s["name"]]["steps"]) == s["steps"]
    for k, agg in res["random_summary"].items():
        assert float(by[f"random-{round(float(k) * 100)}-mean"]["acc_mean"]) == pytest.approx(agg["mean_accuracy_mean"])


def test_full_sizes_cost_proportional():
    "The full run's steps per setting are proportional to the kept fraction (the Table 3 cost axis)."
    f = bench.FULL
    n = f["n_train"] * len(bench.TASKS)
    steps = {k: round(f["epochs"] * math.ceil(k * f["n_train"]) * len(bench.TASKS) / f["batch_size"]) for k in bench.KEEPS}
    full = round(f["epochs"] * n / f["batch_size"])
    for k, s in steps.items():
        assert abs(s / full - k) < 0.02, (k, s, full)


def test_verdict_follows_the_numbers(reduced):
    "The verdict is computed from the results: DeltaLoss made clearly better (or worse) than random flips the claim."
    import copy
    _, res = reduced
    claim = "DeltaLoss beats random at every kept fraction"
    for delta_acc, want in [(1.0, "reproduces"), (-1.0, "does not")]:
        r = copy.deepcopy(res)
        for s in r["settings"]:
            if s["method"] == "deltaloss":
                s["mean_accuracy"] = delta_acc
        for agg in r["random_summary"].values():
            agg["mean_accuracy_mean"] = 0.5
        v = {x["claim"]: x for x in bench.verdict(r)}
        assert v[claim]["verdict"] == want, v[claim]


def test_size_label():
    assert bench.size_label(dict(bench.FULL)) == "full" and bench.size_label(dict(bench.REDUCED)) == "reduced"
    assert bench.size_label(dict(bench.FULL, n_train=100)) == "not the full size: n_train=100 (full 300)"
