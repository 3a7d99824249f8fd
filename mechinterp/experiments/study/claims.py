"""The claims report's numbers, computed from the study's stored tables only.

Each claim has one or more rows: an effect size, a percentile bootstrap CI and a verdict from
`verdict`. The intervals are hierarchical (`analysis.stats.cluster_bootstrap`): NIAH examples
that share a needle resample together (MDQA examples, each its own fact and documents, are their
own clusters), and the random baseline's draws are resampled crossed with them; each row names
what it resampled (`resampled`) and its baseline draw (`baseline`). The claim's headline verdict
comes from its primary rows: supported when all are, not supported when all are, else
inconclusive.

1. sparse — "retrieval heads are sparse": the share of heads scoring > threshold (resampling
   detection needles); supported when the CI lies inside (0, max_share).
2. necessary — "knocking them out hurts more than random heads": per example and random draw,
   answer retrieved under k layer-matched random heads minus under the top k, for each task and
   mode (primary), the same for the answer's log-prob and against uniform draws (secondary);
   supported when the CI excludes 0 and the estimate reaches min_drop.
3. sufficient — "patching them recovers the answer": normalised recovery when the retrieval
   heads are patched jointly, over pairs the corruption flips (primary; min_recovery); the
   excess over random sets of the same size, and the per-head recovery of retrieval heads minus
   the rest (secondary); and, from path patching, the share of the retrieval heads' recovery
   carried by their query inputs vs their key inputs (secondary).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from mechinterp.analysis.stats import cluster_bootstrap, cluster_bootstrap_stat

CLAIMS = {
    "sparse": "Retrieval heads are sparse",
    "necessary": "Knocking out retrieval heads hurts retrieval more than knocking out random heads",
    "sufficient": "Patching retrieval heads recovers the answer",
}


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
        "verdict": _correlation_verdict(
            extra["p_permutation"], hi, est, minimum=minimum, alpha=extra["alpha"]
        )
        if rule == "correlation"
        else verdict(lo, hi, est, null=null, minimum=minimum)
        if rule == "above"
        else _share_verdict(lo, hi, maximum=minimum),
        **extra,
    }


def _correlation_verdict(
    p: float, hi: float, estimate: float, *, minimum: float, alpha: float
) -> str:
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


def cluster_labels(frame: pd.DataFrame, id_column: str = "example_id") -> pd.Series:
    """Each item's cluster, indexed by `id_column`: its needle (`needle N`) where it has one
    (NIAH examples and detection instances share a needle across lengths and depths), else the
    item itself (each synthetic MDQA example has its own fact and documents)."""
    one = frame.drop_duplicates(id_column).set_index(id_column)
    needle = one["needle_index"] if "needle_index" in one else pd.Series(np.nan, one.index)
    return pd.Series(
        [f"needle {int(n)}" if pd.notna(n) else str(i) for i, n in needle.items()], one.index
    )


def _cluster_name(labels) -> tuple[str, str]:
    """(cluster, item) words for `Interval.unit`."""
    needles = any(str(c).startswith("needle ") for c in labels)
    return ("needles", "examples") if needles else ("clusters", "examples")


def _boot(settings) -> dict:
    return {"n_boot": settings.n_boot, "level": settings.level, "seed": settings.seed}


def sparse_rows(per_instance: pd.DataFrame, threshold: float, settings) -> list[dict]:
    counted = per_instance[per_instance["counted"]]
    ids = sorted(counted["instance_id"].unique())
    cube = (
        counted.pivot_table(index="instance_id", columns=["layer", "head"], values="value")
        .reindex(ids)
        .to_numpy()
    )  # [instance, head]

    def share(w: np.ndarray) -> float:
        return float(((w @ cube) / w.sum() > threshold).mean())

    clusters = cluster_labels(counted, "instance_id").reindex(ids).to_numpy()
    iv = cluster_bootstrap_stat(share, clusters, **_boot(settings))
    return [
        _row(
            "sparse",
            f"share of heads with retrieval score > {threshold:g}",
            "share_of_heads",
            iv.estimate,
            iv.low,
            iv.high,
            len(ids),
            "fraction of heads",
            primary=True,
            null=0.0,
            minimum=settings.max_share,
            rule="share",
            resampled=iv.unit("needles", "detection instances"),
            n_heads=cube.shape[1],
            n_retrieval_heads=int(round(iv.estimate * cube.shape[1])),
        )  # fmt: skip
    ]


#: Random-baseline conditions of the knockout tables: layer-matched draws (the verdict's
#: baseline) and uniform draws over all layers (reported beside it).
BASELINES = {"random": "layer-matched", "random_uniform": "uniform over layers"}


def paired_draws(top: pd.Series, rand: pd.DataFrame) -> tuple[list, np.ndarray]:
    """(items, [item, draw] random − top) over the items that have the top value and every
    draw (`rand`: one column per draw, indexed like `top`)."""
    both = rand.join(top.rename("_top"), how="inner").dropna()
    return list(both.index), both[rand.columns].to_numpy(float) - both[["_top"]].to_numpy(float)


def _versus(g: pd.DataFrame, metric: str, baseline: str, clusters: pd.Series, settings):
    """(interval of random − top over examples × draws, examples, mean top, mean random) for
    one group of knockout rows."""
    top = g[g["condition"] == "top"].set_index("example_id")[metric].astype(float)
    rand = (
        g[g["condition"] == baseline]
        .pivot_table(index="example_id", columns="seed", values=metric, aggfunc="mean")
        .astype(float)
    )  # [example, draw]
    ids, diff = paired_draws(top, rand)
    iv = cluster_bootstrap(diff, clusters.reindex(ids).to_numpy(), **_boot(settings))
    return iv, ids, float(top.reindex(ids).mean()), float(rand.reindex(ids).to_numpy().mean())


def necessity_rows(knockout: pd.DataFrame, settings) -> list[dict]:
    k = settings.k
    rows = []
    at_k = knockout[knockout["k"] == k]
    clusters = cluster_labels(knockout)
    for (task, mode), g in at_k.groupby(["task", "mode"], sort=True):
        for metric, primary, minimum, unit, baseline in (
            ("retrieved", True, settings.min_drop, "fraction of examples", "random"),
            ("answer_logprob", False, 0.0, "nats per answer token", "random"),
            ("retrieved", False, settings.min_drop, "fraction of examples", "random_uniform"),
        ):
            if not (g["condition"] == baseline).any():
                continue
            iv, ids, top, rand = _versus(g, metric, baseline, clusters, settings)
            rows.append(
                _row(
                    "necessary",
                    f"{task} · {mode} · k={k}: random-{k} ({BASELINES[baseline]}) minus top-{k}"
                    + ("" if metric == "retrieved" else f" ({metric})"),
                    metric,
                    iv.estimate,
                    iv.low,
                    iv.high,
                    len(ids),
                    unit,
                    primary=primary,
                    null=0.0,
                    minimum=minimum,
                    rule="above",
                    resampled=iv.unit(*_cluster_name(clusters.reindex(ids))),
                    task=task,
                    mode=mode,
                    baseline=BASELINES[baseline],
                    top=top,
                    random=rand,
                )  # fmt: skip
            )
    return rows


def robustness_rows(knockout: pd.DataFrame, robustness: pd.DataFrame, config) -> list[dict]:
    """Secondary necessity rows at the claim's k: random minus top (retrieved) per task, mode,
    scope and method (teacher-forced, or free generation), against each random draw, over the
    robustness stage's seeds. The knockout stage's scope comes from its own table."""
    s = config.claims
    primary = knockout[
        (knockout["k"].isin([0, s.k]))
        & knockout["mode"].isin([*config.robustness_modes, "none"])
        & knockout["seed"].isin([*config.robustness_seeds, -1])
    ].assign(method="teacher-forced", scope=config.knockout.scope)
    both = pd.concat([primary, robustness], ignore_index=True)
    clusters = cluster_labels(both)
    rows = []
    for (task, method, scope, mode), g in both[both["k"] == s.k].groupby(
        ["task", "method", "scope", "mode"], sort=True
    ):
        none = both[(both["task"] == task) & (both["method"] == method)
                    & (both["scope"] == scope) & (both["condition"] == "none")]  # fmt: skip
        for baseline in ("random", "random_uniform"):
            if not (g["condition"] == baseline).any():
                continue
            iv, ids, top, rand = _versus(g, "retrieved", baseline, clusters, s)
            rows.append(_row(
                "necessary",
                f"{task} · {mode} · k={s.k} · scope {scope}, {method}: random-{s.k} "
                f"({BASELINES[baseline]}) minus top-{s.k}",
                "retrieved", iv.estimate, iv.low, iv.high, len(ids), "fraction of examples",
                primary=False, null=0.0, minimum=s.min_drop, rule="above",
                resampled=iv.unit(*_cluster_name(clusters.reindex(ids))), task=task, mode=mode,
                baseline=BASELINES[baseline], top=top, random=rand, robustness=True,
                scope=scope, method=method,
                none=float(none.set_index("example_id")["retrieved"].reindex(ids).mean()),
            ))  # fmt: skip
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
                     resampled="", n_pairs=n_pairs)]  # fmt: skip
    sets = flipped[flipped["kind"] == "set"].pivot_table(
        index="example_id", columns="name", values="recovery"
    )
    ids = list(sets.index)
    clusters = cluster_labels(flipped).reindex(ids)
    words = _cluster_name(clusters)

    def judged(values, label, metric, *, primary, minimum, **extra):
        iv = cluster_bootstrap(values, clusters.to_numpy(), **_boot(settings))
        return _row("sufficient", label, metric, iv.estimate, iv.low, iv.high, len(ids),
                    "normalised recovery", primary=primary, null=0.0, minimum=minimum,
                    rule="above", resampled=iv.unit(*words), n_pairs=n_pairs,
                    **extra)  # fmt: skip

    rows = []
    if "retrieval" in sets.columns:
        ret = sets["retrieval"].to_numpy()
        n_ret = int(flipped.loc[flipped["name"] == "retrieval", "n_heads"].iloc[0])
        rows.append(judged(ret, f"recovery when the {n_ret} retrieval heads are patched jointly"
                           f"{_coverage(flipped)}", "recovery", primary=True,
                           minimum=settings.min_recovery))  # fmt: skip
        rand_cols = [c for c in sets.columns if c.startswith("random-")]
        if rand_cols:
            excess = ret[:, None] - sets[rand_cols].to_numpy()  # [pair, draw]
            rows.append(judged(excess, f"retrieval set minus random sets of {n_ret} heads "
                               f"({len(rand_cols)} layer-matched draws)", "recovery",
                               primary=False, minimum=0.0,
                               baseline=BASELINES["random"]))  # fmt: skip
    heads = flipped[flipped["kind"] == "head"]
    per = heads.groupby(["example_id", "in_set"])["recovery"].mean().unstack("in_set")
    if True in per.columns and False in per.columns:
        gap = (per[True] - per[False]).reindex(ids).to_numpy()
        rows.append(judged(gap, "mean per-head recovery: retrieval heads minus the rest",
                           "recovery_per_head", primary=False, minimum=0.0))  # fmt: skip
    if "all" in sets.columns:
        rows.append(judged(sets["all"].to_numpy(), "check: every head patched jointly "
                           "(exactly 1 expected)", "recovery", primary=False,
                           minimum=0.99))  # fmt: skip
    return rows


def path_rows(paths: pd.DataFrame, settings) -> list[dict]:
    """A secondary row of the sufficiency claim: of the recovery the retrieval heads get from
    every upstream head path-patched into their queries (R_q) and, separately, into their keys
    (R_k), the share R_q / (R_q + R_k), means over the flipped pairs; > 0.5: queries carry more.
    When the CI of R_q + R_k does not lie above 0 there is nothing to split: the row says so,
    with no estimate. Needs both inputs."""
    joint = paths[(paths["kind"] == "set") & paths["flipped"]]
    if not {"q", "k"} <= set(joint["receiver_input"]):
        return []
    per = joint.pivot_table(index="example_id", columns="receiver_input", values="recovery")
    ids = list(per.index)
    clusters = cluster_labels(joint).reindex(ids)
    q, k = per["q"].to_numpy(), per["k"].to_numpy()

    def share(w: np.ndarray) -> float:
        rq, rk = float(w @ q) / w.sum(), float(w @ k) / w.sum()
        return rq / (rq + rk) if rq + rk > 0 else float("nan")

    words = _cluster_name(clusters)
    total = cluster_bootstrap(q + k, clusters.to_numpy(), **_boot(settings))
    n = len(paths["receivers"].iloc[0].split(","))
    label = (f"share of the {n} best retrieval heads' recovery from upstream heads carried by "
             f"their queries vs their keys (path patching; recovery via queries {q.mean():.2f}, "
             f"via keys {k.mean():.2f})")  # fmt: skip
    if total.low <= 0:  # nothing to split: say so rather than print a ratio of noise
        return [_row("sufficient", label + f"; together {total.estimate:.2f} [{total.low:.2f}, "
                     f"{total.high:.2f}]: neither input carries recovery, no share to split",
                     "query_share", float("nan"), float("nan"), float("nan"), len(ids), "share",
                     primary=False, null=0.5, minimum=0.5, rule="above",
                     resampled=total.unit(*words), n_pairs=len(ids))]  # fmt: skip
    iv = cluster_bootstrap_stat(share, clusters.to_numpy(), **_boot(settings))
    return [_row("sufficient", label + "; > 0.5: queries carry more", "query_share",
                 iv.estimate, iv.low, iv.high, len(ids), "share", primary=False, null=0.5,
                 minimum=0.5, rule="above", resampled=iv.unit(*words),
                 n_pairs=len(ids))]  # fmt: skip


def table_lines(
    claims: pd.DataFrame, fmt: Callable[[float, str], str], *, with_claim: bool = False
) -> list[str]:
    """A claims table in Markdown: per row its estimate and CI, what the interval resampled,
    the random baseline's draw, the exact permutation p (correlations), the minimum effect and
    the verdict."""
    head = ["row", "estimate", "CI", "n", "resampled", "baseline", "permutation p", "minimum",
            "verdict"]  # fmt: skip
    head = ["claim", *head] if with_claim else head
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in claims.itertuples():
        p = getattr(r, "p_permutation", float("nan"))
        resampled, baseline = (getattr(r, c, None) for c in ("resampled", "baseline"))
        cells = [
            r.label + ("" if r.primary else " (secondary)"),
            fmt(r.estimate, r.unit),
            f"[{fmt(r.ci_low, r.unit)}, {fmt(r.ci_high, r.unit)}]",
            str(r.n),
            resampled if isinstance(resampled, str) and resampled else "—",
            baseline if isinstance(baseline, str) and baseline else "—",
            f"{p:.3f}" if p == p else "—",
            fmt(r.min_effect, r.unit),
            r.verdict,
        ]
        lines.append("| " + " | ".join([r.claim, *cells] if with_claim else cells) + " |")
    return lines


def compute_claims(tables: dict[str, pd.DataFrame], config) -> pd.DataFrame:
    """Every claim row from the study's tables (`detect_instances`, `knockout`, `robustness`,
    `patch`)."""
    s = config.claims
    rows = sparse_rows(tables["detect_instances"], config.detect.threshold, s)
    if len(tables.get("knockout", ())):
        rows += necessity_rows(tables["knockout"], s)
        if len(tables.get("robustness", ())):
            rows += robustness_rows(tables["knockout"], tables["robustness"], config)
    if len(tables.get("patch", ())):
        rows += sufficiency_rows(tables["patch"], s)
    if len(tables.get("paths", ())):
        rows += path_rows(tables["paths"], s)
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
