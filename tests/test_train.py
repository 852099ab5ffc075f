"""Training stages, the loop, and resumable states (safetensors + JSON, no pickles)."""
import json

import pytest
import torch
from torch import nn

from nvila_lab.data import SyntheticVQA, load_tokenizer
from nvila_lab.model import NVILAModel
from nvila_lab.train import STAGES, Stage, TrainConfig, apply_stage, count_trainable, merge_lora, train


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def data():
    return SyntheticVQA(tasks=["colour"], n=64, seed=5)


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_freezes_what_it_says(tok, name):
    m = NVILAModel("tiny", tok)
    stage = STAGES[name]
    groups = {g["name"]: g for g in apply_stage(m, stage)}
    assert ("projector" in groups) == stage.projector
    assert ("vision" in groups) == (stage.vision != "frozen")
    assert ("llm" in groups) == (stage.llm != "frozen")
    if "vision" in groups:
        assert groups["vision"]["lr"] == pytest.approx(stage.lr * stage.vision_lr_scale)
    trainable = {id(p) for g in groups.values() for p in g["params"]}
    assert all(p.requires_grad == (id(p) in trainable) for p in m.parameters())


def test_peft_trains_layernorms_and_lora_then_merges(tok):
    m = NVILAModel("tiny", tok)
    before = {k: v.clone() for k, v in m.llm.state_dict().items()}
    apply_stage(m, "peft")
    ln = [mod for mod in m.vision_tower.modules() if isinstance(mod, nn.LayerNorm)]
    assert all(p.requires_grad for mod in ln for p in mod.parameters())
    assert count_trainable(m) < 0.3 * sum(p.numel() for p in m.parameters())
    merge_lora(m)
    assert set(m.llm.state_dict()) == set(before)  # peft wrapper gone, same names as a plain Qwen2


def test_bad_stage_settings():
    with pytest.raises(ValueError, match="llm must be one of"):
        Stage("x", llm="half")
    with pytest.raises(ValueError, match="trains nothing"):
        Stage("x", vision="frozen", projector=False, llm="frozen")


def test_loss_falls_and_history_is_logged(tok, data):
    m = NVILAModel("tiny", tok)
    h = train(m, data, TrainConfig(steps=16, batch_size=8, log_every=4), progress=False)
    assert [r["step"] for r in h.records] == [4, 8, 12, 16]
    assert h.losses[-1] < h.losses[0]


def test_resume_state_is_safetensors_and_json(tok, data, tmp_path):
    m = NVILAModel("tiny", tok)
    train(m, data, TrainConfig(steps=4, batch_size=4, log_every=2, out_dir=str(tmp_path)), progress=False)
    state = tmp_path / "train_state"
    assert sorted(p.name for p in state.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    assert json.loads((state / "state.json").read_text())["step"] == 4
    m2 = NVILAModel("tiny", tok)
    train(m2, data, TrainConfig(steps=4, batch_size=4), resume=state, progress=False)
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k


def test_callback_can_log_extra_values(tok, data):
    m = NVILAModel("tiny", tok)
    seen = []
    h = train(m, data, TrainConfig(steps=4, batch_size=4, log_every=2), progress=False,
              callback=lambda step, hist, model: seen.append(step) or {"probe": step * 10})
    assert seen == [2, 4] and h.records[-1]["probe"] == 40


def test_empty_data_is_refused(tok):
    with pytest.raises(ValueError, match="empty"):
        train(NVILAModel("tiny", tok), [], TrainConfig(steps=1), progress=False)
