#!/usr/bin/env bash
# Build the llama-cpp-python wheel once and keep it in a per-user cache.
#
# llama-cpp-python ships only an sdist on the registries we can reach, and compiling
# llama.cpp takes about 6 minutes on 2 cores. This script builds it once per
# (version, platform, glibc, build flavour) and afterwards does nothing.
#
# Usage:   ensure_llama_wheel.sh [PYTHON]        (default: python3 on PATH)
# Prints:  the path of the cached wheel on its last line of stdout (logs go to stderr).
#
# Environment:
#   LLAMA_CPP_VERSION   version to build              (default 0.3.36)
#   LLAMA_FLAVOUR       portable | avx512 | native | auto   (default auto)
#       auto:     avx512 when this CPU has all of its extensions, otherwise portable.
#       portable: -DGGML_NATIVE=OFF  -> x86-64 AVX2/FMA/F16C baseline (Haswell and newer),
#                 so a wheel built on one machine runs on any other x86-64 machine from 2013 on.
#       avx512:   portable + AVX-512 (F/BW/VL/DQ, VBMI, VNNI, BF16): any Zen 4 / Ice Lake or
#                 newer; as fast as native on this machine type, SIGILL on CPUs without them.
#       native:   -DGGML_NATIVE=ON   -> -march=native; fastest here, may SIGILL elsewhere.
#   LLAMA_EXTRA_CMAKE_ARGS  appended to the flavour's CMake arguments (part of the cache key)
#   MODELPLANE_WHEEL_DIR    cache folder (default ${XDG_CACHE_HOME:-$HOME/.cache}/modelplane/wheels)
#   BUILD_JOBS              parallel compile jobs (default: nproc)
#   LLAMA_WHEEL_BUILD       no: fail (exit 3) instead of building when the wheel is not cached
set -euo pipefail

PY="${1:-python3}"
VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
FLAVOUR="${LLAMA_FLAVOUR:-auto}"
CACHE_ROOT="${MODELPLANE_WHEEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/modelplane/wheels}"

# Under pipefail a pipe whose last stage stops reading early (head, grep -q) can kill the stage
# before it with SIGPIPE, and the script would end without a word: read the flags without one.
has_avx512() {
  local flags=" " line extension
  while read -r line; do
    case "$line" in flags*) flags=" ${line#*:} "; break ;; esac
  done < /proc/cpuinfo
  for extension in avx512f avx512bw avx512vl avx512dq avx512vbmi avx512_vnni avx512_bf16; do
    case "$flags" in *" $extension "*) ;; *) return 1 ;; esac
  done
}
if [ "$FLAVOUR" = auto ]; then
  FLAVOUR=portable
  if [ -r /proc/cpuinfo ] && has_avx512; then
    FLAVOUR=avx512
  fi
fi
case "$FLAVOUR" in
  portable) FLAVOUR_ARGS="-DGGML_NATIVE=OFF" ;;
  avx512)   FLAVOUR_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" ;;
  native)   FLAVOUR_ARGS="-DGGML_NATIVE=ON" ;;
  *) echo "LLAMA_FLAVOUR must be 'portable', 'avx512' or 'native', got '$FLAVOUR'" >&2; exit 2 ;;
esac
# CPU only: no CUDA/Metal/BLAS backends; no llama.cpp tools/examples we do not ship.
CMAKE_ARGS_FULL="$FLAVOUR_ARGS -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF ${LLAMA_EXTRA_CMAKE_ARGS:-}"

# llama-cpp-python loads libllama through ctypes, so its wheel is tagged py3-none-linux_<arch>:
# the file name says nothing about the Python, the C library it was linked against, or how it
# was compiled. The cache folder name carries what does matter: flavour, CMake arguments, glibc.
ARCH="$(uname -m)"
# getconf, not `ldd --version | head -1`: under pipefail that pipe dies of SIGPIPE about one run in
# two (ldd writes in pieces, head closes early), and the script then ends without a word.
GLIBC="$(getconf GNU_LIBC_VERSION)"  # "glibc 2.36"
GLIBC="${GLIBC##* }"
# A pipe is safe under pipefail only when its last stage reads all of its input, as sha256sum does.
ARGS_HASH="$(printf '%s' "$CMAKE_ARGS_FULL" | sha256sum)"
ARGS_HASH="${ARGS_HASH:0:12}"
DEST="$CACHE_ROOT/llama-cpp-python/$FLAVOUR-$ARGS_HASH-glibc$GLIBC-$ARCH"
mkdir -p "$DEST"

find_wheel() {
  # Globs that match nothing stay literal; test -f filters them out.
  for w in "$DEST"/llama_cpp_python-"$VERSION"-*-*-*"$ARCH".whl; do
    [ -f "$w" ] && { echo "$w"; return 0; }
  done
  return 1
}

if WHEEL="$(find_wheel)"; then
  echo "llama-cpp-python $VERSION ($FLAVOUR) already built: $WHEEL" >&2
  echo "$WHEEL"
  exit 0
fi
if [ "${LLAMA_WHEEL_BUILD:-yes}" = no ]; then
  echo "llama-cpp-python $VERSION ($FLAVOUR) is not built in $DEST, and LLAMA_WHEEL_BUILD=no" >&2
  exit 3
fi

# Build into a private temp folder and move the finished wheel in at the end, so an
# interrupted build never leaves a half-written wheel that a later run would trust.
TMP="$(mktemp -d "$DEST/.build.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
echo "building llama-cpp-python $VERSION ($FLAVOUR) for $ARCH/glibc $GLIBC: CMAKE_ARGS='$CMAKE_ARGS_FULL'" >&2
start=$(date +%s)
CMAKE_ARGS="$CMAKE_ARGS_FULL" \
CMAKE_BUILD_PARALLEL_LEVEL="${BUILD_JOBS:-$(nproc)}" \
  "$PY" -m pip wheel --no-deps --no-cache-dir "llama-cpp-python==$VERSION" -w "$TMP" >&2
printf '%s\n' "$CMAKE_ARGS_FULL" > "$TMP/CMAKE_ARGS"
mv "$TMP"/llama_cpp_python-*.whl "$DEST"/
mv "$TMP/CMAKE_ARGS" "$DEST/CMAKE_ARGS"
echo "built in $(( $(date +%s) - start )) s" >&2
find_wheel
