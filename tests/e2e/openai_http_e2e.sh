#!/usr/bin/env bash
# End-to-end test of the OpenAI-compatible HTTP API: real `mpirun -np 2 starserve serve` on the default model (CPU
# backend) with --http-port and an API key, checked with curl and with the official `openai` Python SDK, against
# starctl over gRPC on the same server:
#   - /health, /health/ready, /v1/models (and /v1/models/{id}, an unknown id 404);
#   - /v1/completions (text and token-id prompts, the context/query split, logprobs) and /v1/chat/completions, each
#     greedy output equal to starctl's for the same request; streams framed as `data: {...}` events ending in one
#     `data: [DONE]`, whose deltas join to the unary output, usage on a last choice-less chunk when asked;
#   - errors in OpenAI's shape: 401 without or with a wrong key, 400 naming the param, 404 unknown route or model,
#     413 over the body limit;
#   - a client that leaves a stream mid-way cancels its request (it ends long before its max_tokens; the metrics
#     count it CANCELLED), and the next request is answered normally;
#   - the SDK (from scripts/common.sh's venv, third_party/venv): completions.create, streaming, chat.completions.create
#     (SKIP when the venv has no openai package);
#   - HTTPS with the server's --tls-cert/--tls-key on a one-rank server (SKIP without the openssl command).
# Usage: openai_http_e2e.sh BIN_DIR MODEL. Every wait is bounded; the servers are stopped on exit.
set -uo pipefail
BIN="$1" MODEL="$2"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${STARSERVE_VENV:-$ROOT/third_party/venv}"
WORK="$(mktemp -d)"
MPI_PID="" TLS_PID=""
cleanup() {
  stop_pid "$MPI_PID" 40 0.25
  stop_pid "$TLS_PID" 40 0.25
  rm -rf "$WORK"
}
trap cleanup EXIT

source "$(dirname "$0")/e2e_lib.sh"

KEY="e2e-http-key"
PORT=$(free_port) HPORT=$(free_port) MPORT=$(free_port)
mpirun --oversubscribe --allow-run-as-root -np 2 "$BIN/starserve" serve --model "$MODEL" --host 127.0.0.1 \
  --port "$PORT" --http-port "$HPORT" --metrics-port "$MPORT" --api-key "$KEY" --max-prompt-tokens 512 \
  --log-level warn >"$WORK/server.log" 2>&1 &
MPI_PID=$!
CTL=("$BIN/starctl" --address "127.0.0.1:$PORT" --api-key "$KEY" --timeout 300)
wait_ready
check "server ready on 2 ranks" '[ $? = 0 ]'
kill -0 "$MPI_PID" 2>/dev/null || { cat "$WORK/server.log"; echo "$PASSES passed, $FAILS failed"; exit 1; }

URL="http://127.0.0.1:$HPORT"
# req METHOD PATH OUT [BODY] [curl args...]: the HTTP status on stdout, the body in $WORK/OUT (with the key).
req() {
  local method="$1" path="$2" out="$3" body="${4:-}"
  shift 4 2>/dev/null || shift $#
  local args=(-s -o "$WORK/$out" -w '%{http_code}' -X "$method" -H "Authorization: Bearer $KEY" --max-time 300)
  [ -n "$body" ] && args+=(-H 'Content-Type: application/json' --data-binary "$body")
  curl "${args[@]}" "$@" "$URL$path"
}
# js FILE EXPR: a Python expression over the JSON in $WORK/FILE (as `j`), printed.
js() { python3 -c "import json, sys; j = json.load(open(sys.argv[1])); print($2)" "$WORK/$1"; }
# is_error FILE TYPE [PARAM]: OpenAI's error shape with that type (and param).
is_error() {
  python3 -c "
import json, sys
e = json.load(open(sys.argv[1]))['error']
ok = set(e) == {'message', 'type', 'param', 'code'} and e['message'] and e['type'] == sys.argv[2]
if len(sys.argv) > 3: ok = ok and e['param'] == sys.argv[3]
sys.exit(not ok)" "$WORK/$1" "${@:2}" 2>/dev/null
}
metric() { curl -s "http://127.0.0.1:$MPORT/metrics" | awk -v n="$1 " 'index($0, n) == 1 { print $NF }'; }

