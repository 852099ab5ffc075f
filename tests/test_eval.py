"""`nvila_lab.evaluate`: the answer normalisation, scoring with fake models (oracle, constant, guesser), per-task
counts, the JSON shape of a report, and batched generation agreeing with `NVILAModel.generate`."""
from __future__ import annotations

import json
import math

import pytest

from nvila_lab.data import TASKS, SyntheticVQA, load_dataset, make_dataset
from nvila_lab.evaluate import EvalReport, TaskScore, evaluate, normalize_answer


# ---------------------------------------------------------------- normalisation

@pytest.mark.parametrize("raw, norm", [
    ("Top Left", "top left"),
    ("  top   left.\n", "top left"),
    ("top-left", "top left"),
    ("TOP_LEFT", "top left"),
    ("RED!", "red"),
    ('"4"', "4"),
    ("(3)", "3"),
    ("４", "4"),          # full-width digit: NFKC
    ("０７", "07"),
    ("07", "07"),         # leading zeros are kept
    ("Straße", "strasse"),  # casefold
    ("tab\tand\nnewline", "tab and newline"),
    ("", ""),
    ("...", ""),
])
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


def test_normalize_keeps_what_matters():
    assert normalize_answer("07") != normalize_answer("7")
    assert normalize_answer("four") != normalize_answer("4")  # no number words
    assert normalize_answer("top left") != normalize_answer("topleft")


def test_normalize_is_idempotent_and_fixes_every_reference():
    for t in TASKS.values():
        for a in t.answers:
            assert normalize_answer(a) == a
    for s in ["  A-b,  C.", "Ünï ½", "x\u00a0y"]:
        assert normalize_answer(normalize_answer(s)) == normalize_answer(s)


def test_normalize_rejects_non_text():
    with pytest.raises(TypeError, match="must be text"):
        normalize_answer(None)
    with pytest.raises(TypeError):
        normalize_answer(4)


# ---------------------------------------------------------------- fakes

class Oracle:
    "Knows every answer (by image path), and says it in capitals with a full stop."
    def __init__(self, rows):
        self.answers = {r["image_path"]: r["answer"] for r in rows}

    def generate(self, image, question, max_new_tokens=16, do_sample=False, **kw):
        return self.answers[image].upper() + "."


class Constant:
    "Always the same answer; records how it was called."
    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def generate(self, image, question, max_new_tokens=16, do_sample=False, **kw):
        self.calls.append({"image": image, "max_new_tokens": max_new_tokens, "do_sample": do_sample})
        return self.answer


@pytest.fixture(scope="module")
def sample():
    return load_dataset()  # data_samples/vqa: 64 examples of each of 4 tasks


def test_oracle_scores_100(sample):
    rep = evaluate(Oracle(sample), sample, progress=False)
    assert (rep.n, rep.correct, rep.accuracy, rep.macro_accuracy) == (256, 256, 1.0, 1.0)
    assert rep.errors == []
    assert {t: (s.n, s.correct, s.in_set) for t, s in rep.tasks.items()} == \
        {t: (64, 64, 64) for t in ("read_code", "count", "colour", "position")}
    assert list(rep.tasks) == ["read_code", "count", "colour", "position"]  # order of first appearance


def test_constant_scores_its_share(sample):
    m = Constant("3")
    rep = evaluate(m, sample, progress=False, max_new_tokens=4)
    expected = {t: sum(r["task"] == t and r["answer"] == "3" for r in sample) for t in rep.tasks}
    assert {t: s.correct for t, s in rep.tasks.items()} == expected
    assert expected["count"] > 0
    assert rep.correct == sum(expected.values())
    assert math.isclose(rep.accuracy, rep.correct / 256)
    assert {t: s.in_set for t, s in rep.tasks.items()} == {"read_code": 0, "count": 64, "colour": 0, "position": 0}
    # greedy, the requested budget, and the absolute image path of a load_dataset row
    assert {(c["max_new_tokens"], c["do_sample"]) for c in m.calls} == {(4, False)}
    assert m.calls[0]["image"] == sample[0]["image_path"]


