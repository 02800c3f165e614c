#!/usr/bin/env bash
# Measure the bundles' quality on the blemish benchmark with `retoucher eval` (README, Quality):
#
#   scripts/quality.sh                  # the test split (400 images): reference and blemish bundles
#   scripts/quality.sh --ci-slice       # the 24-image CI slice instead (what tests/eval.rs guards)
#   scripts/quality.sh --screenshot     # also render docs/eval-report.png from the blemish report
#   BUNDLES="blemish=models/blemish mine=/path/to/bundle" scripts/quality.sh   # other bundles
#
# Generates the test split into target/quality/bench/test/ when it is not there (with
# models/quality/generate.py --splits test, in a venv target/quality/venv made from
# models/quality/requirements.txt; a few minutes), builds the dev binary, runs
#   retoucher eval MANIFEST --out target/quality/eval/NAME --bundle DIR
# for each bundle, and prints the README's tables (scripts/quality-table.py) on stdout, progress
# on stderr. Each report is in target/quality/eval/NAME/report.html. The screenshot needs
# Debian's chromium.
set -euo pipefail
# Progress to stderr: stdout is only the tables.
exec 3>&1 1>&2

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

slice=0
screenshot=0
for arg in "$@"; do
    case "$arg" in
        --ci-slice) slice=1 ;;
        --screenshot) screenshot=1 ;;
        *) echo "quality.sh: unknown argument $arg (see the header of $0)" >&2; exit 2 ;;
    esac
done
BUNDLES="${BUNDLES:-reference=models/reference blemish=models/blemish}"

if ((slice)); then
    manifest=models/quality/ci-slice/manifest.jsonl
    out=target/quality/eval-ci-slice
else
    manifest=target/quality/bench/test/manifest.jsonl
    out=target/quality/eval
    if [[ ! -f "$manifest" ]]; then
        echo "==> generating the test split (models/quality/generate.py --splits test)"
        venv=target/quality/venv
        if [[ ! -x "$venv/bin/python" ]]; then
            python3 -m venv "$venv"
            "$venv/bin/pip" install -q -r models/quality/requirements.txt
        fi
        OMP_NUM_THREADS=1 "$venv/bin/python" models/quality/generate.py --splits test
    fi
fi

scripts/setup-ort.sh
echo "==> building retoucher (cargo build --bin retoucher)"
cargo build --bin retoucher
bin="${CARGO_TARGET_DIR:-$ROOT/target}/debug/retoucher"
export ORT_DYLIB_PATH="$ROOT/.tools/ort/libonnxruntime.so.1.31.1"

tables=()
for entry in $BUNDLES; do
    name="${entry%%=*}"
    bundle="${entry#*=}"
    echo "==> retoucher eval $manifest --out $out/$name --bundle $bundle"
    "$bin" eval "$manifest" --out "$out/$name" --bundle "$bundle" 2>"$out-$name.log" \
        || { echo "eval of $name did not evaluate everything; see $out-$name.log" >&2; exit 1; }
    tail -n 1 "$out-$name.log"
    tables+=("$name=$out/$name/report.json")
done

if ((screenshot)); then
    report="$ROOT/$out/blemish/report.html"
    profile="$(mktemp -d)"
    echo "==> docs/eval-report.png from $report"
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$profile" --hide-scrollbars --window-size=1400,2450 \
        --screenshot="$ROOT/docs/eval-report.png" "file://$report" 2>/dev/null
    rm -rf "$profile"
fi

python3 scripts/quality-table.py "${tables[@]}" >&3
