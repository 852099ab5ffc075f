"""Training stages, the loop, and resumable states (safetensors + JSON, no pickles)."""
import json

import pytest
import torch
from torch import nn

from nvila_lab.data import SyntheticVQA, load_tokenizer
from nvila_lab.model import NVILAModel
from nvila_lab.train import STAGES, Stage, TrainConfig, apply_stage, count_trainable, get_stage, merge_lora, train


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
    with pytest.raises(ValueError, match="unknown stage 'image_sft'; did you mean 'image-sft'"):
        get_stage("image_sft")


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


def _saved(folder):
    from safetensors.torch import load_file
    st = json.loads((folder / "state.json").read_text())
    return load_file(str(folder / "optimizer.safetensors")), st


@pytest.mark.parametrize("stop", [1, 3])
def test_resume_after_real_steps_equals_a_straight_run(tok, tmp_path, stop):
    "N steps straight == K steps, stop, resume (into other weights) to N: weights, AdamW state, schedule, loss trace."
    mixed = SyntheticVQA(tasks=["colour", "position", "read_code"], n=3, seed=8)  # answers of 1-3 tokens
    tc = dict(steps=5, batch_size=4, log_every=1, save_every=2)
    torch.manual_seed(0)
    straight = NVILAModel("tiny", tok)
    h = train(straight, mixed, TrainConfig(**tc, out_dir=str(tmp_path / "a")), progress=False)
    torch.manual_seed(0)
    first = NVILAModel("tiny", tok)
    h1 = train(first, mixed, TrainConfig(**tc, out_dir=str(tmp_path / "b"), stop_after=stop), progress=False)
    assert [r["step"] for r in h1.records] == list(range(1, stop + 1))
    _, st = _saved(tmp_path / "b" / "train_state")
    assert st["step"] == stop and st["scheduler"]["last_epoch"] == stop
    torch.manual_seed(99)
    resumed = NVILAModel("tiny", tok)  # other weights: everything must come from the state
    h2 = train(resumed, mixed, TrainConfig(**tc, out_dir=str(tmp_path / "b")), resume=tmp_path / "b" / "train_state",
               progress=False)
    assert [r["step"] for r in h2.records] == [1, 2, 3, 4, 5]
    assert h2.losses == pytest.approx(h.losses, rel=1e-5)
    assert h.losses[0] != pytest.approx(h.losses[-1])
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    (ta, sa), (tb, sb) = _saved(tmp_path / "a" / "train_state"), _saved(tmp_path / "b" / "train_state")
    assert sa["scheduler"] == sb["scheduler"] and sa["scheduler"]["last_epoch"] == 5
    assert sa["optimizer"]["scalars"] == sb["optimizer"]["scalars"]  # AdamW's step counts
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]  # learning rates after 5 steps
    assert sorted(ta) == sorted(tb) and len(ta) > 10
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-7), k  # first and second moments
    assert sum(v.abs().sum().item() for v in ta.values()) > 0


def test_resume_without_the_state_fails_the_check(tok, tmp_path):
    "The comparison above can fail: a run restarted from scratch (no resume) at the stop point differs."
    mixed = SyntheticVQA(tasks=["colour", "position"], n=4, seed=8)
    torch.manual_seed(0)
    a = NVILAModel("tiny", tok)
    ha = train(a, mixed, TrainConfig(steps=4, batch_size=4, log_every=1), progress=False)
    torch.manual_seed(0)
    b = NVILAModel("tiny", tok)
    train(b, mixed, TrainConfig(steps=4, batch_size=4, log_every=1, stop_after=2), progress=False)
    hb = train(b, mixed, TrainConfig(steps=4, batch_size=4, log_every=1), progress=False)  # a fresh optimizer at step 0
    assert hb.losses != pytest.approx(ha.losses, rel=1e-5)


def test_global_batches_do_not_depend_on_the_process_count():
    from nvila_lab.train import shard, step_rows
    for step in range(7):
        rows = step_rows(10, 4, seed=3, step=step)
        assert len(rows) == 4
        for world in (1, 2, 3, 4):
            assert [i for r in range(world) for i in shard(rows, r, world)] == rows
    assert sorted(i for s in range(2) for i in step_rows(8, 4, 0, s)) == list(range(8))  # an epoch sees every row
    assert step_rows(3, 8, 0, 5) and sorted(step_rows(3, 8, 0, 5)) == [0, 1, 2]  # data smaller than a batch


def test_batch_smaller_than_the_processes_is_refused(tok):
    class TwoProcesses:
        num_processes, process_index, device, is_main_process = 2, 0, torch.device("cpu"), True
    with pytest.raises(ValueError, match="global batch and must be at least the number of processes"):
        train(NVILAModel("tiny", tok), SyntheticVQA(tasks=["colour"], n=2, seed=1), TrainConfig(steps=1, batch_size=1),
              progress=False, accelerator=TwoProcesses())


def test_answer_loss_is_the_token_mean(tok):
    from nvila_lab.train import AnswerLoss
    rows = [SyntheticVQA(tasks=["colour", "read_code"], n=2, seed=2)[i] for i in range(4)]
    args = ([r["image"] for r in rows], [r["question"] for r in rows], [r["answer"] for r in rows])
    m = NVILAModel("tiny", tok).eval()
    with torch.no_grad():
        total, n = AnswerLoss(m)(*args)
        assert (total / n).item() == pytest.approx(m(*args).item(), rel=1e-5)
        t1, n1 = AnswerLoss(m)(*(a[:1] for a in args))
        t3, n3 = AnswerLoss(m)(*(a[1:] for a in args))
        assert ((t1 + t3) / (n1 + n3)).item() == pytest.approx((total / n).item(), rel=1e-4)


def test_callback_can_log_extra_values(tok, data):
    m = NVILAModel("tiny", tok)
    seen = []
    h = train(m, data, TrainConfig(steps=4, batch_size=4, log_every=2), progress=False,
              callback=lambda step, hist, model: seen.append(step) or {"probe": step * 10})
    assert seen == [2, 4] and h.records[-1]["probe"] == 40


def test_empty_data_is_refused(tok):
    with pytest.raises(ValueError, match="empty"):
        train(NVILAModel("tiny", tok), [], TrainConfig(steps=1), progress=False)
