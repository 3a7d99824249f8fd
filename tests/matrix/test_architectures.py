"""The architecture matrix: every primitive against an independent reference, on a tiny random
model of every supported family (`mechinterp.models.tiny.FAMILIES`).

References are never our own code path: TransformerLens `patching` for per-head, per-position,
`patch_from` and joint patching; hand-written `hook_z` / `hook_pattern` edits (with masks built
here from the family's config: causal, sliding window, left padding) for every knockout mode;
argmaxes and sums of full patterns for the retrieval and QR scores; HF `generate()` on the plain
HF model for cached decoding; the donor's own logits for cross-model patching of every head; for
path patching, two hand-written passes that record and write the queries and keys where the
attention consumes them (after any q/k norm and RoPE), and those consumed queries, keys and
scores of every head that is not a receiver, which must keep their target values.
Batched primitives run on left-padded batches whose prompts are longer than every sliding window.

Each test records its largest difference with `record(...)`; `make matrix` writes them to a JSON
file and renders the support table in docs/models.md from `EXPECTED` (a cell is ✓ or a refusal
that must raise the expected error), so the docs cannot say what the matrix does not test.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from hand_references import (
    consumed_point,
    grab,
    hand_atp,
    hand_path_patch,
    hand_qk_fix,
    pass_one_hooks,
    run_all,
)
from matrix_support import EXPECTED, record
from transformer_lens import patching as tl_patching

from mechinterp.detect import copy_score, qr_scores, retrieval_scores
from mechinterp.detect.retrieval import needle_mask
from mechinterp.evaluate import generate, left_pad
from mechinterp.heads import Head, HeadShape
from mechinterp.interventions import (
    KnockoutSpec,
    cross_patch,
    knockout,
    mean_reference,
    resample_reference,
)
from mechinterp.interventions.patching import logit_diff_metric, patch_heads, run_from_layer
from mechinterp.models.attention import use_sdpa
from mechinterp.models.load import load_hf
from mechinterp.models.tiny import FAMILIES, tiny_family
from mechinterp.tasks.prompt import Prompt

FAMILY_NAMES = list(FAMILIES)

# Prompts longer than every sliding window (5), corrupted in the middle so that patching shares a
# cached prefix longer than the window.
CLEAN = [1] + list(range(30, 47))  # 18 tokens
CORRUPT = CLEAN[:7] + [80, 81] + CLEAN[9:]
PATCH_FROM = 11
BATCH = [list(range(20, 37)), list(range(50, 61)), list(range(70, 84))]  # 17, 11, 14 tokens


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request, tmp_path_factory):
    name = request.param
    model = tiny_family(name, directory=tmp_path_factory.mktemp(f"matrix-{name}"))
    return name, model


@pytest.fixture(scope="module")
def fused(family, tmp_path_factory):
    """The same family on the fused path (`use_sdpa`), or None where the family stays explicit."""
    name, _ = family
    model = tiny_family(name, directory=tmp_path_factory.mktemp(f"fused-{name}"))
    return model if use_sdpa(model) else None


def _paths(model, fused):
    """The model on its explicit path, then (where the family has one) on the fused path."""
    return (model,) if fused is None else (model, fused)


def _supported(name: str, primitive: str) -> bool:
    """True for a ✓ cell; for a refusal, checks the primitive raises the declared error."""
    return EXPECTED[name].get(primitive) is None


def _metric(model):
    with torch.no_grad():
        lc = model(torch.tensor([CLEAN]))[0, -1]
        lx = model(torch.tensor([CORRUPT]))[0, -1]
    good, bad = int((lc - lx).argmax()), int((lx - lc).argmax())
    return good, bad, lambda lg: lg[0, -1, good] - lg[0, -1, bad]


def _close(name, primitive, ours, ref, *, atol, scale=None):
    diff = float((ours.float() - ref.float()).abs().max())
    record(name, primitive, diff, float(ref.float().abs().max() if scale is None else scale))
    assert diff <= atol, f"{name} {primitive}: max |ours − reference| = {diff:.3g} > {atol}"


# ---------------------------------------------------------------- patching = TransformerLens


def test_resuming_from_every_layer_reproduces_the_forward(family):
    name, model = family
    resid = {}

    def keep(x, hook, *, layer):
        resid[layer] = x.detach().clone()

    hooks = [(f"blocks.{la}.hook_resid_pre", partial(keep, layer=la)) for la in range(3)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        full = model(torch.tensor([CLEAN]))[:, -1]
    worst = max(
        float((run_from_layer(model, resid[la], la) - full).abs().max()) for la in range(3)
    )
    record(name, "run_from_layer", worst, float(full.abs().max()))
    assert worst < 1e-4


def test_per_head_patching_equals_transformer_lens(family):
    name, model = family
    good, bad, tl_metric = _metric(model)
    ours = patch_heads(model, CLEAN, CORRUPT, logit_diff_metric(good, bad), batch_size=5)
    _, clean_cache = model.run_with_cache(torch.tensor([CLEAN]))
    theirs = tl_patching.get_act_patch_attn_head_out_all_pos(
        model, torch.tensor([CORRUPT]), clean_cache, tl_metric
    )
    assert ours.values.abs().max() > 1e-3
    _close(name, "patch_heads", ours.values, theirs, atol=1e-4)


def test_per_position_patching_equals_transformer_lens(family):
    name, model = family
    good, bad, tl_metric = _metric(model)
    ours = patch_heads(
        model, CLEAN, CORRUPT, logit_diff_metric(good, bad), per_position=True, batch_size=16
    )
    _, clean_cache = model.run_with_cache(torch.tensor([CLEAN]))
    theirs = tl_patching.get_act_patch_attn_head_out_by_pos(
        model, torch.tensor([CORRUPT]), clean_cache, tl_metric
    )  # [layer, pos, head]
    _close(name, "patch_heads per position", ours.values, theirs.permute(0, 2, 1), atol=1e-4)


def test_patch_from_equals_transformer_lens_with_a_positional_setter(family):
    name, model = family
    good, bad, tl_metric = _metric(model)
    ours = patch_heads(
        model, CLEAN, CORRUPT, logit_diff_metric(good, bad), direction="noise",
        patch_from=PATCH_FROM,
    )  # fmt: skip

    def from_position(corrupted, index, clean):
        _, head = index
        corrupted[:, PATCH_FROM:, head] = clean[:, PATCH_FROM:, head]
        return corrupted

    _, corrupt_cache = model.run_with_cache(torch.tensor([CORRUPT]))
    theirs = tl_patching.generic_activation_patch(
        model, torch.tensor([CLEAN]), corrupt_cache, tl_metric, from_position, "z",
        index_axis_names=("layer", "head"),
    )  # fmt: skip
    _close(name, "patch_from", ours.values, theirs, atol=1e-4)


def test_joint_sets_equal_hand_written_transformer_lens_hooks(family):
    name, model = family
    good, bad, tl_metric = _metric(model)
    sets = {"spread": [Head(0, 1), Head(1, 3), Head(2, 0)], "late": [Head(2, 1), Head(2, 2)]}
    ours = patch_heads(
        model, CLEAN, CORRUPT, logit_diff_metric(good, bad), heads=[], sets=sets,
        patch_from=PATCH_FROM,
    ).sets  # fmt: skip
    _, clean_cache = model.run_with_cache(torch.tensor([CLEAN]))

    def write(z, hook, *, heads):
        z = z.clone()
        z[:, PATCH_FROM:, heads] = clean_cache[hook.name][:, PATCH_FROM:, heads]
        return z

    diffs = []
    for set_name, members in sets.items():
        layers = sorted({h.layer for h in members})
        hooks = [
            (f"blocks.{la}.attn.hook_z",
             partial(write, heads=[h.head for h in members if h.layer == la]))
            for la in layers
        ]  # fmt: skip
        with torch.no_grad():
            ref = float(tl_metric(model.run_with_hooks(torch.tensor([CORRUPT]), fwd_hooks=hooks)))
        diffs.append(abs(ours[set_name] - ref))
    _close(name, "joint sets", torch.tensor(diffs), torch.zeros(2), atol=1e-4, scale=1.0)


# ---------------------------------------------------------------- AtP and path patching


def test_attribution_patching_equals_a_hand_written_gradient(family, fused):
    from mechinterp.interventions.attribution import attribution_patch

    name, model = family
    good, bad, _ = _metric(model)
    metric = logit_diff_metric(good, bad)
    stars = []
    for m in _paths(model, fused):
        ref, _ = hand_atp(m, CLEAN, CORRUPT, metric, PATCH_FROM)
        ours = attribution_patch(m, CLEAN, CORRUPT, metric, patch_from=PATCH_FROM)
        assert ref.abs().max() > 1e-4
        _close(name, "attribution_patch", ours.effect, ref, atol=1e-4,
               scale=float(ref.abs().max()))  # fmt: skip
        star = attribution_patch(m, CLEAN, CORRUPT, metric, patch_from=PATCH_FROM, grad_drop=True)
        last = HeadShape.of(m).n_layers - 1  # GradDrop: the last layer's score is |AtP|
        torch.testing.assert_close(star.score[last], ours.effect[last].abs())
        assert torch.isfinite(star.score).all()
        stars.append(star)
    if len(stars) == 2:
        torch.testing.assert_close(stars[1].score, stars[0].score, atol=1e-4, rtol=1e-3)


def test_qk_fix_equals_the_exact_softmax_change_of_each_query_and_key(family, fused):
    """AtP*'s QK fix for query and key nodes against `hand_qk_fix`: each node's own layer's
    pattern read from a forward with that node patched (soft-capping, sinks, sliding windows
    and q/k norms all in the model's own computation)."""
    from mechinterp.interventions.attribution import attribution_patch

    name, model = family
    good, bad, _ = _metric(model)
    metric = logit_diff_metric(good, bad)
    primitive = "AtP* queries and keys"
    if not _supported(name, primitive):
        with pytest.raises(NotImplementedError, match=EXPECTED[name][primitive]):
            attribution_patch(model, CLEAN, CORRUPT, metric, node="q", qk_fix=True)
        record(name, primitive, None, None)
        return
    for m in _paths(model, fused):
        largest = 0.0  # (Mistral's windows keep every patched query from the metric: 0 there)
        for node in ("q", "k"):
            ref = hand_qk_fix(m, CLEAN, CORRUPT, metric, node, PATCH_FROM)
            star = attribution_patch(m, CLEAN, CORRUPT, metric, node=node, qk_fix=True,
                                     grad_drop=True, patch_from=PATCH_FROM)  # fmt: skip
            largest = max(largest, float(ref.abs().max()))
            _close(name, primitive, star.effect, ref, atol=2e-5, scale=float(ref.abs().max()))
            assert torch.isfinite(star.score).all()
        assert largest > 1e-6


def test_path_patching_equals_a_hand_written_two_pass_reference(family, fused):
    from mechinterp.interventions.paths import path_patch

    name, model = family
    good, bad, _ = _metric(model)
    metric = logit_diff_metric(good, bad)
    receivers = [Head(1, 2), Head(2, 0)]
    senders = [Head(0, 0), Head(0, 3), Head(1, 1)]
    diffs, moved = [], 0.0
    for m in _paths(model, fused):
        for inp in ("q", "k"):
            ours = path_patch(m, CLEAN, CORRUPT, metric, receivers=receivers, receiver_input=inp,
                              senders=senders, batch_size=2)  # fmt: skip
            for s in senders:
                # 7: the first corrupted token
                ref = hand_path_patch(m, CLEAN, CORRUPT, s, receivers, inp, metric, 7)
                diffs.append(abs(float(ours.values[s]) - ref))
            moved = max(moved, float((ours.values - ours.corrupt).nan_to_num().abs().max()))
    assert moved > 1e-5
    _close(name, "path_patch", torch.tensor(diffs), torch.zeros(1), atol=1e-4, scale=1.0)


def _last_values(model, names, run) -> dict:
    """The last value each hook of `names` took while `run()` ran."""
    seen = {}

    def keep(x, hook):
        seen[hook.name] = x.detach().clone()

    with model.hooks(fwd_hooks=[(n, keep) for n in names]):
        run()
    return seen


def _by_unit(x, point: str):
    """[pos, unit, …] of one batch row: q / k hooks hand [batch, pos, unit, d_head], the scores
    [batch, head, query_pos, key_pos]."""
    return x[0].transpose(0, 1) if point.endswith("attn_scores") else x[0]


def _receiver_leak(model, fused, receiver, sender):
    """(largest change of a non-receiver head's consumed query, key or score, largest
    |ours − hand pass 1| of the receiver's query or key, largest move of the receiver's) when
    path patching writes `sender`'s path into `receiver` alone, through q and then k."""
    from mechinterp.interventions.paths import path_patch

    good, bad, _ = _metric(model)
    metric = logit_diff_metric(good, bad)
    shape = HeadShape.of(model)
    la, group = receiver.layer, shape.kv_head(receiver)
    in_group = [h for h in range(shape.n_heads) if shape.kv_head(Head(la, h)) == group]
    points = {p: consumed_point(model, la, p) for p in ("q", "k")}
    points = {p: n for p, n in points.items() if "hook_rot" in n}  # where the attention has them
    points["scores"] = f"blocks.{la}.attn.hook_attn_scores"
    target = grab(model, CORRUPT, list(points.values()))
    one = {}
    run_all(model, CORRUPT, pass_one_hooks(model, CLEAN, CORRUPT, sender, 7)
            + [(n, lambda x, hook: one.__setitem__(hook.name, x.detach().clone()))
               for n in points.values()])  # fmt: skip
    touched = {"q": {"q": [receiver.head], "k": [], "scores": [receiver.head]},
               "k": {"q": [], "k": [group], "scores": in_group}}  # fmt: skip
    leak = wrong = moved = 0.0
    for m in _paths(model, fused):
        for inp in ("q", "k"):
            ours = _last_values(m, list(points.values()), lambda m=m, inp=inp: path_patch(
                m, CLEAN, CORRUPT, metric, receivers=[receiver], receiver_input=inp,
                senders=[sender]))  # fmt: skip
            for p, name in points.items():
                got = _by_unit(ours[name], name)
                n_q, n_k = got.shape[0], got.shape[-1]
                ref = _by_unit(target[name], name)[-n_q:, ..., -n_k:]
                first = _by_unit(one[name], name)[-n_q:, ..., -n_k:]
                diff = torch.where(torch.isfinite(ref), got - ref, 0).abs()
                mine = touched[inp][p]
                others = [u for u in range(got.shape[1]) if u not in mine]
                if others:  # none for a key under MQA: its one KV group is every head's
                    leak = max(leak, float(diff[:, others].max()))
                if p != "scores" and mine:
                    wrong = max(wrong, float((got - first)[:, mine].abs().max()))
                    moved = max(moved, float((first - ref)[:, mine].abs().max()))
                elif mine:
                    moved = max(moved, float(diff[:, mine].max()))
    return leak, wrong, moved


def test_path_patching_moves_no_query_or_key_but_the_receivers(family, fused):
    """One receiver head patched through its query, then its KV group through the key: in the
    pass that writes them, every other head's query, key and score as the attention consumes
    them (after any q/k norm and RoPE: `hook_rot_q` / `hook_rot_k` where the attention has
    them, and `hook_attn_scores`; never where the library writes) keeps its value in the
    target's own forward, and the receiver's query and key equal a hand-written pass 1's. A
    write before a q/k norm that spans every head (OLMo-2) would move them all."""
    name, model = family
    leak, wrong, moved = _receiver_leak(model, fused, Head(2, 1), Head(0, 3))
    assert moved > 1e-3, f"{name}: the sender's path did not move the receiver"
    _close(name, "path_patch receivers only", torch.tensor([leak, wrong]), torch.zeros(1),
           atol=1e-4, scale=moved)  # fmt: skip


# ---------------------------------------------------------------- knockout = hand-written hooks

KO_HEADS = (Head(0, 1), Head(1, 2), Head(2, 0), Head(2, 3))
STARTS = [9, 4, 6]  # per row, first knocked-out position (scope "query")


def _padded():
    ids, mask = left_pad_ids(BATCH)
    offsets = (mask == 0).sum(-1)
    return ids, mask, offsets


def left_pad_ids(rows, pad=3):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.tensor(row)
        mask[r, width - len(row) :] = 1
    return ids, mask


def _in_scope(offsets, width):
    """[batch, pos] bool: real query positions at or after each row's start."""
    pos = torch.arange(width)[None, :] - offsets[:, None]
    return pos >= torch.tensor(STARTS)[:, None]


def _visible(model, layer, offsets, width):
    """[batch, q, k] bool: the keys each query may see, built here from the config: causal, the
    layer's sliding window (if it is a sliding layer), no left padding."""
    config = model.original_model.config
    q = torch.arange(width)[:, None]
    k = torch.arange(width)[None, :]
    seen = k <= q
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    sliding = window is not None and (types is None or types[layer] == "sliding_attention")
    if sliding:
        seen = seen & (q - k < window)
    return seen[None] & (k[None] >= offsets[:, None, None])


def _reference_knockout(model, spec, ids, mask, offsets, replacement=None):
    """Logits with the knockout written by hand: z edits, or pattern rows rebuilt."""
    width = ids.shape[1]
    scope = _in_scope(offsets, width)  # [b, q]
    by_layer: dict[int, list[int]] = {}
    for h in spec.heads:
        by_layer.setdefault(h.layer, []).append(h.head)

    def edit_z(z, hook, *, layer):
        z = z.clone()
        for h in by_layer[layer]:
            new = torch.zeros_like(z[:, :, h]) if replacement is None else replacement(layer, h)
            z[:, :, h] = torch.where(scope[..., None], new, z[:, :, h])
        return z

    def edit_pattern(p, hook, *, layer):
        p = p.clone()
        seen = _visible(model, layer, offsets, width).to(p.dtype)  # [b, q, k]
        for h in by_layer[layer]:
            if spec.mode == "uniform_attention":
                new = seen / seen.sum(-1, keepdim=True)
            else:  # edge knockout: cut keys renormalised away
                kabs = torch.arange(width)[None, :] - offsets[:, None]
                keep = ~torch.isin(kabs, torch.tensor(spec.key_positions))  # [b, k]
                cut = p[:, h] * keep[:, None, :]
                # a learned sink (GPT-OSS) keeps its weight, 1 − the row's sum, in the softmax
                sink = 1 - p[:, h].sum(-1, keepdim=True)
                new = cut / (cut.sum(-1, keepdim=True) + sink)
            p[:, h] = torch.where(scope[..., None], new, p[:, h])
        return p

    name = "attn.hook_z" if spec.mode in ("zero", "mean", "resample") else "attn.hook_pattern"
    fn = edit_z if name == "attn.hook_z" else edit_pattern
    hooks = [(f"blocks.{la}.{name}", partial(fn, layer=la)) for la in by_layer]
    with torch.no_grad():
        return model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=hooks)


