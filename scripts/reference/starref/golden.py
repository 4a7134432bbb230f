"""Goldens for starserve from the reference models (float32, CPU):

  python -m starref.golden tiny --out tests/golden/kvshift
      a tiny random-weight KV-shifting model (hf/config.json + hf/model.safetensors, small enough to commit) and
      golden.json: last-position logits and per-token prompt log-probabilities of three prompts, 32-token greedy
      continuations through the decode path, and Star Attention cases (phase-1 context log-probabilities, query
      logits, greedy) with the one-token halo semantics of starref/star.py.
  python -m starref.golden attamba-tiny --out tests/golden/attamba
      a tiny random-weight Attamba model (hf/: config.json, model.safetensors, tokenizer.json) and golden.json
      (build_attamba_tiny says what it holds).
  python -m starref.golden lnfree --out tests/golden/lnfree
      a tiny random-weight LayerNorm-free GPT-2 (SM + ScFuFFN with learnable temperatures; hf/: config.json,
      model.safetensors in the gpt2_lnfree layout) and golden.json (build_lnfree_tiny says what it holds).
  python -m starref.golden trained --models models --corpus CORPUS --out tests/golden/kvshift_6l/golden.json
      the trained models/kvshift-6l and models/llama-6l (made by scripts/device/train_reference.sh, not committed):
      the tokenizer's ids for a few texts, top-64 last logits, prompt log-probabilities, greedy continuations, the
      validation perplexity over the first windows of CORPUS/val.bin, and a star case.

golden.json layout (the family goldens' layout plus the additions):
  prompts[]  {token_ids, last_logits (tiny) | top_logits [[id, logit]...] + logsumexp (trained), prompt_logprobs
              (logprob of token_ids[t+1] after token_ids[..t], t = 0..n-2), max_abs_logit, bf16_max_abs_diff (tiny:
              the largest logit change over the prompt's rows when the same model runs in bfloat16)}
  greedy[]   {prompt_ids, generated_ids, margins, min_margin}
  star[]     {context_ids, query_ids, block, anchor, context_logprobs (over context+query[0], phase 1),
              query_logprobs (query[t+1] after query[..t]), last_logits | top_logits, generated_ids, margins,
              min_margin}
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch

from .data import EOT, TokenFile
from .export import SSM_FP32, export
from .model import DecoderLM, ModelConfig
from .star import star_encode, star_query, token_logprobs


def versions():
    import safetensors
    return {"torch": torch.__version__, "safetensors": safetensors.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0]}


def f32(x):
    return float(np.float32(x))


@torch.no_grad()
def full_logits(model, ids):
    return model(torch.tensor([ids]))[0]


@torch.no_grad()
def greedy(model, prompt, n_new):
    """Greedy continuation through the decode path (prefill, then a token a step), with top-1 minus top-2 margins."""
    caches = model.new_caches()
    last = model(torch.tensor([prompt]), caches=caches)[0, -1]
    out, margins = [], []
    for _ in range(n_new):
        top = torch.topk(last, 2).values
        margins.append(f32(top[0] - top[1]))
        t = int(torch.argmax(last))
        out.append(t)
        last = model(torch.tensor([[t]]), caches=caches)[0, -1]
    return out, margins


def top_logits(lg, k=64):
    v, i = torch.topk(lg, k)
    return [[int(a), f32(b)] for a, b in zip(i.tolist(), v.tolist())]


def prompt_entry(model, ids, full):
    lg = full_logits(model, ids)
    e = {"token_ids": ids}
    if full:
        e["last_logits"] = [f32(v) for v in lg[-1].tolist()]
    else:
        e["top_logits"] = top_logits(lg[-1])
        e["logsumexp"] = float(torch.logsumexp(lg[-1].double(), -1))
    e["prompt_logprobs"] = [f32(v) for v in token_logprobs(lg, ids)]
    e["max_abs_logit"] = f32(lg[-1].abs().max())
    return e


def star_entry(model, context, query, block, anchor, n_new, full):
    enc = star_encode(model, context, block, anchor)
    q_logits, gen, margins = star_query(model, enc, query, n_new)
    ctx_lp = token_logprobs(torch.cat([enc["logits"], q_logits[:1]]), context + query[:1])
    e = {"context_ids": context, "query_ids": query, "block": block, "anchor": anchor,
         "context_logprobs": [f32(v) for v in ctx_lp],
         "query_logprobs": [f32(v) for v in token_logprobs(q_logits, query)]}
    if full:
        e["last_logits"] = [f32(v) for v in q_logits[-1].tolist()]
    else:
        e["top_logits"] = top_logits(q_logits[-1])
    e.update(generated_ids=gen, margins=[f32(m) for m in margins], min_margin=f32(min(margins)) if margins else None)
    return e, enc, q_logits


def bf16_copy(model):
    m = DecoderLM(model.cfg)
    m.load_state_dict(model.state_dict())
    m = m.to(torch.bfloat16).eval()
    for name, p in m.named_parameters():
        if "_ssm." in name and name.endswith(SSM_FP32):
            p.data = p.data.float()  # stored in float32 (export.py)
    for layer in m.layers:
        if hasattr(layer.self_attn, "k_shift"):
            layer.self_attn.k_shift.data = layer.self_attn.k_shift.data.float()
            layer.self_attn.v_shift.data = layer.self_attn.v_shift.data.float()
    return m


def check_star_block_covers_context(model, context, query):
    """A block at least as long as the context is global attention (a self-check of star.py)."""
    enc = star_encode(model, context, len(context))
    q_logits, _, _ = star_query(model, enc, query)
    ref = full_logits(model, context + query)
    torch.testing.assert_close(enc["logits"], ref[:len(context)], rtol=0, atol=1e-4)
    torch.testing.assert_close(q_logits, ref[len(context):], rtol=0, atol=1e-4)


MIN_MARGIN = 0.02


def make_tiny(out, base_seed=7001):
    for seed in range(base_seed, base_seed + 50):
        g = build_tiny(out, seed)
        margins = [x["min_margin"] for x in g["greedy"] + g["star"] if x["min_margin"] is not None]
        if min(margins) >= MIN_MARGIN:
            print("tiny seed", seed, "min margins", margins)
            return
    raise SystemExit("no seed gives greedy margins >= %g" % MIN_MARGIN)


def build_tiny(out, seed):
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128, max_position=512,
                      variant="kvshift", tie_embeddings=False, init_std=0.25).validate()
    model = DecoderLM(cfg, seed=seed).eval()
    # Shift weights away from a convex mix (either column may be negative or above 1) so that errors in which
    # column weighs which token show.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            for p in (layer.self_attn.k_shift, layer.self_attn.v_shift):
                p.copy_(torch.rand(p.shape, generator=g) * 1.6 - 0.3)
    export(model, None, os.path.join(out, "hf"))
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(1, 256, n)] for n in (5, 37, 90)]
    golden = {"model": "tiny kvshift (random weights)", "reference": "scripts/reference/starref (float32, CPU)",
              "seed": seed, "versions": versions(), "dtype": "float32", "device": "cpu", "n_vocab": 256,
              "config": cfg.to_dict(), "prompts": [], "greedy": [], "star": []}
    mb = bf16_copy(model)
    for p in prompts:
        e = prompt_entry(model, p, True)
        # How far the same weights move in bfloat16 (weights and activations rounded to bf16 after every op,
        # the shift weights in fp32), over every row of the prompt: the scale of a bf16 backend's honest error.
        e["bf16_max_abs_diff"] = f32((full_logits(mb, p).float() - full_logits(model, p)).abs().max())
        golden["prompts"].append(e)
    for p in prompts[1:]:
        gen, margins = greedy(model, p, 32)
        golden["greedy"].append({"prompt_ids": p, "generated_ids": gen, "margins": margins,
                                 "min_margin": min(margins)})
    context = [int(t) for t in rng.integers(1, 256, 96)]
    query = [int(t) for t in rng.integers(1, 256, 7)]
    check_star_block_covers_context(model, context, query)
    for block, anchor in ((32, 32), (24, 16), (40, 40), (96, 96)):
        e, _, _ = star_entry(model, context, query, block, anchor, 16, True)
        golden["star"].append(e)
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
    return golden


ATTAMBA_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "tests", "golden",
                                 "tokenizer", "tiny.tokenizer.json")


def g7(x):
    """A float32 value written with 7 significant digits (keeps the golden small; far below any tolerance)."""
    return float(f"{float(x):.7g}")


def make_attamba_tiny(out, base_seed=9001):
    for seed in range(base_seed, base_seed + 50):
        g = build_attamba_tiny(out, seed)
        margins = [x["min_margin"] for x in g["greedy"] + g["star"] if x["min_margin"] is not None]
        if min(margins) >= MIN_MARGIN:
            print("attamba tiny seed", seed, "min margins", margins)
            return
    raise SystemExit("no seed gives greedy margins >= %g" % MIN_MARGIN)


def build_attamba_tiny(out, seed):
    """tests/golden/attamba: a tiny random Attamba model (3 layers, P = 8 with cyclic offsets 0, 2, 4, L = 5) in the
    HF layout (hf/), and golden.json: per prompt the logits of a few rows (row t = next-token logits after
    token_ids[..t]) and every row's prompt log-probability, greedy continuations through the decode path (its
    compressed cache), the boundary positions each layer's cache holds, and Star Attention cases (star and exact
    mode; the reference is one process: N ranks holding the same blocks give the same numbers)."""
    with open(ATTAMBA_TOKENIZER) as f:
        vocab = max(t["id"] for t in json.load(f)["added_tokens"]) + 1
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=3, n_heads=4, n_kv_heads=4, ffn_dim=64, max_position=512,
                      variant="attamba", tie_embeddings=True, init_std=0.25, attamba_chunk=8, attamba_leading=5,
                      attamba_cyclic_offsets=True, ssm_d_inner=16, ssm_d_state=8, ssm_heads=4, ssm_groups=1,
                      ssm_conv=4).validate()
    model = DecoderLM(cfg, seed=seed).eval()
    # The final norm's weight at 5 spreads the logits (tied embeddings of std 0.25 alone give top-2 gaps of a few
    # thousandths, too close for greedy goldens).
    model.norm.weight.fill_(5.0)
    export(model, ATTAMBA_TOKENIZER, os.path.join(out, "hf"))
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(1, vocab, n)] for n in (5, 37, 90)]
    no_ssm = DecoderLM(cfg, seed=seed).eval()
    no_ssm.load_state_dict(model.state_dict())
    for layer in no_ssm.layers:
        layer.self_attn.k_ssm.out_proj.weight.zero_()
        layer.self_attn.v_ssm.out_proj.weight.zero_()
    golden = {"model": "tiny attamba (random weights)", "reference": "scripts/reference/starref (float32, CPU)",
              "seed": seed, "versions": versions(), "dtype": "float32", "device": "cpu", "n_vocab": vocab,
              "config": cfg.to_dict(), "layer_offsets": [layer.self_attn.off for layer in model.layers],
              "prompts": [], "greedy": [], "star": []}
    mb = bf16_copy(model)
    for p in prompts:
        lg = full_logits(model, p)
        rows = sorted({0, 8, 13, len(p) - 1} & set(range(len(p))))
        e = {"token_ids": p, "rows": rows, "row_logits": [[g7(v) for v in lg[r].tolist()] for r in rows],
             "prompt_logprobs": [g7(v) for v in token_logprobs(lg, p)], "max_abs_logit": g7(lg.abs().max()),
             "bf16_max_abs_diff": g7((full_logits(mb, p).float() - lg).abs().max()),
             # How much the SSM path moves the logits (out_proj of both SSMs zeroed): a check that it matters.
             "no_ssm_max_abs_diff": g7((full_logits(no_ssm, p) - lg).abs().max())}
        golden["prompts"].append(e)
    caches = model.new_caches()
    model(torch.tensor([prompts[2]]), caches=caches)
    golden["cache_boundaries"] = {"prompt": 2, "positions": [c["bpos"].tolist() for c in caches]}
    for p in prompts[1:]:
        gen, margins = greedy(model, p, 32)
        golden["greedy"].append({"prompt_ids": p, "generated_ids": gen, "margins": [g7(m) for m in margins],
                                 "min_margin": g7(min(margins))})
    context = [int(t) for t in rng.integers(1, vocab, 96)]
    query = [int(t) for t in rng.integers(1, vocab, 7)]
    check_star_block_covers_context(model, context, query)
    for block, anchor, exact in ((32, 32, False), (24, 16, False), (40, 40, False), (16, 16, False),
                                 (32, 32, True)):
        enc = star_encode(model, context, block, anchor, exact)
        q_logits, gen, margins = star_query(model, enc, query, 16)
        ctx_lp = token_logprobs(torch.cat([enc["logits"], q_logits[:1]]), context + query[:1])
        golden["star"].append({
            "context_ids": context, "query_ids": query, "block": block, "anchor": anchor, "exact": exact,
            "context_logprobs": [g7(v) for v in ctx_lp],
            "query_logprobs": [g7(v) for v in token_logprobs(q_logits, query)],
            "last_logits": [g7(v) for v in q_logits[-1].tolist()], "generated_ids": gen,
            "margins": [g7(m) for m in margins], "min_margin": g7(min(margins))})
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(golden, f, separators=(",", ":"))
    return golden


def make_lnfree_tiny(out, base_seed=4001):
    for seed in range(base_seed, base_seed + 50):
        g = build_lnfree_tiny(out, seed)
        margins = [x["min_margin"] for x in g["greedy"]]
        distinct = [len(set(x["generated_ids"])) for x in g["greedy"]]
        # Continuations that move between tokens (not one token repeated), so that every decode step's position
        # (its embedding row and temperature row) shows.
        # And no head collapsed (entropy >= 0.1 nats everywhere): the entropy map is a comparison, not zeros.
        low = min(v for p in g["prompts"] for row in p["entropy"] for v in row)
        if min(margins) >= MIN_MARGIN and min(distinct) >= 8 and low >= 0.1:
            print("lnfree tiny seed", seed, "min margins", margins, "distinct generated", distinct)
            return
    raise SystemExit("no seed gives greedy margins >= %g, 8 distinct tokens and entropies >= 0.1" % MIN_MARGIN)


def build_lnfree_tiny(out, seed):
    """tests/golden/lnfree: a tiny random LN-free GPT-2 (2 layers, width 64, 4 heads, vocabulary 256, 64 positions,
    learnable temperatures), exported by starref/gpt2.py to hf/ (config.json, model.safetensors; no tokenizer), and
    golden.json, computed from the exported files reloaded (the fused FFN, float32, CPU):
      prompts[]  {token_ids, last_logits (the next-token logits after the whole prompt), prompt_logprobs,
                  entropy [layer][head] (mean over the prompt's query rows of -sum a log a, nats, on the
                  temperature-scaled logits), max_abs_logit, no_temperature_max_abs_diff (the largest change of
                  the prompt's logits when every temperature is 1: the temperatures matter), fp64_max_abs_diff
                  (float32 against float64 over the prompt's logits)}
      greedy[]   {prompt_ids, generated_ids (16, through the decode path), margins (top-1 minus top-2 logit),
                  min_margin}
    Weights N(0, 0.2) (the q and k projections and the position rows 1.5 times that, so that attention is far from
    uniform and positions matter), temperatures
    U(0.3, 2) per head and position, alpha U(0.6, 1.8), beta U(0.7, 1.3) per layer, biases N(0, 0.1)."""
    from .gpt2 import GPT2Config, GPT2LM, export_gpt2, load_exported_gpt2, attention_entropy

    vocab = 256
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, d_model=64, n_layers=2, n_heads=4, ffn_dim=128,
                     variant="lnfree", temperature=True, init_std=0.2).validate()
    src = GPT2LM(cfg, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name.endswith("temperature"):
                p.copy_(0.3 + torch.rand(p.shape, generator=g) * 1.7)
            elif name.endswith("alpha"):
                p.copy_(0.6 + torch.rand(p.shape, generator=g) * 1.2)
            elif name.endswith("beta"):
                p.copy_(0.7 + torch.rand(p.shape, generator=g) * 0.6)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for b in src.h:
            b.attn.c_attn.weight[:2 * cfg.d_model] *= 1.5
        src.wpe.weight *= 1.5
    hf = os.path.join(out, "hf")
    export_gpt2(src, None, hf)
    model = load_exported_gpt2(hf)
    flat = load_exported_gpt2(hf)
    exact = load_exported_gpt2(hf).double()
    with torch.no_grad():
        for b in flat.h:
            b.attn.temperature.fill_(1.0)
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(1, vocab, n)] for n in (5, 23, 40)]
    golden = {"model": "tiny gpt2_lnfree (random weights)", "reference": "scripts/reference/starref/gpt2.py "
              "(float32, CPU, the exported files reloaded)", "seed": seed, "versions": versions(),
              "dtype": "float32", "device": "cpu", "n_vocab": vocab, "config": cfg.to_dict(), "prompts": [],
              "greedy": []}
    for p in prompts:
        ids = torch.tensor([p])
        lg = model(ids)[0]
        # The two-matrix model it was exported from gives the same logits (a self-check of the fused export).
        torch.testing.assert_close(src(ids)[0], lg, rtol=1e-4, atol=1e-3)
        golden["prompts"].append({
            "token_ids": p, "last_logits": [g7(v) for v in lg[-1].tolist()],
            "prompt_logprobs": [g7(v) for v in token_logprobs(lg, p)],
            "entropy": [[g7(v) for v in row] for row in attention_entropy(model, ids).tolist()],
            "max_abs_logit": g7(lg.abs().max()),
            "no_temperature_max_abs_diff": g7((flat(ids)[0] - lg).abs().max()),
            # The same files computed in float64: the scale of float32's honest error on these logits.
            "fp64_max_abs_diff": g7((exact(ids)[0] - lg).abs().max())})
    for p in prompts:
        gen, margins = greedy(model, p, 16)
        golden["greedy"].append({"prompt_ids": p, "generated_ids": gen, "margins": [g7(m) for m in margins],
                                 "min_margin": g7(min(margins))})
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(golden, f, separators=(",", ":"))
    return golden


TEXTS = [
    "The package manager installs, upgrades and removes software on a Debian system.",
    "In Python, a list comprehension builds a new list from an iterable:",
    "Perl's regular expressions match patterns in strings, and the substitution operator",
]


def make_trained(models, corpus, out_path, windows=4, seq=512):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(models, "kvshift-6l", "tokenizer.json"))
    eot = tok.token_to_id(EOT)
    val = TokenFile(os.path.join(corpus, "val.bin"))
    golden = {"reference": "scripts/reference/starref (float32, CPU) on the stored bfloat16 weights",
              "versions": versions(), "dtype": "float32", "device": "cpu", "eot_id": eot, "texts": TEXTS,
              "models": {}}
    for name in ("kvshift-6l", "llama-6l"):
        model = load_exported(os.path.join(models, name))
        entry = {"prompts": [], "greedy": [], "star": []}
        for text in TEXTS:
            ids = [eot] + tok.encode(text).ids
            p = prompt_entry(model, ids, False)
            p["text"] = text
            entry["prompts"].append(p)
            gen, margins = greedy(model, ids, 32)
            entry["greedy"].append({"prompt_ids": ids, "generated_ids": gen, "generated_text": tok.decode(gen),
                                    "margins": margins, "min_margin": min(margins)})
        total, count = 0.0, 0
        for i in range(windows):
            w = [int(t) for t in val.ids[i * seq:i * seq + seq + 1]]
            lp = token_logprobs(full_logits(model, w[:-1]), w)
            total -= sum(lp)
            count += len(lp)
        # The windows as starref.train evaluate_lm scores them: seq inputs, the next seq tokens as targets.
        entry["val"] = {"windows": windows, "seq": seq, "tokens": count, "nll": total / count,
                        "ppl": math.exp(total / count)}
        w = [int(t) for t in val.ids[:seq]]
        e, _, _ = star_entry(model, w[:448], w[448:], 128, 128, 16, False)
        entry["star"].append(e)
        golden["models"][name] = entry
        print(name, "val ppl", entry["val"]["ppl"], "greedy", entry["greedy"][0]["generated_text"][:60])
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(golden, f, indent=1)


def load_exported(path):
    """A model exported by starref.export (any stored dtype), as a float32 reference model."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    variant = {"kvshift_llama": "kvshift", "attamba": "attamba"}.get(c["model_type"], "llama")
    extra = {}
    if variant == "attamba":
        extra = dict(attamba_chunk=c["attamba_chunk_size"], attamba_leading=c["attamba_leading_tokens"],
                     attamba_cyclic_offsets=c["attamba_cyclic_offsets"], ssm_d_inner=c["ssm_d_inner"],
                     ssm_d_state=c["ssm_d_state"], ssm_heads=c["ssm_n_heads"], ssm_groups=c["ssm_n_groups"],
                     ssm_conv=c["ssm_conv_width"])
    cfg = ModelConfig(vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
                      n_heads=c["num_attention_heads"], n_kv_heads=c["num_key_value_heads"],
                      ffn_dim=c["intermediate_size"], max_position=c["max_position_embeddings"],
                      rope_theta=c["rope_theta"], norm_eps=c["rms_norm_eps"], tie_embeddings=c["tie_word_embeddings"],
                      variant=variant, **extra).validate()
    model = DecoderLM(cfg)
    state = {(k if k.startswith("lm_head") else k[len("model."):]): v.float()
             for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    model.load_state_dict(state)
    return model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["tiny", "trained", "attamba-tiny", "lnfree"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="models")
    ap.add_argument("--corpus")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.what == "tiny":
        os.makedirs(args.out, exist_ok=True)
        make_tiny(args.out)
    elif args.what == "attamba-tiny":
        os.makedirs(args.out, exist_ok=True)
        make_attamba_tiny(args.out)
    elif args.what == "lnfree":
        os.makedirs(args.out, exist_ok=True)
        make_lnfree_tiny(args.out)
    else:
        make_trained(args.models, args.corpus, args.out)


if __name__ == "__main__":
    main()
