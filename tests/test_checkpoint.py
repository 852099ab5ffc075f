"""Checkpoints: the released NVILA folder layout, exact round trips, released-style folders, and every refusal."""
from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nvila_lab.checkpoint as ckpt
import nvila_lab.checkpoint_save as ckpt_save
from nvila_lab.checkpoint import (CheckpointError, _build_parts, _disk_state, checkpoint_config, expected_keys,
                                  inspect_checkpoint, load_nvila, save_nvila)
from nvila_lab.config import get_config
from nvila_lab.data import load_tokenizer, make_sample
from nvila_lab.encoder import ImageEncoder
from nvila_lab.model import MEDIA_TOKENS, NVILAModel

PROMPT = "<|im_start|>user\n<image>What is the code 47?<|im_end|>"


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def img():
    return make_sample("read_code")["image"]


@pytest.fixture(scope="module")
def tiny(tok):
    return NVILAModel("tiny", tok)


@pytest.fixture()
def saved(tiny, tmp_path) -> Path:
    return save_nvila(tiny, tmp_path / "tiny-nvila")


def released_vision_keys(layers: int) -> list[str]:
    "The vision_tower/ key names of a released NVILA checkpoint (437 for 27 layers)."
    keys = ["vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.patch_embedding.bias",
            "vision_model.embeddings.position_embedding.weight", "vision_model.post_layernorm.weight",
            "vision_model.post_layernorm.bias"]
    for i in range(layers):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"vision_model.encoder.layers.{i}.{m}.weight", f"vision_model.encoder.layers.{i}.{m}.bias"]
    return keys


def released_style(src: Path, dst: Path, drop_media: bool = True) -> Path:
    "A copy of our folder written the way transformers 4.46 / VILA wrote released checkpoints."
    shutil.copytree(src, dst)
    root = json.loads((dst / "config.json").read_text())
    root.pop("nvila_lab")
    root["_name_or_path"] = f"Efficient-Large-Model/{dst.name}"
    root["resume_path"] = "runs/train/nvila-tiny/model"
    llm = json.loads((dst / "llm/config.json").read_text())
    for k in ("dtype", "rope_parameters", "layer_types"):
        llm.pop(k, None)
    llm["transformers_version"] = "4.46.0"
    root["llm_cfg"] = llm
    (dst / "config.json").write_text(json.dumps(root))
    (dst / "llm/config.json").write_text(json.dumps(llm))
    if drop_media:
        tj = json.loads((dst / "llm/tokenizer.json").read_text())
        gone = sorted(t["id"] for t in tj["added_tokens"] if t["content"] in MEDIA_TOKENS.values())
        shift = lambda i: i - sum(g < i for g in gone)
        tj["added_tokens"] = [{**t, "id": shift(t["id"])} for t in tj["added_tokens"] if t["id"] not in gone]
        tj["model"]["vocab"] = {s: shift(i) for s, i in tj["model"]["vocab"].items() if i not in gone}
        (dst / "llm/tokenizer.json").write_text(json.dumps(tj))
        tc = json.loads((dst / "llm/tokenizer_config.json").read_text())
        for key in ("extra_special_tokens", "additional_special_tokens"):
            if key in tc:
                tc[key] = [t for t in tc[key] if t not in MEDIA_TOKENS.values()]
        (dst / "llm/tokenizer_config.json").write_text(json.dumps(tc))
    return dst


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- key names
def test_tiny_keys_follow_the_released_pattern(saved):
    want = expected_keys(get_config("tiny"))
    assert sorted(want["vision_tower"]) == sorted(released_vision_keys(3))
    assert list(want["mm_projector"]) == ["layers.1.weight", "layers.1.bias", "layers.2.weight", "layers.2.bias",
                                          "layers.4.weight", "layers.4.bias"]
    assert "lm_head.weight" not in want["llm"]  # tied embeddings are stored once
    for part, shapes in want.items():
        stored = load_file(saved / part / "model.safetensors")
        assert {k: tuple(v.shape) for k, v in stored.items()} == shapes