@pytest.mark.parametrize("mode", ["zero", "mean", "resample", "uniform_attention", "edge_knockout"])
def test_knockout_equals_a_hand_written_reference(family, fused, mode):
    """Score-level modes also on the fused path (only the knocked-out rows recomputed)."""
    name, model = family
    primitive = f"knockout {mode}"
    ids, mask, offsets = _padded()
    kw = {"key_positions": (2, 3, 5)} if mode == "edge_knockout" else {}
    spec = KnockoutSpec(heads=KO_HEADS, mode=mode, scope="query", **kw)
    reference, replacement = None, None
    other = [list(range(40, 60)), list(range(60, 80))]
    if mode == "mean":
        reference = mean_reference(model, other, KO_HEADS)
        _, cache = model.run_with_cache(torch.tensor(other))
        replacement = lambda la, h: cache[f"blocks.{la}.attn.hook_z"][:, :, h].mean((0, 1))  # noqa: E731
    elif mode == "resample":
        reference = resample_reference(model, other[0], KO_HEADS)
        _, cache = model.run_with_cache(torch.tensor(other[:1]))

        def replacement(la, h):
            z = cache[f"blocks.{la}.attn.hook_z"][0, :, h]  # [pos, d] by absolute position
            pos = (torch.arange(ids.shape[1])[None, :] - offsets[:, None]).clamp(min=0)
            return z[pos]

    if not _supported(name, primitive):
        with pytest.raises(NotImplementedError, match=EXPECTED[name][primitive]):
            with knockout(model, spec, reference=reference, starts=STARTS), torch.no_grad():
                model(ids, attention_mask=mask)
        record(name, primitive, None, None)
        return
    with torch.no_grad():
        plain = model(ids, attention_mask=mask)
    ref = _reference_knockout(model, spec, ids, mask, offsets, replacement)
    real = mask.bool()
    for path in _paths(model, fused):
        with knockout(path, spec, reference=reference, starts=STARTS), torch.no_grad():
            ours = path(ids, attention_mask=mask)
        assert (ours - plain)[real].abs().max() > 1e-3, "the knockout changed nothing: vacuous"
        _close(name, primitive, ours[real], ref[real], atol=1e-4)


