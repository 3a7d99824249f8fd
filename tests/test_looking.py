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
