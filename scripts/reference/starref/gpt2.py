"""GPT-2 and its LayerNorm-free, entropy-guided variants (Jha & Reagen, "Entropy-Guided Attention for Private LLMs",
arXiv 2501.03489; docs/specs/lnfree-gpt2.md), in plain PyTorch.

Notation: layer l of L, head h of H, query row i (its absolute position), context T = n_positions, head width d_h.

  variant "baseline"  GPT-2: learned token and position embeddings, pre-LayerNorm blocks (ln_1, ln_2, ln_f with
                      weight and bias), fused q/k/v projection with biases, GELU (tanh approximation) FFN of width
                      ffn_dim with biases, LM head tied to the token embedding. Logits of head h: q·kᵀ / √d_h.

  variant "lnfree"    "SM + ScFuFFN": every LayerNorm removed (ln_1, ln_2 and ln_f), softmax attention kept, the
                      FFN's activation removed, so the FFN is linear, FFN(x) = (x·W_fc + b_fc)·W_proj + b_proj, one
                      d×d matrix W = W_fc·W_proj and bias b = b_fc·W_proj + b_proj once fused ("FuFFN"; trained as
                      two matrices unless ffn_fused, exported fused). Each block:
                          X_SA  = X_in + MHA(X_in)                       (plain residual, nothing learnable added)
                          X_out = β_l · X_SA + (1/α_l) · FFN(X_SA)       ("Sc": learnable residual scaling)
                      α_l, β_l: one learnable scalar each per layer, α dividing the FFN branch and β scaling the
                      residual (skip) path of the FFN sub-block; initialised to alpha_init, beta_init.
                      With temperature=True ("entropy-guided attention"): a learnable temperature t_l[h, i] per
                      layer, head and query position (shape [H, T], initialised to 1), and the logits of head h at
                      query row i are q_i·kᵀ / (√d_h · t_l[h, i]) — a per-row scale of Q·Kᵀ, applied before the
                      causal mask and the softmax. t is learnt as is (no reparametrisation); the value stored is
                      the divisor.
                      ffn_norm "weight" / "spectral" put weight normalisation (W = g·v/‖v‖, per output row) or
                      spectral normalisation (W/σ(W)) on the FFN's linear layers: the paper's WNormFFN / SNormFFN
                      alternatives to LayerNorm. Its SM + ScFuFFN models, and the ones trained here, use neither;
                      where a model has them, export folds them into the plain weight (the normalised matrix is
                      what is stored).

Entropy regulariser (training only, cfg.entropy_reg): per layer l and head h a learnable threshold θ_l,h
(initialised to theta_init), E_max = log T, tolerance γ·log T (γ = 0.2), weight λ:
    δ = E − θ_l,h · log T;  penalty = δ² where |δ| > γ·log T, else 0;
    L = L_CE + λ · mean_l mean_h Σ penalty.
entropy_reduce "rows" (default): E is the entropy of each query row, the penalty summed over the batch's rows (the
authors' public training loss reduces this way; λ = 1e-5 is calibrated to it). "mean": E is the head's mean over
rows and batch, one penalty per (l, h).

Attention entropy (the statistic starserve reports, specs/entropy.md): per layer and head, the mean over query
rows (and sequences) of −Σ_j a_ij log a_ij in nats, a the softmax of the scaled logits (after the temperature).
attention_entropy() returns it as [L, H].

forward() runs a whole sequence (training, prefill) or a chunk after a cache (decode: new_caches(), then one token
at a time); positions are absolute, so the temperature of a decoded token is t[:, its position].
"""
from dataclasses import asdict, dataclass
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("baseline", "lnfree")
FFN_NORMS = ("none", "weight", "spectral")
ENTROPY_REDUCE = ("rows", "mean")


