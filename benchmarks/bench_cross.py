"""Benchmark: cross-model patching with its conditions as batch rows, against one `cross_patch` +
`evaluate` per condition (the implementation it replaced), on the same inputs in one run.

    .venv/bin/python benchmarks/bench_cross.py [--n 8] [--n-docs 3] [--max-new-tokens 32]

Donor: the embedded model. Recipient: the same model with every attention projection perturbed
(a stand-in for an attention fine-tune; MLPs shared). Conditions as the extension pipeline runs
them: recipient, donor, Inter, Compl and three layer-matched Rand draws (10 heads each), on
synthetic MDQA examples. Goal: ≥ 3× faster, with identical predictions and answer log-probs
within 1e-4. Writes benchmarks/results/cross.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from cross_reference import per_condition_table  # noqa: E402

from mechinterp.heads import HeadShape, parse_heads  # noqa: E402
from mechinterp.interventions import cross_model_patching, patch_head_sets  # noqa: E402
from mechinterp.models import load_model  # noqa: E402
from mechinterp.store import provenance, write_json  # noqa: E402
from mechinterp.tasks.mdqa import synthetic_mdqa  # noqa: E402

# SmolLM2-135M's top-10 Wu retrieval heads, as `mechinterp detect` ranks them on a NIAH grid of
# 4 needles × {256, 512, 1024} tokens × depths {0, 0.5, 1}
DONOR_HEADS = "L17H3 L18H6 L18H7 L23H2 L17H4 L20H6 L23H7 L21H8 L24H4 L23H1"
RECIPIENT_HEADS = "L17H3 L18H6 L23H2 L20H6 L24H4 L29H1 L23H0 L19H2 L22H5 L16H1"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="MDQA examples")
    ap.add_argument("--n-docs", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cross.json"))
    args = ap.parse_args(argv)
    donor = load_model("smollm2-135m", device="cpu")
    recipient = load_model("smollm2-135m", device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in recipient.original_model.named_parameters():
            if ".self_attn." in name:
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    shape = HeadShape.of(recipient)
    sets = patch_head_sets(parse_heads(DONOR_HEADS), parse_heads(RECIPIENT_HEADS), shape)
    examples = synthetic_mdqa(args.n, n_docs=args.n_docs, realism="realistic",
                              diversity="high", seed=0, doc_words=60)  # as the mini extension
    kw = {"max_new_tokens": args.max_new_tokens}
    t0 = time.perf_counter()
    ref = per_condition_table(donor, recipient, examples, sets, patched="output", **kw)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = cross_model_patching(donor, recipient, examples, sets, progress=False, **kw)
    t_ours = time.perf_counter() - t0
    key = ["condition", "example_id"]
    ours, ref = ours.sort_values(key), ref.sort_values(key)
    same = ours["prediction"].tolist() == ref["prediction"].tolist()
    diff = float((ours["answer_logprob"].to_numpy() - ref["answer_logprob"].to_numpy()).max())
    result = {
        "examples": args.n, "conditions": 2 + len(sets),
        "sets": {k: len(v) for k, v in sets.items()},
        "mean_prompt_tokens": float(ours["n_tokens"].mean()),
        "max_new_tokens": args.max_new_tokens,
        "per_condition_s": round(t_ref, 2), "batched_s": round(t_ours, 2),
        "speedup": round(t_ref / t_ours, 2), "same_predictions": same,
        "max_abs_logprob_diff": abs(diff),
    }  # fmt: skip
    print(result)
    meta = provenance(threads=torch.get_num_threads())
    write_json(Path(args.out), {"cross": result, "provenance": meta})
    print(f"wrote {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
