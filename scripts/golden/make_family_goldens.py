#!/usr/bin/env python3
"""Golden files for the model families beyond Llama (tests/unit/test_families.cpp), made with
Hugging Face transformers + torch on the CPU in fp32 (an implementation independent of our C++).

For each family a tiny random-weight model (2-6 layers, hidden 64, vocabulary 256, token ids only,
no tokenizer) is built with its transformers class and written twice with the same weights:
  tests/golden/<family>/hf/config.json + model.safetensors   (Hugging Face names, F16 matrices)
  tests/golden/<family>/model.gguf                           (llama.cpp names and keys, F16 matrices)
  tests/golden/<family>/golden.json                          logits and greedy continuations
Weights are drawn in fp32, rounded to float16 and put back into the torch model, so the reference
computes with exactly the values both files hold; 1-D tensors (norms, biases) stay fp32.

golden.json: family, hf_class, versions, n_vocab, prompts [{token_ids, last_logits (n_vocab fp32)}],
greedy [{prompt_ids, generated_ids (32), margins (top-1 minus top-2 logit per step)}].
The greedy continuation recomputes the whole sequence every step (use_cache=False), so no cache
implementation is involved; attention is transformers' "eager" path (the one that soft-caps).

gpt2 (GPT2LMHeadModel) has names of its own: the safetensors hold GPT2LMHeadModel's state dict as
transformers saves it (Conv1D weights (in, out)), the GGUF llama.cpp's gpt2 names and keys with those
weights transposed to (out, in) as its converter does (token_embd, position_embd, blk.N.attn_qkv,
..., output_norm; gpt2.attention.layer_norm_epsilon; no output.weight, tied).

Run (about a minute on 2 cores):
    /work/venv-arch/bin/python scripts/golden/make_family_goldens.py [family ...]
Versions used for the committed files are recorded in each golden.json (torch 2.15.0,
transformers 5.24.0, gguf 0.19.0, safetensors 0.8.0, numpy 2.4.6).
"""

import json
import math
import os
import sys

import numpy as np
import torch

import gguf
import safetensors
import safetensors.torch
import transformers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(REPO, "tests", "golden")
N_VOCAB = 256
N_NEW = 32
PROMPT_LENGTHS = (5, 13, 27)
# phi3_longrope's factors (head_dim 16: 8 rotated pairs); the long ones stretch the low frequencies
# (later pairs) the most, as LongRoPE's searched factors do.
LONGROPE_SHORT = [1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.5, 1.7]
LONGROPE_LONG = [1.0, 1.3, 1.8, 2.5, 3.4, 4.6, 6.0, 8.0]


def versions():
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "numpy": np.__version__,
            "gguf": getattr(gguf, "__version__", "0.19.0"), "python": sys.version.split()[0]}


# ---------------------------------------------------------------- the families

