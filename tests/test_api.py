"""The notebook API: `import mechinterp as mi` names, the answer metrics against hand
computations, and every result's `.frame()` and `.plot()` against its raw fields (tiny models)."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import mechinterp as mi
from mechinterp.errors import InputError

CLEAN = [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
CORRUPT = [1, 10, 11, 40, 41, 14, 15, 16, 17, 18, 19]  # positions 3-4 replaced


# ---------------------------------------------------------------- the top-level names


def test_the_top_level_names_are_callable_and_detect_is_the_callable_subpackage(tiny_gqa):
    for name in mi.__all__:
        assert callable(getattr(mi, name)), name
    for name in ("load_model", "detect", "knockout", "knockout_sweep", "patch_heads",
                 "attribution_patch", "path_patch", "cross_model_patching", "niah_grid",
                 "answer_logit_diff", "answer_logprob", "answer_prob"):  # fmt: skip
        assert name in mi.__all__
    import mechinterp.detect

    assert mi.detect is mechinterp.detect  # the subpackage, attributes and all
    assert mi.detect.retrieval_scores is mechinterp.detect.retrieval_scores
    det = mi.detect(tiny_gqa, None, "previous_token", seq_len=8, n_sequences=2)
    ref = mechinterp.detect.detect(tiny_gqa, None, "previous_token", seq_len=8, n_sequences=2)
    torch.testing.assert_close(det.scores, ref.scores, rtol=0, atol=0)


# ---------------------------------------------------------------- metrics on planted logits


def _log_softmax(row: list[float], i: int) -> float:
    return row[i] - math.log(sum(math.exp(x) for x in row))


def test_answer_metrics_match_a_hand_computation():
    logits = torch.tensor([
        [[0.0, 1.0, 2.0, 3.0], [2.0, -1.0, 0.5, 0.0], [1.0, 1.0, 4.0, -2.0], [9.0, 9, 9, 9]],
        [[1.0, 0.0, 0.0, 0.0], [0.0, 3.0, 1.0, -1.0], [-1.0, 2.0, 0.0, 0.5], [0.0, 0, 0, 0]],
    ])  # fmt: skip
    tokens = torch.tensor([[0, 3, 1, 2], [3, 0, 1, 2]])  # both end with the answer [1, 2]
    rows = logits.tolist()
    # answer token 1 is read at position 1 (before it), token 2 at position 2
    hand = [_log_softmax(r[1], 1) + _log_softmax(r[2], 2) for r in rows]
    got = mi.answer_logprob([1, 2])(logits, tokens)
    assert got.tolist() == pytest.approx(hand, abs=1e-6)
    first = -1.0 - math.log(math.exp(2) + math.exp(-1) + math.exp(0.5) + 1)  # row 0, token 1
    second = 4.0 - math.log(2 * math.e + math.e**4 + math.exp(-2))  # row 0, token 2
    assert hand[0] == pytest.approx(first + second)
    probs = mi.answer_prob([1, 2])(logits, tokens)
    assert probs.tolist() == pytest.approx([math.exp(h) for h in hand], rel=1e-6)
    # logit difference of the last answer token (2) against token 0, at the position before it
    diff = mi.answer_logit_diff(2, 0)(logits, tokens)
    assert diff.tolist() == pytest.approx([4.0 - 1.0, 0.0 - (-1.0)])
    # the one-position form: the logits before a one-token answer, as patching calls it
    last = logits[:, 2]
    assert mi.answer_logprob(2)(last).tolist() == pytest.approx(
        [_log_softmax(r[2], 2) for r in rows], abs=1e-6)  # fmt: skip
    assert mi.answer_logit_diff(2, 0)(last).tolist() == pytest.approx([3.0, 1.0])


def test_answer_metrics_refuse_what_they_cannot_read():
    logits = torch.zeros(1, 3, 5)
    with pytest.raises(InputError, match="must end with the answer"):
        mi.answer_logprob([1, 2])(logits, torch.tensor([[0, 2, 1]]))
    with pytest.raises(InputError, match="predict one"):
        mi.answer_logprob([1, 2])(logits[:, -1])
    with pytest.raises(InputError, match="come without tokens"):
        mi.answer_logprob(1)(logits)
    with pytest.raises(InputError, match="prompt must come before"):
        mi.answer_logprob([1, 2, 3])(logits, torch.tensor([[1, 2, 3]]))
    with pytest.raises(InputError, match="non-negative ints"):
        mi.answer_logprob([3, -1])


def test_an_answer_metric_patches_as_the_old_metric_does(tiny_gqa):
    old = mi.patch_heads(tiny_gqa, CLEAN, CORRUPT, mi.logit_diff_metric(5, 7))
    new = mi.patch_heads(tiny_gqa, CLEAN, CORRUPT, mi.answer_logit_diff(5, 7))
    torch.testing.assert_close(new.values, old.values, rtol=0, atol=0)
    # and the teacher-forced form on the model's own forward agrees with the patching baseline
    with torch.no_grad():
        logits = tiny_gqa(torch.tensor([CLEAN + [5]]))
    got = mi.answer_logit_diff(5, 7)(logits, torch.tensor([CLEAN + [5]]))
    assert float(got[0]) == pytest.approx(old.clean, abs=1e-4)


# ---------------------------------------------------------------- .frame() and .plot()


def _grid(fig: go.Figure, i: int = 0) -> list[float]:
    """The heatmap's cells, layer by layer."""
    return [float(v) for row in fig.data[i].z for v in row]


