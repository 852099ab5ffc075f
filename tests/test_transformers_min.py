"""`load_tokenizer` on the oldest transformers `pyproject.toml` allows (and on 4.57, where loading the shipped folder
once failed): each version is pip-installed once into a cache folder under `.venv/` (reruns are free), then a
subprocess with that folder first on PYTHONPATH loads the shipped tokenizers and must give the same token ids,
special tokens and chat template as the transformers installed here. Skipped, with the reason, when pip cannot
reach the package index."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".venv" / "transformers-versions"
# transformers version -> the tokenizers and huggingface_hub it was released against (its own pins allow them)
VERSIONS = {"4.46.3": ("0.20.3", "0.26.5"), "4.57.3": ("0.22.1", "0.36.0")}

PROBE = r'''
import json, sys, transformers
from nvila_lab.data import CHAT_TEMPLATE, load_tokenizer, tokenizer_corpus
out = {"version": transformers.__version__}
texts = tokenizer_corpus()[::97] + ["<|im_start|>user\n<image><vila/video> Ünïcode 37\t<|im_end|>\n"]
msgs = [{"role": "user", "content": "<image>Count the dots."}, {"role": "assistant", "content": "4"}]
for folder in sys.argv[1:]:
    t = load_tokenizer(folder)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<vila/video>"]
    out[folder] = {"n": len(t), "ids": [t(x, add_special_tokens=False).input_ids for x in texts],
                   "special": t.convert_tokens_to_ids(special), "eos": t.eos_token_id, "pad": t.pad_token_id,
                   "template_is_kits": t.chat_template == CHAT_TEMPLATE,
                   "chat": t.apply_chat_template(msgs, tokenize=False),
                   "prompt": t.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)}
print(json.dumps(out))
'''
FOLDERS = [str(ROOT / "data_samples" / "tokenizer"), str(ROOT / "data_samples" / "checkpoints" / "nano-nvila" / "llm")]


def _probe(pythonpath: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath), "PYTHONWARNINGS": "ignore",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, *FOLDERS], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _install(version: str) -> Path:
    "The cache folder holding transformers==version (installed now if missing; skip if pip cannot reach the index)."
    target = CACHE / version
    if (target / ".complete").is_file():
        return target
    tokenizers, hub = VERSIONS[version]
    tmp = CACHE / f".{version}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", str(tmp), f"transformers=={version}", f"tokenizers=={tokenizers}", f"huggingface_hub=={hub}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"pip took over 300 s to install transformers=={version}; is the package index reachable?")
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        err = (r.stderr or r.stdout).strip().splitlines()
        pytest.skip(f"pip cannot install transformers=={version} here (no package index?): {err[-1] if err else r.returncode}")
    (tmp / ".complete").write_text(" ".join(cmd[5:]) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


@pytest.fixture(scope="module")
def current() -> dict:
    return _probe([str(ROOT)])


def test_declared_minimum_is_tested():
    "The lowest transformers this test installs is the lower bound pyproject.toml declares."
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.replace(" ", "").startswith("transformers>=")]
    lowest = min(VERSIONS, key=lambda v: tuple(int(x) for x in v.split(".")))
    assert lowest.rsplit(".", 1)[0] == spec.split(">=")[1].strip()


@pytest.mark.parametrize("version", list(VERSIONS))
def test_shipped_tokenizers_load_the_same_on(version, current):
    old = _probe([str(_install(version)), str(ROOT)])
    assert old["version"] == version  # the cached install shadowed the venv's transformers
    for folder in FOLDERS:
        assert old[folder] == current[folder], f"{folder} differs on transformers {version}"
        assert old[folder]["template_is_kits"] and old[folder]["chat"].endswith("4<|im_end|>\n")
