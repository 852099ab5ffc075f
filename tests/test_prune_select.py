"""nvila_lab.prune.select: keep counts, DeltaLoss selection with its tie rule, the random and k-means baselines with the
same per-subset counts, vision features, and `prune` writing a dataset folder that load_dataset reads (refusals too)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nvila_lab.data import load_dataset, make_dataset
from nvila_lab.prune.score import PruneError
from nvila_lab.prune import select as S
from nvila_lab.prune.select import (METHODS, keep_count, kept_counts, prune, select_cluster, select_deltaloss,
                                    select_random, subsets, vision_features)

NANO = Path(__file__).resolve().parent.parent / "data_samples" / "checkpoints" / "nano-nvila"


def test_keep_count_is_the_exact_ceiling_of_a_decimal():
    for p in range(1, 1001, 7):  # rho = p / 1000; reference: integer ceiling, no floats
        for n in (0, 1, 3, 10, 17, 100, 999):
            assert keep_count(n, p / 1000) == (p * n + 999) // 1000, (p, n)
    assert keep_count(100, 0.07) == 7 and math.ceil(0.07 * 100) == 8  # the float trap it avoids
    assert keep_count(10, 0.3) == 3 and keep_count(5, 1) == 5


@pytest.mark.parametrize("rho", [0, 0.0, -0.5, 1.0000001, 2, float("nan"), float("inf"), "0.5", None, True])
def test_keep_outside_0_1_is_one_line(rho):
    with pytest.raises(PruneError, match=r"keep must") as e:
        keep_count(10, rho)
    assert "\n" not in str(e.value)


def _table(rng, n=60, subsets=("A", "B", "C")):
    rows = []
    for i in range(n):
        s = subsets[rng.integers(len(subsets))]
        rows.append({"id": f"x{int(rng.integers(10**6)):07d}-{i}", "task": s, "kind": "easy",
                     "delta_sum": float(rng.integers(0, 3)), "delta_mean": float(rng.normal())})  # heavy ties in sum
    return rows


def test_select_deltaloss_against_a_brute_force_reference():
    rng = np.random.default_rng(0)
    for trial in range(20):
        rows = _table(rng)
        rho = float(rng.choice([0.1, 0.3, 0.5, 0.77, 1.0]))
        for score in ("sum", "mean"):
            got = select_deltaloss(rows, rho, score)
            want = set()
            for s in {r["task"] for r in rows}:
                mine = [r for r in rows if r["task"] == s]
                k = math.ceil(round(rho * len(mine), 9))
                # reference: a stable sort by id, then a stable sort by score descending
                ranked = sorted(sorted(mine, key=lambda r: r["id"]), key=lambda r: r[f"delta_{score}"], reverse=True)
                want |= {r["id"] for r in ranked[:k]}
            assert got == [r["id"] for r in rows if r["id"] in want], (trial, score)


def test_select_deltaloss_hand_made_tie():
    rows = [{"id": "c", "task": "T", "delta_sum": 1.0, "delta_mean": 0}, {"id": "a", "task": "T", "delta_sum": 1.0, "delta_mean": 0},
            {"id": "b", "task": "T", "delta_sum": 1.0, "delta_mean": 0}, {"id": "d", "task": "T", "delta_sum": 0.0, "delta_mean": 0}]
    assert select_deltaloss(rows, 0.5) == ["a", "b"]  # the tie at 1.0 goes by id ascending; output in dataset order
    assert select_deltaloss(rows[::-1], 0.5) == ["b", "a"]
    assert select_deltaloss(rows, 0.5, "mean") == ["a", "b"]  # all tied on mean: ids a, b


def test_subset_field_groups_before_task():
    rows = [{"id": "1", "task": "count", "subset": "S1", "delta_sum": 3.0}, {"id": "2", "task": "count", "delta_sum": 2.0},
            {"id": "3", "task": "count", "subset": "S1", "delta_sum": 1.0}, {"id": "4", "task": "count", "delta_sum": 0.0}]
    assert subsets(rows) == {"S1": [0, 2], "count": [1, 3]}
    assert select_deltaloss(rows, 0.5) == ["1", "2"]  # one per subset, not the top two overall


def test_empty_dataset_and_empty_subset():
    with pytest.raises(PruneError, match="no examples"):
        select_random([], 0.5)
    with pytest.raises(PruneError, match=r"\['colour'\] have no examples"):
        subsets([{"id": "1", "task": "count"}], expected=["count", "colour"])


def test_random_same_counts_seeds_differ_same_seed_same():
    rng = np.random.default_rng(1)
    rows = _table(rng, n=90)
    for rho in (0.1, 0.5, 0.9):
        per = lambda ids: {s: sum(r["id"] in set(ids) and r["task"] == s for r in rows) for s in "ABC"}
        d, r0, r1 = select_deltaloss(rows, rho), select_random(rows, rho, 0), select_random(rows, rho, 1)
        assert per(d) == per(r0) == per(r1)
        assert r0 != r1 and r0 == select_random(rows, rho, 0)
        assert r0 == [r["id"] for r in rows if r["id"] in set(r0)]


def _blobs(seed=0):
    g = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [40.0, 0.0], [0.0, 40.0], [40.0, 40.0]])
    label = np.repeat([0, 1, 2, 3], [16, 8, 8, 4])[g.permutation(36)]
    X = centres[label] + g.normal(size=(36, 2))
    rows = [{"id": f"r{i:02d}", "task": "T"} for i in range(36)]
    return rows, X, label


def test_cluster_keeps_proportional_shares_nearest_first():
    rows, X, label = _blobs()
    kept = select_cluster(rows, X, 0.25, seed=0, k=4)  # keep 9 of 36: 16/8/8/4 -> 4/2/2/1
    pos = [int(i[1:]) for i in kept]
    assert np.bincount(label[pos], minlength=4).tolist() == [4, 2, 2, 1]
    for b, share in enumerate((4, 2, 2, 1)):
        m = np.flatnonzero(label == b)
        d = np.linalg.norm(X[m] - X[m].mean(0), axis=1)
        assert sorted(p for p in pos if label[p] == b) == sorted(m[np.argsort(d)[:share]].tolist())
    assert kept == select_cluster(rows, X, 0.25, seed=0, k=4)
    assert len(select_cluster(rows, X, 0.25)) == 9  # default k


def test_cluster_same_counts_as_the_others_per_subset():
    rows, X, _ = _blobs(1)
    for i, r in enumerate(rows):
        r["task"] = "AB"[i % 2]
    for rho in (0.1, 0.5, 1.0):
        c, r0 = select_cluster(rows, X, rho, seed=2), select_random(rows, rho, 0)
        assert [sum(r["id"] in set(ids) and r["task"] == t for r in rows) for t in "AB" for ids in (c,)] == \
               [sum(r["id"] in set(r0) and r["task"] == t for r in rows) for t in "AB"]


def test_cluster_bad_features():
    rows, X, _ = _blobs()
    with pytest.raises(PruneError, match=r"features must be \[N, C\]"):
        select_cluster(rows, X[:5], 0.5)
    X[3, 1] = np.nan
    with pytest.raises(PruneError, match="NaN or inf"):
        select_cluster(rows, X, 0.5)


def test_vision_features_is_the_mean_visual_token():
    import torch
    from nvila_lab.checkpoint import load_nvila
    from nvila_lab.data import row_media
    model = load_nvila(NANO)
    rows = load_dataset()[:3]
    F = vision_features(model, rows, batch_size=2)
    assert F.shape == (3, model.cfg.llm_hidden if hasattr(model.cfg, "llm_hidden") else F.shape[1]) and F.dtype == np.float64
    with torch.no_grad():
        toks, _ = model.encode_media([row_media(rows[2])])[0]
    want = torch.cat(toks.segments).mean(0).double().numpy()
    np.testing.assert_allclose(F[2], want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(F[0], F[1])


def test_kept_counts():
    rows = [{"id": "a", "task": "t", "kind": "easy"}, {"id": "b", "task": "t", "kind": "mislabelled"}]
    assert kept_counts(rows, ["b"]) == {"subsets": {"t": {"kept": 1, "total": 2}},
                                        "kinds": {"easy": {"kept": 0, "total": 1}, "mislabelled": {"kept": 1, "total": 1}},
                                        "kept": 1, "total": 2}


# ---------------------------------------------------------------- prune

@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_dataset(["colour", "count"], n=5, seed=4, out_dir=tmp_path_factory.mktemp("sel") / "set", progress=False)


def test_prune_random_folder_reads_back(tmp_path, src):
    from nvila_lab.data import VQAFolder
    res = prune(None, None, src, 0.4, method="random", seed=1, out=tmp_path / "o", progress=False)
    back = load_dataset(tmp_path / "o")
    assert [r["id"] for r in back] == res.kept_ids == select_random(load_dataset(src), 0.4, 1)
    assert len(VQAFolder(tmp_path / "o")) == 4  # ceil(0.4 * 5) = 2 per task
    assert res.counts["subsets"] == {"colour": {"kept": 2, "total": 5}, "count": {"kept": 2, "total": 5}}
    pj = json.loads((tmp_path / "o" / "prune.json").read_text())
    assert pj["method"] == "random" and pj["counts"] == res.counts and pj["fingerprints"]["data"]
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["source"] == str(Path(src).resolve()) and meta["method"] == "random"
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["data.jsonl", "images", "meta.json", "prune.json"]
    src_rows = {r["id"]: r for r in load_dataset(src)}
    for r in back:
        assert Path(r["image_path"]).read_bytes() == Path(src_rows[r["id"]]["image_path"]).read_bytes()
        assert {k: v for k, v in r.items() if k != "image_path"} == {k: v for k, v in src_rows[r["id"]].items() if k != "image_path"}
    assert "random" in repr(res) and "4/10 kept" in repr(res)


def test_prune_interrupted_is_not_a_dataset_and_resumes(tmp_path, src, monkeypatch):
    real = S._write_rows

    def dies(out, rows):
        real(out, rows[:1])
        raise KeyboardInterrupt
    monkeypatch.setattr(S, "_write_rows", dies)
    with pytest.raises(KeyboardInterrupt):
        prune(None, None, src, 0.5, method="random", seed=3, out=tmp_path / "o", progress=False)
    monkeypatch.setattr(S, "_write_rows", real)
    assert not (tmp_path / "o" / "data.jsonl").exists() and not (tmp_path / "o" / "prune.json").exists()
    with pytest.raises(Exception, match="no data.jsonl"):
        load_dataset(tmp_path / "o")
    with pytest.raises(PruneError, match="unfinished prune with other settings"):
        prune(None, None, src, 0.5, method="random", seed=4, out=tmp_path / "o", progress=False)
    res = prune(None, None, src, 0.5, method="random", seed=3, out=tmp_path / "o", progress=False)  # the same: resumes
    assert [r["id"] for r in load_dataset(tmp_path / "o")] == res.kept_ids == select_random(load_dataset(src), 0.5, 3)
    assert not (tmp_path / "o" / S._MARKER).exists()


@pytest.mark.parametrize("kw, needle", [
    (dict(keep=0), "keep must be in (0, 1]"), (dict(keep=1.01), "keep must be in (0, 1]"),
    (dict(method="kmeans"), "unknown method 'kmeans'"), (dict(method="deltaloss"), "needs both a large and a small"),
    (dict(method="cluster"), "needs a model for its vision features"),
    (dict(method="random", scores="x.parquet"), "scores= only applies"),
    (dict(method="deltaloss", score="max", large="a", small="b"), "unknown score 'max'"),
])
def test_prune_bad_input_writes_nothing(tmp_path, src, kw, needle):
    args = dict(large=None, small=None, data=src, keep=0.5, method="random", out=tmp_path / "o", progress=False) | kw
    with pytest.raises(PruneError) as e:
        prune(**args)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_prune_refuses_used_folders_and_empty_subsets(tmp_path, src):
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "x.txt").write_text("keep me")
    with pytest.raises(PruneError, match="is not empty"):
        prune(None, None, src, 0.5, method="random", out=tmp_path / "u")
    assert [p.name for p in (tmp_path / "u").iterdir()] == ["x.txt"]
    prune(None, None, src, 0.5, method="random", out=tmp_path / "done", progress=False)
    with pytest.raises(PruneError, match="already holds a dataset"):
        prune(None, None, src, 0.5, method="random", out=tmp_path / "done")
    (tmp_path / "file").write_text("")
    with pytest.raises(PruneError, match="is a file"):
        prune(None, None, src, 0.5, method="random", out=tmp_path / "file")
    import shutil
    shutil.copytree(src, tmp_path / "src2")
    meta = json.loads((tmp_path / "src2" / "meta.json").read_text())
    (tmp_path / "src2" / "meta.json").write_text(json.dumps(meta | {"tasks": meta["tasks"] + ["position"]}))
    with pytest.raises(PruneError, match=r"\['position'\] have no examples"):
        prune(None, None, tmp_path / "src2", 0.5, method="random", out=tmp_path / "o2")
    with pytest.raises(PruneError, match="no such folder"):
        prune(None, None, tmp_path / "nowhere", 0.5, method="random", out=tmp_path / "o3")


def test_methods():
    assert METHODS == ("deltaloss", "random", "cluster")


@pytest.fixture(scope="module")
def nano():
    from nvila_lab.checkpoint import load_nvila
    return load_nvila(NANO)


def test_prune_deltaloss_same_model_twice_is_all_ties_broken_by_id(tmp_path, src, nano):
    res = prune(nano, nano, src, 0.4, out=tmp_path / "d", progress=False, batch_size=4)
    from nvila_lab.prune.score import read_scores
    table = read_scores(tmp_path / "d" / "scores.parquet", data=src, large=nano, small=nano)
    assert all(r["delta_sum"] == 0.0 for r in table.rows)  # the same model: Delta is exactly 0
    rows = load_dataset(src)
    want = {i for t in ("colour", "count") for i in sorted(r["id"] for r in rows if r["task"] == t)[:2]}
    assert res.kept_ids == [r["id"] for r in rows if r["id"] in want]
    assert [r["id"] for r in load_dataset(tmp_path / "d")] == res.kept_ids
    pj = json.loads((tmp_path / "d" / "prune.json").read_text())
    assert pj["fingerprints"] == table.fingerprint and pj["score"] == "sum"
    # the scores file handed back in: the same selection, ranked by mean this time, without scoring again
    res2 = prune(nano, nano, src, 0.4, score="mean", scores=tmp_path / "d" / "scores.parquet", out=tmp_path / "m",
                 progress=False)
    assert res2.kept_ids == res.kept_ids and (tmp_path / "m" / "scores.parquet").is_file()
    # scores of another dataset are refused by fingerprint, and nothing looks finished
    other = make_dataset(["colour", "count"], n=5, seed=5, out_dir=tmp_path / "other", progress=False)
    with pytest.raises(PruneError, match="another data") as e:
        prune(nano, nano, other, 0.4, scores=tmp_path / "d" / "scores.parquet", out=tmp_path / "x", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "x" / "data.jsonl").exists()


def test_prune_deltaloss_refuses_scores_of_another_model_pair(tmp_path, src, nano):
    import copy
    import torch
    prune(nano, nano, src, 0.5, out=tmp_path / "d", progress=False)
    other = copy.deepcopy(nano)
    with torch.no_grad():
        next(other.llm.parameters()).add_(1.0)
    with pytest.raises(PruneError, match="another large"):
        prune(other, nano, src, 0.5, scores=tmp_path / "d" / "scores.parquet", out=tmp_path / "x", progress=False)


def test_prune_deltaloss_interrupted_after_scoring_resumes(tmp_path, src, nano, monkeypatch):
    monkeypatch.setattr(S, "_write_rows", lambda out, rows: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        prune(nano, nano, src, 0.5, out=tmp_path / "d", progress=False)
    assert (tmp_path / "d" / "scores.parquet").is_file() and not (tmp_path / "d" / "data.jsonl").exists()
    monkeypatch.undo()
    scored = []
    monkeypatch.setattr("nvila_lab.prune.score._score_batch", lambda *a: scored.append(a))
    res = prune(nano, nano, src, 0.5, out=tmp_path / "d", progress=False)
    assert scored == [] and res.counts["kept"] == 6  # nothing scored twice; ceil(0.5 * 5) = 3 per task


def test_prune_cluster_uses_the_large_models_features(tmp_path, src, nano):
    rows = load_dataset(src)
    res = prune(nano, None, src, 0.6, method="cluster", seed=1, out=tmp_path / "c", progress=False)
    assert res.kept_ids == select_cluster(rows, vision_features(nano, rows), 0.6, seed=1)
    assert res.counts["subsets"] == {"colour": {"kept": 3, "total": 5}, "count": {"kept": 3, "total": 5}}
    assert json.loads((tmp_path / "c" / "prune.json").read_text())["fingerprints"]["large"]
