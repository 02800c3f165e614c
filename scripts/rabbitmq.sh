#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on 127.0.0.1:5672 (guest/guest) for the tests.
#
#   scripts/rabbitmq.sh ensure
#
# If something already answers on 127.0.0.1:5672 it is used as is and nothing
# else happens. Otherwise (Debian/Ubuntu, as root): install rabbitmq-server with
# apt if missing, bind it to the loopback interface only (AMQP 5672, Erlang
# distribution 25672, epmd 4369), start it with `rabbitmq-server -detached` and
# wait until it is up. The broker keeps running after the script ends.
#
# Loopback binding is configured in /etc/rabbitmq/rabbitmq-env.conf when that
# file has no settings of its own yet (a file with settings is left alone), and
# is forced for AMQP with RABBITMQ_NODE_IP_ADDRESS in any case.
set -euo pipefail

HOST=127.0.0.1
PORT=5672
ENV_CONF=/etc/rabbitmq/rabbitmq-env.conf
MARKER="# Written by retoucher scripts/rabbitmq.sh: loopback-only broker for tests."

die() { echo "rabbitmq: $*" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }

# True when the file is missing or has nothing but comments and blank lines.
unconfigured() { [[ ! -s "$1" ]] || ! grep -qvE '^[[:space:]]*(#|$)' "$1"; }

write_env_conf() {
    if unconfigured "$ENV_CONF"; then
        mkdir -p "$(dirname "$ENV_CONF")"
        cat >"$ENV_CONF" <<EOF
$MARKER
# A fixed node name does not depend on the host name resolving.
NODENAME=rabbit@localhost
NODE_IP_ADDRESS=$HOST
NODE_PORT=$PORT
# epmd and Erlang distribution (inter-node and CLI traffic) on loopback too.
ERL_EPMD_ADDRESS=$HOST
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
        chmod 0644 "$ENV_CONF"
    elif ! grep -qF "$MARKER" "$ENV_CONF"; then
        echo "rabbitmq: keeping the existing $ENV_CONF: AMQP is forced onto $HOST, epmd and Erlang distribution (25672) bind as that file says" >&2
    fi
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "$@" >/dev/null; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    fi
}

# The pid file rabbitmq-server writes: <mnesia base>/<node name>.pid.
pid_file() {
    local node
    node="$(
        # shellcheck disable=SC1090
        [[ -r "$ENV_CONF" ]] && source "$ENV_CONF" >/dev/null 2>&1
        echo "${RABBITMQ_NODENAME:-${NODENAME:-rabbit@$(hostname -s)}}"
    )"
    echo "/var/lib/rabbitmq/mnesia/$node.pid"
}

cmd_ensure() {
    if port_open; then
        return 0 # a broker is already there (the project machines have one)
    fi
    if [[ $EUID -ne 0 ]]; then
        die "nothing answers on $HOST:$PORT; start a RabbitMQ there (guest/guest), or run this as root to install and start one"
    fi

    # Configure before installing: on machines with systemd the package starts
    # the service right away, and it must come up on loopback.
    write_env_conf
    if ! command -v rabbitmq-server >/dev/null; then
        command -v apt-get >/dev/null || die "no apt-get: install RabbitMQ yourself and make it listen on $HOST:$PORT"
        echo "    installing rabbitmq-server (apt)"
        apt_install rabbitmq-server
    fi
    # The package may have started it already.
    if port_open; then
        return 0
    fi

    export RABBITMQ_NODE_IP_ADDRESS=$HOST RABBITMQ_NODE_PORT=$PORT
    local pidfile pid
    pidfile="$(pid_file)"
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    if [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == beam.smp ]]; then
        echo "    waiting for the RabbitMQ node that is starting (pid $pid)"
    else
        echo "    starting rabbitmq-server (detached), listening on $HOST:$PORT"
        # As root the Debian wrapper runs it as the rabbitmq user (su, environment
        # kept). -detached returns before the broker is up; `rabbitmqctl wait`
        # blocks until the node has booted (it reads the pid from the file once
        # the node writes it).
        rabbitmq-server -detached
    fi
    if ! rabbitmqctl wait --timeout 120 "$pidfile" >/dev/null; then
        tail -n 20 /var/log/rabbitmq/*.log >&2 2>/dev/null || true
        die "RabbitMQ did not come up (pid file $pidfile); logs in /var/log/rabbitmq/"
    fi
    local i
    for ((i = 0; i < 300; i++)); do # the AMQP listener opens at the end of boot
        port_open && return 0
        sleep 0.1
    done
    die "RabbitMQ is running but nothing answers on $HOST:$PORT; logs in /var/log/rabbitmq/"
}

case "${1:-}" in
    ensure) cmd_ensure ;;
    *)
        echo "usage: $0 ensure" >&2
        exit 2
        ;;
esac
