"""What the notebook API's results share: every result has `.frame()` (a tidy DataFrame with the
column names of the command's run tables) and `.plot()` (the command's plotly figure).

Results that are already one row per run (the knockout sweep, cross-model patching) are
`ResultFrame`s: DataFrames, so existing code keeps working, with `.frame()` and `.plot()` on
top. A `ResultFrame`'s `.plot()` replaces pandas' `DataFrame.plot` accessor; `.frame().plot`
is pandas' again.
"""

from __future__ import annotations

import pandas as pd
from torch import Tensor

from mechinterp.heads import Head


class ResultFrame(pd.DataFrame):
    """A DataFrame that is an intervention's result. Anything derived from it (a selection,
    `assign`, `groupby`, `concat`) is a plain DataFrame."""

    @property
    def _constructor(self):
        return pd.DataFrame

    def frame(self) -> pd.DataFrame:
        """The rows as a plain DataFrame (a copy)."""
        return pd.DataFrame(self, copy=True)


def head_rows(values: Tensor, column: str = "value") -> pd.DataFrame:
    """One row per (layer, head) of a [layer, head] tensor, or per (layer, head, position) of a
    [layer, head, pos] one: layer, head, head_name (L{layer}H{head}), (position,) `column`."""
    n_layers, n_heads = values.shape[:2]
    frame = pd.DataFrame(
        [(la, h, str(Head(la, h))) for la in range(n_layers) for h in range(n_heads)],
        columns=["layer", "head", "head_name"],
    )
    if values.dim() == 3:
        n_pos = values.shape[2]
        frame = frame.loc[frame.index.repeat(n_pos)].reset_index(drop=True)
        frame["position"] = list(range(n_pos)) * (n_layers * n_heads)
    frame[column] = values.detach().flatten().double().cpu().numpy()
    return frame
