#!/usr/bin/env bash
# Run the whole test suite, from any directory, on a fresh machine:
#
#   scripts/test.sh                       # everything
#   scripts/test.sh some_test_name        # extra arguments go to `cargo test`
#   scripts/test.sh --test storage_s3     # picking targets replaces --all-targets
#   scripts/test.sh --lib -- --nocapture  # arguments after `--` go to the test binaries
#
# It installs ONNX Runtime 1.31.1 into .tools/ort, starts a local SigV4-enforcing
# S3 server (scripts/s3-server.sh; stopped again on exit unless it was already
# running), makes sure RabbitMQ answers on 127.0.0.1:5672 (scripts/rabbitmq.sh),
# and runs `cargo test --all-targets -- --test-threads=2` with:
#   ORT_DYLIB_PATH              .tools/ort/libonnxruntime.so.1.31.1
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, RETOUCHER_TEST_S3_ENDPOINT
#                               from .tools/s3/credentials.env (never printed)
#   RETOUCHER_TEST_AMQP_URL     amqp://guest:guest@127.0.0.1:5672/%2f
# A full run (no arguments) then checks that the `cuda` feature still compiles
# (`cargo check --features cuda --bin retoucher`): that code path runs only where a GPU is.
# Exits with cargo's status.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Split our arguments: before `--` for cargo, after it for the test binaries.
cargo_args=()
test_args=()
while (($#)); do
    if [[ "$1" == -- ]]; then
        shift
        test_args=("$@")
        break
    fi
    cargo_args+=("$1")
    shift
done
# --all-targets unless the caller picks targets (--lib, --test NAME, ...) himself.
targets=(--all-targets)
for arg in "${cargo_args[@]}"; do
    case "$arg" in
        --lib | --bin | --bin=* | --bins | --test | --test=* | --tests | --example | --example=* \
            | --examples | --bench | --bench=* | --benches | --doc | --all-targets) targets=() ;;
    esac
done
threads=(--test-threads=2)
for arg in "${test_args[@]}"; do
    [[ "$arg" == --test-threads* ]] && threads=()
done

command -v cargo >/dev/null || { echo "test.sh: cargo not found (install Rust: https://rustup.rs)" >&2; exit 1; }

echo "==> installing the ops validation tools (promtool, kubernetes-validate, hadolint, kubectl, CRD schemas)"
scripts/ops-tools.sh

# shellcheck source=scripts/test-services.sh
source scripts/test-services.sh
start_test_services

cmd=(cargo test "${targets[@]}" "${cargo_args[@]}" -- "${threads[@]}" "${test_args[@]}")
echo "==> ${cmd[*]}"
status=0
"${cmd[@]}" || status=$?
if ((status == 0 && ${#cargo_args[@]} == 0 && ${#test_args[@]} == 0)); then
    echo "==> cargo check --features cuda --bin retoucher (the CUDA path compiles)"
    cargo check --features cuda --bin retoucher || status=$?
fi
if ((status == 0)); then
    echo "==> tests passed"
else
    echo "==> tests FAILED (cargo exit status $status)" >&2
fi
exit "$status"
