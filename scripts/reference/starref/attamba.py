"""Attamba (arXiv 2411.17685): attention over SSM-compressed chunks, with the semantics docs/specs/attamba.md fixes
("What starserve fixes"), in plain PyTorch. model.py builds it as variant "attamba".

Notation: layer l of n_layers, chunk size P, leading tokens L, positions t from 0.
  off_l = min(P-1, l * (P // n_layers))          (0 for every layer when attamba_cyclic_offsets is false)
  chunk id of position p = (p + off_l) // P;  phase = (p + off_l) % P;  a chunk starts at phase 0
  boundaries B_l = {p : phase == P-1} U {0}      (position 0 is a boundary for visibility only)

The layer (pre-norm h = attn_norm(x)):
  q = W_q h;  k = SSM_k(h) + h;  v = SSM_v(h) + h;  RoPE on q and k at the token's position, after the residual.
  Query t sees key j iff  t-L <= j <= t  (the band, L+1 keys)  or  (j in B_l and j < t-L)  (the compressed keys).
Each SSM is Mamba-2's SSD (in_proj -> z | xBC | dt; depthwise causal conv1d of width W over xBC, SiLU; x, B, C;
dt = softplus(dt + dt_bias); A = -exp(A_log); S_t = exp(dt_t A) S_{t-1} + dt_t x_t (x) B_t; y_t = S_t C_t + D x_t;
gated RMSNorm of y * silu(z); out_proj), and it is chunk-local: the conv window and S restart from zero at every
chunk start, so a position's k/v depend only on the h of its own chunk up to itself.

Two forms of every computation, which the tests hold equal:
  dense oracle  AttambaAttention.forward(h, positions) with cache=None: the whole sequence, the SSM in its per-chunk
                quadratic (parallel) form after padding the front by the first token's phase so that chunks align
                with rows of P, then one softmax under the explicit [T, T] boolean mask. Used for training.
  decode path   the same call with a cache dict: per layer only boundary k/v are stored (append-only, position
                order), plus the carry (float32): for k_ssm and v_ssm the conv tail (the W-1 last xBC inputs of the
                current chunk, zeros before its start) and S [B, H, Pd, N], and a ring of the last L tokens' k
                (after RoPE) and v. Attention = LSE merge of the band partial (ring + new tokens, t-L <= j <= t) and
                the compressed partial (stored + new boundaries, j < t-L): disjoint key sets, so the merge is exact.
                A one-token call runs the SSM as its sequential recurrence (ssd_scan); a longer one (chunked prefill)
                runs the parallel form started from the carry.

Star Attention (star_encode): blocks are a multiple of P. Block c1 is encoded alone. Block i > 0 is encoded as
[anchor ; c_i] where the anchor is c1's first `anchor` tokens at their true positions (a prefix of c1, so its k/v
are c1's). The anchor takes part through the attention rule at its true positions: its boundaries j < t-L are
compressed keys of the block's queries; its other tokens are not keys (the Attamba mask hides them from every query
t >= block). The block starts from the carry (ring + SSM state of a straddling chunk) of the block holding the
token before it, per layer (the halo); the ring provides the band only, so the previous block's boundaries are not
seen in phase 1 except those of the anchor. Exact mode gives every block all earlier blocks' boundaries instead of
the anchor's, which is global attention. Phase 2 (star.star_query) is the decode path over a cache that holds every
block's own boundaries (the anchor's are not counted twice) and the last block's carry. Splitting those
boundaries by the rank that stores them and merging the partials by LSE gives the same result (disjoint keys).

Choices where the spec leaves room (docs/specs/attamba.md is not changed by them):
  - The spec's overview says "RoPE on K only"; its "What starserve fixes" section says RoPE on q and k, which is
    what is done here (rotating k alone would make the scores depend on absolute positions).
  - The carry's S and conv tail are those after the last token processed; a call that starts at a chunk start
    ignores them (the chunk restarts from zero), so no explicit reset is needed after a boundary.
  - Every block (not only a rank's first) starts from the carry of the block before it: with N ranks the carry
    crosses a rank boundary only at a rank's first block, so N ranks equal one process with the same blocks.
  - The gated RMSNorm normalises over the whole d_inner (the spec), not per group as Mamba-2 does for G > 1.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import RMSNorm, apply_rope, rope_tables


def layer_offset(cfg, layer):
    """off_l of the spec: the cyclic shift of layer `layer`'s chunk grid."""
    P = cfg.attamba_chunk
    if not cfg.attamba_cyclic_offsets:
        return 0
    return min(P - 1, layer * (P // cfg.n_layers))


def chunk_phase(positions, P, off):
    """(p + off) mod P: 0 at a chunk start, P-1 at a chunk's last position."""
    return (positions + off) % P


def boundary_flags(positions, P, off):
    """True where a position is a boundary of the layer (a chunk's last position, or position 0)."""
    return (chunk_phase(positions, P, off) == P - 1) | (positions == 0)


def dense_mask(positions, P, off, L):
    """[T, T] bool (True = visible) of the Attamba mask for contiguous positions (query rows, key columns)."""
    t = positions[:, None]
    j = positions[None, :]
    band = (j >= t - L) & (j <= t)
    comp = boundary_flags(positions, P, off)[None, :] & (j < t - L)
    return band | comp


def partial_attention(q, k, v, mask):
    """One partial of the LSE contract, float32: q [B, H, T, D], k/v [B, H, S, D], mask [T, S] (True = visible).
    Returns o [B, H, T, D] normalised over the visible keys (0 where none) and lse [B, H, T, 1] (-inf where none)."""
    q, k, v = q.float(), k.float(), v.float()
    if k.shape[2] == 0:
        return torch.zeros_like(q[..., :v.shape[-1]]), torch.full_like(q[..., :1], float("-inf"))
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    o = (p @ v) / den.clamp_min(torch.finfo(torch.float32).tiny)
    lse = torch.where(den > 0, m + torch.log(den), torch.full_like(den, float("-inf")))
    return o, lse


def merge_partials(parts):
    """LSE merge of partials (o, lse) over disjoint key sets (float32, safe when a partial has no keys)."""
    M = torch.stack([lse for _, lse in parts]).amax(0)
    M = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    num, den = 0.0, 0.0
    for o, lse in parts:
        e = torch.exp(lse - M)
        num = num + e * o
        den = den + e
    return num / den.clamp_min(torch.finfo(torch.float32).tiny)


class SSD(nn.Module):
    """One Mamba-2 SSD, chunk-local (docs/specs/attamba.md). Tensor names are the export's."""

    def __init__(self, cfg):
        super().__init__()
        self.P = cfg.attamba_chunk
        self.d_inner, self.N, self.H, self.G, self.W = (cfg.ssm_d_inner, cfg.ssm_d_state, cfg.ssm_heads,
                                                        cfg.ssm_groups, cfg.ssm_conv)
        self.Pd = self.d_inner // self.H
        self.conv_dim = self.d_inner + 2 * self.G * self.N
        self.in_proj = nn.Linear(cfg.d_model, 2 * self.d_inner + 2 * self.G * self.N + self.H, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.W, groups=self.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.zeros(self.H))
        self.A_log = nn.Parameter(torch.zeros(self.H))
        self.D = nn.Parameter(torch.ones(self.H))
        self.norm = RMSNorm(self.d_inner, cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)

    def reset_ssm(self, g, dt_min=1e-3, dt_max=1e-1):
        """Mamba-2's init of the small tensors: dt ~ log-uniform [dt_min, dt_max] stored as its inverse softplus in
        dt_bias, A = -U[1, 16] (A_log = log U[1, 16]), D = 1, conv weight/bias ~ U(-1/sqrt(W), 1/sqrt(W)) (PyTorch's
        default for a depthwise conv of width W), norm weight 1. in_proj/out_proj are set by the model's init."""
        with torch.no_grad():
            u = torch.rand(self.H, generator=g)
            dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp_min(1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.log(1 + 15 * torch.rand(self.H, generator=g)))
            self.D.fill_(1.0)
            bound = 1.0 / math.sqrt(self.W)
            self.conv1d.weight.copy_((torch.rand(self.conv1d.weight.shape, generator=g) * 2 - 1) * bound)
            self.conv1d.bias.copy_((torch.rand(self.conv_dim, generator=g) * 2 - 1) * bound)
            self.norm.weight.fill_(1.0)

    def new_state(self, B, device):
        return dict(conv=torch.zeros(B, self.conv_dim, self.W - 1, device=device),
                    S=torch.zeros(B, self.H, self.Pd, self.N, device=device))

    def _split_in(self, h):
        zxbcdt = self.in_proj(h)
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.H], dim=-1)

    def _heads_BC(self, BC):
        """[..., G*N] -> [..., H, N]: head h reads group h // (H // G)."""
        BC = BC.unflatten(-1, (self.G, self.N))
        return BC.repeat_interleave(self.H // self.G, dim=-2)

    def _out(self, y, z):
        """y [B, T, d_inner] float32, z [B, T, d_inner] -> out_proj(RMSNorm(y * silu(z)) * weight)."""
        g = self.norm(y * F.silu(z.float()))
        return self.out_proj(g.to(self.out_proj.weight.dtype))

    def forward(self, h, p0, off, state=None, need_state=False):
        """The parallel (per-chunk quadratic) form. h [B, T, dim] at positions p0 .. p0+T-1.

        state: the carry {conv [B, conv_dim, W-1], S [B, H, Pd, N]} at the end of position p0-1; used only when p0
        is inside a chunk (phase > 0), else the chunk starts afresh. Returns (out [B, T, dim], new state or None)."""
        B, T, _ = h.shape
        P, W = self.P, self.W
        z, xBC, dt = self._split_in(h)
        front = int(chunk_phase(torch.tensor(p0), P, off))
        Tp = -(-(front + T) // P) * P
        back = Tp - front - T
        use_state = state is not None and front > 0
        with torch.autocast(h.device.type, enabled=False):
            xBC = xBC.float()
            # Front padding: the current chunk's inputs before p0 that the conv window can see (the carry's tail,
            # zeros before the chunk start); back padding up to a whole chunk.
            pad = torch.zeros(B, front, self.conv_dim, device=h.device)
            if use_state and front > 0:
                k = min(front, W - 1)
                pad[:, front - k:] = state["conv"][:, :, W - 1 - k:].transpose(1, 2).float()
            xp = torch.cat([pad, xBC, torch.zeros(B, back, self.conv_dim, device=h.device)], 1)
            nc = Tp // P
            # Depthwise causal conv inside each chunk: zero left padding of W-1 per chunk row.
            rows = xp.view(B * nc, P, self.conv_dim).transpose(1, 2)
            conv = F.conv1d(F.pad(rows, (W - 1, 0)), self.conv1d.weight.float(), self.conv1d.bias.float(),
                            groups=self.conv_dim)
            xc = F.silu(conv).transpose(1, 2).reshape(B, nc, P, self.conv_dim)
            x, Bm, Cm = torch.split(xc, [self.d_inner, self.G * self.N, self.G * self.N], -1)
            x = x.unflatten(-1, (self.H, self.Pd))               # [B, nc, P, H, Pd]
            Bh, Ch = self._heads_BC(Bm), self._heads_BC(Cm)      # [B, nc, P, H, N]
            valid = torch.zeros(Tp, device=h.device)
            valid[front:front + T] = 1.0
            dtp = torch.cat([torch.zeros(B, front, self.H, device=h.device), dt.float(),
                             torch.zeros(B, back, self.H, device=h.device)], 1)
            # Padding positions get dt = 0: no decay, no input, so they leave S alone.
            dtp = F.softplus(dtp + self.dt_bias.float()) * valid[None, :, None]
            dtp = dtp.view(B, nc, P, self.H)
            A = -torch.exp(self.A_log.float())
            cum = torch.cumsum(dtp * A, dim=2)                    # [B, nc, P, H]
            seg = cum[:, :, :, None, :] - cum[:, :, None, :, :]   # [B, nc, t, s, H]
            causal = torch.ones(P, P, dtype=torch.bool, device=h.device).tril()
            decay = torch.exp(seg.masked_fill(~causal[None, None, :, :, None], float("-inf")))
            CB = torch.einsum("bcthn,bcshn->bctsh", Ch, Bh)
            y = torch.einsum("bctsh,bcsh,bcshp->bcthp", decay * CB, dtp, x)
            S0 = None
            if use_state:
                S0 = state["S"].float()
                y0 = torch.einsum("bhpn,bthn->bthp", S0, Ch[:, 0]) * torch.exp(cum[:, 0])[..., None]
                y = torch.cat([(y[:, 0] + y0)[:, None], y[:, 1:]], 1)
            y = y + self.D.float()[:, None] * x
            y = y.reshape(B, Tp, self.d_inner)[:, front:front + T]
            new_state = None
            if need_state:
                last = cum[:, -1, -1]                             # [B, H]: cum at the chunk's last row
                w = torch.exp(last[:, None, :] - cum[:, -1]) * dtp[:, -1]   # [B, P, H]
                S = torch.einsum("bsh,bshp,bshn->bhpn", w, x[:, -1], Bh[:, -1])
                if S0 is not None and nc == 1:
                    S = S + torch.exp(last)[:, :, None, None] * S0
                # Conv tail: the last chunk's inputs up to the last real token, zeros before the chunk start.
                e = Tp - back
                chunk_in = xp[:, Tp - P:e]
                chunk_in = torch.cat([torch.zeros(B, W - 1, self.conv_dim, device=h.device), chunk_in], 1)
                new_state = dict(conv=chunk_in[:, -(W - 1):].transpose(1, 2).contiguous(), S=S)
        return self._out(y, z), new_state

    def scan(self, h, p0, off, state=None):
        """The sequential recurrence, one position at a time (what a decode step does). Same contract as forward;
        always returns the new state."""
        B, T, _ = h.shape
        W = self.W
        z, xBC, dt = self._split_in(h)
        st = self.new_state(B, h.device) if state is None else state
        tail, S = st["conv"].float(), st["S"].float()
        A = -torch.exp(self.A_log.float())
        wconv = self.conv1d.weight.float()[:, 0, :]               # [conv_dim, W]; tap W-1 = current input
        ys = []
        for i in range(T):
            if int(chunk_phase(torch.tensor(p0 + i), self.P, off)) == 0:
                tail = torch.zeros_like(tail)
                S = torch.zeros_like(S)
            window = torch.cat([tail, xBC[:, i].float()[:, :, None]], -1)   # [B, conv_dim, W]
            tail = window[:, :, 1:]
            xc = F.silu((window * wconv).sum(-1) + self.conv1d.bias.float())
            x, Bm, Cm = torch.split(xc, [self.d_inner, self.G * self.N, self.G * self.N], -1)
            x = x.unflatten(-1, (self.H, self.Pd))
            Bh, Ch = self._heads_BC(Bm), self._heads_BC(Cm)       # [B, H, N]
            d = F.softplus(dt[:, i].float() + self.dt_bias.float())  # [B, H]
            S = torch.exp(d * A)[:, :, None, None] * S + d[:, :, None, None] * x[..., None] * Bh[:, :, None, :]
            ys.append(torch.einsum("bhpn,bhn->bhp", S, Ch) + self.D.float()[:, None] * x)
        y = torch.stack(ys, 1).reshape(B, T, self.d_inner)
        return self._out(y, z), dict(conv=tail.contiguous(), S=S)


class AttambaAttention(nn.Module):
    """The Attamba attention of layer `layer`: q_proj, k_ssm, v_ssm, o_proj (n_kv_heads = n_heads)."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.off = layer_offset(cfg, layer)
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)
        self.k_ssm = SSD(cfg)
        self.v_ssm = SSD(cfg)

    def reset_ssm(self, g):
        self.k_ssm.reset_ssm(g)
        self.v_ssm.reset_ssm(g)

    def project(self, h, p0, carry=None, scan=False, need_state=False):
        """q, k (both after RoPE) and v as [B, H, T, D] for h [B, T, dim] at positions p0.., and the SSM states."""
        cfg = self.cfg
        B, T, _ = h.shape
        hd = cfg.head_dim
        sk = None if carry is None else carry.get("k_ssm")
        sv = None if carry is None else carry.get("v_ssm")
        if scan:
            dk, sk = self.k_ssm.scan(h, p0, self.off, sk)
            dv, sv = self.v_ssm.scan(h, p0, self.off, sv)
        else:
            dk, sk = self.k_ssm(h, p0, self.off, sk, need_state)
            dv, sv = self.v_ssm(h, p0, self.off, sv, need_state)
        q = self.q_proj(h).view(B, T, cfg.n_heads, hd).transpose(1, 2)
        k = (dk + h).view(B, T, cfg.n_heads, hd).transpose(1, 2)
        v = (dv + h).view(B, T, cfg.n_heads, hd).transpose(1, 2)
        positions = torch.arange(p0, p0 + T, device=h.device)
        cos, sin = rope_tables(hd, positions, cfg.rope_theta, h.device)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, sk, sv

    def forward(self, h, positions, cache=None):
        """h [B, T, dim] (already normed) at contiguous positions [T]. cache None: the dense oracle. Otherwise the
        decode path; cache (a dict, see new_cache) is updated in place."""
        cfg = self.cfg
        B, T, _ = h.shape
        p0 = int(positions[0])
        if T > 1 and not torch.equal(positions, torch.arange(p0, p0 + T, device=positions.device)):
            raise ValueError("attamba needs contiguous positions")
        positions = torch.arange(p0, p0 + T, device=h.device)
        P, L = cfg.attamba_chunk, cfg.attamba_leading
        if cache is None:
            q, k, v, _, _ = self.project(h, p0)
            mask = dense_mask(positions, P, self.off, L)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        if "n" in cache and cache["n"] != p0:
            raise ValueError(f"cache holds positions < {cache['n']}, call at {p0}")
        q, k, v, sk, sv = self.project(h, p0, cache, scan=T == 1, need_state=True)
        hd = cfg.head_dim
        empty = torch.zeros(B, cfg.n_heads, 0, hd, device=h.device)
        ring_k, ring_v = cache.get("ring_k", empty), cache.get("ring_v", empty)
        kb, vb = cache.get("kb", empty), cache.get("vb", empty)
        bpos = cache.get("bpos", torch.zeros(0, dtype=torch.long, device=h.device))
        # Band partial: the ring (positions p0-r .. p0-1) and the new tokens, t-L <= j <= t.
        r = ring_k.shape[2]
        band_k = torch.cat([ring_k.to(k.dtype), k], 2)
        band_v = torch.cat([ring_v.to(v.dtype), v], 2)
        band_pos = torch.arange(p0 - r, p0 + T, device=h.device)
        t = positions[:, None]
        band = partial_attention(q, band_k, band_v, (band_pos[None] >= t - L) & (band_pos[None] <= t))
        # Compressed partial: the stored boundaries and the new ones, j < t-L.
        isb = boundary_flags(positions, P, self.off)
        comp_k = torch.cat([kb.to(k.dtype), k[:, :, isb]], 2)
        comp_v = torch.cat([vb.to(v.dtype), v[:, :, isb]], 2)
        comp_pos = torch.cat([bpos, positions[isb]])
        comp = partial_attention(q, comp_k, comp_v, comp_pos[None] < t - L)
        o = merge_partials([band, comp]).to(q.dtype)
        cache.update(n=p0 + T, kb=comp_k, vb=comp_v, bpos=comp_pos, k_ssm=sk, v_ssm=sv,
                     ring_k=band_k[:, :, band_k.shape[2] - min(L, band_k.shape[2]):].float(),
                     ring_v=band_v[:, :, band_v.shape[2] - min(L, band_v.shape[2]):].float())
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


def copy_cache(cache):
    """A cache another call may extend without changing this one (the tensors are replaced, never written)."""
    return dict(cache)


@torch.no_grad()
def star_encode(model, context, block, anchor=None, exact=False):
    """Phase 1 of Star Attention for an Attamba model (see the module docstring). context: list of ids.

    Returns dict(caches: per layer the decode cache phase 2 starts from (every block's own boundaries, the last
    block's carry), logits [n_ctx, V]: each context position's next-token logits from its block's encoding, n)."""
    from .star import _finish, _logits

    cfg = model.cfg
    P = cfg.attamba_chunk
    if block % P:
        raise ValueError(f"star block {block} is not a multiple of the chunk size {P}")
    anchor = block if anchor is None else anchor
    assert 0 < anchor <= block
    n = len(context)
    starts = list(range(0, n, block))
    ids = torch.tensor([context])
    xs = [model.embed_tokens(ids[:, s:s + block]) for s in starts]
    a_len = min(anchor, n)
    caches = []
    for layer in model.layers:
        attn = layer.self_attn
        new_x, own = [], []
        carry = {}
        for i, s in enumerate(starts):
            cache = dict(carry)
            if i > 0:
                # The compressed keys this block sees besides its own: the anchor's boundaries (c1's, positions
                # < a_len), or in exact mode every earlier block's.
                kb = torch.cat([o["kb"] for o in own], 2)
                vb = torch.cat([o["vb"] for o in own], 2)
                bpos = torch.cat([o["bpos"] for o in own])
                if not exact:
                    keep = bpos < a_len
                    kb, vb, bpos = kb[:, :, keep], vb[:, :, keep], bpos[keep]
                cache.update(kb=kb, vb=vb, bpos=bpos)
            T = xs[i].shape[1]
            a = attn(layer.input_layernorm(xs[i]), torch.arange(s, s + T), cache)
            new_x.append(_finish(layer, xs[i], a))
            mine = cache["bpos"] >= s
            own.append(dict(kb=cache["kb"][:, :, mine], vb=cache["vb"][:, :, mine], bpos=cache["bpos"][mine]))
            # The carry (ring + SSM states) the next block receives: the halo from the holder of its previous token.
            carry = {key: cache[key] for key in ("ring_k", "ring_v", "k_ssm", "v_ssm", "n")}
        xs = new_x
        caches.append(dict(carry, kb=torch.cat([o["kb"] for o in own], 2), vb=torch.cat([o["vb"] for o in own], 2),
                           bpos=torch.cat([o["bpos"] for o in own])))
    logits = torch.cat([_logits(model, x)[0] for x in xs], 0)
    return dict(caches=caches, logits=logits, n=n)
