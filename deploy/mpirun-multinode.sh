#!/usr/bin/env bash
# Star Attention across nodes: every node needs the same build and model path (shared filesystem
# or identical images). Usage: deploy/mpirun-multinode.sh HOSTFILE NP CONTEXT_FILE "QUESTION"
set -euo pipefail
hostfile="$1" np="$2" ctx="$3" query="$4"
root="$(cd "$(dirname "$0")/.." && pwd)"
exec mpirun --hostfile "$hostfile" -np "$np" --map-by slot \
  -x OMPI_MCA_mpi_yield_when_idle=1 \
  "$root/build/bin/starserve" generate --model "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
  --attention star --chat --context-file "$ctx" --query "$query" --max-tokens 128
