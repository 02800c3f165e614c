//! The deployment files are valid for the tools that will consume them, checked offline with the
//! real validators that `scripts/ops-tools.sh` installs into `.tools/ops/` (each test says so when
//! a tool is missing):
//! - Prometheus rules: `promtool check rules` and the unit tests of `promtool test rules`;
//!   the compose stack's prometheus.yml with `promtool check config`.
//! - Kubernetes: `kubectl kustomize deploy/k8s` must render; every manifest, and the rendered
//!   output, must pass `kubernetes-validate --strict` (the API's JSON schemas, oldest and newest
//!   supported Kubernetes version, unknown fields rejected). kubernetes-validate has no schema for
//!   custom resources (KEDA's ScaledObject and TriggerAuthentication, the Prometheus Operator's
//!   ServiceMonitor and PrometheusRule): it may only warn about exactly those, and they are
//!   validated by deploy/tools/validate-crds.mjs against the CRD schemas bundled in the
//!   @kubernetes-models npm packages instead.
//! - Dockerfiles: hadolint. Compose: the compose-spec JSON schema (check-jsonschema).
//! - Promises the manifests make to each other (drain timeout below the grace period, probes on
//!   /healthz and /readyz, loopback-only ports, the PrometheusRule in step with alerts.yml), read
//!   from the YAML converted to JSON by the tools' Python (PyYAML).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tool from .tools/ops/bin, or a failure that says how to get it.
fn tool(name: &str) -> PathBuf {
    let p = root().join(".tools/ops/bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/ops-tools.sh (it installs the ops validation tools into .tools/ops/)",
        p.display()
    );
    p
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command in the repository root; panics with its output unless it succeeds.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let t = text(&out);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{t}",
        out.status
    );
    t
}

fn k8s_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/k8s"))
        .expect("deploy/k8s")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 8,
        "expected the manifests in deploy/k8s, found {files:?}"
    );
    files
}

/// `kubectl kustomize deploy/k8s`, written to a file in `dir`.
fn kustomize_build(dir: &Path) -> PathBuf {
    let rendered = run_ok(Command::new(tool("kubectl")).args(["kustomize", "deploy/k8s"]));
    let path = dir.join("rendered.yaml");
    std::fs::write(&path, rendered).expect("writing the rendered manifests");
    path
}

/// YAML documents as JSON values (through PyYAML in the tools' virtual environment).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let python = root().join(".tools/ops/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/ops-tools.sh",
        python.display()
    );
    let json = run_ok(
        Command::new(python)
            .args([
                "-c",
                "import json, sys, yaml\n\
                 docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
                 print(json.dumps(docs))",
            ])
            .arg(path),
    );
    serde_json::from_str(&json).expect("PyYAML output is JSON")
}

/// Custom resources and kustomize's own file: kubernetes-validate has no schema for them.
const CRD_KINDS: &[&str] = &[
    "ScaledObject",
    "TriggerAuthentication",
    "ServiceMonitor",
    "PrometheusRule",
    "Kustomization",
];

// ------------------------------------------------------------------------------------------
// Prometheus

#[test]
fn alert_rules_pass_promtool_check() {
    let out = run_ok(Command::new(tool("promtool")).args([
        "check",
        "rules",
        "deploy/prometheus/alerts.yml",
    ]));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let out = run_ok(Command::new(tool("promtool")).args([
        "test",
        "rules",
        "deploy/prometheus/alerts_test.yml",
    ]));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_alert_has_a_unit_test() {
    let alerts = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(root().join("deploy/prometheus/alerts_test.yml")).unwrap();
    for name in alerts
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert:"))
        .map(str::trim)
    {
        let firing = tests.split("alertname: ").skip(1).any(|chunk| {
            chunk.starts_with(name) && {
                let rest = chunk[name.len()..].trim_start();
                rest.starts_with("exp_alerts:")
                    && !rest["exp_alerts:".len()..].trim_start().starts_with("[]")
            }
        });
        assert!(
            firing,
            "alert {name} has no test in alerts_test.yml where it fires"
        );
    }
}

#[test]
fn compose_prometheus_config_is_valid() {
    run_ok(Command::new(tool("promtool")).args([
        "check",
        "config",
        "--syntax-only",
        "deploy/compose/prometheus.yml",
    ]));
}

#[test]
fn prometheusrule_carries_the_alerts_of_alerts_yml() {
    let alerts = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap();
    let rule = std::fs::read_to_string(root().join("deploy/k8s/prometheusrule.yaml")).unwrap();
    let from_alerts = &alerts[alerts.find("\ngroups:").expect("groups: in alerts.yml") + 1..];
    let embedded = &rule[rule
        .find("\n  groups:")
        .expect("spec.groups in prometheusrule.yaml")
        + 1..];
    let unindented: String = embedded
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        unindented.trim_end() == from_alerts.trim_end(),
        "deploy/k8s/prometheusrule.yaml is out of step with deploy/prometheus/alerts.yml: \
         run scripts/ops-tools.sh prometheusrule"
    );
}

