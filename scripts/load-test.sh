#!/usr/bin/env bash
# The load run of issue 4 (docs/load-test.md): at least 2,000 jobs through two worker
# processes with faults injected along the way (one worker SIGKILLed mid-run and restarted,
# missing images, a bucket outside the allowlist, jobs that panic, invalid messages), ending
# with every job accounted for and the counts reconciled with the workers' /metrics.
#
#   scripts/load-test.sh                       # 2,000 jobs
#   scripts/load-test.sh --jobs 5000           # more
#   scripts/load-test.sh --kill-at 0.5 --invalid 20 --timeout 1200
#   scripts/load-test.sh --restart-at 0.6     # and restart the broker at 60 %
#
# Options (each also settable through the environment variable in brackets):
#   --jobs N        jobs published with `retoucher enqueue @jobs.jsonl`       [LOAD_JOBS, 2000]
#   --invalid N     invalid messages published raw (enqueue refuses them)     [LOAD_INVALID, 12]
#   --kill-at F     SIGKILL worker A once this share of messages is settled  [LOAD_KILL_AT, 0.35]
#   --restart-at F  restart the broker (rabbitmqctl stop_app/start_app) once  [LOAD_RESTART_AT, none]
#                   this share is settled, after the kill
#   --timeout S     bound on the whole run, in seconds                        [LOAD_TIMEOUT_SECS, 900]
#
# CI runs a shorter run of the same test instead (300 jobs, kill and broker restart:
# `ci_load_run_with_a_kill_and_a_broker_restart`, part of scripts/test.sh).
#
# A broker restart stops the broker the tests use: with RETOUCHER_TEST_BROKER=private it is
# the private node of scripts/rabbitmq-tls.sh, not the machine's (scripts/test-services.sh).
#
# It installs ONNX Runtime (scripts/setup-ort.sh), starts the local S3 server
# (scripts/s3-server.sh; stopped again on exit unless it was already running), makes sure
# RabbitMQ answers on 127.0.0.1:5672 (scripts/rabbitmq.sh), builds target/debug/retoucher, and
# runs the ignored test tests/load.rs, which does the run itself: `retoucher migrate`, the
# workers (`retoucher worker`), `retoucher enqueue @jobs.jsonl`, the kill, the checks in S3 and
# the dead-letter queue, the reconciliation, and the summary table.
#
# Output: the summary on the terminal, the whole log in target/load-test/load-<UTC time>.log and
# the figures as JSON in target/load-test/load-<UTC time>.json. Exit status: the test's.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

die() { echo "load-test: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while (($#)); do
    case "$1" in
        --jobs) LOAD_JOBS="${2:?--jobs needs a value}"; shift 2 ;;
        --invalid) LOAD_INVALID="${2:?--invalid needs a value}"; shift 2 ;;
        --kill-at) LOAD_KILL_AT="${2:?--kill-at needs a value}"; shift 2 ;;
        --restart-at) LOAD_RESTART_AT="${2:?--restart-at needs a value}"; shift 2 ;;
        --timeout) LOAD_TIMEOUT_SECS="${2:?--timeout needs a value}"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
export LOAD_JOBS="${LOAD_JOBS:-2000}"
export LOAD_INVALID="${LOAD_INVALID:-12}"
export LOAD_KILL_AT="${LOAD_KILL_AT:-0.35}"
export LOAD_TIMEOUT_SECS="${LOAD_TIMEOUT_SECS:-900}"
if ! [[ "$LOAD_JOBS" =~ ^[0-9]+$ ]] || ((LOAD_JOBS < 100)); then
    die "--jobs must be a whole number, at least 100"
fi
[[ "$LOAD_INVALID" =~ ^[0-9]+$ ]] || die "--invalid must be a whole number"
[[ "$LOAD_KILL_AT" =~ ^0?\.[0-9]+$ ]] || die "--kill-at must be a share between 0 and 1, like 0.35"
if [[ -n "${LOAD_RESTART_AT:-}" ]]; then
    [[ "$LOAD_RESTART_AT" =~ ^0?\.[0-9]+$ ]] || die "--restart-at must be a share between 0 and 1, like 0.6"
    export LOAD_RESTART_AT
fi
[[ "$LOAD_TIMEOUT_SECS" =~ ^[0-9]+$ ]] || die "--timeout must be a whole number of seconds"

command -v cargo >/dev/null || die "cargo not found (install Rust: https://rustup.rs)"
command -v python3 >/dev/null || die "python3 not found (scripts/s3-server.sh needs it)"

# shellcheck source=scripts/test-services.sh
source scripts/test-services.sh
start_test_services

echo "==> building target/debug/retoucher and the load test"
cargo build --bin retoucher
cargo test --test load --no-run

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p target/load-test
log="target/load-test/load-$stamp.log"
export LOAD_REPORT="$ROOT/target/load-test/load-$stamp.json"
echo "==> load run: $LOAD_JOBS jobs + $LOAD_INVALID invalid messages, SIGKILL at $LOAD_KILL_AT${LOAD_RESTART_AT:+, broker restart at $LOAD_RESTART_AT}, on $(nproc) CPUs; log $log"
set +e
cargo test --test load -- --ignored --nocapture --test-threads=1 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if ((status == 0)); then
    echo "==> load run passed: figures in $LOAD_REPORT"
else
    echo "==> load run FAILED (cargo exit status $status): see $log" >&2
fi
exit "$status"
