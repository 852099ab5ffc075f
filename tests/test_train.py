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


# ---------------------------------------------------------------- precision: bf16, fp8, fp8-coat (issue 12)
# Small, fast runs: 64x64 pages encoded as one tile (16 visual tokens), a few steps each.

def _small(tasks=("colour", "position"), n=4, seed=8):
    return SyntheticVQA(tasks=list(tasks), n=n, seed=seed, size=(64, 64))


def _tc(**kw):
    return TrainConfig(**{"steps": 3, "batch_size": 4, "log_every": 1, "tiling": "resize", **kw})


def _llm_q(model):
    return model.llm.model.layers[0].self_attn.q_proj


def test_unknown_precision_is_one_line_with_a_hint():
    with pytest.raises(ValueError, match=r"unknown precision 'fp8_coat'; did you mean 'fp8-coat'\? Choices: fp32, bf16"):
        TrainConfig(precision="fp8_coat")
    tc = TrainConfig()
    tc.precision = "int4"  # changed after construction: train checks again
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        train(NVILAModel("tiny", load_tokenizer()), _small(), tc, progress=False)
    assert TrainConfig().precision == "fp32"


def test_bf16_autocasts_the_forward_and_keeps_fp32_master_weights(tok):
    seen = []
    torch.manual_seed(0)
    m = NVILAModel("tiny", tok)
    hook = _llm_q(m).register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    h16 = train(m, _small(), _tc(precision="bf16"), progress=False)
    hook.remove()
    assert set(seen) == {torch.bfloat16}  # the LLM's matmuls ran in bf16
    assert {p.dtype for p in m.parameters()} == {torch.float32}  # master weights (and the checkpoint) stay fp32
    torch.manual_seed(0)
    h32 = train(NVILAModel("tiny", tok), _small(), _tc(), progress=False)
    assert h16.losses == pytest.approx(h32.losses, rel=2e-2)  # close to fp32 ...
    assert h16.losses != h32.losses  # ... but not fp32 itself


def test_fp8_converts_the_llm_projections_for_the_run_only(tok):
    from nvila_lab.fp8.linear import FP8Linear
    torch.manual_seed(0)
    m = NVILAModel("tiny", tok)
    keys, params = list(m.state_dict()), {n: id(p) for n, p in m.named_parameters()}
    during = {}

    def look(step, hist, model):
        during.update({n: type(mod) for n, mod in model.named_modules() if isinstance(mod, nn.Linear)})
    train(m, _small(), _tc(precision="fp8", steps=1), progress=False, callback=look)
    fp8 = sorted(n for n, t in during.items() if issubclass(t, FP8Linear))
    assert fp8 and all(n.startswith("llm.") for n in fp8), fp8
    assert "llm.model.layers.0.self_attn.q_proj" in fp8 and "llm.model.layers.3.mlp.down_proj" in fp8
    assert not any(issubclass(during[n], FP8Linear) for n in during if n.startswith("encoder."))  # vision, projector
    assert not issubclass(during["llm.lm_head"], FP8Linear)
    assert all(type(mod) is nn.Linear for mod in m.modules() if isinstance(mod, nn.Linear))  # plain again
    assert list(m.state_dict()) == keys and {n: id(p) for n, p in m.named_parameters()} == params
    assert {p.dtype for p in m.parameters()} == {torch.float32}


def test_fp8_without_fp8_hardware_says_so_once(tok, capsys):
    import nvila_lab.train as tr
    from nvila_lab.fp8.linear import fp8_speed_available
    assert not fp8_speed_available(torch.device("cpu"))
    tr._SPEED_NOTED.clear()
    for _ in range(2):
        train(NVILAModel("tiny", tok), _small(), _tc(precision="fp8", steps=1), progress=False)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "speed" in line]
    assert len(lines) == 1 and "FP8 speed is not available on cpu" in lines[0], err


def _opt_file(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "optimizer.safetensors")), json.loads((folder / "state.json").read_text())


@pytest.mark.parametrize("precision", ["fp8-coat", "fp8-coat-sr"])
def test_fp8_coat_resume_after_real_steps_equals_a_straight_run(tok, tmp_path, precision, stop=3):
    """fp8-coat (and its stochastically rounded variant, whose random numbers come from the seed and the step): K
    steps, stop, resume (into other weights) to N == N straight, bitwise: weights, FP8 AdamW states, losses."""
    data = _small(("colour", "position", "read_code"), n=3)
    tc = dict(steps=4, save_every=2, precision=precision)
    torch.manual_seed(0)
    straight = NVILAModel("tiny", tok)
    h = train(straight, data, _tc(**tc, out_dir=str(tmp_path / "a")), progress=False)
    torch.manual_seed(0)
    first = NVILAModel("tiny", tok)
    train(first, data, _tc(**tc, out_dir=str(tmp_path / "b"), stop_after=stop), progress=False)
    _, st = _opt_file(tmp_path / "b" / "train_state")
    assert st["step"] == stop and st["train_config"]["precision"] == precision
    torch.manual_seed(99)
    resumed = NVILAModel("tiny", tok)
    h2 = train(resumed, data, _tc(**tc, out_dir=str(tmp_path / "b")), resume=tmp_path / "b" / "train_state",
               progress=False)
    assert [r["step"] for r in h2.records] == [1, 2, 3, 4]
    assert h2.losses == h.losses and h.losses[0] != h.losses[-1]  # bitwise the same losses
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    (ta, sa), (tb, sb) = _opt_file(tmp_path / "a" / "train_state"), _opt_file(tmp_path / "b" / "train_state")
    assert sa["optimizer"]["scalars"] == sb["optimizer"]["scalars"] and sa["scheduler"] == sb["scheduler"]
    assert sorted(ta) == sorted(tb)
    fp8 = [k for k, v in ta.items() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]
    assert fp8, {k: v.dtype for k, v in ta.items()}  # the moments really are stored in FP8 ...
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k  # ... and came back as FP8 after the resume (not cast to fp32)
        assert torch.equal(ta[k].float(), tb[k].float()), k
    assert any(ta[k].float().abs().sum() > 0 for k in fp8)
    from safetensors.torch import load_file, save_model
    save_model(NVILAModel("tiny", tok), str(tmp_path / "plain.safetensors"))  # a plain model's keys (tied weights once)
    assert set(load_file(str(tmp_path / "a" / "train_state" / "model.safetensors"))) == \
        set(load_file(str(tmp_path / "plain.safetensors")))


