#!/usr/bin/env bash
# Trains the reference models of scripts/reference on the GPU machine and exports the LM pair for starserve.
#
#   scripts/device/train_reference.sh CORPUS_DIR OUT_DIR [RUNS_DIR]
#
# CORPUS_DIR is what `python -m starref.build_corpus` wrote (train.bin, val.bin, manifest.json, tokenizer.json).
# Runs, all at once on the one GPU (each is small):
#   lm-llama, lm-kvshift         6 layers, width 256, 4 heads, seq 512, batch 32, 2000 steps, same data and seed
#   ind-{llama,kvshift}-{1,2}l-s{0,1,2}   the induction toy task (half length 64, vocabulary 512), 1500 steps,
#                                         accuracy every 100 steps
# OUT_DIR receives kvshift-6l.tar and llama-6l.tar (folders of bfloat16 safetensors + config + tokenizer; the shift weights in
# float32) and runs.tar.gz (every run's config.json, log.jsonl and final.json).
# LM_STEPS and IND_STEPS override the step counts (a quick check of the script).
# A run found finished in RUNS_DIR is not trained again (the trainer resumes from its checkpoint otherwise).
set -euo pipefail
corpus=$(realpath "$1")
out=$(realpath -m "$2")
runs=$(realpath -m "${3:-/tmp/starref-runs}")
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../reference" && pwd)"
mkdir -p "$out" "$runs"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

train() {  # name args...
  local name=$1
  shift
  if [ -f "$runs/$name/final.json" ]; then return 0; fi
  python3 -m starref.train --out "$runs/$name" "$@" >"$runs/$name.out" 2>&1 || {
    echo "run $name failed:" >&2
    tail -20 "$runs/$name.out" >&2
    return 1
  }
}

pids=()
lm_args=(--task lm --data "$corpus" --layers 6 --width 256 --heads 4 --seq 512 --batch 32 --steps "${LM_STEPS:-2000}"
  --eval-every 250 --eval-windows 128 --seed 0)
for v in llama kvshift; do
  train "lm-$v" --variant "$v" "${lm_args[@]}" &
  pids+=($!)
done
for v in llama kvshift; do
  for l in 1 2; do
    for s in 0 1 2; do
      train "ind-$v-${l}l-s$s" --task induction --variant "$v" --layers "$l" --width 256 --heads 4 \
        --half-len 64 --vocab 512 --batch 32 --steps "${IND_STEPS:-1500}" --eval-every 100 --save-every 1500 --seed "$s" &
      pids+=($!)
    done
  done
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done

for v in llama kvshift; do
  if [ -f "$runs/lm-$v/final.json" ]; then
    python3 -m starref.export --run "$runs/lm-$v" --tokenizer "$corpus/tokenizer.json" --out "$runs/export/$v-6l" \
      --dtype bfloat16
    tar cf "$out/$v-6l.tar" -C "$runs/export" "$v-6l"
  fi
done
(cd "$runs" && tar czf "$out/runs.tar.gz" --exclude='*/ckpt.pt' --exclude=export ./*)
python3 - "$runs" <<'EOF'
import glob, json, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*", "final.json"))):
    r = json.load(open(f))
    print(os.path.basename(os.path.dirname(f)), {k: r[k] for k in r if k in ("step", "seconds", "val_loss", "val_ppl", "induction_accuracy")})
EOF
exit $fail
