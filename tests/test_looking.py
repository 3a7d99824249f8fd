"""`needle_mass` (the attention each head pays from a prompt's last position to its needles)
equals the explicit pattern's last row summed over each span, on every tiny family, fused and
explicit, with prompts of different lengths batched under left padding."""

from __future__ import annotations

import pytest
import torch

from mechinterp.analysis.looking import needle_mass
from mechinterp.errors import InputError
from mechinterp.heads import Head
from mechinterp.models import load_model
from mechinterp.models.tiny import FAMILIES, tiny_family
from mechinterp.tasks.prompt import Prompt


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def models(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"looking-{request.param}")
    tiny_family(request.param, directory=directory)
    return [load_model(directory, device="cpu", attention=a) for a in ("eager", "sdpa")]


def _prompts(model) -> list[Prompt]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i, (n, spans) in enumerate(((40, ((5, 9), (20, 26))), (31, ((2, 3), (17, 30))))):
        ids = torch.randint(3, model.cfg.d_vocab, (n,), generator=g).tolist()
        out.append(Prompt(example_id=f"p{i}", text="", input_ids=tuple(ids),
                          spans={"needle": spans}))  # fmt: skip
    return out


def test_needle_mass_is_the_explicit_patterns_last_row_on_each_span(models):
    explicit = models[0]
    prompts = _prompts(explicit)
    heads = [Head(0, 0), Head(1, explicit.cfg.n_heads - 1)]
    want = {}
    for p in prompts:  # one prompt at a time: no padding in the reference
        ids = torch.tensor([p.input_ids])
        _, cache = explicit.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
        for h in heads:
            row = cache[f"blocks.{h.layer}.attn.hook_pattern"][0, h.head, -1]
            for n, (s, e) in enumerate(p.spans["needle"]):
                want[(p.example_id, str(h), n)] = float(row[s:e].sum())
    for model in models:
        table = needle_mass(model, prompts, heads, batch_size=2)
        assert len(table) == len(want) == 8
        for r in table.itertuples():
            assert r.mass == pytest.approx(want[(r.example_id, r.head_name, r.needle)], abs=1e-5)
    assert len({round(v, 4) for v in want.values()}) > 2  # the spans differ (a window hides some)


def test_needle_mass_refuses_what_it_cannot_measure(models):
    model = models[1]
    prompts = _prompts(model)
    with pytest.raises(InputError, match="no heads"):
        needle_mass(model, prompts, [])
    bare = Prompt(example_id="bare", text="", input_ids=prompts[0].input_ids, spans={})
    with pytest.raises(InputError, match="no needle span"):
        needle_mass(model, [bare], [Head(0, 0)])


# ---------------------------------------------------------------- restoring and steering the mass

