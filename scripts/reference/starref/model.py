"""Reference decoder models written from the seed papers' equations, in plain PyTorch.

One configuration class covers the Llama-style baseline and its variants; a variant changes one piece of the
block and nothing else, so that a comparison between two trained models is a comparison of that piece.

  variant "llama"    pre-norm RMSNorm block, grouped-query attention with RoPE (rotate-half pairing, as HF
                     Llama stores q/k), SwiGLU MLP, optional tied embeddings.
  variant "kvshift"  KV-shifting attention (arXiv 2411.19574): after the K and V projections and before RoPE,
                         k^_t = a[:, 1] * k_t + a[:, 0] * k_{t-1},   v^_t = b[:, 1] * v_t + b[:, 0] * v_{t-1}
                     with a, b learned per layer and KV head, shape [n_kv_heads, 2] (column 0 weighs the previous
                     token, column 1 the current one), k_{-1} = v_{-1} = 0 at the sequence start. RoPE rotates k^_t
                     with the token's own position t. Init: a[:, 1], b[:, 1] ~ U(0, 1), a[:, 0] = 1 - a[:, 1],
                     b[:, 0] = 1 - b[:, 1].
  variant "attamba"  Attamba (arXiv 2411.17685, docs/specs/attamba.md): the K and V projections replaced by
                     chunk-local Mamba-2 SSMs with a residual (k = SSM_k(h) + h, v = SSM_v(h) + h, n_kv_heads =
                     n_heads), attention over the band of the last L tokens and the chunks' boundary tokens
                     (attamba.py). Settings: attamba_chunk (P), attamba_leading (L), attamba_cyclic_offsets,
                     ssm_d_inner, ssm_d_state (N), ssm_heads (H), ssm_groups (G), ssm_conv (W).

Every model runs two ways: forward() over a whole sequence (training, prefill), and step() one token at a time
with a cache (decode). For kvshift the decode cache keeps, per layer, the raw (pre-mix, pre-RoPE) k and v of the
last token, which is what the next token's mix needs; prefill_equals_decode() in tests checks the two agree.
For attamba the cache holds only the boundary tokens' k/v and the carry (attamba.py).
"""
from dataclasses import asdict, dataclass, field
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("llama", "kvshift", "attamba")


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 704
    max_position: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    variant: str = "llama"
    init_std: float = 0.02
    extra: dict = field(default_factory=dict)
    # attamba only (ignored by the other variants)
    attamba_chunk: int = 4
    attamba_leading: int = 32
    attamba_cyclic_offsets: bool = True
    ssm_d_inner: int = 128
    ssm_d_state: int = 64
    ssm_heads: int = 4
    ssm_groups: int = 1
    ssm_conv: int = 4

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    def validate(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r}: expected one of {VARIANTS}")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError("d_model must divide by n_heads and n_heads by n_kv_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        if self.variant == "attamba":
            if self.n_kv_heads != self.n_heads:
                raise ValueError("attamba: n_kv_heads must equal n_heads (k and v have the model's width)")
            if self.attamba_chunk < 1 or self.attamba_leading < 0 or self.ssm_conv < 2:
                raise ValueError("attamba: chunk size >= 1, leading tokens >= 0, conv width >= 2")
            if self.ssm_d_inner % self.ssm_heads or self.ssm_heads % self.ssm_groups:
                raise ValueError("attamba: ssm_d_inner must divide by ssm_heads and ssm_heads by ssm_groups")
        return self

    def to_dict(self):
        return asdict(self)

    @staticmethod
    def from_dict(d):
        return ModelConfig(**d).validate()


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(head_dim, positions, theta, device):
    """cos/sin of shape [T, head_dim] for rotate-half RoPE (frequency i pairs dims i and i + head_dim/2)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x, cos, sin):
    """x: [B, H, T, D]; cos/sin: [T, D]."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