def test_chance_levels(sample):
    rep = evaluate(Constant("x"), sample, progress=False)
    for name, s in rep.tasks.items():
        assert s.chance == pytest.approx(1 / len(TASKS[name].answers))
    assert rep.chance == pytest.approx(sum(1 / len(TASKS[t].answers) for t in rep.tasks) / 4)


def test_guesser_lands_on_chance():
    import numpy as np

    class Guesser:
        def __init__(self):
            self.rng = np.random.default_rng(0)
            self.by_question = {q: t.answers for n, t in TASKS.items() if n != "read_code" for q in t.questions}

        def generate(self, image, question, **kw):
            a = self.by_question[question]
            return a[int(self.rng.integers(len(a)))]

    rep = evaluate(Guesser(), SyntheticVQA(["count", "colour", "position"], n=600, seed=11), progress=False)
    for s in rep.tasks.values():
        assert abs(s.accuracy - s.chance) < 4 * math.sqrt(s.chance * (1 - s.chance) / s.n)
        assert s.in_set == s.n


def test_errors_are_few_and_round_robin(sample):
    rep = evaluate(Constant("nope"), sample, progress=False, n_errors=6)
    assert [e["task"] for e in rep.errors] == ["read_code", "count", "colour", "position", "read_code", "count"]
    assert set(rep.errors[0]) == {"id", "task", "question", "answer", "prediction"}
    assert rep.errors[0]["id"] == sample[0]["id"] and rep.errors[0]["prediction"] == "nope"
    assert len(rep.predictions) == 256 and not any(p["correct"] for p in rep.predictions)
    assert evaluate(Constant("nope"), sample, progress=False, n_errors=0).errors == []


def test_limit_and_folder(tmp_path):
    folder = make_dataset(["count", "colour"], n=5, seed=3, out_dir=tmp_path / "set", progress=False)
    rep = evaluate(Constant("2"), folder, progress=False)  # a folder is read with load_dataset
    assert rep.n == 10 and {t: s.n for t, s in rep.tasks.items()} == {"count": 5, "colour": 5}
    rep = evaluate(Constant("2"), str(folder), progress=False, limit=3)
    assert rep.n == 3 and {t: s.n for t, s in rep.tasks.items()} == {"count": 2, "colour": 1}
    assert evaluate(Constant("2"), folder, progress=False, limit=1000).n == 10


def test_synthetic_rows_pass_pil_images():
    seen = []

    class Looker(Constant):
        def generate(self, image, question, **kw):
            seen.append(image)
            return "red"

    data = SyntheticVQA(["colour"], n=4, seed=0)
    rep = evaluate(Looker("red"), data, progress=False)
    assert rep.n == 4 and all(hasattr(im, "size") for im in seen)  # PIL images, not paths
    assert rep.tasks["colour"].correct == sum(data[i]["answer"] == "red" for i in range(4))


def test_unknown_task_has_no_chance():
    rows = [{"task": "mine", "question": "q?", "answer": "Yes", "image": "a.png"},
            {"task": "mine", "question": "q?", "answer": "no", "image": "b.png"}]
    rep = evaluate(Constant("yes!"), rows, progress=False)
    s = rep.tasks["mine"]
    assert (s.n, s.correct, s.chance, s.in_set, s.in_set_rate) == (2, 1, None, None, None)
    assert rep.chance is None and rep.in_set_rate is None
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["tasks"]["mine"]["chance"] is None and d["chance"] is None
    assert rep.predictions[0]["id"] == "0"  # rows without an id get their index


