#!/usr/bin/env bash
# A private RabbitMQ node for the tests that need TLS or restart their broker, next to (never
# instead of) the machine's broker on 127.0.0.1:5672, which it does not touch.
#
#   scripts/rabbitmq-tls.sh start    # certificates, config, start the node, wait (no-op if running)
#   scripts/rabbitmq-tls.sh stop     # stop the node (no-op if not running)
#   scripts/rabbitmq-tls.sh status   # exit 0 if running
#   scripts/rabbitmq-tls.sh env      # print the export lines the tests read
#
#   eval "$(scripts/rabbitmq-tls.sh env)"
#
# The node has its own name (retoucher-tls-<hash of this checkout>@localhost), data, logs,
# config and enabled-plugins file under target/rabbitmq-tls/ (override: RABBITMQ_TLS_DIR), so
# two checkouts on one machine get two nodes. It shares epmd (4369) with the machine's node and
# listens on 127.0.0.1 only, on three ports picked from the checkout's hash (the first free block
# of three from 20000 + 10 x (hash mod 400)):
#   P     plain AMQP (guest/guest), for tests that restart their broker (stop_app / start_app)
#   P+1   AMQPS, also on 127.0.0.2: the same certificate there does not name the host, which
#         tests the name check
#   P+2   Erlang distribution (the machine's node has 25672; rabbitmqctl finds this one via epmd)
# The TLS listener asks for a client certificate (verify_peer) without requiring one
# (fail_if_no_peer_cert = false): a client without one gets server-only TLS, a client with one
# signed by another CA is refused.
#
# Certificates (openssl, EC P-256, made at every fresh start) in target/rabbitmq-tls/certs/:
#   ca.pem                        the test CA, which signed server.pem and client.pem
#   server.pem, server.key        for DNS:localhost and IP:127.0.0.1 (serverAuth)
#   client.pem, client.key        CN=retoucher-test-client (clientAuth), PKCS#8 key
#   other-ca.pem                  a CA that signed nothing the broker knows (the "wrong CA")
#   other-client.pem, .key        a client certificate signed by other-ca (refused by the broker)
#
# As root, where the Debian `rabbitmq-server` wrapper runs nodes as the rabbitmq user, the node
# runs as that user and shares its Erlang cookie with `rabbitmqctl`, so `rabbitmqctl -n NODE`
# controls it as it controls the machine's node.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${RABBITMQ_TLS_DIR:-$ROOT/target/rabbitmq-tls}"
CERTS="$DIR/certs"
HASH="$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)"
NODE="retoucher-tls-$(printf '%08x' "$HASH")@localhost"
PIDFILE="$DIR/node.pid"
PORTS="$DIR/ports"
WAIT_SECS=120