@dataclass
class GPT2Config:
    vocab_size: int = 8192
    n_positions: int = 128
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    ffn_dim: int = 1024
    variant: str = "baseline"
    ln_eps: float = 1e-5
    init_std: float = 0.02
    # lnfree only
    temperature: bool = False
    ffn_fused: bool = False
    ffn_norm: str = "none"
    alpha_init: float = 1.0
    beta_init: float = 1.0
    # entropy regulariser (training only)
    entropy_reg: bool = False
    entropy_lambda: float = 1e-5
    entropy_gamma: float = 0.2
    theta_init: float = 0.5
    entropy_reduce: str = "rows"

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    def validate(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r}: expected one of {VARIANTS}")
        if self.d_model % self.n_heads:
            raise ValueError("d_model must divide by n_heads")
        if self.ffn_norm not in FFN_NORMS or self.entropy_reduce not in ENTROPY_REDUCE:
            raise ValueError(f"ffn_norm in {FFN_NORMS}, entropy_reduce in {ENTROPY_REDUCE}")
        if self.variant == "baseline" and (self.temperature or self.ffn_fused or self.ffn_norm != "none"):
            raise ValueError("temperature, ffn_fused and ffn_norm belong to the lnfree variant")
        if self.ffn_fused and self.ffn_norm != "none":
            raise ValueError("ffn_norm applies to the two-matrix FFN")
        return self

    def to_dict(self):
        return asdict(self)

    @staticmethod
    def from_dict(d):
        return GPT2Config(**d).validate()


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        if cfg.temperature:
            self.temperature = nn.Parameter(torch.ones(cfg.n_heads, cfg.n_positions))

    def forward(self, x, positions, cache=None, need=None):
        """x [B, T, d], positions [T] (absolute). cache: dict with 'k', 'v' [B, H, S, d_h], extended in place.
        need: None, "entropy" (also return the rows' entropy [B, H, T]) or "probs" (also return a [B, H, T, S])."""
        cfg = self.cfg
        B, T, d = x.shape
        H, hd = cfg.n_heads, cfg.head_dim
        q, k, v = self.c_attn(x).split(d, dim=-1)
        q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        S = k.shape[2]
        key_pos = torch.arange(S, device=x.device)
        mask = key_pos[None, :] <= positions[:, None]                      # [T, S]
        if need is None:
            if cfg.temperature:
                q = (q.float() / self.temperature[:, positions].float()[None, :, :, None]).to(q.dtype)
            if S == T and cache is None:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            extra = None
        else:
            logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(hd)
            if cfg.temperature:
                logits = logits / self.temperature[:, positions].float()[None, :, :, None]
            logits = logits.masked_fill(~mask, float("-inf"))
            logp = torch.log_softmax(logits, dim=-1)
            p = logp.exp()
            o = torch.matmul(p.to(v.dtype), v)
            if need == "entropy":
                extra = -(p * logp.masked_fill(~mask, 0.0)).sum(-1)
            else:
                extra = p
        return self.c_proj(o.transpose(1, 2).reshape(B, T, d)), extra


class MLP(nn.Module):
    """GPT-2's FFN (GELU, tanh approximation) for the baseline; linear (no activation) for lnfree, as two matrices
    or, with ffn_fused, the one d×d matrix c_fused."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        if cfg.ffn_fused:
            self.c_fused = nn.Linear(cfg.d_model, cfg.d_model)
            return
        self.c_fc = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.d_model)
        if cfg.ffn_norm == "weight":
            self.c_fc = nn.utils.parametrizations.weight_norm(self.c_fc)
            self.c_proj = nn.utils.parametrizations.weight_norm(self.c_proj)
        elif cfg.ffn_norm == "spectral":
            self.c_fc = nn.utils.parametrizations.spectral_norm(self.c_fc)
            self.c_proj = nn.utils.parametrizations.spectral_norm(self.c_proj)

    def forward(self, x):
        if self.cfg.ffn_fused:
            return self.c_fused(x)
        h = self.c_fc(x)
        if self.cfg.variant == "baseline":
            h = F.gelu(h, approximate="tanh")
        return self.c_proj(h)

    @torch.no_grad()
    def fused(self):
        """(W [d_in, d_out] in HF Conv1D orientation, b [d]) of the linear FFN, x·W + b; computed in float64.
        Weight or spectral normalisation is folded in (the layers' effective weights are used)."""
        if self.cfg.variant != "lnfree":
            raise ValueError("only the activation-free FFN fuses")
        if self.cfg.ffn_fused:
            return self.c_fused.weight.double().t(), self.c_fused.bias.double()
        w1, b1 = self.c_fc.weight.double(), self.c_fc.bias.double()       # [f, d], [f]
        w2, b2 = self.c_proj.weight.double(), self.c_proj.bias.double()   # [d, f], [d]
        return (w2 @ w1).t(), w2 @ b1 + b2


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        if cfg.variant == "baseline":
            self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
            self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        else:
            self.alpha = nn.Parameter(torch.full((1,), float(cfg.alpha_init)))
            self.beta = nn.Parameter(torch.full((1,), float(cfg.beta_init)))
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, positions, cache=None, need=None):
        if self.cfg.variant == "baseline":
            a, extra = self.attn(self.ln_1(x), positions, cache, need)
            x = x + a
            return x + self.mlp(self.ln_2(x)), extra
        a, extra = self.attn(x, positions, cache, need)
        x = x + a
        return self.beta.to(x.dtype) * x + self.mlp(x) / self.alpha.to(x.dtype), extra


