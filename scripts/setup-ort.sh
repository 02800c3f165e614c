#!/usr/bin/env bash
# Install the ONNX Runtime C library (CPU) that `ort` loads at run time (load-dynamic).
#
#   scripts/setup-ort.sh        # idempotent; silent when already installed
#
# Result: .tools/ort/libonnxruntime.so.1.31.1 (+ symlink libonnxruntime.so).
# Point ORT_DYLIB_PATH at it. The library comes out of the official PyPI wheel
# onnxruntime==1.31.1 (manylinux_2_28, so glibc >= 2.28); pip only downloads the
# wheel, nothing is installed into any Python.
set -euo pipefail

ORT_VERSION=1.31.1
# sha256 of onnxruntime-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl and of the
# library inside it (PyPI files are immutable, so these never change).
WHEEL_SHA256=1f3dea47f2f0e5117c2404cea7d21fd253ae7836a3bf167a501cdfbb2600d536
LIB_SHA256=fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.tools/ort"
LIB="$DEST/libonnxruntime.so.$ORT_VERSION"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$LIB" ]] && [[ "$(sha256_of "$LIB")" == "$LIB_SHA256" ]]; then
    ln -sfn "libonnxruntime.so.$ORT_VERSION" "$DEST/libonnxruntime.so"
    exit 0
fi

if [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
    echo "setup-ort: only Linux x86_64 is scripted; install ONNX Runtime $ORT_VERSION yourself and set ORT_DYLIB_PATH" >&2
    exit 1
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "    installing python3-pip (apt)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null; }
    else
        echo "setup-ort: need '$PYTHON -m pip' to download the onnxruntime wheel" >&2
        exit 1
    fi
fi

echo "    downloading the onnxruntime==$ORT_VERSION wheel from PyPI"
mkdir -p "$DEST"
TMP="$(mktemp -d "$DEST/.download.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.12 \
    --implementation cp "onnxruntime==$ORT_VERSION" -d "$TMP"

WHEEL="$TMP/onnxruntime-$ORT_VERSION-cp312-cp312-manylinux_2_28_x86_64.whl"
if [[ ! -f "$WHEEL" ]]; then
    echo "setup-ort: expected wheel not downloaded: $(ls "$TMP")" >&2
    exit 1
fi
if [[ "$(sha256_of "$WHEEL")" != "$WHEEL_SHA256" ]]; then
    echo "setup-ort: sha256 mismatch for $(basename "$WHEEL")" >&2
    exit 1
fi

"$PYTHON" - "$WHEEL" "$TMP/lib" "onnxruntime/capi/libonnxruntime.so.$ORT_VERSION" <<'EOF'
import shutil, sys, zipfile
wheel, out, member = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
if [[ "$(sha256_of "$TMP/lib")" != "$LIB_SHA256" ]]; then
    echo "setup-ort: sha256 mismatch for libonnxruntime.so.$ORT_VERSION" >&2
    exit 1
fi
chmod 0755 "$TMP/lib"
mv -f "$TMP/lib" "$LIB"
ln -sfn "libonnxruntime.so.$ORT_VERSION" "$DEST/libonnxruntime.so"
echo "    installed ${LIB#"$ROOT"/}"