# --- health and models
check "GET /health: 200" '[ "$(req GET /health h.json)" = 200 ]'
check "GET /health/ready: 200 ready" '[ "$(req GET /health/ready r.json)" = 200 ] && [ "$(js r.json "j[\"status\"]")" = ready ]'
check "GET /v1/models: 200" '[ "$(req GET /v1/models m.json)" = 200 ]'
MODEL_ID=$(js m.json 'j["data"][0]["id"]')
check "models: a list of one model ($MODEL_ID)" \
  '[ "$(js m.json "(j[\"object\"], len(j[\"data\"]), j[\"data\"][0][\"object\"])")" = "('"'"'list'"'"', 1, '"'"'model'"'"')" ] && [ -n "$MODEL_ID" ]'
ENC_ID=$(python3 -c "import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))" "$MODEL_ID")
check "GET /v1/models/{id}: 200" '[ "$(req GET "/v1/models/$ENC_ID" m1.json)" = 200 ] && [ "$(js m1.json "j[\"id\"]")" = "$MODEL_ID" ]'
check "GET /v1/models/nope: 404 model_not_found" \
  '[ "$(req GET /v1/models/nope m2.json)" = 404 ] && is_error m2.json invalid_request_error && [ "$(js m2.json "j[\"error\"][\"code\"]")" = model_not_found ]'

