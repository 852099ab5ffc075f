"""`nvila-lab quantize` end to end, as a real process: the shipped nano-nvila becomes a W8A8 + W4A16 AWQ folder that
`eval` and `ask` load unchanged and that scores within a stated tolerance of the float model on held-out data;
transformers loads its `llm/` through compressed-tensors with the kit's logits; every bad input of the issue is one
line and status 2, and the source checkpoint's bytes never change."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("compressed_tensors")

CMD = [sys.executable, "-m", "nvila_lab.cli"]
TOLERANCE = 0.05  # accuracy points the quantised model may lose on the held-out set (40 questions: 2 answers)


def cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CMD, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode()); h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def work(tmp_path_factory, root):
    "The quantised folder (W8A8 + AWQ), a held-out dataset, and the source's digest before quantising."
    d = tmp_path_factory.mktemp("quant")
    src = root / "data_samples" / "checkpoints" / "nano-nvila"
    before = digest(src)
    r = cli("make-data", "--n", "10", "--seed", "777", "--out", d / "heldout")
    assert r.returncode == 0, r.stderr
    r = cli("quantize", "--checkpoint", src, "--vit", "w8a8", "--llm", "awq4", "--calib", root / "data_samples" / "vqa",
            "--n-calib", "16", "--out", d / "q", "--json")
    assert r.returncode == 0, r.stderr
    return {"dir": d, "src": src, "before": before, "q": d / "q", "report": json.loads(r.stdout),
            "data": d / "heldout", "calib": root / "data_samples" / "vqa"}


def test_json_report(work):
    rep = work["report"]
    assert Path(rep["path"]) == work["q"]
    assert rep["settings"]["vit"] == "w8a8" and rep["settings"]["llm"] == "awq4" and rep["settings"]["group_size"] == 128
    vt, llm = rep["parts"]["vision_tower"], rep["parts"]["llm"]
    assert vt["calib_items"] == 16 and llm["calib_items"] == 16
    assert len(vt["layers"]) == 3 and len(llm["layers"]) == 4
    assert vt["worst"] == min(vt["layers"].values()) and 0.999 < vt["worst"] <= 1.0  # cosine: tiny tower is lossless
    assert llm["worst"] == max(llm["layers"].values()) and 0 < llm["mean"] <= llm["worst"] < 1e-2
    assert llm["settings"]["skipped"], "nano-nvila has GQA: the v->o group must be reported as skipped"


def test_source_unchanged_and_no_leftovers(work):
    assert digest(work["src"]) == work["before"]
    assert not [p for p in work["dir"].iterdir() if p.name.startswith(".")]


def test_eval_within_tolerance_of_float(work):
    got = {}
    for name, ck in (("float", work["src"]), ("quant", work["q"])):
        r = cli("eval", "--checkpoint", ck, "--data", work["data"], "--json")
        assert r.returncode == 0, r.stderr
        got[name] = json.loads(r.stdout)["accuracy"]
    assert got["float"] > 0.5, got  # the float model answers: a tolerance against a broken baseline means nothing
    assert abs(got["quant"] - got["float"]) <= TOLERANCE, got


def test_ask_loads_quantized(work, root):
    img = root / "data_samples" / "vqa" / "images" / "count_0_00000.png"
    r = cli("ask", "--checkpoint", work["q"], img, "How many dots are there?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "5"  # the shipped row's answer


def test_transformers_loads_llm_with_the_kits_logits(work):
    from transformers import AutoModelForCausalLM
    from nvila_lab.quant.export import load_model
    from nvila_lab.quant.integer import W4A16Linear
    kit = load_model(work["q"])
    hf = AutoModelForCausalLM.from_pretrained(work["q"] / "llm").eval()
    ids = torch.randint(0, 1024, (3, 57), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ours, theirs = kit.llm(ids).logits, hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert sum(isinstance(m, W4A16Linear) for m in kit.llm.modules()) == 28
    from nvila_lab.checkpoint_load import load_nvila
    with torch.no_grad():  # and it is not the float model
        assert (load_nvila(work["src"]).llm(ids).logits - theirs).abs().max() > 1e-3


def test_integers_are_the_kits(work):
    "What the library packed is what AWQ rounded: the stored int4 values reproduce the kit's dequantised weights."
    from safetensors.torch import load_file
    from nvila_lab.quant.export import load_model, read_llm_compressed
    sd = load_file(str(work["q"] / "llm" / "model.safetensors"))
    kit = load_model(work["q"])
    m = kit.llm.model.layers[2].mlp.down_proj
    q, s, z = read_llm_compressed(sd, "model.layers.2.mlp.down_proj")
    assert q.min() >= 0 and q.max() <= 15 and q.unique().numel() > 8
    w = (q.float().reshape(128, -1, 128) - z.float()[..., None]) * s.float()[..., None]  # by hand, from the file
    torch.testing.assert_close(w.reshape(128, 256), m.dequantized_weight().float())


def test_load_nvila_refuses_quantized(work):
    from nvila_lab.checkpoint_load import load_nvila
    with pytest.raises(ValueError, match="load_model"):
        load_nvila(work["q"])


def test_fp8_rtn_variant(work):
    out = work["dir"] / "fp8-rtn"
    r = cli("quantize", "--checkpoint", work["src"], "--vit", "fp8", "--llm", "rtn4", "--group-size", "64",
            "--calib", work["calib"], "--n-calib", "8", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["parts"]["vision_tower"]["method"] == "fp8" and rep["parts"]["llm"]["method"] == "rtn"
    from nvila_lab.quant.export import load_model
    m = load_model(out)
    modes = {x.mode for x in m.vision_tower.modules() if hasattr(x, "mode")}
    groups = {x.group_size for x in m.llm.modules() if hasattr(x, "group_size")}
    assert modes == {"fp8"} and groups == {64}
    cfg = json.loads((out / "llm" / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["weights"]["group_size"] == 64


def test_overwrite(work):
    out = work["dir"] / "ow"
    args = ["quantize", "--checkpoint", work["src"], "--vit", "none", "--llm", "rtn4", "--calib", work["calib"],
            "--n-calib", "4", "--out", out]
    assert cli(*args).returncode == 0
    r = cli(*args)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert cli(*args, "--overwrite").returncode == 0
    assert json.loads((out / "config.json").read_text())["quantization"]["llm"] == "rtn4"


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_bad_inputs(work):
    d, src, calib = work["dir"], work["src"], work["calib"]
    one_line_error(cli("quantize", "--checkpoint", work["q"], "--calib", calib, "--out", d / "b1"), "already quantised")
    one_line_error(cli("quantize", "--checkpoint", src, "--group-size", "96", "--calib", calib, "--out", d / "b2"),
                   "does not divide")
    one_line_error(cli("quantize", "--checkpoint", src, "--out", d / "b3"), "calibration data is needed")
    one_line_error(cli("quantize", "--checkpoint", src, "--calib", d / "nope", "--out", d / "b4"), "does not exist")
    (d / "empty").mkdir()
    (d / "empty" / "data.jsonl").write_text("")
    one_line_error(cli("quantize", "--checkpoint", src, "--calib", d / "empty", "--out", d / "b5"), "calibration")
    one_line_error(cli("quantize", "--checkpoint", src, "--alpha", "1.5", "--calib", calib, "--out", d / "b6"),
                   "[0, 1]")
    one_line_error(cli("quantize", "--checkpoint", src, "--vit", "int4", "--calib", calib, "--out", d / "b7"), "w8a8")
    # a folder inside the source: refused before anything is written there
    one_line_error(cli("quantize", "--checkpoint", src, "--calib", calib, "--out", src / "sub"), "inside it")
    for b in ("b1", "b2", "b3", "b4", "b5", "b6", "b7"):
        assert not (d / b).exists()
    assert not (src / "sub").exists()
    assert digest(src) == work["before"]


def test_nan_in_calibration_activations(work):
    "A checkpoint whose vision tower produces NaN: the calibration names the layer instead of writing garbage."
    from safetensors.torch import load_file, save_file
    bad = work["dir"] / "nan-src"
    shutil.copytree(work["src"], bad)
    f = bad / "vision_tower" / "model.safetensors"
    sd = load_file(str(f))
    key = next(k for k in sd if "layers.1.layer_norm1.weight" in k)
    sd[key][3] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    r = cli("quantize", "--checkpoint", bad, "--calib", work["calib"], "--n-calib", "4", "--out", work["dir"] / "b8")
    one_line_error(r, "NaN", "layer 1")
    assert not (work["dir"] / "b8").exists()