def test_detection_frame_and_plot(tiny_gqa):
    det = mi.detect(tiny_gqa, None, "induction", seq_len=10, n_sequences=3)
    df = det.frame()
    assert list(df.columns[:6]) == ["layer", "head", "head_name", "score", "frequency",
                                    "n_instances"]  # fmt: skip
    for r in df.itertuples():
        assert r.score == pytest.approx(float(det.scores[r.layer, r.head]))
    assert df.loc[df["rank"] == 1, "score"].iloc[0] == df["score"].max()
    fig = det.plot()
    assert isinstance(fig, go.Figure) and len(fig.data) == 1
    assert _grid(fig) == pytest.approx(det.scores.flatten().tolist())


def test_patch_result_frame_and_plot(tiny_gqa):
    res = mi.patch_heads(tiny_gqa, CLEAN, CORRUPT, mi.answer_logit_diff(5, 7))
    df = res.frame()
    assert list(df.columns) == ["layer", "head", "head_name", "value", "recovery",
                                "clean_metric", "corrupt_metric", "direction"]  # fmt: skip
    assert len(df) == 2 * 4
    for r in df.itertuples():
        assert r.value == pytest.approx(float(res.values[r.layer, r.head]))
        assert r.recovery == pytest.approx(float(res.recovery[r.layer, r.head]))
    assert (df["clean_metric"] == res.clean).all() and (df["direction"] == "denoise").all()
    fig = res.plot()
    assert len(fig.data) == 1 and _grid(fig) == pytest.approx(res.recovery.flatten().tolist())


def test_a_screened_result_has_typed_false_negatives_and_frames_only_patched_heads(tiny_gqa):
    res = mi.patch_heads(tiny_gqa, CLEAN, CORRUPT, mi.answer_logit_diff(5, 7), screen="atp",
                         verify_top=3, sample=2)  # fmt: skip
    fn = res.false_negatives
    assert res.verify_top == 3 and fn.n_sampled == 2 and fn.n_unverified == 8 - 3
    assert fn.sampled == tuple(res.settings["false_negatives"]["sampled"])
    df = res.frame()
    assert len(df) == 3 + 2 == int((~res.values.isnan()).sum())
    assert set(df.loc[df["sampled"], "head_name"]) == set(fn.sampled)
    assert mi.patch_heads(tiny_gqa, CLEAN, CORRUPT, mi.logit_diff_metric(5, 7)).false_negatives \
        is None  # fmt: skip


def test_attribution_frame_and_plot(tiny_gqa):
    est = mi.attribution_patch(tiny_gqa, CLEAN, CORRUPT, mi.answer_logit_diff(5, 7),
                               grad_drop=True)  # fmt: skip
    assert est.method == "atp*"
    df = est.frame()
    assert {"node", "atp", "atp_star", "atp_star_score", "atp_star_rank", "atp_recovery",
            "atp_star_recovery"} <= set(df.columns)  # fmt: skip
    for r in df.itertuples():
        assert r.atp == pytest.approx(float(est.atp[r.layer, r.head]))
        assert r.atp_star == pytest.approx(float(est.values[r.layer, r.head]))
        assert r.atp_star_score == pytest.approx(float(est.score[r.layer, r.head]))
    assert df.set_index("atp_star_rank").loc[0, "head_name"] == str(est.ranking()[0])
    fig = est.plot()
    assert len(fig.data) == 1 and _grid(fig) == pytest.approx(est.recovery.flatten().tolist())


