"""The claims report's numbers, computed from the study's stored tables only.

Each claim has one or more rows: an effect size, a percentile bootstrap CI (resampling detection
instances, examples or pairs) and a verdict from `verdict`. The claim's headline verdict comes
from its primary rows: supported when all are, not supported when all are, else inconclusive.

1. sparse — "retrieval heads are sparse": the share of heads scoring > threshold (resampling
   detection instances); supported when the CI lies inside (0, max_share).
2. necessary — "knocking them out hurts more than random heads": per example, answer retrieved
   under k random heads (mean over seeds) minus under the top k, for each task and mode (primary),
   and the same for the answer's log-prob (secondary); supported when the CI excludes 0 and the
   estimate reaches min_drop.
3. sufficient — "patching them recovers the answer": normalised recovery when the retrieval
   heads are patched jointly, over pairs the corruption flips (primary; min_recovery); the
   excess over random sets of the same size, and the per-head recovery of retrieval heads minus
   the rest (secondary).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

CLAIMS = {
    "sparse": "Retrieval heads are sparse",
    "necessary": "Knocking out retrieval heads hurts retrieval more than knocking out random heads",
    "sufficient": "Patching retrieval heads recovers the answer",
}


def bootstrap(
    stat: Callable[[np.ndarray], float], n: int, *, n_boot: int, level: float, seed: int
) -> tuple[float, float, float]:
    """(estimate, low, high): `stat(indices)` on all n items, and the percentile CI of `stat`
    over `n_boot` resamples of the indices with replacement."""
    if n < 1:
        raise ValueError("bootstrap needs at least one item")
    est = float(stat(np.arange(n)))
    rng = np.random.default_rng(seed)
    boots = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)], dtype=float)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    return est, float(lo), float(hi)


def verdict(lo: float, hi: float, estimate: float, *, null: float, minimum: float) -> str:
    """supported: CI above `null` and the estimate reaches `minimum`; not supported: the CI lies
    below `minimum`; inconclusive otherwise."""
    if lo > null and estimate >= minimum:
        return "supported"
    if hi < minimum:
        return "not supported"
    return "inconclusive"


def _row(claim, label, metric, est, lo, hi, n, unit, *, primary, null, minimum, rule, **extra):
    return {
        "claim": claim,
        "label": label,
        "metric": metric,
        "estimate": est,
        "ci_low": lo,
        "ci_high": hi,
        "n": int(n),
        "unit": unit,
        "null": null,
        "min_effect": minimum,
        "rule": rule,
        "primary": primary,
        "verdict": _correlation_verdict(extra["p_permutation"], hi, est, minimum=minimum,
                                        alpha=extra["alpha"])
        if rule == "correlation"
        else verdict(lo, hi, est, null=null, minimum=minimum)
        if rule == "above"
        else _share_verdict(lo, hi, maximum=minimum),
        **extra,
    }


def _correlation_verdict(p: float, hi: float, estimate: float, *, minimum: float,
                         alpha: float) -> str:
    """supported: the exact permutation p-value is at most `alpha` and the estimate reaches
    `minimum`; not supported: the bootstrap CI lies below `minimum`; inconclusive otherwise. (At
    N <= 10 a percentile bootstrap alone is not a verdict.)"""
    if p <= alpha and estimate >= minimum:
        return "supported"
    if hi < minimum:
        return "not supported"
    return "inconclusive"


def _share_verdict(lo: float, hi: float, *, maximum: float) -> str:
    if lo > 0 and hi < maximum:
        return "supported"
    if lo >= maximum or hi == 0:
        return "not supported"
    return "inconclusive"


def sparse_rows(per_instance: pd.DataFrame, threshold: float, settings) -> list[dict]:
    counted = per_instance[per_instance["counted"]]
    ids = sorted(counted["instance_id"].unique())
    cube = (
        counted.pivot_table(index="instance_id", columns=["layer", "head"], values="value")
        .reindex(ids)
        .to_numpy()
    )  # [instance, head]

    def share(idx: np.ndarray) -> float:
        return float((cube[idx].mean(0) > threshold).mean())

    est, lo, hi = bootstrap(share, len(ids), n_boot=settings.n_boot, level=settings.level,
                            seed=settings.seed)  # fmt: skip
    return [
        _row(
            "sparse",
            f"share of heads with retrieval score > {threshold:g}",
            "share_of_heads",
            est,
            lo,
            hi,
            len(ids),
            "fraction of heads",
            primary=True,
            null=0.0,
            minimum=settings.max_share,
            rule="share",
            n_heads=cube.shape[1],
            n_retrieval_heads=int(round(est * cube.shape[1])),
        )  # fmt: skip
    ]


#: Random-baseline conditions of the knockout tables: layer-matched draws (the verdict's
#: baseline) and uniform draws over all layers (reported beside it).
BASELINES = {"random": "layer-matched", "random_uniform": "uniform over layers"}


def necessity_rows(knockout: pd.DataFrame, settings) -> list[dict]:
    k = settings.k
    rows = []
    at_k = knockout[knockout["k"] == k]
    for (task, mode), g in at_k.groupby(["task", "mode"], sort=True):
        for metric, primary, minimum, unit, baseline in (
            ("retrieved", True, settings.min_drop, "fraction of examples", "random"),
            ("answer_logprob", False, 0.0, "nats per answer token", "random"),
            ("retrieved", False, settings.min_drop, "fraction of examples", "random_uniform"),
        ):
            if not (g["condition"] == baseline).any():
                continue
            top = g[g["condition"] == "top"].set_index("example_id")[metric].astype(float)
            rand = g[g["condition"] == baseline].groupby("example_id")[metric].mean().astype(float)
            ids = sorted(set(top.index) & set(rand.index))
            diff = (rand.reindex(ids) - top.reindex(ids)).to_numpy()
            est, lo, hi = bootstrap(lambda i, d=diff: d[i].mean(), len(ids),
                                    n_boot=settings.n_boot, level=settings.level,
                                    seed=settings.seed)  # fmt: skip
            rows.append(
                _row(
                    "necessary",
                    f"{task} · {mode} · k={k}: random-{k} ({BASELINES[baseline]}) minus top-{k}",
                    metric,
                    est,
                    lo,
                    hi,
                    len(ids),
                    unit,
                    primary=primary,
                    null=0.0,
                    minimum=minimum,
                    rule="above",
                    task=task,
                    mode=mode,
                    baseline=BASELINES[baseline],
                    top=float(top.reindex(ids).mean()),
                    random=float(rand.reindex(ids).mean()),
                )  # fmt: skip
            )
    return rows


def _coverage(pairs: pd.DataFrame) -> str:
    """What the pairs cover, for a claim's label: " (pairs at lengths … × depths …)"."""
    if not {"length", "depth"} <= set(pairs.columns):
        return ""
    one = pairs.drop_duplicates("example_id")
    lengths = sorted(int(v) for v in one["length"].dropna().unique())
    depths = sorted(float(v) for v in one["depth"].dropna().unique())
    return f" (pairs at lengths {lengths} × depths {depths})" if lengths else ""