// ------------------------------------------------------------------------------------------
// Kubernetes

#[test]
fn k8s_manifests_pass_kubernetes_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let rendered = kustomize_build(dir.path());
    let mut files = k8s_files();
    files.push(rendered);
    for version in ["1.30.0", "1.37.0"] {
        let out = Command::new(tool("kubernetes-validate"))
            .args(["--strict", "-k", version])
            .args(&files)
            .current_dir(root())
            .output()
            .expect("running kubernetes-validate");
        let t = text(&out);
        let mut problems = Vec::new();
        for line in t.lines().filter(|l| !l.trim().is_empty()) {
            if line.starts_with("INFO ") && line.contains(" passed for resource ") {
                continue;
            }
            let known_crd = line.starts_with("WARN ")
                && line.contains("Couldn't find schema for kind")
                && CRD_KINDS
                    .iter()
                    .any(|k| line.contains(&format!("for kind {k} with")));
            if !known_crd {
                problems.push(line.to_string());
            }
        }
        assert!(
            out.status.success() && problems.is_empty(),
            "kubernetes-validate --strict -k {version} ({}):\n{}",
            out.status,
            problems.join("\n")
        );
        let passed = t
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert!(
            passed >= 10,
            "only {passed} resources validated against {version}:\n{t}"
        );
    }
}

#[test]
fn k8s_custom_resources_pass_their_crd_schemas() {
    tool("kubectl");
    let modules = root().join(".tools/ops/node/node_modules/@kubernetes-models/keda");
    assert!(
        modules.exists(),
        "{} is missing: run scripts/ops-tools.sh",
        modules.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let rendered = kustomize_build(dir.path());
    let out = run_ok(
        Command::new("node")
            .arg("deploy/tools/validate-crds.mjs")
            .arg(&rendered)
            .arg("deploy/k8s/secret.example.yaml"),
    );
    for kind in [
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
        "PrometheusRule",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("OK ") && l.contains(&format!(" {kind}/"))),
            "{kind} was not validated:\n{out}"
        );
    }
}

fn by_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in the rendered manifests"))
}

