"""What every detector returns: a `layer × head` score matrix, the per-instance values behind it,
and one row per instance saying whether it counted.

Scores are per **query head** (under GQA several query heads share a KV head; each is scored on its
own attention pattern).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechinterp.analysis.headsets import HeadScores
from mechinterp.errors import InputError
from mechinterp.heads import Head


@dataclass(frozen=True)
class Detection:
    """A detector's output.

    - `per_instance[i, layer, head]`: the raw value on instance i (every instance, counted or not).
    - `counted[i]`: whether instance i enters the mean (e.g. passed the retrieval success gate).
    - `scores`: mean of `per_instance` over the counted instances.
    - `frequency`: share of counted instances where the value is > 0 (the retrieval score's
      activation frequency); None where it means nothing (signed or mass scores).
    - `instances`: one row per instance (`instance_id`, `counted`, and detector-specific columns).
    - `settings`: the detector's arguments, written into every table's provenance.
    """

    detector: str
    per_instance: Float[Tensor, "instance layer head"]
    counted: Bool[Tensor, "instance"]  # noqa: F821
    instances: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)
    has_frequency: bool = False

    def __post_init__(self) -> None:
        n = self.per_instance.shape[0]
        if self.counted.shape != (n,) or len(self.instances) != n:
            raise InputError("per_instance, counted and instances must have one entry per instance")
        if not bool(self.counted.any()):
            raise InputError(f"{self.detector}: no instance counted; nothing to average")

    @property
    def n_counted(self) -> int:
        return int(self.counted.sum())

    @property
    def scores(self) -> HeadScores:
        return self.per_instance[self.counted].mean(0)

    @property
    def frequency(self) -> HeadScores | None:
        if not self.has_frequency:
            return None
        return (self.per_instance[self.counted] > 0).float().mean(0)

    def subset(self, instance_ids: list[str] | tuple[str, ...]) -> Detection:
        """The same detection restricted to some instances (e.g. a split for stability checks)."""
        ids = list(self.instances["instance_id"])
        missing = sorted(set(instance_ids) - set(ids))
        if missing:
            raise InputError(f"unknown instance ids {missing[:5]}")
        rows = torch.tensor([ids.index(i) for i in instance_ids], dtype=torch.long)
        return Detection(
            self.detector,
            self.per_instance[rows],
            self.counted[rows],
            self.instances.iloc[rows.tolist()].reset_index(drop=True),
            dict(self.settings),
            self.has_frequency,
        )

    def scores_frame(self) -> pd.DataFrame:
        """Tidy: one row per head — layer, head, head_name, score, frequency, n_instances, rank."""
        scores = self.scores
        freq = self.frequency
        n_layers, n_heads = scores.shape
        df = pd.DataFrame(
            {
                "layer": [layer for layer in range(n_layers) for _ in range(n_heads)],
                "head": [h for _ in range(n_layers) for h in range(n_heads)],
                "score": scores.flatten().double().tolist(),
                "frequency": (freq.flatten().double().tolist() if freq is not None else None),
            }
        )
        df.insert(
            2, "head_name", [str(Head(a, b)) for a, b in zip(df["layer"], df["head"], strict=True)]
        )
        df["n_instances"] = self.n_counted
        df["detector"] = self.detector
        from mechinterp.analysis.headsets import rank_order

        df.loc[df.index[rank_order(df["score"])], "rank"] = range(1, len(df) + 1)
        df["rank"] = df["rank"].astype(int)
        return df

    def frame(self) -> pd.DataFrame:
        """The per-head scores, as `mechinterp detect`'s scores table has them
        (`scores_frame`)."""
        return self.scores_frame()

    def plot(self, top_k: int = 10, title: str | None = None):
        """The layer × head heatmap of the scores `mechinterp detect` draws (`head_heatmap`,
        the `top_k` heads labelled)."""
        from mechinterp.plots import head_heatmap

        title = title or f"{self.detector} score per head (n={self.n_counted} instances)"
        return head_heatmap(self.frame(), top_k=top_k, title=title)

    def per_instance_frame(self) -> pd.DataFrame:
        """Tidy: one row per (instance, layer, head) — instance_id, counted, layer, head, value."""
        n, n_layers, n_heads = self.per_instance.shape
        ids = list(self.instances["instance_id"])
        counted = self.counted.tolist()
        return pd.DataFrame(
            {
                "instance_id": [ids[i] for i in range(n) for _ in range(n_layers * n_heads)],
                "counted": [counted[i] for i in range(n) for _ in range(n_layers * n_heads)],
                "layer": [la for _ in range(n) for la in range(n_layers) for _ in range(n_heads)],
                "head": [h for _ in range(n * n_layers) for h in range(n_heads)],
                "value": self.per_instance.flatten().double().tolist(),
            }
        )

    def wu_lists(self) -> dict[Head, list[float]]:
        """Per-head lists of the counted instances' values (the Wu et al. JSON layout)."""
        values = self.per_instance[self.counted]
        _, n_layers, n_heads = values.shape
        return {
            Head(la, h): values[:, la, h].double().tolist()
            for la in range(n_layers)
            for h in range(n_heads)
        }