def test_knockout_under_cached_generation_equals_teacher_forcing(family, fused):
    """Edge knockout during cached decoding (where sliding-window caches drop keys) = the same
    knockout on the uncached forward of the generated text, on the explicit and fused paths."""
    name, model = family
    for path in _paths(model, fused):
        _cached_knockout_equals_teacher_forcing(name, path)


def _cached_knockout_equals_teacher_forcing(name, model):
    spec = KnockoutSpec(
        heads=KO_HEADS, mode="edge_knockout", scope="response", key_positions=(2, 3, 9, 12)
    )
    prompts = BATCH
    with knockout(model, spec):
        gens = generate(model, prompts, max_new_tokens=8, stop_ids=frozenset(), batch_size=3)
    diffs, changed = [], 0.0
    for p, g in zip(prompts, gens, strict=True):
        full = torch.tensor([p + list(g.tokens)])
        with knockout(model, spec, starts=len(p) - 1), torch.no_grad():
            logits = model(full)[0, len(p) - 1 : -1]
        with torch.no_grad():
            changed = max(changed, float((model(full)[0, len(p) - 1 : -1] - logits).abs().max()))
        greedy = logits.argmax(-1).tolist()
        diffs.append(sum(a != b for a, b in zip(greedy, g.tokens, strict=True)))
    record(name, "knockout in cached generation", float(max(diffs)), None)
    assert changed > 1e-3, "the knockout changed nothing: vacuous"
    assert max(diffs) == 0


