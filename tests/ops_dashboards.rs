//! The Grafana dashboard (`dashboards/retoucher.json`) and the Prometheus alerts
//! (`deploy/prometheus/alerts.yml`, and the series of its unit tests) only name metrics that
//! exist.
//!
//! How "exists" is established, for `retoucher_*` metrics:
//! 1. The declared names are the `"retoucher_…"` string literals of `src/metrics.rs` (read with
//!    `include_str!`), with their kind: a literal passed to `histogram(`/`histogram_vec(` is a
//!    histogram, whose series are `NAME_bucket`, `NAME_sum` and `NAME_count`.
//! 2. A live worker is started (`retoucher worker` from `CARGO_BIN_EXE_retoucher`, with an
//!    unreachable broker and S3, so it serves `/metrics` and loads its models but never consumes)
//!    and its `/metrics` is read. The prometheus crate prints a vector metric only once a label
//!    combination has been observed, so the live output cannot be the reference list on its own;
//!    instead every `retoucher_*` family it exports must be a declared name of the same kind. That
//!    proves the declared literals really are the exported names (no namespace or prefix added
//!    somewhere) and keeps the source parsing honest.
//! 3. Every metric a query names must be declared, with a histogram suffix exactly when it is a
//!    histogram.
//!
//! `process_*` names must appear in the live output (the process collector always exports them on
//! Linux). RabbitMQ (`rabbitmq_*`, from the rabbitmq_prometheus plugin) and GPU (`DCGM_*`, from
//! NVIDIA's dcgm-exporter) names cannot be checked against a live source here: they are checked
//! against the small allow-lists below, which say where each name comes from. `up` is
//! Prometheus's own.
//!
//! The queries are also checked for PromQL syntax with promtool (installed by
//! `scripts/ops-tools.sh`), and the dashboard for what provisioning needs (a `${datasource}`
//! variable used by every panel, unique ids, a layout that fits the grid).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const METRICS_RS: &str = include_str!("../src/metrics.rs");
const DASHBOARD: &str = include_str!("../dashboards/retoucher.json");
const ALERTS: &str = include_str!("../deploy/prometheus/alerts.yml");
const ALERTS_TEST: &str = include_str!("../deploy/prometheus/alerts_test.yml");

/// RabbitMQ metrics the dashboard and alerts may use: the `queue_coarse_metrics` and
/// `queue_consumer_count` families of the rabbitmq_prometheus plugin (RabbitMQ 3.8+), as exported
/// by its `/metrics/per-object` endpoint (per-queue series with `queue` and `vhost` labels).
const RABBITMQ_METRICS: &[&str] = &[
    "rabbitmq_queue_messages_ready", // ready to be delivered to consumers
    "rabbitmq_queue_messages_unacked", // delivered, not yet acknowledged
    "rabbitmq_queue_messages",       // ready + unacked: total queue depth
    "rabbitmq_queue_consumers",      // consumers on the queue
];

/// NVIDIA dcgm-exporter metrics, from its default counter set (default-counters.csv).
const DCGM_METRICS: &[&str] = &[
    "DCGM_FI_DEV_GPU_UTIL", // GPU utilisation, percent
    "DCGM_FI_DEV_FB_USED",  // frame buffer memory used, MiB
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------------------------------------
// Declared metrics (src/metrics.rs)

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Histogram,
    Other,
}

