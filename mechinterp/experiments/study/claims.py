"""The claims report's numbers, computed from the study's stored tables only.

Each claim has one or more rows: an effect size, a 95 % interval and a verdict from `verdict`.
The intervals are cluster-robust t intervals (`analysis.stats`): NIAH examples that share a
needle form one cluster (MDQA examples, each its own fact and documents, are their own
clusters), and a random baseline's draws are a second random factor crossed with them; each
row names what it rests on (`resampled`), its baseline draw (`baseline`) and whether it has
enough clusters to be read (`trusted`: at least `analysis.stats.MIN_CLUSTERS`). The claim's
headline verdict comes from its primary rows: supported when all are, not supported when all
are, else inconclusive.

1. sparse — "retrieval heads are sparse": the share of heads scoring > threshold (a
   delete-one-needle jackknife interval); supported when the interval lies inside
   (0, max_share).
2. necessary — "knocking them out hurts more than random heads": per example and random draw,
   answer retrieved under k layer-matched random heads minus under the top k, for each task and
   mode (primary), the same for the answer's log-prob and against uniform draws (secondary);
   supported when the interval's lower end reaches min_drop.
3. sufficient — "patching them recovers the answer": recovery when the retrieval heads are
   patched jointly, Σ recovered / Σ gap over the pairs the corruption flips (primary;
   min_recovery), with the mean of per-pair recoveries and the smallest gap beside it; the
   excess over random sets of the same size, and the per-head recovery of retrieval heads minus
   the rest (secondary); and, from path patching, the recovery carried by the queries and by the
   keys of the same query heads (the KV groups wholly inside the retrieval heads, else their
   whole KV groups), each with its interval, and the query share when both lower bounds are
   positive (secondary).
4. steered — "upstream heads steer where retrieval heads look", from address pairs (a question
   swap moves the asked needle, a key swap removes the needle's address), with the retrieval
   heads' attention mass on the asked needle as the metric (minus the mass on the other needle
   for a question swap): per corruption and receiver input (queries, keys), the `size` upstream
   heads with the highest path-patching recovery, chosen with the pair's needle left out
   (cross-fitted) and measured on it, minus as many heads of the same layers (their layers'
   mean). Primary: the input each corruption addresses (`ADDRESSED`: a question swap's
   queries, a key swap's keys), Bonferroni-widened over the primary rows, supported when any
   one is; secondary: the other input, how far the corruption moved the mass, the recovery
   every upstream head carries into the queries and into the keys, the receivers' own queries
   and keys patched back, and each hypothesis set (previous-token heads into the keys, heads
   that read the question into the queries) minus its layer-matched random sets.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from mechinterp.analysis.stats import (
    Interval,
    cluster_jackknife,
    cluster_mean,
    cluster_ratio,
)
from mechinterp.experiments.addressing import HYPOTHESES

CLAIMS = {
    "sparse": "Retrieval heads are sparse",
    "necessary": "Knocking out retrieval heads hurts retrieval more than knocking out random heads",
    "sufficient": "Patching retrieval heads recovers the answer",
    "steered": "Upstream heads steer where retrieval heads look (through their queries or keys)",
}

#: Claims whose statement holds when any primary row holds ("some upstream heads steer, through
#: the queries or the keys, under some corruption"); their primary intervals are Bonferroni-
#: widened over the primary rows, so the claim's family-wise error stays at 1 − level.
ANY_ROW_CLAIMS = frozenset({"steered"})


def verdict(lo: float, hi: float, *, null: float, minimum: float, trusted: bool = True) -> str:
    """supported: the interval lies above `null` and its lower end reaches `minimum`; not
    supported: its upper end lies below `minimum`; inconclusive otherwise, and always when the
    interval rests on too few clusters to be trusted (`trusted=False`)."""
    if not trusted:
        return "inconclusive"
    if lo > null and lo >= minimum:
        return "supported"
    if hi < minimum:
        return "not supported"
    return "inconclusive"


def _row(claim, label, metric, est, lo, hi, n, unit, *, primary, null, minimum, rule,
         trusted=True, **extra):  # fmt: skip
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
        else verdict(lo, hi, null=null, minimum=minimum, trusted=trusted)
        if rule == "above"
        else _share_verdict(lo, hi, maximum=minimum, trusted=trusted),
        "trusted": bool(trusted),
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


def _share_verdict(lo: float, hi: float, *, maximum: float, trusted: bool = True) -> str:
    if not trusted:
        return "inconclusive"
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


def _judged(claim: str, label: str, metric: str, iv: Interval, n: int, unit: str, words,
            **kw) -> dict:  # fmt: skip
    """A claims row from an interval: its bounds, what it rests on and whether it is trusted."""
    return _row(claim, label, metric, iv.estimate, iv.low, iv.high, n, unit,
                trusted=iv.trusted, resampled=iv.unit(*words), n_clusters=iv.n_clusters,
                **kw)  # fmt: skip


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
    iv = cluster_jackknife(share, clusters, level=settings.level)
    return [
        _judged("sparse", f"share of heads with retrieval score > {threshold:g}",
                "share_of_heads", iv, len(ids), "fraction of heads",
                ("needles", "detection instances"), primary=True, null=0.0,
                minimum=settings.max_share, rule="share", n_heads=cube.shape[1],
                n_retrieval_heads=int(round(iv.estimate * cube.shape[1])))  # fmt: skip
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
    bounds = (-1.0, 1.0) if metric == "retrieved" else None  # a difference of two rates
    iv = cluster_mean(diff, clusters.reindex(ids).to_numpy(), level=settings.level, bounds=bounds)
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
                _judged(
                    "necessary",
                    f"{task} · {mode} · k={k}: random-{k} ({BASELINES[baseline]}) minus top-{k}"
                    + ("" if metric == "retrieved" else f" ({metric})"),
                    metric, iv, len(ids), unit, _cluster_name(clusters.reindex(ids)),
                    primary=primary, null=0.0, minimum=minimum, rule="above", task=task,
                    mode=mode, baseline=BASELINES[baseline], top=top, random=rand,
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
            rows.append(_judged(
                "necessary",
                f"{task} · {mode} · k={s.k} · scope {scope}, {method}: random-{s.k} "
                f"({BASELINES[baseline]}) minus top-{s.k}",
                "retrieved", iv, len(ids), "fraction of examples",
                _cluster_name(clusters.reindex(ids)), primary=False, null=0.0,
                minimum=s.min_drop, rule="above", task=task, mode=mode,
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


def _recovered(rows: pd.DataFrame) -> pd.Series:
    """The metric moved from the corrupt run toward the clean one, per row: value − corrupt."""
    return rows["value"].astype(float) - rows["corrupt_metric"].astype(float)


def sufficiency_rows(patch: pd.DataFrame, settings) -> list[dict]:
    flipped = patch[patch["flipped"]]
    n_pairs = patch["example_id"].nunique()
    if flipped.empty:
        return [_row("sufficient", "no pair flipped the answer: nothing to recover", "recovery",
                     float("nan"), float("nan"), float("nan"), 0, "normalised recovery",
                     primary=True, null=0.0, minimum=settings.min_recovery, rule="above",
                     resampled="", n_pairs=n_pairs)]  # fmt: skip
    one = flipped.drop_duplicates("example_id").set_index("example_id")
    sets_ = flipped[flipped["kind"] == "set"].assign(recovered=_recovered)
    recovered = sets_.pivot_table(index="example_id", columns="name", values="recovered")
    per_pair = sets_.pivot_table(index="example_id", columns="name", values="recovery")
    ids = list(recovered.index)
    gap = (one["clean_metric"] - one["corrupt_metric"]).reindex(ids).to_numpy(float)
    clusters = cluster_labels(flipped).reindex(ids)
    words = _cluster_name(clusters)

    def judged(numerator, label, metric, *, primary, minimum, **extra):
        iv = cluster_ratio(numerator, gap, clusters.to_numpy(), level=settings.level)
        return _judged("sufficient", label, metric, iv, len(ids), "normalised recovery", words,
                       primary=primary, null=0.0, minimum=minimum, rule="above",
                       n_pairs=n_pairs, min_gap=float(gap.min()), **extra)  # fmt: skip

    rows = []
    if "retrieval" in recovered.columns:
        ret = recovered["retrieval"].to_numpy()
        n_ret = int(flipped.loc[flipped["name"] == "retrieval", "n_heads"].iloc[0])
        rows.append(judged(ret, f"recovery when the {n_ret} retrieval heads are patched jointly"
                           f" (Σ recovered / Σ gap){_coverage(flipped)}", "recovery",
                           primary=True, minimum=settings.min_recovery,
                           per_pair_mean=float(per_pair["retrieval"].mean())))  # fmt: skip
        rand_cols = [c for c in recovered.columns if c.startswith("random-")]
        if rand_cols:
            excess = ret[:, None] - recovered[rand_cols].to_numpy()  # [pair, draw]
            rows.append(judged(excess, f"retrieval set minus random sets of {n_ret} heads "
                               f"({len(rand_cols)} layer-matched draws)", "recovery",
                               primary=False, minimum=0.0,
                               baseline=BASELINES["random"]))  # fmt: skip
    heads = flipped[flipped["kind"] == "head"].assign(recovered=_recovered)
    per = heads.groupby(["example_id", "in_set"])["recovered"].mean().unstack("in_set")
    if True in per.columns and False in per.columns:
        diff = (per[True] - per[False]).reindex(ids).to_numpy()
        rows.append(judged(diff, "mean per-head recovery: retrieval heads minus the rest",
                           "recovery_per_head", primary=False, minimum=0.0))  # fmt: skip
    if "all" in recovered.columns:
        rows.append(judged(recovered["all"].to_numpy(), "check: every head patched jointly "
                           "(exactly 1 expected)", "recovery", primary=False,
                           minimum=0.99))  # fmt: skip
    return rows


#: What each same-heads comparison of the paths table compares (`attribution.SAME_HEADS`).
_COMPARED = {
    "receiver_groups": "the {heads} query heads of the {groups} KV groups wholly inside the {n} "
    "best retrieval heads",
    "whole_groups": "the {heads} query heads of the {groups} KV groups the {n} best retrieval "
    "heads read",
}


def path_rows(paths: pd.DataFrame, settings) -> list[dict]:
    """Secondary rows of the sufficiency claim, from path patching every upstream head jointly
    into the queries and, separately, the keys of the *same* query heads (`kind ==
    "same_heads"`; under GQA a key input is its KV group's, so the receivers' keys reach query
    heads their queries do not). Per comparison: the recovery through the queries (R_q) and
    through the keys (R_k), each Σ recovered / Σ gap over the flipped pairs with its own
    interval, and the query share R_q / (R_q + R_k) only when both lower bounds lie above 0
    (otherwise the share of noise is not a number to read, and the row says so). The KV groups
    wholly inside the receivers come first; when there is none, the rows say so and the
    receivers' whole KV groups take their place."""
    same = paths[(paths["kind"] == "same_heads") & paths["flipped"]]
    if same.empty:
        return []
    n = len(paths["receivers"].iloc[0].split(","))
    rows, seen = [], set()
    for comparison in _COMPARED:
        g = same[same["comparison"] == comparison]
        if g.empty or g["compared_heads"].iloc[0] in seen:  # MHA: both are the receivers
            continue
        seen.add(g["compared_heads"].iloc[0])
        facts = {"comparison": comparison, "compared_heads": g["compared_heads"].iloc[0],
                 "n_compared_heads": int(g["n_compared_heads"].iloc[0]),
                 "n_kv_groups": int(g["n_kv_groups"].iloc[0])}  # fmt: skip
        what = _COMPARED[comparison].format(heads=facts["n_compared_heads"],
                                            groups=facts["n_kv_groups"], n=n)  # fmt: skip
        if comparison == "whole_groups" and not (same["comparison"] == "receiver_groups").any():
            what += f" (no KV group lies wholly inside the {n})"
        rows += _query_key_rows(g.assign(recovered=_recovered), what, facts, settings)
    return rows


