"""The `nvila-lab` command line, run as a real process (`python -m nvila_lab.cli`, the same `main` as the console script).

Worked values of the paper with `--json`, every bad input of the issue (status 2, one line on stderr naming the
problem, never a traceback), the human table, and the promise that the command stays free of `transformers`.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from nvila_lab import __version__
from nvila_lab.config import list_presets

CMD = [sys.executable, "-m", "nvila_lab.cli"]

PLUGIN = """
from torch import nn
from nvila_lab.compress import TokenCompressor, register_compressor


@register_compressor("my_pool")
class MyPool(TokenCompressor):
    "k x k average pooling of each tile, then a linear map."
    def __init__(self, in_dim, out_dim, k: int = 2, bias: bool = True):
        super().__init__(in_dim, out_dim)
        self.k = k
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def output_grid(self, h, w):
        return (h // self.k, w // self.k)

    def forward(self, x, **kw):  # [N, h, w, C] -> [N, (h/k)(w/k), D]
        x = nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), self.k).permute(0, 2, 3, 1)
        return self.proj(x.flatten(1, 2))
"""


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    "Run `nvila-lab ARGS` in a fresh interpreter; stdout and stderr as text."
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=timeout)


def budget_json(*args: str) -> list[dict]:
    r = cli("budget", *args, "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr
    out = json.loads(r.stdout)
    assert isinstance(out, list), "--json always prints a list"
    return out


# ---------------------------------------------------------------- worked values

def test_nvila_8b_1344x896():
    [b] = budget_json("1344x896", "--preset", "nvila-8b")
    assert b["grid"] == [4, 3]
    assert b["vit_passes"] == 17
    assert b["tiles"] == 12
    assert b["visual_tokens"] == 3072
    assert b["llm_positions"] == 3073  # one separator after the single Dynamic-S2 segment
    assert b["preset"] == "nvila-8b" and b["input"] == "1344x896"


def test_nvila_8b_448x448():
    [b] = budget_json("448x448", "--preset", "nvila-8b")
    assert (b["grid"], b["vit_passes"], b["visual_tokens"]) == ([3, 3], 14, 2304)


def test_nvila_lite_2b():
    b, s = budget_json("1344x896", "448x448", "--preset", "nvila-lite-2b")
    assert (b["grid"], b["tiles"], b["visual_tokens"]) == ([3, 2], 7, 847)
    assert b["llm_positions"] == 847 + 2 * 7  # every tile (and the thumbnail) is followed by two "\n"
    assert (s["tiles"], s["visual_tokens"]) == (1, 121)


def test_video():
    [v] = budget_json("--video", "--frames", "256", "--temporal-pool", "8", "--preset", "nvila-8b-video")
    assert v["grid"] is None
    assert v["visual_tokens"] == 8192
    assert v["llm_positions"] == 8192 + 256 // 8
    assert v["vit_passes"] == 256


def test_video_defaults_to_the_preset():
    [v] = budget_json("--video")  # nvila-8b-video: 256 frames averaged 8 at a time
    assert (v["preset"], v["visual_tokens"]) == ("nvila-8b-video", 8192)
    [v] = budget_json("--video", "--preset", "nvila-8b", "--frames", "8")
    assert v["visual_tokens"] == 8 * 256


def test_json_is_one_object_per_input_in_order():
    out = budget_json("1344x896", "448x448", "1344x896", "--preset", "nvila-8b")
    assert [b["input"] for b in out] == ["1344x896", "448x448", "1344x896"]
    keys = {"grid", "tiles", "vit_passes", "visual_tokens", "separators", "llm_positions", "preset", "input"}
    assert all(keys <= b.keys() for b in out)


def test_huge_size_is_allowed():
    [b] = budget_json("100000x100000", "--preset", "nvila-8b")  # arithmetic only: no image is allocated
    assert (b["grid"], b["visual_tokens"]) == ([3, 3], 2304)


def test_default_preset_is_nvila_8b():
    [b] = budget_json("1344x896")
    assert (b["preset"], b["visual_tokens"]) == ("nvila-8b", 3072)


def test_extreme_aspect_warns_once_on_stderr():
    r = cli("budget", "1x4000", "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)[0]["grid"] == [1, 12]
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nvila-lab budget: warning:") and "stretches it" in lines[0]


# ---------------------------------------------------------------- bad input

BAD = [
    (["budget", "0x10"], ["'0x10'", "at least 1 pixel", "1344x896"]),
    (["budget", "abc"], ["'abc'", "not WIDTHxHEIGHT", "1344x896"]),
    (["budget", "10x"], ["'10x'", "not WIDTHxHEIGHT"]),
    (["budget", "-5x5"], ["'-5x5'", "at least 1 pixel"]),
    (["budget", "1e3x5"], ["'1e3x5'", "not WIDTHxHEIGHT"]),
    (["budget", "1.5x2"], ["'1.5x2'", "not WIDTHxHEIGHT"]),
    (["budget", "448x448", "2000000000x5"], ["'2000000000x5'", "at most 1,000,000,000"]),
    (["budget", "448x448", "--preset", "nvila-8"], ["unknown preset 'nvila-8'", "did you mean 'nvila-8b'",
                                                   *list_presets()]),
    (["budget", "448x448", "--preset", "llava"], ["unknown preset 'llava'", "nvila-lab presets", *list_presets()]),
    (["budget", "--video", "--preset", "nope"], ["unknown preset 'nope'"]),
    (["budget", "--video", "--frames", "0"], ["--frames", "at least 1"]),
    (["budget", "--video", "--frames", "-3"], ["--frames", "at least 1"]),
    (["budget", "--video", "--frames", "many"], ["--frames", "whole number"]),
    (["budget", "--video", "--temporal-pool", "0"], ["--temporal-pool", "at least 1"]),
    (["budget", "--video", "448x448"], ["--video takes no image sizes", "448x448"]),
    (["budget", "448x448", "--video"], ["--video takes no image sizes"]),
    (["budget"], ["give at least one image size", "--video"]),
    (["budget", "--json"], ["give at least one image size"]),
    (["budget", "448x448", "--frames", "8"], ["--frames only applies to videos", "--video"]),
    (["budget", "448x448", "--temporal-pool", "2"], ["--temporal-pool only applies to videos"]),
    (["budget", "448x448", "--bogus"], ["unrecognized arguments: --bogus", "nvila-lab budget --help"]),
    (["budget", "--preset"], ["--preset", "expected one argument"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'", "budget", "presets"]),
    ([], ["choose a command", "budget", "presets"]),
]


@pytest.mark.parametrize("args,needles", BAD, ids=[" ".join(a) or "<none>" for a, _ in BAD])
def test_bad_input_is_one_line_and_status_2(args, needles):
    r = cli(*args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout == "", r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
    assert lines[0].startswith("nvila-lab"), lines[0]
    assert ": error: " in lines[0], lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_main_returns_status_without_exiting():
    from nvila_lab.cli import main
    assert main(["budget", "abc"]) == 2
    assert main(["--version"]) == 0


# ---------------------------------------------------------------- human output, presets, version

def test_human_table():
    r = cli("budget", "1344x896", "448x448", "--preset", "nvila-8b")
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert len(lines) == 4  # header, rule, two rows
    head, rule, *rows = lines
    for col in ("input", "preset", "grid", "tiles", "ViT passes", "visual tokens", "LLM positions"):
        assert col in head
    assert set(rule) <= {"-", " "}
    assert rows[0].split()[:8] == ["1344x896", "nvila-8b", "4x3", "12", "17", "3072", "1", "3073"]
    assert rows[1].split()[:8] == ["448x448", "nvila-8b", "3x3", "9", "14", "2304", "1", "2305"]
    # aligned: every column starts where its header starts, numbers end where their header ends
    assert head.index("visual tokens") + len("visual tokens") == rows[0].index("3072") + 4
    assert rows[0].index("nvila-8b") == rows[1].index("nvila-8b") == head.index("preset")
    assert all(line == line.rstrip() for line in lines)


def test_human_table_video():
    r = cli("budget", "--video", "--frames", "256", "--temporal-pool", "8", "--preset", "nvila-8b-video")
    assert r.returncode == 0
    row = r.stdout.splitlines()[2]
    assert row.startswith("video 256 frames / 8") and " 8192 " in row and " - " in row


def test_presets():
    r = cli("presets")
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list_presets()
    assert "Dynamic-S2" in lines[0] and "stc2x2" in lines[0]
    assert "stc3x3" in lines[1] and "thumbnail" in lines[1]


def test_version():
    r = cli("--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"nvila-lab {__version__}")


def test_help():
    r = cli("budget", "--help")
    assert r.returncode == 0
    assert "WIDTHxHEIGHT" in r.stdout and "--temporal-pool" in r.stdout


# ---------------------------------------------------------------- stays light

def test_budget_does_not_import_transformers():
    code = ("import sys\nfrom nvila_lab.cli import main\n"
            "assert main(['budget', '1344x896', '--preset', 'nvila-8b', '--json']) == 0\n"
            "print(sorted({'transformers', 'matplotlib', 'ipywidgets'} & {m.split('.')[0] for m in sys.modules}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def _imported(*argv: str) -> set[str]:
    "Top-level packages a fresh `nvila-lab ARGV` imports, read from `python -X importtime`."
    r = subprocess.run([sys.executable, "-X", "importtime", *CMD[1:], *argv], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in r.stderr.splitlines()
            if line.startswith("import time:")}


@pytest.mark.parametrize("argv", [["budget", "1920x1080"], ["budget", "1344x896", "--preset", "nvila-8b", "--json"],
                                  ["budget", "--video", "--frames", "64"], ["presets"]])
def test_budget_imports_no_torch(argv):
    "The budget of the built-in compressors is arithmetic: no torch, transformers, numpy or plotting at all."
    imported = _imported(*argv)
    assert "nvila_lab" in imported  # the probe works
    assert not {"torch", "transformers", "numpy", "matplotlib", "ipywidgets"} & imported, sorted(imported)


def test_a_plugin_brings_torch_in(tmp_path):
    (tmp_path / "my_pool.py").write_text(PLUGIN)
    assert "torch" in _imported("budget", "--import", str(tmp_path / "my_pool.py"), "--projector", "my_pool",
                                "448x448", "--preset", "tiny")


def test_presets_and_version_do_not_import_torch():
    code = ("import sys, contextlib, io\nfrom nvila_lab.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['presets']) == 0 and main(['--version']) == 0\n"
            "print('torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


# ---------------------------------------------------------------- make-data

def test_make_data_writes_the_dataset(tmp_path):
    from nvila_lab.data import load_dataset, make_dataset
    out = tmp_path / "set"
    r = cli("make-data", "--task", "count", "--task", "position", "--n", "3", "--seed", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no progress bar when stderr is not a terminal
    assert r.stdout.startswith("wrote 6 examples (3 per task x 2 tasks: count, position; seed 5) to ")
    assert sorted(p.name for p in out.iterdir()) == ["data.jsonl", "images", "meta.json"]
    rows = load_dataset(out)
    assert [r["id"] for r in rows] == [f"{t}_5_{i:05d}" for i in range(3) for t in ("count", "position")]
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["tasks"], meta["n_per_task"], meta["seed"]) == (["count", "position"], 3, 5)
    ref = load_dataset(make_dataset(["count", "position"], n=3, seed=5, out_dir=tmp_path / "ref", progress=False))
    assert [(a["question"], a["answer"]) for a in rows] == [(b["question"], b["answer"]) for b in ref]
    from pathlib import Path
    assert [Path(a["image_path"]).read_bytes() for a in rows] == [Path(b["image_path"]).read_bytes() for b in ref]


def test_make_data_default_tasks_and_seed(tmp_path):
    from nvila_lab.data import DEFAULT_TASKS, load_dataset
    r = cli("make-data", "--n", "1", "--out", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    rows = load_dataset(tmp_path / "d")
    assert [r["task"] for r in rows] == list(DEFAULT_TASKS)
    assert all(r["seed"] == 0 for r in rows)


def test_make_data_overwrite_keeps_foreign_files(tmp_path):
    out = tmp_path / "set"
    assert cli("make-data", "--task", "colour", "--n", "2", "--out", str(out)).returncode == 0
    (out / "notes.txt").write_text("mine")
    r = cli("make-data", "--task", "count", "--n", "1", "--out", str(out))
    assert r.returncode == 2 and "is not empty" in r.stderr and "--overwrite" in r.stderr
    r = cli("make-data", "--task", "count", "--n", "1", "--out", str(out), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (out / "images").iterdir()) == ["count_0_00000.png"]
    assert (out / "notes.txt").read_text() == "mine"


def test_make_data_list():
    from nvila_lab.data import DEFAULT_TASKS, TASKS
    from nvila_lab.video_data import VIDEO_TASKS
    r = cli("make-data", "--list")
    assert r.returncode == 0 and r.stderr == ""
    head, rule, *rows = r.stdout.splitlines()
    assert head.split() == ["task", "kind", "answers", "chance", "needs", "default", "description"]
    assert set(rule) <= {"-", " "}
    assert [row.split()[0] for row in rows] == list(TASKS) + list(VIDEO_TASKS)
    by_name = {row.split()[0]: row for row in rows}
    assert by_name["read_code"].split()[:6] == ["read_code", "image", "100", "1.0%", "fine", "yes"]
    assert by_name["read_digit"].split()[:5] == ["read_digit", "image", "10", "10.0%", "fine"]
    assert by_name["colour"].split()[:6] == ["colour", "image", "6", "16.7%", "coarse", "yes"]
    assert by_name["count"].split()[:4] == ["count", "image", "5", "20.0%"]
    assert by_name["flash"].split()[:5] == ["flash", "video", "6", "16.7%", "many-frames"]
    assert by_name["direction"].split()[:5] == ["direction", "video", "4", "25.0%", "few-frames"]
    assert {n for n, row in by_name.items() if row.split()[5] == "yes"} == set(DEFAULT_TASKS)
    for name, t in {**TASKS, **VIDEO_TASKS}.items():
        assert by_name[name].endswith(t.description)


def test_make_data_writes_videos_and_eval_reads_them(tmp_path):
    out = tmp_path / "vid"
    r = cli("make-data", "--task", "flash", "--task", "direction", "--n", "2", "--seed", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "wrote 4 videos (2 per task x 2 tasks: flash, direction; seed 3)" in r.stdout
    assert sorted(p.name for p in (out / "videos").iterdir()) == [
        "direction_3_00000.mp4", "direction_3_00001.mp4", "flash_3_00000.mp4", "flash_3_00001.mp4"]
    from nvila_lab.data import load_dataset
    rows = load_dataset(out)
    assert [r["task"] for r in rows] == ["flash", "direction"] * 2 and all("video_path" in r for r in rows)
    mixed = cli("make-data", "--task", "flash", "--task", "count", "--n", "1", "--out", str(tmp_path / "mixed"))
    assert mixed.returncode == 2 and "go in separate folders" in mixed.stderr
    assert not (tmp_path / "mixed").exists()


@pytest.mark.parametrize("args, message", [
    (["--task", "cout", "--n", "2"], "unknown task 'cout'; did you mean 'count'?"),
    (["--task", "nonsense_task", "--n", "2"], "unknown task 'nonsense_task'"),
    (["--n", "0"], "argument --n: must be at least 1"),
    (["--n", "-3"], "argument --n: must be at least 1"),
    (["--n", "two"], "argument --n: must be a whole number"),
    (["--n", "2", "--seed", "-1"], "argument --seed: must be 0 or more"),
    (["--n", "2", "--task", "count", "--task", "count"], "given more than once"),
    ([], "give --n N (examples per task)"),
    (["--list", "--n", "2"], "--list takes no other options"),
    (["--n", "2", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_make_data_errors(tmp_path, args, message):
    out = ["--out", str(tmp_path / "new")] if args and args != ["--list", "--n", "2"] else []
    r = cli("make-data", *args, *out)
    assert r.returncode == 2
    assert message in r.stderr, r.stderr
    assert r.stderr.startswith("nvila-lab make-data: error: ") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "new").exists()


def test_make_data_out_is_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    r = cli("make-data", "--n", "1", "--out", str(f))
    assert r.returncode == 2 and "is a file" in r.stderr and r.stderr.count("\n") == 1


def test_make_data_mix_writes_exact_kind_counts(tmp_path):
    from nvila_lab.data import KINDS, load_dataset, make_dataset, make_sample
    out = tmp_path / "d"
    r = cli("make-data", "--mix", "easy=0.3,informative=0.4,mislabelled=0.2,distracting=0.1", "--n", "50",
            "--task", "count", "--task", "colour", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("wrote 100 examples (50 per task x 2 tasks: count, colour; seed 0; "
                               "mix easy=0.3,informative=0.4,mislabelled=0.2,distracting=0.1) to "), r.stdout
    rows = load_dataset(out)
    for task in ("count", "colour"):
        got = {k: sum(r["kind"] == k and r["task"] == task for r in rows) for k in KINDS}
        assert got == {"easy": 15, "informative": 20, "mislabelled": 10, "distracting": 5}, (task, got)
    for r in rows:
        assert ("true_answer" in r) == (r["kind"] in ("mislabelled", "distracting"))
        assert r.get("true_answer") != r["answer"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["mix"] == {"easy": 0.3, "informative": 0.4, "mislabelled": 0.2, "distracting": 0.1}
    ref = make_dataset(["count", "colour"], 50, 0, tmp_path / "ref", progress=False, mix=meta["mix"])
    assert (ref / "data.jsonl").read_text() == (out / "data.jsonl").read_text()  # the command is make_dataset
    s = make_sample(rows[7]["task"], 0, rows[7]["index"], kind=rows[7]["kind"])
    from PIL import Image
    with Image.open(rows[7]["image_path"]) as im:
        assert im.convert("RGB").tobytes() == s["image"].tobytes()


@pytest.mark.parametrize("mix, message", [
    ("easy=0.5,informative=0.4", "--mix: mix fractions sum to 0.9, not 1"),
    ("esy=0.5,informative=0.5", "unknown example kind 'esy'; did you mean 'easy'?"),
    ("easy=-1,informative=2", "must be a number >= 0"),
    ("easy", "is not KIND=FRACTION"),
])
def test_make_data_bad_mix_is_one_line(capsys, tmp_path, mix, message):
    rc, o, e = run_main(capsys, "make-data", "--mix", mix, "--n", "2", "--out", str(tmp_path / "new"))
    assert rc == 2 and o == "" and e.count("\n") == 1 and e.startswith("nvila-lab make-data: error: "), e
    assert message in e, e
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- ask and eval
#
# In-process through `main`, with `nvila_lab.checkpoint.load_nvila` replaced by a stub (the checks that need no
# model run before it is imported); plus one real round trip through a saved tiny checkpoint.

from nvila_lab.cli import main  # noqa: E402


class StubModel:
    "What the CLI needs of an NVILAModel: `.generate`. Records its calls; answers `answer`."
    def __init__(self, answer="3"):
        self.answer, self.calls = answer, []

    def generate(self, image, question, max_new_tokens=16, do_sample=False, temperature=1.0, top_p=1.0, seed=None):
        self.calls.append(dict(image=image, question=question, max_new_tokens=max_new_tokens, do_sample=do_sample,
                               temperature=temperature, seed=seed))
        return self.answer


@pytest.fixture
def stub(monkeypatch):
    "Replace load_nvila by a stub returning a StubModel; the stub records (path, device)."
    import nvila_lab.checkpoint as ckpt
    model, loads = StubModel(), []

    def fake_load(path, device=None, dtype=None, strict=True):
        loads.append((str(path), device))
        return model
    monkeypatch.setattr(ckpt, "load_nvila", fake_load)
    model.loads = loads
    return model


@pytest.fixture(scope="module")
def image_path():
    from nvila_lab.data import load_dataset
    return load_dataset()[1]["image_path"]  # count_0_00000


def run_main(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    o, e = capsys.readouterr()
    return rc, o, e


def test_ask_prints_the_answer(tmp_path, stub, capsys, image_path):
    rc, o, e = run_main(capsys, "ask", "--checkpoint", str(tmp_path), image_path, "How many dots are there?")
    assert (rc, o, e) == (0, "3\n", "")
    assert stub.loads == [(str(tmp_path), None)]
    [call] = stub.calls
    assert call["question"] == "How many dots are there?"
    assert call["image"].size == (256, 192)  # loaded by the CLI, before the model
    assert (call["max_new_tokens"], call["do_sample"], call["seed"]) == (16, False, None)


def test_ask_sampling_options(tmp_path, stub, capsys, image_path):
    rc, o, _ = run_main(capsys, "ask", "--checkpoint", str(tmp_path), image_path, "Count the dots.", "--sample",
                        "--temperature", "0.7", "--seed", "4", "--max-new-tokens", "3", "--device", "cpu")
    assert (rc, o) == (0, "3\n")
    [call] = stub.calls
    assert (call["max_new_tokens"], call["do_sample"], call["temperature"], call["seed"]) == (3, True, 0.7, 4)
    assert stub.loads == [(str(tmp_path), "cpu")]


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{tmp}/nope", "{img}", "How many?"], "checkpoint folder '{tmp}/nope' not found"),
    (["--checkpoint", "{tmp}/file.txt", "{img}", "How many?"], "is a file; pass the checkpoint folder"),
    (["--checkpoint", "{tmp}", "{tmp}/file.txt", "How many?"], "not an image Pillow can read"),
    (["--checkpoint", "{tmp}", "{tmp}/missing.png", "How many?"], "no such file"),
    (["--checkpoint", "{tmp}", "{tmp}", "How many?"], "is a folder, not an image file"),
    (["--checkpoint", "{tmp}", "{img}", ""], "the question is empty"),
    (["--checkpoint", "{tmp}", "{img}", "   "], "the question is empty"),
    (["--checkpoint", "{tmp}", "{img}", "How", "many?"], "put the question in quotes"),
    (["--checkpoint", "{tmp}", "{img}", "How many?", "--seed", "1"], "--seed only applies with --sample"),
    (["--checkpoint", "{tmp}", "{img}", "How many?", "--temperature", "2"], "--temperature only applies with --sample"),
    (["--checkpoint", "{tmp}", "{img}", "How many?", "--sample", "--temperature", "-1"], "must be a finite number above 0"),
    (["--checkpoint", "{tmp}", "{img}", "How many?", "--max-new-tokens", "0"], "must be at least 1"),
    (["{img}", "How many?"], "the following arguments are required: --checkpoint"),
    (["--checkpoint", "{tmp}", "{img}"], "the following arguments are required: QUESTION"),
])
def test_ask_errors_before_loading(tmp_path, stub, capsys, image_path, argv, message):
    (tmp_path / "file.txt").write_text("not an image")
    fill = lambda s: s.format(tmp=tmp_path, img=image_path)
    rc, o, e = run_main(capsys, "ask", *map(fill, argv))
    assert rc == 2 and o == ""
    assert fill(message) in e, e
    assert e.startswith("nvila-lab ask: error: ") and e.count("\n") == 1 and "Traceback" not in e
    assert stub.loads == []  # refused before the model was loaded


def test_ask_model_errors_are_one_line(tmp_path, stub, capsys, image_path):
    def bad_generate(*a, **k):
        raise ValueError("the question has 2 <image> placeholder(s) but 1 item(s) were given;\nuse one per item")
    stub.generate = bad_generate
    rc, o, e = run_main(capsys, "ask", "--checkpoint", str(tmp_path), image_path, "<image> vs <image>")
    assert rc == 2 and "2 <image> placeholder(s)" in e and e.count("\n") == 1


def test_ask_not_a_checkpoint(tmp_path, capsys, image_path):
    "The real load_nvila on an empty folder: its CheckpointError on one line."
    rc, o, e = run_main(capsys, "ask", "--checkpoint", str(tmp_path), image_path, "How many dots are there?")
    assert rc == 2 and o == ""
    assert e.startswith("nvila-lab ask: error: cannot load the checkpoint: ") and e.count("\n") == 1, e
    assert "Traceback" not in e


def test_eval_prints_accuracy_per_task(tmp_path, stub, capsys):
    from nvila_lab.data import load_dataset, make_dataset
    data = make_dataset(["count", "colour"], n=5, seed=2, out_dir=tmp_path / "set", progress=False)
    rows = load_dataset(data)
    threes = sum(r["answer"] == "3" for r in rows)
    rc, o, e = run_main(capsys, "eval", "--checkpoint", str(tmp_path), "--data", str(data))
    assert (rc, e) == (0, "")
    lines = o.splitlines()
    assert lines[0] == f"checkpoint {tmp_path} on {data}"
    assert lines[1].split()[:5] == ["task", "n", "correct", "accuracy", "chance"]
    count = lines[3].split()
    assert count[:3] == ["count", "5", str(threes)] and count[4] == "20.0%"
    assert lines[4].split()[:4] == ["colour", "5", "0", "0.0%"]
    assert lines[6].split()[:3] == ["overall", "10", str(threes)]
    assert {(c["max_new_tokens"], c["do_sample"]) for c in stub.calls} == {(8, False)}  # greedy


def test_eval_json_and_limit(tmp_path, stub, capsys):
    from nvila_lab.data import make_dataset
    data = make_dataset(["count", "colour", "position"], n=4, seed=1, out_dir=tmp_path / "set", progress=False)
    rc, o, e = run_main(capsys, "eval", "--checkpoint", str(tmp_path), "--data", str(data), "--json", "--limit", "5",
                        "--max-new-tokens", "3")
    assert (rc, e) == (0, "")
    d = json.loads(o)
    assert (d["n"], d["checkpoint"], d["data"], d["max_new_tokens"], d["decoding"]) == \
        (5, str(tmp_path), str(data), 3, "greedy")
    assert {t: v["n"] for t, v in d["tasks"].items()} == {"count": 2, "colour": 2, "position": 1}
    assert d["tasks"]["position"]["chance"] == 0.25
    assert {"accuracy", "macro_accuracy", "chance", "errors", "seconds"} <= d.keys()
    assert len(stub.calls) == 5


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{tmp}", "--data", "{tmp}/nope"], "data folder '{tmp}/nope' not found"),
    (["--checkpoint", "{tmp}", "--data", "{tmp}"], "has no data.jsonl, so it is not a dataset"),
    (["--checkpoint", "{tmp}", "--data", "{tmp}/file.txt"], "is a file, not a dataset folder"),
    (["--checkpoint", "{tmp}/nope", "--data", "{tmp}"], "checkpoint folder '{tmp}/nope' not found"),
    (["--checkpoint", "{tmp}", "--data", "{tmp}/bad"], "data.jsonl:1: not valid JSON"),
    (["--checkpoint", "{tmp}", "--data", "{tmp}/set", "--limit", "0"], "argument --limit: must be at least 1"),
    (["--data", "{tmp}/set"], "the following arguments are required: --checkpoint"),
    (["--checkpoint", "{tmp}"], "the following arguments are required: --data"),
])
def test_eval_errors_before_loading(tmp_path, stub, capsys, argv, message):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "data.jsonl").write_text("{oops\n")
    fill = lambda s: s.format(tmp=tmp_path)
    rc, o, e = run_main(capsys, "eval", *map(fill, argv))
    assert rc == 2 and o == ""
    assert fill(message) in e, e
    assert e.startswith("nvila-lab eval: error: ") and e.count("\n") == 1 and "Traceback" not in e
    assert stub.loads == []


def test_eval_bad_image_in_the_data(tmp_path, stub, capsys):
    from nvila_lab.data import make_dataset
    data = make_dataset(["count"], n=2, seed=0, out_dir=tmp_path / "set", progress=False)
    (data / "images" / "count_0_00001.png").write_bytes(b"not a png")

    class Loads(StubModel):  # a model that opens its image, as the real one does
        def generate(self, image, question, **kw):
            from nvila_lab.images import load_image
            load_image(image)
            return "1"
    stub.generate = Loads().generate
    rc, o, e = run_main(capsys, "eval", "--checkpoint", str(tmp_path), "--data", str(data))
    assert rc == 2 and "count_0_00001.png: not an image Pillow can read" in e and e.count("\n") == 1


def test_eval_not_a_checkpoint(tmp_path, capsys):
    from nvila_lab.data import make_dataset
    data = make_dataset(["count"], n=1, seed=0, out_dir=tmp_path / "set", progress=False)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    rc, o, e = run_main(capsys, "eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(data))
    assert rc == 2 and o == ""
    assert e.startswith("nvila-lab eval: error: cannot load the checkpoint: ") and e.count("\n") == 1, e


def test_ask_and_eval_with_a_saved_tiny_checkpoint(tmp_path, image_path):
    "End to end, as real processes: save the untrained tiny model, ask it, evaluate it."
    import nvila_lab.checkpoint as ckpt
    from nvila_lab.data import load_tokenizer, make_dataset
    from nvila_lab.model import NVILAModel
    folder = ckpt.save_nvila(NVILAModel("tiny", load_tokenizer()), tmp_path / "tiny")
    greedy = [cli("ask", "--checkpoint", str(folder), image_path, "How many dots?", "--max-new-tokens", "4")
              for _ in range(2)]
    assert greedy[0].returncode == 0, greedy[0].stderr
    assert greedy[0].stdout == greedy[1].stdout and greedy[0].stdout.endswith("\n")  # untrained junk, but repeatable
    sampled = [cli("ask", "--checkpoint", str(folder), image_path, "Count the dots.", "--sample", "--seed", "3").stdout
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    data = make_dataset(["count", "colour"], n=2, seed=9, out_dir=tmp_path / "set", progress=False)
    r = cli("eval", "--checkpoint", str(folder), "--data", str(data), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["n"], list(d["tasks"])) == (4, ["count", "colour"])
    assert d["accuracy"] <= d["chance"]


@pytest.fixture(scope="module")
def video_path():
    from nvila_lab.video_data import load_video_dataset
    return load_video_dataset()[0]["video_path"]  # flash_0_00000.mp4, shipped


def test_ask_takes_a_video(tmp_path, stub, capsys, video_path):
    from nvila_lab.temporal import Video
    rc, o, e = run_main(capsys, "ask", "--checkpoint", str(tmp_path), video_path, "What colour flashed?",
                        "--frames", "32")
    assert (rc, o, e) == (0, "3\n", "")
    [call] = stub.calls
    assert isinstance(call["image"], Video) and (str(call["image"].source), call["image"].num_frames) == (video_path, 32)


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{tmp}", "{tmp}/missing.mp4", "What flashed?"], "missing.mp4"),
    (["--checkpoint", "{tmp}", "{tmp}/broken.mp4", "What flashed?"], "broken.mp4"),
    (["--checkpoint", "{tmp}", "{img}", "How many?", "--frames", "8"], "--frames only applies to videos"),
    (["--checkpoint", "{tmp}", "{vid}", "What flashed?", "--frames", "0"], "must be at least 1"),
])
def test_ask_video_errors_before_loading(tmp_path, stub, capsys, image_path, video_path, argv, message):
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    fill = lambda s: s.format(tmp=tmp_path, img=image_path, vid=video_path)
    rc, o, e = run_main(capsys, "ask", *map(fill, argv))
    assert rc == 2 and o == "" and fill(message) in e, e
    assert e.startswith("nvila-lab ask: error: ") and e.count("\n") == 1
    assert stub.loads == []


def test_ask_and_eval_videos_with_a_saved_tiny_checkpoint(tmp_path, video_path):
    "A tiny video model (8 frames averaged 4 by 4), saved, asked about a shipped clip and evaluated on a video set."
    import nvila_lab.checkpoint as ckpt
    from nvila_lab.config import get_config
    from nvila_lab.data import load_tokenizer
    from nvila_lab.model import NVILAModel
    folder = ckpt.save_nvila(NVILAModel(get_config("tiny", num_video_frames=8, temporal_pool=4), load_tokenizer()),
                             tmp_path / "tiny-video")
    r = cli("ask", "--checkpoint", str(folder), video_path, "What colour flashed?", "--max-new-tokens", "3")
    assert r.returncode == 0 and r.stdout.endswith("\n"), r.stderr
    made = cli("make-data", "--task", "order", "--task", "direction", "--n", "2", "--seed", "5", "--out",
               str(tmp_path / "vids"))
    assert made.returncode == 0, made.stderr
    r = cli("eval", "--checkpoint", str(folder), "--data", str(tmp_path / "vids"), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["n"], list(d["tasks"])) == (4, ["order", "direction"])
    assert d["tasks"]["direction"]["chance"] == 0.25  # found among the video tasks


def test_model_commands_stay_lazy():
    "Importing the CLI, listing tasks and asking for help load neither torch nor transformers."
    code = ("import sys, contextlib, io\nfrom nvila_lab.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['make-data', '--list']) == 0\n"
            "    assert main(['ask', '--help']) == 0 and main(['eval', '--help']) == 0\n"
            "print(sorted({'torch', 'transformers'} & {m.split('.')[0] for m in sys.modules}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ---------------------------------------------------------------- plug-ins: --import, --projector, --projector-arg

@pytest.fixture
def plugin(tmp_path):
    (tmp_path / "my_pool.py").write_text(PLUGIN)
    return tmp_path / "my_pool.py"


def test_budget_with_a_plugin_file(plugin):
    [b] = budget_json("--import", str(plugin), "--projector", "my_pool", "--projector-arg", "k=4", "1000x700",
                      "--preset", "tiny")
    assert (b["tiles"], b["visual_tokens"]) == (12, 12 * (8 // 4) ** 2)  # 12 tiles of 8x8 patches, pooled 4x4
    [b2] = budget_json("--import", str(plugin), "--projector", "my_pool", "1000x700", "--preset", "tiny")
    assert b2["visual_tokens"] == 12 * (8 // 2) ** 2  # the plug-in's own default k=2
    assert b2["projector_flops"] > b["projector_flops"] > 0  # counted by running it, more tokens -> more FLOPs


def test_builtin_projector_override():
    [b] = budget_json("448x448", "--preset", "tiny", "--projector", "avgpool", "--projector-arg", "k=4")
    assert b["visual_tokens"] == 9 * 2 * 2
    [t] = budget_json("448x448", "--preset", "tiny", "--projector", "tokenlearner", "--projector-arg", "n_tokens=5")
    assert t["visual_tokens"] == 9 * 5


def test_module_import(tmp_path, monkeypatch):
    (tmp_path / "pools_pkg").mkdir()
    (tmp_path / "pools_pkg" / "__init__.py").write_text(PLUGIN)
    env_path = f"{tmp_path}"
    r = subprocess.run([*CMD, "budget", "--import", "pools_pkg", "--projector", "my_pool", "448x448", "--preset",
                        "tiny", "--json"], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["visual_tokens"] == 9 * 16


@pytest.mark.parametrize("extra, needles", [
    (["--projector", "my_poool"], ["unknown compressor 'my_poool'", "did you mean 'my_pool'"]),
    (["--projector", "my_pool", "--projector-arg", "size=3"], ["my_pool", "size"]),
    (["--projector-arg", "k"], ["--projector-arg", "KEY=VALUE"]),
])
def test_plugin_errors_are_one_line(plugin, extra, needles):
    r = cli("budget", "--import", str(plugin), "448x448", "--preset", "tiny", *extra)
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("nvila-lab budget: error: "), r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


@pytest.mark.parametrize("text, error", [("raise RuntimeError('boom')\n", "RuntimeError: boom"),
                                         ("def f(:\n", "SyntaxError"),
                                         ("import no_such_module_xyz\n", "No module named 'no_such_module_xyz'")])
def test_a_broken_plugin_is_one_line_naming_the_file(tmp_path, text, error):
    (tmp_path / "broken.py").write_text(text)
    for cmd in (["budget", "448x448"], ["eval", "--checkpoint", str(tmp_path), "--data", "data_samples/vqa"]):
        r = cli(*cmd, "--import", str(tmp_path / "broken.py"))
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"--import {tmp_path / 'broken.py'}: " in r.stderr and error in r.stderr, r.stderr


def test_missing_plugin_file_and_module():
    r = cli("budget", "448x448", "--import", "nowhere/pool.py")
    assert r.returncode == 2 and "no such file 'nowhere/pool.py'" in r.stderr and r.stderr.count("\n") == 1
    r = cli("budget", "448x448", "--import", "no_such_pkg_xyz")
    assert r.returncode == 2 and "ModuleNotFoundError" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("cmd", [["eval", "--data", "data_samples/vqa"], ["ask", "x.png", "How many?"]])
def test_checkpoint_commands_refuse_a_projector_override(tmp_path, capsys, cmd, stub):
    rc, o, e = run_main(capsys, *cmd, "--checkpoint", str(tmp_path), "--projector", "avgpool")
    assert rc == 2 and "brings its own compressor" in e and e.count("\n") == 1
    assert stub.loads == []


@pytest.mark.parametrize("command", ["budget", "presets", "make-data", "ask", "eval", "train"])
def test_missing_extra_is_one_line_in_every_command(monkeypatch, capsys, command):
    import nvila_lab.cli as c
    from nvila_lab.config import MissingExtra

    def needs_extra(args, out, err):
        raise MissingExtra("reading videos needs PyAV, which is not installed: pip install 'nvila-lab[video]'")
    monkeypatch.setitem(c.COMMANDS, command, (c.COMMANDS[command][0], needs_extra))
    argv = {"budget": ["448x448"], "presets": [], "make-data": ["--list"], "ask": ["--checkpoint", "c", "x.png", "q"],
            "eval": ["--checkpoint", "c", "--data", "d"], "train": ["--out", "o"]}[command]
    rc, o, e = run_main(capsys, command, *argv)
    assert rc == 2 and o == ""
    assert e == (f"nvila-lab {command}: error: reading videos needs PyAV, which is not installed: "
                 "pip install 'nvila-lab[video]'\n")


# ---------------------------------------------------------------- train

@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    from nvila_lab.data import make_dataset
    return make_dataset(["colour", "position"], n=3, seed=2, out_dir=tmp_path_factory.mktemp("train") / "set",
                        size=(64, 64), progress=False)


def _train_json(*argv) -> dict:
    r = cli("train", *argv, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def _weights(folder) -> dict:
    from pathlib import Path
    from safetensors.torch import load_file
    return {f"{f.parent.name}/{k}": v for f in sorted(Path(folder).glob("*/*.safetensors"))
            for k, v in load_file(f).items()}


def test_train_stop_and_resume_equals_straight(tmp_path, small_set):
    base = ["--preset", "tiny", "--data", str(small_set), "--stage", "projector-align", "--stage", "scratch",
            "--steps", "2", "--batch-size", "3", "--log-every", "1", "--save-every", "1"]
    straight = _train_json(*base, "--out", str(tmp_path / "a"))
    assert (straight["steps"], [s["stage"] for s in straight["stages"]]) == (4, ["projector-align", "scratch"])
    part = _train_json(*base, "--out", str(tmp_path / "b"), "--stop-after", "3")  # mid-way through stage 2
    assert (part["steps"], part["stopped"], part["checkpoint"]) == (3, True, None)
    r = cli("eval", "--checkpoint", str(tmp_path / "b"), "--data", str(small_set))
    assert r.returncode == 2 and "no checkpoint yet" in r.stderr and "--resume" in r.stderr
    rest = _train_json("--out", str(tmp_path / "b"), "--resume")
    assert (rest["steps"], rest["stopped"]) == (4, False)
    for a, b in zip(straight["stages"], rest["stages"]):
        assert [r["step"] for r in a["history"]] == [r["step"] for r in b["history"]] == [1, 2]
        assert [r["loss"] for r in b["history"]] == pytest.approx([r["loss"] for r in a["history"]], rel=1e-5)
    wa, wb = _weights(straight["checkpoint"]), _weights(rest["checkpoint"])
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    r = cli("eval", "--checkpoint", str(tmp_path / "b"), "--data", str(small_set), "--json")  # OUT finds checkpoint/
    assert r.returncode == 0 and json.loads(r.stdout)["n"] == 6, r.stderr


def test_train_from_a_checkpoint_with_a_new_projector(tmp_path, small_set, plugin):
    first = _train_json("--preset", "tiny", "--data", str(small_set), "--steps", "1", "--batch-size", "2",
                        "--out", str(tmp_path / "a"))
    second = _train_json("--init", first["checkpoint"], "--import", str(plugin), "--projector", "my_pool",
                         "--projector-arg", "bias=false", "--data", str(small_set), "--stage", "projector-align",
                         "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "b"))
    assert (second["projector"], second["projector_kwargs"]) == ("my_pool", {"bias": False})
    wa, wb = _weights(first["checkpoint"]), _weights(second["checkpoint"])
    llm = [k for k in wa if k.startswith("llm/")]
    assert llm and all(torch_equal(wa[k], wb[k]) for k in llm)  # projector-align: the LLM stays as it was
    assert any(k.endswith("bias") for k in wa if k.startswith("mm_projector/"))  # STC 2x2's linear layers
    assert not any(k.endswith("bias") for k in wb if k.startswith("mm_projector/"))  # my_pool(bias=False), fresh


def torch_equal(a, b) -> bool:
    import torch
    return torch.equal(a, b)


@pytest.mark.parametrize("argv, needles", [
    (["--data", "{set}", "--out", "{tmp}/o"], ["either --preset NAME", "not neither"]),
    (["--preset", "tiny", "--init", "{tmp}", "--data", "{set}", "--out", "{tmp}/o"], ["not both"]),
    (["--preset", "tiny", "--out", "{tmp}/o"], ["at least one --data DIR"]),
    (["--preset", "tiny", "--data", "{set}", "--stage", "image_sft", "--out", "{tmp}/o"],
     ["unknown stage 'image_sft'", "did you mean 'image-sft'"]),
    (["--preset", "tiny2", "--data", "{set}", "--out", "{tmp}/o"], ["unknown preset 'tiny2'", "nvila-lab presets"]),
    (["--preset", "tiny", "--data", "{tmp}/nothing", "--out", "{tmp}/o"], ["nothing", "not found", "make-data"]),
    (["--preset", "tiny", "--data", "{set}", "--out", "{set}"], ["is not an empty folder", "--resume"]),
    (["--out", "{tmp}/o", "--resume"], ["no run.json to resume"]),
    (["--out", "{tmp}/o", "--resume", "--steps", "3"], ["--resume continues with the settings", "drop --steps"]),
    (["--preset", "tiny", "--data", "{set}", "--projector", "nope", "--out", "{tmp}/o"], ["unknown compressor 'nope'"]),
    (["--preset", "tiny", "--data", "{set}", "--steps", "0", "--out", "{tmp}/o"], ["--steps", "at least 1"]),
])
def test_train_usage_errors(tmp_path, small_set, argv, needles):
    fill = lambda a: a.format(tmp=tmp_path, set=small_set)
    r = cli("train", *map(fill, argv))
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("nvila-lab train: error: "), r.stderr
    for n in needles:
        assert fill(n) in r.stderr, (n, r.stderr)


# ---------------------------------------------------------------- precision and fp8 (issue 12)

def test_train_precision_fp8_coat_trains_resumes_and_its_checkpoint_works(tmp_path, small_set, capsys, image_path):
    "--precision fp8-coat: stop after 1 of 2 steps, resume == straight (bitwise); the checkpoint is a normal one."
    base = ["train", "--preset", "tiny", "--data", str(small_set), "--steps", "2", "--batch-size", "3", "--log-every",
            "1", "--save-every", "1", "--precision", "fp8-coat"]
    rc, o, e = run_main(capsys, *base, "--out", str(tmp_path / "a"))
    assert rc == 0 and "precision fp8-coat" in o and o.count("\n") == 1, (o, e)
    rc, o, _ = run_main(capsys, *base, "--out", str(tmp_path / "b"), "--stop-after", "1", "--json")
    assert rc == 0 and json.loads(o)["stopped"] and json.loads(o)["precision"] == "fp8-coat"
    assert json.loads((tmp_path / "b" / "run.json").read_text())["precision"] == "fp8-coat"
    rc, _, e = run_main(capsys, "train", "--out", str(tmp_path / "b"), "--resume", "--precision", "bf16")
    assert rc == 2 and "drop --precision" in e and e.count("\n") == 1, e
    rc, o, e = run_main(capsys, "train", "--out", str(tmp_path / "b"), "--resume", "--json")
    assert rc == 0, e
    rest = json.loads(o)
    assert (rest["steps"], rest["stopped"], rest["precision"]) == (2, False, "fp8-coat")
    wa, wb = _weights(tmp_path / "a" / "checkpoint"), _weights(rest["checkpoint"])
    assert wa.keys() == wb.keys() and all(torch_equal(wa[k], wb[k]) for k in wa)
    import torch
    plain = _weights(_saved_plain(tmp_path / "plain"))
    assert wa.keys() == plain.keys() and {v.dtype for v in wa.values()} == {torch.float32}  # same keys, float32
    rc, o, e = run_main(capsys, "eval", "--checkpoint", str(tmp_path / "b"), "--data", str(small_set), "--json")
    assert rc == 0 and json.loads(o)["n"] == 6, e
    rc, o, e = run_main(capsys, "ask", "--checkpoint", str(tmp_path / "b"), image_path, "What colour?",
                        "--max-new-tokens", "3")
    assert rc == 0 and o.endswith("\n"), e


def _saved_plain(folder):
    from nvila_lab.checkpoint import save_nvila
    from nvila_lab.data import load_tokenizer
    from nvila_lab.model import NVILAModel
    from nvila_lab.config import get_config
    tok = load_tokenizer()
    return save_nvila(NVILAModel(get_config("tiny", vocab_size=max(len(tok), get_config("tiny").vocab_size)), tok), folder)


def test_train_nan_under_fp8_is_one_line_naming_the_step(tmp_path, small_set, capsys):
    rc, o, e = run_main(capsys, "train", "--preset", "tiny", "--data", str(small_set), "--steps", "6", "--batch-size",
                        "3", "--lr", "1e30", "--precision", "fp8", "--out", str(tmp_path / "r"))
    assert rc == 1 and o == "" and "Traceback" not in e, e
    errors = re.findall(r"nvila-lab train: error: [^\n\r]*", e)  # stderr also holds the progress bar
    assert len(errors) == 1 and re.match(r"nvila-lab train: error: step [1-6] \(precision 'fp8'\): ", errors[0]), e
    assert "the run stopped there" in errors[0]


@pytest.mark.parametrize("argv, needles", [
    (["--precision", "fp9"], ["--precision: unknown precision 'fp9'", "did you mean 'fp8'?"]),
    (["--precision", "FP8-COAT"], ["unknown precision 'FP8-COAT'"]),
])
def test_train_bad_precision(tmp_path, small_set, capsys, argv, needles):
    rc, o, e = run_main(capsys, "train", "--preset", "tiny", "--data", str(small_set), "--out", str(tmp_path / "o"), *argv)
    assert rc == 2 and o == "" and e.count("\n") == 1 and e.startswith("nvila-lab train: error: "), e
    assert all(n in e for n in needles), e
    assert not (tmp_path / "o").exists()


def test_fp8_json_is_one_line_with_the_report_and_state_bytes(capsys):
    from nvila_lab.fp8.linear import fp8_layer_report
    rc, o, e = run_main(capsys, "fp8", "--shape", "64,128,256", "--recipe", "coat", "--seed", "3", "--json")
    assert rc == 0 and o.count("\n") == 1, (o, e)
    d = json.loads(o)
    assert d["recipe"] == "coat"
    ref = fp8_layer_report(64, 128, 256, recipe="tensorwise", seed=3)
    assert {k: d[k] for k in ("sqnr_out_db", "sqnr_dgrad_db", "sqnr_wgrad_db")} == \
        {k: ref[k] for k in ("sqnr_out_db", "sqnr_dgrad_db", "sqnr_wgrad_db")}
    assert d["adamw_state_bytes"]["fp32"] == 8 * 128 * 256  # exp_avg + exp_avg_sq in float32, by hand
    assert d["adamw_state_bytes"]["fp32"] / d["adamw_state_bytes"]["fp8"] >= 3.8
    rc, o2, _ = run_main(capsys, "fp8", "--shape", "64,128,256", "--recipe", "rowwise", "--seed", "3", "--json")
    assert rc == 0 and json.loads(o2)["sqnr_out_db"] != d["sqnr_out_db"]  # another recipe, other numerics
    rc, o3, _ = run_main(capsys, "fp8", "--shape", "64,128,256", "--recipe", "coat", "--seed", "4", "--json")
    assert json.loads(o3)["sqnr_out_db"] != d["sqnr_out_db"]  # the seed draws other inputs


def test_fp8_block_is_readable(capsys):
    rc, o, e = run_main(capsys, "fp8", "--shape", "32,64,128")
    assert rc == 0, e
    lines = o.splitlines()
    assert lines[0].startswith("FP8 linear, M,K,N = 32,64,128") and "recipe tensorwise" in lines[0]
    assert re.search(r"output [0-9.]+ dB, input gradient [0-9.]+ dB, weight gradient [0-9.]+ dB", lines[1]), o
    assert "fp32 65,536 bytes" in lines[2], o  # 2 x 4 bytes x 64 x 128


def test_fp8_shapes_the_gemm_cannot_take_are_padded_or_refused(capsys):
    rc, o, e = run_main(capsys, "fp8", "--shape", "30,100,200", "--json")
    if rc == 0:  # padded: the report must say so
        assert "pad" in o, o
    else:
        assert rc == 2 and e.count("\n") == 1 and "16" in e, e


@pytest.mark.parametrize("argv, needle", [
    (["--shape", "4096x4096"], "must be M,K,N: three whole numbers separated by commas"),
    (["--shape", "4096,4096"], "three whole numbers"),
    (["--shape", "-1,64,64"], "M must be at least 1, got -1"),
    (["--shape", "64,0,64"], "K must be at least 1, got 0"),
    (["--shape", "a,b,c"], "got 'a,b,c'"),
    (["--shape", "64,64,64", "--recipe", "rowise"], "unknown recipe 'rowise'; did you mean 'rowwise'?"),
    (["--shape", "64,64,64", "--seed", "-1"], "argument --seed: must be 0 or more"),
    (["--shape", "1048576,1024,64"], "more than 268,435,456"),
    ([], "required: --shape"),
])
def test_fp8_bad_input_is_one_line(capsys, argv, needle):
    rc, o, e = run_main(capsys, "fp8", *argv)
    assert rc == 2 and o == "" and e.count("\n") == 1 and e.startswith("nvila-lab fp8: error: "), e
    assert needle in e, e


# ---------------------------------------------------------------- prune

@pytest.fixture(scope="module")
def prune_set(tmp_path_factory):
    from nvila_lab.data import make_dataset
    return make_dataset(["colour", "position", "count"], n=5, seed=3, out_dir=tmp_path_factory.mktemp("prune") / "set",
                        progress=False)


def test_prune_random_writes_a_dataset_train_and_eval_read(capsys, tmp_path, prune_set):
    from nvila_lab.data import load_dataset
    from nvila_lab.prune.select import select_random
    rc, o, e = run_main(capsys, "prune", "--data", str(prune_set), "--keep", "0.5", "--method", "random",
                        "--seed", "2", "--out", str(tmp_path / "r"), "--json")
    assert rc == 0, e
    d = json.loads(o)
    assert (d["method"], d["keep"], d["seed"], d["kept"], d["total"]) == ("random", 0.5, 2, 9, 15)
    assert d["counts"]["subsets"] == {t: {"kept": 3, "total": 5} for t in ("colour", "position", "count")}
    assert sum(c["kept"] for c in d["counts"]["kinds"].values()) == 9
    kept = [r["id"] for r in load_dataset(tmp_path / "r")]
    assert kept == select_random(load_dataset(prune_set), 0.5, seed=2)
    rc, o, e = run_main(capsys, "prune", "--data", str(prune_set), "--keep", "0.5", "--method", "random",
                        "--out", str(tmp_path / "t"))  # the table
    assert rc == 0 and "PruneResult(random seed 0, keep 0.5: 9/15 kept" in o and "colour" in o, o


@pytest.mark.parametrize("argv, needle", [
    (["--keep", "0", "--method", "random"], "keep must be in (0, 1]"),
    (["--keep", "1.5", "--method", "random"], "keep must be in (0, 1]"),
    (["--keep", "nan", "--method", "random"], "keep must be"),
    (["--keep", "half", "--method", "random"], "argument --keep: invalid float value"),
    (["--keep", "0.5", "--method", "randm"], "unknown method 'randm'; did you mean 'random'?"),
    (["--keep", "0.5"], "--method deltaloss needs --large and --small"),
    (["--keep", "0.5", "--method", "cluster"], "--method cluster needs --large"),
    (["--keep", "0.5", "--method", "deltaloss", "--large", "nowhere", "--small", "nowhere"], "checkpoint folder 'nowhere' not found"),
    (["--keep", "0.5", "--method", "deltaloss", "--score", "median", "--large", "data_samples/checkpoints/nano-nvila",
      "--small", "data_samples/checkpoints/nano-nvila"], "unknown score 'median'"),
])
def test_prune_bad_input_is_one_line(capsys, tmp_path, prune_set, argv, needle):
    rc, o, e = run_main(capsys, "prune", "--data", str(prune_set), "--out", str(tmp_path / "o"), *argv)
    assert rc == 2 and o == "" and e.count("\n") == 1 and e.startswith("nvila-lab prune: error: "), e
    assert needle in e, e
    assert not (tmp_path / "o").exists()


def test_prune_refuses_a_used_out_and_a_missing_dataset(capsys, tmp_path, prune_set):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    for data, out, needle in ((str(prune_set), "used", "is not empty"), (str(tmp_path / "none"), "o", "not found")):
        rc, o, e = run_main(capsys, "prune", "--data", data, "--keep", "0.5", "--method", "random",
                            "--out", str(tmp_path / out))
        assert rc == 2 and e.count("\n") == 1 and needle in e, e
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("method", ["deltaloss", "cluster"])
def test_prune_with_models_from_the_command_line(capsys, tmp_path, prune_set, method):
    from nvila_lab.data import load_dataset
    nano = "data_samples/checkpoints/nano-nvila"
    models = ["--large", nano] + (["--small", nano] if method == "deltaloss" else [])
    rc, o, e = run_main(capsys, "prune", *models, "--data", str(prune_set), "--keep", "0.2", "--method", method,
                        "--out", str(tmp_path / "o"), "--json")
    assert rc == 0, e
    d = json.loads(o)
    assert d["kept"] == 3 and d["total"] == 15 and d["method"] == method  # ceil(0.2 * 5) = 1 per task
    assert len(load_dataset(tmp_path / "o")) == 3
    assert (tmp_path / "o" / "scores.parquet").is_file() == (method == "deltaloss")
