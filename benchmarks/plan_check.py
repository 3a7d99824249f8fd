"""`mechinterp plan`'s predictions next to what runs measured: per stage, the predicted peak RSS
and time, and the largest peak RSS and summed wall time of the stage's shards (each shard record
holds the process's peak while it ran). Study run directories, and `mechinterp detect` runs.

    .venv/bin/python benchmarks/plan_check.py RUN_DIR [RUN_DIR ...]
    .venv/bin/python benchmarks/plan_check.py --fit   # the constants, from long_context.json

Writes benchmarks/results/plan_check.json (one row per run and stage) and prints it. `--fit`
fits `plan.CALIBRATION`'s memory and time constants by least squares to the single-instance
jobs of benchmarks/results/long_context.json (detect and qr, fused and eager, 2K-8K), so the
study runs checked here are out of sample.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def check(run: Path) -> list[dict]:
    from mechinterp.config import from_dict
    from mechinterp.experiments.plan import plan, planners

    config = json.loads((run / "config.json").read_text())
    prov_path = run / "provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    kind = prov.get("command") or ("extension" if "variants" in config else "study")
    cls = planners()[kind][0]
    cfg = from_dict(cls, {k: v for k, v in config.items() if k != "mechinterp"})
    rows, shape, _ = plan(cfg, budget_gib=1e6)
    records = [json.loads(p.read_text()) for p in sorted((run / "shards").rglob("*.json"))]
    out = []
    for r in rows:
        # a stage's shards: named after it (lofit_sweep/... is the lofit stage's), or for
        # detect, after the detector
        mine = [x for x in records if x["name"].split("/")[0].split("_")[0] == r.stage
                or (kind == "detect" and x["name"].split("/")[0] in ("retrieval", "qr"))]
        peaks = [x.get("peak_rss_mib") for x in mine if x.get("peak_rss_mib") is not None]
        out.append({
            "run": f"{run.parent.name}/{run.name}", "kind": kind, "stage": r.stage,
            "largest_forward": r.largest, "predicted_peak_gib": r.peak_gib,
            "measured_peak_gib": round(max(peaks) / 1024, 2) if peaks else None,
            "peak_error": round(r.peak_gib / (max(peaks) / 1024) - 1, 3) if peaks else None,
            "predicted_minutes": r.minutes,
            "measured_minutes": round(sum(x["seconds"] for x in mine) / 60, 1) if mine else None,
            "shards": len(mine),
        })  # fmt: skip
    return out


def fit(path: str = "benchmarks/results/long_context.json") -> dict:
    """Least-squares (non-negative) constants. Memory: the growth of the benchmark's detect and
    qr jobs (batch 1, 2K-8K) over the KV cache and logits. Time, in two steps: one prefill
    (`qr`, and one forward at 950-4049 tokens from benchmarks/bench_attention.py) gives the
    per-token and the T² attention terms of each path; generation (detect, and 16-token
    generation from bench_attention) then gives the per-step cost."""
    import numpy as np
    from scipy.optimize import nnls

    from mechinterp.experiments.plan import Forward, model_shape
    from mechinterp.experiments.specs import ModelSpec

    s = model_shape(ModelSpec())
    per_head = s.n_heads * s.d_head * s.n_layers
    runs = json.loads(Path(path).read_text())["runs"]
    mem_x, mem_y, pre, gen = [], [], [], []
    for r in runs:
        if r["job"] not in ("detect", "qr"):
            continue
        t, eager = r["n_tokens"], r["attention"] == "eager"
        steps = 24 if r["job"] == "detect" else 0
        f = Forward(rows=1, new=t, steps=steps)
        mem_x.append([t * (s.d_model + s.d_mlp) * s.dtype_bytes, s.n_heads * t * t * 4 * eager])
        mem_y.append(r["growth_mib"] * 2**20 - f.kv_bytes(s) - 2 * s.d_vocab * 4)
        (gen if steps else pre).append((t, steps, eager, r["seconds"]))
    for r in json.loads(Path(path).with_name("attention.json").read_text())["runs"]:
        eager = r["mode"] == "eager"
        pre.append((r["n_tokens"], 0, eager, r["forward_s"]))
        gen.append((r["n_tokens"], 16, eager, r["generate_s"]))
    act, attn = nnls(np.array(mem_x), np.array(mem_y))[0]
    # the per-token term from the fused path (its attention is plain T²); eager adds its T² cost
    fused_pre = [p for p in pre if not p[2]]
    x = [[t * s.n_params, per_head * t * t] for t, *_ in fused_pre]
    lin, fused = nnls(np.array(x), np.array([p[3] for p in fused_pre]))[0]
    eager_pre = [p for p in pre if p[2]]
    x = [[per_head * t * t] for t, *_ in eager_pre]
    (eager,) = nnls(np.array(x), np.array([p[3] - lin * p[0] * s.n_params for p in eager_pre]))[0]

    def prefill(t, e):
        return lin * t * s.n_params + (eager if e else fused) * per_head * t * t

    # per step: the layers' fixed cost, plus one token's linear and attention work
    rest = [(secs - prefill(t, e)) / n - lin * s.n_params - (eager if e else fused) * per_head * t
            for t, n, e, secs in gen]  # fmt: skip
    step = max(0.0, float(np.median(rest))) / s.n_layers
    return {"ACT": round(float(act), 2), "ATTN": round(float(attn), 2),
            "LINEAR": float(f"{lin:.3g}"), "FUSED": float(f"{fused:.3g}"),
            "EAGER": float(f"{eager:.3g}"), "STEP": float(f"{step:.3g}")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*")
    ap.add_argument("--fit", action="store_true", help="print the fitted constants and exit")
    ap.add_argument("--out", default="benchmarks/results/plan_check.json")
    args = ap.parse_args(argv)
    if args.fit:
        print(json.dumps(fit(), indent=2))
        return 0
    rows = [row for run in args.runs for row in check(Path(run))]
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
