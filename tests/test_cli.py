"""The `nvila-lab` command line, run as a real process (`python -m nvila_lab.cli`, the same `main` as the console script).

Worked values of the paper with `--json`, every bad input of the issue (status 2, one line on stderr naming the
problem, never a traceback), the human table, and the promise that the command stays free of `transformers`.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nvila_lab import __version__
from nvila_lab.config import list_presets

CMD = [sys.executable, "-m", "nvila_lab.cli"]


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
    assert b["llm_positions"] == 847 + 7  # every tile (and the thumbnail) is its own segment
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


def test_importtime_has_no_transformers():
    r = subprocess.run([sys.executable, "-X", "importtime", *CMD[1:], "budget", "1344x896", "--preset", "nvila-8b"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "torch" in imported  # the meta-device compressor
    assert not [m for m in imported if m.split(".")[0] == "transformers"]


def test_presets_and_version_do_not_import_torch():
    code = ("import sys, contextlib, io\nfrom nvila_lab.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['presets']) == 0 and main(['--version']) == 0\n"
            "print('torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
