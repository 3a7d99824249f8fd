"""Oracle tests of cross-model patching on tiny MHA/GQA/MQA models.

The recipient is the donor with every attention projection perturbed, weights and biases (as a
LoRA fine-tune of q/k/v/o would be; MLPs shared), so patching every head's output from the donor
must give the donor's attention outputs and logits, while patching z alone must not."""

from functools import partial

import pytest
import torch
from cross_reference import per_condition_table

from mechinterp.evaluate import generate, left_pad
from mechinterp.heads import Head, HeadShape
from mechinterp.interventions import (
    cross_model_patching,
    cross_patch,
    patch_head_sets,
    summarise_cross,
)
from mechinterp.interventions.patching import run_from_layer
from mechinterp.models.kv_cache import cache_kwargs, new_cache
from mechinterp.models.tiny import tiny_model
from mechinterp.tasks.niah import niah_grid

PROMPTS = [[1, 10, 11, 12, 13, 14, 15, 16, 17], [1, 20, 21, 22, 23, 24]]
KV = {"mha": 4, "gqa": 2, "mqa": 1}


@pytest.fixture(scope="module", params=list(KV), ids=list(KV))
def pair(request, tmp_path_factory):
    """(donor, recipient): one tiny model with attention biases, and a copy with its q/k/v/o
    weights and biases perturbed."""
    n_kv = KV[request.param]
    donor = tiny_model(
        n_kv_heads=n_kv, attention_bias=True, directory=tmp_path_factory.mktemp("donor")
    )
    recipient = tiny_model(
        n_kv_heads=n_kv, attention_bias=True, directory=tmp_path_factory.mktemp("recipient")
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in recipient.original_model.named_parameters():
            if any(f"{x}_proj" in name for x in "qkvo"):
                p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    return donor, recipient


def logits(model, heads=None, donor=None, patched="output"):
    ids, mask = left_pad(model, PROMPTS)
    with torch.no_grad():
        if heads is None:
            return model(ids, attention_mask=mask)
        with cross_patch(model, donor, heads, patched=patched) as stats:
            out = model(ids, attention_mask=mask)
        assert stats["forwards"] == 1
        return out


def captured(model, names, heads=None, donor=None) -> dict:
    """The activations at hook `names` on the padded batch, with `heads` patched from `donor`."""
    ids, mask = left_pad(model, PROMPTS)
    got = {}

    def keep(x, hook, *, name):
        got[name] = x.detach().clone()

    hooks = [(n, partial(keep, name=n)) for n in names]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        if heads is None:
            model(ids, attention_mask=mask)
        else:
            with cross_patch(model, donor, heads):
                model(ids, attention_mask=mask)
    return got


def attention_outputs(model, heads=None, donor=None):
    """Per layer, the attention output (what the block adds to the residual stream)."""
    names = [f"blocks.{la}.attn.hook_out" for la in range(model.cfg.n_layers)]
    got = captured(model, names, heads, donor)
    return [got[n] for n in names]


def test_patching_every_head_output_gives_the_donors_attention_output(pair):
    donor, recipient = pair
    real = left_pad(recipient, PROMPTS)[1].bool()
    every = HeadShape.of(recipient).all_heads()
    theirs, ours = attention_outputs(donor), attention_outputs(recipient)
    patched = attention_outputs(recipient, every, donor)
    for la, (t, o, p) in enumerate(zip(theirs, ours, patched, strict=True)):
        assert (t - o)[real].abs().max() > 0.05, la  # the models' attention really differs
        torch.testing.assert_close(p[real], t[real], atol=1e-5, rtol=0)
    # Only layer 1 patched: layer 0 is the recipient's, bit for bit.
    layer1 = [h for h in every if h.layer == 1]
    assert torch.equal(attention_outputs(recipient, layer1, donor)[0], ours[0])


def test_one_head_output_equals_a_hand_computed_swap_of_its_contribution(pair):
    donor, recipient = pair
    head = Head(1, 2)
    shape = HeadShape.of(recipient)
    names = ["blocks.1.attn.hook_z", "blocks.1.attn.hook_out"]
    theirs = captured(donor, names)
    ours = captured(recipient, names, [head], donor)
    z = {"donor": theirs[names[0]], "recipient": ours[names[0]]}
    out = {"recipient": ours[names[1]]}
    o_rec = recipient.original_model.model.layers[1].self_attn.o_proj
    o_don = donor.original_model.model.layers[1].self_attn.o_proj
    d = recipient.cfg.d_head
    cols = slice(head.head * d, (head.head + 1) * d)
    z_rec, z_don = z["recipient"][:, :, head.head], z["donor"][:, :, head.head]
    full = torch.einsum("bpd,md->bpm", z["recipient"].flatten(2), o_rec.weight) + o_rec.bias
    expected = (
        full
        - torch.einsum("bpd,md->bpm", z_rec, o_rec.weight[:, cols]) - o_rec.bias / shape.n_heads
        + torch.einsum("bpd,md->bpm", z_don, o_don.weight[:, cols]) + o_don.bias / shape.n_heads
    )
    torch.testing.assert_close(out["recipient"], expected, atol=1e-5, rtol=0)


def test_patching_every_head_from_the_donor_gives_the_donors_logits(pair):
    donor, recipient = pair
    real = left_pad(recipient, PROMPTS)[1].bool()
    theirs, ours = logits(donor), logits(recipient)
    assert (theirs - ours)[real].abs().max() > 0.1  # the two models really differ
    every = HeadShape.of(recipient).all_heads()
    patched = logits(recipient, every, donor)
    torch.testing.assert_close(patched[real], theirs[real], atol=1e-5, rtol=0)
    # z alone goes through the recipient's own W_O: not the donor's head outputs.
    z_only = logits(recipient, every, donor, patched="z")
    assert (z_only - theirs)[real].abs().max() > 0.05


def test_z_patching_writes_donor_z_into_its_heads_only(pair):
    donor, recipient = pair
    head = Head(1, 1)  # siblings share its KV head under GQA/MQA
    name = "blocks.1.attn.hook_z"
    ids, mask = left_pad(recipient, PROMPTS)
    got = {}

    def grab(z, hook, *, key):
        got[key] = z.detach().clone()

    with torch.no_grad():
        for key, model in (("donor", donor), ("recipient", recipient)):
            with model.hooks(fwd_hooks=[(name, lambda z, hook, k=key: grab(z, hook, key=k))]):
                model(ids, attention_mask=mask)
        with cross_patch(recipient, donor, [head], patched="z"):
            with recipient.hooks(fwd_hooks=[(name, lambda z, hook: grab(z, hook, key="p"))]):
                recipient(ids, attention_mask=mask)
    real = mask.bool()
    assert torch.equal(got["p"][:, :, 1][real], got["donor"][:, :, 1][real])
    others = [0, 2, 3]
    assert torch.equal(got["p"][:, :, others][real], got["recipient"][:, :, others][real])
    assert not torch.allclose(got["donor"][:, :, 1][real], got["recipient"][:, :, 1][real])


def test_cross_patch_holds_across_cached_generation_steps(pair):
    """Cached batched generation under the patch equals a cache-free loop that re-runs the whole
    sequence under the patch at every step (each decode step gets the donor's z of its own
    position), and patching every head generates the donor's tokens."""
    donor, recipient = pair
    heads = [Head(0, 2), Head(1, 1)]
    with cross_patch(recipient, donor, heads) as stats:
        gens = generate(recipient, PROMPTS, max_new_tokens=6, stop_ids=frozenset())
    assert stats["forwards"] == 6 and stats["patched"] == 6 * 2
    for p, g in zip(PROMPTS, gens, strict=True):
        seq = list(p)
        for tok in g.tokens:
            with cross_patch(recipient, donor, heads), torch.no_grad():
                nxt = int(recipient(torch.tensor([seq]))[0, -1].argmax())
            assert nxt == tok
            seq.append(nxt)
    every = HeadShape.of(recipient).all_heads()
    with cross_patch(recipient, donor, every):
        patched = generate(recipient, PROMPTS, max_new_tokens=6, stop_ids=frozenset())
    theirs = generate(donor, PROMPTS, max_new_tokens=6, stop_ids=frozenset())
    ours = generate(recipient, PROMPTS, max_new_tokens=6, stop_ids=frozenset())
    assert [g.tokens for g in patched] == [g.tokens for g in theirs] != [g.tokens for g in ours]


def test_hooks_are_removed_after_the_block(pair):
    donor, recipient = pair
    before = logits(recipient)
    with pytest.raises(KeyError):
        with cross_patch(recipient, donor, "L0H0"):
            raise KeyError("a failure inside the block")
    assert torch.equal(logits(recipient), before)
    assert not recipient._forward_pre_hooks


def test_bad_cross_patches_are_clear_errors(pair, tiny_gqa):
    donor, recipient = pair
    with pytest.raises(ValueError, match="non-empty head set"):
        with cross_patch(recipient, donor, []):
            pass
    with pytest.raises(ValueError, match="outside the model"):
        with cross_patch(recipient, donor, "L7H0"):
            pass
    if HeadShape.of(tiny_gqa) != HeadShape.of(recipient):
        with pytest.raises(ValueError, match="differ in shape"):
            with cross_patch(recipient, tiny_gqa, "L0H0"):
                pass
    ids = torch.tensor([PROMPTS[0]])
    cache = new_cache(recipient)
    recipient(ids, **cache_kwargs(recipient, cache))
    with pytest.raises(RuntimeError, match="did not start"):
        with cross_patch(recipient, donor, "L0H0"):
            recipient(ids[:, -1:], **cache_kwargs(recipient, cache))
    resid = torch.zeros(1, 3, recipient.cfg.d_model)
    with pytest.raises(RuntimeError, match="without a donor run"):
        with cross_patch(recipient, donor, "L1H0"):
            run_from_layer(recipient, resid, 1)


def test_patch_head_sets_are_inter_compl_and_matched_random():
    shape = HeadShape(4, 4, 2)
    donor = [Head(3, 1), Head(0, 0), Head(2, 2), Head(1, 3)]
    recipient = [Head(2, 2), Head(3, 1), Head(0, 1)]
    sets = patch_head_sets(donor, recipient, shape, seeds=(0, 1))
    assert sets["inter"] == (Head(3, 1), Head(2, 2))  # donor rank order
    assert sets["compl"] == (Head(0, 0), Head(1, 3))
    for s in (0, 1):
        rand = sets[f"rand-s{s}"]
        assert len(rand) == 2 and not set(rand) & (set(donor) | set(recipient))
        assert sorted(h.layer for h in rand) == [2, 3]  # layer-matched to inter
    assert sets == patch_head_sets(donor, recipient, shape, seeds=(0, 1))  # seeded
    uniform = patch_head_sets(donor, recipient, shape, seeds=range(6), draw="uniform")
    draws = {uniform[f"rand-s{s}"] for s in range(6)}
    assert len(draws) > 1 and any(min(h.layer for h in d) < 2 for d in draws)
    disjoint = patch_head_sets([Head(0, 0)], [Head(1, 1)], shape)
    assert set(disjoint) == {"compl"}  # no shared heads: no inter, no rand of size 0
    with pytest.raises(ValueError, match="donor's head set is empty"):
        patch_head_sets([], recipient, shape)


def test_cross_model_patching_table_and_recovery(pair):
    donor, recipient = pair
    examples = niah_grid(recipient.tokenizer, lengths=[300], depths=[0.5], needles=2)
    every = HeadShape.of(recipient).all_heads()
    sets = {"all": every, "one": [Head(1, 1)]}
    df = cross_model_patching(
        donor, recipient, examples, sets, max_new_tokens=4, max_rows=2, progress=False
    )
    assert len(df) == 4 * 2 and set(df["condition"]) == {"recipient", "donor", "all", "one"}
    by = df.set_index(["condition", "example_id"])
    assert (by.loc["all", "prediction"] == by.loc["donor", "prediction"]).all()
    summary = summarise_cross(df).set_index("condition")
    assert summary.loc["all", "answer_logprob_recovery"] == pytest.approx(1.0, abs=1e-4)
    assert summary.loc["recipient", "answer_logprob_recovery"] == 0.0
    assert summary.loc["one", "n_heads"] == 1
    with pytest.raises(ValueError, match="empty"):
        cross_model_patching(donor, recipient, examples, {"inter": []}, progress=False)
    with pytest.raises(ValueError, match="reserved"):
        cross_model_patching(donor, recipient, examples, {"donor": every}, progress=False)


@pytest.mark.parametrize(("patched", "max_rows"), [("output", 2), ("z", 2), ("output", 16)])
def test_batched_conditions_give_the_per_condition_table(pair, patched, max_rows):
    """Conditions as rows of one batch (shared donor prompt, one prompt forward for scoring and
    generation) = one cross_patch + evaluate per condition. `max_rows` 2: one example at a time,
    its conditions in two chunks; 16: both examples (left-padded) with every condition."""
    donor, recipient = pair
    examples = niah_grid(recipient.tokenizer, lengths=[300, 360], depths=[0.5], needles=2)
    shape = HeadShape.of(recipient)
    sets = {"all": shape.all_heads(), "one": [Head(1, 1)], "spread": [Head(0, 2), Head(1, 0)]}
    ours = cross_model_patching(donor, recipient, examples, sets, max_new_tokens=6,
                                max_rows=max_rows, patched=patched, progress=False)  # fmt: skip
    ref = per_condition_table(donor, recipient, examples, sets, patched=patched, max_new_tokens=6)
    key = ["condition", "example_id"]
    ours = ours.sort_values(key).reset_index(drop=True)
    ref = ref.sort_values(key).reset_index(drop=True)
    assert len(ours) == len(ref) == 5 * len(examples)
    for col in ("condition", "example_id", "prediction", "n_generated", "stopped", "f1", "em"):
        assert ours[col].tolist() == ref[col].tolist(), col
    assert (ours["n_generated"] > 0).all()
    diff = (ours["answer_logprob"] - ref["answer_logprob"]).abs().max()
    assert diff < 1e-4, diff
    assert ours.groupby("condition")["answer_logprob"].mean().std() > 1e-3  # conditions differ
