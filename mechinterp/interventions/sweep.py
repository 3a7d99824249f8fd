"""Knockout sweep: the top-k heads of a ranking vs k random heads from its complement.

`knockout_sweep(model, examples, ranked, ks=(1, 2, 5, 10), seeds=(0, 1, 2))` evaluates the task
with no knockout (condition `none`), with the top-k ranked heads knocked out (`top`), and with k
heads drawn from the complement of the ranked set (`random`, one draw per seed; never a ranked
head), for each knockout mode. One tidy row per (mode, k, condition, seed, example).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from tqdm.auto import tqdm

from mechinterp.analysis.headsets import random_complement
from mechinterp.errors import InputError
from mechinterp.heads import Head, HeadShape, parse_heads
from mechinterp.interventions.knockout import KnockoutSpec, knockout
from mechinterp.results import ResultFrame
from mechinterp.selection import check_selection
from mechinterp.tasks.example import Example

#: Modes a sweep can run without per-example inputs (mean/resample need a reference set;
#: edge_knockout needs per-example key positions): use `knockout` directly for those.
SWEEP_MODES = ("zero", "uniform_attention")


class KnockoutSweep(ResultFrame):
    """`knockout_sweep`'s rows (a DataFrame: one row per mode, k, condition, seed and example,
    with `evaluate`'s columns), with their summary (`summarise_sweep`) and figure
    (`knockout_curve`)."""

    def summary(self, value: str = "correct") -> pd.DataFrame:
        """Mean `value` per (mode, k, condition), the spread across seeds (`summarise_sweep`:
        the command's summary table)."""
        return summarise_sweep(self.frame(), value)

    def plot(self, value: str = "correct", title: str | None = None):
        """`value` against k, top-k ranked vs random complement heads (`knockout_curve`: one
        trace per mode and condition, the no-knockout baseline as a dashed line)."""
        from mechinterp.plots import knockout_curve

        return knockout_curve(self.summary(value), value=value, title=title)


def knockout_sweep(
    model,
    examples: Sequence[Example],
    ranked: Sequence[Head] | str,
    *,
    ks: Sequence[int] = (1, 2, 5, 10),
    seeds: Sequence[int] = (0, 1, 2),
    modes: Sequence[str] = ("zero",),
    ranked_pool: int | None = None,
    match_layers: bool = True,
    max_new_tokens: int = 32,
    batch_size: int = 4,
    score: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the sweep; return one row per (mode, k, condition, seed, example): the task metrics of
    the generated answer, and with `score` the answer's teacher-forced log-prob too.

    The random heads avoid the top `ranked_pool` ranked heads (default: the largest k), so a
    random draw never contains a head the ranking calls a retrieval head at any tested k.
    """
    from mechinterp.evaluate import evaluate

    shape = HeadShape.of(model)
    ranked = parse_heads(ranked, shape)
    ks = sorted(int(k) for k in check_selection("ks", ks))
    check_selection("seeds", seeds)
    check_selection("modes", modes)
    if ks[0] < 1:
        raise InputError("ks must be positive head counts")
    if ks[-1] > len(ranked):
        raise InputError(f"k={ks[-1]} exceeds the {len(ranked)} ranked heads given")
    bad = [m for m in modes if m not in SWEEP_MODES]
    if bad:
        raise InputError(f"sweep modes must be among {SWEEP_MODES}, got {bad}")
    check_selection("examples", [ex.id for ex in examples])
    pool = ranked[: ranked_pool or ks[-1]]
    runs: list[tuple[str, int, str, int | None, tuple[Head, ...]]] = [("none", 0, "none", None, ())]
    for mode in modes:
        for k in ks:
            runs.append((mode, k, "top", None, tuple(ranked[:k])))
            for s in seeds:
                match = ranked[:k] if match_layers else None
                drawn = random_complement(pool, k, shape, seed=s, match_layers=match)
                runs.append((mode, k, "random", s, tuple(drawn)))
    frames = []
    bar = tqdm(runs, desc="knockout sweep", disable=not progress)
    for mode, k, condition, seed, heads in bar:
        bar.set_postfix_str(f"{mode} k={k} {condition}")
        spec = KnockoutSpec(heads=heads, mode=mode if heads else "zero")
        with knockout(model, spec):
            df = evaluate(
                model,
                examples,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                score=score,
                progress=False,
            )
        frames.append(
            df.assign(
                mode=mode,
                k=k,
                condition=condition,
                seed=seed,
                heads=" ".join(str(h) for h in heads),
            )
        )
    return KnockoutSweep(pd.concat(frames, ignore_index=True))


def summarise_sweep(df: pd.DataFrame, value: str = "correct") -> pd.DataFrame:
    """Mean `value` per (mode, k, condition); random rows average over seeds and examples, with
    the spread across seeds (`seed_sd`)."""
    per_seed = (
        df.assign(_v=df[value].astype(float))
        .groupby(["mode", "k", "condition", "seed"], dropna=False)["_v"]
        .mean()
        .reset_index()
    )
    out = (
        per_seed.groupby(["mode", "k", "condition"], dropna=False)["_v"]
        .agg(mean="mean", seed_sd="std", n_seeds="size")
        .reset_index()
    )
    out["n_examples"] = df.groupby(["mode", "k", "condition"], dropna=False).size().values // (
        out["n_seeds"].values
    )
    return out.rename(columns={"mean": value})