class GPT2LM(nn.Module):
    def __init__(self, cfg: GPT2Config, seed=0):
        super().__init__()
        self.cfg = cfg.validate()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.d_model)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps) if cfg.variant == "baseline" else None
        if cfg.entropy_reg:
            self.reg_theta = nn.Parameter(torch.full((cfg.n_layers, cfg.n_heads), float(cfg.theta_init)))
        self.reset_parameters(seed)

    def reset_parameters(self, seed):
        """GPT-2's initialisation: matrices and embeddings N(0, init_std), the residual output projections
        (attn.c_proj, mlp.c_proj, mlp.c_fused) N(0, init_std / √(2L)), biases 0; LayerNorms, α, β, t, θ keep
        their constructor values."""
        g = torch.Generator().manual_seed(seed)
        std = self.cfg.init_std
        with torch.no_grad():
            for name, mod in self.named_modules():
                if isinstance(mod, nn.Linear):
                    s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("c_proj", "c_fused")) else std
                    w = torch.randn(mod.out_features, mod.in_features, generator=g) * s
                    if hasattr(mod, "parametrizations"):
                        # Weight / spectral normalisation: set the underlying weight through the parametrisation;
                        # spectral norm's power-iteration vectors then converge on the new matrix.
                        mod.weight = w
                        sn = mod.parametrizations.weight[0]
                        if hasattr(sn, "_power_method"):
                            sn._power_method(sn._reshape_weight_to_matrix(mod.parametrizations.weight.original), 100)
                    else:
                        mod.weight.copy_(w)
                    mod.bias.zero_()
            for emb in (self.wte, self.wpe):
                emb.weight.copy_(torch.randn(emb.weight.shape, generator=g) * std)

    def positions_for(self, T, caches, device):
        start = caches[0]["k"].shape[2] if caches and "k" in caches[0] else 0
        if start + T > self.cfg.n_positions:
            raise ValueError(f"{start + T} positions > n_positions {self.cfg.n_positions}")
        return torch.arange(start, start + T, device=device)

    def forward(self, ids, caches=None, need=None):
        """ids [B, T] -> logits [B, T, V] (float32); with need ("entropy" / "probs") also the per-layer list of
        the rows' entropies [B, H, T] / attention probabilities [B, H, T, S]."""
        T = ids.shape[1]
        positions = self.positions_for(T, caches, ids.device)
        x = self.wte(ids) + self.wpe(positions)[None]
        extras = []
        for i, block in enumerate(self.h):
            x, extra = block(x, positions, None if caches is None else caches[i], need)
            extras.append(extra)
        if self.ln_f is not None:
            x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight).float()
        return logits if need is None else (logits, extras)

    def new_caches(self):
        return [dict() for _ in self.h]

    def entropy_loss(self, row_entropy):
        """λ · the entropy regulariser (module docstring) of the rows' entropies, a list of L tensors [B, H, T]."""
        cfg = self.cfg
        return cfg.entropy_lambda * entropy_penalty(torch.stack(row_entropy), self.reg_theta, cfg.n_positions,
                                                    cfg.entropy_gamma, cfg.entropy_reduce)

    @torch.no_grad()
    def generate(self, ids, n_new):
        caches = self.new_caches()
        logits = self.forward(ids, caches=caches)
        out = []
        for _ in range(n_new):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(nxt))
            logits = self.forward(nxt, caches=caches)
        return out


