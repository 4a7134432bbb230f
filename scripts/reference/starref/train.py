"""A small trainer for the reference models: one GPU (or CPU), bf16 autocast, AdamW, warm-up + cosine schedule,
resumable from its last checkpoint, loss logged as JSON lines.

  python -m starref.train --task lm --data corpus/ --out runs/kvshift --variant kvshift --steps 2000
  python -m starref.train --task induction --out runs/ind-kvshift-1l --variant kvshift --layers 1 --steps 1500
  python -m starref.train --task lm --data corpus/ --out runs/attamba --variant attamba --attamba-chunk 4 \
      --attamba-leading 32 --ssm-d-inner 128 --ssm-d-state 64 --ssm-heads 4
  python -m starref.train --arch gpt2 --variant lnfree_ent --data corpus/ --out runs/lnfree-ent --seq 128

--arch gpt2 trains starref/gpt2.py (context = --seq, the learned positions' count): --variant baseline (GPT-2),
lnfree (SM + ScFuFFN: no LayerNorm, linear FFN, learnable residual scaling), lnfree_temp (lnfree + the learnable
temperature t[h, i]) or lnfree_ent (lnfree_temp + the entropy regulariser, weight --ent-lambda, tolerance
--ent-gamma, thresholds θ initialised to --ent-theta). Its evaluations also log the attention entropy map
(per layer x head, nats, over the first --entropy-windows validation windows) and the regulariser's value.

The batch of step s depends only on (seed, s), so a run resumed from a checkpoint sees the same data as an
uninterrupted one. Writes OUT/config.json (model and run settings), OUT/log.jsonl, OUT/ckpt.pt (model, optimiser,
step) and, at the end, OUT/final.json (validation loss / perplexity or induction accuracy).
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from .data import TokenFile, induction_batch
from . import gpt2
from .model import DecoderLM, ModelConfig, n_params

GPT2_VARIANTS = {"baseline": dict(variant="baseline"), "lnfree": dict(variant="lnfree"),
                 "lnfree_temp": dict(variant="lnfree", temperature=True),
                 "lnfree_ent": dict(variant="lnfree", temperature=True, entropy_reg=True)}


def lr_at(step, steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate_lm(model, val, seq_len, windows, device, dtype):
    model.eval()
    total, count = 0.0, 0
    for x, y in val.sequential(seq_len, windows, device):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        total += F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    loss = total / max(1, count)
    return dict(val_loss=loss, val_ppl=math.exp(loss), val_tokens=count)


@torch.no_grad()
def evaluate_induction(model, args, device, dtype, batches=8):
    model.eval()
    correct, count = 0, 0
    for b in range(batches):
        x, y, scored = induction_batch(10_000_000 + b, args.batch, args.half_len, args.vocab, args.seed + 1, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = model(x).argmax(-1)
        correct += ((pred == y) & scored).sum().item()
        count += scored.sum().item()
    model.train()
    return dict(induction_accuracy=correct / count, induction_scored=count)


@torch.no_grad()
def evaluate_entropy(model, val, seq_len, windows, device, dtype):
    """The attention entropy map [L][H] (starref/gpt2.py attention_entropy) over the first validation windows."""
    model.eval()
    xs = torch.cat([x for x, _ in val.sequential(seq_len, windows, device)])
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        ent = gpt2.attention_entropy(model, xs)
    model.train()
    return gpt2.entropy_summary(ent.cpu(), seq_len)


def gpt2_config(args, vocab):
    if args.variant not in GPT2_VARIANTS:
        raise SystemExit(f"--arch gpt2: --variant in {sorted(GPT2_VARIANTS)}")
    return gpt2.GPT2Config(vocab_size=vocab, n_positions=args.seq, d_model=args.width, n_layers=args.layers,
                           n_heads=args.heads, ffn_dim=args.ffn or 4 * args.width, ffn_fused=args.ffn_fused,
                           ffn_norm=args.ffn_norm, alpha_init=args.alpha_init, beta_init=args.beta_init,
                           entropy_lambda=args.ent_lambda, entropy_gamma=args.ent_gamma, theta_init=args.ent_theta,
                           entropy_reduce=args.ent_reduce, **GPT2_VARIANTS[args.variant]).validate()


def model_config(args, vocab):
    if args.arch == "gpt2":
        return gpt2_config(args, vocab)
    return ModelConfig(vocab_size=vocab, d_model=args.width, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.kv_heads or args.heads, ffn_dim=args.ffn or int(round(args.width * 8 / 3 / 64)) * 64,
                       max_position=max(args.seq, 2 * args.half_len + 1, args.max_position), variant=args.variant,
                       tie_embeddings=not args.untied, attamba_chunk=args.attamba_chunk,
                       attamba_leading=args.attamba_leading, attamba_cyclic_offsets=not args.no_cyclic_offsets,
                       ssm_d_inner=args.ssm_d_inner or args.width // 2, ssm_d_state=args.ssm_d_state,
                       ssm_heads=args.ssm_heads, ssm_groups=args.ssm_groups, ssm_conv=args.ssm_conv).validate()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["lm", "induction"], default="lm")
    ap.add_argument("--data", help="corpus folder (build_corpus): train.bin, val.bin, manifest.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", choices=["llama", "gpt2"], default="llama",
                    help="llama: starref/model.py (variants llama, kvshift, attamba); gpt2: starref/gpt2.py")
    ap.add_argument("--variant", default="llama")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=0)
    ap.add_argument("--ffn", type=int, default=0)
    ap.add_argument("--max-position", type=int, default=2048)
    ap.add_argument("--untied", action="store_true")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--half-len", type=int, default=64, help="induction: length of the random sequence repeated")
    ap.add_argument("--vocab", type=int, default=512, help="induction: vocabulary of the random tokens")
    ap.add_argument("--attamba-chunk", type=int, default=4, help="attamba: chunk size P")
    ap.add_argument("--attamba-leading", type=int, default=32, help="attamba: leading tokens L (the band)")
    ap.add_argument("--no-cyclic-offsets", action="store_true", help="attamba: every layer's offset 0")
    ap.add_argument("--ssm-d-inner", type=int, default=0, help="attamba: SSM inner width (0 = width / 2)")
    ap.add_argument("--ssm-d-state", type=int, default=64, help="attamba: SSM state size N")
    ap.add_argument("--ssm-heads", type=int, default=4, help="attamba: SSM heads H")
    ap.add_argument("--ssm-groups", type=int, default=1, help="attamba: SSM B/C groups G")
    ap.add_argument("--ssm-conv", type=int, default=4, help="attamba: SSM conv width W")
    ap.add_argument("--ffn-fused", action="store_true", help="gpt2 lnfree: train the FFN as one d x d matrix")
    ap.add_argument("--ffn-norm", choices=list(gpt2.FFN_NORMS), default="none",
                    help="gpt2 lnfree: weight / spectral normalisation of the FFN's linear layers")
    ap.add_argument("--alpha-init", type=float, default=1.0, help="gpt2 lnfree: initial alpha (FFN divisor)")
    ap.add_argument("--beta-init", type=float, default=1.0, help="gpt2 lnfree: initial beta (FFN residual scale)")
    ap.add_argument("--ent-lambda", type=float, default=1e-5, help="gpt2 lnfree_ent: regulariser weight lambda")
    ap.add_argument("--ent-gamma", type=float, default=0.2, help="gpt2 lnfree_ent: tolerance gamma (x log T)")
    ap.add_argument("--ent-theta", type=float, default=0.5, help="gpt2 lnfree_ent: initial thresholds theta")
    ap.add_argument("--ent-reduce", choices=list(gpt2.ENTROPY_REDUCE), default="rows",
                    help="gpt2 lnfree_ent: penalty per query row (summed) or on the head's mean entropy")
    ap.add_argument("--entropy-windows", type=int, default=32, help="gpt2: validation windows of the entropy map")
    ap.add_argument("--time-limit", type=float, default=0,
                    help="stop training after this many seconds (0: none); final.json says time_limited")
    ap.add_argument("--final-fp32-eval", action="store_true",
                    help="also score the validation windows in float32 at the end (val_ppl_fp32 in final.json)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.float32 if args.fp32 or device.type == "cpu" else torch.bfloat16
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    if args.task == "lm":
        manifest = json.load(open(os.path.join(args.data, "manifest.json")))
        vocab = manifest["vocab_size"]
        train, val = TokenFile(os.path.join(args.data, "train.bin")), TokenFile(os.path.join(args.data, "val.bin"))
    else:
        vocab, manifest = args.vocab, None
    cfg = model_config(args, vocab)
    is_gpt2 = args.arch == "gpt2"
    model = (gpt2.GPT2LM(cfg, seed=args.seed) if is_gpt2 else DecoderLM(cfg, seed=args.seed)).to(device)
    count = gpt2.n_params if is_gpt2 else n_params
    reg = is_gpt2 and cfg.entropy_reg

    def decays(n, p):  # matrices and embeddings; not the per-head / per-position scalars
        return p.dim() >= 2 and not n.endswith(("_shift", "temperature", "reg_theta"))

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    other = [p for n, p in model.named_parameters() if not decays(n, p)]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay), dict(params=other, weight_decay=0.0)],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    step = 0
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        print(f"resumed at step {step}", file=sys.stderr)
    run = dict(vars(args), model=cfg.to_dict(), params=count(model), params_non_embedding=count(model, True),
               corpus=manifest and dict(splits=manifest["splits"], packages=list(manifest["packages"])))
    json.dump(run, open(os.path.join(args.out, "config.json"), "w"), indent=1)
    log = open(os.path.join(args.out, "log.jsonl"), "a")

    def emit(rec):
        line = json.dumps(rec)
        log.write(line + "\n")
        log.flush()
        print(line, flush=True)

    def evaluate(eval_dtype=dtype):
        if args.task != "lm":
            return evaluate_induction(model, args, device, eval_dtype)
        r = evaluate_lm(model, val, args.seq, args.eval_windows, device, eval_dtype)
        if is_gpt2:
            r.update(evaluate_entropy(model, val, args.seq, args.entropy_windows, device, eval_dtype))
            if cfg.variant == "lnfree":
                r["alpha"] = [round(b.alpha.item(), 5) for b in model.h]
                r["beta"] = [round(b.beta.item(), 5) for b in model.h]
            if cfg.temperature:
                t = torch.stack([b.attn.temperature.detach().float() for b in model.h])
                r["temperature_min"], r["temperature_max"] = round(t.min().item(), 5), round(t.max().item(), 5)
                r["temperature_mean_per_layer"] = [round(v, 5) for v in t.mean(dim=(1, 2)).tolist()]
            if reg:
                r["theta"] = [[round(v, 5) for v in row] for row in model.reg_theta.detach().float().tolist()]
        return r

    def save():
        torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), step=step), ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)

    model.train()
    t0 = time.time()
    tokens = 0
    skipped = 0
    time_limited = False
    while step < args.steps:
        if args.time_limit and time.time() - t0 > args.time_limit:
            time_limited = True
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        if args.task == "lm":
            x, y = train.batch(step, args.batch, args.seq, args.seed, device)
        else:
            x, y, _ = induction_batch(step, args.batch, args.half_len, vocab, args.seed, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if reg:
                logits, rows = model(x, need="entropy")
                reg_loss = model.entropy_loss(rows)
            else:
                logits = model(x)
        # Induction trains on the whole sequence too (the random first copy costs ln V at best); only the copy is
        # scored in evaluate_induction.
        ce = F.cross_entropy(logits.view(-1, vocab), y.reshape(-1))
        loss = ce + reg_loss if reg else ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if torch.isfinite(gnorm):
            opt.step()
        else:
            # A non-finite loss or gradient: the step is skipped (counted in the log and final.json).
            skipped += 1
            if skipped > 20:
                emit(dict(step=step, diverged=True, skipped_steps=skipped))
                break
        step += 1
        tokens += x.numel()
        if step % 50 == 0 or step == 1:
            rec = dict(step=step, loss=round(loss.item(), 5), lr=opt.param_groups[0]["lr"],
                       tokens_per_s=round(tokens / (time.time() - t0)))
            if reg:
                rec.update(ce=round(ce.item(), 5), entropy_reg=round(reg_loss.item(), 6),
                           train_entropy_per_layer=[round(r.detach().float().mean().item(), 4) for r in rows])
            if skipped:
                rec["skipped_steps"] = skipped
            emit(rec)
        if step % args.eval_every == 0 or step == args.steps:
            emit(dict(step=step, **evaluate()))
        if step % args.save_every == 0 or step == args.steps:
            save()
    if time_limited or skipped > 20:
        save()
    final = dict(step=step, variant=args.variant, layers=args.layers, width=args.width, task=args.task,
                 seconds=round(time.time() - t0, 1), **evaluate())
    if is_gpt2:
        final.update(arch="gpt2", time_limited=time_limited, skipped_steps=skipped, diverged=skipped > 20)
    if args.final_fp32_eval and args.task == "lm":
        r = evaluate(torch.float32) if is_gpt2 else evaluate_lm(model, val, args.seq, args.eval_windows, device,
                                                                 torch.float32)
        final.update(val_loss_fp32=r["val_loss"], val_ppl_fp32=r["val_ppl"])
        if is_gpt2:
            final["entropy_fp32"] = r["entropy"]
    json.dump(final, open(os.path.join(args.out, "final.json"), "w"), indent=1)
    emit(dict(final=True, **final))


if __name__ == "__main__":
    main()
