"""Headless tests of the prune browser (nvila_lab.dash_prune): build it on a tiny dataset with hand-written scores,
change the controls, and compare what is shown with lists sorted and filtered by hand.

Outside a kernel, ipywidgets 8 runs observers synchronously when a `.value` is set, so each check reads the new
state on the next line. `tiny_set` is shared with tests/test_browser_prune.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("ipywidgets")

from nvila_lab.dash import PNG_MAGIC  # noqa: E402
from nvila_lab.dash_prune import PruneBrowser, browse_rows, kind_counts, sort_rows  # noqa: E402
from nvila_lab.prune.score import PruneError  # noqa: E402
from nvila_lab.data import data_samples_dir  # noqa: E402

# id suffix -> (kind, delta_sum, n_tokens, loss_large); two examples of each of the four shipped tasks.
# delta_sum ties on purpose (count_0 / colour_1 at -1.0) to check the stated tie rule (dataset order).
TINY = {"read_code_0_00000": ("informative", 2.5, 3, 0.4), "count_0_00000": ("informative", -1.0, 2, 0.9),
        "colour_0_00000": ("easy", 0.2, 2, 0.1), "position_0_00000": ("easy", 0.1, 1, 0.2),
        "read_code_0_00001": ("mislabelled", -3.0, 3, 2.5), "count_0_00001": ("distracting", -0.5, 2, 1.4),
        "colour_0_00001": ("mislabelled", -1.0, 4, 1.9), "position_0_00001": ("distracting", 0.6, 1, 0.7)}
TRUE_ANSWER = {"read_code_0_00001": "41", "colour_0_00001": "red"}


def tiny_set(folder: Path) -> tuple[Path, list[dict]]:
    "A dataset folder of the 8 TINY examples (copied from data_samples/vqa, with kinds) and their score rows."
    src = data_samples_dir() / "vqa"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines, rows = [], []
    for line in (src / "data.jsonl").read_text().splitlines():
        d = json.loads(line)
        if d["id"] not in TINY:
            continue
        kind, ds, n, ll = TINY[d["id"]]
        shutil.copy(src / d["image"], folder / d["image"])
        d["kind"] = kind
        if d["id"] in TRUE_ANSWER:
            d["true_answer"] = TRUE_ANSWER[d["id"]]
        lines.append(json.dumps(d))
        lp_l = -ll * n
        rows.append({"id": d["id"], "task": d["task"], "subset": d["task"], "kind": kind, "n_tokens": n,
                     "logp_large": lp_l, "logp_small": lp_l - ds, "delta_sum": ds, "delta_mean": ds / n,
                     "loss_large": ll, "loss_small": (ds - lp_l) / n})
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "meta.json").write_text(json.dumps({"tasks": ["read_code", "count", "colour", "position"]}))
    assert len(rows) == len(TINY)
    return folder, rows


@pytest.fixture
def tiny(tmp_path):
    folder, rows = tiny_set(tmp_path / "data")
    return folder, SimpleNamespace(rows=rows)


KEPT = ["read_code_0_00000", "colour_0_00000", "position_0_00001", "count_0_00001"]


@pytest.fixture
def browser(tiny):
    folder, scores = tiny
    b = PruneBrowser(scores, folder, kept_ids=KEPT, per_page=3)
    yield b
    b.close()


def _by_hand(score: str, descending: bool, kinds=None) -> list[str]:
    order = list(TINY)  # dataset order (data_samples/vqa interleaves the tasks)
    val = {k: (v[1] if score == "delta_sum" else v[1] / v[2]) for k, v in TINY.items()}
    ids = [i for i in order if kinds is None or TINY[i][0] in kinds]
    # stable sort by hand: the score, then the position in the dataset (both directions)
    return sorted(ids, key=lambda i: ((-val[i] if descending else val[i]), order.index(i)))


def test_default_is_ascending_delta_sum_with_ties_in_dataset_order(browser):
    want = _by_hand("delta_sum", False)
    assert want[:4] == ["read_code_0_00001", "count_0_00000", "colour_0_00001", "count_0_00001"]  # the tie, in order
    assert [r["id"] for r in browser.ordered] == want
    assert browser.shown_ids == want[:3] and (browser.page, browser.pages) == (0, 3)


@pytest.mark.parametrize("score", ["delta_sum", "delta_mean"])
@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_sort_matches_a_hand_sorted_list(browser, score, order):
    browser.score.value, browser.order.value = score, order
    assert [r["id"] for r in browser.ordered] == _by_hand(score, order == "descending")


def test_mean_and_sum_orders_differ():
    assert _by_hand("delta_sum", False) != _by_hand("delta_mean", False)  # else the switch test proves nothing


def test_kind_and_subset_filters(browser):
    browser.kind.value = "mislabelled"
    assert browser.shown_ids == ["read_code_0_00001", "colour_0_00001"]
    assert browser.counts == {"mislabelled": {"kept": 0, "total": 2}}
    browser.kind.value = "all"
    browser.subset.value = "count"
    assert browser.shown_ids == ["count_0_00000", "count_0_00001"]
    assert browser.counts == {"informative": {"kept": 0, "total": 1}, "distracting": {"kept": 1, "total": 1}}
    browser.filter(subset="all", kind="distracting")
    assert (browser.subset.value, browser.kind.value) == ("all", "distracting")
    assert browser.shown_ids == ["count_0_00001", "position_0_00001"]
    assert "nvl-prune-summary" in browser.summary.value and ">2<" in browser.summary.value


def test_counts_strip_over_the_whole_filter(browser):
    want = {k: {"kept": sum(TINY[i][0] == k and i in KEPT for i in TINY), "total": sum(v[0] == k for v in TINY.values())}
            for k in ("easy", "informative", "mislabelled", "distracting")}
    assert browser.counts == want  # all 8 rows, not the 3 on the page
    assert list(browser.counts) == ["easy", "informative", "mislabelled", "distracting"]


def test_paging_and_cards(browser):
    want = _by_hand("delta_sum", False)
    browser.next_button.click()
    assert browser.page == 1 and browser.shown_ids == want[3:6]
    browser.next_button.click()
    assert browser.shown_ids == want[6:] and browser.next_button.disabled
    boxes = [b for b in browser._boxes if b.layout.display != "none"]
    assert len(boxes) == 2  # the last page has two cards; the third is hidden
    browser.prev_button.click()
    assert browser.page == 1
    browser.kind.value = "easy"
    assert browser.page == 0  # a new filter starts at page 1
    for (img, text), r in zip(browser._cards, browser.shown):
        assert bytes(img.value).startswith(PNG_MAGIC)
        assert f"data-id='{r['id']}'" in text.value and r["question"] in text.value
        assert (">kept<" in text.value) == (r["id"] in KEPT) and (">pruned<" in text.value) == (r["id"] not in KEPT)
        assert f"{r['loss_large']:.3f}" in text.value and f"{r['loss_small']:.3f}" in text.value


def test_true_answer_of_mislabelled_rows(browser):
    browser.kind.value = "mislabelled"
    html0 = browser._cards[0][1].value
    assert "read_code_0_00001" in html0 and "true: <span class='nvl-prune-true'>41</span>" in html0
    rows = {r["id"]: r for r in browser.rows}
    assert rows["colour_0_00001"]["true_answer"] == "red" and rows["colour_0_00000"]["true_answer"] is None


def test_kept_from_a_pruned_folder_or_none(tiny, tmp_path):
    folder, scores = tiny
    pruned = tmp_path / "pruned"
    (pruned / "images").mkdir(parents=True)
    lines = [ln for ln in (folder / "data.jsonl").read_text().splitlines() if json.loads(ln)["id"] in KEPT]
    for ln in lines:
        shutil.copy(folder / json.loads(ln)["image"], pruned / json.loads(ln)["image"])
    (pruned / "data.jsonl").write_text("\n".join(lines) + "\n")
    rows = browse_rows(scores, folder, kept_ids=pruned)
    assert {r["id"] for r in rows if r["kept"]} == set(KEPT)
    b = PruneBrowser(scores, folder)
    try:
        assert all(r["kept"] is None for r in b.rows)
        assert ">kept<" not in b._cards[0][1].value and ">pruned<" not in b._cards[0][1].value
        assert b.counts["easy"] == {"kept": None, "total": 2}
        assert "kept ids not given" in repr(b)
    finally:
        b.close()


def test_repr(browser):
    browser.kind.value = "mislabelled"
    r = repr(browser)
    assert "PruneBrowser(8 examples" in r and "4 kept" in r and "kind=mislabelled: 2 rows" in r
    assert "delta_sum ascending, page 1/1" in r


def test_bad_input(tiny, tmp_path):
    folder, scores = tiny
    with pytest.raises(PruneError, match="unknown kind 'mislabeled'; did you mean 'mislabelled'"):
        PruneBrowser(scores, folder, kind="mislabeled")
    with pytest.raises(PruneError, match="did you mean 'colour'"):
        PruneBrowser(scores, folder, subset="color")
    with pytest.raises(PruneError, match="did you mean 'delta_mean'"):
        PruneBrowser(scores, folder, score="delta_man")
    with pytest.raises(PruneError, match="unknown order"):
        PruneBrowser(scores, folder, order="up")
    with pytest.raises(PruneError, match="per_page"):
        PruneBrowser(scores, folder, per_page=0)
    with pytest.raises(PruneError, match="not in the score table"):
        PruneBrowser(scores, folder, kept_ids=["read_code_0_00000", "nope"])
    other = SimpleNamespace(rows=scores.rows + [{**scores.rows[0], "id": "elsewhere_1"}])
    with pytest.raises(PruneError, match="not in .* another dataset"):
        PruneBrowser(other, folder)
    with pytest.raises(PruneError, match=r"lack column\(s\) \['delta_mean'\]"):
        PruneBrowser([{k: v for k, v in r.items() if k != "delta_mean"} for r in scores.rows], folder)
    with pytest.raises(PruneError, match="no rows"):
        PruneBrowser(SimpleNamespace(rows=[]), folder)
    b = PruneBrowser(scores, folder)
    try:
        with pytest.raises(PruneError, match="did you mean 'easy'"):
            b.filter(kind="eazy")
        assert b.kind.value == "all"  # a refused name changes nothing
        with pytest.raises(PruneError, match="did you mean 'descending'"):
            b.sort(order="descendin")
    finally:
        b.close()


def test_nan_scores_sort_last():
    rows = [{"id": "a", "delta_sum": float("nan")}, {"id": "b", "delta_sum": 1.0}, {"id": "c", "delta_sum": -1.0}]
    assert [r["id"] for r in sort_rows(rows)] == ["c", "b", "a"]
    assert [r["id"] for r in sort_rows(rows, order="descending")] == ["b", "c", "a"]
    assert kind_counts([]) == {}


def test_chart_and_static_copy(browser):
    png = bytes(browser.chart.value)
    assert png.startswith(PNG_MAGIC)
    browser.kind.value = "mislabelled"
    assert bytes(browser.chart.value).startswith(PNG_MAGIC) and bytes(browser.chart.value) != png  # redrawn
    labels = [t.get_text() for t in browser._ax.get_yticklabels()]
    assert labels == ["mislabelled"]  # one row of dots per kind in the filter
    dots = browser._ax.collections[0].get_offsets()
    assert sorted(float(x) for x, _ in dots) == sorted(TINY[i][1] for i in TINY if TINY[i][0] == "mislabelled")
    data = browser._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in data
    static = data["text/html"]
    assert "static copy" in static and all(f"data-id='{i}'" in static for i in browser.shown_ids)
    assert "data-id='colour_0_00000'" not in static  # an easy example: not on this page


def test_show_displays_the_browser(browser, monkeypatch):
    import IPython.display
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    assert browser.show() is browser and shown == [browser]
