#!/usr/bin/env python3
"""Model-level golden files for starserve's parity tests, made with Hugging Face transformers (an
implementation independent of our C++ code). CPU only, fp32 throughout, deterministic.

Run with the golden venv:
    /opt/golden-venv/bin/python scripts/make_golden.py
Made with torch 2.15.0, transformers 5.24.0, gguf 0.19.0, safetensors 0.8.0, accelerate 1.15.0 (the
script records the versions it actually ran with in every JSON file it writes).

Outputs (under tests/golden/):
  model/logits.json      SmolLM2-135M-Instruct (models/SmolLM2-135M-Instruct.Q4_1.gguf): for 3 prompts
                         (short, ~100 tokens, chat-formatted) the prompt ids and the last-position logits
                         summarised as top-64 (id, logit), the logits of 256 fixed seeded vocab ids and the
                         logsumexp over the whole vocabulary.
  model/logits_full.f16  the full last-position logit vectors of those prompts, float16 little-endian,
                         prompt after prompt (n_prompts x n_vocab), for a coarse whole-vocabulary check.
  model/greedy.json      64-token greedy continuations (stopping at EOS) of 3 plain and 3 chat prompts,
                         with the top-1 minus top-2 logit margin of every generated step.
  tiny_llama/            a tiny random-weight LlamaForCausalLM (llama3 RoPE scaling, GQA, untied output)
                         saved as a sharded safetensors checkpoint, plus golden.json with its logits.

How the reference model is built: transformers reads the GGUF and dequantizes every tensor to fp32
(it also undoes llama.cpp's Q/K row permutation, so HF runs its half-split RoPE on the original
layout). starserve dequantizes the same file to fp32 and computes in fp32, so the logits should agree
to about 1e-4 relative; the only differences are summation order and transcendental functions.

Prompts avoid digits and runs of spaces: the tokenizer transformers builds from a GGUF lacks SmolLM2's
individual-digit pre-tokenizer step (see scripts/make_tokenizer_golden.py), and with neither present
its token ids are the true SmolLM2 ones.
"""

import json
import os
import sys

import numpy as np
import torch

import gguf
import safetensors
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden")
MODEL_DIR = os.path.join(REPO, "models")
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TOP_K = 64
N_SAMPLED = 256
SAMPLE_SEED = 1234
MAX_NEW_TOKENS = 64
TINY_SEED = 42

LOGIT_PROMPTS = [
    {"name": "short", "text": "The capital of France is"},
    {
        "name": "long",
        "text": (
            "The old lighthouse stood at the edge of the cliff, its white paint peeling after many winters of "
            "salt and wind. Every evening the keeper climbed the narrow spiral stairs, carrying a lantern and a "
            "small notebook in which he wrote down the weather, the ships that passed, and the birds that rested "
            "on the railing. The villagers below thought he was lonely, but he never said so. He liked the sound "
            "of the waves against the rocks and the way the beam swept across the dark water, reaching ships that "
            "he would never meet. One night, as a storm rolled in from the west, he noticed"
        ),
    },
    {
        "name": "chat",
        "messages": [{"role": "user", "content": "What is the tallest mountain in the world?"}],
    },
]

