"""COAT's FP8 optimizer states (nvila_lab.fp8.optim): dynamic range expansion, FP8AdamW, exact resume, memory."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nvila_lab.fp8.formats import E4M3, NonFiniteError, quantize, sqnr_db
from nvila_lab.fp8.optim import (GROUP, R_E4M3, CompressedState, FP8AdamW, adamw_state_bytes, bf16_down,
                                 compress_state, expansion_k16, optimizer_state_bytes)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Small tensors on a shared CPU: one thread is many times faster than two competing with other jobs."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 32, generator=g)
    Y = torch.tanh(X @ torch.randn(32, 8, generator=g)) @ torch.randn(8, 4, generator=g)
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 4)), X, Y


def run(opt, model, X, Y, steps, sched=None):
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


# --- the expansion ---------------------------------------------------------------------------------------------------

def test_k_is_coats_formula_and_reference_set():
    # hand: ratio 16 -> floor(log2(R)/4*16)/16 = 66/16; 2^20 -> 13/16; equal magnitudes -> 8; huge -> 1/16
    assert expansion_k16(torch.tensor([16.0, 2.0 ** 20, 3.0, 1.0]),
                         torch.tensor([1.0, 1.0, 3.0, 2.0 ** -140])).tolist() == [66, 13, 128, 1]
    assert math.floor(math.log2(R_E4M3) / 4 * 16) == 66 and R_E4M3 == 448 ** 2 / 2
    g = torch.Generator().manual_seed(1)
    ratios = torch.exp2(torch.rand(5000, generator=g) * 120).double()
    opts = torch.arange(1, 129, dtype=torch.float64) / 16  # COAT's reference test: k in {1/16, ..., 8}
    brute = ((ratios[:, None].log2() * opts) < math.log2(R_E4M3)).sum(1).clamp(min=1)
    assert torch.equal(expansion_k16(ratios.float(), torch.ones(5000)).long(), brute)


def test_hand_computed_group():
    x = torch.zeros(128)
    x[:3] = torch.tensor([4.0, -1.0, 0.25])
    cs = compress_state(x)
    assert (cs.k.item(), cs.centre.item(), cs.scale.item()) == (4.125, 1.0, 1.46875)
    assert cs.data.float()[:4].tolist() == [448.0, -1.5, 2 ** -8, 0.0]
    want = [(448 / 1.46875) ** (1 / 4.125), -(1.5 / 1.46875) ** (1 / 4.125), (2 ** -8 / 1.46875) ** (1 / 4.125)]
    torch.testing.assert_close(cs.decompress()[:3], torch.tensor(want), rtol=1e-6, atol=0)
    assert bool((cs.decompress()[3:] == 0).all())


def test_zero_and_constant_groups_are_defined():
    z = compress_state(torch.zeros(2, 150))
    assert z.k.tolist() == [8.0] * 3 and z.centre.float().tolist() == [1.0] * 3 and z.scale.float().tolist() == [448.0] * 3
    assert torch.equal(z.decompress(), torch.zeros(2, 150))
    for val in (-3.7e-5, 2.0, 1e-20):
        c = compress_state(torch.full((256,), val))
        assert c.k.tolist() == [8.0, 8.0]
        torch.testing.assert_close(c.decompress(), torch.full((256,), val), rtol=2 ** -9, atol=0)
    v = compress_state(torch.full((128,), 5e-9), signed=False)  # a constant second-moment group
    assert v.k.item() == 8.0 and abs(v.decompress()[0].item() / 5e-9 - 1) < 2 ** -9


def test_zeros_exact_signs_kept_padding_and_bytes():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(7, 33, generator=g) * 1e-3
    w[0, :5] = 0
    cs = compress_state(w)
    d = cs.decompress()
    assert d.shape == (7, 33) and cs.data.numel() == 256 and cs.nbytes == 256 + 2 * (2 + 1 + 2)
    assert bool((d[0, :5] == 0).all()) and bool((d.sign() == w.sign()).all())
    assert "2 groups of 128" in repr(cs)


def test_expansion_never_flushes_and_plain_equals_formats_quantize():
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(64, 128, generator=g) * torch.exp2(torch.rand(64, 128, generator=g) * 40 - 20)
    e, p = compress_state(wide), compress_state(wide, expand=False)
    assert int(((e.decompress() == 0) & (wide != 0)).sum()) == 0
    assert int(((p.decompress() == 0) & (wide != 0)).sum()) > 1000
    ref = quantize(wide, E4M3, "group", 128, scale=bf16_down(448 / wide.abs().amax(1, keepdim=True)).float())
    assert torch.equal(p.decompress(), ref.dequantize())
    # the expanded top of every group is at or under 448 and above 448 * (1 - 2^-7): the range is used
    top = e.data.float().view(-1, 128).abs().amax(1)
    assert bool((top <= 448).all()) and bool((top >= 416).all())


def test_bad_state_input():
    with pytest.raises(ValueError, match="negative"):
        compress_state(-torch.ones(4), signed=False, name="exp_avg_sq of lm_head")
    with pytest.raises(NonFiniteError, match="q_proj"):
        compress_state(torch.tensor([1.0, math.nan]), name="exp_avg of layers.0.q_proj")


def test_bf16_down():
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(4)) * 1e3 + 1e-3
    b = bf16_down(x).float()
    assert bool((b <= x).all()) and bool(((x - b) / x < 2 ** -7).all())
    assert bf16_down(torch.tensor([1.5, 448.0])).float().tolist() == [1.5, 448.0]


# --- the optimizer ---------------------------------------------------------------------------------------------------

def test_fp32_mode_is_torch_adamw_bitwise_with_cosine_schedule():
    from transformers import get_cosine_schedule_with_warmup
    out = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1, foreach=False),
                 lambda ps: FP8AdamW(ps, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1, quantize=False)):
        m, X, Y = regression()
        opt = make(m.parameters())
        losses = run(opt, m, X, Y, 40, get_cosine_schedule_with_warmup(opt, 4, 40))
        out.append((losses, [p.detach().clone() for p in m.parameters()], opt.param_groups[0]["lr"]))
    assert out[0][0] == out[1][0] and out[0][2] == out[1][2]
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))


def test_fp8_parity_with_torch_adamw():
    from transformers import get_cosine_schedule_with_warmup
    final = {}
    for name, make in (("torch", lambda ps: torch.optim.AdamW(ps, lr=1e-2)), ("fp8", lambda ps: FP8AdamW(ps, lr=1e-2))):
        m, X, Y = regression()
        opt = make(m.parameters())
        losses = run(opt, m, X, Y, 300, get_cosine_schedule_with_warmup(opt, 30, 300))
        final[name] = losses[-1]
        assert losses[-1] < 0.01 * losses[0]
    assert abs(final["fp8"] / final["torch"] - 1) < 0.02, final
    state = opt.state[next(m.parameters())]
    assert state["exp_avg"].dtype == torch.float8_e4m3fn and state["exp_avg_sq"].dtype == torch.float8_e4m3fn
    assert float(state["exp_avg_sq"].float().min()) >= 0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_gradient_names_the_parameter_and_changes_nothing(bad):
    m, X, Y = regression()
    opt = FP8AdamW(m.named_parameters(), lr=1e-2)
    run(opt, m, X, Y, 2)
    F.mse_loss(m(X), Y).backward()
    m[2].weight.grad[1, 3] = bad
    before = [p.clone() for p in m.parameters()]
    st_before = {k: v.clone() for k, v in opt.state[m[0].weight].items() if isinstance(v, torch.Tensor)}
    with pytest.raises(NonFiniteError, match=r"2\.weight has 1 NaN/inf"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(torch.equal(v, opt.state[m[0].weight][k]) for k, v in st_before.items())
    assert opt.state[m[0].weight]["step"] == 2
    unnamed = FP8AdamW(m.parameters())
    with pytest.raises(NonFiniteError, match=r"param_groups\[0\]\['params'\]\[2\] \(shape \(4, 64\)\)"):
        unnamed.step()


def test_bad_hyperparameters():
    ps = [torch.nn.Parameter(torch.zeros(3))]
    for kw, word in (({"lr": -1}, "lr"), ({"betas": (0.9, 1.0)}, "betas"), ({"eps": -1}, "eps"),
                     ({"weight_decay": -0.1}, "weight_decay"), ({"group": 0}, "group")):
        with pytest.raises(ValueError, match=word):
            FP8AdamW(ps, **kw)


def test_state_through_train_files_resumes_bitwise(tmp_path):
    from nvila_lab.train import _load_optimizer, _optimizer_tensors
    make = lambda ps: FP8AdamW(ps, lr=1e-2, weight_decay=0.01)
    m, X, Y = regression()
    straight = run(make(m.parameters()), m, X, Y, 16)
    m, X, Y = regression()
    opt = make(m.parameters())
    first = run(opt, m, X, Y, 8)
    assert {type(v) for st in opt.state_dict()["state"].values() for v in st.values()} == {torch.Tensor, int}
    tensors, rest = _optimizer_tensors(opt)
    save_file(tensors, str(tmp_path / "optimizer.safetensors"))
    (tmp_path / "rest.json").write_text(json.dumps(rest))
    params = {k: v.clone() for k, v in m.state_dict().items()}
    m2, X, Y = regression(seed=1)  # other weights, overwritten below
    m2.load_state_dict(params)
    opt2 = make(m2.parameters())
    _load_optimizer(opt2, load_file(str(tmp_path / "optimizer.safetensors")), json.loads((tmp_path / "rest.json").read_text()))
    for p, p2 in zip(m.parameters(), m2.parameters()):
        for k, v in opt.state[p].items():
            v2 = opt2.state[p2][k]
            assert (torch.equal(v.view(torch.uint8), v2.view(torch.uint8)) and v.dtype == v2.dtype) if \
                isinstance(v, torch.Tensor) else v == v2
    _, X, Y = regression()
    assert first + run(opt2, m2, X, Y, 8) == straight


def test_load_refuses_a_torch_adamw_state():
    m, X, Y = regression()
    t = torch.optim.AdamW(m.parameters())
    run(t, m, X, Y, 1)
    with pytest.raises(ValueError, match="another optimizer"):
        FP8AdamW(m.parameters()).load_state_dict(t.state_dict())


def test_bf16_parameters_keep_their_dtype_and_state_dtypes():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    opt = FP8AdamW(lin.parameters(), lr=1e-2)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    for _ in range(3):
        opt.zero_grad()
        lin(x).float().pow(2).mean().backward()
        opt.step()
    assert lin.weight.dtype == torch.bfloat16
    opt2 = FP8AdamW(lin.parameters(), lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    st = opt2.state[lin.weight]
    assert (st["exp_avg"].dtype, st["exp_avg_scale"].dtype, st["exp_avg_k16"].dtype, st["exp_avg_centre"].dtype) == \
        (torch.float8_e4m3fn, torch.bfloat16, torch.uint8, torch.bfloat16)


# --- real moments and memory -----------------------------------------------------------------------------------------

def test_expansion_reduces_error_on_real_moments_and_memory_ratio():
    from nvila_lab.data import SyntheticVQA, load_tokenizer
    from nvila_lab.model import NVILAModel
    torch.manual_seed(0)
    model = NVILAModel("tiny", load_tokenizer())
    ds = SyntheticVQA(n=4, seed=0)
    ref = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        rows = [ds[(3 * step + i) % len(ds)] for i in range(3)]
        loss = model([r["image"] for r in rows], [r["question"] for r in rows], [r["answer"] for r in rows])
        ref.zero_grad()
        loss.backward()
        ref.step()
    trained = [p for p in model.parameters() if p in ref.state]
    m = torch.cat([ref.state[p]["exp_avg"].flatten() for p in trained])
    v = torch.cat([ref.state[p]["exp_avg_sq"].flatten() for p in trained])

    def rel(a, b):
        return float(((a - b).abs() / b.abs())[b != 0].mean())

    out = {}
    for expand in (True, False):
        mh = compress_state(m, expand=expand).decompress()
        vh = compress_state(v, expand=expand, signed=False).decompress()
        out[expand] = (rel(mh, m), rel(vh, v), int(((vh == 0) & (v != 0)).sum()),
                       sqnr_db(m / (v.sqrt() + 1e-8), mh / (vh.sqrt() + 1e-8)))
    assert out[True][0] < 0.75 * out[False][0] and out[True][1] < 0.8 * out[False][1], out
    assert out[True][2] == 0 < out[False][2], out
    assert out[True][3] > 25, out

    fp8 = FP8AdamW(trained)
    fp8.step()  # the last batch's real gradients
    assert optimizer_state_bytes(fp8) == sum(adamw_state_bytes(p.numel())["fp8"] for p in trained)
    assert optimizer_state_bytes(ref) == sum(adamw_state_bytes(p.numel())["fp32"] + 4 for p in trained)
    assert optimizer_state_bytes(ref) / optimizer_state_bytes(fp8) >= 3.8


def test_analytic_bytes_and_a_qwen2_1p5b_layer():
    assert adamw_state_bytes(1) == {"fp32": 8, "fp8": 2 * (128 + 5)}
    assert adamw_state_bytes(128 * 1000) == {"fp32": 1_024_000, "fp8": 266_000}
    assert adamw_state_bytes(1000, group=100) == {"fp32": 8000, "fp8": 2 * (1000 + 50)}
    d, kv, inter = 1536, 256, 8960
    layer = [d * d, d, kv * d, kv, kv * d, kv, d * d, inter * d, inter * d, d * inter, d, d]
    fp32 = sum(adamw_state_bytes(n)["fp32"] for n in layer)
    fp8 = sum(adamw_state_bytes(n)["fp8"] for n in layer)
    assert 3.84 < fp32 / fp8 < 3.86  # 8 / (2 + 10/128) = 3.849 up to padding
    assert GROUP == 128


def test_compressed_state_is_a_dataclass_with_its_parts():
    cs = compress_state(torch.randn(300))
    assert isinstance(cs, CompressedState) and cs.group == 128 and cs.shape == (300,)
    assert (cs.data.dtype, cs.scale.dtype, cs.k16.dtype, cs.centre.dtype) == \
        (torch.float8_e4m3fn, torch.bfloat16, torch.uint8, torch.bfloat16)


def test_buckets_equal_one_tensor_at_a_time(monkeypatch):
    "Small tensors are updated side by side in buckets; the result equals updating each tensor alone, bit for bit,"
    " also when step counts differ (a parameter without a gradient in some steps) and dtypes are mixed."
    import nvila_lab.fp8.optim as O

    def go(bucket):
        monkeypatch.setattr(O, "BUCKET", bucket)
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in ((5,), (64, 3), (300,), (2, 2))]
        ps.append(torch.nn.Parameter(torch.randn(40, dtype=torch.bfloat16)))
        opt = FP8AdamW(ps, lr=1e-2, weight_decay=0.05)
        g = torch.Generator().manual_seed(1)
        for step in range(6):
            for i, p in enumerate(ps):
                p.grad = None if (i == 1 and step % 2) else torch.randn(p.shape, generator=g).to(p.dtype)
            opt.step()
        return ps, opt

    (a, oa), (b, ob) = go(1 << 22), go(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert oa.state[a[1]]["step"] == 3 and oa.state[a[0]]["step"] == 6
    for x, y in zip(a, b):
        for k, v in oa.state[x].items():
            assert (torch.equal(v.view(torch.uint8), ob.state[y][k].view(torch.uint8)) if isinstance(v, torch.Tensor)
                    else v == ob.state[y][k])