def test_per_row_conditions_equal_one_knockout_each(family, fused):
    """`score_conditions` (one batch row per condition via `knockout_rows`, the prefix before
    position 8 shared from a KV cache longer than the sliding windows) = `knockout` run once per
    condition on the whole sequence, acting from position 8 on."""
    from mechinterp.interventions.conditions import score_conditions

    name, model = family
    primitive = "per-row conditions"
    answer, shared = (14, 18), 8
    specs = [KnockoutSpec(), KnockoutSpec(heads=KO_HEADS, mode="zero"),
             KnockoutSpec(heads=KO_HEADS[1:], mode="uniform_attention")]  # fmt: skip
    if not _supported(name, primitive):
        with pytest.raises(NotImplementedError, match=EXPECTED[name][primitive]):
            score_conditions(model, CLEAN, answer, specs, shared_prefix=shared)
        record(name, primitive, None, None)
        return
    ours = [score_conditions(path, CLEAN, answer, specs, shared_prefix=shared).logprobs
            for path in _paths(model, fused)]  # fmt: skip
    refs = []
    for spec in specs:
        scoped = KnockoutSpec(heads=spec.heads, mode=spec.mode, scope="query")
        with knockout(model, scoped, starts=shared), torch.no_grad():
            logits = model(torch.tensor([CLEAN]))[0, answer[0] - 1 : answer[1] - 1].float()
        target = torch.tensor(CLEAN[answer[0] : answer[1]])
        refs.append(logits.log_softmax(-1).gather(-1, target[:, None])[:, 0])
    ref = torch.stack(refs)
    assert (ref[1:] - ref[0]).abs().max() > 1e-3, "the conditions changed nothing: vacuous"
    for logprobs in ours:
        _close(name, primitive, logprobs, ref, atol=1e-4)


