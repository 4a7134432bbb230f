#!/usr/bin/env bash
# The checks are strings that check() evals (SC2016, SC2034); cleanup runs from the trap (SC2317).
# shellcheck disable=SC2016,SC2034,SC2317
# The release check of the CPU image (README "Several machines"): deploy/check_manifests.py, then it builds the
# Dockerfile and, inside the image,
#   1. `starserve generate` on 2 MPI ranks (global, then star attention over the two ranks);
#   2. `starserve serve` on 2 ranks with its ports published, answered by `starctl` and curl from the host;
#   3. a drain: `stop --time GRACE` while a stream runs: SIGTERM must reach rank 0 through the entry point (PID 1),
#      the stream must finish, new requests must be refused, and the container must exit 0 before the grace ends.
# Usage: scripts/container_check.sh                 (podman, else docker; CONTAINER_ENGINE=docker picks one)
# Settings: STARSERVE_IMAGE (starserve:cpu), STARSERVE_CHECK_DOCKERFILE (Dockerfile; Dockerfile.cuda checks the CUDA
# image, whose binaries take the CPU backend where no GPU is visible), STARSERVE_CHECK_BUILD=0 (use the image as it is),
# STARSERVE_CHECK_SOURCE (the commit to build, HEAD; `worktree`: the working tree as it is),
# STARSERVE_CHECK_BUILD_ARGS (more build flags, e.g. --no-cache to time a cold build),
# STARSERVE_CHECK_DRAIN_TOKENS (the stream running through the drain, 40 tokens: about 2 s on 2 cores; the server
# gives running requests 5 s after SIGTERM today),
# STARSERVE_CHECK_GRACE (stop's grace period, 30 s), STARCTL (the client run on the host; default the image's
# own, copied out, which needs the host's gRPC libraries as a Debian 12 build of starserve does).
# Every wait is bounded; the containers are removed on exit. Exit status: the number of failures.
set -uo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${STARSERVE_IMAGE:-starserve:cpu}"
DOCKERFILE="${STARSERVE_CHECK_DOCKERFILE:-Dockerfile}"
GRACE="${STARSERVE_CHECK_GRACE:-30}"
ENGINE="${CONTAINER_ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}"
# Podman on these machines: runc and ulimits from /etc/containers/containers.conf (/work/shared/containers).
if [ "$ENGINE" = podman ] && [ -z "${CONTAINERS_CONF:-}" ] && [ -f /etc/containers/containers.conf ]; then
  export CONTAINERS_CONF=/etc/containers/containers.conf
