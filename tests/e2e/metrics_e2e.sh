#!/usr/bin/env bash
# End-to-end test of the Prometheus endpoint: `starserve serve --backend cpu --metrics-port P` on the default model
# (one process), scraped with curl while idle TCP connections are open (issue 17: three of them made a scrape wait
# 14.8 s). Checks behaviour, not timings: curl's --max-time is a hang guard. The exposition is read by a strict
# python3 (standard library) reader of the text format 0.0.4 and the naming rules.
# Usage: metrics_e2e.sh BIN_DIR MODEL. Every wait is bounded; the server is stopped on exit whatever happens.
set -uo pipefail
BIN="$1" MODEL="$2"
WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  stop_pid "$SERVER_PID" 20 0.5
  rm -rf "$WORK"
}
trap cleanup EXIT

source "$(dirname "$0")/e2e_lib.sh"
# A scrape: the body in $1, the HTTP status on stdout ("000" when curl got no answer within 10 s).
scrape() { curl -s --max-time 10 -o "$1" -w '%{http_code}' "http://127.0.0.1:$MPORT/metrics"; }

PORT=$(free_port) MPORT=$(free_port)
"$BIN/starserve" serve --backend cpu --model "$MODEL" --host 127.0.0.1 --port "$PORT" --metrics-port "$MPORT" \
  --log-level warn >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

# The endpoint starts once the model is loaded; starserve_ready turns 1 when every rank has it.
ready=0
for _ in $(seq 1 240); do
  if [ "$(scrape "$WORK/m0.txt")" = 200 ] && grep -q '^starserve_ready 1$' "$WORK/m0.txt"; then ready=1; break; fi
  kill -0 "$SERVER_PID" 2>/dev/null || break
  sleep 0.5
done
check "endpoint up, starserve_ready 1" '[ $ready = 1 ]'
[ $ready = 1 ] || { cat "$WORK/server.log"; echo "$PASSES passed, $FAILS failed"; exit 1; }

# Three idle connections (connected, nothing sent) stay open during the scrape.
exec {IDLE1}<>"/dev/tcp/127.0.0.1/$MPORT" {IDLE2}<>"/dev/tcp/127.0.0.1/$MPORT" {IDLE3}<>"/dev/tcp/127.0.0.1/$MPORT"
check "scrape with 3 idle connections open -> 200" '[ "$(scrape "$WORK/m1.txt")" = 200 ]'
# The server closes idle connections itself: read sees end of file (status 1) rather than its 10 s timeout (> 128).
closed=0
for fd in "$IDLE1" "$IDLE2" "$IDLE3"; do
  read -r -t 10 -u "$fd" _; rc=$?
  [ $rc = 1 ] && closed=$((closed + 1))
done
exec {IDLE1}>&- {IDLE2}>&- {IDLE3}>&-
check "the server closed the 3 idle connections" '[ $closed = 3 ]'

# Some traffic, so that counters and histograms have values.
"$BIN/starctl" --address "127.0.0.1:$PORT" --timeout 300 complete --prompt "The three primary colors are" \
  --max-tokens 4 --temperature 0 --ignore-eos >/dev/null 2>"$WORK/complete.err"
check "a completion succeeds" '[ $? = 0 ]'
check "scrape after traffic -> 200" '[ "$(scrape "$WORK/m2.txt")" = 200 ]'

# The exposition format 0.0.4 and the naming rules; prints one line per problem, exits 1 on any.
cat >"$WORK/check.py" <<'EOF'
import math, re, sys
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*$")
SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\})? (\S+)( -?\d+)?$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
text = open(sys.argv[1], encoding="utf-8").read()
problems, types, helps, seen, order = [], {}, set(), set(), []
if not text.endswith("\n"):
    problems.append("no final newline")
def family(sample):
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample[: -len(suffix)]
        if sample.endswith(suffix) and types.get(base) == "histogram":
            return base
    return sample
for line in text.splitlines():
    if not line:
        continue
    if line.startswith("# HELP ") or line.startswith("# TYPE "):
        kind, rest = line[2:6], line[7:]
        name, _, arg = rest.partition(" ")
        if not NAME.match(name):
            problems.append(f"bad name in {line!r}")
        if kind == "HELP":
            if name in helps: problems.append(f"second HELP for {name}")
            helps.add(name)
        else:
            if name in types: problems.append(f"second TYPE for {name}")
            if arg not in ("counter", "gauge", "histogram", "summary", "untyped"): problems.append(f"bad type {line!r}")
            if name in seen: problems.append(f"TYPE after samples of {name}")
            types[name] = arg
        fam = name
    elif line.startswith("#"):
        continue
    else:
        m = SAMPLE.match(line)
        if not m:
            problems.append(f"bad sample line {line!r}")
            continue
        try:
            float(m.group(3).replace("Inf", "inf"))
        except ValueError:
            problems.append(f"bad value {line!r}")
        fam = family(m.group(1))
        if fam not in types: problems.append(f"sample without TYPE: {line!r}")
        if types.get(fam) == "counter" and not float(m.group(3).replace("Inf", "inf")) >= 0:
            problems.append(f"negative counter {line!r}")
        if m.group(1).endswith("_bucket") and types.get(fam) == "histogram" and 'le="' not in (m.group(2) or ""):
            problems.append(f"bucket without le {line!r}")
        seen.add(fam)
    if not order or order[-1] != fam:
        if fam in order: problems.append(f"lines of {fam} are not one group")
        order.append(fam)
for name, t in types.items():
    if name not in helps: problems.append(f"{name}: no HELP")
    if t == "counter" and not name.endswith("_total"): problems.append(f"counter {name} does not end in _total")
    if t != "counter" and name.endswith("_total"): problems.append(f"{t} {name} ends in _total")
for p in problems:
    print(p)
sys.exit(1 if problems else 0)
EOF
for f in m1 m2; do
  check "$f: exposition parses, counters end in _total, nothing else does" \
    'python3 "$WORK/check.py" "$WORK/$f.txt" >"$WORK/$f.check" || { cat "$WORK/$f.check"; false; }'
done
M="$WORK/m2.txt"
check "renamed: starserve_kv_pages_capacity per rank, no starserve_kv_pages_total" \
  'grep -q "^starserve_kv_pages_capacity{rank=\"0\"} [1-9]" "$M" && ! grep -q "starserve_kv_pages_total" "$M"'
check "merges and merge time typed counter" \
  'grep -q "^# TYPE starserve_merges_total counter$" "$M" && grep -q "^# TYPE starserve_merge_seconds_total counter$" "$M"'
check "request counter counts the completion" 'grep -q "^starserve_requests_total{rpc=\"Complete\",status=\"OK\"} 1$" "$M"'
check "generated tokens counted" 'grep -q "^starserve_generated_tokens_total 4$" "$M"'
check "time to first token observed" 'grep -q "^starserve_time_to_first_token_seconds_count 1$" "$M"'
check "KV pages used per rank" 'grep -q "^starserve_kv_pages_used{rank=\"0\"} " "$M"'

echo "$PASSES passed, $FAILS failed"
[ $FAILS = 0 ]
