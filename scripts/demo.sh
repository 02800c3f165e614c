#!/usr/bin/env bash
# See retoucher work, with no broker and no S3: process images locally and open the contact sheet.
#
#   scripts/demo.sh                 # the trained blemish bundle on the 24 test images of the CI slice
#   scripts/demo.sh --examples      # the reference bundle on the sample photos in examples/
#   scripts/demo.sh --help          # other arguments go to `retoucher run`
#
# Installs ONNX Runtime 1.31.1 into .tools/ort (once) and builds the dev binary. By default it
# runs `retoucher run --manifest models/quality/ci-slice/manifest.jsonl --bundle models/blemish
# --out out/demo`: each manifest line is a job with its prompt, and the contact sheet
# (out/demo/index.html) shows the ground truth beside the saliency. With --examples it runs
# `retoucher run examples/jobs.jsonl --out out/examples` on the reference bundle (painted magenta
# blemishes; that bundle is the one the contract tests use).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

command -v cargo >/dev/null || { echo "demo.sh: cargo not found (install Rust: https://rustup.rs)" >&2; exit 1; }

examples=0
args=()
for arg in "$@"; do
    if [[ "$arg" == --examples ]]; then
        examples=1
    else
        args+=("$arg")
    fi
done

echo "==> installing ONNX Runtime 1.31.1"
scripts/setup-ort.sh

echo "==> building retoucher (cargo build --bin retoucher)"
cargo build --bin retoucher

target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
if ((examples)); then
    out="out/examples"
    cmd=("$target_dir/debug/retoucher" run examples/jobs.jsonl --bundle models/reference --out "$out")
else
    out="out/demo"
    cmd=("$target_dir/debug/retoucher" run --manifest models/quality/ci-slice/manifest.jsonl
        --bundle models/blemish --out "$out")
fi
cmd+=("${args[@]}")
echo "==> retoucher ${cmd[*]:1}"
ORT_DYLIB_PATH="$ROOT/.tools/ort/libonnxruntime.so.1.31.1" "${cmd[@]}"

if [[ -f "$out/index.html" ]]; then
    echo "==> contact sheet: $ROOT/$out/index.html"
    echo "    open file://$ROOT/$out/index.html in a browser"
else
    echo "==> results are in $ROOT/$out/ (no index.html was written)"
fi