def test_path_patching_frame_and_plot(tiny_gqa):
    senders = ["L0H0", "L0H1", "L0H2", "L0H3"]
    res = mi.path_patch(tiny_gqa, CLEAN, CORRUPT, mi.answer_logit_diff(5, 7),
                        receivers=["L1H2"], receiver_input="k",
                        sets={"layer0": senders})  # fmt: skip
    assert res.receiver_input == "k"
    df = res.frame()
    assert list(df["kind"]) == ["sender"] * 4 + ["set"]
    assert (df["receiver_input"] == "k").all() and (df["receiver_units"] == "kv_groups").all()
    sent = df[df["kind"] == "sender"]
    for r in sent.itertuples():
        assert r.value == pytest.approx(float(res.values[r.layer, r.head]))
    row = df[df["kind"] == "set"].iloc[0]
    assert row["head_name"] == "layer0" and row["value"] == pytest.approx(res.sets["layer0"])
    assert row["recovery"] == pytest.approx(
        (res.sets["layer0"] - res.corrupt) / (res.clean - res.corrupt))  # fmt: skip
    fig = res.plot()
    assert len(fig.data) == 1  # one panel: the one receiver input
    assert _grid(fig)[:4] == pytest.approx(sent["recovery"].tolist())
    assert all(math.isnan(v) for v in _grid(fig)[4:])  # layer 1 sends nothing


def test_knockout_sweep_frame_and_plot(tiny_gqa):
    examples = mi.niah_grid(tiny_gqa.tokenizer, lengths=[300], depths=[0.5], needles=2)
    sweep = mi.knockout_sweep(tiny_gqa, examples, "L1H0,L0H3,L1H2", ks=[1, 2], seeds=[0, 1],
                              max_new_tokens=2, progress=False)  # fmt: skip
    assert isinstance(sweep, pd.DataFrame)  # code reading the rows keeps working
    df = sweep.frame()
    assert type(df) is pd.DataFrame and df.equals(pd.DataFrame(sweep))
    assert type(sweep[sweep["k"] == 1]) is pd.DataFrame  # derived tables are plain
    summary = sweep.summary()
    assert summary.equals(mi.summarise_sweep(df))
    fig = sweep.plot()
    assert [t.name for t in fig.data] == ["zero: top-k ranked", "zero: random complement"]
    top = summary[summary["condition"] == "top"].sort_values("k")
    assert list(fig.data[0].y) == pytest.approx(list(top["correct"]))


def test_cross_model_patching_frame_and_plot(tiny_gqa, tmp_path):
    from mechinterp.models.tiny import tiny_model

    donor = tiny_model(n_kv_heads=2, seed=1, directory=tmp_path)
    examples = mi.niah_grid(tiny_gqa.tokenizer, lengths=[300], depths=[0.5], needles=2)
    cross = mi.cross_model_patching(donor, tiny_gqa, examples, {"one": ["L1H1"], "all": "L0H0,"
                                    "L0H1,L0H2,L0H3,L1H0,L1H1,L1H2,L1H3"}, max_new_tokens=2,
                                    progress=False)  # fmt: skip
    df = cross.frame()
    assert type(df) is pd.DataFrame and df.equals(pd.DataFrame(cross))
    assert cross.summary().equals(mi.summarise_cross(df))
    summary = cross.summary().set_index("condition")
    assert summary.loc["recipient", "answer_logprob_recovery"] == 0.0
    assert summary.loc["donor", "answer_logprob_recovery"] == 1.0
    fig = cross.plot(metrics=("answer_logprob",))
    assert [t.name for t in fig.data] == ["answer_logprob"]
    assert list(fig.data[0].y) == pytest.approx(
        list(summary.loc[["one", "all"], "answer_logprob_recovery"]))  # fmt: skip
