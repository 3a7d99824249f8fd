# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Exploring a study run
#
# Opens a finished `mechinterp study` run directory and shows its verdicts, tables and figures,
# recomputed from the stored tables only (no model is loaded). Point it at a run with
# `MECHINTERP_RUN=<run dir>`; by default it opens the repository's newest `runs/study-*`.

# %%
import os
from pathlib import Path

import pandas as pd

from mechinterp.experiments.study import (
    head_recovery,
    knockout_summary,
    niah_panels,
    read_config,
    read_tables,
    shard_overview,
)
from mechinterp.plots import accuracy_panels, head_heatmap, knockout_ci_curves

if os.environ.get("MECHINTERP_RUN"):
    run = Path(os.environ["MECHINTERP_RUN"])
else:
    # runs/ of the repository, from its root or from notebooks/ (Jupyter's working directory)
    found = [p for base in ("runs", "../runs") for p in Path(base).glob("study-*") if p.is_dir()]
    if not found:
        raise FileNotFoundError(
            f"no runs/study-* directory under {Path.cwd()} or its parent: run `mechinterp "
            "study` first, or set MECHINTERP_RUN to a study run directory"
        )
    found.sort(key=os.path.getmtime)
    run = found[-1]
config, tables = read_config(run), read_tables(run)
print(f"run: {run}\nmodel: {config.model.name}")

# %% [markdown]
# ## The claims
#
# One verdict per claim (sparse, necessary, sufficient), then every row behind them: the
# estimate, its bootstrap CI and what it resampled (needles × random draws), the baseline draw,
# the minimum effect and the row's verdict. Rows with `robustness` set show where necessity
# holds (other scopes, free generation); they never decide the verdict.

# %%
pd.read_csv(run / "claims_headline.csv")

# %%
pd.read_csv(run / "claims.csv")

# %% [markdown]
# ## The tables

# %%
pd.Series({name: len(df) for name, df in tables.items()}, name="rows")

# %% [markdown]
# ## Retrieval scores

# %%
tables["detect_scores"].head(10)

# %%
head_heatmap(tables["detect_scores"])

# %% [markdown]
# ## Knockout: answer retrieved vs heads knocked out
#
# Per task, mode, k and condition (top-k vs k random heads; `none` is the no-knockout
# baseline), with a bootstrap CI that resamples needles and random draws.

# %%
summary = knockout_summary(tables, config)
summary.round(3)

# %%
knockout_ci_curves(summary)

# %%
accuracy_panels(niah_panels(tables, config))

# %% [markdown]
# ## Patching: recovery per head
#
# Mean normalised recovery of each head patched alone, over the pairs the corruption flips.

# %%
recovery = head_recovery(tables["patch"])
recovery.sort_values("recovery", ascending=False).head(10)

# %%
head_heatmap(recovery, value="recovery")

# %% [markdown]
# ## Where the time went
#
# One row per shard (the study's unit of work, skipped when it exists on a rerun).

# %%
shards = shard_overview(run)
print(f"{len(shards)} shards, {shards['seconds'].sum():.1f} s in all")
shards.sort_values("seconds", ascending=False).head(10)
