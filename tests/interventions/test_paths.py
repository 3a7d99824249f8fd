"""Oracle tests of exact path patching on tiny MHA/GQA/MQA models: a hand-written two-pass hook
reference, the direct effect on the logits, and TransformerLens' direct path patching."""


import pytest
import torch
from hand_references import grab, hand_path_patch

from mechinterp.heads import Head, HeadShape
from mechinterp.interventions.patching import logit_diff_metric, patch_heads
from mechinterp.interventions.paths import path_patch, path_patch_inputs

CLEAN = [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
CORRUPT = [1, 10, 11, 40, 41, 14, 15, 16, 17, 18, 19, 20, 21, 22]  # positions 3-4 replaced


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """4 layers, GQA, so that paths can run through layers in between."""
    from mechinterp.models.tiny import tiny_model

    return tiny_model(n_layers=4, n_kv_heads=2, seed=5,
                      directory=tmp_path_factory.mktemp("deep"))  # fmt: skip


def metric_for(model):
    with torch.no_grad():
        lc = model(torch.tensor([CLEAN]))[0, -1]
        lx = model(torch.tensor([CORRUPT]))[0, -1]
    return logit_diff_metric(int((lc - lx).argmax()), int((lx - lc).argmax()))


@pytest.mark.parametrize("receiver_input", ["q", "k", "v"])
@pytest.mark.parametrize("patch_from", [0, 9])
def test_path_patching_equals_a_hand_written_two_pass_reference(deep, receiver_input, patch_from):
    metric = metric_for(deep)
    receivers = [Head(2, 1), Head(3, 0), Head(3, 3)]
    for via_mlps in (True, False):
        res = path_patch(deep, CLEAN, CORRUPT, metric, receivers=receivers,
                         receiver_input=receiver_input, patch_from=patch_from,
                         via_mlps=via_mlps, batch_size=3)  # fmt: skip
        senders = [h for h in HeadShape.of(deep).all_heads() if h.layer < 3]
        assert int((~res.values.isnan()).sum()) == len(senders)
        for s in senders:
            want = hand_path_patch(deep, CLEAN, CORRUPT, s, receivers, receiver_input, metric,
                                   max(3, patch_from), via_mlps)  # fmt: skip
            assert float(res.values[s]) == pytest.approx(want, abs=2e-5), (s, via_mlps)
    assert (res.values - res.corrupt).nan_to_num().abs().max() > 1e-3


def test_a_single_sender_into_the_unembedding_is_its_direct_effect(tiny):
    metric = metric_for(tiny)
    shape = HeadShape.of(tiny)
    n = shape.n_layers
    z_name = "blocks.0.attn.hook_z"
    clean, corrupt = grab(tiny, CLEAN, [z_name]), grab(tiny, CORRUPT, [z_name])
    post = f"blocks.{n - 1}.hook_resid_post"
    final = grab(tiny, CORRUPT, [post])[post]
    res = path_patch(tiny, CLEAN, CORRUPT, metric, receivers=[n], receiver_input="resid",
                     via_mlps=False)  # fmt: skip
    w_o = tiny.blocks[0].attn.W_O
    for h in range(shape.n_heads):
        dz = (clean[z_name] - corrupt[z_name]).view(1, len(CLEAN), shape.n_heads, -1)[0, :, h]
        resid = final[0, -1] + dz[-1] @ w_o[h]
        with torch.no_grad():
            logits = tiny.unembed(tiny.ln_final(resid[None, None]))[:, -1]
        assert float(res.values[0, h]) == pytest.approx(float(metric(logits)[0]), abs=1e-5)
    # with the MLPs recomputing, the same path also carries the head's effect through them
    via = path_patch(tiny, CLEAN, CORRUPT, metric, receivers=[n], receiver_input="resid")
    assert (via.values[0] - res.values[0]).abs().max() > 1e-5
    # into the whole stream entering layer 1, a layer-0 head's path is all its effect
    at1 = path_patch(tiny, CLEAN, CORRUPT, metric, receivers=[1], receiver_input="resid")
    exact = patch_heads(tiny, CLEAN, CORRUPT, metric, heads="L0H0,L0H1")
    torch.testing.assert_close(at1.values[0, :2], exact.values[0, :2], atol=1e-5, rtol=0)


def test_direct_edges_equal_transformer_lens(tmp_path_factory):
    """`via_mlps=False` is the exact edge sender → receiver input: TransformerLens'
    `get_act_patch_direct_path` (MHA: it refuses k / v under GQA)."""
    from transformer_lens import patching as tl_patching

    from mechinterp.models.tiny import tiny_model

    model = tiny_model(n_layers=3, n_kv_heads=4, seed=2, directory=tmp_path_factory.mktemp("mha3"))
    metric = metric_for(model)
    _, clean_cache = model.run_with_cache(torch.tensor([CLEAN]))
    _, corrupt_cache = model.run_with_cache(torch.tensor([CORRUPT]))
    for component in ("q", "k", "v"):
        theirs = tl_patching.get_act_patch_direct_path(
            model, torch.tensor([CORRUPT]), clean_cache, corrupt_cache,
            lambda lg: metric(lg[:, -1]).squeeze(), src_layer=0, src_head=1,
            component=component, verbose=False,
        )  # fmt: skip
        for dst in (Head(1, 2), Head(2, 0)):
            ours = path_patch(model, CLEAN, CORRUPT, metric, senders=[Head(0, 1)], receivers=[dst],
                              receiver_input=component, via_mlps=False)  # fmt: skip
            assert float(ours.values[0, 1]) == pytest.approx(float(theirs[dst]), abs=2e-5)


def test_bad_path_requests_are_clear_errors(tiny):
    metric = metric_for(tiny)
    with pytest.raises(ValueError, match="not below any receiver"):
        path_patch(tiny, CLEAN, CORRUPT, metric, receivers="L0H1", senders="L1H0")
    with pytest.raises(ValueError, match="receiver_input must be"):
        path_patch(tiny, CLEAN, CORRUPT, metric, receivers="L1H1", receiver_input="o")
    with pytest.raises(ValueError, match="one layer index"):
        path_patch(tiny, CLEAN, CORRUPT, metric, receivers=[1, 2], receiver_input="resid")
    with pytest.raises(ValueError, match="no receivers"):
        path_patch(tiny, CLEAN, CORRUPT, metric, receivers=[])


def test_a_joint_sender_set_into_a_layers_input_is_joint_patching_of_the_set(deep):
    """Every head below layer 2, together, into the whole stream entering layer 2: nothing
    below it is frozen, so the path is the set's whole effect (`patch_heads` with `sets`)."""
    metric = metric_for(deep)
    below = [h for h in HeadShape.of(deep).all_heads() if h.layer < 2]
    res = path_patch(deep, CLEAN, CORRUPT, metric, receivers=[2], receiver_input="resid",
                     senders=[], sets={"below": below, "one": below[:1]}, patch_from=5)  # fmt: skip
    exact = patch_heads(deep, CLEAN, CORRUPT, metric, heads=[], patch_from=5,
                        sets={"below": below})  # fmt: skip
    assert res.sets["below"] == pytest.approx(exact.sets["below"], abs=1e-5)
    alone = path_patch(deep, CLEAN, CORRUPT, metric, receivers=[2], receiver_input="resid",
                       senders=below[:1], patch_from=5)  # fmt: skip
    assert res.sets["one"] == pytest.approx(float(alone.values[below[0]]), abs=1e-6)
    assert abs(res.sets["below"] - res.corrupt) > 1e-3


@pytest.mark.parametrize("patch_from", [0, 9])
def test_several_inputs_from_one_first_pass_equal_one_call_each(deep, patch_from):
    """q, k and v recorded in one pass 1 (receivers in two layers, one at the senders' own
    layer for layer-2 senders) = three separate path_patch calls, singles and sets."""
    metric = metric_for(deep)
    receivers = [Head(2, 1), Head(3, 0), Head(3, 3)]
    below = [h for h in HeadShape.of(deep).all_heads() if h.layer < 3]
    sets = {"low": [Head(0, 1), Head(1, 2)], "all": below}
    together = path_patch_inputs(deep, CLEAN, CORRUPT, metric, receivers=receivers,
                                 receiver_inputs=("q", "k", "v"), sets=sets,
                                 patch_from=patch_from, batch_size=5)  # fmt: skip
    assert list(together) == ["q", "k", "v"]
    for inp, res in together.items():
        alone = path_patch(deep, CLEAN, CORRUPT, metric, receivers=receivers, receiver_input=inp,
                           sets=sets, patch_from=patch_from, batch_size=5)  # fmt: skip
        torch.testing.assert_close(res.values, alone.values, equal_nan=True, atol=1e-6, rtol=0)
        assert res.sets == pytest.approx(alone.sets, abs=1e-6)
        assert res.settings["receiver_units"] == alone.settings["receiver_units"]
    assert (together["q"].values - together["k"].values).nan_to_num().abs().max() > 1e-4
    with pytest.raises(ValueError, match="patched alone"):
        path_patch_inputs(deep, CLEAN, CORRUPT, metric, receivers=[3],
                          receiver_inputs=("q", "resid"))  # fmt: skip


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory):
    """OLMo-2: one q norm over all heads' queries, one k norm over all KV heads' keys."""
    from mechinterp.models.tiny import tiny_family

    return tiny_family("olmo2", directory=tmp_path_factory.mktemp("olmo2"))