def test_real_sizes_on_meta_match_the_released_files():
    n = lambda shapes: sum(torch.Size(s).numel() for s in shapes.values())
    k8 = expected_keys(get_config("nvila-8b"))
    assert sorted(k8["vision_tower"]) == sorted(released_vision_keys(27))
    assert (len(k8["vision_tower"]), n(k8["vision_tower"])) == (437, 413_327_088)  # 826.7 MB in bf16 (HF: 827 MB)
    assert n(k8["mm_projector"]) == 62_425_088  # 124.9 MB in bf16 (HF: 125 MB)
    assert k8["mm_projector"]["layers.1.weight"] == (4 * 3456,)
    assert "lm_head.weight" in k8["llm"]  # Qwen2.5-7B does not tie
    lite = get_config("nvila-lite-2b")
    kl = expected_keys(lite)
    assert sorted({k.rsplit(".", 1)[0] for k in kl["mm_projector"]}) == ["layers.1", "layers.2", "layers.4", "layers.5",
                                                                         "layers.7"]
    assert "lm_head.weight" not in kl["llm"]  # Qwen2.5-1.5B ties
    wide = lite.replace(llm_hidden=3584, llm_heads=28, llm_kv_heads=4)
    assert n(expected_keys(wide)["mm_projector"]) == 61_101_440  # NVILA-Lite-8B: 122 MB in bf16
    for name in ("nvila-lite-2b", "nvila-8b"):  # what save_nvila would write, on the meta device
        c = get_config(name)
        written = {p: {k: tuple(v.shape) for k, v in _disk_state(p, m).items()}
                   for p, m in _build_parts(c, device="meta").items()}
        assert written == expected_keys(c)


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("preset,shard", [("tiny", "5GB"), ("tiny-lite", "5GB"), ("tiny", "200KB")])
def test_round_trip_is_exact(tok, img, tmp_path, preset, shard):
    m = NVILAModel(preset, tok)
    folder = save_nvila(m, tmp_path / preset, max_shard_size=shard)
    if shard != "5GB":
        assert (folder / "llm/model.safetensors.index.json").is_file()
        assert len(list((folder / "llm").glob("model-*-of-*.safetensors"))) > 1
    back = load_nvila(folder)
    assert back.cfg == m.cfg
    assert same_weights(back, m)
    assert back.llm.lm_head.weight is back.llm.model.embed_tokens.weight
    assert not back.training
    assert back.tokenizer(PROMPT).input_ids == m.tokenizer(PROMPT).input_ids
    assert back.tokenizer.chat_template == m.tokenizer.chat_template
    assert back.added_tokens == []
    assert back.generate(img, "What is the code?", max_new_tokens=6) == m.generate(img, "What is the code?", max_new_tokens=6)
    sample = dict(max_new_tokens=8, do_sample=True, seed=5)
    assert back.generate(img, "How many dots?", **sample) == m.generate(img, "How many dots?", **sample)
    with torch.no_grad():
        assert back([img], ["What colour?"], ["red"]).item() == m.eval()([img], ["What colour?"], ["red"]).item()


