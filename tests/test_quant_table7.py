"""benchmarks/quant_table7.py --quick: the reduced Table 7 run writes a complete JSON and CSV whose rows, accuracies
and verdicts are consistent with each other (the full run's results are read by nbs/93_repro_quant.ipynb)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys


def test_quick_run(tmp_path, root):
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "quant_table7.py"), "--quick", "--n-eval", "3",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "quant_table7.json").read_text())
    assert res["meta"]["complete"] and not (tmp_path / "quant_table7.json.partial").exists()
    labels = [x["label"] for x in res["rows"]]
    assert labels == ["bf16", "W4A16 AWQ", "W8A8 + W4A16 AWQ"]
    for row in res["rows"]:
        assert row["n"] == 12 and row["correct"] == round(row["accuracy"] * 12)
        assert abs(sum(row["tasks"].values()) / len(row["tasks"]) - row["accuracy"]) < 1e-9  # 3 per task: balanced
        assert row["ttft"]["min_ms"] <= row["ttft"]["median_ms"] <= row["ttft"]["max_ms"]
    by = {x["label"]: x for x in res["rows"]}
    assert by["bf16"]["accuracy"] >= 0.5  # the float model answers; otherwise "keeps accuracy" means nothing
    assert by["W4A16 AWQ"]["reports"]["llm"]["method"] == "awq" and "vision_tower" not in by["W4A16 AWQ"]["reports"]
    assert by["W8A8 + W4A16 AWQ"]["reports"]["vision_tower"]["method"] == "w8a8"
    for label in ("W4A16 AWQ", "W8A8 + W4A16 AWQ"):  # the quantised rows answer too (12 questions: a loose bound)
        assert by[label]["accuracy"] >= by["bf16"]["accuracy"] - 0.25, by[label]["accuracy"]
    # the paired counts in the verdict are the questions' own: recount them from the ids
    v = next(v for v in res["verdict"] if v["claim"] == "W4A16 AWQ keeps bf16 accuracy")
    lost = len(set(by["bf16"]["right_ids"]) - set(by["W4A16 AWQ"]["right_ids"]))
    assert f"{lost} question(s) lost" in v["kit"], v["kit"]
    with open(tmp_path / "quant_table7.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["row"] for t in table] == labels
    assert abs(float(table[1]["accuracy"]) - by["W4A16 AWQ"]["accuracy"]) < 1e-4