/// `"retoucher_…"` literals of src/metrics.rs with their kind.
fn declared_metrics() -> BTreeMap<String, Kind> {
    let mut out = BTreeMap::new();
    let src = METRICS_RS;
    let mut from = 0;
    while let Some(i) = src[from..].find("\"retoucher_") {
        let start = from + i + 1;
        let len = src[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(0);
        let end = start + len;
        from = end;
        if !src[end..].starts_with('"') {
            continue; // not a whole-name literal
        }
        let before = src[..start - 1].trim_end();
        let kind = if before.ends_with("histogram(") || before.ends_with("histogram_vec(") {
            Kind::Histogram
        } else {
            Kind::Other
        };
        out.insert(src[start..end].to_string(), kind);
    }
    assert!(
        out.len() >= 10,
        "found only {} metric names in src/metrics.rs: has the way metrics are declared changed? \
         Update declared_metrics() in tests/ops_dashboards.rs",
        out.len()
    );
    out
}

// ------------------------------------------------------------------------------------------
// A live worker

/// A `retoucher worker` child process, killed on drop.
struct LiveWorker {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

impl Drop for LiveWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free port on 127.0.0.1")
}

impl LiveWorker {
    /// Starts the worker with nothing to connect to: the metrics server comes up, the models load
    /// and warm up (the reference bundle, on the CPU), and the broker connection is retried in
    /// the background, so the process stays up serving /metrics.
    fn start() -> LiveWorker {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_retoucher"));
        cmd.arg("worker").current_dir(root());
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("RETOUCHER") || k.starts_with("AWS_") {
                cmd.env_remove(&key);
            }
        }
        cmd.env("RETOUCHER__METRICS__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "RETOUCHER__BROKER__URL",
                "amqp://guest:guest@127.0.0.1:1/%2f",
            )
            .env("RETOUCHER__BROKER__CONNECT_TIMEOUT_SECS", "600")
            .env("RETOUCHER__S3__ENDPOINT", "http://127.0.0.1:1")
            .env("RETOUCHER__S3__FORCE_PATH_STYLE", "true")
            .env("RETOUCHER__MODELS__DEVICE", "cpu")
            .env("AWS_ACCESS_KEY_ID", "ops-test")
            .env("AWS_SECRET_ACCESS_KEY", "ops-test")
            .env("AWS_REGION", "us-east-1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting `retoucher worker`");
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        LiveWorker { child, port, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until /readyz says the models are up (so warm-up has recorded batch metrics).
    fn wait_for_models(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "`retoucher worker` exited ({status}) before loading its models; if ONNX Runtime \
                     is missing, run scripts/setup-ort.sh (or scripts/test.sh). Its log:\n{}",
                    self.log()
                );
            }
            if let Ok((_, body)) = http_get(self.port, "/readyz") {
                if body.contains("models up") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "`retoucher worker` did not report `models up` on /readyz within 120 s. Its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// GET over plain HTTP/1.0; returns (status code, body).
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_string()))
}

/// Metric families of a Prometheus text exposition, from its `# TYPE name kind` lines.
fn exposition_families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// Queries

/// A query and where it comes from, for messages.
struct Query {
    source: String,
    expr: String,
}

fn dashboard() -> Value {
    serde_json::from_str(DASHBOARD).expect("dashboards/retoucher.json is not valid JSON")
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(nested) = p.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn dashboard_queries() -> Vec<Query> {
    let d = dashboard();
    let mut out = Vec::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push(Query {
                    source: format!(
                        "dashboard panel {:?} target {}",
                        title,
                        t["refId"].as_str().unwrap_or("?")
                    ),
                    expr: expr.to_string(),
                });
            }
        }
    }
    out
}

/// The metric selector inside the dashboard's `label_values(METRIC{…}, label)` variables.
fn dashboard_variable_queries() -> Vec<Query> {
    let d = dashboard();
    let mut out = Vec::new();
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = match &v["query"] {
            Value::String(s) => s.clone(),
            other => other["query"].as_str().unwrap_or_default().to_string(),
        };
        let name = v["name"].as_str().unwrap_or("?");
        let inner = q
            .trim()
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| {
                panic!("variable ${name}: only label_values(…) queries are expected, got {q:?}")
            });
        let selector = match inner.rfind(',') {
            Some(i) => &inner[..i],
            None => inner,
        };
        out.push(Query {
            source: format!("dashboard variable ${name}"),
            expr: selector.trim().to_string(),
        });
    }
    out
}

/// `expr:` values of alerts.yml (inline or block scalars), found without a YAML parser: the
/// value runs on while lines are indented deeper than the `expr:` key.
fn alert_queries() -> Vec<Query> {
    let lines: Vec<&str> = ALERTS.lines().collect();
    let mut out = Vec::new();
    let mut alert = String::from("?");
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            alert = name.trim().to_string();
        }
        if let Some(rest) = trimmed.strip_prefix("expr:") {
            let rest = rest.trim();
            let mut expr = String::new();
            if rest.is_empty() || rest.starts_with('|') || rest.starts_with('>') {
                i += 1;
                while i < lines.len() {
                    let l = lines[i];
                    let t = l.trim_start();
                    if !t.is_empty() && l.len() - t.len() <= indent {
                        break;
                    }
                    expr.push_str(t);
                    expr.push('\n');
                    i += 1;
                }
            } else {
                expr = rest.trim_matches(|c| c == '\'' || c == '"').to_string();
                i += 1;
            }
            out.push(Query {
                source: format!("alert {alert}"),
                expr,
            });
            continue;
        }
        i += 1;
    }
    assert!(
        out.len() >= 5,
        "found only {} expr: entries in alerts.yml",
        out.len()
    );
    out
}

