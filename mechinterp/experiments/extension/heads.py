"""Each fine-tuned model's retrieval heads and how they compare with the reference model's,
from the detection tables alone."""

from __future__ import annotations

import warnings

import pandas as pd

from mechinterp.experiments.study.config import DetectStage


def model_scores(per_instance: pd.DataFrame, detect: DetectStage) -> pd.DataFrame:
    """Per model and head: score, frequency, rank (`combine_detect` per model); a model none of
    whose instances passed the gate gets NaN scores and no heads, with a warning."""
    from mechinterp.experiments.study.stages import combine_detect

    frames = []
    for v, g in per_instance.groupby("model_variant", sort=False):
        try:
            frames.append(combine_detect(g, detect.threshold, detect.top_k))
        except ValueError as e:  # no instance passed the gate: this model gets no heads
            warnings.warn(f"{v}: {e}; its head set is empty", stacklevel=2)
            frames.append(_no_heads(g))
        frames[-1] = frames[-1].assign(model_variant=v)
    return pd.concat(frames, ignore_index=True)


def head_sets(scores: pd.DataFrame, detect: DetectStage) -> dict[str, list[str]]:
    """Each model's retrieval heads (score > threshold, or its top_k), best first."""
    out = {}
    for variant, g in scores.groupby("model_variant", sort=False):
        g = g[g["score"].notna()]  # a model with no gated instance has no scores, no heads
        g = g.sort_values(["score", "layer", "head"], ascending=[False, True, True])
        chosen = g.head(detect.top_k) if detect.top_k else g[g["score"] > detect.threshold]
        out[variant] = list(chosen["head_name"])
    return out


def compare_heads(scores: pd.DataFrame, sets: dict[str, list[str]], reference: str) -> pd.DataFrame:
    """Per model: recall of the reference model's heads, the share of its own heads that are
    reference heads (`subset_share`; "mostly a subset"), Jaccard, Spearman of the score vectors
    (NaN where a set is empty)."""
    from scipy import stats

    from mechinterp.analysis.headsets import jaccard, precision, recall
    from mechinterp.heads import parse_heads

    def defined(fn, a, b) -> float:
        try:
            return fn(a, b)
        except ValueError:  # an empty set: the metric is undefined
            return float("nan")

    parsed = {v: list(parse_heads(hs)) for v, hs in sets.items()}
    ref = parsed[reference]
    ref_scores = scores[scores["model_variant"] == reference].set_index("head_name")["score"]
    rows = []
    for variant, heads in parsed.items():
        mine = scores[scores["model_variant"] == variant].set_index("head_name")["score"]
        mine = mine.reindex(ref_scores.index)
        varied = mine.nunique() > 1 and ref_scores.nunique() > 1
        rows.append({
            "model_variant": variant,
            "n_heads": len(heads),
            "recall": defined(recall, heads, ref),
            "subset_share": defined(precision, heads, ref),
            "jaccard": defined(jaccard, heads, ref),
            "spearman": (
                float(stats.spearmanr(mine, ref_scores).statistic) if varied else float("nan")
            ),
            "synthetic_subset_of_reference": set(heads) <= set(ref),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _no_heads(per_instance: pd.DataFrame) -> pd.DataFrame:
    """The score table of a model none of whose detection instances passed the gate."""
    from mechinterp.heads import Head

    heads = per_instance.drop_duplicates(["layer", "head"])[["layer", "head"]]
    names = [str(Head(a, b)) for a, b in zip(heads["layer"], heads["head"], strict=True)]
    return heads.assign(head_name=names, score=float("nan"), frequency=float("nan"),
                        rank=range(1, len(heads) + 1), retrieval_head=False,
                        n_instances=0).reset_index(drop=True)  # fmt: skip

