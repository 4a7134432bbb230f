#!/usr/bin/env bash
# Trains Attamba (docs/specs/attamba.md, scripts/reference/starref/attamba.py) against a transformer baseline on the
# GPU machine and exports the models for starserve.
#
#   scripts/device/train_attamba.sh CORPUS_DIR OUT_DIR [RUNS_DIR]
#
# CORPUS_DIR is what `python -m starref.build_corpus` wrote (train.bin, val.bin, manifest.json, tokenizer.json).
# Three runs, all at once on the one GPU, with the dimensions, data, seed, steps and trainer settings of
# train_reference.sh's LM pair (6 layers, width 256, 4 heads, seq 512, batch 32, 2000 steps):
#   lm-llama                 the transformer baseline
#   lm-attamba-p4-l32        Attamba, chunk P = 4, leading tokens L = 32 (the paper's "5%" point)
#   lm-attamba-p8-l16        Attamba, P = 8, L = 16
# Both Attamba runs: cyclic offsets, SSM d_inner = width / 2 = 128, N = 64, 4 SSM heads, 1 group, conv width 4.
# Each run's final.json has val_ppl (the trainer's eval over 128 validation windows, bf16 autocast, the dense
# oracle) and val_ppl_fp32 (the same windows in float32).
# OUT_DIR receives llama-6l-base.tar, attamba-6l-p4-l32.tar, attamba-6l-p8-l16.tar (folders of bfloat16
# safetensors + config + tokenizer; the SSMs' small tensors in float32), runs.tar.gz (every run's config.json,
# log.jsonl and final.json) and results.json (the perplexities side by side).
# LM_STEPS overrides the step count and EXTRA_ARGS adds trainer arguments (a quick check of the script, e.g.
# LM_STEPS=3 EXTRA_ARGS="--width 32 --seq 64 --batch 2 --eval-windows 2 --device cpu").
# A run found finished in RUNS_DIR is not trained again (the trainer resumes from its checkpoint otherwise).
set -euo pipefail
corpus=$(realpath "$1")
out=$(realpath -m "$2")
runs=$(realpath -m "${3:-/tmp/starref-attamba-runs}")
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
lm_args=(--task lm --data "$corpus" --layers 6 --width 256 --heads 4 --seq 512 --batch 32 --steps "${LM_STEPS:-2000}"
  --eval-every 250 --eval-windows 128 --seed 0 --final-fp32-eval)
ssm_args=(--ssm-d-state 64 --ssm-heads 4 --ssm-groups 1 --ssm-conv 4)
pids=()
train lm-llama --variant llama "${lm_args[@]}" "${extra[@]}" &
pids+=($!)
train lm-attamba-p4-l32 --variant attamba --attamba-chunk 4 --attamba-leading 32 "${ssm_args[@]}" "${lm_args[@]}" \
  "${extra[@]}" &
pids+=($!)
train lm-attamba-p8-l16 --variant attamba --attamba-chunk 8 --attamba-leading 16 "${ssm_args[@]}" "${lm_args[@]}" \
  "${extra[@]}" &
pids+=($!)
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done

for pair in lm-llama:llama-6l-base lm-attamba-p4-l32:attamba-6l-p4-l32 lm-attamba-p8-l16:attamba-6l-p8-l16; do
  run=${pair%%:*}
  name=${pair#*:}
  if [ -f "$runs/$run/final.json" ]; then
    "$py" -m starref.export --run "$runs/$run" --tokenizer "$corpus/tokenizer.json" --out "$runs/export/$name" \
      --dtype bfloat16
    tar cf "$out/$name.tar" -C "$runs/export" "$name"
  fi
done
(cd "$runs" && tar czf "$out/runs.tar.gz" --exclude='*/ckpt.pt' --exclude=export ./*)
"$py" - "$runs" "$out/results.json" <<'PY'
import glob, json, os, sys
res = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*", "final.json"))):
    r = json.load(open(f))
    res[os.path.basename(os.path.dirname(f))] = {k: r[k] for k in r if k in (
        "step", "seconds", "val_loss", "val_ppl", "val_loss_fp32", "val_ppl_fp32", "val_tokens")}
json.dump(res, open(sys.argv[2], "w"), indent=1)
for k, v in res.items():
    print(k, v)
PY
exit $fail
