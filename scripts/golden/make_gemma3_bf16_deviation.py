#!/usr/bin/env python3
"""How far bfloat16 itself moves the real Gemma-3-270M's logits: transformers' Gemma3ForCausalLM from the same GGUF,
cast to bfloat16 (weights and activations, eager attention), against the fp32 golden of make_gemma3_real_golden.py.
A bf16 backend (starserve's CUDA backend) is held to a multiple of this independent deviation
(tests/gpu_model/test_gemma3_gpu.cpp), the way the KV-shifting golden records bf16_max_abs_diff.

tests/golden/gemma3_real/bf16.json:
  reference, dtype "bfloat16", versions, golden_sha256 (of golden.json it was measured against)
  prompts: [{name, positions: [{pos, max_abs_diff (over the golden's top-k ids, and at the last position also its
             sample ids), argmax}], greedy: {generated_ids, agrees_with_fp32_steps (leading steps equal to the fp32
             greedy continuation)}}]

Run (CPU, a few minutes; the same environment as make_gemma3_real_golden.py):
    /work/venv-arch/bin/python scripts/golden/make_gemma3_bf16_deviation.py
"""
import hashlib
import json
import os

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from make_gemma3_real_golden import MODEL_DIR, MODEL_FILE, OUT_DIR, f32, versions


@torch.no_grad()
def logits_bf16(model, ids):
    return model(torch.tensor([ids]), use_cache=False).logits[0].to(torch.float64).numpy()


@torch.no_grad()
def greedy(model, prompt, n_new, eos):
    ids = list(prompt)
    for _ in range(n_new):
        ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        if ids[-1] in eos:
            break
    return ids[len(prompt):]


def main():
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    golden_path = os.path.join(OUT_DIR, "golden.json")
    raw = open(golden_path, "rb").read()
    golden = json.loads(raw)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE, dtype=torch.float32,
                                                 attn_implementation="eager").to(torch.bfloat16).eval()
    out = {"reference": "transformers Gemma3ForCausalLM from the GGUF, cast to bfloat16", "dtype": "bfloat16",
           "device": "cpu", "versions": versions(), "golden_sha256": hashlib.sha256(raw).hexdigest(), "prompts": []}
    sample_ids = golden["sample_ids"]
    eos = set(golden["eos_token_ids"])
    for p in golden["prompts"]:
        lg = logits_bf16(model, p["token_ids"])
        positions = []
        for at in p["positions"]:
            row = lg[at["pos"]]
            worst = max(abs(row[i] - v) for i, v in at["top_k"])
            if at["pos"] == p["last"]["pos"]:
                worst = max(worst, max(abs(row[i] - v) for i, v in zip(sample_ids, p["last"]["sample_logits"])))
            positions.append({"pos": at["pos"], "max_abs_diff": f32(worst), "argmax": int(row.argmax())})
        want = p["greedy"]["generated_ids"]
        gen = greedy(model, p["token_ids"], len(want), eos)
        agree = next((i for i, (a, b) in enumerate(zip(gen, want)) if a != b), min(len(gen), len(want)))
        out["prompts"].append({"name": p["name"], "positions": positions,
                               "greedy": {"generated_ids": gen, "agrees_with_fp32_steps": agree}})
        print(p["name"], [(q["pos"], q["max_abs_diff"]) for q in positions], f"greedy agrees for {agree}/{len(want)}")
    with open(os.path.join(OUT_DIR, "bf16.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
