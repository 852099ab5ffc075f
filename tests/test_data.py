"""The synthetic VQA data and the tiny tokenizer (nbs/09_data.ipynb): determinism, answer sets, dataset files, round trips."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from nvila_lab.config import get_config
from nvila_lab.data import (DEFAULT_TASKS, IMAGE_SIZE, SPECIAL_TOKENS, TASKS, DatasetError, SyntheticVQA, VQAFolder,
                            _font_sha, build_tokenizer, chat_messages, load_dataset, load_tokenizer,
                            make_dataset, make_sample, tokenizer_corpus)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


# ---------------------------------------------------------------- samples


@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_same_bytes(task):
    a, b = make_sample(task, seed=3, index=11), make_sample(task, seed=3, index=11)
    assert a["image"].size == IMAGE_SIZE and a["image"].mode == "RGB"
    assert a["image"].tobytes() == b["image"].tobytes()
    assert _png(a["image"]) == _png(b["image"])
    assert (a["id"], a["question"], a["answer"]) == (b["id"], b["question"], b["answer"])


@pytest.mark.parametrize("task", list(TASKS))
def test_different_seed_or_index_differs(task):
    base = make_sample(task, seed=0, index=0)["image"].tobytes()
    assert make_sample(task, seed=1, index=0)["image"].tobytes() != base
    assert make_sample(task, seed=0, index=1)["image"].tobytes() != base


def test_tasks_do_not_share_streams():
    "The same (seed, index) in two tasks uses two different generators."
    a, b = make_sample("colour", 0, 0), make_sample("position", 0, 0)
    assert a["image"].tobytes() != b["image"].tobytes()


@pytest.mark.parametrize("task", list(TASKS))
def test_answers_in_answer_set(task):
    t = TASKS[task]
    seen = set()
    for i in range(200):
        s = make_sample(task, seed=7, index=i)
        assert s["answer"] in t.answers, s
        assert s["question"] in t.questions, s
        seen.add(s["answer"])
    assert t.chance == pytest.approx(1 / len(t.answers))
    if len(t.answers) <= 10:  # 200 uniform draws hit every answer of a small set
        assert seen == set(t.answers)


def test_default_tasks_and_flags():
    assert set(DEFAULT_TASKS) <= set(TASKS)
    assert {n for n in DEFAULT_TASKS if TASKS[n].fine} == {"read_code", "count"}


def test_bad_inputs():
    with pytest.raises(DatasetError, match="did you mean 'colour'"):
        make_sample("color")
    with pytest.raises(DatasetError, match="non-negative"):
        make_sample("count", seed=-1)
    with pytest.raises(DatasetError, match="non-negative"):
        make_sample("count", index=1.5)


# ---------------------------------------------------------------- datasets on disk


def test_make_and_load_dataset(tmp_path):
    out = make_dataset(["count", "colour"], n=3, seed=4, out_dir=tmp_path / "ds", progress=False)
    rows = load_dataset(out)
    assert [r["task"] for r in rows] == ["count", "colour"] * 3
    for r in rows:
        assert {"id", "task", "image", "question", "answer", "image_path"} <= set(r)
        s = make_sample(r["task"], 4, r["index"])
        assert (r["id"], r["question"], r["answer"]) == (s["id"], s["question"], s["answer"])
        with Image.open(r["image_path"]) as im:
            assert np.asarray(im.convert("RGB")).tobytes() == s["image"].tobytes()
    # the on-the-fly dataset gives the same rows, in the same order
    syn = SyntheticVQA(["count", "colour"], n=3, seed=4)
    folder = VQAFolder(out)
    assert len(syn) == len(folder) == 6
    for i in range(6):
        assert syn[i]["id"] == folder[i]["id"]
        assert syn[i]["image"].tobytes() == folder[i]["image"].tobytes()
    assert len(VQAFolder(out, tasks=["colour"])) == 3


def test_overwrite_protection(tmp_path):
    out = make_dataset("colour", n=2, seed=0, out_dir=tmp_path, progress=False)
    before = (out / "data.jsonl").read_text()
    with pytest.raises(FileExistsError, match="not empty"):
        make_dataset("count", n=2, seed=0, out_dir=tmp_path, progress=False)
    assert (out / "data.jsonl").read_text() == before  # nothing was touched
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "images" / "mine.png").write_bytes(b"user file")
    make_dataset("count", n=1, seed=0, out_dir=tmp_path, progress=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # not written by make_dataset: kept
    assert (tmp_path / "images" / "mine.png").read_bytes() == b"user file"
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["count_0_00000.png", "mine.png"]
    assert [r["id"] for r in load_dataset(tmp_path)] == ["count_0_00000"]


def test_non_empty_user_folder_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("do not delete")
    with pytest.raises(FileExistsError):
        make_dataset(None, n=1, seed=0, out_dir=tmp_path, progress=False)
    assert (tmp_path / "precious.txt").exists() and not (tmp_path / "images").exists()


def test_load_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no data.jsonl"):
        load_dataset(tmp_path)
    out = make_dataset("position", n=2, seed=0, out_dir=tmp_path / "ds", progress=False)
    jl = out / "data.jsonl"
    good = jl.read_text()
    jl.write_text(good + "not json\n")
    with pytest.raises(DatasetError, match=r"data\.jsonl:3: not valid JSON"):
        load_dataset(out)
    row = json.loads(good.splitlines()[1])
    del row["question"]
    jl.write_text(good.splitlines()[0] + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DatasetError, match=r"data\.jsonl:2: missing .*'question'"):
        load_dataset(out)
    jl.write_text(good + good.splitlines()[0] + "\n")
    with pytest.raises(DatasetError, match=r":3: duplicate id"):
        load_dataset(out)
    jl.write_text(good)
    (out / "images" / "position_0_00000.png").unlink()
    with pytest.raises(DatasetError, match=r"data\.jsonl:1: image 'images/position_0_00000.png' not found"):
        load_dataset(out)
    jl.write_text("\n")
    with pytest.raises(DatasetError, match="no examples"):
        load_dataset(out)


def test_make_dataset_bad_args(tmp_path):
    with pytest.raises(DatasetError, match="positive integer"):
        make_dataset("count", n=0, seed=0, out_dir=tmp_path / "a", progress=False)
    with pytest.raises(DatasetError, match="repeats"):
        make_dataset(["count", "count"], n=1, seed=0, out_dir=tmp_path / "b", progress=False)
    with pytest.raises(DatasetError, match="unknown task"):
        make_dataset(["cont"], n=1, seed=0, out_dir=tmp_path / "c", progress=False)
    assert not any(tmp_path.iterdir())  # argument errors write nothing


# ---------------------------------------------------------------- the shipped sample


def test_shipped_sample_matches_regeneration(root):
    rows = load_dataset(root / "data_samples" / "vqa")
    assert len(rows) == 64 * len(DEFAULT_TASKS)
    assert {r["task"] for r in rows} == set(DEFAULT_TASKS)
    meta = json.loads((root / "data_samples" / "vqa" / "meta.json").read_text())
    same_font = meta["font_sha256"] == _font_sha()
    for r in rows[::29]:
        s = make_sample(r["task"], r["seed"], r["index"])
        assert (s["id"], s["question"], s["answer"]) == (r["id"], r["question"], r["answer"])
        with Image.open(r["image_path"]) as im:
            shipped = np.asarray(im.convert("RGB"))
        new = np.asarray(s["image"])
        assert shipped.shape == new.shape
        if same_font:
            assert shipped.tobytes() == new.tobytes(), r["id"]
        else:  # another font file (or Pillow's rasteriser) may move a few glyph pixels, nothing more
            assert (shipped != new).any(-1).mean() < 0.02, r["id"]
    size = sum(p.stat().st_size for p in (root / "data_samples" / "vqa").rglob("*") if p.is_file())
    assert size < 3 * 2 ** 20


def test_load_dataset_default_is_shipped_sample():
    assert len(load_dataset()) == 64 * len(DEFAULT_TASKS)


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_vocab_fits_tiny(tok):
    assert len(tok) <= get_config("tiny").vocab_size
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_round_trips(tok):
    for t in TASKS.values():
        for text in t.questions + t.answers:
            ids = tok.encode(text, add_special_tokens=False)
            assert tok.decode(ids) == text
            # every word is one token: as many ids as pre-tokenizer pieces
            assert len(ids) == len(tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)), text
    for text in tokenizer_corpus()[::17] + ["Ünïcode ½\tand  two  spaces\n\n", "x" * 50, " leading space"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_single_tokens(tok):
    for s in list(SPECIAL_TOKENS) + ["\n"] + [str(d) for d in range(10)]:
        ids = tok.encode(s, add_special_tokens=False)
        assert len(ids) == 1, (s, ids)
    ids = tok.encode("<image>\n<image>", add_special_tokens=False)
    assert ids[0] == ids[2] == tok.convert_tokens_to_ids("<image>") and len(ids) == 3
    assert tok.convert_ids_to_tokens(tok.encode("1234", add_special_tokens=False)) == ["1", "2", "3", "4"]
    for w in ("system", "user", "assistant"):
        assert len(tok.encode(w, add_special_tokens=False)) == 1


def test_chat_template(tok):
    prompt = tok.apply_chat_template(chat_messages("Count the dots."), tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n<image>"
                      "Count the dots.<|im_end|>\n<|im_start|>assistant\n")
    full = tok.apply_chat_template(chat_messages("Count the dots.", "4"), tokenize=False)
    assert full == prompt + "4<|im_end|>\n"  # VILA's Qwen2 training template: a newline after the last <|im_end|>


def test_chat_template_is_vilas_qwen2_template():
    """Rendered with jinja2 against the text of VILA's qwen2.jinja (NVlabs/VILA, written out here by hand):
    each message '<|im_start|>' + role + '\\n' + content + '<|im_end|>\\n'; a default system turn first."""
    import jinja2
    from nvila_lab.data import CHAT_TEMPLATE
    vila = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
            "{% endif %}{% for message in messages if message['content'] is not none %}"
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    env = jinja2.Environment()
    for msgs in (chat_messages("Q?", "A"), chat_messages("Q?")):
        for gen in (False, True):
            ours = env.from_string(CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=gen)
            assert ours == env.from_string(vila).render(messages=msgs, add_generation_prompt=gen)
    assert ours.endswith("<|im_start|>assistant\n")


def test_load_tokenizer_reads_transformers4_and_5_layouts(tok, tmp_path):
    """A transformers-4 folder (additional_special_tokens, AddedToken dicts, template in the config) and a
    transformers-5 one (extra_special_tokens list, chat_template.jinja beside) load to the same tokenizer."""
    import shutil
    from nvila_lab.data import CHAT_TEMPLATE, _OLD_CHAT_TEMPLATE, data_samples_dir
    src = data_samples_dir() / "tokenizer"
    v4 = tmp_path / "v4"
    v4.mkdir()
    shutil.copy(src / "tokenizer.json", v4)
    (v4 / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "<|im_end|>", "special": True}, "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<image>", "<vila/video>"], "chat_template": _OLD_CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}))
    a = load_tokenizer(v4)
    text = tokenizer_corpus()[5]
    assert a.encode(text) == tok.encode(text) and a.eos_token == "<|im_end|>" and a.pad_token == "<|endoftext|>"
    assert a.chat_template == tok.chat_template == CHAT_TEMPLATE  # the old template is brought up to date
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(src / "tokenizer.json", bad)
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_tokenizer(bad)


def test_unknown_task_uses_the_kits_message():
    from nvila_lab.config import did_you_mean
    from nvila_lab.data import get_task
    with pytest.raises(DatasetError) as e:
        get_task("cuont")
    assert str(e.value) == did_you_mean("task", "cuont", TASKS)


def test_public_drawing_api_makes_a_task():
    """A task registered with the public helpers only (no private names) works end to end."""
    from nvila_lab.data import COLOURS, draw_page, draw_shape, jitter, pick, register_task
    @register_task("_boxes", "one square", ["Is there a square?"], ["yes"])
    def make(rng, size=IMAGE_SIZE):
        img, d = draw_page(rng, size)
        draw_shape(d, 0, (10, 10, 40, 40), jitter(rng, COLOURS["red"]))
        return img, pick(rng, ("Is there a square?",)), "yes"
    try:
        s = make_sample("_boxes", seed=1, index=2)
        px = np.asarray(s["image"])[25, 25].astype(int)
        assert abs(px - np.array(COLOURS["red"])).max() <= 15 and s["answer"] == "yes"  # the square, jittered
        assert make_sample("_boxes", seed=1, index=2)["image"].tobytes() == s["image"].tobytes()
    finally:
        del TASKS["_boxes"]


def test_shipped_tokenizer_is_what_build_makes(tok):
    built = build_tokenizer()
    assert built.get_vocab() == tok.get_vocab()
    for text in tokenizer_corpus()[::23]:
        assert built.encode(text) == tok.encode(text)


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- kinds of examples, for pruning (issue 13)

MIX = "easy=0.3,informative=0.4,mislabelled=0.2,distracting=0.1"


def test_default_kinds_and_byte_identity():
    from nvila_lab.data import KINDS
    assert KINDS == ("easy", "informative", "mislabelled", "distracting")
    assert {t: TASKS[t].default_kind for t in DEFAULT_TASKS} == {
        "read_code": "informative", "count": "informative", "colour": "easy", "position": "easy"}
    for task in DEFAULT_TASKS:
        for i in range(3):
            a, b = make_sample(task, 2, i), make_sample(task, 2, i, kind=TASKS[task].default_kind)
            assert a["kind"] == b["kind"] == TASKS[task].default_kind and "true_answer" not in a
            assert a["image"].tobytes() == b["image"].tobytes() and a["answer"] == b["answer"]


def test_shipped_rows_carry_their_default_kind():
    rows = load_dataset()
    assert all(r["kind"] == TASKS[r["task"]].default_kind for r in rows)
    assert not any("true_answer" in r for r in rows)


@pytest.mark.parametrize("task", DEFAULT_TASKS)
@pytest.mark.parametrize("kind", ["mislabelled", "distracting"])
def test_wrong_kinds_keep_the_true_answer(task, kind):
    for i in range(12):
        s = make_sample(task, 0, i, kind=kind)
        assert s["kind"] == kind and s["answer"] in TASKS[task].answers
        assert s["true_answer"] != s["answer"]
        assert s["true_answer"] == make_sample(task, 0, i)["answer"]  # the default example's answer
        assert make_sample(task, 0, i, kind=kind)["image"].tobytes() == s["image"].tobytes()  # deterministic
    if kind == "mislabelled":  # the same picture as the default example, another label
        assert s["image"].tobytes() == make_sample(task, 0, i)["image"].tobytes()
    else:  # the decoy changes the picture
        assert s["image"].tobytes() != make_sample(task, 0, i)["image"].tobytes()


def test_easy_and_informative_differ_in_detail():
    def ink(img, thr):  # pixels darker than thr in every channel
        return int((np.asarray(img) < thr).all(-1).sum())
    for i in range(6):
        # read_code: the easy code's black ink is several times the informative one's
        assert ink(make_sample("read_code", 0, i, kind="easy")["image"], 20) > 4 * ink(make_sample("read_code", 0, i)["image"], 20)
        for task in ("colour", "position"):  # the informative shape is small
            a = np.asarray(make_sample(task, 0, i, kind="informative")["image"]).astype(int)
            assert ((a.max(-1) - a.min(-1)) > 60).sum() <= 121


def test_parse_mix_and_counts():
    from nvila_lab.data import assign_kinds, kind_counts, parse_mix
    assert parse_mix(MIX) == {"easy": 0.3, "informative": 0.4, "mislabelled": 0.2, "distracting": 0.1}
    assert kind_counts(MIX, 7) == {"easy": 2, "informative": 3, "mislabelled": 1, "distracting": 1}
    assert kind_counts("easy=0.29,informative=0.71", 100) == {"easy": 29, "informative": 71}
    for n in (1, 4, 9, 33):
        assert sum(kind_counts(MIX, n).values()) == n
    a = assign_kinds(MIX, 20, 1, "count")
    assert a == assign_kinds(MIX, 20, 1, "count") and a != assign_kinds(MIX, 20, 2, "count")
    assert sorted(a) == sorted(["easy"] * 6 + ["informative"] * 8 + ["mislabelled"] * 4 + ["distracting"] * 2)


@pytest.mark.parametrize("mix, message", [
    ("easy=0.5,informative=0.4", "sum to 0.9"), ("esay=1", "did you mean 'easy'"), ("easy=1,easy=0", "twice"),
    ("easy=-0.5,informative=1.5", ">= 0"), ("easy:1", "KIND=FRACTION"), ("easy=x", "not a number"), ({}, "empty"),
    ({"easy": True}, ">= 0"), (None, "text or a dict"),
])
def test_bad_mixes(mix, message):
    from nvila_lab.data import parse_mix
    with pytest.raises(DatasetError, match=message):
        parse_mix(mix)
    assert "\n" not in message


def test_make_dataset_with_a_mix(tmp_path):
    from nvila_lab.data import KINDS, row_subset
    out = make_dataset(["read_code", "position"], 10, 4, tmp_path / "a", progress=False, mix=MIX)
    rows = load_dataset(out)
    for task in ("read_code", "position"):
        assert [sum(r["kind"] == k for r in rows if row_subset(r) == task) for k in KINDS] == [3, 4, 2, 1]
    for r in rows:
        s = make_sample(r["task"], 4, r["index"], kind=r["kind"])
        assert (r["answer"], r.get("true_answer")) == (s["answer"], s.get("true_answer"))
        with Image.open(r["image_path"]) as im:
            assert np.asarray(im.convert("RGB")).tobytes() == s["image"].tobytes()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["mix"] == {"easy": 0.3, "informative": 0.4, "mislabelled": 0.2, "distracting": 0.1}
    again = make_dataset(["read_code", "position"], 10, 4, tmp_path / "b", progress=False, mix=MIX)
    assert (again / "data.jsonl").read_text() == (out / "data.jsonl").read_text()


def test_custom_task_kinds(tmp_path):
    from nvila_lab.data import draw_page, register_kind, register_task
    @register_task("_yesno", "a page", ["Is it there?"], ["yes", "no"])
    def make(rng, size=IMAGE_SIZE):
        return draw_page(rng, size)[0], "Is it there?", "yes"
    try:
        assert TASKS["_yesno"].default_kind == "easy"
        s = make_sample("_yesno", 0, 0, kind="mislabelled")  # generic: another answer of the task
        assert (s["answer"], s["true_answer"]) == ("no", "yes")
        with pytest.raises(DatasetError, match="cannot draw 'distracting' examples .*register_kind"):
            make_sample("_yesno", kind="distracting")
        with pytest.raises(DatasetError, match="cannot draw 'informative'"):
            make_dataset("_yesno", 4, 0, tmp_path / "x", progress=False, mix="easy=0.5,informative=0.5")
        assert not (tmp_path / "x").exists()
        make_dataset("_yesno", 4, 0, tmp_path / "y", progress=False, mix="easy=0.5,mislabelled=0.5")

        @register_kind("_yesno", "distracting")
        def bad(rng, size=IMAGE_SIZE):  # a distracting make whose label is the true answer breaks the contract
            return draw_page(rng, size)[0], "Is it there?", "yes", "yes"
        with pytest.raises(DatasetError, match="must differ"):
            make_sample("_yesno", kind="distracting")
    finally:
        del TASKS["_yesno"]


def test_load_dataset_checks_kind_and_subset(tmp_path):
    from nvila_lab.data import row_subset
    out = make_dataset("count", n=2, seed=0, out_dir=tmp_path / "ds", progress=False)
    jl = out / "data.jsonl"
    rows = [json.loads(l) for l in jl.read_text().splitlines()]
    for field, value, message in (("kind", "noisy", "unknown example kind 'noisy'"), ("kind", 3, "unknown example kind"),
                                  ("subset", "", "'subset' must be a non-empty string"),
                                  ("subset", 7, "'subset' must be a non-empty string"),
                                  ("true_answer", None, "'true_answer' must be")):
        jl.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], field: value}) + "\n")
        with pytest.raises(DatasetError, match=r"data\.jsonl:2: .*" + message):
            load_dataset(out)
    old = {k: v for k, v in rows[1].items() if k != "kind"}  # an older dataset without kinds stays valid
    jl.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**old, "subset": "docs"}) + "\n")
    got = load_dataset(out)
    assert "kind" not in got[1] and [row_subset(r) for r in got] == ["count", "docs"]