/// The `series:` of alerts_test.yml: the test inputs must use real metric names too.
fn alert_test_series() -> Vec<Query> {
    ALERTS_TEST
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- series:"))
        .map(|s| Query {
            source: "alerts_test.yml input series".to_string(),
            expr: s.trim().trim_matches('\'').to_string(),
        })
        .collect()
}

/// Metric names used by a PromQL expression: a small lexer that skips strings, label matchers
/// (`{…}`), ranges (`[…]`), numbers and durations, function names (identifiers followed by `(`),
/// keywords, and the label lists of `by`/`without`/`on`/`ignoring`/`group_left`/`group_right`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Operators, and the aggregations, which may be followed by `by (…)` rather than `(`.
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "atan2",
        "inf",
        "nan",
        "Inf",
        "NaN",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const LABEL_LIST: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let b = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |i: usize, close: u8| -> usize {
        let mut j = i + 1;
        let mut quote: Option<u8> = None;
        while j < b.len() {
            match quote {
                Some(_) if b[j] == b'\\' => j += 1,
                Some(q) if b[j] == q => quote = None,
                Some(_) => {}
                None if b[j] == b'"' || b[j] == b'\'' || b[j] == b'`' => quote = Some(b[j]),
                None if b[j] == close => return j + 1,
                None => {}
            }
            j += 1;
        }
        j
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' | b'\'' | b'`' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != c {
                    if b[j] == b'\\' {
                        j += 1;
                    }
                    j += 1;
                }
                i = j + 1;
            }
            b'{' => i = skip_to(i, b'}'),
            b'[' => i = skip_to(i, b']'),
            b'0'..=b'9' | b'.' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            }
            b'$' => {
                // a Grafana variable outside a string: skip its name
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b':' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
                {
                    i += 1;
                }
                let word = &expr[start..i];
                let mut k = i;
                while k < b.len() && b[k].is_ascii_whitespace() {
                    k += 1;
                }
                let next = b.get(k).copied();
                if LABEL_LIST.contains(&word) {
                    if next == Some(b'(') {
                        i = skip_to(k, b')');
                    }
                } else if next == Some(b'(') || KEYWORDS.contains(&word) {
                    // function, aggregation or keyword
                } else {
                    names.insert(word.to_string());
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Resolves a `retoucher_*` series name to its declared metric; Err explains what is wrong.
fn resolve<'a>(name: &str, declared: &'a BTreeMap<String, Kind>) -> Result<&'a str, String> {
    if let Some((base, kind)) = declared.get_key_value(name) {
        return match kind {
            Kind::Histogram => Err(format!(
                "{name} is a histogram: query {name}_bucket, {name}_sum or {name}_count"
            )),
            Kind::Other => Ok(base.as_str()),
        };
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(stem) = name.strip_suffix(suffix) {
            if let Some((base, kind)) = declared.get_key_value(stem) {
                return match kind {
                    Kind::Histogram => Ok(base.as_str()),
                    Kind::Other => Err(format!("{stem} is not a histogram: it has no {suffix}")),
                };
            }
        }
    }
    Err(format!(
        "{name} is not declared in src/metrics.rs (declared: {})",
        declared.keys().cloned().collect::<Vec<_>>().join(", ")
    ))
}

// ------------------------------------------------------------------------------------------
// Tests

