"""An independent reference for node patching and attribution patching: the plain Hugging Face
model, reloaded from a tiny model's directory, with its attention run by a function registered
here (none of the bridge, its hooks, the library's caching or batching). The function receives
the queries and keys as the logits read them (after q/k norms and rotary embeddings) and the
values, patches or records them, computes the pattern explicitly (causal mask, float32
softmax) and patches or records the heads' outputs before the output projection.

`Reference.run(ids, ...)` is one full forward: `patch` writes one unit of one node type from a
recorded source run at given positions; `grad=True` keeps every node's and every pattern's
gradient; `drop=l` detaches layer l's attention and MLP outputs (GradDrop's dropped layer).
The functions below build exact patching, AtP, the QK fix (Σ ∂M/∂A · (A' − A), A' read from an
actually patched forward) and GradDrop from it by brute force, one forward per variant.
"""

from __future__ import annotations

import torch

NAME = "mechinterp_test_reference"
_STATE: dict = {}


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.repeat_interleave(n, dim=1)


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    la, st = module.layer_idx, _STATE
    patch = st.get("patch")
    q, k, v = query, key, value
    if patch is not None and patch["layer"] == la and patch["node"] in ("q", "k", "v"):
        src = patch["source"][la][patch["node"]]
        x = {"q": q, "k": k, "v": v}[patch["node"]].clone()
        x[:, patch["unit"], patch["positions"]] = src[:, patch["unit"], patch["positions"]]
        q, k, v = (x if n == patch["node"] else y for n, y in (("q", q), ("k", k), ("v", v)))
    group = q.shape[1] // k.shape[1]
    scores = torch.matmul(q, _repeat(k, group).transpose(2, 3)) * scaling
    n = scores.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    pattern = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    z = torch.matmul(pattern, _repeat(v, group)).transpose(1, 2)  # [batch, pos, head, d]
    if patch is not None and patch["layer"] == la and patch["node"] == "z":
        z = z.clone()
        src = patch["source"][la]["z"]
        z[:, patch["positions"], patch["unit"]] = src[:, patch["positions"], patch["unit"]]
    if st.get("grad"):
        for t in (query, key, value, pattern, z):
            if t.requires_grad:
                t.retain_grad()
    st.setdefault("record", {})[la] = {"q": query, "k": key, "v": value, "A": pattern, "z": z}
    return z.contiguous(), pattern


class Reference:
    """The HF model of a tiny model's `directory`, attention through `_attention`."""

    def __init__(self, directory) -> None:
        from transformers import AttentionInterface, AutoModelForCausalLM

        AttentionInterface.register(NAME, _attention)
        self.model = AutoModelForCausalLM.from_pretrained(
            directory, attn_implementation=NAME, dtype=torch.float32
        )
        self.model.eval()
        self.n_layers = self.model.config.num_hidden_layers

    def run(self, ids, metric, *, patch=None, grad=False, drop=None):
        """(metric, record {layer: {q, k, v, A, z}}) of one forward of `ids`."""
        _STATE.clear()
        _STATE.update(patch=patch, grad=grad)
        handles = []
        if drop is not None:
            layer = self.model.model.layers[drop]

            def cut(module, inputs, output):
                if isinstance(output, tuple):
                    return (output[0].detach(), *output[1:])
                return output.detach()

            handles = [layer.self_attn.register_forward_hook(cut),
                       layer.mlp.register_forward_hook(cut)]  # fmt: skip
        try:
            with torch.set_grad_enabled(grad):
                logits = self.model(torch.tensor([list(ids)])).logits[:, -1]
                m = metric(logits)[0]
                if grad:
                    m.backward()
        finally:
            for h in handles:
                h.remove()
        return float(m.detach()), _STATE.pop("record")