def test_saved_configs_carry_what_vila_reads(saved, tiny):
    root = json.loads((saved / "config.json").read_text())
    assert root["model_type"] == "llava_llama" and root["architectures"] == ["LlavaLlamaModel"]
    assert root["model_dtype"] == "torch.float32" and root["resume_path"]
    assert (root["image_aspect_ratio"], root["dynamic_s2"], root["s2_scales"]) == ("dynamic_s2", True, "64,128,192")
    assert (root["s2_max_split_size"], root["s2_resize_output_to_scale_idx"]) == (64, -1)
    assert (root["mm_projector_type"], root["mm_hidden_size"], root["hidden_size"]) == ("mlp_downsample", 192, 128)
    assert (root["mm_vision_select_layer"], root["mm_vision_select_feature"]) == (-2, "cls_patch")
    assert (root["max_tiles"], root["min_tiles"], root["num_video_frames"]) == (12, 1, 8)
    assert root["nvila_lab"]["config"] == tiny.cfg.to_dict()
    for k in ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg"):
        assert isinstance(root[k], dict)
    llm = json.loads((saved / "llm/config.json").read_text())
    assert (llm["rope_theta"], llm["rope_scaling"], llm["torch_dtype"]) == (1e4, None, "float32")
    assert llm["eos_token_id"] == tiny.end_id
    vt = json.loads((saved / "vision_tower/config.json").read_text())
    assert vt["vision_use_head"] is False and vt["architectures"] == ["SiglipVisionModel"]
    pre = json.loads((saved / "vision_tower/preprocessor_config.json").read_text())
    assert (pre["image_processor_type"], pre["image_mean"], pre["image_std"], pre["resample"], pre["size"]) == \
        ("SiglipImageProcessor", [0.5] * 3, [0.5] * 3, 3, {"height": 64, "width": 64})
    mp = json.loads((saved / "mm_projector/config.json").read_text())
    assert (mp["architectures"], mp["mm_projector_type"], mp["model_type"], mp["torch_dtype"]) == \
        (["MultimodalProjector"], "mlp_downsample", "v2l_projector", "float32")
    assert not [p for p in saved.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".jinja")]
    assert (saved / "llm/generation_config.json").is_file()
    tc = json.loads((saved / "llm/tokenizer_config.json").read_text())
    assert tc.get("chat_template") and "is_local" not in tc  # template inside, as transformers 4 reads it


def test_parts_open_with_plain_transformers(saved, tiny):
    "Each sub-folder is an ordinary Hugging Face folder (the vision keys' prefix is understood)."
    from transformers import AutoConfig, Qwen2ForCausalLM, SiglipVisionModel
    assert AutoConfig.from_pretrained(saved / "llm").rope_parameters["rope_theta"] == 1e4
    llm = Qwen2ForCausalLM.from_pretrained(saved / "llm")
    assert same_weights(llm, tiny.llm)
    tower = SiglipVisionModel.from_pretrained(saved / "vision_tower")
    assert same_weights(tower, tiny.vision_tower)


def test_our_nvila_lab_entry_wins(saved, tiny):
    edit_json(saved / "config.json", image_aspect_ratio="resize", dynamic_s2=False)
    assert checkpoint_config(saved) == tiny.cfg