# ---------------------------------------------------------------- detection = full patterns


def _letter_prompts(model, lengths):
    tok = model.tokenizer
    gen = torch.Generator().manual_seed(0)
    prompts = []
    for i, n in enumerate(lengths):
        letters = [("abc")[j] for j in torch.randint(3, (n,), generator=gen)]
        ids = tuple(tok.convert_tokens_to_ids(letters))
        prompts.append(Prompt(f"p{i}", "".join(letters), ids, {"needle": ((3, n - 2),)}))
    return prompts


def test_retrieval_score_equals_a_full_pattern_reference(family, fused):
    """On the explicit path and, where the family has one, the fused path (decode rows only)."""
    name, model = family
    for ours in _paths(model, fused):
        _retrieval_equals_reference(name, ours, model)


def _retrieval_equals_reference(name, ours, model):
    prompts = _letter_prompts(model, [17, 12])
    outputs = [model.tokenizer.convert_tokens_to_ids(list(w)) for w in ("abcab", "ccbab")]
    eos = model.tokenizer.eos_token_id
    step = {"n": 0}

    def force(logits, hook):
        logits = torch.full_like(logits, -1e4)
        for r, out in enumerate(outputs):
            logits[r, -1, out[step["n"]] if step["n"] < len(out) else eos] = 1e4
        step["n"] += 1
        return logits

    with ours.hooks(fwd_hooks=[("unembed.hook_out", force)]):
        d = retrieval_scores(
            ours, prompts, [["x"], ["x"]], gate=None, convention="per_step", max_new_tokens=8
        )
    assert bool((d.per_instance > 0).any()), "no copies at all: the comparison would be vacuous"
    refs = []
    for i, p in enumerate(prompts):
        n, gen = p.n_tokens, list(d.instances["generated_ids"][i])
        _, cache = model.run_with_cache(torch.tensor([list(p.input_ids) + gen]))
        argmax = torch.stack(
            [cache[f"blocks.{la}.attn.hook_pattern"][0, :, n - 1 : n - 1 + len(gen), :n]
             .argmax(-1).T for la in range(model.cfg.n_layers)], 1,
        )  # fmt: skip
        refs.append(
            copy_score(argmax, torch.tensor(gen), torch.tensor(p.input_ids), needle_mask(p),
                       convention="per_step")  # fmt: skip
        )
    _close(name, "retrieval score", d.per_instance, torch.stack(refs), atol=0, scale=1.0)