fi
WORK="$(mktemp -d)"
NAME="starserve-check-$$"
FAILS=0 PASSES=0
cleanup() {
  "$ENGINE" rm -f -t 0 "$NAME" >/dev/null 2>&1 || "$ENGINE" rm -f "$NAME" >/dev/null 2>&1
  [ -n "${BG:-}" ] && kill "$BG" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
say() { printf '\033[1m[container_check]\033[0m %s\n' "$*"; }
pass() { echo "PASS: $1"; PASSES=$((PASSES + 1)); }
fail() { echo "FAIL: $1"; FAILS=$((FAILS + 1)); }
check() { if eval "$2"; then pass "$1"; else fail "$1"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
say "engine: $("$ENGINE" --version)"

# --- 0. the deploy files against the Dockerfile (static) ---------------------------------------------------------
if python3 "$REPO_ROOT/deploy/check_manifests.py" "$REPO_ROOT" >"$WORK/manifests.log" 2>&1; then
  pass "deploy/check_manifests.py: k8s and compose files match the image"
else
  cat "$WORK/manifests.log"
  fail "deploy/check_manifests.py"
fi

# --- 1. build ----------------------------------------------------------------------------------------------------
# The build context is a commit's tree (git archive), not the working tree: what is released, and nothing that
# someone is editing meanwhile. STARSERVE_CHECK_SOURCE=worktree builds the working tree instead.
SOURCE="${STARSERVE_CHECK_SOURCE:-HEAD}"
if [ "${STARSERVE_CHECK_BUILD:-1}" != 0 ]; then
  if [ "$SOURCE" = worktree ]; then
    CTX="$REPO_ROOT"
  else
    CTX="$WORK/src"
    mkdir -p "$CTX"
    git -C "$REPO_ROOT" archive "$SOURCE" | tar -x -C "$CTX" || { fail "git archive $SOURCE"; exit "$FAILS"; }
    SOURCE="$SOURCE = $(git -C "$REPO_ROOT" rev-parse --short "$SOURCE")"
  fi
  say "building $IMAGE from $SOURCE ($CTX/$DOCKERFILE)"
  t0=$(now)
  # shellcheck disable=SC2086  # a list of flags
  if "$ENGINE" build ${STARSERVE_CHECK_BUILD_ARGS:-} -t "$IMAGE" -f "$CTX/$DOCKERFILE" "$CTX" \
    >"$WORK/build.log" 2>&1; then
    pass "image builds ($(since "$t0") s)"
  else
    tail -n 40 "$WORK/build.log"
    fail "image builds"
    exit "$FAILS"
  fi
  grep -A20 'runtime-packages.txt' "$WORK/build.log" | grep -E '^[a-z0-9][a-z0-9.+-]*$' | tr '\n' ' ' |
    sed 's/^/runtime packages: /'
  echo
fi
"$ENGINE" image exists "$IMAGE" 2>/dev/null || "$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1 ||
  { fail "image $IMAGE exists"; exit "$FAILS"; }
say "image $IMAGE: $("$ENGINE" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')"

# --- 2. generate on 2 ranks inside the image ------------------------------------------------------------------------
say "run --rm $IMAGE   (the image's default: a chat generation on STARSERVE_RANKS=2 ranks)"
t0=$(now)
"$ENGINE" run --rm "$IMAGE" >"$WORK/gen.out" 2>"$WORK/gen.err"
rc=$?
echo "--- stdout:"; cat "$WORK/gen.out"; echo "--- stderr (last 6 lines):"; tail -n 6 "$WORK/gen.err"
check "generate, 2 ranks, global: exit 0 and text ($(since "$t0") s)" '[ $rc = 0 ] && [ -s "$WORK/gen.out" ]'

# A plain prompt: the engine splits context and query; star attention encodes the context in one block per rank.
doc="The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
doc="$doc$doc$doc$doc$doc$doc The pass key is 48213. Remember it. $doc$doc$doc$doc$doc$doc"
say "run --rm $IMAGE generate --attention star --prompt '<document> What is the pass key?' (2 ranks)"
t0=$(now)
"$ENGINE" run --rm "$IMAGE" generate --attention star --prompt "$doc What is the pass key? The pass key is" \
  --max-tokens 8 --temperature 0 >"$WORK/star.out" 2>"$WORK/star.err"
rc=$?
echo "--- stdout:"; cat "$WORK/star.out"; echo "--- stderr (last 6 lines):"; tail -n 6 "$WORK/star.err"
check "generate, 2 ranks, star: exit 0 and text ($(since "$t0") s)" '[ $rc = 0 ] && [ -s "$WORK/star.out" ]'

# --- 3. serve, answered from the host ----------------------------------------------------------------------------
# The client of the same build as the server: the image's starctl, copied out and run on the host.
if [ -z "${STARCTL:-}" ]; then
  id=$("$ENGINE" create "$IMAGE")
  "$ENGINE" cp "$id:/opt/starserve/bin/starctl" "$WORK/starctl" && "$ENGINE" rm "$id" >/dev/null
  STARCTL="$WORK/starctl"
fi
say "host client: $STARCTL"
PORT=$(free_port) MPORT=$(free_port)
CTL=("$STARCTL" --address "127.0.0.1:$PORT")
say "run -d -p 127.0.0.1:$PORT:50051 -p 127.0.0.1:$MPORT:9090 $IMAGE serve --port 50051 --metrics-port 9090"
t0=$(now)
"$ENGINE" run -d --name "$NAME" -p "127.0.0.1:$PORT:50051" -p "127.0.0.1:$MPORT:9090" "$IMAGE" \
  serve --port 50051 --metrics-port 9090 --attention star >/dev/null
ready=0
for _ in $(seq 1 300); do
  if "${CTL[@]}" --timeout 2 health --ready >/dev/null 2>&1; then ready=1; break; fi
  [ "$("$ENGINE" inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null)" = true ] || break
  sleep 1
done
check "serve, 2 ranks: readiness SERVING through the published port ($(since "$t0") s)" '[ $ready = 1 ]'
if [ $ready != 1 ]; then "$ENGINE" logs "$NAME" 2>&1 | tail -n 30; exit "$FAILS"; fi
"${CTL[@]}" --timeout 300 complete "The capital of France is" --max-tokens 12 --temperature 0 \
  >"$WORK/c.out" 2>"$WORK/c.err"
rc=$?
echo "--- starctl complete:"; cat "$WORK/c.out"; echo; cat "$WORK/c.err"
check "starctl complete from the host" '[ $rc = 0 ] && [ -s "$WORK/c.out" ]'
"${CTL[@]}" --timeout 300 chat --attention star "$doc What is the pass key? Answer with the number only." \
  --max-tokens 12 \
  --temperature 0 >"$WORK/chat.out" 2>"$WORK/chat.err"
rc=$?
echo "--- starctl chat --attention star:"; cat "$WORK/chat.out"; echo; cat "$WORK/chat.err"
check "starctl chat (star, document split over 2 ranks)" '[ $rc = 0 ] && [ -s "$WORK/chat.out" ]'
"${CTL[@]}" --timeout 30 info >"$WORK/info.out" 2>&1
check "starctl info reports 2 ranks" 'grep -Eq "\"(world_size|worldSize)\": *2" "$WORK/info.out"' ||
  cat "$WORK/info.out"
curl -sf "http://127.0.0.1:$MPORT/metrics" >"$WORK/metrics.out"
check "Prometheus text on the published metrics port ($(wc -l <"$WORK/metrics.out") lines)" \
  'grep -q "^starserve_" "$WORK/metrics.out"'

# --- 4. drain: stop --time GRACE while a stream runs -----------------------------------------------------------------
DRAIN_TOKENS="${STARSERVE_CHECK_DRAIN_TOKENS:-40}"
say "drain: a $DRAIN_TOKENS-token stream, then $ENGINE stop --time $GRACE once its first tokens arrived"
"${CTL[@]}" --timeout 300 stream "Once upon a time" --max-tokens "$DRAIN_TOKENS" --ignore-eos --temperature 0 \
  >"$WORK/s.out" 2>"$WORK/s.err" &
BG=$!
for _ in $(seq 1 200); do [ -s "$WORK/s.out" ] && break; sleep 0.1; done
t0=$(now)
"$ENGINE" stop --time "$GRACE" "$NAME" >/dev/null 2>"$WORK/stop.err" &
STOP=$!
sleep 1
"${CTL[@]}" --timeout 10 complete "Hello" --max-tokens 4 >"$WORK/late.out" 2>"$WORK/late.err"
late_rc=$?
wait "$BG"; stream_rc=$?; BG=""
wait "$STOP"; stop_rc=$?
stop_s=$(since "$t0")
exit_code=$("$ENGINE" inspect -f '{{.State.ExitCode}}' "$NAME" 2>/dev/null)
echo "--- stream (rc $stream_rc): $(wc -c <"$WORK/s.out") bytes of text; stderr:"; tail -n 3 "$WORK/s.err"
echo "--- request sent 1 s after SIGTERM (rc $late_rc): $(tr '\n' ' ' <"$WORK/late.err" | cut -c1-200)"
echo "--- stop: rc $stop_rc after $stop_s s; container exit code $exit_code; $(cat "$WORK/stop.err")"
echo "--- container log (last 15 lines):"; "$ENGINE" logs "$NAME" 2>&1 | tail -n 15
check "drain: the running stream finished its $DRAIN_TOKENS tokens" \
  '[ $stream_rc = 0 ] && grep -q "completion $DRAIN_TOKENS tokens" "$WORK/s.err"'
check "drain: a request after SIGTERM is refused" '[ $late_rc != 0 ]'
check "drain: the container exited within the grace period (${stop_s} s < $GRACE s)" \
  'python3 -c "import sys; sys.exit(not float(sys.argv[1]) < float(sys.argv[2]))" "$stop_s" "$GRACE"'
check "drain: exit code 0 (got $exit_code)" '[ "$exit_code" = 0 ]'

echo "container_check: $PASSES passed, $FAILS failed"
exit "$FAILS"
