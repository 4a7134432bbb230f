#!/usr/bin/env bash
# Set-up (packages, model, build), then a real completion from the default model: a context
# encoded with Star Attention over 2 MPI ranks, and a question answered over the sharded KV.
source "$(dirname "$0")/common.sh"
install_packages
fetch_model
build
RANKS="${STARSERVE_RANKS:-2}"
ctx="$(mktemp)"
cat >"$ctx" <<'DOC'
The Apollo 11 mission landed the first humans on the Moon. Neil Armstrong and Buzz Aldrin landed the
lunar module Eagle on July 20, 1969, while Michael Collins stayed in lunar orbit aboard the command
module Columbia. Armstrong stepped onto the surface first and described it as one small step for a
man, one giant leap for mankind. The crew returned safely to Earth on July 24, 1969, splashing down
in the Pacific Ocean.
DOC
log "completion: mpirun -np $RANKS starserve generate --attention star --chat ..."
mpirun --oversubscribe --allow-run-as-root -np "$RANKS" "$BUILD_DIR/bin/starserve" generate \
  --model "$DEFAULT_MODEL" --chat --attention star --context-file "$ctx" \
  --query "Who stayed in lunar orbit during Apollo 11?" --max-tokens 48 --temperature 0 --log-level warn
rm -f "$ctx"
