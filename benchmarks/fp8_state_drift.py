"""How far COAT's FP8 AdamW states drift from exact ones on the tiny NVILA model (issue 12; notebooks 22 and 24).

The tiny model trains with torch AdamW (lr 3e-3, batch 8, colour/position questions, gradients clipped to 1). The very
same gradient stream also feeds two optimizers on throwaway copies of the weights, each reset to the real weights
before every step: torch AdamW (the exact moments) and FP8AdamW (E4M3 moments). After N steps the per-group relative
error ||x_fp8 - x_exact|| / ||x_exact|| of both moments is reported, for round-to-nearest (COAT's kernels) and for
stochastic rounding. One step's rounding costs ~2-3%; what is measured here is what the slow averages accumulate.

    .venv/bin/python benchmarks/fp8_state_drift.py        # ~3 minutes on a 2-core CPU; writes results/fp8_state_drift_cpu.json
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def drift(rounding: str, steps: int = 150, seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F
    from nvila_lab.data import SyntheticVQA, load_tokenizer, row_media
    from nvila_lab.fp8.optim import FP8AdamW, _unpack
    from nvila_lab.model import NVILAModel
    from nvila_lab.train import AnswerLoss
    torch.manual_seed(seed)
    model = NVILAModel("tiny", load_tokenizer())
    data = SyntheticVQA(tasks=["colour", "position"], n=200, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    real = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    exact_w = [p.detach().clone().requires_grad_(True) for p in params]
    fp8_w = [p.detach().clone().requires_grad_(True) for p in params]
    exact, fp8 = torch.optim.AdamW(exact_w, lr=3e-3, weight_decay=0.0), FP8AdamW(fp8_w, lr=3e-3, rounding=rounding)
    loss_fn, g = AnswerLoss(model), torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = [data[i] for i in torch.randint(len(data), (8,), generator=g).tolist()]
        total, n = loss_fn([row_media(r) for r in rows], [r["question"] for r in rows], [r["answer"] for r in rows])
        (total / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for ws in (exact_w, fp8_w):
            for w, p in zip(ws, params):
                w.data.copy_(p.data)
                w.grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        real.step(); exact.step(); fp8.step(); real.zero_grad()
    out = {}
    for key in ("exp_avg", "exp_avg_sq"):
        errs, ks = [], []
        for w8, we in zip(fp8_w, exact_w):
            cs = _unpack(fp8.state[w8], key, tuple(w8.shape), key == "exp_avg", True)
            pad = (-w8.numel()) % 128
            x8 = F.pad(cs.decompress().flatten(), (0, pad)).view(-1, 128)  # [G, 128]
            xe = F.pad(exact.state[we][key].flatten(), (0, pad)).view(-1, 128)
            errs.append((x8 - xe).norm(dim=1) / xe.norm(dim=1).clamp_min(1e-38))
            ks.append(cs.k)
        e, k = torch.cat(errs), torch.cat(ks)
        out[key] = {"groups": e.numel(), "median_rel_err": round(float(e.median()), 4),
                    "p99_rel_err": round(float(e.quantile(0.99)), 4), "share_k_below_1": round(float((k < 1).float().mean()), 4)}
    return out


def main() -> int:
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    res = {"steps": 150, "lr": 3e-3, "batch_size": 8, "group": 128,
           "runs": {r: drift(r) for r in ("nearest", "stochastic")}}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fp8_state_drift_cpu.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