die() { echo "rabbitmq-tls: $*" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

ctl() { rabbitmqctl -n "$NODE" "$@"; }

running() { ctl ping >/dev/null 2>&1; }

# The ports of the running node, or a free block for a new one.
choose_ports() {
    if [[ -s "$PORTS" ]] && running; then
        return 0
    fi
    local base try p
    base=$((20000 + HASH % 400 * 10))
    for ((try = 0; try < 40; try++)); do
        p=$((20000 + (base - 20000 + try * 10) % 4000))
        if ! port_open 127.0.0.1 "$p" && ! port_open 127.0.0.1 $((p + 1)) \
            && ! port_open 127.0.0.2 $((p + 1)) && ! port_open 127.0.0.1 $((p + 2)); then
            echo "AMQP_PORT=$p AMQPS_PORT=$((p + 1)) DIST_PORT=$((p + 2))" >"$PORTS"
            return 0
        fi
    done
    die "no free block of three ports between 20000 and 24000"
}

load_ports() {
    [[ -s "$PORTS" ]] || die "not started (no $PORTS): run $0 start"
    # shellcheck disable=SC1090
    source <(tr ' ' '\n' <"$PORTS")
}

make_certificates() {
    command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"
    rm -rf "$CERTS"
    mkdir -p "$CERTS"
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    ca() { # name subject
        openssl req -x509 "${ec[@]}" -days 30 -subj "/CN=$2" \
            -addext basicConstraints=critical,CA:TRUE \
            -addext keyUsage=critical,keyCertSign,cRLSign \
            -keyout "$CERTS/$1.key" -out "$CERTS/$1.pem" 2>/dev/null
    }
    leaf() { # name ca subject extensions
        openssl req "${ec[@]}" -subj "/CN=$3" -keyout "$CERTS/$1.key" \
            -out "$CERTS/$1.csr" 2>/dev/null
        openssl x509 -req -in "$CERTS/$1.csr" -CA "$CERTS/$2.pem" -CAkey "$CERTS/$2.key" \
            -CAcreateserial -days 30 -extfile <(printf '%s\n' "$4" 'basicConstraints=CA:FALSE') \
            -out "$CERTS/$1.pem" 2>/dev/null
        rm -f "$CERTS/$1.csr"
    }
    ca ca "retoucher test CA"
    ca other-ca "retoucher other test CA"
    leaf server ca localhost \
        $'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature'
    leaf client ca retoucher-test-client \
        $'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature'
    leaf other-client other-ca retoucher-other-client \
        $'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature'
    rm -f "$CERTS"/*.srl
}

write_config() {
    load_ports
    cat >"$DIR/rabbitmq.conf" <<EOF
# Written by scripts/rabbitmq-tls.sh: a private test node on loopback.
listeners.tcp.local = 127.0.0.1:$AMQP_PORT
listeners.ssl.local = 127.0.0.1:$AMQPS_PORT
listeners.ssl.misnamed = 127.0.0.2:$AMQPS_PORT
ssl_options.cacertfile = $CERTS/ca.pem
ssl_options.certfile = $CERTS/server.pem
ssl_options.keyfile = $CERTS/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
log.console = false
log.file.level = info
EOF
    echo '[].' >"$DIR/enabled_plugins"
    # Read instead of /etc/rabbitmq/rabbitmq-env.conf, which belongs to the machine's node.
    echo '# Written by scripts/rabbitmq-tls.sh: nothing from /etc/rabbitmq/rabbitmq-env.conf.' \
        >"$DIR/rabbitmq-env.conf"
}

cmd_start() {
    command -v rabbitmq-server >/dev/null || die "rabbitmq-server not found (scripts/rabbitmq.sh ensure installs it)"
    mkdir -p "$DIR"
    if running; then
        return 0
    fi
    choose_ports
    make_certificates
    write_config
    mkdir -p "$DIR/mnesia" "$DIR/log"
    rm -f "$PIDFILE"
    # The Debian wrapper runs the node as the rabbitmq user when started by root.
    if [[ $EUID -eq 0 ]] && id -u rabbitmq >/dev/null 2>&1; then
        chown -R rabbitmq: "$DIR"
    fi
    chmod 600 "$CERTS"/*.key
    echo "    starting RabbitMQ node $NODE (AMQP $AMQP_PORT, AMQPS $AMQPS_PORT, distribution $DIST_PORT; data in $DIR)"
    # -detached returns before the node is up; `rabbitmqctl wait` blocks until it has booted.
    env RABBITMQ_NODENAME="$NODE" \
        RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf" \
        RABBITMQ_CONFIG_FILE="$DIR/rabbitmq.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$DIR/mnesia" \
        RABBITMQ_LOG_BASE="$DIR/log" \
        RABBITMQ_PID_FILE="$PIDFILE" \
        RABBITMQ_DIST_PORT="$DIST_PORT" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        rabbitmq-server -detached >"$DIR/start.log" 2>&1 || {
        cat "$DIR/start.log" >&2
        die "rabbitmq-server -detached failed"
    }
    if ! ctl wait --timeout "$WAIT_SECS" "$PIDFILE" >/dev/null 2>&1; then
        tail -n 30 "$DIR"/log/*.log >&2 2>/dev/null || true
        die "node $NODE did not come up within ${WAIT_SECS}s; logs in $DIR/log/"
    fi
    local i
    for ((i = 0; i < 300; i++)); do # the listeners open at the end of boot
        port_open 127.0.0.1 "$AMQPS_PORT" && port_open 127.0.0.1 "$AMQP_PORT" && return 0
        sleep 0.1
    done
    die "node $NODE is running but does not listen on $AMQP_PORT/$AMQPS_PORT; logs in $DIR/log/"
}

cmd_stop() {
    if running; then
        echo "    stopping RabbitMQ node $NODE"
        ctl stop >/dev/null 2>&1 || die "rabbitmqctl -n $NODE stop failed"
    fi
}

cmd_env() {
    running || die "node $NODE is not running: run $0 start"
    load_ports
    cat <<EOF
export RETOUCHER_TEST_TLS_NODE='$NODE'
export RETOUCHER_TEST_TLS_AMQP_URL='amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f'
export RETOUCHER_TEST_TLS_AMQPS_URL='amqps://guest:guest@127.0.0.1:$AMQPS_PORT/%2f'
export RETOUCHER_TEST_TLS_MISNAMED_URL='amqps://guest:guest@127.0.0.2:$AMQPS_PORT/%2f'
export RETOUCHER_TEST_TLS_CERTS='$CERTS'
EOF
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) running ;;
    env) cmd_env ;;
    *)
        echo "usage: $0 start|stop|status|env" >&2
        exit 2
        ;;
esac