def _query_key_rows(g: pd.DataFrame, what: str, facts: dict, settings) -> list[dict]:
    """R_q, R_k and the query share of one same-heads comparison's flipped pairs."""
    per = g.pivot_table(index="example_id", columns="receiver_input", values="recovered")
    ids = list(per.index)
    one = g.drop_duplicates("example_id").set_index("example_id")
    gap = (one["clean_metric"] - one["corrupt_metric"]).reindex(ids).to_numpy(float)
    clusters = cluster_labels(g).reindex(ids).to_numpy()
    words = _cluster_name(clusters)
    rows, ivs = [], {}
    for node, word in (("q", "queries"), ("k", "keys")):
        ivs[node] = iv = cluster_ratio(per[node].to_numpy(), gap, clusters, level=settings.level)
        rows.append(_judged("sufficient", f"recovery carried into the {word} of {what} by every "
                            "upstream head (path patching)", f"recovery_{node}", iv, len(ids),
                            "normalised recovery", words, primary=False, null=0.0, minimum=0.0,
                            rule="above", n_pairs=len(ids), **facts))  # fmt: skip
    label = (f"share of that recovery carried by the queries of those "
             f"{facts['n_compared_heads']} heads rather than their keys")  # fmt: skip
    if ivs["q"].low <= 0 or ivs["k"].low <= 0:
        rows.append(_row("sufficient", label + ": not both inputs carry recovery, no share to "
                         "split", "query_share", float("nan"), float("nan"), float("nan"),
                         len(ids), "share", primary=False, null=0.5, minimum=0.5, rule="above",
                         resampled=ivs["q"].unit(*words), n_pairs=len(ids), **facts))  # fmt: skip
        return rows
    q = per["q"].to_numpy()
    iv = cluster_ratio(q, q + per["k"].to_numpy(), clusters, level=settings.level)
    rows.append(_judged("sufficient", label + "; > 0.5: queries carry more", "query_share", iv,
                        len(ids), "share", words, primary=False, null=0.5, minimum=0.5,
                        rule="above", n_pairs=len(ids), **facts))  # fmt: skip
    return rows


