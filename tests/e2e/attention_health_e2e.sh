#!/usr/bin/env bash
# Attention health end to end: real `mpirun -np 2 starserve serve` on the tiny GPT-2 of tests/golden/gpt2 (3 layers,
# 4 heads), real starctl over gRPC and curl over the OpenAI HTTP API. Checks that
# - the AttentionHealth of a response (starctl --entropy-json) equals what a Python computation over the response's own
#   map gives, with the server's thresholds (set at start) and with per-request overrides chosen from the map so that
#   both lists are non-empty;
# - bad thresholds are refused: per request with INVALID_ARGUMENT naming the value and the range (gRPC and HTTP), at
#   start by the server's flags;
# - `starctl --entropy` prints the health, a heat map row per layer and its legend; no escape codes when stderr is
#   not a terminal or NO_COLOR is set, ANSI colours on a terminal (script(1) gives it one);
# - /metrics holds starserve_attention_entropy_ratio with exactly the n_layers label values, cumulative buckets whose
#   +Inf equals _count equals the requests that asked for entropy, and head counters equal to the sums of the
#   responses' lists; a request without entropy adds nothing to them.
# Usage: attention_health_e2e.sh BIN_DIR GOLDEN_DIR (tests/golden/gpt2). Every wait is bounded; the server is stopped
# on exit.
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

# The golden holds the weights only: a byte-level tokenizer of its 256 ids (as gpt2_serving_e2e.sh) lets the server
# load it and take text prompts.
mkdir -p "$WORK/model"
cp "$GOLDEN"/hf/config.json "$GOLDEN"/hf/model.safetensors "$WORK/model/"
python3 "$(dirname "$0")/../../scripts/golden/byte_level_tokenizer.py" "$WORK/model/tokenizer.json"
N_LAYERS=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['n_layer'])" "$GOLDEN/hf/config.json")
N_HEADS=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['n_head'])" "$GOLDEN/hf/config.json")

# The health of a response recomputed from its map: a head is judged when head_max > collapse, overloaded when
# H > ratio x head_max, collapsed when H < collapse (floats as the response carries them, compared in double).
# health_ok FILE RATIO COLLAPSE [nonempty]: exit 0 when the response's health equals it (and, with nonempty, both
# lists have entries); prints the differences otherwise.
cat >"$WORK/health.py" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
ratio, collapse = float(sys.argv[2]), float(sys.argv[3])
nonempty = len(sys.argv) > 4
problems = []
judged, over, coll = 0, [], []
for l, layer in enumerate(d["layers"]):
    for h, (H, M) in enumerate(zip(layer["head_mean"], layer["head_max"])):
        if not M > collapse:
            continue
        judged += 1
        if H > ratio * M:
            over.append({"layer": l, "head": h})
        if H < collapse:
            coll.append({"layer": l, "head": h})
hl = d["health"]
want = {"overload_ratio": ratio, "collapse_nats": collapse, "n_heads_judged": judged,
        "overload_fraction": len(over) / judged if judged else 0.0,
        "collapse_fraction": len(coll) / judged if judged else 0.0, "overloaded": over, "collapsed": coll}
for k, v in want.items():
    if hl.get(k) != v:
        problems.append(f"{k}: response {hl.get(k)!r}, recomputed {v!r}")
if nonempty and not (over and coll):
    problems.append(f"the overrides flag {len(over)} overloaded and {len(coll)} collapsed heads; want both > 0")
for p in problems:
    print(p)
sys.exit(1 if problems else 0)
PY
health_ok() { python3 "$WORK/health.py" "$@" >"$WORK/health.out" || { cat "$WORK/health.out"; false; }; }

# Refused at start: a threshold outside its range, named with the range (CLI parsing, before any model loading).
"$BIN/starserve" serve --model "$WORK/model" --backend cpu --port 0 --entropy-overload-ratio 1.2 >"$WORK/bad_flag.log" 2>&1
check "serve --entropy-overload-ratio 1.2 refused at start, naming (0, 1]" \
  '[ $? != 0 ] && grep -q "entropy-overload-ratio 1.2 must be in (0, 1\]" "$WORK/bad_flag.log"'
"$BIN/starserve" serve --model "$WORK/model" --backend cpu --port 0 --entropy-collapse-nats -0.5 >"$WORK/bad_flag2.log" 2>&1
check "serve --entropy-collapse-nats -0.5 refused at start" \
  '[ $? != 0 ] && grep -q "entropy-collapse-nats -0.5 must be a finite number >= 0" "$WORK/bad_flag2.log"'