# ---------------------------------------------------------------- released-style folders
def test_released_style_folder_loads_clean(saved, tiny, tmp_path, img):
    rel = released_style(saved, tmp_path / "NVILA-tiny")
    assert all(k.startswith("vision_model.") for k in load_file(rel / "vision_tower/model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing / unexpected tensors, nothing unfollowed
        m = load_nvila(rel)
    assert m.cfg == tiny.cfg.replace(name="NVILA-tiny")
    assert same_weights(m.encoder, tiny.encoder) and same_weights(m.llm, tiny.llm)
    assert m.added_tokens == ["<vila/sentinel>", "<image>", "<vila/video>"]
    assert [m.tokenizer.convert_tokens_to_ids(t) for t in m.added_tokens] == [408, 409, 410]
    assert isinstance(m.generate(img, "What is the code?", max_new_tokens=3), str)
    info = inspect_checkpoint(rel)
    assert info["format"] == "NVILA/VILA (llava_llama)" and info["media_tokens"] is False and info["issues"] == []


def test_unprefixed_vision_keys_are_accepted(saved, tiny):
    f = saved / "vision_tower/model.safetensors"
    sd = {k.removeprefix("vision_model."): v for k, v in load_file(f).items()}
    save_file(sd, str(f), metadata={"format": "pt"})
    assert same_weights(load_nvila(saved).vision_tower, tiny.vision_tower)


def test_tokenizer_outgrowing_vocab_resizes_embeddings(tok, tmp_path):
    small = NVILAModel(get_config("tiny", vocab_size=len(tok)), tok)
    rel = released_style(save_nvila(small, tmp_path / "small"), tmp_path / "NVILA-small")
    m = load_nvila(rel)
    emb = m.llm.get_input_embeddings().weight
    assert (len(m.tokenizer), m.cfg.vocab_size, emb.shape[0]) == (411, 411, 411)
    assert torch.equal(emb[:410], small.llm.get_input_embeddings().weight)
    assert m.llm.lm_head.weight is emb  # still tied after the resize


def test_lite_released_style_and_its_projector_type(tok, tmp_path):
    lite = NVILAModel("tiny-lite", tok)
    src = save_nvila(lite, tmp_path / "lite")
    root = json.loads((src / "config.json").read_text())
    assert (root["mm_projector_type"], root["image_aspect_ratio"], root["dynamic_s2"], root["mm_hidden_size"]) == \
        ("mlp_downsample_3x3_fix", "dynamic", False, 64)
    m = load_nvila(released_style(src, tmp_path / "NVILA-Lite-tiny"))
    assert m.cfg == lite.cfg.replace(name="NVILA-Lite-tiny")
    assert same_weights(m.mm_projector, lite.mm_projector)


def test_video_pooling_travels_as_vilas_video_encoder(tok, tmp_path):
    video = NVILAModel("tiny-video", tok)
    src = save_nvila(video, tmp_path / "video")
    root = json.loads((src / "config.json").read_text())
    assert json.loads(root["video_encoder"]) == {"_target_": "llava.model.encoders.TSPVideoEncoder",
                                                 "pool_sizes": [[4, 1, 1]]}
    m = load_nvila(released_style(src, tmp_path / "NVILA-video-tiny"))
    assert (m.cfg.num_video_frames, m.cfg.temporal_pool, m.temporal.pool) == (32, 4, 4)
    edit_json(tmp_path / "NVILA-video-tiny/config.json", video_encoder='{"pool_sizes": [[2, 2, 2]]}')
    with pytest.raises(CheckpointError, match="pools space"):
        load_nvila(tmp_path / "NVILA-video-tiny")
    edit_json(tmp_path / "NVILA-video-tiny/config.json", video_encoder="{not json")
    with pytest.raises(CheckpointError, match="video_encoder"):
        load_nvila(tmp_path / "NVILA-video-tiny")


# ---------------------------------------------------------------- refusals and errors
@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "config.json").unlink(), "missing config.json"),
    (lambda f: shutil.rmtree(f / "llm"), "missing llm/"),
    (lambda f: (f / "vision_tower/config.json").unlink(), "missing vision_tower/config.json"),
    (lambda f: (f / "mm_projector/model.safetensors").unlink(), "missing mm_projector/model.safetensors"),
])
def test_incomplete_folders_name_what_is_missing(saved, damage, message):
    damage(saved)
    with pytest.raises(CheckpointError, match=message):
        load_nvila(saved)
    with pytest.raises(CheckpointError, match=message):
        inspect_checkpoint(saved)