def entropy_penalty(row_entropy, theta, context, gamma, reduce="rows"):
    """The regulariser before λ. row_entropy [L, B, H, T] (nats), theta [L, H]; E_max = log(context).
    reduce "rows": δ per query row, the penalties summed over batch and rows; "mean": δ of the mean over batch and
    rows. Then the mean over heads and over layers."""
    e_max = math.log(context)
    if reduce == "mean":
        e = row_entropy.float().mean(dim=(1, 3))                            # [L, H]
        delta = e - theta * e_max
    else:
        delta = row_entropy.float() - theta[:, None, :, None] * e_max       # [L, B, H, T]
    pen = torch.where(delta.abs() > gamma * e_max, delta.square(), torch.zeros_like(delta))
    if reduce != "mean":
        pen = pen.sum(dim=(1, 3))
    return pen.mean()


@torch.no_grad()
def attention_entropy(model: GPT2LM, ids):
    """Per-layer × per-head mean attention entropy [L, H] (float64) of the batch ids [B, T]: the mean over
    sequences and query rows of −Σ a log a (nats), a from the scaled (temperature-divided) logits."""
    _, rows = model(ids, need="entropy")
    return torch.stack([r.double().mean(dim=(0, 2)) for r in rows])


def entropy_summary(ent, n_rows, overload=0.9, collapse=0.1):
    """A short description of an [L, H] entropy map of causal windows of n_rows tokens: the map itself, its largest
    possible value (uniform attention, the mean over rows i of log(i + 1)), the fraction of heads above overload ×
    that value (entropic overload) and below collapse nats (entropy collapse)."""
    e = torch.as_tensor(ent, dtype=torch.float64)
    e_max = sum(math.log(i + 1) for i in range(n_rows)) / n_rows
    lim = overload * e_max
    return dict(entropy=[[round(float(v), 5) for v in row] for row in e],
                entropy_max=round(e_max, 5), overload_threshold=round(lim, 5),
                overload_fraction=round(float((e > lim).double().mean()), 5),
                collapse_fraction=round(float((e < collapse).double().mean()), 5),
                entropy_mean_per_layer=[round(float(v), 5) for v in e.mean(1)])


def n_params(model, exclude_embeddings=False):
    total = sum(p.numel() for n, p in model.named_parameters() if n != "reg_theta")
    if exclude_embeddings:
        total -= model.wte.weight.numel() + model.wpe.weight.numel()
    return total


# ---- the HF layout (config.json + model.safetensors) ----

SMALL_FP32 = (".alpha", ".beta", ".attn.temperature")


def hf_state_dict(model: GPT2LM, dtype=torch.float32):
    """HF GPT-2 names and Conv1D orientation ([in, out]). Baseline: exactly GPT2LMHeadModel's tensors (the LM head
    tied, not stored). lnfree: no ln_*; mlp.c_fused.weight [d, d] + .bias [d] in place of c_fc / c_proj; alpha, beta
    [1] per layer; attn.temperature [H, n_positions] when the model has it. alpha, beta, temperature in float32."""
    cfg = model.cfg
    out = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.weight}
    for i, b in enumerate(model.h):
        p = f"transformer.h.{i}."
        out[p + "attn.c_attn.weight"] = b.attn.c_attn.weight.t()
        out[p + "attn.c_attn.bias"] = b.attn.c_attn.bias
        out[p + "attn.c_proj.weight"] = b.attn.c_proj.weight.t()
        out[p + "attn.c_proj.bias"] = b.attn.c_proj.bias
        if cfg.variant == "baseline":
            for ln in ("ln_1", "ln_2"):
                out[p + ln + ".weight"] = getattr(b, ln).weight
                out[p + ln + ".bias"] = getattr(b, ln).bias
            out[p + "mlp.c_fc.weight"] = b.mlp.c_fc.weight.t()
            out[p + "mlp.c_fc.bias"] = b.mlp.c_fc.bias
            out[p + "mlp.c_proj.weight"] = b.mlp.c_proj.weight.t()
            out[p + "mlp.c_proj.bias"] = b.mlp.c_proj.bias
        else:
            w, bias = b.mlp.fused()
            out[p + "mlp.c_fused.weight"] = w
            out[p + "mlp.c_fused.bias"] = bias
            out[p + "alpha"] = b.alpha
            out[p + "beta"] = b.beta
            if cfg.temperature:
                out[p + "attn.temperature"] = b.attn.temperature
    if model.ln_f is not None:
        out["transformer.ln_f.weight"] = model.ln_f.weight
        out["transformer.ln_f.bias"] = model.ln_f.bias
    return {k: v.detach().to(torch.float32 if k.endswith(SMALL_FP32) else dtype).contiguous().cpu()
            for k, v in out.items()}