#[test]
fn metric_lexer_finds_metrics_and_nothing_else() {
    let got = metric_names(
        r#"histogram_quantile(0.95, sum by (le, model) (rate(retoucher_inference_seconds_bucket{job=~"$job", model=~"$model"}[$__rate_interval]))) / on (model) group_left(x) foo:bar offset 5m and up == bool 1 unless max without (instance) (rabbitmq_queue_messages{queue="retoucher.jobs"})"#,
    );
    let want: BTreeSet<String> = [
        "retoucher_inference_seconds_bucket",
        "foo:bar",
        "up",
        "rabbitmq_queue_messages",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(got, want);
}

#[test]
fn every_metric_in_dashboards_and_alerts_is_exported() {
    let declared = declared_metrics();

    // The live exposition.
    let mut worker = LiveWorker::start();
    worker.wait_for_models();
    let (code, body) = http_get(worker.port, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "GET /metrics answered {code}: {body}");
    let live = exposition_families(&body);
    drop(worker);

    let mut problems = Vec::new();
    // Live retoucher_* families are declared, with the same kind.
    for (name, kind) in live.iter().filter(|(n, _)| n.starts_with("retoucher_")) {
        match declared.get(name) {
            None => problems.push(format!(
                "live /metrics exports {name}, which the parsing of src/metrics.rs did not find"
            )),
            Some(k) if (*k == Kind::Histogram) != (kind == "histogram") => problems.push(format!(
                "{name} is a {kind} on /metrics but parsed as {k:?} from src/metrics.rs"
            )),
            Some(_) => {}
        }
    }
    // Metrics that have no labels are always exported.
    for always in [
        "retoucher_broker_connected",
        "retoucher_inflight_jobs",
        "retoucher_job_duration_seconds",
        "retoucher_iterations",
    ] {
        if declared.contains_key(always) && !live.contains_key(always) {
            problems.push(format!(
                "{always} (no labels) is missing from the live /metrics"
            ));
        }
    }

    let mut queries = dashboard_queries();
    queries.extend(dashboard_variable_queries());
    queries.extend(alert_queries());
    queries.extend(alert_test_series());
    for q in &queries {
        for name in metric_names(&q.expr) {
            let verdict = if name.starts_with("retoucher_") {
                resolve(&name, &declared).map(|_| ())
            } else if name.starts_with("process_") {
                if live.contains_key(&name) {
                    Ok(())
                } else {
                    Err(format!("{name} is not on the live /metrics"))
                }
            } else if name.starts_with("rabbitmq_") {
                if RABBITMQ_METRICS.contains(&name.as_str()) {
                    Ok(())
                } else {
                    Err(format!(
                        "{name} is not in RABBITMQ_METRICS (tests/ops_dashboards.rs): check its \
                         name in the rabbitmq_prometheus plugin, then add it there"
                    ))
                }
            } else if name.starts_with("DCGM_") {
                if DCGM_METRICS.contains(&name.as_str()) {
                    Ok(())
                } else {
                    Err(format!(
                        "{name} is not in DCGM_METRICS (tests/ops_dashboards.rs): check that \
                         dcgm-exporter exports it by default, then add it there"
                    ))
                }
            } else if name == "up" {
                Ok(())
            } else {
                Err(format!("{name} is no metric this project knows of"))
            };
            if let Err(e) = verdict {
                problems.push(format!("{}: {e}\n    in: {}", q.source, q.expr.trim()));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn every_exported_metric_has_a_dashboard_panel() {
    let declared = declared_metrics();
    let used: BTreeSet<String> = dashboard_queries()
        .iter()
        .flat_map(|q| metric_names(&q.expr))
        .filter_map(|n| resolve(&n, &declared).ok().map(String::from))
        .collect();
    let missing: Vec<&String> = declared.keys().filter(|n| !used.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "metrics declared in src/metrics.rs with no panel in dashboards/retoucher.json: {missing:?} \
         (add a panel; see dashboards/README.md)"
    );
}

#[test]
fn dashboard_is_provisioning_ready() {
    let d = dashboard();
    assert_eq!(
        d["uid"], "retoucher",
        "a fixed uid keeps links and provisioning stable"
    );
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(
        d["schemaVersion"].as_u64().is_some(),
        "schemaVersion missing"
    );
    assert!(
        d.get("id").is_none_or(Value::is_null),
        "a provisioned dashboard must not carry a database id"
    );
    assert!(
        d.get("__inputs").is_none(),
        "no __inputs: the datasource is the ${{datasource}} variable"
    );

    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a template variable named datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");

    // Every datasource reference in the whole document is the variable (or Grafana's built-in
    // annotation source): no uid of one particular Grafana.
    fn datasources<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    if k == "datasource" && child.is_object() {
                        out.push(child);
                    }
                    datasources(child, out);
                }
            }
            Value::Array(list) => list.iter().for_each(|c| datasources(c, out)),
            _ => {}
        }
    }
    let mut refs = Vec::new();
    datasources(&d, &mut refs);
    for r in refs {
        let uid = r["uid"].as_str().unwrap_or("");
        assert!(
            uid == "${datasource}" || uid == "-- Grafana --",
            "datasource reference {r} is not the ${{datasource}} variable"
        );
    }

    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("");
        assert!(!title.is_empty(), "panel without a title: {p}");
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel {title:?} has no id"));
        assert!(ids.insert(id), "panel id {id} is used twice");
        let g = &p["gridPos"];
        let (x, w, h) = (g["x"].as_u64(), g["w"].as_u64(), g["h"].as_u64());
        assert!(
            matches!((x, w, h, g["y"].as_u64()), (Some(x), Some(w), Some(h), Some(_)) if x + w <= 24 && w > 0 && h > 0),
            "panel {title:?} has a bad gridPos {g}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert!(
            titles.insert(title.to_string()),
            "panel title {title:?} is used twice"
        );
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {title:?} does not use ${{datasource}}"
        );
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {title:?} has no targets"));
        assert!(!targets.is_empty(), "panel {title:?} has no queries");
        let mut refs = BTreeSet::new();
        let mut names = BTreeSet::new();
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or("");
            assert!(
                !expr.trim().is_empty(),
                "panel {title:?} has an empty query"
            );
            assert!(
                refs.insert(t["refId"].as_str().unwrap_or("").to_string()),
                "panel {title:?}: refIds must be unique and present"
            );
            names.extend(metric_names(expr));
        }
        // Where a number comes from must be plain on the panel.
        if names.iter().any(|n| n.starts_with("rabbitmq_")) {
            assert!(
                title.contains("RabbitMQ"),
                "panel {title:?} reads RabbitMQ metrics: say so in its title"
            );
        }
        if names.iter().any(|n| n.starts_with("DCGM_")) {
            assert!(
                title.contains("requires dcgm-exporter"),
                "panel {title:?} reads dcgm-exporter metrics: its title must say \"requires dcgm-exporter\""
            );
        }
    }
}