def test_missing_shard_and_tokenizer(tok, tmp_path):
    f = save_nvila(NVILAModel("tiny", tok), tmp_path / "sharded", max_shard_size="200KB")
    shard = sorted((f / "llm").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard\\(s\\) {shard.name} that are missing"):
        load_nvila(f)
    g = save_nvila(NVILAModel("tiny", tok), tmp_path / "notok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (g / "llm" / name).unlink()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_nvila(g)


def test_nonexistent_and_file_paths(tmp_path, saved):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_nvila(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="is a file"):
        load_nvila(saved / "llm/model.safetensors")


def test_pickles_are_refused_without_being_read(saved, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a pickle was opened")
    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    (saved / "vision_tower/model.safetensors").unlink()
    bin_file = saved / "vision_tower/pytorch_model.bin"
    bin_file.write_bytes(b"\x80\x04not a real pickle")
    with pytest.raises(CheckpointError, match="refuses pickles for safety") as e:
        load_nvila(saved)
    assert "torch.load(" in str(e.value) and "weights_only=True" in str(e.value) and "save_file" in str(e.value)
    with pytest.raises(CheckpointError, match="refuses pickles"):
        inspect_checkpoint(saved)
    with pytest.raises(CheckpointError, match="refuses pickles"):
        load_nvila(bin_file)
    only = tmp_path / "only-pickles"  # a training run's folder: a .ckpt and no config.json
    only.mkdir()
    (only / "last.ckpt").write_bytes(b"x")
    (only / "weights.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="refuses pickles"):
        load_nvila(only)


def test_shape_mismatch_names_tensor_shapes_and_cause(tok, saved, tmp_path):
    rel = released_style(saved, tmp_path / "rel")
    edit_json(rel / "config.json", image_aspect_ratio="dynamic", dynamic_s2=False)
    with pytest.raises(CheckpointError) as e:
        load_nvila(rel)
    msg = str(e.value)
    assert "mm_projector expects 192 input channels: is image_aspect_ratio dynamic_s2?" in msg
    assert "layers.1.weight is (768,)" in msg and "expects (256,)" in msg
    assert any("192 input channels" in i for i in inspect_checkpoint(rel)["issues"])
    lite = released_style(save_nvila(NVILAModel("tiny-lite", tok), tmp_path / "lite"), tmp_path / "lite-rel")
    edit_json(lite / "config.json", image_aspect_ratio="dynamic_s2", dynamic_s2=True)
    with pytest.raises(CheckpointError, match="expects 64 input channels: is image_aspect_ratio dynamic"):
        load_nvila(lite)
    rel2 = released_style(saved, tmp_path / "rel2")
    edit_json(rel2 / "llm/config.json", vocab_size=2048)
    with pytest.raises(CheckpointError, match="embed_tokens.weight is \\(1024, 128\\).*vocab_size 2048"):
        load_nvila(rel2)


def test_missing_and_unexpected_tensors_strict_and_loose(saved, tiny):
    f = saved / "mm_projector/model.safetensors"
    sd = load_file(f)
    sd["layers.9.weight"] = sd.pop("layers.4.weight")
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing 1 tensor\\(s\\): layers.4.weight; unexpected 1 tensor\\(s\\): "
                                              "layers.9.weight.*strict=False"):
        load_nvila(saved)
    with pytest.warns(UserWarning, match="left randomly initialised.*Unexpected tensors are ignored"):
        m = load_nvila(saved, strict=False)
    assert torch.equal(m.mm_projector.layers[2].weight, tiny.mm_projector.layers[2].weight)
    w = m.mm_projector.layers[4].weight
    assert w.device.type == "cpu" and torch.isfinite(w).all()
    assert same_weights(m.llm, tiny.llm)


def test_vision_head_is_reported_as_such(saved):
    f = saved / "vision_tower/model.safetensors"
    sd = load_file(f)
    sd["vision_model.head.probe"] = torch.zeros(1, 1, 64)
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="pooling head"):
        load_nvila(saved)


def test_unknown_formats_and_projector_types(saved, tmp_path):
    rel = released_style(saved, tmp_path / "rel")
    edit_json(rel / "mm_projector/config.json", mm_projector_type="mlp2x_gelu")
    with pytest.raises(CheckpointError, match="'mlp2x_gelu' is not a projector nvila-lab implements"):
        load_nvila(rel)
    edit_json(saved / "config.json", model_type="nvila")
    with pytest.raises(CheckpointError, match="single-model 'nvila' format"):
        load_nvila(saved)


# ---------------------------------------------------------------- safe writing
def test_atomic_write_leaves_nothing_on_failure(tiny, tmp_path, monkeypatch):
    calls = []
    real = ckpt_save.save_file

    def failing(*a, **k):  # the vision tower is written, the projector's write dies
        calls.append(a[1])
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **k)
    monkeypatch.setattr(ckpt_save, "save_file", failing)
    target = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        save_nvila(tiny, target)
    assert not target.exists() and leftovers(tmp_path) == []
    # an existing checkpoint survives a failed overwrite untouched
    monkeypatch.setattr(ckpt_save, "save_file", real)
    old = save_nvila(NVILAModel(get_config("tiny"), tiny.tokenizer, llm=None), tmp_path / "keep")
    before = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    calls.clear()
    monkeypatch.setattr(ckpt_save, "save_file", failing)
    with pytest.raises(OSError):
        save_nvila(tiny, old, overwrite=True)
    assert {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    assert leftovers(tmp_path) == []


def test_overwrite_protection(tiny, tok, saved, tmp_path):
    with pytest.raises(CheckpointError, match="pass overwrite=True"):
        save_nvila(tiny, saved)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not an NVILA checkpoint"):
        save_nvila(tiny, other, overwrite=True)
    assert (other / "todo.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="is a file"):
        save_nvila(tiny, other / "todo.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert save_nvila(tiny, empty) == empty and (empty / "config.json").is_file()
    lite = NVILAModel("tiny-lite", tok)
    save_nvila(lite, saved, overwrite=True)
    assert load_nvila(saved).cfg == lite.cfg
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- dtypes, custom compressors, inspection
def test_bf16_save_and_load(tiny, tmp_path, img):
    f = save_nvila(tiny, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((f / "config.json").read_text())["model_dtype"] == "torch.bfloat16"
    assert json.loads((f / "llm/config.json").read_text())["torch_dtype"] == "bfloat16"
    info = inspect_checkpoint(f)
    assert all(set(p["dtypes"]) == {"bfloat16"} for p in info["parts"].values()) and info["model_dtype"] == "bfloat16"
    assert tiny.llm.dtype == torch.float32  # the model itself was not converted
    m = load_nvila(f)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    ref = {k: v.to(torch.bfloat16) for k, v in tiny.state_dict().items()}
    assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items() if v.is_floating_point() and k in ref)
    assert isinstance(m.generate(img, "What colour?", max_new_tokens=3), str)
    m32 = load_nvila(f, dtype=torch.float32)
    assert m32.llm.dtype == torch.float32
    assert torch.equal(m32.mm_projector.layers[2].weight, ref["encoder.projector.layers.2.weight"].float())


def test_custom_compressor_round_trip_and_note(tok, tmp_path, img):
    cfg = get_config("tiny", projector="avgpool", projector_kwargs={"k": 3})
    m = NVILAModel(cfg, tok)
    assert m.mm_projector.k == 3  # built from the config
    with pytest.warns(UserWarning, match="VILA cannot"):
        f = save_nvila(m, tmp_path / "avg")
    mp = json.loads((f / "mm_projector/config.json").read_text())
    assert mp["mm_projector_type"] == "avgpool" and "VILA cannot" in mp["nvila_lab_note"]
    back = load_nvila(f)
    assert back.cfg == cfg and back.mm_projector.k == 3 and same_weights(back, m)
    assert back.generate(img, "What colour?", max_new_tokens=4) == m.generate(img, "What colour?", max_new_tokens=4)


def test_settings_outside_the_config_are_refused(tok, tmp_path):
    with pytest.raises(TypeError, match=r"cfg.replace\(projector_kwargs=\{'k': 3\}\)"):
        ImageEncoder(get_config("tiny", projector="avgpool"), k=3)
    with pytest.raises(TypeError, match="read from model.cfg"):
        save_nvila(NVILAModel("tiny", tok), tmp_path / "x", projector_kwargs={"k": 3})
    assert not (tmp_path / "x").exists()


def test_model_not_matching_its_config_is_refused(tok, tmp_path):
    m = NVILAModel("tiny", tok, encoder=ImageEncoder(get_config("tiny", vision_layers=2)))
    with pytest.raises(CheckpointError, match="does not match model.cfg"):
        save_nvila(m, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and leftovers(tmp_path) == []


def test_inspect_checkpoint_summary(saved, tiny):
    info = inspect_checkpoint(saved)
    assert (info["format"], info["preset"], info["issues"], info["media_tokens"]) == ("nvila-lab", "tiny", [], True)
    assert info["config"] == tiny.cfg
    assert info["total_parameters"] == sum(p.numel() for p in tiny.parameters())
    assert {p: d["tensors"] for p, d in info["parts"].items()} == {"llm": 50, "vision_tower": 53, "mm_projector": 6}
    assert info["parts"]["vision_tower"]["bytes"] == (saved / "vision_tower/model.safetensors").stat().st_size
    assert "shaped like preset 'tiny'" in info["description"] and "mlp_downsample" in info["description"]


# ---------------------------------------------------------------- every registered compressor round-trips
from nvila_lab.compress import available_compressors, compressor_class  # noqa: E402
from nvila_lab.temporal import Video, encode_videos  # noqa: E402
from nvila_lab.temporal_compress import TEMPORAL_COMPRESSORS, temporal_for  # noqa: E402

# Non-default settings of the built-in compressors; a compressor registered later without an entry here is still
# round-tripped, with its default settings.
NON_DEFAULT = {"avgpool": {"k": 3}, "tokenlearner": {"n_tokens": 5, "hidden": 40},
               "perceiver": {"n_latents": 7, "depth": 1, "heads": 4}, "imagepool": {"n_tokens": 20}}


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    "Move every floating parameter away from its initial value (so a fresh rebuild could not pass by accident)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", available_compressors())
def test_every_registered_compressor_round_trips(name, tok, tmp_path, img):
    cfg = get_config("tiny", projector=name, projector_kwargs=NON_DEFAULT.get(name, {}))
    m = NVILAModel(cfg, tok).eval()
    _perturb(m.mm_projector)
    try:
        with torch.no_grad():
            want = m.encoder(img)
    except NotImplementedError as e:
        pytest.skip(f"{name}: the image encoder cannot run it yet ({e})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the kit's own compressors warn that VILA cannot load them
        f = save_nvila(m, tmp_path / name)
    back = load_nvila(f)
    assert back.cfg == cfg and back.cfg.projector_kwargs == NON_DEFAULT.get(name, {})
    assert type(back.mm_projector) is compressor_class(name) and same_weights(back, m)
    with torch.no_grad():
        got = back.encoder(img)
    assert len(got.segments) == len(want.segments)
    assert all(torch.equal(a, b) for a, b in zip(got.segments, want.segments))


@pytest.mark.parametrize("name", sorted(TEMPORAL_COMPRESSORS))
def test_every_temporal_compressor_round_trips(name, tok, tmp_path):
    cfg = get_config("tiny-video", temporal_compressor=name, temporal_pool=2, temporal_kwargs={"tail": "average"})
    m = NVILAModel(cfg, tok).eval()
    m.temporal = temporal_for(cfg)
    _perturb(m.temporal)
    f = save_nvila(m, tmp_path / name)
    learned = bool(m.temporal.state_dict())
    assert (f / ckpt.TEMPORAL_DIR).is_dir() == learned  # only a learned one writes the kit's extra folder
    root = json.loads((f / "config.json").read_text())
    assert json.loads(root["video_encoder"])["pool_sizes"] == [[2, 1, 1]]  # VILA's key, as VILA spells it
    back = load_nvila(f)
    assert back.cfg == cfg and type(back.temporal) is TEMPORAL_COMPRESSORS[name] and back.temporal.pool == 2
    assert back.temporal.tail == "average" and same_weights(back, m)
    clip = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, = encode_videos(m.encoder, [Video(clip)], m.temporal, num_frames=5)
        b, = encode_videos(back.encoder, [Video(clip)], back.temporal, num_frames=5)
    assert len(a.segments) == 3 and all(torch.equal(x, y) for x, y in zip(a.segments, b.segments))


def test_learned_temporal_weights_are_checked(tok, tmp_path):
    cfg = get_config("tiny-video", temporal_compressor="mixpool")
    m = NVILAModel(cfg, tok)
    m.temporal = temporal_for(cfg)
    f = save_nvila(m, tmp_path / "mix")
    shutil.rmtree(f / ckpt.TEMPORAL_DIR)
    with pytest.raises(CheckpointError, match="has no temporal_compressor/"):
        load_nvila(f)
    g = save_nvila(m, tmp_path / "mix2")
    save_file({"logits": torch.zeros(3, 1)}, str(g / ckpt.TEMPORAL_DIR / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not match 'mixpool'"):
        load_nvila(g)
    avg = save_nvila(NVILAModel("tiny-video", tok), tmp_path / "avg")
    assert not (avg / ckpt.TEMPORAL_DIR).exists()
    shutil.copytree(f.parent / "mix2" / ckpt.TEMPORAL_DIR, avg / ckpt.TEMPORAL_DIR)
    with pytest.raises(CheckpointError, match="has none"):
        load_nvila(avg)


# ---------------------------------------------------------------- s2_resize_output_to_scale_idx
@pytest.mark.parametrize("idx, ok", [(-1, True), (2, True), (0, False), (1, False), (-2, False), (3, False), (None, False)])
def test_merge_index_is_followed_or_refused(saved, tmp_path, idx, ok):
    rel = released_style(saved, tmp_path / "rel")
    root = json.loads((rel / "config.json").read_text())
    assert root["s2_resize_output_to_scale_idx"] == -1  # what the kit writes for Dynamic-S2 (NVILA's scripts use -1)
    if idx is None:
        root.pop("s2_resize_output_to_scale_idx")  # VILA's LlavaConfig default is 0
    else:
        root["s2_resize_output_to_scale_idx"] = idx
    (rel / "config.json").write_text(json.dumps(root))
    if ok:
        assert checkpoint_config(rel).tiling == "dynamic_s2"
    else:
        with pytest.raises(CheckpointError, match="s2_resize_output_to_scale_idx"):
            checkpoint_config(rel)


def test_s2_tiling_writes_and_reads_index_0(tok, tmp_path):
    f = save_nvila(NVILAModel(get_config("tiny", tiling="s2"), tok), tmp_path / "s2")
    assert json.loads((f / "config.json").read_text())["s2_resize_output_to_scale_idx"] == 0
    assert checkpoint_config(f).tiling == "s2"
    edit_json(f / "config.json", s2_resize_output_to_scale_idx=-1)
    with pytest.raises(CheckpointError, match="only at scale 0"):
        checkpoint_config(f)


# ---------------------------------------------------------------- errors are raised, not swallowed
class _FakeTok:
    def __init__(self, error):
        self.error, self.calls = error, 0

    def save_pretrained(self, folder, **kw):
        self.calls += 1
        if kw and self.error is not None:
            raise self.error


def test_tokenizer_save_only_retries_the_old_transformers_case(tmp_path):
    old = _FakeTok(TypeError("save_pretrained() got an unexpected keyword argument 'save_jinja_files'"))
    ckpt._save_tokenizer(old, tmp_path)
    assert old.calls == 2  # retried without the option
    with pytest.raises(TypeError, match="boom"):
        ckpt._save_tokenizer(_FakeTok(TypeError("boom")), tmp_path)


def test_tokenizer_load_errors_are_not_hidden(saved, monkeypatch):
    import transformers

    def fail(kind):
        def f(*a, **k):
            raise kind("simulated")
        return f
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail(RuntimeError))
    with pytest.raises(RuntimeError, match="simulated"):
        load_nvila(saved)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail(ValueError))
    with pytest.warns(UserWarning, match="PreTrainedTokenizerFast instead"):
        assert load_nvila(saved).tokenizer is not None  # the documented fallback, said out loud
    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "from_pretrained", fail(OSError))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="AutoTokenizer: simulated; PreTrainedTokenizerFast"):
        load_nvila(saved)


def test_missing_accelerate_is_an_error_not_a_fallback(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(ImportError):
        _build_parts(get_config("tiny"), device="cpu", empty=True)


def test_failed_cleanup_is_reported(tiny, saved, monkeypatch):
    real = shutil.rmtree

    def stuck(path, *a, **k):
        if ".old-" in str(path):
            raise OSError("busy")
        return real(path, *a, **k)
    monkeypatch.setattr(shutil, "rmtree", stuck)
    with pytest.warns(UserWarning, match="could not delete the replaced checkpoint"):
        save_nvila(tiny, saved, overwrite=True)
    monkeypatch.undo()
    left = leftovers(saved.parent)
    assert len(left) == 1 and ".old-" in left[0]
    shutil.rmtree(saved.parent / left[0])
