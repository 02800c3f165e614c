//! Model failures on the batch path, injected with `RETOUCHER_FAULTS` model rules into real
//! processes running real ONNX Runtime sessions on the reference bundle:
//! - a poison request fails alone (`model_error`) while its batch-mates get their results;
//! - transient failures (ONNX Runtime's out-of-memory error) are split or retried and succeed;
//! - a model that keeps failing makes the worker not ready (`/readyz` 503, `retoucher_ready` 0,
//!   `retoucher_model_healthy` 0), its job fails with the transient class `model_unavailable`
//!   and is retried through the delay queues, and the first call that succeeds makes the worker
//!   ready again.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A small PNG with one magenta blob (something for perception to find).
fn blemished_png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 48, |x, y| {
        let (dx, dy) = (x as i32 - 30, y as i32 - 20);
        if dx * dx + dy * dy < 36 {
            image::Rgb([255, 0, 255])
        } else {
            image::Rgb([(x * 3) as u8, (y * 4) as u8, 90])
        }
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Runs `retoucher run` on a JSONL file of jobs (one per id, same image) with these faults and
/// extra arguments; returns (exit success, stderr, out folder).
fn run_jobs(dir: &Path, ids: &[&str], faults: &str, args: &[&str]) -> (bool, String) {
    std::fs::write(dir.join("in.png"), blemished_png()).unwrap();
    let lines: Vec<String> = ids
        .iter()
        .map(|id| json!({"job_id": id, "image": "in.png", "prompt": "a photo"}).to_string())
        .collect();
    std::fs::write(dir.join("jobs.jsonl"), lines.join("\n")).unwrap();
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_retoucher"))
            .arg("run")
            .arg(dir.join("jobs.jsonl"))
            .arg("--out")
            .arg(dir.join("out"))
            .args(["--bundle", &path_str(&repo().join("models/reference"))])
            .args(args)
            .env("RETOUCHER_FAULTS", faults)
            .env("RUST_LOG", "warn"),
        Duration::from_secs(180),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn has_result(dir: &Path, id: &str) -> bool {
    dir.join("out").join(id).join("diagnostics.json").is_file()
}

/// Perception batches of exactly `n` that close only when full: `n` jobs started together form
/// one batch (or the run never ends).
fn one_batch_of(n: usize) -> Vec<String> {
    vec![
        "--concurrency".into(),
        n.to_string(),
        "--max-iterations".into(),
        "0".into(),
        "--set".into(),
        format!("batching.perception.max_batch_size={n}"),
        "--set".into(),
        "batching.perception.max_delay_ms=600000".into(),
        "--set".into(),
        "batching.perception.retry_backoff_ms=1".into(),
    ]
}

fn injected(stderr: &str) -> usize {
    stderr
        .matches("fault injection: failing a model call")
        .count()
}

#[test]
fn a_poison_request_fails_alone_and_its_batch_mates_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let ids = ["good-0", "good-1", "poison-2", "good-3"];
    let args = one_batch_of(4);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, stderr) = run_jobs(dir.path(), &ids, "fail@model.perception:poison-", &args);
    assert!(!ok, "a failed job makes `run` exit 1:\n{stderr}");
    assert!(
        stderr.contains("poison-2: failed: model_error: model perception failed: injected fault"),
        "{stderr}"
    );
    for id in ["good-0", "good-1", "good-3"] {
        assert!(has_result(dir.path(), id), "{id}:\n{stderr}");
    }
    assert!(!has_result(dir.path(), "poison-2"));
    // The batch of four, then the half with the poison request, then the request alone: a
    // permanent failure is not retried.
    assert_eq!(injected(&stderr), 3, "{stderr}");
}

