"""Does the embedded model still answer NIAH at 2K-8K tokens? Greedy answers on 2 needles × depths
{0.25, 0.75} at 2,048 / 4,096 / 8,000 tokens, for the essay and filler haystacks, with the model's
own RoPE θ and with θ = 4e5; fused attention, batch 1, 24 new tokens. Writes one row per
generation to benchmarks/results/long_context_explore.json (about 10 min on 2 CPU cores).

    .venv/bin/python benchmarks/niah_long_context.py
"""

import json
import time
from pathlib import Path

import torch

from mechinterp.evaluate import evaluate
from mechinterp.models import load_model
from mechinterp.tasks.niah import niah_grid

OUT = Path(__file__).parent / "results" / "long_context_explore.json"


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    for theta in (None, 4e5):
        model = load_model("smollm2-135m", device="cpu", attention="sdpa", rope_theta=theta)
        for hay in ("filler", "essays"):
            ex = niah_grid(model.tokenizer, lengths=[2048, 4096, 8000], depths=[0.25, 0.75],
                           needles=2, haystack=hay)  # fmt: skip
            t0 = time.perf_counter()
            df = evaluate(model, ex, max_new_tokens=24, batch_size=1, progress=False)
            for r in df.itertuples():
                rows.append({"rope_theta": theta, "haystack": hay, "length": r.length,
                             "depth": r.depth, "correct": bool(r.correct),
                             "rouge1": round(r.rouge1_recall, 2)})  # fmt: skip
            accuracy = df.groupby("length")["correct"].mean().to_dict()
            print(hay, theta, f"{time.perf_counter() - t0:.1f} s", accuracy, flush=True)
    OUT.write_text(json.dumps(rows, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