def test_qr_score_equals_a_full_pattern_reference_in_a_padded_batch(family, fused):
    """On the explicit path and, where the family has one, the fused path (question rows only)."""
    name, model = family
    for ours in _paths(model, fused):
        _qr_equals_reference(name, ours, model)


def _qr_equals_reference(name, ours, model):
    gen = torch.Generator().manual_seed(1)
    prompts = []
    for i, (n, gold, question) in enumerate([(20, (3, 9), (14, 19)), (13, (2, 6), (8, 12))]):
        ids = tuple(torch.randint(10, 90, (n,), generator=gen).tolist())
        prompts.append(Prompt(f"q{i}", "", ids, {"gold_doc": (gold,), "question": (question,)}))
    d = qr_scores(ours, prompts, batch_size=2)
    refs = []
    for p in prompts:
        _, cache = model.run_with_cache(torch.tensor([p.input_ids]))
        (qs, qe), (gs, ge) = p.span("question"), p.span("gold_doc")
        refs.append(torch.stack([
            cache[f"blocks.{la}.attn.hook_pattern"][0, :, qs:qe, gs:ge].sum(-1).mean(-1)
            for la in range(model.cfg.n_layers)
        ]))  # fmt: skip
    _close(name, "QR score", d.per_instance, torch.stack(refs), atol=1e-5, scale=1.0)


