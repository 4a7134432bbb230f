"""Star Attention (arXiv 2411.17116) over the reference models, written from the spec
(../shared/specs/star-attention.md, kv-shifting.md), for goldens of the served semantics.

  star_encode(model, context, block, anchor)  phase 1: c1 = the first block, encoded causally; every later block i
      as [anchor ; c_i] (anchor = the first `anchor` tokens of c1 at positions 0.., the block at its own
      positions), the anchor's KV dropped afterwards. For KV shifting, a block's first token mixes with the raw
      k/v of the true previous context token at the same layer (the last token of block i-1, as block i-1's own
      encoding computed it: the one-token halo); the anchor's first token has no predecessor.
  star_query(model, enc, query, n_new)  phase 2: the query attends to every block's KV and to itself (exact), its
      first token mixing with the last context token's raw k/v; then greedy decode.

For Attamba (variant "attamba") phase 1 is attamba.star_encode: blocks a multiple of the chunk size, the anchor's
boundaries as compressed keys, each block starting from the carry (ring of the last L k/v and the SSM state of a
straddling chunk) of the block before it; exact=True gives every block all earlier boundaries (global attention).
Phase 2 is the decode path over every block's boundaries and the last block's carry.

Everything runs in float32 on one device; blocks are independent within a layer, so doing them one after another
here gives what N ranks give.
"""
import torch
import torch.nn.functional as F

from . import attamba
from .model import apply_rope, rope_tables


def _attend(attn, q, k, v, mask):
    """q [1, H, T, D], k/v [1, H_kv, S, D], mask [T, S] bool (True = visible)."""
    rep = attn.cfg.n_heads // attn.cfg.n_kv_heads
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.o_proj(o.transpose(1, 2).reshape(1, q.shape[2], -1))


def _layer_qkv(layer, x, positions, k_prev, v_prev):
    attn = layer.self_attn
    cfg = attn.cfg
    q, k, v, k_raw, v_raw = attn.project(layer.input_layernorm(x), k_prev, v_prev)
    cos, sin = rope_tables(cfg.head_dim, positions, cfg.rope_theta, x.device)
    q = apply_rope(q.transpose(1, 2), cos, sin)
    k = apply_rope(k.transpose(1, 2), cos, sin)
    return q, k, v.transpose(1, 2), k_raw, v_raw


def _finish(layer, x, a):
    x = x + a
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _logits(model, x):
    x = model.norm(x)
    w = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    return F.linear(x, w).float()


@torch.no_grad()
def star_encode(model, context, block, anchor=None, exact=False):
    """context: list of ids. exact (attamba only): every block sees all earlier context (exact mode). Returns dict(k, v: per layer [1, H_kv, n_ctx, D]; k_raw_last, v_raw_last: per layer
    [1, 1, H_kv, D] of the last context token; logits [n_ctx, V]: each context position's next-token logits from
    its block's phase-1 encoding); for attamba see attamba.star_encode."""
    if model.cfg.variant == "attamba":
        return attamba.star_encode(model, context, block, anchor, exact)
    if exact:
        raise ValueError("exact mode is implemented here for attamba only")
    anchor = block if anchor is None else anchor
    assert 0 < anchor <= block
    n = len(context)
    starts = list(range(0, n, block))
    ids = torch.tensor([context])
    xs = [model.embed_tokens(ids[:, s:s + block]) for s in starts]
    pos = [torch.arange(s, min(s + block, n)) for s in starts]
    a_len = min(anchor, n)
    a_pos = torch.arange(a_len)
    ks, vs, kr_last, vr_last = [], [], [], []
    for layer in model.layers:
        new_x, k_parts, v_parts, raws = [], [], [], []
        # c1 first: its own causal encoding; its first a_len tokens are the anchor every later block sees.
        q0, k0, v0, kr0, vr0 = _layer_qkv(layer, xs[0], pos[0], None, None)
        T0 = xs[0].shape[1]
        a0 = _attend(layer.self_attn, q0, k0, v0, torch.ones(T0, T0, dtype=torch.bool).tril())
        new_x.append(_finish(layer, xs[0], a0))
        k_parts.append(k0)
        v_parts.append(v0)
        raws.append((kr0, vr0))
        ka, va = k0[:, :, :a_len], v0[:, :, :a_len]
        for i in range(1, len(starts)):
            kp, vp = raws[i - 1][0][:, -1:], raws[i - 1][1][:, -1:]  # the halo: the true previous token's raw k/v
            q, k, v, kr, vr = _layer_qkv(layer, xs[i], pos[i], kp, vp)
            T = xs[i].shape[1]
            mask = torch.cat([torch.ones(T, a_len, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)
            a = _attend(layer.self_attn, q, torch.cat([ka, k], 2), torch.cat([va, v], 2), mask)
            new_x.append(_finish(layer, xs[i], a))
            k_parts.append(k)
            v_parts.append(v)
            raws.append((kr, vr))
        xs = new_x
        ks.append(torch.cat(k_parts, 2))
        vs.append(torch.cat(v_parts, 2))
        kr_last.append(raws[-1][0][:, -1:])
        vr_last.append(raws[-1][1][:, -1:])
    logits = torch.cat([_logits(model, x)[0] for x in xs], 0)
    return dict(k=ks, v=vs, k_raw_last=kr_last, v_raw_last=vr_last, logits=logits, n=n)


@torch.no_grad()
def star_query(model, enc, query, n_new=0):
    """Phase 2 from star_encode's state: returns (query logits [len(query), V], greedy ids, margins)."""
    if "caches" in enc:
        caches = [attamba.copy_cache(c) for c in enc["caches"]]
    else:
        caches = [dict(k=enc["k"][i], v=enc["v"][i], k_raw_last=enc["k_raw_last"][i],
                       v_raw_last=enc["v_raw_last"][i]) for i in range(len(model.layers))]
    n = enc["n"]
    q_logits = model.forward(torch.tensor([query]), positions=torch.arange(n, n + len(query)), caches=caches)[0]
    out, margins = [], []
    last = q_logits[-1]
    pos = n + len(query)
    for _ in range(n_new):
        top = torch.topk(last, 2).values
        margins.append(float(top[0] - top[1]))
        t = int(torch.argmax(last))
        out.append(t)
        last = model.forward(torch.tensor([[t]]), positions=torch.tensor([pos]), caches=caches)[0, -1]
        pos += 1
    return q_logits, out, margins


def token_logprobs(logits, ids):
    """logprob of ids[t + 1] under logits[t], for t = 0 .. len(ids) - 2 (float64)."""
    lp = torch.log_softmax(logits.double(), -1)
    idx = torch.tensor(ids[1:])
    return lp[torch.arange(len(ids) - 1), idx].tolist()