@pytest.mark.parametrize("data, kwargs, error, match", [
    ([], {}, ValueError, "no examples"),
    ([{"question": "q", "answer": "a", "image": "i"}], {}, ValueError, r"missing or non-string \['task'\]"),
    ([{"question": "q", "answer": "a", "task": "t"}], {}, ValueError, "image or image_path"),
    ([{"question": "q", "answer": 3, "task": "t", "image": "i"}], {}, ValueError, "answer"),
    (["not a dict"], {}, ValueError, "expected a dict"),
    ([{"question": "q", "answer": "a", "task": "t", "image": "i"}], {"batch_size": 0}, ValueError, "batch_size"),
    ([{"question": "q", "answer": "a", "task": "t", "image": "i"}], {"max_new_tokens": 0}, ValueError, "max_new_tokens"),
    ([{"question": "q", "answer": "a", "task": "t", "image": "i"}], {"limit": 0}, ValueError, "limit"),
    ("no/such/folder", {}, ValueError, "no such folder"),
])
def test_bad_input(data, kwargs, error, match):
    with pytest.raises(error, match=match):
        evaluate(Constant("a"), data, progress=False, **kwargs)


def test_bad_model():
    rows = [{"question": "q", "answer": "a", "task": "t", "image": "i"}]
    with pytest.raises(TypeError, match="no .generate"):
        evaluate(object(), rows, progress=False)
    with pytest.raises(TypeError, match="returned NoneType"):
        evaluate(Constant(None), rows, progress=False)


def test_training_mode_is_restored():
    class Trainable(Constant):
        training = True

        def eval(self):
            self.training = False
            self.mode_during = "eval"
            return self

        def train(self, mode=True):
            self.training = mode
            return self

    m = Trainable("a")
    evaluate(m, [{"question": "q", "answer": "a", "task": "t", "image": "i"}], progress=False)
    assert m.mode_during == "eval" and m.training is True


# ---------------------------------------------------------------- the report

def test_report_json_shape(sample):
    rep = evaluate(Constant("1"), sample, progress=False)
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert set(d) == {"n", "correct", "accuracy", "macro_accuracy", "chance", "in_set_rate", "tasks", "errors",
                      "seconds", "examples_per_second", "decoding", "max_new_tokens"}
    assert (d["n"], d["decoding"], d["max_new_tokens"]) == (256, "greedy", 8)
    assert list(d["tasks"]) == ["read_code", "count", "colour", "position"]
    for t in d["tasks"].values():
        assert set(t) == {"n", "correct", "accuracy", "chance", "in_set", "in_set_rate"}
        assert t["n"] == 64 and 0 <= t["accuracy"] <= 1 and 0 < t["chance"] < 1
    assert sum(t["correct"] for t in d["tasks"].values()) == d["correct"]
    assert len(d["errors"]) == 5
    with_preds = rep.to_dict(predictions=True)
    assert len(with_preds["predictions"]) == 256
    assert set(with_preds["predictions"][0]) == {"id", "task", "answer", "prediction", "correct"}


def test_report_text_and_html():
    rep = EvalReport({"count": TaskScore("count", n=10, correct=3, in_set=9, chance=0.2),
                      "colour": TaskScore("colour", n=30, correct=30, in_set=30, chance=1 / 6)}, seconds=2.0,
                     errors=[{"id": "c1", "task": "count", "question": "How <many>?", "answer": "4",
                              "prediction": "5 & <b>"}])
    assert (rep.n, rep.correct, rep.accuracy, rep.macro_accuracy) == (40, 33, 33 / 40, 0.65)
    text = str(rep)
    lines = text.splitlines()
    assert lines[0].split() == ["task", "n", "correct", "accuracy", "chance", "in", "answer", "set"]
    assert lines[2].split() == ["count", "10", "3", "30.0%", "20.0%", "90.0%"]
    assert lines[5].split() == ["overall", "40", "33", "82.5%", "17.5%", "97.5%"]
    assert "macro accuracy (mean over 2 tasks): 65.0%" in text and "(20.0/s)" in text
    assert "c1 [count] 'How <many>?' -> '5 & <b>' (expected '4')" in text
    page = rep._repr_html_()
    assert "<table>" in page and "5 &amp; &lt;b&gt;" in page and "5 & <b>" not in page  # escaped
    assert repr(rep) == "EvalReport(40 examples, 2 tasks, accuracy 82.5%, chance 17.5%)"


