"""nvila_lab.fp8.activations: saved-tensor accounting, FP8-saving RMSNorm and SiLU-multiply, in-place conversion."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nvila_lab.config import get_config
from nvila_lab.fp8.activations import (convert_activations_from_fp8, convert_activations_to_fp8, is_fp8_activation, rms_norm_fp8,
                                       saved_activation_bytes, silu_mul_fp8)
from nvila_lab.fp8.formats import NonFiniteError, sqnr_db
from nvila_lab.model import build_llm

RMS_FLOOR_DB, SILU_FLOOR_DB, MODEL_FLOOR_DB = 30.0, 25.0, 25.0


def _grads(f, *ts, seed=9):
    ts = [t.detach().clone().requires_grad_() for t in ts]
    out = f(*ts)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    (out * probe).sum().backward()
    return out.detach(), [t.grad for t in ts]


def _qwen2_norm(d, eps=1e-6):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    n = Qwen2RMSNorm(d, eps=eps)
    with torch.no_grad():
        n.weight.copy_(1 + 0.1 * torch.randn(d, generator=torch.Generator().manual_seed(3)))
    return n


# --- saved_activation_bytes ---------------------------------------------------------------------------------------

def test_saved_bytes_hand_cases():
    x = torch.randn(8, 16, requires_grad=True)
    w = nn.Parameter(torch.randn(16, 4))
    r = saved_activation_bytes(lambda: x @ w)
    assert (r["activations"], r["parameters"], r["n_saved"]) == (512, 256, 2)
    assert saved_activation_bytes(lambda: x.sin())["by_dtype"] == {"float32": 512}
    r = saved_activation_bytes(lambda: (x.sin(), x.cos(), x.t().sin(), x.tanh()))  # x, a view of x; tanh's output
    assert r["activations"] == 2 * 512 and r["n_saved"] == 4
    assert saved_activation_bytes(lambda: F.linear(x, w.t()))["parameters"] == 256
    assert saved_activation_bytes(lambda: x @ w, params=[x])["activations"] == 0
    assert saved_activation_bytes(lambda: x.detach() * 2)["n_saved"] == 0
    r = saved_activation_bytes(lambda: x.to(torch.bfloat16).sin())
    assert r["by_dtype"] == {"bfloat16": 256}
    assert {t["shape"] for t in r["tensors"]} == {(8, 16)}


def test_saved_bytes_on_meta_equal_cpu():
    for dev in ("cpu", "meta"):
        x = torch.randn(4, 10, 64, device=dev, requires_grad=True)
        w = torch.ones(64, device=dev)
        r = saved_activation_bytes(lambda: silu_mul_fp8(rms_norm_fp8(x, w), x))
        if dev == "cpu":
            ref = r
    assert r["by_dtype"] == ref["by_dtype"] and r["activations"] == ref["activations"] > 0


# --- RMSNorm -----------------------------------------------------------------------------------------------------

def test_rms_norm_forward_identical_to_qwen2_and_grads_close():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 21, 96, generator=g) * torch.logspace(-2, 1, 21).view(1, 21, 1)
    norm = _qwen2_norm(96)
    for dtype in (torch.float32, torch.bfloat16):
        n = copy.deepcopy(norm).to(dtype)
        assert torch.equal(n(x.to(dtype)), rms_norm_fp8(x.to(dtype), n.weight, n.variance_epsilon))
    qwen2 = lambda a, w: torch.func.functional_call(norm, {"weight": w}, (a,))  # transformers' forward, autograd
    ref_out, (dx_ref, dw_ref) = _grads(qwen2, x, norm.weight)
    out, (dx, dw) = _grads(lambda a, w: rms_norm_fp8(a, w, 1e-6), x, norm.weight)
    assert torch.equal(out, ref_out)
    assert sqnr_db(dx_ref, dx) >= RMS_FLOOR_DB and sqnr_db(dw_ref, dw) >= RMS_FLOOR_DB


def test_rms_norm_backward_hand_case():
    # x = (2, -2, 2, 2, 0...) over 16: mean(x^2) = 1, so r = 1 and n = x (eps 0); w0 = 3, dy = e0:
    # dx = 3 e0 - (dn . n) n / 16 = 3 e0 - 6 n / 16; dw = dy * n
    x = torch.zeros(1, 16)
    x[0, :4] = torch.tensor([2.0, -2.0, 2.0, 2.0])
    w = torch.ones(16)
    w[0] = 3.0
    x.requires_grad_(), w.requires_grad_()
    (rms_norm_fp8(x, w, eps=0.0)[0, 0]).backward()
    assert x.grad[0, :5].tolist() == [2.25, 0.75, -0.75, -0.75, 0.0]
    assert w.grad.tolist() == [2.0] + [0.0] * 15


def test_rms_norm_saves_fp8_and_pads():
    x = torch.randn(2, 5, 64, requires_grad=True)
    r = saved_activation_bytes(lambda: rms_norm_fp8(x, nn.Parameter(torch.ones(64))))
    assert r["by_dtype"] == {"float8_e4m3fn": 640, "float32": 640 // 16 * 4 + 10 * 4}
    x40 = torch.randn(6, 40)
    r = saved_activation_bytes(lambda: rms_norm_fp8(x40.requires_grad_(), torch.ones(40)))
    assert r["by_dtype"]["float8_e4m3fn"] == 6 * 48  # padded to 48 for groups of 16
    ref = _grads(lambda a: rms_norm_fp8(a, torch.ones(40), group=8), x40)[1][0]  # 40 = 5 groups of 8, no padding
    assert sqnr_db(ref, _grads(lambda a: rms_norm_fp8(a, torch.ones(40)), x40)[1][0]) > 25


def test_rms_norm_bad_input():
    with pytest.raises(NonFiniteError, match="layers.1.input_layernorm"):
        rms_norm_fp8(torch.tensor([[1.0, math.nan]]), torch.ones(2), name="layers.1.input_layernorm")
    for bad in (0, -16, 2.5, True):
        with pytest.raises(ValueError, match="positive whole number"):
            rms_norm_fp8(torch.ones(2, 16), torch.ones(16), group=bad)


# --- SiLU * up ---------------------------------------------------------------------------------------------------

def test_silu_mul_forward_identical_and_grads_close():
    from transformers.activations import ACT2FN
    act = ACT2FN["silu"]
    g = torch.Generator().manual_seed(1)
    gate, up = torch.randn(2, 9, 128, generator=g) * 4, torch.randn(2, 9, 128, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        a, b = gate.to(dtype), up.to(dtype)
        assert torch.equal(act(a) * b, silu_mul_fp8(a, b))
    (_, (dg_ref, du_ref)), (_, (dg, du)) = _grads(lambda a, b: act(a) * b, gate, up), _grads(silu_mul_fp8, gate, up)
    assert sqnr_db(dg_ref, dg) >= SILU_FLOOR_DB and sqnr_db(du_ref, du) >= SILU_FLOOR_DB
    _, (dg16, du16) = _grads(silu_mul_fp8, gate.bfloat16(), up.bfloat16())
    assert dg16.dtype == du16.dtype == torch.bfloat16


def test_silu_mul_hand_case_and_saved():
    gate = torch.zeros(1, 16, requires_grad=True)  # silu(0) = 0, silu'(0) = 1/2
    up = torch.tensor([[1.0, -2.0, 0.5, 4.0] * 4], requires_grad=True)
    silu_mul_fp8(gate, up).sum().backward()
    assert torch.equal(up.grad, torch.zeros(1, 16)) and torch.equal(gate.grad, up.detach() / 2)
    g2, u2 = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True)
    r = saved_activation_bytes(lambda: silu_mul_fp8(g2, u2))
    assert r["by_dtype"] == {"float8_e4m3fn": 2 * 128, "float32": 2 * 8 * 4}
    with pytest.raises(ValueError, match="same shape"):
        silu_mul_fp8(g2, u2[:, :16])


# --- conversion --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    return build_llm(get_config("tiny"))


def _loss_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


IDS = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(4))


def test_convert_llm_same_keys_loss_and_close_grads(llm):
    m = copy.deepcopy(llm)
    keys, params = list(m.state_dict()), dict(m.named_parameters())
    loss_ref, g_ref = _loss_grads(m, IDS)
    names = convert_activations_to_fp8(m)
    n_layers = get_config("tiny").llm_layers
    assert len(names) == 3 * n_layers + 1
    assert "model.norm" in names and "model.layers.0.mlp" in names
    assert list(m.state_dict()) == keys and all(p is params[n] for n, p in m.named_parameters())
    loss, g = _loss_grads(m, IDS)
    assert torch.equal(loss, loss_ref)
    worst = min(sqnr_db(g_ref[n], g[n]) for n in g_ref)
    assert worst >= MODEL_FLOOR_DB, worst
    assert saved_activation_bytes(lambda: m(input_ids=IDS, labels=IDS).loss)["by_dtype"]["float8_e4m3fn"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert convert_activations_to_fp8(m) == []  # already converted: nothing new, no warning
    assert len(convert_activations_from_fp8(m)) == len(names)
    assert not any(is_fp8_activation(x) for x in m.modules())
    assert all(torch.equal(v, _loss_grads(m, IDS)[1][n]) for n, v in g_ref.items())  # plain again, exactly


def test_convert_nvila_model_leaves_vision_alone():
    from nvila_lab.data import load_tokenizer
    from nvila_lab.model import NVILAModel
    model = NVILAModel("tiny", load_tokenizer())
    names = convert_activations_to_fp8(model)
    assert names and all(n.startswith("llm.") for n in names)
    assert not any(is_fp8_activation(x) for x in model.encoder.modules())
    assert model.llm.model.layers[0].input_layernorm.fp8_name == "llm.model.layers.0.input_layernorm"
    with pytest.raises(NonFiniteError, match="llm.model.layers.0.input_layernorm"):
        model.llm.model.layers[0].input_layernorm(torch.full((1, 2, 128), math.nan))
    with pytest.warns(UserWarning, match="nothing converted"):
        assert convert_activations_to_fp8(model.encoder) == []
    with pytest.raises(ValueError, match="positive whole number"):
        convert_activations_to_fp8(model, group=0)


def test_training_step_deepcopy_dtype_and_checkpointing(llm):
    m = copy.deepcopy(llm)
    convert_activations_to_fp8(m, group=32)
    assert m.model.layers[1].mlp.fp8_group == 32
    m2 = copy.deepcopy(m)
    assert is_fp8_activation(m2.model.norm) and m2.model.norm.weight is not m.model.norm.weight
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = m(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    _, g_plain = _loss_grads(m2, IDS)
    m2.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m2.train()
    _, g_ckpt = _loss_grads(m2, IDS)
    assert all(torch.equal(g_plain[n], g_ckpt[n]) for n in g_plain)
    m3 = copy.deepcopy(llm).to(torch.bfloat16)
    convert_activations_to_fp8(m3)
    _, g16 = _loss_grads(m3, IDS)
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v).all() for v in g16.values())


def test_non_silu_mlp_left_alone(llm):
    mlp = copy.deepcopy(llm.model.layers[0].mlp)
    mlp.act_fn = nn.GELU()
    with pytest.warns(UserWarning, match="not SiLU"):
        assert convert_activations_to_fp8(mlp) == []
    assert not is_fp8_activation(mlp)


def test_with_fp8_linears_either_order(llm):
    lin = pytest.importorskip("nvila_lab.fp8.linear")
    grads = []
    for order in ("linear first", "activations first"):
        m = copy.deepcopy(llm)
        steps = [lin.convert_to_fp8, convert_activations_to_fp8]
        for f in steps if order == "linear first" else steps[::-1]:
            assert f(m)
        assert list(m.state_dict()) == list(llm.state_dict())
        grads.append(_loss_grads(m, IDS)[1])
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])