# The server's thresholds differ from the defaults, so the responses show which ones were used.
RATIO=0.85 COLLAPSE=0.2
PORT=$(free_port) MPORT=$(free_port) HPORT=$(free_port)
mpirun --oversubscribe --allow-run-as-root -np 2 "$BIN/starserve" serve --model "$WORK/model" --backend cpu \
  --host 127.0.0.1 --port "$PORT" --metrics-port "$MPORT" --http-port "$HPORT" \
  --entropy-overload-ratio $RATIO --entropy-collapse-nats $COLLAPSE --log-level warn >"$WORK/server.log" 2>&1 &
MPI_PID=$!
CTL=("$BIN/starctl" --address "127.0.0.1:$PORT" --timeout 120)
wait_ready
check "server ready on 2 ranks" '[ $? = 0 ]'
kill -0 "$MPI_PID" 2>/dev/null || { cat "$WORK/server.log"; echo "$PASSES passed, $FAILS failed"; exit 1; }

PROMPT="The tiny model reads this sentence twice. The tiny model reads this sentence twice, and then once more."
gen() {  # gen NAME [starctl flags...]: a completion with entropy, its map + health in NAME.json, stderr in NAME.err
  local name="$1"; shift
  "${CTL[@]}" complete --prompt "$PROMPT" --max-tokens 8 --temperature 0 --ignore-eos --entropy-json "$WORK/$name.json" \
    "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
}
N_ENTROPY=0
for mode in star global; do
  gen "$mode" --attention "$mode" --entropy
  check "$mode: completion with --entropy-json succeeds" '[ $? = 0 ] && [ -s "$WORK/$mode.json" ]'
  N_ENTROPY=$((N_ENTROPY + 1))
  check "$mode: map is $N_LAYERS x $N_HEADS" \
    'python3 -c "import json,sys; d=json.load(open(sys.argv[1])); sys.exit(not (d[\"n_layers\"]==$N_LAYERS and d[\"n_heads\"]==$N_HEADS and len(d[\"layers\"])==$N_LAYERS and all(len(l[\"head_mean\"])==$N_HEADS for l in d[\"layers\"])))" "$WORK/$mode.json"'
  check "$mode: health with the server's thresholds ($RATIO, $COLLAPSE) equals the recomputation" \
    'health_ok "$WORK/$mode.json" $RATIO $COLLAPSE'
  check "$mode: --entropy prints the health, $N_LAYERS heat-map rows and the legend" \
    'grep -q "^\[health\] overload" "$WORK/$mode.err" && [ "$(grep -c "^  L[0-9]" "$WORK/$mode.err")" = $N_LAYERS ] &&
     grep -q "legend: H / head_max" "$WORK/$mode.err" && grep -q "o overload (H > $RATIO x head_max)" "$WORK/$mode.err"'
  check "$mode: no escape codes when stderr is not a terminal" '! grep -q $'"'"'\x1b'"'"' "$WORK/$mode.err"'
done
# The rank entropy (the query's attention mass over the ranks phase 2 merged): star on 2 ranks reports it per layer
# and head within [0, ln 2], the layer mean the mean of its heads, not all zero.
check "star: rank entropy over 2 ranks, every value in [0, ln 2], layer mean = mean of heads, not all 0, health ratio = mean / ln 2" \
  'python3 -c "