def bridge_and_reference(family: str, directory):
    """(bridge, `Reference`) of a 3-layer tiny model saved to `directory`: `llama` (Llama with 2
    KV heads, 2 query heads each) or `olmo2` (OLMo-2: q/k norms over every head, norms after
    attention and MLP)."""
    from mechinterp.models.tiny import tiny_family, tiny_model

    if family == "llama":
        model = tiny_model(n_kv_heads=2, n_layers=3, seed=1, directory=directory)
    else:
        model = tiny_family(family, n_layers=3, seed=1, directory=directory)
    return model, Reference(directory)


def _units(node: str, record) -> int:
    return record[0][node].shape[2 if node == "z" else 1]


def _variants(n_pos: int, start: int, per_position: bool):
    return [[p] for p in range(start, n_pos)] if per_position else [list(range(start, n_pos))]


def exact(ref: Reference, source, target, metric, node: str, start: int, per_position: bool):
    """Exact patching of every unit of `node`: the metric minus the target's, [layer, unit]
    or [layer, unit, pos] (0 before `start`)."""
    m_target, _ = ref.run(target, metric)
    _, src = ref.run(source, metric)
    n_units, n_pos = _units(node, src), len(target)
    out = torch.zeros(ref.n_layers, n_units, n_pos)
    for la in range(ref.n_layers):
        for u in range(n_units):
            for pos in _variants(n_pos, start, per_position):
                patch = {"node": node, "layer": la, "unit": u, "positions": pos, "source": src}
                m, _ = ref.run(target, metric, patch=patch)
                out[la, u, pos[0]] += m - m_target
    return out if per_position else out.sum(-1)


def atp(ref: Reference, source, target, metric, node: str, start: int, per_position: bool,
        drop=None):  # fmt: skip
    """(n_source − n_target) · ∂M/∂n on the target (layer `drop` cut), per unit (and pos)."""
    _, src = ref.run(source, metric)
    _, tgt = ref.run(target, metric, grad=True, drop=drop)
    out = []
    for la in range(ref.n_layers):
        x = tgt[la][node]
        g = torch.zeros_like(x) if x.grad is None else x.grad
        e = ((src[la][node] - x.detach()) * g).sum(-1)[0]  # q/k/v: [unit, pos]; z: [pos, unit]
        e = e.T if node == "z" else e
        e[:, :start] = 0.0
        out.append(e)
    out = torch.stack(out)
    return out if per_position else out.sum(-1)


def qk_fix(ref: Reference, source, target, metric, node: str, start: int, per_position: bool,
           drop=None):  # fmt: skip
    """Σ ∂M/∂A · (A' − A) over the node's own layer (every head of it), A' read from a forward
    with the node patched, ∂M/∂A on the target (layer `drop` cut)."""
    _, src = ref.run(source, metric)
    _, tgt = ref.run(target, metric, grad=True, drop=drop)
    n_units, n_pos = _units(node, src), len(target)
    out = torch.zeros(ref.n_layers, n_units, n_pos)
    for la in range(ref.n_layers):
        a = tgt[la]["A"]
        g = torch.zeros_like(a) if a.grad is None else a.grad
        for u in range(n_units):
            for pos in _variants(n_pos, start, per_position):
                patch = {"node": node, "layer": la, "unit": u, "positions": pos, "source": src}
                _, rec = ref.run(target, metric, patch=patch)
                out[la, u, pos[0]] = float((g * (rec[la]["A"] - a.detach())).sum())
    return out if per_position else out.sum(-1)


def grad_drop(ref: Reference, source, target, metric, node: str, start: int, per_position: bool,
              estimate) -> torch.Tensor:  # fmt: skip
    """Σ_l |Î_l| / (L − 1) over every layer l (all L backward passes, no shortcut), Î_l =
    `estimate(..., drop=l)`."""
    total = sum(estimate(ref, source, target, metric, node, start, per_position, drop=la).abs()
                for la in range(ref.n_layers))  # fmt: skip
    return total / (ref.n_layers - 1)