GREEDY_PROMPTS = [
    {"name": "plain_france", "text": "The capital of France is"},
    {"name": "plain_story", "text": "Once upon a time, in a small village by the sea, there lived"},
    {"name": "plain_science", "text": "Photosynthesis is the process by which plants"},
    {"name": "chat_mountain", "messages": [{"role": "user", "content": "What is the tallest mountain in the world?"}]},
    {"name": "chat_poem", "messages": [{"role": "user", "content": "Write a short poem about the ocean."}]},
    {
        "name": "chat_system",
        "messages": [
            {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
    },
]


def versions() -> dict:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def f32(x) -> float:
    """A float32 value as the shortest decimal that rounds back to the same float32."""
    v = float(np.float32(x))
    for digits in range(6, 10):
        s = f"{v:.{digits}g}"
        if np.float32(float(s)) == np.float32(v):
            return float(s)
    return v


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {os.path.relpath(path, REPO)} ({os.path.getsize(path)} bytes)")


def render_prompt(tok, p: dict) -> str:
    if "messages" in p:
        return tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
    return p["text"]


def encode(tok, text: str) -> list:
    # add_special_tokens=False: the chat template writes its own control tokens as text, and SmolLM2
    # adds no BOS to plain text either; ids are the source of truth for the tests anyway.
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if any(ch.isdigit() for ch in text):
        raise SystemExit(f"prompt contains digits (GGUF-built tokenizer differs there): {text!r}")
    return ids


def make_model_golden() -> None:
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE, dtype=torch.float32)
    model.eval()
    cfg = model.config
    assert cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), \
        "expected tied embeddings for SmolLM2"
    n_vocab = cfg.vocab_size
    eos_id = tok.eos_token_id

    common = {
        "model": f"models/{MODEL_FILE}",
        "reference": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=...), GGUF dequantized to fp32",
        "dtype": "float32",
        "device": "cpu",
        "versions": versions(),
        "n_vocab": n_vocab,
    }

    # (a) last-position logits.
    rng = np.random.default_rng(SAMPLE_SEED)
    sample_ids = sorted(int(i) for i in rng.choice(n_vocab, size=N_SAMPLED, replace=False))
    prompts_out = []
    full = []
    for p in LOGIT_PROMPTS:
        text = render_prompt(tok, p)
        ids = encode(tok, text)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].to(torch.float32)
        lse = torch.logsumexp(logits.to(torch.float64), dim=0).item()
        top = torch.topk(logits, TOP_K)
        entry = {"name": p["name"]}
        if "messages" in p:
            entry["messages"] = p["messages"]
        entry.update({
            "text": text,
            "token_ids": ids,
            "n_tokens": len(ids),
            "top_k": [[int(i), f32(v)] for v, i in zip(top.values.tolist(), top.indices.tolist())],
            "sample_logits": [f32(logits[i].item()) for i in sample_ids],
            "logsumexp": float(f"{lse:.9g}"),
            "argmax": int(torch.argmax(logits).item()),
        })
        prompts_out.append(entry)
        full.append(logits.numpy().astype("<f2"))
        print(f"logits[{p['name']}]: {len(ids)} tokens, argmax {entry['argmax']} "
              f"{tok.decode([entry['argmax']])!r}, lse {lse:.5f}")

    write_json(os.path.join(GOLDEN, "model", "logits.json"), {
        **common,
        "top_k": TOP_K,
        "sample_seed": SAMPLE_SEED,
        "sample_ids": sample_ids,
        "full_logits_file": "logits_full.f16",
        "full_logits_layout": "float16 little-endian, [n_prompts][n_vocab] in the order of 'prompts'",
        "prompts": prompts_out,
    })
    path = os.path.join(GOLDEN, "model", "logits_full.f16")
    np.concatenate(full).tofile(path)
    print(f"wrote {os.path.relpath(path, REPO)} ({os.path.getsize(path)} bytes)")

    # (b) greedy continuations. generate() with do_sample=False and no logits processors, so the
    # recorded scores are the raw logits of each step.
    gen_out = []
    for p in GREEDY_PROMPTS:
        text = render_prompt(tok, p)
        ids = encode(tok, text)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=MAX_NEW_TOKENS,
                eos_token_id=eos_id,
                pad_token_id=eos_id,
                repetition_penalty=None,
                output_scores=True,
                return_dict_in_generate=True,
            )
        gen = out.sequences[0, len(ids):].tolist()
        margins = []
        for step, scores in enumerate(out.scores):
            t2 = torch.topk(scores[0].to(torch.float32), 2)
            assert int(t2.indices[0]) == gen[step], "generate() did not pick the argmax"
            margins.append(f32(t2.values[0] - t2.values[1]))
        entry = {"name": p["name"], "kind": "chat" if "messages" in p else "plain"}
        if "messages" in p:
            entry["messages"] = p["messages"]
        entry.update({
            "text": text,
            "prompt_ids": ids,
            "generated_ids": gen,
            "generated_text": tok.decode(gen, skip_special_tokens=False),
            "stopped_at_eos": bool(gen and gen[-1] == eos_id),
            "margins": margins,
            "min_margin": min(margins),
        })
        gen_out.append(entry)
        print(f"greedy[{p['name']}] ({len(gen)} tokens, eos={entry['stopped_at_eos']}, "
              f"min margin {entry['min_margin']:.4f}):\n{text}\u2192{entry['generated_text']!r}\n")

    write_json(os.path.join(GOLDEN, "model", "greedy.json"), {
        **common,
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_id": eos_id,
        "decoding": "greedy (do_sample=False), no repetition penalty, stops after emitting eos_token_id",
        "prompts": gen_out,
    })


