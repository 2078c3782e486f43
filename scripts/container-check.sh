#!/usr/bin/env bash
# Container check: build the image, serve demo checkpoints with docker compose, call every endpoint, then
# restart and show that the compilation cache volume makes the second start-up faster.
#
#   bash scripts/container-check.sh
#
# Not part of the default test run (it needs a container engine and takes minutes). Exits non-zero on any
# failure. What it does:
#   1. finds a Docker API: $DOCKER_HOST or the local docker daemon, else starts the project's podman engine
#      (/work/shared/tools/container-engine.sh, or $CONTAINER_ENGINE_SCRIPT);
#   2. builds the CPU image (`docker build --network=host`) and checks it holds no torch/transformers/CUDA;
#   3. builds the demo checkpoints *inside the image* (albert-serve-demo --build-only: no torch there);
#   4. `compose up` with the repository's docker-compose.yml plus an override that mounts the demo
#      checkpoints and points ALBERT_*_MODEL at them, with a small bucket grid; waits for /ready;
#   5. calls /classify, /fill-mask, /qa and /ner and checks status 200 and the JSON shape; runs the
#      container's healthcheck command; checks the compilation cache volume was filled;
#   6. `compose down` (volumes kept) and `up` again: prints both start-up times and fails unless the second,
#      with the compilation cache, is faster;
#   7. `compose down -v`: removes this check's containers and volumes (the image is kept).
#
# Settings (environment): CHECK_IMAGE (albert-serve:container-check), CHECK_PORT (18080),
# CHECK_PROJECT (albert-serve-check), CHECK_READY_TIMEOUT (900 s), CHECK_SKIP_BUILD=1 to reuse the image.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${CHECK_IMAGE:-albert-serve:container-check}
PORT=${CHECK_PORT:-18080}
PROJECT=${CHECK_PROJECT:-albert-serve-check}
READY_TIMEOUT=${CHECK_READY_TIMEOUT:-900}
ENGINE_SCRIPT=${CONTAINER_ENGINE_SCRIPT:-/work/shared/tools/container-engine.sh}
BASE=http://127.0.0.1:$PORT

say() { printf '\n== %s\n' "$*"; }
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

# --- 1. container engine ---------------------------------------------------------------------------------
if ! docker version >/dev/null 2>&1; then
  if [[ -z ${DOCKER_HOST:-} && -f $ENGINE_SCRIPT ]]; then
    say "starting the container engine ($ENGINE_SCRIPT)"
    bash "$ENGINE_SCRIPT"
    export DOCKER_HOST=unix:///tmp/podman.sock
  fi
  docker version >/dev/null 2>&1 || fail "no container engine answers (DOCKER_HOST=${DOCKER_HOST:-unset})"
fi
if docker compose version >/dev/null 2>&1; then
  COMPOSE_BIN=(docker compose)
elif command -v docker-compose >/dev/null; then
  COMPOSE_BIN=(docker-compose)
else
  fail "neither 'docker compose' nor 'docker-compose' is installed"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/albert-container-check.XXXXXX")
MODELS=$WORK/models
mkdir -p "$MODELS"
cat >"$WORK/compose.check.yml" <<EOF
# Written by scripts/container-check.sh: the demo checkpoints, mounted read-only.
services:
  albert-serve:
    volumes:
      - $MODELS:/models:ro
EOF
# The repository's compose file reads model sources and settings from the environment.
export ALBERT_IMAGE=$IMAGE ALBERT_HOST_PORT=$PORT HF_HUB_OFFLINE=1
export ALBERT_CLASSIFY_MODEL=/models/classify ALBERT_FILL_MASK_MODEL=/models/fill-mask
export ALBERT_QA_MODEL=/models/qa ALBERT_NER_MODEL=/models/ner
export ALBERT_SEQ_BUCKETS=32,128 ALBERT_BATCH_SEQ_BUCKETS=128 ALBERT_BATCH_BUCKETS=1,4
COMPOSE=("${COMPOSE_BIN[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" -f "$WORK/compose.check.yml")