def test_queries_and_keys_are_written_after_a_norm_that_spans_heads(olmo2, deep):
    """OLMo-2's receivers are read and written after its q / k norms; Llama's (no norm) at
    hook_q / hook_k, as before."""
    metric = metric_for(olmo2)
    got = path_patch_inputs(olmo2, CLEAN, CORRUPT, metric, receivers="L2H1", senders="L0H3",
                            receiver_inputs=("q", "k", "v"))  # fmt: skip
    points = {inp: res.settings["hook_points"] for inp, res in got.items()}
    assert points == {"q": {"L2": "blocks.2.attn.q_norm.hook_out"},
                      "k": {"L2": "blocks.2.attn.k_norm.hook_out"},
                      "v": {"L2": "blocks.2.attn.hook_v"}}  # fmt: skip
    llama = path_patch(deep, CLEAN, CORRUPT, metric_for(deep), receivers="L2H1", senders="L0H3",
                       receiver_input="k")  # fmt: skip
    assert llama.settings["hook_points"] == {"L2": "blocks.2.attn.hook_k"}


def test_a_head_spanning_norm_that_cannot_be_read_or_written_after_is_refused(olmo2, monkeypatch):
    metric = metric_for(olmo2)
    norm = olmo2.blocks[2].attn.original_component.q_norm.original_component
    with monkeypatch.context() as m:
        m.setitem(norm._parameters, "weight", torch.nn.Parameter(torch.ones(5)))
        with pytest.raises(ValueError, match="cannot tell whether layer 2's q_norm normalises"):
            path_patch(olmo2, CLEAN, CORRUPT, metric, receivers="L2H1", receiver_input="q")
    hooks = type(olmo2).hook_dict.fget
    without = property(lambda self: {k: v for k, v in hooks(self).items() if "k_norm" not in k})
    monkeypatch.setattr(type(olmo2), "hook_dict", without)
    with pytest.raises(ValueError, match="no hook after it.*receiver_input='v' or 'resid'"):
        path_patch(olmo2, CLEAN, CORRUPT, metric, receivers="L2H1", receiver_input="k")
    path_patch(olmo2, CLEAN, CORRUPT, metric, receivers="L2H1", receiver_input="v")  # unaffected