def sufficiency_rows(patch: pd.DataFrame, settings) -> list[dict]:
    flipped = patch[patch["flipped"]]
    n_pairs = patch["example_id"].nunique()
    if flipped.empty:
        return [_row("sufficient", "no pair flipped the answer: nothing to recover", "recovery",
                     float("nan"), float("nan"), float("nan"), 0, "normalised recovery",
                     primary=True, null=0.0, minimum=settings.min_recovery, rule="above",
                     n_pairs=n_pairs)]  # fmt: skip
    sets = flipped[flipped["kind"] == "set"].pivot_table(
        index="example_id", columns="name", values="recovery"
    )
    ids = list(sets.index)
    boot = {"n_boot": settings.n_boot, "level": settings.level, "seed": settings.seed}
    rows = []
    if "retrieval" in sets.columns:
        ret = sets["retrieval"].to_numpy()
        n_ret = int(flipped.loc[flipped["name"] == "retrieval", "n_heads"].iloc[0])
        est, lo, hi = bootstrap(lambda i: ret[i].mean(), len(ids), **boot)
        rows.append(_row("sufficient", f"recovery when the {n_ret} retrieval heads are patched "
                         f"jointly{_coverage(flipped)}", "recovery", est, lo, hi, len(ids),
                         "normalised recovery",
                         primary=True, null=0.0, minimum=settings.min_recovery, rule="above",
                         n_pairs=n_pairs))  # fmt: skip
        rand_cols = [c for c in sets.columns if c.startswith("random-")]
        if rand_cols:
            excess = ret - sets[rand_cols].mean(axis=1).to_numpy()
            est, lo, hi = bootstrap(lambda i: excess[i].mean(), len(ids), **boot)
            rows.append(_row("sufficient", f"retrieval set minus random sets of {n_ret} heads "
                             f"({len(rand_cols)} seeds)", "recovery", est, lo, hi, len(ids),
                             "normalised recovery", primary=False, null=0.0, minimum=0.0,
                             rule="above", n_pairs=n_pairs))  # fmt: skip
    heads = flipped[flipped["kind"] == "head"]
    per = heads.groupby(["example_id", "in_set"])["recovery"].mean().unstack("in_set")
    if True in per.columns and False in per.columns:
        gap = (per[True] - per[False]).reindex(ids).to_numpy()
        est, lo, hi = bootstrap(lambda i: gap[i].mean(), len(ids), **boot)
        rows.append(_row("sufficient", "mean per-head recovery: retrieval heads minus the rest",
                         "recovery_per_head", est, lo, hi, len(ids), "normalised recovery",
                         primary=False, null=0.0, minimum=0.0, rule="above",
                         n_pairs=n_pairs))  # fmt: skip
    if "all" in sets.columns:
        allr = sets["all"].to_numpy()
        est, lo, hi = bootstrap(lambda i: allr[i].mean(), len(ids), **boot)
        rows.append(_row("sufficient", "check: every head patched jointly (exactly 1 expected)",
                         "recovery", est, lo, hi, len(ids), "normalised recovery", primary=False,
                         null=0.0, minimum=0.99, rule="above", n_pairs=n_pairs))  # fmt: skip
    return rows


def compute_claims(tables: dict[str, pd.DataFrame], config) -> pd.DataFrame:
    """Every claim row from the study's tables (`detect_instances`, `knockout`, `patch`)."""
    s = config.claims
    rows = sparse_rows(tables["detect_instances"], config.detect.threshold, s)
    if len(tables.get("knockout", ())):
        rows += necessity_rows(tables["knockout"], s)
    if len(tables.get("patch", ())):
        rows += sufficiency_rows(tables["patch"], s)
    return pd.DataFrame(rows)


def headline(claims: pd.DataFrame, statements: dict[str, str] = CLAIMS) -> pd.DataFrame:
    """One row per claim: its statement and the verdict of its primary rows."""
    out = []
    for claim, statement in statements.items():
        prim = claims[(claims["claim"] == claim) & claims["primary"]]
        verdicts = set(prim["verdict"])
        if not verdicts:
            v = "not tested"
        elif verdicts == {"supported"}:
            v = "supported"
        elif verdicts == {"not supported"}:
            v = "not supported"
        else:
            v = "inconclusive"
        out.append({"claim": claim, "statement": statement, "verdict": v, "rows": len(prim)})
    return pd.DataFrame(out)