cleanup() {
  local status=$?
  if ((status != 0)); then
    "${COMPOSE[@]}" logs --no-color --tail=60 albert-serve 2>/dev/null || true
  fi
  "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$WORK" 2>/dev/null || true
}
trap cleanup EXIT

# --- 2. image --------------------------------------------------------------------------------------------
if [[ ${CHECK_SKIP_BUILD:-0} != 1 ]]; then
  say "building $IMAGE (CPU)"
  docker build --network=host -t "$IMAGE" "$ROOT"
fi
docker image inspect "$IMAGE" >/dev/null || fail "image $IMAGE not found"
IMAGE_BYTES=$(docker image inspect -f '{{.Size}}' "$IMAGE")
forbidden=$(docker run --rm --entrypoint sh "$IMAGE" -c \
  'pip list --format=freeze 2>/dev/null | grep -i -E "^(torch|transformers|nvidia-|jax-cuda)" || true')
[[ -z $forbidden ]] || fail "the CPU image contains packages it must not: $forbidden"
[[ $(docker run --rm --entrypoint id "$IMAGE" -u) != 0 ]] || fail "the image runs as root"

# --- 3. demo checkpoints, built by the image itself ------------------------------------------------------
say "building demo checkpoints inside the image"
docker run --rm --user "$(id -u):$(id -g)" -v "$MODELS:/models" "$IMAGE" \
  albert-serve-demo --build-only --models-dir /models
for endpoint in classify fill-mask qa ner; do
  [[ -f $MODELS/$endpoint/flax_model.msgpack ]] || fail "demo checkpoint for $endpoint missing"
done
chmod -R a+rX "$MODELS"

# --- 4-6. compose up, endpoints, restart -----------------------------------------------------------------
post() {  # post PATH JSON -> prints the body; fails unless 200
  local out status
  out=$(curl -sS -o "$WORK/body" -w '%{http_code}' -H 'Content-Type: application/json' -d "$2" "$BASE$1") ||
    fail "POST $1: no answer"
  status=$out
  [[ $status == 200 ]] || fail "POST $1 answered $status: $(cat "$WORK/body")"
  cat "$WORK/body"
}

check_shape() {  # check_shape ENDPOINT < body
  python3 -c '
import json, sys
endpoint, body = sys.argv[1], json.load(sys.stdin)
def keys(obj, names):
    assert isinstance(obj, dict) and set(names) <= set(obj), f"expected keys {names}, got {obj!r}"
if endpoint == "classify":
    assert isinstance(body, list) and len(body) == 2, body
    for item in body:
        keys(item, ["label", "score"])
    assert {item["label"] for item in body} == {"DEMO_NEGATIVE", "DEMO_POSITIVE"}, body
    assert body[0]["score"] >= body[1]["score"], "not best first"
elif endpoint == "fill-mask":
    assert isinstance(body, list) and len(body) == 5, body
    for item in body:
        keys(item, ["score", "token", "token_str", "sequence"])
elif endpoint == "qa":
    keys(body, ["score", "start", "end", "answer"])
    context = "John lives in Paris and works at the museum."
    assert context[body["start"]:body["end"]] == body["answer"], body
elif endpoint == "ner":
    assert isinstance(body, list), body
    text = "John lives in Paris and works at the museum."
    for item in body:
        keys(item, ["entity_group", "score", "word", "start", "end"])
        assert 0 <= item["start"] < item["end"] <= len(text), item
' "$1" || fail "/$1 answered an unexpected shape"
}

call_endpoints() {
  post /classify '{"inputs": "I loved this film."}' | check_shape classify
  post /fill-mask '{"inputs": "Paris is the [MASK] of France."}' | check_shape fill-mask
  post /qa '{"inputs": {"question": "Where does John live?", "context": "John lives in Paris and works at the museum."}}' |
    check_shape qa
  post /ner '{"inputs": "John lives in Paris and works at the museum."}' | check_shape ner
  echo "all four endpoints answered 200 with the expected JSON shape"
}