CLEAN = [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
CORRUPT = [1, 10, 11, 40, 41, 14, 15, 16, 17, 18, 19, 20, 21, 22]  # positions 3-4 replaced
SPANS = ((2, 5), (7, 11))


def _pair() -> tuple[Prompt, Prompt]:
    return tuple(Prompt(example_id=n, text="", input_ids=tuple(ids), spans={"needle": SPANS})
                 for n, ids in (("clean", CLEAN), ("corrupt", CORRUPT)))  # fmt: skip


@pytest.fixture(scope="module", params=["llama", "olmo2"])
def pair_model(request, tmp_path_factory):
    """(bridge, the plain HF reference) of a 3-layer tiny model: Llama with 2 query heads per KV
    head, or OLMo-2 (q/k norms over every head)."""
    import hf_reference as ref

    return ref.bridge_and_reference(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("node", ["q", "k"])
def test_mass_restored_is_the_hf_models_own_row_with_that_input_patched(pair_model, node):
    from mechinterp.analysis.looking import mass_restored

    model, hf = pair_model
    clean, corrupt = _pair()
    heads = [Head(1, 0), Head(1, 3), Head(2, 2)]
    table = mass_restored(model, clean, corrupt, heads, node=node)
    assert len(table) == len(heads) * len(SPANS)
    shape_kv = model.cfg.n_heads // model.cfg.n_key_value_heads
    _, src = hf.run(CLEAN, lambda logits: logits[:, 0])
    _, tgt = hf.run(CORRUPT, lambda logits: logits[:, 0])
    moved = 0.0
    for h in heads:
        unit = h.head if node == "q" else h.head // shape_kv
        positions = [len(CORRUPT) - 1] if node == "q" else list(range(len(CORRUPT)))
        patch = {"node": node, "layer": h.layer, "unit": unit, "positions": positions,
                 "source": src}  # fmt: skip
        _, rec = hf.run(CORRUPT, lambda logits: logits[:, 0], patch=patch)
        for n, (s, e) in enumerate(SPANS):
            row = table[(table.head_name == str(h)) & (table.needle == n)].iloc[0]
            assert row.clean == pytest.approx(float(src[h.layer]["A"][0, h.head, -1, s:e].sum()),
                                              abs=1e-5)  # fmt: skip
            assert row.corrupt == pytest.approx(float(tgt[h.layer]["A"][0, h.head, -1, s:e].sum()),
                                                abs=1e-5)  # fmt: skip
            assert row.patched == pytest.approx(float(rec[h.layer]["A"][0, h.head, -1, s:e].sum()),
                                                abs=1e-5)  # fmt: skip
            moved = max(moved, abs(row.patched - row.corrupt))
    assert moved > 1e-3  # the patch moved some head's mass


def test_node_patching_with_a_mass_metric_reads_the_patched_heads_row(pair_model):
    from mechinterp.analysis.looking import MassMetric, mass_restored
    from mechinterp.interventions.patching import patch_nodes

    model, _ = pair_model
    clean, corrupt = _pair()
    h = Head(2, 1)
    want = mass_restored(model, clean, corrupt, [h], node="q")
    want = want[want.needle == 0].iloc[0]
    metric = MassMetric([h], SPANS[0], len(CLEAN))
    res = patch_nodes(model, CLEAN, CORRUPT, metric, node="q", units=[h])
    assert res.clean == pytest.approx(want.clean, abs=1e-5)
    assert res.corrupt == pytest.approx(want.corrupt, abs=1e-5)
    assert float(res.values[h]) == pytest.approx(want.patched, abs=1e-5)


@pytest.fixture(scope="module")
def deep_pair(tmp_path_factory):
    """A 4-layer GQA tiny model, explicit (hook_pattern fires) and fused."""
    from mechinterp.models.tiny import tiny_model

    directory = tmp_path_factory.mktemp("deep-looking")
    tiny_model(n_layers=4, n_kv_heads=2, seed=5, directory=directory)
    return [load_model(directory, device="cpu", attention=a) for a in ("eager", "sdpa")]


@pytest.mark.parametrize("receiver_input", ["q", "k"])
def test_path_patching_into_a_mass_metric_equals_a_hand_written_two_pass_reference(
    deep_pair, receiver_input
):
    """Which upstream heads steer where the receivers look: the path-patched receivers' mass on
    a span, against two full hooked forwards that read the explicit pattern."""
    from functools import partial

    from hand_references import hand_path_patch

    from mechinterp.analysis.looking import MassMetric
    from mechinterp.interventions.paths import path_patch

    explicit = deep_pair[0]
    receivers = [Head(2, 1), Head(3, 0), Head(3, 3)]
    rows: dict[int, torch.Tensor] = {}

    def grab(p, hook, *, la):
        rows[la] = p[0, :, -1].detach().clone()

    def read(logits):  # needle 1 against needle 0
        masses = [rows[h.layer][h.head, SPANS[1][0] : SPANS[1][1]].sum()
                  - rows[h.layer][h.head, SPANS[0][0] : SPANS[0][1]].sum()
                  for h in receivers]  # fmt: skip
        return torch.stack(masses).mean()[None]

    senders = [Head(0, 2), Head(1, 0), Head(2, 3)]
    want = {}
    with explicit.hooks(fwd_hooks=[(f"blocks.{la}.attn.hook_pattern", partial(grab, la=la))
                                   for la in (2, 3)]):  # fmt: skip
        for s in senders:
            want[s] = hand_path_patch(explicit, CLEAN, CORRUPT, s, receivers, receiver_input,
                                      read, 3)  # fmt: skip
        want["corrupt"] = float(read(explicit(torch.tensor([CORRUPT]))))
    for model in deep_pair:
        metric = MassMetric(receivers, SPANS[1], len(CLEAN), minus=SPANS[0])
        res = path_patch(model, CLEAN, CORRUPT, metric, receivers=receivers,
                         receiver_input=receiver_input, senders=senders)  # fmt: skip
        assert res.corrupt == pytest.approx(want["corrupt"], abs=1e-5)
        for s in senders:
            assert float(res.values[s]) == pytest.approx(want[s], abs=1e-5), s
    assert max(abs(want[s] - want["corrupt"]) for s in senders) > 1e-4


def test_mass_metrics_are_refused_where_they_cannot_be_read(deep_pair):
    from mechinterp.analysis.looking import MassMetric, mass_restored
    from mechinterp.interventions.attribution import attribution_patch

    model = deep_pair[1]
    clean, corrupt = _pair()
    metric = MassMetric([Head(2, 1)], SPANS[0], len(CLEAN))
    with pytest.raises(InputError, match="exact patching"):
        attribution_patch(model, CLEAN, CORRUPT, metric)
    with pytest.raises(RuntimeError, match="inside `reading"):
        metric(torch.zeros(1, 5))
    with pytest.raises(InputError, match="inside the 14 tokens"):
        MassMetric([Head(2, 1)], (10, 20), 14)
    with pytest.raises(InputError, match="start < end"):
        MassMetric([Head(2, 1)], (1, 3), 14, minus=(5, 5))
    with pytest.raises(InputError, match="node must be 'q' or 'k'"):
        mass_restored(model, clean, corrupt, [Head(2, 1)], node="z")
