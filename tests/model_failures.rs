//! Model failures on the batch path, injected with `RETOUCHER_FAULTS` model rules into real
//! processes running real ONNX Runtime sessions on the reference bundle:
//! - a poison request fails alone (`model_error`) while its batch-mates get their results;
//! - transient failures (ONNX Runtime's out-of-memory error) are split or retried and succeed;
//! - a model that keeps failing makes the worker not ready (`/readyz` 503, `retoucher_ready` 0,
//!   `retoucher_model_healthy` 0), its job fails with the transient class `model_unavailable`
//!   and is retried through the delay queues, and the first call that succeeds makes the worker
//!   ready again;
//! - the VLM decoder's continuous batch (`models/vlm-reference`) likewise: a sequence whose
//!   decode steps fail fails alone (`model_error`) while the sequences decoded with it finish
//!   with exactly the pixels of a run without faults, and a transient failure of a step is
//!   recovered by stepping each sequence alone.

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

/// Runs `retoucher run` on `dir/jobs.jsonl` (images next to it) with `bundle`, these faults and
/// extra arguments; returns (exit success, stderr). Results go to `dir/out`.
fn run_file(dir: &Path, bundle: &str, faults: &str, args: &[&str]) -> (bool, String) {
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_retoucher"))
            .arg("run")
            .arg(dir.join("jobs.jsonl"))
            .arg("--out")
            .arg(dir.join("out"))
            .args(["--bundle", &path_str(&repo().join(bundle))])
            .args(args)
            .env("RETOUCHER_FAULTS", faults)
            .env("RUST_LOG", "warn"),
        Duration::from_secs(300),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the reference bundle on one job per id, all the same image.
fn run_jobs(dir: &Path, ids: &[&str], faults: &str, args: &[&str]) -> (bool, String) {
    std::fs::write(dir.join("in.png"), blemished_png()).unwrap();
    let lines: Vec<String> = ids
        .iter()
        .map(|id| json!({"job_id": id, "image": "in.png", "prompt": "a photo"}).to_string())
        .collect();
    std::fs::write(dir.join("jobs.jsonl"), lines.join("\n")).unwrap();
    run_file(dir, "models/reference", faults, args)
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

/// Runs `retoucher run` with the VLM test bundle on `ids` (all the same image and prompt, so
/// their answers are equal) started together, decode batches of up to four sequences.
fn run_vlm_jobs(dir: &Path, ids: &[&str], faults: &str) -> (bool, String) {
    let image = repo().join("models/vlm-reference/images/magenta-224.png");
    std::fs::copy(&image, dir.join("in.png")).unwrap();
    let lines: Vec<String> = ids
        .iter()
        .map(|id| {
            json!({"job_id": id, "image": "in.png",
                   "prompt": "a violinist with six fingers on his hand, cinematic light",
                   "options": {"max_iterations": 1}})
            .to_string()
        })
        .collect();
    std::fs::write(dir.join("jobs.jsonl"), lines.join("\n")).unwrap();
    let concurrency = ids.len().to_string();
    let args = [
        "--concurrency",
        concurrency.as_str(),
        "--set",
        "batching.decoder.max_batch_size=4",
        "--set",
        "batching.decoder.retry_backoff_ms=1",
    ];
    run_file(dir, "models/vlm-reference", faults, &args)
}

/// The log without its colour codes.
fn without_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn retouched(dir: &Path, id: &str) -> Vec<u8> {
    std::fs::read(dir.join("out").join(id).join("retouched.png"))
        .unwrap_or_else(|e| panic!("{id}: no retouched.png: {e}"))
}

#[test]
fn a_failing_sequence_leaves_the_decode_batch_and_the_others_finish_unchanged() {
    let clean = tempfile::tempdir().unwrap();
    let ids = ["seq-0", "seq-1", "poison-2", "seq-3"];
    let (ok, stderr) = run_vlm_jobs(clean.path(), &ids, "");
    assert!(ok, "the run without faults:\n{stderr}");

    // Every decode step with the poison sequence in it fails (permanently).
    let faulted = tempfile::tempdir().unwrap();
    let (ok, stderr) = run_vlm_jobs(faulted.path(), &ids, "fail@model.decoder:poison-");
    assert!(!ok, "a failed job makes `run` exit 1:\n{stderr}");
    assert!(
        stderr.contains("poison-2: failed: model_error: model decoder: injected fault"),
        "{stderr}"
    );
    let plain = without_ansi(&stderr);
    assert!(
        plain.contains("stepping each sequence alone model=decoder sequences=4"),
        "the failed step was the batch of four, split per sequence:\n{plain}"
    );
    assert!(!has_result(faulted.path(), "poison-2"));
    for id in ["seq-0", "seq-1", "seq-3"] {
        assert!(
            retouched(faulted.path(), id) == retouched(clean.path(), id),
            "{id}: its answer changed when its batch-mate failed\n{stderr}"
        );
    }

    // One transient failure (out of memory) of a step: each sequence is stepped alone, and
    // every job ends as without faults.
    let transient = tempfile::tempdir().unwrap();
    let (ok, stderr) = run_vlm_jobs(transient.path(), &ids, "oom=1@model.decoder");
    assert!(ok, "{stderr}");
    assert_eq!(injected(&stderr), 1, "{stderr}");
    for id in ids {
        assert!(
            retouched(transient.path(), id) == retouched(clean.path(), id),
            "{id}\n{stderr}"
        );
    }

    // A prefill that fails transiently twice is retried and succeeds; one that keeps failing
    // is the job's transient `model_unavailable` (retried later by the worker).
    let prefill = tempfile::tempdir().unwrap();
    let (ok, stderr) = run_vlm_jobs(prefill.path(), &["p-0"], "oom=2@model.prefill");
    assert!(ok, "{stderr}");
    assert_eq!(injected(&stderr), 2, "{stderr}");
    assert!(retouched(prefill.path(), "p-0") == retouched(clean.path(), "seq-0"));
    let sick = tempfile::tempdir().unwrap();
    let (ok, stderr) = run_vlm_jobs(sick.path(), &["sick-0"], "oom@model.prefill");
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("sick-0: failed: model_unavailable: model decoder: injected fault"),
        "{stderr}"
    );
}