START_SECONDS=()
SERVICE_SECONDS=()
start_and_wait() {  # compose up, wait for /ready; records the wall time and the service's own figure
  local t0 status elapsed reported
  t0=$(date +%s.%N)
  "${COMPOSE[@]}" up -d --no-build albert-serve
  while true; do
    status=$(curl -s -o /dev/null -w '%{http_code}' "$BASE/ready" || true)
    [[ $status == 200 ]] && break
    elapsed=$(python3 -c "import sys; print(int(float(sys.argv[2]) - float(sys.argv[1])))" "$t0" "$(date +%s.%N)")
    ((elapsed < READY_TIMEOUT)) || fail "/ready not 200 after ${READY_TIMEOUT}s (last status $status)"
    sleep 0.5
  done
  elapsed=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)")
  # The service logs `ready: N endpoint(s) in X s` (load + compile, without process start-up).
  reported=$("${COMPOSE[@]}" logs --no-color albert-serve 2>&1 | grep -o 'ready: [0-9]* endpoint(s) in [0-9.]*s' |
    tail -1 | grep -o '[0-9.]*s$' | tr -d s)
  START_SECONDS+=("$elapsed")
  SERVICE_SECONDS+=("${reported:-?}")
  echo "ready: ${elapsed}s from 'compose up' to /ready 200 (service: ${reported:-?}s to load and compile)"
}

say "compose up (cold: empty compilation cache)"
"${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
start_and_wait
curl -sf "$BASE/health" >/dev/null || fail "/health is not 200"
call_endpoints
curl -sf "$BASE/info" | python3 -c '
import json, sys
info = json.load(sys.stdin)["endpoints"]
assert sorted(info) == ["classify", "fill-mask", "ner", "qa"], info
assert all(e["source"].startswith("/models/") for e in info.values()), info
' || fail "/info does not list the four mounted checkpoints"
metrics=$(curl -sf "$BASE/metrics") || fail "/metrics is not 200"
grep -q '^# TYPE' <<<"$metrics" || fail "/metrics is not Prometheus text"

# The healthcheck compose gives the container (the same command as the image's HEALTHCHECK).
cid=$("${COMPOSE[@]}" ps -q albert-serve)
health_cmd=$(docker inspect -f '{{json .Config.Healthcheck.Test}}' "$cid")
python3 -c '
import json, subprocess, sys
test = json.loads(sys.argv[2])
assert test and test[0] in ("CMD", "CMD-SHELL"), test
command = test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
sys.exit(subprocess.run(["docker", "exec", sys.argv[1], *command]).returncode)
' "$cid" "$health_cmd" || fail "the container healthcheck fails on a ready service"
echo "healthcheck command passes"

cached=$("${COMPOSE[@]}" exec -T albert-serve sh -c 'find /data/jax-cache -type f | wc -l' | tr -d '[:space:]')
((cached > 0)) || fail "the compilation cache volume is empty after start-up"
echo "compilation cache volume holds $cached files"

say "compose down (volumes kept) and up again (warm compilation cache)"
"${COMPOSE[@]}" down
start_and_wait
call_endpoints

say "summary"
python3 - "$IMAGE" "$IMAGE_BYTES" "${START_SECONDS[@]}" "${SERVICE_SECONDS[@]}" <<'PY'
import sys
image, size, first, second, first_service, second_service = sys.argv[1:7]
print(f"image {image}: {int(size) / 1e9:.2f} GB")
print(f"first start-up (cold cache):  {first}s to /ready (service: {first_service}s)")
print(f"second start-up (warm cache): {second}s to /ready (service: {second_service}s)")
PY
# The service's own figure excludes container and interpreter start-up, so it shows the cache best.
python3 -c '
import sys
first, second = sys.argv[1:3]
if "?" not in (first, second) and float(second) >= float(first):
    sys.exit(f"the second start-up ({second}s) was not faster than the first ({first}s)")
' "${SERVICE_SECONDS[0]}" "${SERVICE_SECONDS[1]}" || fail "the compilation cache did not speed up the restart"
echo "container check passed"
