"""Same seed, three precisions: does the tiny NVILA learn as well in FP8 as in bf16? (issue 12, "same accuracy")

The tiny model (pretrained tiny tower, notebook 09a) is trained from the same seed, on the same rows in the same
order, in `bf16`, `fp8` (FP8 linears in the LLM), `fp8-coat` (+ FP8 AdamW states and FP8 activations) and
`fp8-coat-sr` (the same, the FP8 states rounded stochastically; added to the saved run with `--add`), on the
kit's synthetic image tasks at 64x64 (one tile each, 16 visual tokens: the config's tiling is `resize`, for training
and evaluation alike). Each run is scored on the same held-out questions (a seed never trained on), next to chance
and to the untrained model. The comparison can fail (see `check`): every FP8 run must have learned (its mean
accuracy well above chance and the untrained model) and must stay within stated bounds of bf16.

    .venv/bin/python benchmarks/fp8_same_seed.py            # full size: ~10 minutes on a quiet 2-core CPU
    .venv/bin/python benchmarks/fp8_same_seed.py --quick    # a smoke run (20 steps), writes nothing

writes benchmarks/results/fp8_same_seed_cpu.json and fp8_same_seed_cpu.png (the full size only). Notebook 24 loads
and plots them and runs a reduced version of `compare` live.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PRECISIONS = ("bf16", "fp8", "fp8-coat", "fp8-coat-sr")  # fp8-coat-sr added later with --add
TASKS = ("colour", "position")
FULL = dict(steps=800, batch_size=8, n_eval=50, log_every=10)  # ~10 minutes on a quiet 2-core CPU (see EARLIER)
QUICK = dict(steps=20, batch_size=4, n_eval=10, log_every=5)
# Earlier full runs (the bounds below were never changed):
# 1. 200 steps: stopped after bf16, which failed the "learned" bound (colour 38%, position 36%, mean 37% < 2 x chance).
# 2. 320 steps (results/fp8_same_seed_cpu_320steps.json): bf16 mean 30%, fp8 58%, fp8-coat 68%. The check failed both
#    ways: bf16 had not learned, and the FP8 runs were more than the bounds AHEAD of it. At that point the runs sit on
#    the steep part of the learning curve, where a tiny numeric difference moves the step at which a task is picked
#    up, so one seed compares when each run happened to jump, not the formats. Lengthened to 800 steps.
EARLIER = [dict(steps=200, bf16={"colour": 0.38, "position": 0.36}),
           dict(steps=320, bf16={"colour": 0.40, "position": 0.20}, fp8={"colour": 0.76, "position": 0.40},
                fp8_coat={"colour": 0.98, "position": 0.38})]
# The bounds the comparison must meet (stated before the full run; see the notebook for why these sizes).
BOUNDS = dict(learned_over_untrained=0.25,  # each run's mean accuracy at least this far above the untrained model's
              learned_over_chance=2.0,  # ... and at least this many times the mean chance level
              mean_gap=0.05,  # |mean accuracy - bf16's| at most this
              task_gap=0.10,  # |accuracy of a task - bf16's| at most this, for every task
              loss_gap=0.15)  # |final loss / bf16's - 1| at most this (final = mean of the last 3 logged losses)


def compare(precisions=PRECISIONS, tasks=TASKS, steps: int = 200, batch_size: int = 8, n_eval: int = 50,
            log_every: int = 10, lr: float = 3e-3, seed: int = 0, size=(64, 64), progress: bool = False) -> dict:
    """Train the tiny model once per precision from the same seed on the same rows; score each on the same held-out
    set. -> {'settings', 'chance', 'untrained', 'runs': {precision: {'steps', 'loss', 'seconds', 'accuracy',
    'mean_accuracy'}}, 'gaps': {precision: {task: accuracy - bf16's}}}."""
    import torch
    from nvila_lab.config import get_config
    from nvila_lab.data import SyntheticVQA, load_tokenizer
    from nvila_lab.evaluate import evaluate
    from nvila_lab.model import NVILAModel
    from nvila_lab.tower_pretrain import load_pretrained_tower
    from nvila_lab.train import TrainConfig, train
    tok = load_tokenizer()
    base = get_config("tiny")
    cfg = base.replace(tiling="resize", vocab_size=max(len(tok), base.vocab_size))
    train_data = SyntheticVQA(list(tasks), n=steps * batch_size // len(tasks) + batch_size, seed=1, size=size)
    held = SyntheticVQA(list(tasks), n=n_eval, seed=777, size=size)  # a seed never trained on
    tower = load_pretrained_tower()

    def fresh():
        torch.manual_seed(seed)
        m = NVILAModel(cfg, tok)
        m.encoder.tower.load_state_dict(tower.state_dict())
        return m

    def score(m):
        rep = evaluate(m, held, progress=False)
        acc = {t: s.accuracy for t, s in rep.tasks.items()}
        return rep, acc, sum(acc.values()) / len(acc)

    rep0, acc0, mean0 = score(fresh())
    runs = {}
    for p in precisions:
        m = fresh()
        h = train(m, train_data, TrainConfig(steps=steps, batch_size=batch_size, lr=lr, log_every=log_every, seed=seed,
                                             precision=p), progress=progress)
        _, acc, mean = score(m)
        runs[p] = {"steps": [r["step"] for r in h.records], "loss": h.losses,
                   "seconds": round(h.records[-1]["seconds"], 1), "accuracy": acc, "mean_accuracy": mean}
        print(f"{p:<9} {runs[p]['seconds']:6.1f} s  final loss {final_loss(runs[p]):.4f}  "
              + "  ".join(f"{t} {a:.0%}" for t, a in acc.items()), flush=True)
    ref = runs.get("bf16")
    gaps = {p: {t: r["accuracy"][t] - ref["accuracy"][t] for t in r["accuracy"]} for p, r in runs.items()} if ref else {}
    return {"settings": dict(precisions=list(precisions), tasks=list(tasks), steps=steps, batch_size=batch_size,
                             n_eval=n_eval, log_every=log_every, lr=lr, seed=seed, size=list(size), tiling="resize",
                             tower="pretrained tiny-siglip", train_seed=1, eval_seed=777),
            "chance": {t: s.chance for t, s in rep0.tasks.items()},
            "untrained": {"accuracy": acc0, "mean_accuracy": mean0}, "runs": runs, "gaps": gaps}


def final_loss(run: dict, last: int = 3) -> float:
    "Mean of the last `last` logged losses (one logged loss is already a mean over `log_every` steps)."
    tail = run["loss"][-last:]
    return sum(tail) / len(tail)


def check(res: dict, bounds: dict | None = None) -> list[str]:
    "Every way `res` breaks `bounds` (BOUNDS by default), as sentences; empty when the comparison holds."
    b = {**BOUNDS, **(bounds or {})}
    fails = []
    chance = sum(res["chance"].values()) / len(res["chance"])
    untrained = res["untrained"]["mean_accuracy"]
    ref = res["runs"]["bf16"]
    for p, r in res["runs"].items():
        if r["mean_accuracy"] < untrained + b["learned_over_untrained"]:
            fails.append(f"{p} did not learn: mean accuracy {r['mean_accuracy']:.1%} < untrained {untrained:.1%} + "
                         f"{b['learned_over_untrained']:.0%}")
        if r["mean_accuracy"] < b["learned_over_chance"] * chance:
            fails.append(f"{p} did not learn: mean accuracy {r['mean_accuracy']:.1%} < {b['learned_over_chance']}x "
                         f"chance {chance:.1%}")
        if p == "bf16":
            continue
        if abs(r["mean_accuracy"] - ref["mean_accuracy"]) > b["mean_gap"]:
            fails.append(f"{p}: mean accuracy {r['mean_accuracy']:.1%} vs bf16 {ref['mean_accuracy']:.1%}, gap over "
                         f"{b['mean_gap']:.0%}")
        for t, g in res["gaps"][p].items():
            if abs(g) > b["task_gap"]:
                fails.append(f"{p}: {t} accuracy {r['accuracy'][t]:.1%} vs bf16 {ref['accuracy'][t]:.1%}, gap over "
                             f"{b['task_gap']:.0%}")
        ratio = final_loss(r) / final_loss(ref) - 1
        if abs(ratio) > b["loss_gap"]:
            fails.append(f"{p}: final loss {final_loss(r):.4f} vs bf16 {final_loss(ref):.4f} ({ratio:+.1%}), over "
                         f"{b['loss_gap']:.0%}")
    return fails


def plot(res: dict, path: str | Path | None = None):
    "Loss curves side by side (left) and held-out accuracy per task (right), with chance and the untrained model."
    import matplotlib
    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    styles = {"bf16": ("-", 2.5), "fp8": ("--", 1.5), "fp8-coat": (":", 2.0), "fp8-coat-sr": ("-.", 2.0),
              "fp32": ("-", 1.0)}
    runs = dict(res["runs"])
    if "reference" in res:  # the same seed in fp32: the noise floor of a one-seed comparison
        runs["fp32"] = res["reference"]["fp32"]
    for p, r in runs.items():
        ls, lw = styles.get(p, ("-", 1))
        a1.plot(r["steps"], r["loss"], ls, lw=lw, label=f"{p} (final {final_loss(r):.3f})",
                color="gray" if p == "fp32" else None)
    a1.set_yscale("log"); a1.set_xlabel("step"); a1.set_ylabel("training loss (answer tokens)")
    a1.set_title("same seed, same rows"); a1.grid(alpha=0.3); a1.legend()
    tasks = list(res["chance"])
    width = 0.8 / (len(runs) + 1)
    xs = range(len(tasks))
    a2.bar([x - 0.4 + width / 2 for x in xs], [res["untrained"]["accuracy"][t] for t in tasks], width,
           color="lightgray", label="untrained")
    for i, (p, r) in enumerate(runs.items(), start=1):
        a2.bar([x - 0.4 + width * (i + 0.5) for x in xs], [r["accuracy"][t] for t in tasks], width, label=p,
               color="gray" if p == "fp32" else None)
    for x, t in zip(xs, tasks):
        a2.hlines(res["chance"][t], x - 0.4, x + 0.4, colors="k", linestyles="dashed", lw=1)
    a2.set_xticks(list(xs), tasks); a2.set_ylim(0, 1.05)
    a2.set_ylabel(f"held-out accuracy ({res['settings']['n_eval']} per task; dashes: chance)")
    a2.legend(fontsize=8, ncols=2); a2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run (20 steps); writes nothing")
    ap.add_argument("--add", metavar="PRECISION", default=None,
                    help="add one more precision (e.g. fp8-coat-sr) to the saved full run, same seed and rows, and "
                         "check it against the same bounds")
    ap.add_argument("--reference", action="store_true",
                    help="add to the saved full run the same seed in fp32: how far a run moves from bf16 when only "
                         "the rounding changes (the noise floor of a one-seed comparison)")
    args = ap.parse_args(argv)
    import torch
    if args.add:
        path = RESULTS / "fp8_same_seed_cpu.json"
        res = json.loads(path.read_text())
        t0 = time.perf_counter()
        run = compare(precisions=(args.add,), **FULL)["runs"][args.add]
        b16 = res["runs"]["bf16"]
        res["runs"][args.add] = run
        res["gaps"][args.add] = {t: run["accuracy"][t] - b16["accuracy"][t] for t in run["accuracy"]}
        res["settings"]["precisions"] = list(res["runs"])
        res["seconds_total"] = round(res["seconds_total"] + time.perf_counter() - t0, 1)
        res["failures"] = check(res)
        path.write_text(json.dumps(res, indent=1))
        plot(res, RESULTS / "fp8_same_seed_cpu.png")
        print(args.add, json.dumps(run["accuracy"]), f"final loss {final_loss(run):.4f}")
        for f in res["failures"]:
            print("FAIL:", f)
        return 0
    if args.reference:
        path = RESULTS / "fp8_same_seed_cpu.json"
        res = json.loads(path.read_text())
        ref = compare(precisions=("fp32",), **FULL)
        r, b16 = ref["runs"]["fp32"], res["runs"]["bf16"]
        res["reference"] = {"fp32": r, "gap_to_bf16": {t: r["accuracy"][t] - b16["accuracy"][t] for t in r["accuracy"]},
                            "loss_gap_to_bf16": final_loss(r) / final_loss(b16) - 1}
        path.write_text(json.dumps(res, indent=1))
        plot(res, RESULTS / "fp8_same_seed_cpu.png")
        print("fp32 reference:", json.dumps(res["reference"]["gap_to_bf16"]), f"loss {res['reference']['loss_gap_to_bf16']:+.1%}")
        return 0
    size = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    res = compare(**size)
    res["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu",
                      "note": "FP8 emulated on the CPU (numerics only; no FP8 speed): the seconds are not a speed "
                              "comparison, and the CPU was shared with other jobs"}
    res["seconds_total"] = round(time.perf_counter() - t0, 1)
    res["bounds"] = BOUNDS
    res["failures"] = check(res) if not args.quick else []
    print(json.dumps({p: {"mean_accuracy": round(r["mean_accuracy"], 3), "final_loss": round(final_loss(r), 4)}
                      for p, r in res["runs"].items()}), f"untrained {res['untrained']['mean_accuracy']:.3f}",
          f"total {res['seconds_total']} s")
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "fp8_same_seed_cpu.json").write_text(json.dumps(res, indent=1))
        plot(res, RESULTS / "fp8_same_seed_cpu.png")
        print("wrote", RESULTS / "fp8_same_seed_cpu.json", "and", RESULTS / "fp8_same_seed_cpu.png")
    for f in res["failures"]:
        print("FAIL:", f)
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
