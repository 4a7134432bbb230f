#!/usr/bin/env bash
# An Attamba model served for real: `mpirun -np 2 starserve serve` on the tiny golden (tests/golden/attamba/hf, P = 8,
# L = 5), real starctl. GetModelInfo reports the compressed cache (the row size, P, L and the per-sequence carry,
# checked against numbers computed here from config.json alone); greedy text through gRPC equals the reference's
# (tests/golden/attamba/golden.json, made by scripts/reference/starref/golden.py) in global, in star with the golden's
# blocks and anchors that two ranks can run, and in exact; star with the server's own block size (one block per rank,
# rounded up to a multiple of P) runs; a layout the carry halo cannot run is refused with the reason and the server
# keeps serving. Usage: attamba_serve_e2e.sh BIN_DIR GOLDEN_DIR. Every wait is bounded; the server is stopped on exit.
set -uo pipefail
BIN="$1" GOLDEN="$2"
WORK="$(mktemp -d)"
MPI_PID=""
cleanup() {
  stop_pid "$MPI_PID" 40 0.25
  rm -rf "$WORK"
}
trap cleanup EXIT

source "$(dirname "$0")/e2e_lib.sh"

PORT=$(free_port)
# --query-tail 7: a plain prompt of the golden's context + query splits where the golden's does.
mpirun --oversubscribe --allow-run-as-root -np 2 "$BIN/starserve" serve --model "$GOLDEN/attamba/hf" --backend cpu \
  --host 127.0.0.1 --port "$PORT" --query-tail 7 --log-level warn >"$WORK/server.log" 2>&1 &
MPI_PID=$!
CTL=("$BIN/starctl" --address "127.0.0.1:$PORT" --timeout 120)
wait_ready
check "server ready on 2 ranks" '[ $? = 0 ]'

# The compressed cache as GetModelInfo reports it, against the layout computed from config.json.
"${CTL[@]}" info >"$WORK/info.json" 2>"$WORK/info.err"
check "starctl info" '[ $? = 0 ]'
check "GetModelInfo reports the compressed cache" 'python3 - "$WORK/info.json" "$GOLDEN/attamba/hf/config.json" <<"PY"
import json, sys
kv = json.load(open(sys.argv[1]))["model"]["kv_cache"]
c = json.load(open(sys.argv[2]))
layers, heads, hd, hidden = c["num_hidden_layers"], c["num_key_value_heads"], c["head_dim"], c["hidden_size"]
P, L = c["attamba_chunk_size"], c["attamba_leading_tokens"]
conv_dim = c["ssm_d_inner"] + 2 * c["ssm_n_groups"] * c["ssm_d_state"]
# Per layer: a 4-float header, per SSM (k and v) the conv tail (W - 1 rows) and the state (d_inner x N),
# and the ring of the last L roped k and v rows.
carry = 4 + 2 * ((c["ssm_conv_width"] - 1) * conv_dim + c["ssm_d_inner"] * c["ssm_d_state"]) + 2 * L * hidden
row = 2 * layers * heads * hd * 4  # fp32 on the CPU backend
n = c["max_position_embeddings"]
want = {"bytes_per_row": row, "dtype": "f32", "compressed_chunk": P, "leading_tokens": L,
        "state_bytes_per_sequence": layers * carry * 4}
got = {k: (int(kv[k]) if k != "dtype" and k in kv else kv.get(k)) for k in want}
per_token = ((n + P - 1) // P + 1) * row / n + layers * carry * 4 / n
ok = got == want and abs(kv["bytes_per_token_at_max_context"] - per_token) < 1e-6
print(got, kv["bytes_per_token_at_max_context"], "want", want, per_token)
sys.exit(0 if ok else 1)
PY'

# ids MODE BLOCK ANCHOR WANT: greedy ids through gRPC (from the --logprobs lines) equal to WANT.
ids_of() { awk '/^logprob/ {print $3}' "$1" | paste -sd' '; }
golden_case() {  # $1 = python expression giving (prompt ids, mode, block, anchor, generated ids)
  python3 - "$GOLDEN/attamba/golden.json" "$1" <<'PY'
import json, sys
g = json.load(open(sys.argv[1]))
ids, mode, block, anchor, want = eval(sys.argv[2])
print(",".join(map(str, ids)), mode, block, anchor, " ".join(map(str, want)))
PY
}
run_case() {  # $1 label, $2 python expression
  read -r IDS MODE BLOCK ANCHOR WANT < <(golden_case "$2")
  local blocks=()
  [ "$BLOCK" != 0 ] && blocks=(--block-size "$BLOCK" --anchor-size "$ANCHOR")
  "${CTL[@]}" complete --token-ids "$IDS" --max-tokens 16 --temperature 0 --ignore-eos --attention "$MODE" "${blocks[@]}" \
    --logprobs 1 >"$WORK/out" 2>"$WORK/err"
  local got
  got=$(ids_of "$WORK/err")
  check "$1: greedy ids equal the reference's" '[ "$got" = "$WANT" ]'
  [ "$got" = "$WANT" ] || { echo "  got:  $got"; echo "  want: $WANT"; head -3 "$WORK/err"; }
}
# Global: the golden's greedy prompt (37 tokens), its first 16 generated tokens.
run_case "global" '(g["greedy"][0]["prompt_ids"], "global", 0, 0, g["greedy"][0]["generated_ids"][:16])'
for i in 0 2; do
  run_case "star case $i" "(g['star'][$i]['context_ids'] + g['star'][$i]['query_ids'], 'star', g['star'][$i]['block'],
    g['star'][$i]['anchor'], g['star'][$i]['generated_ids'])"
done
run_case "exact" '(g["star"][4]["context_ids"] + g["star"][4]["query_ids"], "exact", 0, 0, g["star"][4]["generated_ids"])'

# The server's own star block (one per rank): 94 context tokens -> 47 per rank, rounded up to 48.
IDS=$(seq 10 110 | paste -sd,)
"${CTL[@]}" complete --token-ids "$IDS" --attention star --max-tokens 4 --temperature 0 >"$WORK/auto.out" 2>"$WORK/auto.err"
check "star with the default block size runs" '[ $? = 0 ] && grep -q "^\[finish length\]" "$WORK/auto.err"'

# Blocks of 16 on 2 ranks: rank 0 holds several blocks and hands its carry on, which is refused with the reason.
"${CTL[@]}" complete --token-ids "$IDS" --attention star --block-size 16 --max-tokens 2 --temperature 0 \
  >"$WORK/bad.out" 2>"$WORK/bad.err"
check "star with 16-token blocks: refused" '[ $? != 0 ] && grep -q "UNIMPLEMENTED.*an Attamba model.*hands its last" "$WORK/bad.err"'
check "both ranks still running" 'kill -0 "$MPI_PID" 2>/dev/null && [ "$(rank_pids | wc -l)" = 2 ]'
grep -q "ending the job" "$WORK/server.log" && fail "a rank ended the job:" && cat "$WORK/server.log"

echo "attamba_serve_e2e: $PASSES passed, $FAILS failed"
[ "$FAILS" = 0 ]
