"""Export a reference model to the Hugging Face layout starserve loads: model.safetensors, config.json,
tokenizer.json and tokenizer_config.json in one folder.

  python -m starref.export --run runs/kvshift --tokenizer corpus/tokenizer.json --out models/kvshift-4l

Tensor names follow HF Llama (model.embed_tokens.weight, model.layers.N.self_attn.q_proj.weight, ...,
model.norm.weight, lm_head.weight when untied). The variants add:
  kvshift  model.layers.N.self_attn.k_shift and .v_shift, float32 [n_kv_heads, 2]: column 0 weighs the previous
           token's raw k (v), column 1 the current token's; config.json model_type "kvshift_llama",
           architectures ["KVShiftLlamaForCausalLM"].
  attamba  no self_attn.k_proj / v_proj; for S in {k_ssm, v_ssm}: model.layers.N.self_attn.S.in_proj.weight
           (2*d_inner + 2*G*N + H, dim), .conv1d.weight (conv_dim, 1, W), .conv1d.bias (conv_dim), .dt_bias (H),
           .A_log (H), .D (H), .norm.weight (d_inner), .out_proj.weight (dim, d_inner); config.json model_type
           "attamba", architectures ["AttambaForCausalLM"], attamba_chunk_size, attamba_leading_tokens,
           attamba_cyclic_offsets, ssm_d_inner, ssm_d_state, ssm_n_heads, ssm_n_groups, ssm_conv_width
           (docs/specs/attamba.md, "Files").
Weights are stored in float32 unless --dtype says otherwise (the shift weights and the SSMs' small tensors always
in float32).

A run of `starref.train --arch gpt2` exports through starref/gpt2.py (export_gpt2): the baseline in HF GPT-2's own
layout (model_type "gpt2", transformer.h.N.attn.c_attn.weight ... in Conv1D [in, out] orientation, LM head tied),
the LN-free variants as model_type "gpt2_lnfree" (docs/specs/lnfree-gpt2.md, "Config layout"): the FFN fused into
mlp.c_fused [d, d], alpha / beta per layer, attn.temperature [n_head, n_positions] where learnt, no LayerNorms.
"""
import argparse
import json
import os
import shutil

import torch

from .data import EOT
from .model import DecoderLM, ModelConfig

MODEL_TYPES = {"llama": ("llama", "LlamaForCausalLM"), "kvshift": ("kvshift_llama", "KVShiftLlamaForCausalLM"),
               "attamba": ("attamba", "AttambaForCausalLM")}
# The SSMs' small tensors, kept in float32 whatever the storage type.
SSM_FP32 = (".conv1d.weight", ".conv1d.bias", ".dt_bias", ".A_log", ".D", "_ssm.norm.weight")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_state_dict(model: DecoderLM, dtype=torch.float32):
    """The HF-named tensors, stored in dtype except the [n_kv, 2] shift weights and the SSMs' small tensors, which
    stay float32."""
    out = {}
    for name, t in model.state_dict().items():
        key = name if name.startswith("lm_head") else "model." + name
        keep = name.endswith("_shift") or ("_ssm." in name and name.endswith(SSM_FP32))
        out[key] = t.detach().to(torch.float32 if keep else dtype).contiguous().cpu()
    return out


def hf_config(cfg: ModelConfig, eot_id):
    model_type, arch = MODEL_TYPES[cfg.variant]
    c = dict(architectures=[arch], model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
             intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
             num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
             max_position_embeddings=cfg.max_position, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
             tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False, torch_dtype="float32",
             bos_token_id=eot_id, eos_token_id=eot_id)
    if cfg.variant == "kvshift":
        c["kv_shift"] = dict(layout="[num_key_value_heads, 2]; column 0 previous token, column 1 current token",
                             applies_to="raw k and v after the projections, before RoPE")
    if cfg.variant == "attamba":
        c.update(attamba_chunk_size=cfg.attamba_chunk, attamba_leading_tokens=cfg.attamba_leading,
                 attamba_cyclic_offsets=cfg.attamba_cyclic_offsets, ssm_d_inner=cfg.ssm_d_inner,
                 ssm_d_state=cfg.ssm_d_state, ssm_n_heads=cfg.ssm_heads, ssm_n_groups=cfg.ssm_groups,
                 ssm_conv_width=cfg.ssm_conv)
    return c


def export(model: DecoderLM, tokenizer_json, out_dir, dtype="float32"):
    from safetensors.torch import save_file

    from .gpt2 import GPT2LM, export_gpt2
    if isinstance(model, GPT2LM):
        export_gpt2(model, tokenizer_json, out_dir, dtype, EOT)
        return

    os.makedirs(out_dir, exist_ok=True)
    save_file(hf_state_dict(model, DTYPES[dtype]), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    eot_id = None
    if tokenizer_json:
        shutil.copyfile(tokenizer_json, os.path.join(out_dir, "tokenizer.json"))
        with open(tokenizer_json) as f:
            added = json.load(f)["added_tokens"]
        eot_id = next((t["id"] for t in added if t["content"] == EOT), None)
        # The corpus tokenizer's end-of-text token opens and ends documents; a tokenizer without it (the
        # goldens' tiny ones) names no special token.
        special = dict(bos_token=EOT, eos_token=EOT) if eot_id is not None else {}
        write_json(os.path.join(out_dir, "tokenizer_config.json"),
                   dict(**special, add_bos_token=eot_id is not None, add_eos_token=False,
                        model_max_length=model.cfg.max_position))
    config = hf_config(model.cfg, eot_id)
    config["torch_dtype"] = dtype
    write_json(os.path.join(out_dir, "config.json"), config)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def load_run(run_dir, device="cpu"):
    run = json.load(open(os.path.join(run_dir, "config.json")))
    if run.get("arch") == "gpt2":
        from .gpt2 import GPT2Config, GPT2LM
        model = GPT2LM(GPT2Config.from_dict(run["model"]))
    else:
        model = DecoderLM(ModelConfig.from_dict(run["model"]))
    ck = torch.load(os.path.join(run_dir, "ckpt.pt"), map_location=device)
    model.load_state_dict(ck["model"])
    return model.eval(), run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="training output folder (config.json, ckpt.pt)")
    ap.add_argument("--tokenizer", help="tokenizer.json of the corpus the model was trained on")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                    help="storage type of the weights (the shift weights stay float32); the served model is what is stored")
    args = ap.parse_args(argv)
    model, _ = load_run(args.run)
    export(model, args.tokenizer, args.out, args.dtype)
    print(f"exported {args.run} -> {args.out}")


if __name__ == "__main__":
    main()