# ---------------------------------------------------------------- generation and cross-model


def test_cached_generation_equals_hf_generate(family):
    name, model = family
    hf, *_ = load_hf(model.mechinterp_card.source)
    hf.eval().generation_config.eos_token_id = None
    ours = generate(model, BATCH, max_new_tokens=8, stop_ids=frozenset(), batch_size=3)
    wrong = 0
    for p, g in zip(BATCH, ours, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False,
                              pad_token_id=hf.config.pad_token_id)  # fmt: skip
        wrong += sum(a != b for a, b in zip(out[0, len(p) :].tolist(), g.tokens, strict=True))
    record(name, "cached generation", float(wrong), None)
    assert wrong == 0


def _attention_tuned(name: str, directory, *, seed: int):
    """The family's seed-0 model with every attention parameter perturbed (a fine-tune of the
    attention alone): a recipient for the seed-0 donor."""
    recipient = tiny_family(name, directory=directory)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in recipient.original_model.named_parameters():
            if any(f".{part}." in pname for part in ("self_attn", "attn", "attention")):
                p.add_(0.5 * p.std().clamp(min=0.1) * torch.randn(p.shape, generator=g))
    return recipient


def test_cross_patching_every_head_gives_the_donor(family, tmp_path):
    """The recipient is the donor with every attention parameter perturbed (a fine-tune of the
    attention alone): patching every head's output from the donor must give the donor's logits."""
    name, donor = family
    recipient = _attention_tuned(name, tmp_path / "recipient", seed=1)
    ids, mask = left_pad(recipient, BATCH)
    heads = HeadShape.of(recipient).all_heads()
    with torch.no_grad():
        want = donor(ids, attention_mask=mask)
        before = recipient(ids, attention_mask=mask)
        with cross_patch(recipient, donor, heads):
            got = recipient(ids, attention_mask=mask)
    real = mask.bool()
    assert (want - before)[real].abs().max() > 1e-2, "the perturbation changed nothing: vacuous"
    _close(name, "cross_patch all heads", got[real], want[real], atol=1e-4)