def kv_shift(cur, prev, w):
    """cur, prev: [B, T, H_kv, D]; w: [H_kv, 2] (column 0 previous, column 1 current)."""
    w = w.to(cur.dtype)
    return cur * w[None, None, :, 1, None] + prev * w[None, None, :, 0, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)
        if cfg.variant == "kvshift":
            self.k_shift = nn.Parameter(torch.zeros(cfg.n_kv_heads, 2))
            self.v_shift = nn.Parameter(torch.zeros(cfg.n_kv_heads, 2))

    def reset_shift(self, generator=None):
        if self.cfg.variant != "kvshift":
            return
        with torch.no_grad():
            for p in (self.k_shift, self.v_shift):
                cur = torch.rand(p.shape[0], generator=generator)
                p[:, 1] = cur
                p[:, 0] = 1.0 - cur

    def project(self, x, k_prev=None, v_prev=None):
        """q, raw k, raw v of x [B, T, d]; k/v mixed with their predecessors for kvshift.

        k_prev / v_prev: [B, 1, H_kv, D] raw k/v of the token before x[:, 0] (zeros when None)."""
        cfg = self.cfg
        B, T, _ = x.shape
        hd = cfg.head_dim
        q = self.q_proj(x).view(B, T, cfg.n_heads, hd)
        k_raw = self.k_proj(x).view(B, T, cfg.n_kv_heads, hd)
        v_raw = self.v_proj(x).view(B, T, cfg.n_kv_heads, hd)
        k, v = k_raw, v_raw
        if cfg.variant == "kvshift":
            zeros = torch.zeros_like(k_raw[:, :1])
            kp = torch.cat([zeros if k_prev is None else k_prev, k_raw[:, :-1]], dim=1)
            vp = torch.cat([zeros if v_prev is None else v_prev, v_raw[:, :-1]], dim=1)
            k = kv_shift(k_raw, kp, self.k_shift)
            v = kv_shift(v_raw, vp, self.v_shift)
        return q, k, v, k_raw, v_raw

    def forward(self, x, positions, cache=None):
        """x: [B, T, d]; positions: [T]. cache: dict with 'k', 'v' ([B, H_kv, S, D], RoPE applied) and, for kvshift,
        'k_raw_last', 'v_raw_last'; updated in place when given."""
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v, k_raw, v_raw = self.project(
            x, None if cache is None else cache.get("k_raw_last"), None if cache is None else cache.get("v_raw_last"))
        cos, sin = rope_tables(cfg.head_dim, positions, cfg.rope_theta, x.device)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        causal = True
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
                causal = T > 1
            cache["k"], cache["v"] = k, v
            cache["k_raw_last"], cache["v_raw_last"] = k_raw[:, -1:], v_raw[:, -1:]
        rep = cfg.n_heads // cfg.n_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        S = k.shape[2]
        if causal and S != T:
            # A chunk after cached tokens: query i sees keys 0 .. S - T + i.
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer=0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.variant == "attamba":
            from .attamba import AttambaAttention
            self.self_attn = AttambaAttention(cfg, layer)
        else:
            self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, positions, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig, seed=0):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters(seed)

    def reset_parameters(self, seed):
        g = torch.Generator().manual_seed(seed)
        # Residual output projections scaled by 1/sqrt(2 * n_layers) (GPT-2's rule), everything else N(0, std).
        for name, p in self.named_parameters():
            if p.dim() == 2 and not name.endswith("_shift"):
                std = self.cfg.init_std
                if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                    std /= math.sqrt(2 * self.cfg.n_layers)
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        for layer in self.layers:
            if self.cfg.variant == "attamba":
                layer.self_attn.reset_ssm(g)
            else:
                layer.self_attn.reset_shift(g)

    def forward(self, ids, positions=None, caches=None):
        """ids: [B, T] -> logits [B, T, V] (float32)."""
        T = ids.shape[1]
        if positions is None:
            start = 0
            if caches and "k" in caches[0]:
                start = caches[0]["k"].shape[2]
            elif caches and "n" in caches[0]:
                start = caches[0]["n"]
            positions = torch.arange(start, start + T, device=ids.device)
        x = self.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, None if caches is None else caches[i])
        x = self.norm(x)
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, w).float()

    def new_caches(self):
        return [dict() for _ in self.layers]

    @torch.no_grad()
    def generate(self, ids, n_new):
        """Greedy continuation of ids [1, T] through the decode path (prefill, then one token a step)."""
        caches = self.new_caches()
        logits = self.forward(ids, caches=caches)
        out = []
        for _ in range(n_new):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(nxt))
            logits = self.forward(nxt, caches=caches)
        return out


def n_params(model, exclude_embeddings=False):
    total = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        total -= model.embed_tokens.weight.numel()
    return total
