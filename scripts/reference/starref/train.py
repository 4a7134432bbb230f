"""A small trainer for the reference models: one GPU (or CPU), bf16 autocast, AdamW, warm-up + cosine schedule,
resumable from its last checkpoint, loss logged as JSON lines.

  python -m starref.train --task lm --data corpus/ --out runs/kvshift --variant kvshift --steps 2000
  python -m starref.train --task induction --out runs/ind-kvshift-1l --variant kvshift --layers 1 --steps 1500
  python -m starref.train --task lm --data corpus/ --out runs/attamba --variant attamba --attamba-chunk 4 \
      --attamba-leading 32 --ssm-d-inner 128 --ssm-d-state 64 --ssm-heads 4

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
from .model import DecoderLM, ModelConfig, n_params


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


def model_config(args, vocab):
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
    model = DecoderLM(cfg, seed=args.seed).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("_shift")]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.endswith("_shift"))]
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
    run = dict(vars(args), model=cfg.to_dict(), params=n_params(model), params_non_embedding=n_params(model, True),
               corpus=manifest and dict(splits=manifest["splits"], packages=list(manifest["packages"])))
    json.dump(run, open(os.path.join(args.out, "config.json"), "w"), indent=1)
    log = open(os.path.join(args.out, "log.jsonl"), "a")

    def emit(rec):
        line = json.dumps(rec)
        log.write(line + "\n")
        log.flush()
        print(line, flush=True)

    def evaluate():
        if args.task == "lm":
            return evaluate_lm(model, val, args.seq, args.eval_windows, device, dtype)
        return evaluate_induction(model, args, device, dtype)

    def save():
        torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), step=step), ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)

    model.train()
    t0 = time.time()
    tokens = 0
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        if args.task == "lm":
            x, y = train.batch(step, args.batch, args.seq, args.seed, device)
        else:
            x, y, _ = induction_batch(step, args.batch, args.half_len, vocab, args.seed, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        # Induction trains on the whole sequence too (the random first copy costs ln V at best); only the copy is
        # scored in evaluate_induction.
        loss = F.cross_entropy(logits.view(-1, vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        if step % 50 == 0 or step == 1:
            emit(dict(step=step, loss=round(loss.item(), 5), lr=opt.param_groups[0]["lr"],
                      tokens_per_s=round(tokens / (time.time() - t0))))
        if step % args.eval_every == 0 or step == args.steps:
            emit(dict(step=step, **evaluate()))
        if step % args.save_every == 0 or step == args.steps:
            save()
    final = dict(step=step, variant=args.variant, layers=args.layers, width=args.width, task=args.task,
                 seconds=round(time.time() - t0, 1), **evaluate())
    if args.final_fp32_eval and args.task == "lm":
        r = evaluate_lm(model, val, args.seq, args.eval_windows, device, torch.float32)
        final.update(val_loss_fp32=r["val_loss"], val_ppl_fp32=r["val_ppl"])
    json.dump(final, open(os.path.join(args.out, "final.json"), "w"), indent=1)
    emit(dict(final=True, **final))


if __name__ == "__main__":
    main()