/// Grafana's variables replaced by something PromQL accepts, for a syntax check.
fn substitute_grafana_variables(expr: &str) -> String {
    let mut s = expr
        .replace("$__rate_interval", "5m")
        .replace("${__rate_interval}", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    // Any other $var / ${var} / ${var:format}: these only appear inside label matcher strings.
    while let Some(i) = s.find('$') {
        let rest = &s[i + 1..];
        let len = if let Some(inner) = rest.strip_prefix('{') {
            inner.find('}').map(|j| j + 2).unwrap_or(rest.len())
        } else {
            rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len())
        };
        s.replace_range(i..i + 1 + len, "var");
    }
    s
}

fn promtool() -> PathBuf {
    let p = root().join(".tools/ops/bin/promtool");
    assert!(
        p.exists(),
        "{} is missing: run scripts/ops-tools.sh (it installs the ops validation tools into .tools/ops/)",
        p.display()
    );
    p
}

#[test]
fn dashboard_queries_are_valid_promql() {
    let queries = dashboard_queries();
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| {
            serde_json::json!({
                "record": format!("dashboard_query_{i}"),
                "expr": substitute_grafana_variables(&q.expr),
            })
        })
        .collect();
    // JSON is YAML: promtool parses every expression of this rule file.
    let file = serde_json::json!({ "groups": [ { "name": "dashboard", "rules": rules } ] });
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dashboard-queries.yml");
    std::fs::write(&path, serde_json::to_string_pretty(&file).unwrap()).expect("write rules");
    let out = Command::new(promtool())
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("running promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        // Map "dashboard_query_N" in promtool's message back to the panel.
        let mut msg = text.clone();
        for (i, q) in queries.iter().enumerate().rev() {
            msg = msg.replace(&format!("dashboard_query_{i}"), &q.source);
        }
        panic!("promtool rejects dashboard queries:\n{msg}");
    }
    assert!(
        text.contains(&format!("{} rules found", queries.len())),
        "promtool did not check every query: {text}"
    );
}
