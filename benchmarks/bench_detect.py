"""Benchmark: the cost of head detection on the embedded model, as ratios measured in one run.

    .venv/bin/python benchmarks/bench_detect.py [--lengths 1024,2048] [--repeats 3]

- **Time.** Per NIAH instance (batch 1, same max_new_tokens): Wu retrieval detection ÷ plain greedy
  generation of the same instance (goal ≤ 1.5), and QRHead detection ÷ a plain forward. The token
  outputs must be identical (a speed number on different outputs is void).
- **Peak memory.** Each mode runs in a fresh process at each length; the peak increase of RSS over
  the loaded model is compared with a plain forward of the same prompt, and with the naive
  alternative the detectors avoid: caching every layer's full attention pattern
  (`run_with_cache` on `hook_pattern`).

Writes benchmarks/results/detect.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from mechinterp.detect import qr_scores, retrieval_scores
from mechinterp.evaluate import generate, render_all
from mechinterp.models import load_model
from mechinterp.store import provenance, write_json
from mechinterp.tasks.niah import NEEDLES, niah_grid

MODES = ("forward", "generate", "retrieval", "qr", "cache_patterns")


def instance(model, length: int, needle: int = 0):
    (ex,) = niah_grid(model.tokenizer, lengths=[length], depths=[0.5], needles=[NEEDLES[needle]])
    (prompt,) = render_all(model, [ex])
    return ex, prompt


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Samples this process's resident set every millisecond on a thread; `.peak` is the max.

    (ru_maxrss cannot be used: the model load's own peak hides everything after it.)"""

    def __enter__(self):
        self.peak, self._stop = rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


@torch.no_grad()
def measure(mode: str, length: int, max_new_tokens: int) -> dict:
    """Run one mode once in this fresh process (malloc tuning off, so freed memory goes back to
    the OS and RSS tracks live tensors); report the RSS increase over the loaded model."""
    model = load_model()
    ex, prompt = instance(model, length)
    ids = torch.tensor([prompt.input_ids])
    model(ids[:, :16])  # warm up kernels and allocator on a tiny input
    base = rss_mib()
    t = time.perf_counter()
    with PeakRSS() as rss:
        if mode == "forward":
            model(ids, logits_to_keep=1)
        elif mode == "generate":
            generate(model, [prompt.input_ids], max_new_tokens=max_new_tokens, batch_size=1)
        elif mode == "retrieval":
            retrieval_scores(
                model, [prompt], [ex.answers], gate=None, max_new_tokens=max_new_tokens
            )
        elif mode == "qr":
            qr_scores(model, [prompt])
        elif mode == "cache_patterns":
            model.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_pattern"))
        else:
            raise ValueError(mode)
    return {
        "mode": mode,
        "length": prompt.n_tokens,
        "seconds": time.perf_counter() - t,
        "rss_loaded_mib": base,
        "peak_increase_mib": rss.peak - base,
    }


@torch.no_grad()
def timings(model, length: int, max_new_tokens: int, repeats: int) -> dict:
    ex, prompt = instance(model, length)
    ids = torch.tensor([prompt.input_ids])
    gen_s, det_s, fwd_s, qr_s = [], [], [], []
    for _ in range(repeats):  # interleaved, so drift hits both sides alike
        t = time.perf_counter()
        (gen,) = generate(model, [prompt.input_ids], max_new_tokens=max_new_tokens, batch_size=1)
        gen_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        det = retrieval_scores(
            model, [prompt], [ex.answers], gate=None, max_new_tokens=max_new_tokens
        )
        det_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        model(ids, logits_to_keep=1)
        fwd_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        qr_scores(model, [prompt])
        qr_s.append(time.perf_counter() - t)
    same = list(det.instances["generated_ids"][0]) == list(gen.tokens)
    return {
        "length": prompt.n_tokens,
        "generated_tokens": len(gen.tokens),
        "identical_outputs": same,
        "generate_s": statistics.median(gen_s),
        "retrieval_detect_s": statistics.median(det_s),
        "ratio_retrieval_over_generate": statistics.median(det_s) / statistics.median(gen_s),
        "forward_s": statistics.median(fwd_s),
        "qr_detect_s": statistics.median(qr_s),
        "ratio_qr_over_forward": statistics.median(qr_s) / statistics.median(fwd_s),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-only", action="store_true", help="skip the timing part")
    ap.add_argument("--measure", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "detect.json"))
    args = ap.parse_args()
    if args.measure:
        mode, length = args.measure
        print(json.dumps(measure(mode, int(length), args.max_new_tokens)))
        return 0

    lengths = [int(x) for x in args.lengths.split(",")]
    model = load_model()
    time_rows = []
    for length in [] if args.memory_only else lengths:
        row = timings(model, length, args.max_new_tokens, args.repeats)
        print(json.dumps(row))
        time_rows.append(row)
    del model
    memory_rows = []
    for length in lengths:
        for mode in MODES:
            cmd = [
                sys.executable,
                __file__,
                "--measure",
                mode,
                str(length),
                "--max-new-tokens",
                str(args.max_new_tokens),
            ]
            env = {**os.environ, "MECHINTERP_MALLOC_TUNING": "0"}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(row))
            memory_rows.append(row)
    peaks = {(r["mode"], r["length"]): r["peak_increase_mib"] for r in memory_rows}
    ratios = {
        f"{mode}_over_forward_at_{length}": peaks[(mode, length)] / peaks[("forward", length)]
        for (mode, length) in peaks
        if mode != "forward"
    }
    result = {
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "timings": time_rows,
        "memory": memory_rows,
        "peak_rss_ratios": ratios,
        "torch_threads": torch.get_num_threads(),
        "provenance": provenance(),
    }
    write_json(args.out, result)
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