def test_batched_cross_conditions_equal_one_cross_patch_per_condition(family, tmp_path):
    """`cross_model_patching` (two left-padded examples × every condition as batch rows, prompt
    caches copied for scoring and generation) = one `cross_patch` + `evaluate` per condition."""
    from cross_reference import per_condition_table

    from mechinterp.interventions import cross_model_patching
    from mechinterp.tasks.niah import niah_grid

    name, donor = family
    recipient = _attention_tuned(name, tmp_path / "recipient", seed=2)
    examples = niah_grid(recipient.tokenizer, lengths=[300, 340], depths=[0.5], needles=1)
    sets = {"a": [Head(0, 1), Head(2, 3)], "b": [Head(1, 0)]}
    key = ["condition", "example_id"]
    ours = cross_model_patching(donor, recipient, examples, sets, max_new_tokens=5,
                                progress=False).sort_values(key)  # fmt: skip
    ref = per_condition_table(donor, recipient, examples, sets, patched="output",
                              max_new_tokens=5).sort_values(key)  # fmt: skip
    assert ours["prediction"].tolist() == ref["prediction"].tolist()
    assert ref["answer_logprob"].std() > 1e-3, "the conditions do not differ: vacuous"
    diff = ours["answer_logprob"].to_numpy() - ref["answer_logprob"].to_numpy()
    _close(name, "cross conditions batched", torch.tensor(diff), torch.zeros(len(diff)),
           atol=1e-4, scale=float(ref["answer_logprob"].abs().max()))  # fmt: skip


# ---------------------------------------------------------------- half precision

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.mark.parametrize("dtype", list(HALF))
@pytest.mark.parametrize("name", ["llama-gqa", "gemma2", "gpt2"])
def test_half_precision_patching_and_knockout_equal_their_references(name, dtype, tmp_path):
    """bf16 / fp16 models: per-head patching = TransformerLens in the same dtype, and uniform
    attention = the hand-written pattern reference (tolerances measured: see the comments)."""
    model = tiny_family(name, dtype=HALF[dtype], directory=tmp_path)
    good, bad, tl_metric = _metric(model)
    ours = patch_heads(model, CLEAN, CORRUPT, logit_diff_metric(good, bad), batch_size=5)
    _, clean_cache = model.run_with_cache(torch.tensor([CLEAN]))
    theirs = tl_patching.get_act_patch_attn_head_out_all_pos(
        model, torch.tensor([CORRUPT]), clean_cache, tl_metric
    )
    assert torch.isfinite(ours.values).all()
    # measured: equal to the last bit on CPU (the same ops in the same dtype); the tolerance is a
    # few bf16 / fp16 steps of values of ~0.3, for other kernels
    atol = 0.01 if dtype == "bfloat16" else 0.002
    _close(name, f"patch_heads {dtype}", ours.values, theirs, atol=atol)
    ids, mask, offsets = _padded()
    spec = KnockoutSpec(heads=KO_HEADS, mode="uniform_attention", scope="query")
    with knockout(model, spec, starts=STARTS), torch.no_grad():
        got = model(ids, attention_mask=mask)
    ref = _reference_knockout(model, spec, ids, mask, offsets)
    real = mask.bool()
    _close(name, f"uniform_attention {dtype}", got[real], ref[real], atol=atol)