def test_fp8_coat_uses_fp8_adamw_and_resume_checks_the_precision(tok, tmp_path):
    from nvila_lab.fp8.optim import FP8AdamW
    from nvila_lab.train import make_optimizer
    assert isinstance(make_optimizer([{"params": [nn.Parameter(torch.zeros(4))]}], "fp8-coat"), FP8AdamW)
    assert make_optimizer([{"params": [nn.Parameter(torch.zeros(4))]}], "fp8-coat").param_groups[0]["rounding"] \
        == "nearest"  # COAT's kernels
    assert make_optimizer([{"params": [nn.Parameter(torch.zeros(4))]}], "fp8-coat-sr").param_groups[0]["rounding"] \
        == "stochastic"
    assert type(make_optimizer([{"params": [nn.Parameter(torch.zeros(4))]}], "fp8")) is torch.optim.AdamW
    m = NVILAModel("tiny", tok)
    train(m, _small(), _tc(precision="fp8-coat", steps=2, stop_after=1, out_dir=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match=r"trained with precision 'fp8-coat', not 'fp32': resume it with "
                                         r"precision='fp8-coat'") as e:
        train(m, _small(), _tc(steps=2, out_dir=str(tmp_path)), resume=tmp_path / "train_state", progress=False)
    assert "\n" not in str(e.value)
    assert all(type(mod) is nn.Linear for mod in m.modules() if isinstance(mod, nn.Linear))


def test_a_nan_weight_under_fp8_names_the_step_and_the_layer(tok):
    m = NVILAModel("tiny", tok)
    with torch.no_grad():
        _llm_q(m).weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 1 \(precision 'fp8'\): .*layers\.0\.self_attn\.q_proj") as e:
        train(m, _small(), _tc(precision="fp8"), progress=False)
    assert "\n" not in str(e.value)
    assert type(_llm_q(m)) is nn.Linear  # restored even though the run failed


def test_an_absurd_learning_rate_under_fp8_stops_at_the_step_it_breaks(tok):
    m = NVILAModel("tiny", tok)
    with pytest.raises(FloatingPointError, match=r"step [2-9] \(precision 'fp8-coat'\)"):
        train(m, _small(), _tc(precision="fp8-coat", steps=6, lr=1e30, grad_clip=0.0), progress=False)
    assert all(type(mod) is nn.Linear for mod in m.modules() if isinstance(mod, nn.Linear))


def test_a_nan_gradient_names_the_parameter_and_applies_no_update(tok):
    m = NVILAModel("tiny", tok)
    w = m.encoder.projector.proj[0].weight if hasattr(m.encoder.projector, "proj") else next(m.encoder.projector.parameters())
    name = next(n for n, p in m.named_parameters() if p is w)
    w.register_hook(lambda g: g * float("nan"))  # a finite loss, a NaN gradient in one parameter (not an FP8 layer)
    before = w.detach().clone()
    with pytest.raises(FloatingPointError, match=rf"step 1 \(precision 'fp8'\): the gradient is NaN/inf in 1 "
                                                 rf"parameter\(s\), first {name}"):
        train(m, _small(), _tc(precision="fp8"), progress=False)
    assert torch.equal(w.detach(), before)  # the bad step changed nothing


def test_fp32_keeps_its_old_behaviour_on_nan(tok):
    "fp32 is today's loop, unchanged: no NaN check (the check above is what precision != fp32 adds)."
    m = NVILAModel("tiny", tok)
    next(m.encoder.projector.parameters()).register_hook(lambda g: g * float("nan"))
    h = train(m, _small(), _tc(steps=1, grad_clip=0.0), progress=False)
    assert len(h.records) == 1


def test_an_fp8_checkpoint_is_a_normal_checkpoint(tok, tmp_path):
    from nvila_lab.checkpoint import load_nvila, save_nvila
    torch.manual_seed(0)
    m = NVILAModel("tiny", tok)
    train(m, _small(), _tc(precision="fp8-coat", steps=2), progress=False)
    folder = save_nvila(m, tmp_path / "ckpt")
    back = load_nvila(folder)
    sd, sd2 = m.state_dict(), back.state_dict()
    assert list(sd2) == list(NVILAModel("tiny", tok).state_dict())
    assert all(torch.equal(sd[k], sd2[k]) and sd2[k].dtype == torch.float32 for k in sd)
    row = _small()[0]
    assert back.generate(row["image"], row["question"], max_new_tokens=3) == m.generate(row["image"], row["question"],
                                                                                      max_new_tokens=3)