#[test]
fn transient_failures_are_split_or_retried_and_succeed() {
    // A batch of four fails twice with out of memory: it is split, its first half fails and is
    // split again, and from then on every call runs.
    let dir = tempfile::tempdir().unwrap();
    let ids = ["a-0", "a-1", "a-2", "a-3"];
    let args = one_batch_of(4);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, stderr) = run_jobs(dir.path(), &ids, "oom=2@model.perception", &args);
    assert!(ok, "{stderr}");
    assert!(ids.iter().all(|id| has_result(dir.path(), id)), "{stderr}");
    assert_eq!(injected(&stderr), 2, "{stderr}");

    // A request alone fails twice and is retried twice, after a pause each time.
    let dir = tempfile::tempdir().unwrap();
    let args = one_batch_of(1);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, stderr) = run_jobs(dir.path(), &["b-0"], "oom=2@model.perception", &args);
    assert!(ok, "{stderr}");
    assert!(has_result(dir.path(), "b-0"), "{stderr}");
    assert_eq!(injected(&stderr), 2, "{stderr}");
}

fn readyz(worker: &Worker) -> (u16, String) {
    http_get(worker.port, "/readyz").expect("/readyz answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_model_makes_the_worker_not_ready_until_a_call_succeeds() {
    let world = World::new().await;
    world.put(&world.input, "in.png", blemished_png()).await;
    let mut events = world.events().await;
    // Every perception call holding a request of a `sick-` job fails with out of memory: the
    // first attempt fails three times in a row (the call and two retries), which makes the model
    // unhealthy; the second attempt fails at once (no retries while unhealthy) and is the last.
    let worker = world.start_worker(&[
        ("RETOUCHER_FAULTS", "oom@model.perception:sick-"),
        ("RETOUCHER__BATCHING__PERCEPTION__RETRIES", "2"),
        ("RETOUCHER__BATCHING__PERCEPTION__RETRY_BACKOFF_MS", "1"),
        ("RETOUCHER__BATCHING__PERCEPTION__UNHEALTHY_AFTER", "3"),
        ("RETOUCHER__RETRY__MAX_ATTEMPTS", "2"),
        ("RETOUCHER__RETRY__DELAYS_MS", "100"),
        ("RETOUCHER__RETRY__JITTER", "0"),
    ]);
    let job = |id: &str| {
        json!({"job_id": id, "image": format!("s3://{}/in.png", world.input), "prompt": "a photo"})
            .to_string()
    };
    let sick = unique("sick");
    world.publish(job(&sick).as_bytes()).await;
    let done = events
        .wait_for(std::slice::from_ref(&sick), Duration::from_secs(120))
        .await;
    assert_eq!(done[0].0, "job.failed", "{:?}", done[0].1);
    assert_eq!(done[0].1["error"]["class"], "model_unavailable");
    assert_eq!(
        done[0].1["attempt"], 2,
        "retried once: the class is transient"
    );

    // No call has succeeded since: the worker stays not ready.
    let (code, body) = readyz(&worker);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("models failing (perception)"), "{body}");
    let metrics = worker.metrics();
    assert_eq!(metric_sum(&metrics, "retoucher_ready", ""), 0.0);
    let perception = "model=\"perception\"";
    assert_eq!(
        metric_sum(&metrics, "retoucher_model_healthy", perception),
        0.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "retoucher_model_retries_total",
            "kind=\"backoff\",model=\"perception\""
        ),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "retoucher_model_failures_total",
            "class=\"transient\",model=\"perception\""
        ),
        2.0,
        "one per attempt"
    );
    let dead = world.drain_dead().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1, "model_unavailable");

    // A job the model can run: its call succeeds, and the worker is ready again.
    let well = unique("well");
    world.publish(job(&well).as_bytes()).await;
    let done = events
        .wait_for(std::slice::from_ref(&well), Duration::from_secs(120))
        .await;
    assert_eq!(done[0].0, "job.succeeded", "{:?}", done[0].1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while readyz(&worker).0 != 200 {
        assert!(Instant::now() < deadline, "{:?}", readyz(&worker));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric_sum(&worker.metrics(), "retoucher_model_healthy", perception),
        1.0
    );
    drop(worker);
    world.cleanup().await;
}