def families():
    from transformers import (Gemma2Config, Gemma3TextConfig, GPT2Config, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)
    common = dict(vocab_size=N_VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return {
        # QKV biases, tied embeddings, a large RoPE base.
        "qwen2": dict(cls="Qwen2ForCausalLM", gguf_arch="qwen2",
                      config=Qwen2Config(**common, num_hidden_layers=2, tie_word_embeddings=True,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                         rms_norm_eps=1e-6, max_position_embeddings=512)),
        # Per-head q/k RMSNorm, head_dim 32 != hidden / n_heads, untied output.
        "qwen3": dict(cls="Qwen3ForCausalLM", gguf_arch="qwen3",
                      config=Qwen3Config(**common, num_hidden_layers=2, head_dim=32, tie_word_embeddings=False,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                         rms_norm_eps=1e-6, max_position_embeddings=512)),
        # Sliding window of 8 tokens on every layer (prompts and continuations run past it).
        "mistral": dict(cls="MistralForCausalLM", gguf_arch="llama",
                        config=MistralConfig(**common, num_hidden_layers=3, head_dim=16, sliding_window=8,
                                             tie_word_embeddings=False, rms_norm_eps=1e-5,
                                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                             max_position_embeddings=512)),
        # (1 + w) norms, sandwich norms, GeGLU, sqrt(hidden) embedding scale, attention and final
        # soft-capping set low enough to bite, sliding window 8 on even layers.
        "gemma2": dict(cls="Gemma2ForCausalLM", gguf_arch="gemma2",
                       config=Gemma2Config(**common, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16,
                                           sliding_window=8, attn_logit_softcapping=2.0, final_logit_softcapping=15.0,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                           max_position_embeddings=512)),
        # 5 local : 1 global layers, separate RoPE bases, q/k norms, no soft-capping.
        "gemma3": dict(cls="Gemma3ForCausalLM", gguf_arch="gemma3",
                       config=Gemma3TextConfig(**{**common, "intermediate_size": 64}, num_hidden_layers=6,
                                               head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                               layer_types=["sliding_attention"] * 5 + ["full_attention"],
                                               rope_parameters={
                                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                   "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                                               max_position_embeddings=512)),
        # Fused qkv and gate|up, partial rotary (half of each head), sliding window 12.
        "phi3": dict(cls="Phi3ForCausalLM", gguf_arch="phi3",
                     config=Phi3Config(**common, num_hidden_layers=2, sliding_window=12, tie_word_embeddings=False,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.5},
                                       max_position_embeddings=512, original_max_position_embeddings=512)),
        # LongRoPE: per-pair frequency divisors for contexts up to original_max_position_embeddings
        # (short) and beyond (long), cos/sin times sqrt(1 + ln(128 / 32) / ln(32)). Every prompt is
        # longer than 32 tokens, so transformers uses the long factors throughout, as we do for a
        # model whose context (128) exceeds the original one.
        "phi3_longrope": dict(cls="Phi3ForCausalLM", gguf_arch="phi3", prompt_lengths=(34, 40, 48),
                              config=Phi3Config(**common, num_hidden_layers=2, sliding_window=None,
                                                tie_word_embeddings=False,
                                                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                                 "short_factor": LONGROPE_SHORT,
                                                                 "long_factor": LONGROPE_LONG},
                                                max_position_embeddings=128, original_max_position_embeddings=32)),
        # Learned positions (128 of them, so a prompt past the table is cheap to try), LayerNorm with
        # bias, fused c_attn with bias, GELU (tanh) MLP of the default 4 n_embd, tied output.
        "gpt2": dict(cls="GPT2LMHeadModel", gguf_arch="gpt2",
                     config=GPT2Config(vocab_size=N_VOCAB, n_positions=128, n_embd=64, n_layer=3, n_head=4,
                                       n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                                       pad_token_id=None)),
    }


# ---------------------------------------------------------------- weights

def randomize(model, family, seed):
    """Weights of a useful scale (logits of several units, clear greedy margins), float16-exact."""
    g = torch.Generator().manual_seed(seed)
    gemma = family.startswith("gemma")
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 2:
                # Embedding and output rows of unit scale give logits of several units against a
                # normed hidden state (Gemma's embedding is scaled by sqrt(hidden) on the way in).
                if "embed_tokens" in name:
                    std = 0.3 if gemma else 1.0
                elif "wte" in name:
                    # GPT-2's tied token rows at unit scale make a continuation repeat one token for
                    # ever; smaller ones next to unit-scale position rows (wpe) give continuations that
                    # move, so the decode steps' positions are exercised.
                    std = 0.3
                elif "wpe" in name:
                    std = 1.0
                elif "lm_head" in name:
                    std = 1.0
                elif family == "gpt2":
                    std = 1.0 / math.sqrt(p.shape[0])  # Conv1D: (in, out)
                else:
                    std = 1.0 / math.sqrt(p.shape[1])
                v = torch.randn(p.shape, generator=g) * std
                p.copy_(v.half().float())
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:  # norms: w of x * w, or of x * (1 + w) in Gemma
                base = 0.0 if gemma else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def permute_llama(w, n_head, n_head_kv):
    # llama.cpp's converter order for q/k rows of arch "llama": RoPE pairs adjacent.
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_LEAVES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
}


def gguf_name(hf, family):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    layer, leaf = parts[2], ".".join(parts[3:])
    if family.startswith("gemma"):
        extra = {"post_attention_layernorm.weight": "post_attention_norm.weight",
                 "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                 "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}
    else:
        extra = {"post_attention_layernorm.weight": "ffn_norm.weight"}
    leaves = {**GGUF_LEAVES, **extra}
    return f"blk.{layer}.{leaves[leaf]}"


GPT2_LEAVES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def gpt2_gguf_name(hf):
    top = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
           "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    parts = hf.split(".")  # transformer.h.N.<module...>.<weight|bias>
    layer, module, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
    return f"blk.{layer}.{GPT2_LEAVES[module]}.{kind}"


def write_gguf_gpt2(path, family, cfg, model):
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_name(f"tiny-random-{family}")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    sd = model.state_dict()
    for name in sorted(sd):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = sd[name].float().numpy().copy()
        gname = gpt2_gguf_name(name)
        if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            t = t.T.copy()  # Conv1D (in, out) -> (out, in), as llama.cpp's converter does
        w.add_tensor(gname, t.astype(np.float16) if t.ndim == 2 else t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf(path, family, spec, model):
    cfg = spec["config"]
    if spec["gguf_arch"] == "gpt2":
        return write_gguf_gpt2(path, family, cfg, model)
    arch = spec["gguf_arch"]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-random-{family}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    rp = cfg.rope_parameters
    if family == "gemma3":
        w.add_rope_freq_base(rp["full_attention"]["rope_theta"])  # llama.cpp: 10000 for local layers
    else:
        w.add_rope_freq_base(rp["rope_theta"])
    rope_dim = int(head_dim * rp.get("partial_rotary_factor", 1.0)) if arch == "phi3" else head_dim
    w.add_rope_dimension_count(rope_dim)
    if rp.get("rope_type") == "longrope":
        # llama.cpp's phi3 form: the original context and the attention factor as keys, the factors
        # as the tensors rope_factors_{long,short}.weight (rope_dim / 2 fp32 values each).
        orig = cfg.original_max_position_embeddings
        scale = cfg.max_position_embeddings / orig
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
        w.add_tensor("rope_factors_long.weight", np.array(rp["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rp["short_factor"], dtype=np.float32))
    if getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    if family == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    sd = model.state_dict()
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    for name in sorted(sd):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = sd[name].float().numpy().copy()
        gname = gguf_name(name, family)
        if arch == "llama" and gname.endswith("attn_q.weight"):
            t = permute_llama(t, nh, nh)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            t = permute_llama(t, nh, nkv)
        if family.startswith("gemma") and gname.endswith("norm.weight"):
            t = t + 1.0  # llama.cpp's converter folds Gemma's (1 + w) into the stored weight
        if t.ndim == 2:
            w.add_tensor(gname, t.astype(np.float16))
        else:
            w.add_tensor(gname, t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def save_hf(dir_, model, cfg):
    os.makedirs(dir_, exist_ok=True)
    sd = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        sd[name] = (t.half() if t.ndim == 2 else t.float()).contiguous()
    safetensors.torch.save_file(sd, os.path.join(dir_, "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(dir_)
    gen = os.path.join(dir_, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)


# ---------------------------------------------------------------- reference outputs

def last_logits(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
    return out.float()


def greedy(model, prompt, n_new):
    ids = list(prompt)
    margins = []
    for _ in range(n_new):
        lg = last_logits(model, ids)
        top = torch.topk(lg, 2).values
        margins.append(float(top[0] - top[1]))
        ids.append(int(torch.argmax(lg)))
    return ids[len(prompt):], margins


def f32(x):
    return float(np.float32(x))


# Greedy steps whose top-2 logits are closer than this would let fp32 rounding pick either token;
# a family's seed is the first of base, base + 1, ... whose continuations stay clear of it.
MIN_MARGIN = 0.02


def make(family, spec, base_seed):
    for seed in range(base_seed, base_seed + 50):
        golden = build(family, spec, seed)
        if min(g["min_margin"] for g in golden["greedy"]) >= MIN_MARGIN:
            return
    raise SystemExit(f"{family}: no seed in [{base_seed}, {base_seed + 50}) gives greedy margins >= {MIN_MARGIN}")


def build(family, spec, seed):
    torch.manual_seed(seed)
    cfg = spec["config"]
    cfg._attn_implementation = "eager"
    cls = getattr(transformers, spec["cls"])
    model = cls(cfg).float().eval()
    randomize(model, family, seed)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    out = os.path.join(GOLDEN, family)
    os.makedirs(out, exist_ok=True)
    save_hf(os.path.join(out, "hf"), model, cfg)
    write_gguf(os.path.join(out, "model.gguf"), family, spec, model)

    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(0, N_VOCAB, n)] for n in spec.get("prompt_lengths", PROMPT_LENGTHS)]
    golden = {"family": family, "hf_class": spec["cls"], "gguf_arch": spec["gguf_arch"], "seed": seed,
              "versions": versions(),
              "dtype": "float32", "device": "cpu", "n_vocab": N_VOCAB, "prompts": [], "greedy": []}
    for p in prompts:
        lg = last_logits(model, p)
        golden["prompts"].append({"token_ids": p, "last_logits": [f32(v) for v in lg.tolist()],
                                  "max_abs_logit": f32(lg.abs().max())})
    for p in prompts[1:]:
        gen, margins = greedy(model, p, N_NEW)
        golden["greedy"].append({"prompt_ids": p, "generated_ids": gen, "margins": [f32(m) for m in margins],
                                 "min_margin": f32(min(margins))})
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
    sizes = {n: os.path.getsize(os.path.join(out, n)) for n in ("model.gguf", "golden.json")}
    sizes["hf/model.safetensors"] = os.path.getsize(os.path.join(out, "hf", "model.safetensors"))
    print(family, "seed", seed, sizes, "max |logit|", [p["max_abs_logit"] for p in golden["prompts"]],
          "min margins", [g["min_margin"] for g in golden["greedy"]])
    return golden


def main():
    torch.set_num_threads(2)
    fams = families()
    wanted = sys.argv[1:] or list(fams)
    for i, name in enumerate(fams):
        if name in wanted:
            make(name, fams[name], 1000 + i)


if __name__ == "__main__":
    main()