CORRUPTION_WORDS = {"question_swap": "question swap", "key_swap": "key swap"}
#: The input each address corruption addresses, whose top senders are the claim's primary row: a
#: question swap changes the question (read through the queries), a key swap the needle (read
#: through the keys); the other input's rows are secondary.
ADDRESSED = {"question_swap": "q", "key_swap": "k"}
_INPUT_WORDS = {"q": "queries", "k": "keys"}


def _moved(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of pairs whose corruption moved the receivers' attention (clean > corrupt)."""
    return frame[frame["clean_metric"] > frame["corrupt_metric"]]


def top_senders(senders: pd.DataFrame, size: int) -> list[str]:
    """The `size` senders with the highest recovery, Σ recovered / Σ gap over `senders`' pairs
    (one input, one corruption)."""
    rec = senders.assign(recovered=senders["value"] - senders["corrupt_metric"],
                         gap=senders["clean_metric"] - senders["corrupt_metric"])  # fmt: skip
    per = rec.groupby("head_name")[["recovered", "gap"]].sum()
    ranked = (per["recovered"] / per["gap"]).sort_values(ascending=False, kind="stable")
    return list(ranked.index[:size])


def cross_fitted_excess(senders: pd.DataFrame, clusters: pd.Series, size: int) -> pd.DataFrame:
    """Per pair: the summed recovered mass of the `size` top senders chosen on the other
    clusters' pairs (`top_senders`), minus the same number of heads at their layers' mean
    (the senders' expected sum when drawn layer-matched at random), and the pair's gap."""
    rows = []
    cluster_of = clusters.to_dict()
    senders = senders.assign(recovered=senders["value"] - senders["corrupt_metric"])
    for c in sorted(set(cluster_of[e] for e in senders["example_id"].unique())):
        inside = senders["example_id"].map(cluster_of) == c
        chosen = set(top_senders(senders[~inside], size))
        for ex, g in senders[inside].groupby("example_id"):
            layer_mean = g.groupby("layer")["recovered"].mean()
            sel = g[g["head_name"].isin(chosen)]
            excess = float(sel["recovered"].sum() - layer_mean.reindex(sel["layer"]).sum())
            rows.append({"example_id": ex, "excess": excess,
                         "gap": float(g["clean_metric"].iloc[0] - g["corrupt_metric"].iloc[0])})
    return pd.DataFrame(rows)


def steering_rows(addressing: pd.DataFrame, config) -> list[dict]:
    """The `steered` claim's rows (see the module docstring) from the addressing table."""
    s, a = config.claims, config.addressing
    rows: list[dict] = []
    analysed = addressing[addressing["kind"].isin(["sender", "set", "mass"])]
    if analysed.empty:
        nan = float("nan")
        return [_row("steered", f"no address pair of {addressing['example_id'].nunique()} was "
                     "answered apart: nothing to analyse", "top_senders", nan, nan, nan, 0,
                     "normalised recovery", primary=True, null=0.0, minimum=s.min_steer,
                     rule="above", trusted=False)]  # fmt: skip
    n_primary = sum(c in ADDRESSED for c in analysed["corruption"].unique())
    wide = 1 - (1 - s.level) / max(n_primary, 1)
    for corruption, frame in analysed.groupby("corruption", sort=False):
        word = CORRUPTION_WORDS.get(corruption, corruption)
        paths = _moved(frame[frame["kind"].isin(["sender", "set"])])
        if paths.empty:
            continue
        one = paths.drop_duplicates("example_id").set_index("example_id")
        ids = list(one.index)
        clusters = cluster_labels(paths)
        words = _cluster_name(clusters)
        gap = (one["clean_metric"] - one["corrupt_metric"]).to_numpy(float)
        iv = cluster_mean(gap, clusters.reindex(ids).to_numpy(), level=s.level)
        rows.append(_judged("steered", f"{word}: attention moved off the asked needle "
                            "(receivers' mass metric, clean minus corrupt)", "mass_moved", iv,
                            len(ids), "mass", words, primary=False, null=0.0, minimum=0.0,
                            rule="above", corruption=corruption))  # fmt: skip
        for inp, inp_word in _INPUT_WORDS.items():
            g = paths[paths["receiver_input"] == inp]
            up = g[(g["kind"] == "set") & (g["head_name"] == "upstream")].set_index("example_id")
            iv = cluster_ratio((up["value"] - up["corrupt_metric"]).reindex(ids).to_numpy(float),
                               gap, clusters.reindex(ids).to_numpy(), level=s.level)
            rows.append(_judged("steered", f"{word}: recovery carried into the {inp_word} by "
                                "every upstream head together", f"upstream_{inp}", iv, len(ids),
                                "normalised recovery", words, primary=False, null=0.0,
                                minimum=0.0, rule="above", corruption=corruption,
                                receiver_input=inp))  # fmt: skip
            senders = g[g["kind"] == "sender"]
            excess = cross_fitted_excess(senders, clusters, a.size).set_index("example_id")
            primary = ADDRESSED.get(corruption) == inp
            iv = cluster_ratio(excess["excess"].reindex(ids).to_numpy(float), gap,
                               clusters.reindex(ids).to_numpy(),
                               level=wide if primary else s.level)  # fmt: skip
            chosen = top_senders(senders, a.size)
            rows.append(_judged("steered", f"{word}: the {a.size} top upstream heads into the "
                                f"{inp_word} ({', '.join(chosen)} on all pairs; chosen with each "
                                "needle left out) minus as many layer-matched heads",
                                f"top_senders_{inp}", iv, len(ids), "normalised recovery",
                                words, primary=primary, null=0.0, minimum=s.min_steer,
                                rule="above", corruption=corruption, receiver_input=inp,
                                senders=",".join(chosen),
                                level=wide if primary else s.level))  # fmt: skip
        for hyp, inp in HYPOTHESES.items():
            g = paths[(paths["kind"] == "set") & (paths["receiver_input"] == inp)]
            mine = g[g["head_name"] == hyp].set_index("example_id")
            rand = g[g["head_name"].str.startswith(f"{hyp}~")].pivot_table(
                index="example_id", columns="head_name", values="value")  # fmt: skip
            if mine.empty or rand.empty:
                continue
            diff = (mine["value"].reindex(ids).to_numpy(float)[:, None]
                    - rand.reindex(ids).to_numpy(float))  # fmt: skip
            iv = cluster_ratio(diff, gap, clusters.reindex(ids).to_numpy(), level=s.level)
            rows.append(_judged("steered", f"{word}: {hyp.replace('_', '-')} heads ({a.size}) "
                                f"into the {_INPUT_WORDS[inp]} minus layer-matched random sets "
                                f"({rand.shape[1]} draws)", f"{hyp}_{inp}", iv, len(ids),
                                "normalised recovery", words, primary=False, null=0.0,
                                minimum=s.min_steer, rule="above", corruption=corruption,
                                receiver_input=inp, baseline="layer-matched random senders"))
        mass = frame[frame["kind"] == "mass"]
        mass = mass[mass["example_id"].isin(ids)]
        for node, node_word in _INPUT_WORDS.items():
            m = _contrast(mass[mass["node"] == node]).reindex(ids)
            iv = cluster_ratio((m["patched"] - m["corrupt"]).to_numpy(float),
                               (m["clean"] - m["corrupt"]).to_numpy(float),
                               clusters.reindex(ids).to_numpy(), level=s.level)  # fmt: skip
            rows.append(_judged("steered", f"{word}: the receivers' own {node_word} patched back "
                                "(each head alone, its attention restored)", f"own_{node}", iv,
                                len(ids), "normalised recovery", words, primary=False,
                                null=0.0, minimum=0.0, rule="above",
                                corruption=corruption, receiver_input=node))  # fmt: skip
    return rows


def _contrast(mass: pd.DataFrame) -> pd.DataFrame:
    """Per pair, the receivers' summed mass (clean, corrupt, patched) on the asked needle, minus
    that on the other needle where there is one (a question swap), as the path metric reads."""
    sign = np.where(mass["needle"] == 0, 1.0, -1.0)
    cols = {"clean": "clean_mass", "corrupt": "corrupt_mass", "patched": "patched_mass"}
    signed = pd.DataFrame({k: mass[v].to_numpy() * sign for k, v in cols.items()},
                          index=mass["example_id"])  # fmt: skip
    return signed.groupby(level=0).sum()


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
    if len(tables.get("addressing", ())):
        rows += steering_rows(tables["addressing"], config)
    return pd.DataFrame(rows)


#: Claims a study tests only when their stage runs: left out of the headline otherwise.
OPTIONAL_CLAIMS = frozenset({"steered"})


def headline(claims: pd.DataFrame, statements: dict[str, str] = CLAIMS) -> pd.DataFrame:
    """One row per claim: its statement and the verdict of its primary rows (an optional claim
    whose stage did not run has no row)."""
    out = []
    for claim, statement in statements.items():
        if claim in OPTIONAL_CLAIMS and (claims.empty or not (claims["claim"] == claim).any()):
            continue
        prim = claims[(claims["claim"] == claim) & claims["primary"]]
        verdicts = set(prim["verdict"])
        if not verdicts:
            v = "not tested"
        elif claim in ANY_ROW_CLAIMS and "supported" in verdicts:
            v = "supported"
        elif verdicts == {"supported"}:
            v = "supported"
        elif verdicts == {"not supported"}:
            v = "not supported"
        else:
            v = "inconclusive"
        out.append({"claim": claim, "statement": statement, "verdict": v, "rows": len(prim)})
    return pd.DataFrame(out)