#[test]
fn k8s_manifests_keep_their_promises() {
    let dir = tempfile::tempdir().unwrap();
    let docs = yaml_documents(&kustomize_build(dir.path()));

    for d in &docs {
        if d["kind"] != "Namespace" {
            assert_eq!(
                d["metadata"]["namespace"], "retoucher",
                "{} {} is not in the retoucher namespace",
                d["kind"], d["metadata"]["name"]
            );
        }
        assert!(
            d["kind"] != "Secret",
            "no Secret may be applied by kustomize (secret.example.yaml is a template)"
        );
    }

    // The worker's config file, and the drain it configures.
    let config = by_kind(&docs, "ConfigMap")["data"]["retoucher.toml"]
        .as_str()
        .expect("ConfigMap data retoucher.toml");
    let setting = |key: &str| -> String {
        config
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
            })
            .unwrap_or_else(|| panic!("{key} is not set in retoucher.toml"))
    };
    let drain: u64 = setting("drain_timeout_secs")
        .parse()
        .expect("drain_timeout_secs");
    assert_eq!(
        setting("listen"),
        "0.0.0.0:9898",
        "probes and Prometheus reach the pod's IP"
    );
    assert_eq!(setting("device"), "cuda");
    assert_eq!(setting("queue"), "retoucher.jobs");

    let deploy = by_kind(&docs, "Deployment");
    let pod = &deploy["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace period");
    assert!(
        grace >= drain + 10,
        "terminationGracePeriodSeconds ({grace}) must exceed worker.drain_timeout_secs ({drain}) with a margin"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    assert_eq!(
        c["image"], "registry.example.com/retoucher:0.1.0-cuda",
        "kustomize images: applied"
    );
    assert_eq!(c["args"], serde_json::json!(["worker"]));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], 1);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    let env = c["env"].as_array().expect("env");
    let var = |name: &str| env.iter().find(|e| e["name"] == name);
    assert_eq!(
        var("RETOUCHER_CONFIG").expect("RETOUCHER_CONFIG")["value"],
        "/etc/retoucher/retoucher.toml"
    );
    assert_eq!(
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "config")
            .expect("config mount")["mountPath"],
        "/etc/retoucher"
    );
    assert!(
        var("RETOUCHER__BROKER__URL").expect("broker URL")["valueFrom"]["secretKeyRef"].is_object(),
        "the broker URL (with its password) comes from the Secret"
    );

    let job = by_kind(&docs, "Job");
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["args"],
        serde_json::json!(["migrate"])
    );

    let scaled = by_kind(&docs, "ScaledObject");
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"],
        deploy["metadata"]["name"]
    );
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "rabbitmq");
    assert_eq!(trigger["metadata"]["queueName"], "retoucher.jobs");
    assert_eq!(trigger["metadata"]["mode"], "QueueLength");
    assert_eq!(
        trigger["authenticationRef"]["name"],
        by_kind(&docs, "TriggerAuthentication")["metadata"]["name"]
    );

    // job="retoucher": the Service's name, which the ServiceMonitor scrapes and the alerts select.
    let service = by_kind(&docs, "Service");
    assert_eq!(service["metadata"]["name"], "retoucher");
    let monitor = by_kind(&docs, "ServiceMonitor");
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        service["spec"]["ports"][0]["name"]
    );
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            &service["metadata"]["labels"][k], v,
            "the ServiceMonitor selects the Service"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Configuration keys

/// `section.key` of every setting in config/default.toml (which lists every key).
fn known_config_keys() -> Vec<String> {
    let defaults: toml::Table = toml::from_str(
        &std::fs::read_to_string(root().join("config/default.toml")).expect("config/default.toml"),
    )
    .expect("config/default.toml parses");
    let mut keys = Vec::new();
    for (section, table) in &defaults {
        for key in table.as_table().into_iter().flat_map(|t| t.keys()) {
            keys.push(format!("{section}.{key}"));
        }
    }
    keys
}

/// The settings key of a `RETOUCHER__SECTION__KEY` variable (None for other variables).
fn env_key(var: &str) -> Option<String> {
    let rest = var.strip_prefix("RETOUCHER__")?;
    Some(rest.replace("__", ".").to_lowercase())
}

