"""Hand-written references for attribution patching and path patching: full forwards of plain
hooks and autograd, none of the library's caching or batching. Shared by the tiny-model oracle
tests and the architecture matrix."""

from __future__ import annotations

from functools import cache, partial

import torch

from mechinterp.heads import Head, HeadShape


def _z_names(model) -> list[str]:
    return [f"blocks.{la}.attn.hook_z" for la in range(model.cfg.n_layers)]


def run_all(model, ids, hooks=()):
    """The last position's logits of one forward of `ids` under `hooks`."""
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        return model(torch.tensor([ids]))[:, -1]


def grab(model, ids, names) -> dict:
    """The activations at `names` of one forward of `ids`."""
    store = {}

    def keep(x, hook, *, name):
        store[name] = x.detach().clone()

    run_all(model, ids, [(n, partial(keep, name=n)) for n in names])
    return store


def hand_atp(model, source, target, metric, start=0):
    """(z_source − z_target)·∂M/∂z per head over positions ≥ start, by autograd on one full
    forward of the target; also the target's metric."""
    n_layers, n_heads, d_head = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    names = _z_names(model)
    z_src, z_tgt = grab(model, source, names), {}

    def keep(x, hook, *, name):
        z_tgt[name] = x
        return x

    hooks = [("blocks.0.hook_resid_pre", lambda x, hook: x.detach().requires_grad_(True))]
    hooks += [(n, partial(keep, name=n)) for n in names]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        m = metric(model(torch.tensor([target]))[:, -1])[0]
        grads = torch.autograd.grad(m, [z_tgt[n] for n in names])
    out = []
    for n, g in zip(names, grads, strict=True):
        dz = (z_src[n] - z_tgt[n].detach())[0, start:].reshape(-1, n_heads, d_head)
        out.append((dz * g[0, start:].reshape(dz.shape)).sum((0, 2)))
    assert len(out) == n_layers
    return torch.stack(out), float(m.detach())


@cache
def fires(model, name: str) -> bool:
    """Whether hook `name` fires on a forward (some attentions register `hook_rot_q` and never
    call it)."""
    if name not in model.hook_dict:
        return False
    seen = []
    run_all(model, [1, 2], [(name, lambda x, hook: seen.append(1))])
    return bool(seen)


def consumed_point(model, layer: int, receiver_input: str) -> str:
    """Where `layer`'s attention holds a head's query or key as the softmax consumes it: after
    any q/k norm and RoPE (`hook_rot_q` / `hook_rot_k`), where the attention fires those hooks;
    else `hook_q` / `hook_k` (the attentions that do not have no q/k norm); `hook_v` for v.
    Never the point the library writes, so the reference checks where it writes."""
    rot = f"blocks.{layer}.attn.hook_rot_{receiver_input}"
    if receiver_input in ("q", "k") and fires(model, rot):
        return rot
    return f"blocks.{layer}.attn.hook_{receiver_input}"


def pass_one_hooks(model, source, target, senders, start, via_mlps=True) -> list:
    """Hooks of a hand pass 1 on a full forward of the target: the z of the sender (a head, or
    a list patched together) from the source at positions ≥ start, every other head (and
    without `via_mlps` every MLP) frozen at its target value."""
    senders = [senders] if isinstance(senders, Head) else list(senders)
    shape = HeadShape.of(model)
    n_layers = shape.n_layers
    z_names = _z_names(model)
    mlp_names = [f"blocks.{la}.hook_mlp_out" for la in range(n_layers)]
    src_z = grab(model, source, z_names)
    tgt = grab(model, target, z_names + mlp_names)

    def z_hook(x, hook, *, la):
        out = tgt[z_names[la]].clone().view(*x.shape[:2], shape.n_heads, -1)
        src = src_z[z_names[la]].view(*x.shape[:2], shape.n_heads, -1)
        for s in senders:
            if s.layer == la:
                out[:, start:, s.head] = src[:, start:, s.head]
        return out.view(x.shape)

    first = min(s.layer for s in senders)
    hooks = [(z_names[la], partial(z_hook, la=la)) for la in range(first, n_layers)]
    if not via_mlps:
        hooks += [(mlp_names[la], lambda x, hook, la=la: tgt[mlp_names[la]])
                  for la in range(first, n_layers)]  # fmt: skip
    return hooks


def hand_path_patch(model, source, target, sender, receivers, receiver_input, metric, start,
                    via_mlps=True) -> float:  # fmt: skip
    """Two full forwards of the target, hooks only: pass 1 (`pass_one_hooks`; `sender` a head
    or a list patched together) records the receivers' inputs where the attention consumes
    them (`consumed_point`), pass 2 writes them there (a KV group's for k, v)."""
    shape = HeadShape.of(model)
    hooks = pass_one_hooks(model, source, target, sender, start, via_mlps)
    layers = sorted({h.layer for h in receivers})
    points = {la: consumed_point(model, la, receiver_input) for la in layers}
    recorded = {}

    def record(x, hook, *, la):
        recorded[la] = x.detach().clone()

    run_all(model, target, hooks + [(p, partial(record, la=la)) for la, p in points.items()])
    n_units = shape.n_heads if receiver_input == "q" else shape.n_kv_heads

    def write(x, hook, *, la):
        x = x.clone()
        units, src = x.view(*x.shape[:2], n_units, -1), recorded[la].view(*x.shape[:2], n_units, -1)
        for h in receivers:
            if h.layer == la:
                u = h.head if receiver_input == "q" else shape.kv_head(h)
                units[:, :, u] = src[:, :, u]
        return x

    logits = run_all(model, target, [(p, partial(write, la=la)) for la, p in points.items()])
    return float(metric(logits)[0])


def hand_qk_fix(model, source, target, metric, node: str, start: int = 0) -> torch.Tensor:
    """AtP*'s QK fix by brute force, [layer, unit]: Σ ∂M/∂A · (A' − A) over the node's own
    layer, ∂M/∂A by autograd on one full forward of the target (`hook_pattern`), A' that
    layer's pattern in a full forward of the target with the unit's query or key (`node`, at
    positions ≥ start) taken from the source."""
    from mechinterp.interventions.nodes import n_units, node_point

    n_layers, units = model.cfg.n_layers, n_units(model, node)
    points = [node_point(model, la, node) for la in range(n_layers)]
    patterns = [f"blocks.{la}.attn.hook_pattern" for la in range(n_layers)]
    src = grab(model, source, points)
    kept = {}

    def keep(x, hook, *, name):
        kept[name] = x
        return x

    hooks = [("blocks.0.hook_resid_pre", lambda x, hook: x.detach().requires_grad_(True))]
    hooks += [(n, partial(keep, name=n)) for n in patterns]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        m = metric(model(torch.tensor([target]))[:, -1])[0]
        grads = torch.autograd.grad(m, [kept[n] for n in patterns])
    out = torch.zeros(n_layers, units)
    for la in range(n_layers):
        a = kept[patterns[la]].detach()

        def write(x, hook, *, u, la=la):
            x = x.clone()
            x.view(*x.shape[:2], units, -1)[:, start:, u] = src[points[la]].view(
                *x.shape[:2], units, -1)[:, start:, u]  # fmt: skip
            return x

        for u in range(units):
            run_all(model, target, [(points[la], partial(write, u=u)),
                                    (patterns[la], partial(keep, name="patched"))])  # fmt: skip
            got = kept["patched"].detach()
            out[la, u] = float((grads[la] * (got - a)).sum())
    return out
