#!/usr/bin/env bash
# Trains GPT-2 and its LayerNorm-free, entropy-guided variants (docs/specs/lnfree-gpt2.md,
# scripts/reference/starref/gpt2.py) on the GPU machine and exports them for starserve.
#
#   scripts/device/train_lnfree.sh CORPUS_DIR OUT_DIR [RUNS_DIR]
#
# CORPUS_DIR is what `python -m starref.build_corpus` wrote (train.bin, val.bin, manifest.json, tokenizer.json).
# Three runs, all at once on the one GPU, with the same dimensions, data, seed, steps and trainer settings
# (6 layers, width 256, 4 heads, FFN 1024, context T = 128 as in the paper, batch 64, LM_STEPS steps, lr 1e-3):
#   gpt2-baseline     GPT-2 (LayerNorm, GELU, learned positions, tied embeddings)
#   gpt2-lnfree       SM + ScFuFFN: no LayerNorm, linear FFN (fused at export), learnable residual scaling α, β
#   gpt2-lnfree-ent   SM + ScFuFFN + learnable temperature t[h, i] + the entropy regulariser
#                     (λ = ENT_LAMBDA, default 1e-5; γ = 0.2; θ learnable from 0.5)
# Each run's final.json has val_ppl (bf16 autocast) and val_ppl_fp32 over 256 validation windows of 128 tokens,
# the attention entropy map (per layer × head, nats, mean over the query rows of 32 validation windows) and, for
# the LN-free runs, α, β, temperature and θ statistics.
# OUT_DIR receives gpt2-6l-base.tar, gpt2-lnfree-6l.tar, gpt2-lnfree-ent-6l.tar (folders of bfloat16 safetensors +
# config + tokenizer; alpha, beta and temperature in float32), runs.tar.gz (every run's config.json, log.jsonl,
# final.json) and results.json (the perplexities and entropy maps side by side, and each exported model's own
# perplexity: the stored files reloaded and scored in float32 over the same windows).
# LM_STEPS overrides the step count, TIME_LIMIT the seconds after which a run stops training (a safety net for
# the call's time; final.json says time_limited), EXTRA_ARGS adds trainer arguments (a quick check of the script:
# LM_STEPS=3 EXTRA_ARGS="--width 32 --heads 2 --batch 2 --eval-windows 2 --entropy-windows 2 --device cpu").
# A run found finished in RUNS_DIR is not trained again (the trainer resumes from its checkpoint otherwise).
set -euo pipefail
corpus=$(realpath "$1")
out=$(realpath -m "$2")
runs=$(realpath -m "${3:-/tmp/starref-lnfree-runs}")
py=${PYTHON:-python3}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../reference" && pwd)"
mkdir -p "$out" "$runs"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

train() {  # name args...
  local name=$1
  shift
  if [ -f "$runs/$name/final.json" ]; then return 0; fi
  "$py" -m starref.train --out "$runs/$name" "$@" >"$runs/$name.out" 2>&1 || {
    echo "run $name failed:" >&2
    tail -20 "$runs/$name.out" >&2
    return 1
  }
}

# shellcheck disable=SC2206
extra=(${EXTRA_ARGS:-})
lm_args=(--arch gpt2 --task lm --data "$corpus" --layers 6 --width 256 --heads 4 --ffn 1024 --seq 128 --batch 64
  --steps "${LM_STEPS:-3000}" --lr 1e-3 --warmup 150 --eval-every 500 --eval-windows 256 --entropy-windows 32
  --save-every 1000 --seed 0 --final-fp32-eval --time-limit "${TIME_LIMIT:-250}")
pids=()
train gpt2-baseline --variant baseline "${lm_args[@]}" "${extra[@]}" &
pids+=($!)
train gpt2-lnfree --variant lnfree "${lm_args[@]}" "${extra[@]}" &
pids+=($!)
train gpt2-lnfree-ent --variant lnfree_ent --ent-lambda "${ENT_LAMBDA:-1e-5}" --ent-gamma 0.2 --ent-theta 0.5 \
  "${lm_args[@]}" "${extra[@]}" &
pids+=($!)
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done

exported=()
for pair in gpt2-baseline:gpt2-6l-base gpt2-lnfree:gpt2-lnfree-6l gpt2-lnfree-ent:gpt2-lnfree-ent-6l; do
  run=${pair%%:*}
  name=${pair#*:}
  if [ -f "$runs/$run/final.json" ]; then
    "$py" -m starref.export --run "$runs/$run" --tokenizer "$corpus/tokenizer.json" --out "$runs/export/$name" \
      --dtype bfloat16
    tar cf "$out/$name.tar" -C "$runs/export" "$name"
    exported+=("$run:$name")
  fi
done
(cd "$runs" && tar czf "$out/runs.tar.gz" --exclude='*/ckpt.pt' --exclude=export ./*)
"$py" - "$runs" "$out/results.json" "$corpus/val.bin" "${exported[@]}" <<'PY'
import glob, json, math, os, sys
import torch, torch.nn.functional as F
from starref.data import TokenFile
from starref.gpt2 import load_exported_gpt2

runs, dest, val_bin = sys.argv[1:4]
keys = ("step", "seconds", "val_loss", "val_ppl", "val_loss_fp32", "val_ppl_fp32", "val_tokens", "entropy",
        "entropy_fp32", "entropy_max", "overload_threshold", "overload_fraction", "collapse_fraction",
        "entropy_mean_per_layer", "alpha", "beta", "temperature_min", "temperature_max",
        "temperature_mean_per_layer", "theta", "time_limited", "skipped_steps", "diverged")
res = {}
for f in sorted(glob.glob(os.path.join(runs, "*", "final.json"))):
    r = json.load(open(f))
    name = os.path.basename(os.path.dirname(f))
    cfg = json.load(open(os.path.join(runs, name, "config.json")))
    res[name] = dict({k: r[k] for k in keys if k in r}, params=cfg["params"],
                     params_non_embedding=cfg["params_non_embedding"])
# Each exported model (the stored bfloat16 files) scored in float32 over the trainer's validation windows.
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
val = TokenFile(val_bin)
for pair in sys.argv[4:]:
    run, name = pair.split(":")
    model = load_exported_gpt2(os.path.join(runs, "export", name)).to(dev)
    args = json.load(open(os.path.join(runs, run, "config.json")))
    seq, windows = args["seq"], args["eval_windows"]
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in val.sequential(seq, windows, dev):
            lg = model(x)
            total += F.cross_entropy(lg.view(-1, lg.shape[-1]), y.reshape(-1), reduction="sum").item()
            count += y.numel()
    res[run]["export"] = dict(name=name, val_ppl_fp32=math.exp(total / count), val_tokens=count,
                              params=sum(p.numel() for p in model.parameters()))
json.dump(res, open(dest, "w"), indent=1)
for k, v in res.items():
    print(k, {a: v.get(a) for a in ("step", "seconds", "val_ppl", "val_ppl_fp32", "overload_fraction",
                                      "collapse_fraction", "entropy_mean_per_layer", "diverged")},
          "export ppl", v.get("export", {}).get("val_ppl_fp32"))
PY
exit $fail
