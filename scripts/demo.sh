#!/usr/bin/env bash
# See retoucher work, with no broker and no S3: process the example jobs locally.
#
#   scripts/demo.sh                 # from any directory
#   scripts/demo.sh --help          # extra arguments go to `retoucher run`
#
# Installs ONNX Runtime 1.31.1 into .tools/ort (once), builds the dev binary,
# runs `retoucher run examples/jobs.jsonl --out out/examples`, and prints where
# the contact sheet is (out/examples/index.html).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

command -v cargo >/dev/null || { echo "demo.sh: cargo not found (install Rust: https://rustup.rs)" >&2; exit 1; }

echo "==> installing ONNX Runtime 1.31.1"
scripts/setup-ort.sh

echo "==> building retoucher (cargo build --bin retoucher)"
cargo build --bin retoucher

target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
out="out/examples"
cmd=("$target_dir/debug/retoucher" run examples/jobs.jsonl --out "$out" "$@")
echo "==> retoucher ${cmd[*]:1}"
ORT_DYLIB_PATH="$ROOT/.tools/ort/libonnxruntime.so.1.31.1" "${cmd[@]}"

if [[ -f "$out/index.html" ]]; then
    echo "==> contact sheet: $ROOT/$out/index.html"
    echo "    open file://$ROOT/$out/index.html in a browser"
else
    echo "==> results are in $ROOT/$out/ (no index.html was written)"
fi