def hf_config(cfg: GPT2Config, eot_id=None, dtype="float32"):
    c = dict(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_ctx=cfg.n_positions, n_embd=cfg.d_model,
             n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn_dim, resid_pdrop=0.0, embd_pdrop=0.0,
             attn_pdrop=0.0, scale_attn_weights=True, tie_word_embeddings=True, use_cache=True,
             bos_token_id=eot_id, eos_token_id=eot_id, torch_dtype=dtype)
    if cfg.variant == "baseline":
        c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], activation_function="gelu_new",
                 layer_norm_epsilon=cfg.ln_eps)
    else:
        c.update(model_type="gpt2_lnfree", architectures=["GPT2LNFreeLMHeadModel"], activation_function="linear",
                 lnfree_ffn="fused", lnfree_residual_scaling=True, lnfree_attn_temperature=cfg.temperature)
    return c


def export_gpt2(model: GPT2LM, tokenizer_json, out_dir, dtype="float32", eot="<|endoftext|>"):
    import json
    import os
    import shutil

    from safetensors.torch import save_file

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    os.makedirs(out_dir, exist_ok=True)
    save_file(hf_state_dict(model, dtypes[dtype]), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    eot_id = None
    if tokenizer_json:
        shutil.copyfile(tokenizer_json, os.path.join(out_dir, "tokenizer.json"))
        with open(tokenizer_json) as f:
            added = json.load(f)["added_tokens"]
        eot_id = next((t["id"] for t in added if t["content"] == eot), None)
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(dict(bos_token=eot, eos_token=eot, add_bos_token=True, add_eos_token=False,
                           model_max_length=model.cfg.n_positions), f, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(model.cfg, eot_id, dtype), f, indent=1)


def load_exported_gpt2(path):
    """A model written by export_gpt2 (any stored dtype) as a float32 GPT2LM; lnfree comes back with the fused FFN."""
    import json
    import os

    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    lnfree = c["model_type"] == "gpt2_lnfree"
    if not lnfree and c["model_type"] != "gpt2":
        raise ValueError(f"{path}: model_type {c['model_type']!r} is not gpt2 / gpt2_lnfree")
    cfg = GPT2Config(vocab_size=c["vocab_size"], n_positions=c["n_positions"], d_model=c["n_embd"],
                     n_layers=c["n_layer"], n_heads=c["n_head"], ffn_dim=c.get("n_inner") or 4 * c["n_embd"],
                     variant="lnfree" if lnfree else "baseline", ln_eps=c.get("layer_norm_epsilon", 1e-5),
                     temperature=bool(c.get("lnfree_attn_temperature")), ffn_fused=lnfree).validate()
    model = GPT2LM(cfg)
    t = {k: v.float() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    state = {"wte.weight": t.pop("transformer.wte.weight"), "wpe.weight": t.pop("transformer.wpe.weight")}
    for k, v in t.items():
        name = k[len("transformer."):]
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight", "c_fused.weight")):
            v = v.t()
        state[name] = v
    model.load_state_dict(state)
    return model.eval()
