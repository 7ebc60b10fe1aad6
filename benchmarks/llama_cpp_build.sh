#!/usr/bin/env bash
# Build llama.cpp (CPU only) from the source vendored in llama-cpp-python's sdist, cached.
#
#   bash benchmarks/llama_cpp_build.sh            # -> ${ELASTIC_LLAMA_CPP:-~/.cache/elastic-export/llama.cpp}
#   ELASTIC_LLAMA_CPP=/path JOBS=2 bash benchmarks/llama_cpp_build.sh
#
# Layout of the cache dir afterwards:
#   src/                 vendor/llama.cpp of the sdist (convert_hf_to_gguf.py, gguf-py, ...)
#   py/llama_cpp/        the sdist's ctypes bindings (llama_cpp.py), used with LLAMA_CPP_LIB
#   build/bin/libllama.so (+ libggml*.so)   the shared library the bindings load
#   VERSION              the llama-cpp-python sdist it was built from
# Only the `llama` target (libllama + ggml) is built: no tools, tests, server or libcurl. About 10-20
# minutes on 2 cores; it runs under `nice -n 19` so a training run on the same machine keeps priority.
# A second run with the library present does nothing. Needs pip, cmake >= 3.14 and a C++17 compiler;
# the sdist comes from the package index via `pip download` (or LLAMA_CPP_SDIST=/path/to/tar.gz).
set -euo pipefail
DEST="${ELASTIC_LLAMA_CPP:-$HOME/.cache/elastic-export/llama.cpp}"
JOBS="${JOBS:-1}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
LIB="$DEST/build/bin/libllama.so"
if [[ -f "$LIB" && -f "$DEST/VERSION" ]]; then
  echo "llama.cpp already built: $LIB ($(head -1 "$DEST/VERSION"))"; exit 0
fi
mkdir -p "$DEST"
TMP="$(mktemp -d "$DEST/.tmp.XXXXXX")"; trap 'rm -rf "$TMP"' EXIT
SDIST="${LLAMA_CPP_SDIST:-}"
if [[ -z "$SDIST" ]]; then
  pip download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps --no-build-isolation -d "$TMP/dl" >&2 \
    || pip download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$TMP/dl" >&2
  SDIST="$(ls "$TMP"/dl/llama_cpp_python-*.tar.gz | head -1)"
fi
if [[ ! -d "$DEST/src" ]]; then
  tar xzf "$SDIST" -C "$TMP"
  ROOT="$(ls -d "$TMP"/llama_cpp_python-*/ | head -1)"
  rm -rf "$DEST/py"; mkdir -p "$DEST/py"
  cp -r "$ROOT/llama_cpp" "$DEST/py/llama_cpp"
  mv "$ROOT/vendor/llama.cpp" "$DEST/src.partial" && mv "$DEST/src.partial" "$DEST/src"
fi
nice -n 19 cmake -S "$DEST/src" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON \
  -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF >&2
nice -n 19 cmake --build "$DEST/build" --config Release -j "$JOBS" --target llama >&2
test -f "$LIB"
basename "$SDIST" .tar.gz > "$DEST/VERSION"
echo "$LIB"