def test_same_heads_rows_patch_the_queries_and_the_keys_of_the_same_query_heads(deep):
    """Under GQA (2 query heads per KV head) the receivers L2H1, L3H0, L3H1, L3H2 hold one
    whole KV group (layer 3's first) and touch three. Each same-heads row is every upstream
    head jointly into the queries, or the keys, of exactly the compared heads: equal to the
    hand-written two-pass reference on those heads; the whole groups' keys are the receivers'
    own keys (a key input is its group's)."""
    from mechinterp.experiments.attribution import path_table

    metric = metric_for(deep)
    receivers = ["L2H1", "L3H0", "L3H1", "L3H2"]
    df = path_table(deep, CLEAN, CORRUPT, metric, receivers, ["q", "k"], via_mlps=True,
                    batch_size=8, facts={"example_id": "e0"}, patch_from=9,
                    same_heads=True)  # fmt: skip
    same = df[df["kind"] == "same_heads"].set_index(["comparison", "receiver_input"])
    assert sorted(same.index) == [(c, i) for c in ("receiver_groups", "whole_groups")
                                  for i in ("k", "q")]  # fmt: skip
    compared = {"receiver_groups": "L3H0,L3H1", "whole_groups": "L2H0,L2H1,L3H0,L3H1,L3H2,L3H3"}
    upstream = [h for h in HeadShape.of(deep).all_heads() if h.layer < 3]
    for (comparison, inp), row in same.iterrows():
        assert row["compared_heads"] == compared[comparison]
        assert (row["n_compared_heads"], row["n_kv_groups"]) == (
            (2, 1) if comparison == "receiver_groups" else (6, 3)
        )
        heads = [Head.parse(h) for h in compared[comparison].split(",")]
        want = hand_path_patch(deep, CLEAN, CORRUPT, upstream, heads, inp, metric, 9)
        assert row["value"] == pytest.approx(want, abs=2e-5), (comparison, inp)
    own = df[(df["kind"] == "set")].set_index("receiver_input")["value"]
    assert same.loc[("whole_groups", "k"), "value"] == pytest.approx(own["k"], abs=1e-6)
    assert abs(same.loc[("whole_groups", "q"), "value"] - own["q"]) > 1e-4  # 6 heads, not 4
    assert (df["kind"] == "set").sum() == 2 and df["recovery"].notna().all()


def test_without_a_whole_kv_group_inside_only_whole_groups_are_compared(deep, tiny):
    from mechinterp.experiments.attribution import path_table

    shape = HeadShape.of(tiny)
    df = path_table(tiny, CLEAN, CORRUPT, metric_for(tiny), ["L1H0", "L1H2"], ["q", "k"],
                    via_mlps=True, batch_size=8, facts={}, same_heads=True)  # fmt: skip
    same = df[df["kind"] == "same_heads"]
    if shape.group_size == 1:  # MHA: the receivers are their own KV groups
        assert set(same["comparison"]) == {"receiver_groups", "whole_groups"}
        assert set(same["compared_heads"]) == {"L1H0,L1H2"}
    else:
        assert set(same["comparison"]) == {"whole_groups"}
        assert same["compared_heads"].iloc[0] == ",".join(
            str(h) for h in shape.kv_group_heads([Head(1, 0), Head(1, 2)])
        )
    assert len(same) == 2 * same["comparison"].nunique()
