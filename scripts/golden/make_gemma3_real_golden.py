#!/usr/bin/env python3
"""Golden for the real Gemma-3-270M (models/gemma-3-270m-q4_k_m.gguf, fetched by scripts/common.sh)
from Hugging Face transformers + torch on the CPU in fp32, an implementation independent of ours
(tests/unit/test_gemma3_real.cpp reads it).

transformers loads the GGUF through the gguf package, dequantizing every tensor (Q8_0, Q5_0, Q4_K,
Q6_K, F32) to fp32 and building Gemma3ForCausalLM from the file's metadata; starserve dequantizes
the same blocks and computes in fp32 too, so both evaluate the same function and differ only in
summation order.

tests/golden/gemma3_real/golden.json:
  model, sha256, reference, dtype, device, attn_implementation, versions, n_vocab, top_k,
  sample_seed, sample_ids (sorted distinct vocab ids, numpy default_rng(sample_seed))
  prompts: [{name, text, token_ids (BOS first, as the GGUF's add_bos_token says),
             positions: [{pos, top_k: [[id, logit], ...] descending}],
             last: {pos, argmax, max, min, max_abs, mean, rms, logsumexp (full vocabulary, float64),
                    sample_logits (logit of sample_ids[i])},
             greedy: {generated_ids, generated_text, margins (top-1 minus top-2 per step), min_margin}}]
The greedy continuation recomputes the whole sequence each step (use_cache=False), so no KV cache
implementation is involved. Floats are written with the fewest digits that round-trip float32.

Run (about 4 CPU-minutes, most of it transformers converting the 262144-token vocabulary; transformers
needs accelerate 1.15.0 to load a GGUF):
    /work/venv-arch/bin/python scripts/golden/make_gemma3_real_golden.py
"""

import hashlib
import importlib.metadata
import json
import math
import os
import re
import sys

import numpy as np
import torch

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = os.path.join(REPO, "models")
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
OUT_DIR = os.path.join(REPO, "tests", "golden", "gemma3_real")
TOP_K = 16
N_SAMPLE = 512
SAMPLE_SEED = 1234
N_NEW = 16

# Plain text (the file carries no chat template); the second prompt writes Gemma's turn markers,
# which the tokenizer matches as its added control tokens.
PROMPTS = [
    ("story", "Once upon a time, in a small village at the edge of a great forest, there lived an old "
              "clockmaker who"),
    ("turns", "<start_of_turn>user\nName three colours of the rainbow and say which one you like most."
              "<end_of_turn>\n<start_of_turn>model\n"),
    ("facts", "The Pacific Ocean is the largest and deepest of the world's five oceanic divisions. It "
              "extends from the Arctic Ocean in the north to the Southern Ocean in the south, and"),
]


def f32(x):
    """The shortest decimal that reads back as the same float32."""
    x = float(np.float32(x))
    for digits in range(6, 10):
        s = float(f"{x:.{digits}g}")
        if np.float32(s) == np.float32(x):
            return s
    return x


def versions():
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "gguf": importlib.metadata.version("gguf"), "numpy": np.__version__,
            "python": sys.version.split()[0]}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def all_logits(model, ids):
    return model(torch.tensor([ids]), use_cache=False).logits[0].to(torch.float64).numpy()


@torch.no_grad()
def greedy(model, prompt, n_new, eos):
    ids, margins = list(prompt), []
    for _ in range(n_new):
        last = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
        top = torch.topk(last, 2)
        margins.append(float(top.values[0] - top.values[1]))
        ids.append(int(top.indices[0]))
        if ids[-1] in eos:
            break
    return ids[len(prompt):], margins


def main():
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    path = os.path.join(MODEL_DIR, MODEL_FILE)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    n_vocab = model.config.vocab_size
    eos = {tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids("<end_of_turn>")}
    sample_ids = sorted(int(i) for i in np.random.default_rng(SAMPLE_SEED).choice(n_vocab, N_SAMPLE, replace=False))
    golden = {"model": MODEL_FILE, "sha256": sha256(path), "reference": "transformers Gemma3ForCausalLM from the GGUF",
              "dtype": "float32", "device": "cpu", "attn_implementation": "eager", "versions": versions(),
              "n_vocab": n_vocab, "top_k": TOP_K, "sample_seed": SAMPLE_SEED, "sample_ids": sample_ids,
              "eos_token_ids": sorted(eos), "prompts": []}
    for name, text in PROMPTS:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert ids[0] == tok.bos_token_id, "the GGUF asks for BOS"
        logits = all_logits(model, ids)
        n = len(ids)
        positions = []
        for pos in sorted({n // 3, (2 * n) // 3, n - 1}):
            order = np.argsort(-logits[pos], kind="stable")[:TOP_K]
            positions.append({"pos": pos, "top_k": [[int(i), f32(logits[pos, i])] for i in order]})
        lg = logits[n - 1]
        mx = float(lg.max())
        last = {"pos": n - 1, "argmax": int(lg.argmax()), "max": f32(mx), "min": f32(lg.min()),
                "max_abs": f32(np.abs(lg).max()), "mean": f32(lg.mean()), "rms": f32(math.sqrt(float((lg * lg).mean()))),
                "logsumexp": mx + math.log(float(np.exp(lg - mx).sum())),
                "sample_logits": [f32(lg[i]) for i in sample_ids]}
        gen, margins = greedy(model, ids, N_NEW, eos)
        golden["prompts"].append({
            "name": name, "text": text, "token_ids": ids, "n_tokens": n, "positions": positions, "last": last,
            "greedy": {"generated_ids": gen, "generated_text": tok.decode(gen, skip_special_tokens=False),
                       "margins": [f32(m) for m in margins], "min_margin": f32(min(margins))}})
        print(f"{name}: {n} tokens, last argmax {last['argmax']} max {mx:.3f} max_abs {last['max_abs']:.3f}, "
              f"greedy {tok.decode(gen)!r} (min margin {min(margins):.4f})")
    os.makedirs(OUT_DIR, exist_ok=True)
    # One line per prompt field and per position, lists kept on their line: small diffs on regeneration.
    text = json.dumps(golden, indent=1)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    with open(os.path.join(OUT_DIR, "golden.json"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