/// The worker ignores unknown keys, so a misspelt one would silently fall back to its default:
/// every key the deployment files set must exist in config/default.toml.
#[test]
fn deployments_set_only_known_config_keys() {
    let known = known_config_keys();
    let mut used: Vec<(String, String)> = Vec::new();

    // The ConfigMap's retoucher.toml.
    let dir = tempfile::tempdir().unwrap();
    let docs = yaml_documents(&kustomize_build(dir.path()));
    let config = by_kind(&docs, "ConfigMap")["data"]["retoucher.toml"]
        .as_str()
        .expect("retoucher.toml")
        .to_string();
    let table: toml::Table =
        toml::from_str(&config).expect("the ConfigMap's retoucher.toml parses");
    for (section, t) in &table {
        let t = t
            .as_table()
            .unwrap_or_else(|| panic!("{section} is not a [section]"));
        for key in t.keys() {
            used.push((
                format!("{section}.{key}"),
                "ConfigMap retoucher.toml".into(),
            ));
        }
    }
    // Environment of the Kubernetes containers.
    for d in &docs {
        let spec = match d["kind"].as_str() {
            Some("Deployment") | Some("Job") => &d["spec"]["template"]["spec"],
            _ => continue,
        };
        for c in spec["containers"].as_array().into_iter().flatten() {
            for e in c["env"].as_array().into_iter().flatten() {
                if let Some(k) = env_key(e["name"].as_str().unwrap_or("")) {
                    used.push((k, format!("{} {} env", d["kind"], d["metadata"]["name"])));
                }
            }
        }
    }
    // Compose services.
    let compose = yaml_documents(&root().join("deploy/compose/docker-compose.yml"));
    for (name, svc) in compose[0]["services"].as_object().unwrap() {
        for var in svc["environment"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.keys())
        {
            if let Some(k) = env_key(var) {
                used.push((k, format!("compose service {name}")));
            }
        }
    }
    // Dockerfile ENV lines (and their continuation lines).
    for file in ["Dockerfile.cpu", "Dockerfile.cuda"] {
        let text = std::fs::read_to_string(root().join("deploy/docker").join(file)).unwrap();
        for word in text.split_whitespace() {
            if let Some((var, _)) = word.split_once('=') {
                if let Some(k) = env_key(var) {
                    used.push((k, file.to_string()));
                }
            }
        }
    }

    assert!(
        used.len() > 20,
        "found only {} settings: {used:?}",
        used.len()
    );
    let unknown: Vec<String> = used
        .iter()
        .filter(|(k, _)| !known.contains(k))
        .map(|(k, src)| format!("{k} (set in {src})"))
        .collect();
    assert!(
        unknown.is_empty(),
        "settings that config/default.toml does not know (the worker would ignore them): {unknown:?}"
    );
}

// ------------------------------------------------------------------------------------------
// Docker and compose

#[test]
fn dockerfiles_pass_hadolint() {
    run_ok(Command::new(tool("hadolint")).args([
        "deploy/docker/Dockerfile.cpu",
        "deploy/docker/Dockerfile.cuda",
    ]));
}

#[test]
fn dockerfiles_keep_their_promises() {
    for name in ["Dockerfile.cpu", "Dockerfile.cuda"] {
        let text = std::fs::read_to_string(root().join("deploy/docker").join(name)).unwrap();
        for needle in [
            "ENTRYPOINT [\"retoucher\"]",
            "CMD [\"worker\"]",
            "EXPOSE 9898",
            "USER 10001:10001",
            "ENV ORT_DYLIB_PATH=",
            "RETOUCHER__METRICS__LISTEN=0.0.0.0:9898",
            "cargo build --release --locked",
            "sha256sum -c",
        ] {
            assert!(text.contains(needle), "{name} lacks {needle:?}");
        }
    }
    let cuda = std::fs::read_to_string(root().join("deploy/docker/Dockerfile.cuda")).unwrap();
    assert!(cuda.contains("--features cuda") && cuda.contains("onnxruntime-gpu=="));
}

#[test]
fn compose_file_matches_the_compose_spec() {
    run_ok(Command::new(tool("check-jsonschema")).args([
        "--builtin-schema",
        "vendor.compose-spec",
        "deploy/compose/docker-compose.yml",
    ]));
}

#[test]
fn compose_publishes_ports_on_loopback_only() {
    let docs = yaml_documents(&root().join("deploy/compose/docker-compose.yml"));
    let services = docs[0]["services"].as_object().expect("services");
    for (name, svc) in services {
        for port in svc["ports"].as_array().into_iter().flatten() {
            let spec = port
                .as_str()
                .unwrap_or_else(|| panic!("{name}: use the short port syntax"));
            assert!(
                spec.starts_with("127.0.0.1:"),
                "service {name} publishes {spec:?} beyond the loopback interface"
            );
        }
    }
    assert_eq!(
        services["migrate"]["command"],
        serde_json::json!(["migrate"])
    );
    assert_eq!(
        services["worker"]["depends_on"]["migrate"]["condition"],
        "service_completed_successfully"
    );
}