import json, math, sys
d = json.load(open(sys.argv[1]))
L = d[\"layers\"]
ok = d[\"n_ranks\"] == 2 and all(len(l[\"head_rank_mean\"]) == $N_HEADS for l in L)
ok = ok and all(0 <= v <= math.log(2) + 1e-6 for l in L for v in l[\"head_rank_mean\"])
ok = ok and all(abs(l[\"rank_mean\"] - sum(l[\"head_rank_mean\"]) / $N_HEADS) < 1e-5 for l in L)
mean = sum(v for l in L for v in l[\"head_rank_mean\"]) / ($N_LAYERS * $N_HEADS)
ok = ok and abs(d[\"health\"][\"rank_entropy_ratio\"] - mean / math.log(2)) < 1e-6
sys.exit(not (ok and any(v > 0.01 for l in L for v in l[\"head_rank_mean\"])))" "$WORK/star.json"'
# Global keeps the whole context on one rank: the others' shards are empty, so all of the mass is on one rank.
check "global: rank entropy 0 everywhere (the other rank holds no keys)" \
  'python3 -c "
import json, sys
d = json.load(open(sys.argv[1]))
sys.exit(not all(v == 0 for l in d[\"layers\"] for v in l.get(\"head_rank_mean\", [])))" "$WORK/global.json"'


# Overrides chosen from the star map so that both lists are non-empty: the median H / head_max as the ratio and the
# median H as the collapse threshold (about half the heads each).
read -r R2 C2 < <(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
cells = [(H, M) for l in d["layers"] for H, M in zip(l["head_mean"], l["head_max"]) if M > 0]
r = sorted(H / M for H, M in cells)[len(cells) // 2]
c = sorted(H for H, M in cells)[len(cells) // 2]
print(repr(r), repr(c))' "$WORK/star.json")
gen over --attention star --entropy-overload-ratio "$R2" --entropy-collapse-nats "$C2"
N_ENTROPY=$((N_ENTROPY + 1))
check "overrides ratio $R2, collapse $C2: used, equal to the recomputation, both lists non-empty" \
  'health_ok "$WORK/over.json" "$R2" "$C2" nonempty'

# Bad overrides: INVALID_ARGUMENT naming the value and the range, on gRPC.
bad() {  # bad FLAG VALUE EXPECTED-MESSAGE
  "${CTL[@]}" complete --prompt "$PROMPT" --max-tokens 2 --entropy "$1" "$2" >/dev/null 2>"$WORK/bad.err"
  [ $? = 1 ] && grep -qF "error: INVALID_ARGUMENT: $3" "$WORK/bad.err"
}
check "gRPC: entropy_overload_ratio 1.5 refused naming (0, 1]" \
  'bad --entropy-overload-ratio 1.5 "entropy_overload_ratio = 1.5 must be in (0, 1]"'
check "gRPC: entropy_overload_ratio 0 refused" 'bad --entropy-overload-ratio 0 "entropy_overload_ratio = 0 must be in (0, 1]"'
check "gRPC: entropy_collapse_nats -1 refused" \
  'bad --entropy-collapse-nats -1 "entropy_collapse_nats = -1 must be a finite number >= 0"'

# The OpenAI HTTP API: the same extension fields; health in attention_entropy.
http() { curl -s --max-time 120 -o "$WORK/$1.http" -w '%{http_code}' -H 'Content-Type: application/json' \
  -d "$2" "http://127.0.0.1:$HPORT/v1/completions"; }
code=$(http ok "{\"prompt\": \"$PROMPT\", \"max_tokens\": 4, \"temperature\": 0, \"return_attention_entropy\": true, \"entropy_overload_ratio\": $R2}")
N_ENTROPY=$((N_ENTROPY + 1))
python3 -c 'import json, sys; json.dump(json.load(open(sys.argv[1]))["attention_entropy"], open(sys.argv[2], "w"))' \
  "$WORK/ok.http" "$WORK/http.json" 2>/dev/null
check "HTTP: entropy_overload_ratio $R2 used, health equal to the recomputation" \
  '[ "$code" = 200 ] && health_ok "$WORK/http.json" "$R2" $COLLAPSE'
code=$(http bad "{\"prompt\": \"$PROMPT\", \"max_tokens\": 2, \"entropy_collapse_nats\": -3}")
check "HTTP: entropy_collapse_nats -3 -> 400 naming the value" \
  '[ "$code" = 400 ] && grep -qF "entropy_collapse_nats = -3 must be a finite number >= 0" "$WORK/bad.http"'
code=$(http badtype "{\"prompt\": \"$PROMPT\", \"max_tokens\": 2, \"entropy_overload_ratio\": \"high\"}")
check "HTTP: entropy_overload_ratio \"high\" -> 400 (a number)" \
  '[ "$code" = 400 ] && grep -qF "entropy_overload_ratio must be a number" "$WORK/badtype.http"'

# The terminal view on a terminal (script(1)): ANSI colours, and none with NO_COLOR set.
tty_run() {  # tty_run NAME [env settings...]
  local name="$1"; shift
  script -qec "$(printf '%q ' env "$@" "${CTL[@]}" complete --prompt "$PROMPT" --max-tokens 2 --entropy \
    --entropy-json "$WORK/$name.json")" /dev/null
}
tty_run tty >"$WORK/tty.txt" 2>&1
N_ENTROPY=$((N_ENTROPY + 1))
check "terminal: heat map in ANSI 256 colours" 'grep -q $'"'"'\x1b\[48;5;2[345][0-9]m'"'"' "$WORK/tty.txt"'
tty_run tty_nc NO_COLOR=1 >"$WORK/tty_nc.txt" 2>&1
N_ENTROPY=$((N_ENTROPY + 1))
check "terminal with NO_COLOR: shade blocks, no escape codes" \
  'grep -q "legend: H / head_max" "$WORK/tty_nc.txt" && ! grep -q $'"'"'\x1b\['"'"' "$WORK/tty_nc.txt"'

# /metrics: one histogram series set per layer, counts equal to the entropy requests, counters equal to the sums over
# their responses.
scrape() { curl -s --max-time 10 -o "$1" -w '%{http_code}' "http://127.0.0.1:$MPORT/metrics"; }
"${CTL[@]}" complete --prompt "$PROMPT" --max-tokens 2 >/dev/null 2>&1  # no entropy: nothing recorded
check "scrape -> 200" '[ "$(scrape "$WORK/m.txt")" = 200 ]'
cat >"$WORK/metrics.py" <<'PY'
import json, re, sys
text, n_layers, n_requests = open(sys.argv[1]).read(), int(sys.argv[2]), int(sys.argv[3])
files = sys.argv[4:]
problems = []
name = "starserve_attention_entropy_ratio"
if f"# TYPE {name} histogram\n" not in text:
    problems.append(f"no TYPE {name} histogram")
bounds = ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "0.95", "1", "+Inf"]
buckets, counts, sums = {}, {}, {}
for line in text.splitlines():
    m = re.match(name + r'_bucket\{layer="(\d+)",le="([^"]+)"\} (\S+)$', line)
    if m:
        buckets.setdefault(m.group(1), []).append((m.group(2), float(m.group(3))))
    m = re.match(name + r'_(count|sum)\{layer="(\d+)"\} (\S+)$', line)
    if m:
        (counts if m.group(1) == "count" else sums)[m.group(2)] = float(m.group(3))
    if line.startswith(name) and not re.match(name + r'_(bucket|count|sum)\{layer="\d+"[,}]', line):
        problems.append(f"unexpected series {line!r}")
want_layers = {str(l) for l in range(n_layers)}
if set(buckets) != want_layers or set(counts) != want_layers or set(sums) != want_layers:
    problems.append(f"layer labels {sorted(buckets)} / {sorted(counts)}, want {sorted(want_layers)}")
for layer, b in buckets.items():
    if [le for le, _ in b] != bounds:
        problems.append(f"layer {layer}: le {[le for le, _ in b]}")
    values = [v for _, v in b]
    if values != sorted(values):
        problems.append(f"layer {layer}: buckets not cumulative {values}")
    if values[-1] != counts.get(layer) or counts.get(layer) != n_requests:
        problems.append(f"layer {layer}: +Inf {values[-1]}, count {counts.get(layer)}, want {n_requests}")
    if not 0 <= sums.get(layer, -1) <= 1.0001 * n_requests:
        problems.append(f"layer {layer}: sum {sums.get(layer)}")
def counter(n):
    m = re.search(r"^" + n + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else None
got = {k: counter(f"starserve_attention_{k}_total") for k in ("health_requests", "judged_heads", "overloaded_heads",
                                                              "collapsed_heads")}
if got["health_requests"] != n_requests:
    problems.append(f"health_requests_total {got['health_requests']}, want {n_requests}")
hs = [json.load(open(f))["health"] for f in files]
if len(hs) != n_requests:
    problems.append(f"{len(hs)} responses given for {n_requests} requests")
for key, field in (("judged_heads", "n_heads_judged"), ("overloaded_heads", "overloaded"), ("collapsed_heads", "collapsed")):
    s = sum(h[field] if isinstance(h[field], int) else len(h[field]) for h in hs)
    if got[key] != s:
        problems.append(f"{key}_total {got[key]}, the responses sum to {s}")
# The rank-entropy histogram (no labels): one observation per response whose health carries a rank_entropy_ratio.
ranked = [h["rank_entropy_ratio"] for h in hs if "rank_entropy_ratio" in h]
rname = "starserve_attention_rank_entropy_ratio"
rc = re.search(r"^" + rname + r"_count (\S+)$", text, re.M)
rs = re.search(r"^" + rname + r"_sum (\S+)$", text, re.M)
if not ranked or not rc or float(rc.group(1)) != len(ranked) or abs(float(rs.group(1)) - sum(ranked)) > 1e-6:
    problems.append(f"{rname}: count {rc and rc.group(1)}, sum {rs and rs.group(1)}; the responses: {ranked}")
# The rank-entropy histogram (no labels): one observation per response whose health carries a rank_entropy_ratio.
ranked = [h["rank_entropy_ratio"] for h in hs if "rank_entropy_ratio" in h]
rname = "starserve_attention_rank_entropy_ratio"
rc = re.search(r"^" + rname + r"_count (\S+)$", text, re.M)
rs = re.search(r"^" + rname + r"_sum (\S+)$", text, re.M)
if not ranked or not rc or float(rc.group(1)) != len(ranked) or abs(float(rs.group(1)) - sum(ranked)) > 1e-6:
    problems.append(f"{rname}: count {rc and rc.group(1)}, sum {rs and rs.group(1)}; the responses: {ranked}")
for p in problems:
    print(p)
sys.exit(1 if problems else 0)
PY
check "/metrics: $N_LAYERS layer label values, +Inf = _count = $N_ENTROPY entropy requests, head counters" \
  'python3 "$WORK/metrics.py" "$WORK/m.txt" $N_LAYERS $N_ENTROPY "$WORK"/{star,global,over,http,tty,tty_nc}.json >"$WORK/metrics.out" || { cat "$WORK/metrics.out"; false; }'

echo "$PASSES passed, $FAILS failed"
[ "$FAILS" = 0 ]