def make_tiny_llama() -> None:
    out_dir = os.path.join(GOLDEN, "tiny_llama")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name.endswith(".safetensors") or name.endswith(".json"):
            os.remove(os.path.join(out_dir, name))

    torch.manual_seed(TINY_SEED)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0, rope_scaling=dict(rope), bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    hidden = config.hidden_size
    # HF's default init (std 0.02) gives near-uniform attention and tiny logits, which would hide RoPE
    # and scaling bugs. Weights are scaled instead so that attention scores have std ~2 and logits ~1.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # non-trivial norm gains catch a missing multiply
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            elif "q_proj" in name or "k_proj" in name:
                p.normal_(0.0, 1.5 / hidden ** 0.5)
            else:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)

    # Mixed storage dtypes exercise every converter of the loader: bf16 for the embedding and the
    # projections (the usual checkpoint dtype), fp32 for the norms, fp16 for lm_head.
    model.to(torch.bfloat16)
    for name, module in model.named_modules():
        if name.endswith("norm") or name.endswith("layernorm"):
            module.to(torch.float32)
    model.lm_head.to(torch.float16)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="100KB")
    total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(f"tiny_llama: {sorted(os.listdir(out_dir))}, {total} bytes")
    assert os.path.exists(os.path.join(out_dir, "model.safetensors.index.json")), "checkpoint is not sharded"

    # Golden logits from the checkpoint as saved, upcast to fp32: exactly the weights the C++ loader sees.
    ref = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(TINY_SEED + 1)
    seqs = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (7, 40)]
    seq_out = []
    for i, ids in enumerate(seqs):
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0].to(torch.float32)
        entry = {"token_ids": ids, "last_logits": [f32(v) for v in logits[-1].tolist()]}
        if i == 0:
            entry["all_logits"] = [[f32(v) for v in row] for row in logits.tolist()]
        seq_out.append(entry)
        print(f"tiny_llama seq {i}: len {len(ids)}, last logits std {logits[-1].std().item():.3f}, "
              f"argmax {int(logits[-1].argmax())}")

    write_json(os.path.join(out_dir, "golden.json"), {
        "reference": "transformers LlamaForCausalLM, checkpoint in this directory loaded with dtype=float32",
        "dtype": "float32",
        "device": "cpu",
        "versions": versions(),
        "seed": TINY_SEED,
        "storage_dtypes": {"embed_tokens and *_proj": "BF16", "*norm": "F32", "lm_head": "F16"},
        "positions": "0 .. len-1 (no BOS added; ids are used as given)",
        "hparams": {
            "n_vocab": config.vocab_size, "hidden": config.hidden_size, "ffn_hidden": config.intermediate_size,
            "n_layers": config.num_hidden_layers, "n_heads": config.num_attention_heads,
            "n_kv_heads": config.num_key_value_heads, "head_dim": config.hidden_size // config.num_attention_heads,
            "max_context": config.max_position_embeddings, "rms_eps": config.rms_norm_eps, "rope_theta": 10000.0,
            "rope_scaling": rope, "tied_embeddings": False,
        },
        "sequences": seq_out,
    })


def main() -> None:
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    print("versions:", versions())
    what = sys.argv[1:] or ["tiny", "model"]
    if "tiny" in what:
        make_tiny_llama()
    if "model" in what:
        make_model_golden()


if __name__ == "__main__":
    main()