# --- completions, against starctl
PROMPT="The capital of France is"
BODY=$(python3 -c "import json, sys; print(json.dumps({'model': sys.argv[1], 'prompt': sys.argv[2], 'max_tokens': 12, 'temperature': 0}))" "$MODEL_ID" "$PROMPT")
check "POST /v1/completions: 200" '[ "$(req POST /v1/completions c.json "$BODY")" = 200 ]'
check "completion: OpenAI's shape (id cmpl-, text_completion, one choice, usage adds up)" 'python3 -c "
import json, sys
j = json.load(open(sys.argv[1])); c = j[\"choices\"][0]; u = j[\"usage\"]
ok = j[\"id\"].startswith(\"cmpl-\") and j[\"object\"] == \"text_completion\" and j[\"model\"] == sys.argv[2]
ok = ok and isinstance(j[\"created\"], int) and len(j[\"choices\"]) == 1 and c[\"index\"] == 0 and c[\"text\"]
ok = ok and c[\"finish_reason\"] in (\"stop\", \"length\") and c[\"logprobs\"] is None
ok = ok and u[\"prompt_tokens\"] + u[\"completion_tokens\"] == u[\"total_tokens\"] and u[\"completion_tokens\"] == len(c[\"token_ids\"])
sys.exit(not ok)" "$WORK/c.json" "$MODEL_ID"'
TEXT=$(js c.json 'j["choices"][0]["text"]')
"${CTL[@]}" complete --prompt "$PROMPT" --max-tokens 12 --temperature 0 >"$WORK/ctl_c.txt" 2>/dev/null
# same_text FILE.json EXPR CTL_FILE: the JSON text equals starctl's output (starctl ends it with a newline).
same_text() {
  python3 -c "
import json, sys
t = eval(sys.argv[2], {'j': json.load(open(sys.argv[1]))})
sys.exit(not (t and open(sys.argv[3], encoding='utf-8', errors='replace').read() == t + '\n'))" "$WORK/$1" "$2" "$WORK/$3"
}
check "completion text equals gRPC's (starctl complete)" 'same_text c.json "j[\"choices\"][0][\"text\"]" ctl_c.txt'

IDS=$("${CTL[@]}" tokenize --ids-only "$PROMPT" | python3 -c "import json, sys; print(json.load(sys.stdin)['token_ids'])")
BODY_IDS=$(python3 -c "import json, sys; print(json.dumps({'prompt': json.loads(sys.argv[1]), 'max_tokens': 12, 'temperature': 0}))" "$IDS")
check "token-id prompt: 200, the same text" \
  '[ "$(req POST /v1/completions ids.json "$BODY_IDS")" = 200 ] && [ "$(js ids.json "j[\"choices\"][0][\"text\"]")" = "$TEXT" ]'

# The context/query split and an attention mode, as extensions in the body.
DOC="The lighthouse on the northern cliff was finished in the spring of 1871. Its keeper, Ada Morrow, kept a log of \
every ship that passed and every storm that came in from the sea."
QUESTION=" Question: who kept the lighthouse? Answer:"
printf '%s' "$DOC" >"$WORK/doc.txt"
BODY_SPLIT=$(python3 -c "import json, sys; print(json.dumps({'prompt': sys.argv[2], 'context': sys.argv[1], 'max_tokens': 8, 'temperature': 0, 'attention_mode': 'star', 'block_size': 16}))" "$DOC" "$QUESTION")
check "context + prompt (split): 200, context tokens in usage" \
  '[ "$(req POST /v1/completions split.json "$BODY_SPLIT")" = 200 ] && [ "$(js split.json "j[\"usage\"][\"context_tokens\"] > 0")" = True ]'
"${CTL[@]}" complete --context-file "$WORK/doc.txt" --query "$QUESTION" --max-tokens 8 --temperature 0 --attention star \
  --block-size 16 >"$WORK/ctl_split.txt" 2>/dev/null
check "split text equals gRPC's (starctl complete --context-file --query)" \
  'same_text split.json "j[\"choices\"][0][\"text\"]" ctl_split.txt'

BODY_LP=$(python3 -c "import json, sys; print(json.dumps({'prompt': sys.argv[1], 'max_tokens': 6, 'temperature': 0, 'logprobs': 2}))" "$PROMPT")
check "logprobs 2: one entry per token, at most 2 alternatives, logprobs <= 0" \
  '[ "$(req POST /v1/completions lp.json "$BODY_LP")" = 200 ] && python3 -c "
import json, sys
j = json.load(open(sys.argv[1])); c = j[\"choices\"][0]; lp = c[\"logprobs\"]; n = j[\"usage\"][\"completion_tokens\"]
ok = n > 0 and len(lp[\"tokens\"]) == len(lp[\"token_logprobs\"]) == len(lp[\"top_logprobs\"]) == len(lp[\"text_offset\"]) == n
ok = ok and all(x <= 0 for x in lp[\"token_logprobs\"]) and all(1 <= len(t) <= 2 for t in lp[\"top_logprobs\"])
ok = ok and lp[\"text_offset\"] == sorted(lp[\"text_offset\"])
sys.exit(not ok)" "$WORK/lp.json"'

# --- streaming
# sse_check FILE OBJECT [include_usage]: every event is `data: ...` followed by a blank line, the last is the only
# [DONE], the others are JSON chunks of OBJECT with one id, exactly one finish_reason; prints the joined text.
sse_check() {
  python3 - "$WORK/$1" "$2" "${3:-}" <<'EOF'
import json, sys
raw = open(sys.argv[1], encoding="utf-8").read()
obj, usage = sys.argv[2], sys.argv[3] == "usage"
assert raw.endswith("\n\n"), "events end with a blank line"
events = raw[:-2].split("\n\n")
assert all(e.startswith("data: ") and "\n" not in e for e in events), "one data line per event"
payloads = [e[len("data: "):] for e in events]
assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1, "one [DONE], last"
chunks = [json.loads(p) for p in payloads[:-1]]
assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == obj for c in chunks)
if usage:
    last = chunks.pop()
    assert last["choices"] == [] and last["usage"]["total_tokens"] > 0, "usage chunk"
else:
    assert all("usage" not in c for c in chunks)
finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"] is not None]
assert len(finish) == 1 and chunks[-1]["choices"][0]["finish_reason"] == finish[0], "one finish_reason, last"
if obj == "chat.completion.chunk":
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
else:
    text = "".join(c["choices"][0]["text"] for c in chunks)
assert len(chunks) >= 2, "more than one chunk"
print(text, end="")
EOF
}
BODY_S=$(python3 -c "import json, sys; b = json.loads(sys.argv[1]); b['stream'] = True; print(json.dumps(b))" "$BODY")
req POST /v1/completions s.txt "$BODY_S" -N >"$WORK/s.code"
check "stream: 200, text/event-stream" '[ "$(cat "$WORK/s.code")" = 200 ]'
S_TEXT=$(sse_check s.txt text_completion 2>"$WORK/sse.err")
check "stream: SSE framing, one finish_reason, one [DONE] last" '[ -n "$S_TEXT" ] || { cat "$WORK/sse.err"; false; }'
check "stream: the deltas join to the unary text" '[ "$S_TEXT" = "$TEXT" ]'
BODY_SU=$(python3 -c "import json, sys; b = json.loads(sys.argv[1]); b['stream_options'] = {'include_usage': True}; print(json.dumps(b))" "$BODY_S")
req POST /v1/completions su.txt "$BODY_SU" -N >/dev/null
check "stream_options.include_usage: a last chunk with usage, no choices" '[ "$(sse_check su.txt text_completion usage)" = "$TEXT" ]'
check "stream header: Content-Type text/event-stream" \
  'curl -s -N -D - -o /dev/null -H "Authorization: Bearer $KEY" --data-binary "$BODY_S" "$URL/v1/completions" | grep -qi "^content-type: text/event-stream"'

# --- chat
USER_MSG="What is the capital of France?"
BODY_CHAT=$(python3 -c "import json, sys; print(json.dumps({'model': sys.argv[1], 'messages': [{'role': 'user', 'content': sys.argv[2]}], 'max_tokens': 12, 'temperature': 0}))" "$MODEL_ID" "$USER_MSG")
check "POST /v1/chat/completions: 200" '[ "$(req POST /v1/chat/completions chat.json "$BODY_CHAT")" = 200 ]'
check "chat: OpenAI's shape (chatcmpl-, chat.completion, assistant message)" 'python3 -c "
import json, sys
j = json.load(open(sys.argv[1])); c = j[\"choices\"][0]
ok = j[\"id\"].startswith(\"chatcmpl-\") and j[\"object\"] == \"chat.completion\" and c[\"message\"][\"role\"] == \"assistant\"
ok = ok and c[\"message\"][\"content\"] and c[\"finish_reason\"] in (\"stop\", \"length\") and j[\"usage\"][\"total_tokens\"] > 0
sys.exit(not ok)" "$WORK/chat.json"'
CHAT_TEXT=$(js chat.json 'j["choices"][0]["message"]["content"]')
"${CTL[@]}" chat --prompt "$USER_MSG" --max-tokens 12 --temperature 0 >"$WORK/ctl_chat.txt" 2>/dev/null
check "chat reply equals gRPC's (starctl chat)" 'same_text chat.json "j[\"choices\"][0][\"message\"][\"content\"]" ctl_chat.txt'
BODY_CS=$(python3 -c "import json, sys; b = json.loads(sys.argv[1]); b['stream'] = True; print(json.dumps(b))" "$BODY_CHAT")
req POST /v1/chat/completions cs.txt "$BODY_CS" -N >/dev/null
check "chat stream: framing, role on the first delta, the deltas join to the reply" \
  '[ "$(sse_check cs.txt chat.completion.chunk)" = "$CHAT_TEXT" ]'
BODY_CLP=$(python3 -c "import json, sys; b = json.loads(sys.argv[1]); b.update(logprobs=True, top_logprobs=3); print(json.dumps(b))" "$BODY_CHAT")
check "chat logprobs: one entry per token with bytes and <= 3 alternatives" \
  '[ "$(req POST /v1/chat/completions clp.json "$BODY_CLP")" = 200 ] && python3 -c "
import json, sys
j = json.load(open(sys.argv[1])); lp = j[\"choices\"][0][\"logprobs\"][\"content\"]
ok = len(lp) == j[\"usage\"][\"completion_tokens\"] > 0 and all(e[\"logprob\"] <= 0 and isinstance(e[\"bytes\"], list) and len(e[\"top_logprobs\"]) <= 3 for e in lp)
sys.exit(not ok)" "$WORK/clp.json"'

# --- errors
code=$(curl -s -o "$WORK/e401.json" -w '%{http_code}' --data-binary "$BODY" "$URL/v1/completions")
check "no key: 401 authentication_error" '[ "$code" = 401 ] && is_error e401.json authentication_error'
code=$(curl -s -o "$WORK/e401b.json" -w '%{http_code}' -H "Authorization: Bearer wrong" --data-binary "$BODY" "$URL/v1/completions")
check "wrong key: 401" '[ "$code" = 401 ] && is_error e401b.json authentication_error'
code=$(curl -s -o "$WORK/e401c.json" -w '%{http_code}' "$URL/v1/models")
check "no key on /v1/models: 401" '[ "$code" = 401 ] && is_error e401c.json authentication_error'
bad() {  # bad NAME ENDPOINT BODY STATUS TYPE [PARAM]
  local got ok=0
  got=$(req POST "$2" "$1.json" "$3")
  [ "$got" = "$4" ] && is_error "$1.json" "${@:5}" && ok=1
  check "$1: $4 ${6:-}" '[ $ok = 1 ] || { echo "got $got: $(cat "$WORK/$1.json")"; false; }'
}
bad max_tokens_0 /v1/completions '{"prompt": "hi", "max_tokens": 0}' 400 invalid_request_error max_tokens
bad temperature_text /v1/completions '{"prompt": "hi", "temperature": "hot"}' 400 invalid_request_error temperature
bad top_p_2 /v1/completions '{"prompt": "hi", "top_p": 2}' 400 invalid_request_error top_p
bad mode_bogus /v1/completions '{"prompt": "hi", "attention_mode": "bogus"}' 400 invalid_request_error attention_mode
bad n_17 /v1/completions '{"prompt": "hi", "n": 17}' 400 invalid_request_error n
bad no_prompt /v1/completions '{"max_tokens": 4}' 400 invalid_request_error prompt
bad not_json /v1/completions '{"prompt": "hi",' 400 invalid_request_error
bad no_messages /v1/chat/completions '{"messages": []}' 400 invalid_request_error messages
bad top_logprobs_21 /v1/chat/completions '{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}' \
  400 invalid_request_error top_logprobs
bad other_model /v1/completions '{"model": "gpt-4", "prompt": "hi"}' 404 invalid_request_error
LONG=$(python3 -c "import json; print(json.dumps({'prompt': ' '.join(['lighthouse'] * 700), 'max_tokens': 4}))")
got=$(req POST /v1/completions long.json "$LONG")
check "prompt over max_prompt_tokens: 400 naming the limit" \
  '[ "$got" = 400 ] && is_error long.json invalid_request_error && grep -q max_prompt_tokens "$WORK/long.json"'
python3 -c "import json; open('$WORK/huge.json', 'w').write(json.dumps({'prompt': 'a' * (17 << 20)}))"
got=$(curl -s -o "$WORK/huge_out.json" -w '%{http_code}' -H "Authorization: Bearer $KEY" --data-binary @"$WORK/huge.json" "$URL/v1/completions")
check "body over max_message_bytes: 413 in the error shape" '[ "$got" = 413 ] && is_error huge_out.json invalid_request_error'
got=$(req GET /v1/nothing-here nf.json)
check "unknown route: 404 in the error shape" '[ "$got" = 404 ] && is_error nf.json invalid_request_error'

# --- a client that leaves mid-stream
LAYERS=$("${CTL[@]}" info | python3 -c "import json, sys; m = json.load(sys.stdin)['model']; print(m.get('n_layers', m.get('nLayers')))" 2>/dev/null)
MERGES0=$(metric starserve_merges_total)
BODY_LONG=$(python3 -c "import json; print(json.dumps({'prompt': 'Once upon a time', 'max_tokens': 4000, 'ignore_eos': True, 'temperature': 0, 'stream': True}))")
curl -s -N -H "Authorization: Bearer $KEY" --data-binary "$BODY_LONG" "$URL/v1/completions" >"$WORK/gone.txt" &
CURL_PID=$!
for _ in $(seq 1 600); do [ "$(grep -c '^data: ' "$WORK/gone.txt")" -ge 3 ] && break; sleep 0.1; done
check "long stream: tokens arrive" '[ "$(grep -c "^data: " "$WORK/gone.txt")" -ge 3 ]'
kill -KILL "$CURL_PID" 2>/dev/null
wait "$CURL_PID" 2>/dev/null
for _ in $(seq 1 240); do [ "$(metric starserve_requests_running)" = 0 ] && break; sleep 0.25; done
check "after the disconnect nothing runs" '[ "$(metric starserve_requests_running)" = 0 ]'
MERGES1=$(metric starserve_merges_total)
check "the request ended long before its 4000 tokens (merges $MERGES0 -> $MERGES1, $LAYERS layers)" \
  'python3 -c "import sys; a, b, l = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]); sys.exit(not (l > 0 and (b - a) / l < 1000))" "$MERGES0" "$MERGES1" "$LAYERS"'
check "metrics: the stream counted CANCELLED" \
  '[ "$(metric "starserve_requests_total{rpc=\"POST /v1/completions\",status=\"CANCELLED\"}")" = 1 ]'
check "after the disconnect: a normal request, the same text" \
  '[ "$(req POST /v1/completions after.json "$BODY")" = 200 ] && [ "$(js after.json "j[\"choices\"][0][\"text\"]")" = "$TEXT" ]'

# --- the official openai SDK
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import openai" 2>/dev/null; then
  "$VENV/bin/python" - "$URL/v1" "$KEY" "$MODEL_ID" "$PROMPT" "$TEXT" "$USER_MSG" "$CHAT_TEXT" >"$WORK/sdk.out" 2>&1 <<'EOF'
import sys
import openai
url, key, model, prompt, text, user_msg, chat_text = sys.argv[1:8]
client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=300)

def check(name, cond):
    print(("PASS: " if cond else "FAIL: ") + "sdk " + name, flush=True)

def attempt(name, fn):
    try:
        check(name, fn())
    except Exception as e:  # a failure of the call is a failed check, with its reason
        print(f"FAIL: sdk {name}: {type(e).__name__}: {e}", flush=True)

attempt("models.list names the served model", lambda: [m.id for m in client.models.list()] == [model])
attempt("completions.create: greedy text equals gRPC's", lambda: client.completions.create(
    model=model, prompt=prompt, max_tokens=12, temperature=0).choices[0].text == text)
attempt("completions.create(stream=True): the chunks join to the same text", lambda: "".join(
    c.choices[0].text for c in client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                                         stream=True) if c.choices) == text)
attempt("chat.completions.create: the reply equals gRPC's", lambda: client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": user_msg}], max_tokens=12,
    temperature=0).choices[0].message.content == chat_text)
attempt("chat.completions.create(stream=True): the deltas join to the same reply", lambda: "".join(
    c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": user_msg}], max_tokens=12, temperature=0, stream=True)
    if c.choices) == chat_text)
attempt("completions.create(n=3): three choices, indexed, each the greedy text", lambda: sorted(
    (c.index, c.text) for c in client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                                          n=3).choices) == [(0, text), (1, text), (2, text)])

def joined(chunks, n):
    out = [""] * n
    for c in chunks:
        for ch in c.choices:
            out[ch.index] += ch.delta.content or "" if hasattr(ch, "delta") else ch.text
    return out

attempt("completions.create(n=2, stream=True): each choice's chunks join to the greedy text", lambda: joined(
    client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, n=2, stream=True), 2)
    == [text, text])
attempt("chat.completions.create(n=2): two replies, each gRPC's", lambda: [c.message.content for c in
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": user_msg}], max_tokens=12,
                                   temperature=0, n=2).choices] == [chat_text, chat_text])
attempt("extra_body attention_mode: usage carries the split", lambda: client.completions.create(
    model=model, prompt=prompt, max_tokens=4, temperature=0,
    extra_body={"attention_mode": "global"}).usage.total_tokens > 0)

def raises(exc, fn):
    try:
        fn()
    except exc:
        return True
    return False

attempt("a wrong key raises AuthenticationError", lambda: raises(openai.AuthenticationError, lambda: openai.OpenAI(
    base_url=url, api_key="wrong", max_retries=0).completions.create(model=model, prompt=prompt, max_tokens=2)))
attempt("max_tokens = 0 raises BadRequestError", lambda: raises(openai.BadRequestError, lambda: client.completions.create(
    model=model, prompt=prompt, max_tokens=0)))
EOF
  while IFS= read -r line; do
    case "$line" in
      "PASS: "*) pass "${line#PASS: }" ;;
      "FAIL: "*) fail "${line#FAIL: }" ;;
    esac
  done <"$WORK/sdk.out"
  check "sdk: every check ran" '[ "$(grep -c "^PASS: sdk\|^FAIL: sdk" "$WORK/sdk.out")" = 11 ] || { cat "$WORK/sdk.out"; false; }'
else
  echo "SKIP: the openai SDK ($VENV has no openai package; scripts/common.sh install_packages makes it)"
fi

# --- HTTPS: a one-rank server with a self-signed certificate
if command -v openssl >/dev/null 2>&1; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout "$WORK/key.pem" -out "$WORK/cert.pem" >/dev/null 2>&1
  TPORT=$(free_port) THPORT=$(free_port)
  mpirun --oversubscribe --allow-run-as-root -np 1 "$BIN/starserve" serve --model "$MODEL" --host 127.0.0.1 \
    --port "$TPORT" --http-port "$THPORT" --tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem" --log-level warn \
    >"$WORK/tls.log" 2>&1 &
  TLS_PID=$!
  tls_ready=0
  for _ in $(seq 1 480); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' --cacert "$WORK/cert.pem" "https://localhost:$THPORT/health/ready")" = 200 ]; then
      tls_ready=1; break
    fi
    kill -0 "$TLS_PID" 2>/dev/null || break
    sleep 0.25
  done
  check "HTTPS: handshake with the server's certificate, ready" '[ $tls_ready = 1 ]'
  got=$(curl -s -o "$WORK/tls.json" -w '%{http_code}' --cacert "$WORK/cert.pem" --data-binary "$BODY" --max-time 300 \
    "https://localhost:$THPORT/v1/completions")
  check "HTTPS: a completion" '[ "$got" = 200 ] && [ -n "$(js tls.json "j[\"choices\"][0][\"text\"]")" ]'
  # A client that leaves an HTTPS stream: the server goes on answering.
  curl -s -N --cacert "$WORK/cert.pem" --data-binary "$BODY_LONG" "https://localhost:$THPORT/v1/completions" \
    >"$WORK/tls_gone.txt" &
  CURL_PID=$!
  for _ in $(seq 1 600); do [ "$(grep -c '^data: ' "$WORK/tls_gone.txt")" -ge 3 ] && break; sleep 0.1; done
  kill -KILL "$CURL_PID" 2>/dev/null
  wait "$CURL_PID" 2>/dev/null
  got=$(curl -s -o "$WORK/tls2.json" -w '%{http_code}' --cacert "$WORK/cert.pem" --data-binary "$BODY" --max-time 300 \
    "https://localhost:$THPORT/v1/completions")
  check "HTTPS: after a client left a stream, the next completion is answered" \
    '[ "$(grep -c "^data: " "$WORK/tls_gone.txt")" -ge 3 ] && [ "$got" = 200 ] && kill -0 "$TLS_PID"'
  got=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "http://localhost:$THPORT/health")
  check "HTTPS port: plain HTTP gets no answer" '[ "$got" != 200 ]'
else
  echo "SKIP: HTTPS (no openssl command)"
fi

echo "$PASSES passed, $FAILS failed"
[ "$FAILS" = 0 ] || { echo "--- server log"; tail -50 "$WORK/server.log"; exit 1; }