# ---------------------------------------------------------------- with the real tiny model

@pytest.fixture(scope="module")
def chaotic():
    """A random tiny NVILA whose LLM weight matrices are scaled up 10x: its answers are gibberish that changes with
    every prompt (an untrained model at the usual scale repeats one token whatever it is shown), so two decoders
    that disagree anywhere show it. The vocabulary is cut to the tokenizer's so that every id decodes to text."""
    import torch
    from nvila_lab.config import get_config
    from nvila_lab.data import load_tokenizer
    from nvila_lab.model import NVILAModel
    tok = load_tokenizer()
    torch.manual_seed(0)
    model = NVILAModel(get_config("tiny", vocab_size=len(tok)), tok).eval()
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.ndim == 2:
                p.mul_(10)
    return model


def test_batched_generation_matches_generate(chaotic, sample):
    rows = sample[:11]
    one = [chaotic.generate(r["image_path"], r["question"], max_new_tokens=6) for r in rows]
    assert len(set(one)) > 5, one  # really different answers
    rep = evaluate(chaotic, rows, batch_size=4, max_new_tokens=6, progress=False)  # batches of 4, 4, 3
    assert [p["prediction"] for p in rep.predictions] == one
    rep1 = evaluate(chaotic, rows, batch_size=1, max_new_tokens=6, progress=False)
    assert rep1.to_dict()["tasks"] == rep.to_dict()["tasks"]


def test_untrained_tiny_model_is_not_above_chance(sample):
    from nvila_lab.data import load_tokenizer
    from nvila_lab.model import NVILAModel
    model = NVILAModel("tiny", load_tokenizer())
    model.train()
    rep = evaluate(model, sample, limit=8, progress=False)
    assert rep.n == 8
    assert rep.accuracy <= rep.chance  # above chance, untrained, would mean the answers leak into the input
    assert model.training  # put back as it was


def test_evaluation_does_not_import_training():
    "Scoring needs no optimizer: nvila_lab.evaluate imports neither nvila_lab.train nor nvila_lab.experiment."
    import subprocess
    import sys
    code = ("import sys, nvila_lab.evaluate\n"
            "print(sorted(m for m in sys.modules if m in ('nvila_lab.train', 'nvila_lab.experiment', 'accelerate')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    import nvila_lab.evaluate as ev
    assert not hasattr(ev, "run_setting")  # it moved to nvila_lab.experiment


def test_run_setting_reproduces_its_loss_from_the_same_start():
    "Two runs from the same weights give the same loss; other weights give another (accuracies are 0 and cannot tell)."
    import torch
    from nvila_lab.config import get_config
    from nvila_lab.data import load_tokenizer
    from nvila_lab.experiment import run_setting
    from nvila_lab.model import NVILAModel
    from nvila_lab.train import TrainConfig
    tok = load_tokenizer()
    cfg = get_config("tiny", vocab_size=len(tok))
    data, held = SyntheticVQA(["colour"], n=4, seed=3, size=(64, 64)), SyntheticVQA(["colour"], n=1, seed=4)
    sched = [TrainConfig(steps=2, batch_size=2, log_every=1)]
    a = run_setting("a", cfg, tok, data, held, sched, seed=5)
    torch.manual_seed(5)
    b = run_setting("b", cfg, tok, data, held, sched, init=NVILAModel(cfg, tok).state_dict())
    torch.manual_seed(6)
    c = run_setting("c", cfg, tok, data, held, sched, init=NVILAModel(cfg, tok).state_dict())
    assert a["stage_losses"][0] > 0 and a["stage_losses"] == b["stage_losses"]
    assert c["stage_losses"] != a["stage_losses"]
    tl = run_setting("tl", cfg.replace(projector="tokenlearner", projector_kwargs={"n_tokens": 3}), tok, data, held,
                     [TrainConfig(steps=1, batch_size=2)])
    assert tl["visual_tokens"] == 12 * 3  # Dynamic-S2: 12 tiles at the largest scale (192 px), 3 learned tokens each
