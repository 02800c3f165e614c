//! Delivery guarantees under failure (design §7), proven against the real RabbitMQ and S3 server
//! with faults injected through `RETOUCHER_FAULTS` (src/faults.rs): a worker SIGKILLed mid-job,
//! a crash between the result image and the commit marker, a job that crashes every worker that
//! takes it, a panicking job, and SIGTERM under load. Each test has its own queue and buckets.
//!
//! The promise checked every time: each job ends as exactly one complete result set (its
//! `diagnostics.json` present, `retouched.png` decodable, every listed file stored) or as a dead
//! letter with a reason; nothing is lost, and nothing half-written is trusted.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Longest wait for any one outcome; every wait in this file is bounded.
const WAIT: Duration = Duration::from_secs(60);
const READY: Duration = Duration::from_secs(60);

/// A small blemished image: quick to retouch on two cores, still with regions to fix.
fn small_input() -> Vec<u8> {
    let full = decode(&example("chelsea-blemished.png"));
    let small = image::imageops::resize(
        &full,
        full.width() / 2,
        full.height() / 2,
        image::imageops::FilterType::Triangle,
    );
    let mut out = std::io::Cursor::new(Vec::new());
    small
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encode the test input");
    out.into_inner()
}

/// Asserts that the job's result set is complete and returns its diagnostics.
async fn complete_result_set(world: &World, id: &str, input: &[u8]) -> Value {
    let prefix = format!("results/{id}/");
    let marker = world
        .get(&world.output, &format!("{prefix}diagnostics.json"))
        .await
        .unwrap_or_else(|| panic!("{id}: diagnostics.json missing"));
    let diagnostics: Value = serde_json::from_slice(&marker).expect("diagnostics is JSON");
    assert_eq!(diagnostics["job_id"], id);
    let retouched = world
        .get(&world.output, &format!("{prefix}retouched.png"))
        .await
        .unwrap_or_else(|| panic!("{id}: retouched.png missing"));
    let retouched = image::load_from_memory(&retouched)
        .unwrap_or_else(|e| panic!("{id}: retouched.png does not decode: {e}"));
    let original = decode(input);
    assert_eq!(
        (retouched.width(), retouched.height()),
        original.dimensions()
    );
    let keys = world.keys(&world.output, &prefix).await;
    for iteration in diagnostics["iterations"].as_array().expect("iterations") {
        let mut files = vec![iteration["saliency"]["map"].as_str().unwrap_or_default()];
        for region in iteration["regions"].as_array().expect("regions") {
            files.push(region["mask"].as_str().unwrap_or_default());
        }
        for file in files {
            assert!(
                keys.contains(&format!("{prefix}{file}")),
                "{id}: {file} is listed but not stored: {keys:?}"
            );
        }
    }
    diagnostics
}

/// A fresh world with the small input uploaded as `in.png`, and its event consumer.
async fn world_with_input() -> (World, Vec<u8>, Events) {
    let world = World::new().await;
    let input = small_input();
    world.put(&world.input, "in.png", input.clone()).await;
    let events = world.events().await;
    (world, input, events)
}

/// Fails if any of these jobs completes again within two seconds (a duplicate would show up).
async fn assert_no_second_completion(events: &mut Events, ids: &[String]) {
    let late: Vec<Value> = events
        .collect_for(Duration::from_secs(2))
        .await
        .into_iter()
        .filter(|e| ids.iter().any(|id| e["job_id"] == id.as_str()))
        .collect();
    assert!(late.is_empty(), "a job finished more than once: {late:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_loses_nothing() {
    let (world, input, mut events) = world_with_input().await;

    // The first worker holds the job after fetching it, long enough to be killed mid-job.
    let mut first = world.spawn_worker(&[("RETOUCHER_FAULTS", "sleep@after_fetch=60000")]);
    first.try_wait_ready(READY).unwrap();
    let id = unique("killed");
    world.publish(&cat_job(&world, &id)).await;
    assert!(
        first.wait_log("fault injection: sleeping", WAIT),
        "the job never reached the worker:\n{}",
        first.log_text()
    );
    assert!(
        first.log_text().contains("fault injection is active"),
        "a worker with faults says so:\n{}",
        first.log_text()
    );
    first.kill();
    assert!(
        world
            .keys(&world.output, &format!("results/{id}/"))
            .await
            .is_empty(),
        "nothing was written before the kill"
    );

    let mut second = world.start_worker(&[]);
    let got = events.wait_for(std::slice::from_ref(&id), WAIT).await;
    assert_eq!(got[0].0, "job.succeeded", "{}", got[0].1);
    let diagnostics = complete_result_set(&world, &id, &input).await;
    assert!(
        diagnostics["attempt"].as_u64() >= Some(2),
        "the broker counted the lost delivery: {}",
        diagnostics["attempt"]
    );
    assert_no_second_completion(&mut events, std::slice::from_ref(&id)).await;

    assert!(second.terminate(), "{}", second.log_text());
    assert_eq!(world.ready(&world.queue).await, 0, "queue is empty");
    assert_eq!(world.ready(&world.dead_queue()).await, 0);
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_commit_marker_is_recomputed_not_trusted() {
    let (world, input, mut events) = world_with_input().await;

    let id = unique("torn");
    let mut first = world.spawn_worker(&[("RETOUCHER_FAULTS", "crash@before_diagnostics")]);
    first.try_wait_ready(READY).unwrap();
    world.publish(&cat_job(&world, &id)).await;
    let status = first
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("the fault did not fire:\n{}", first.log_text()));
    assert!(!status.success(), "the worker crashed: {status}");
    assert!(first
        .log_text()
        .contains("fault injection: crash at before_diagnostics"));

    // What the crash left: images without the commit marker.
    let prefix = format!("results/{id}/");
    let partial = world.keys(&world.output, &prefix).await;
    assert!(
        partial.contains(&format!("{prefix}retouched.png")),
        "{partial:?}"
    );
    assert!(
        !partial.contains(&format!("{prefix}diagnostics.json")),
        "{partial:?}"
    );

    let mut second = world.start_worker(&[]);
    let got = events.wait_for(std::slice::from_ref(&id), WAIT).await;
    assert_eq!(got[0].0, "job.succeeded", "{}", got[0].1);
    let diagnostics = complete_result_set(&world, &id, &input).await;
    assert!(
        diagnostics["attempt"].as_u64() >= Some(2),
        "recomputed on a redelivery: {}",
        diagnostics["attempt"]
    );
    assert!(
        !second.log_text().contains("already complete"),
        "a partial set must not count as done:\n{}",
        second.log_text()
    );
    assert_no_second_completion(&mut events, std::slice::from_ref(&id)).await;
    assert!(second.terminate());
    assert_eq!(world.ready(&world.queue).await, 0);
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_crashes_every_worker_ends_in_the_dead_queue() {
    let (world, input, mut events) = world_with_input().await;
    let faults = [("RETOUCHER_FAULTS", "crash@after_fetch:poison-")];

    let poison = unique("poison");
    world.publish(&cat_job(&world, &poison)).await;
    // Restart the worker each time the poison kills it, as a supervisor would; bounded, so a
    // missing delivery limit fails the test instead of looping for ever.
    let mut crashes = 0;
    let mut dead = Vec::new();
    let mut survivor = None;
    for _ in 0..10 {
        let mut worker = world.spawn_worker(&faults);
        // Dies on the poison, or lives on because the broker dead-lettered it.
        let started = std::time::Instant::now();
        let outcome = loop {
            if let Some(status) = worker.wait_exit(Duration::from_millis(200)) {
                break Some(status);
            }
            dead.extend(world.drain_dead_letters().await);
            if !dead.is_empty() {
                break None;
            }
            assert!(
                started.elapsed() < WAIT,
                "the worker neither crashed nor saw the poison dead-lettered:\n{}",
                worker.log_text()
            );
        };
        match outcome {
            Some(status) => {
                assert!(!status.success(), "{status}");
                assert!(
                    worker
                        .log_text()
                        .contains("fault injection: crash at after_fetch"),
                    "the worker died of something else:\n{}",
                    worker.log_text()
                );
                crashes += 1;
            }
            None => {
                survivor = Some(worker);
                break;
            }
        }
    }
    let mut survivor = survivor.unwrap_or_else(|| {
        panic!("still not dead-lettered after {crashes} crashes: the delivery limit does not work")
    });
    assert_eq!(
        crashes, 6,
        "x-delivery-limit = 5: the first delivery and five redeliveries"
    );
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        dead[0].body,
        cat_job(&world, &poison),
        "the body is untouched"
    );
    assert_eq!(dead[0].death_reason, "delivery_limit", "{:?}", dead[0]);

    // The worker that survived serves the next job.
    let good = unique("after-poison");
    world.publish(&cat_job(&world, &good)).await;
    let got = events.wait_for(std::slice::from_ref(&good), WAIT).await;
    assert_eq!(got[0].0, "job.succeeded", "{}", got[0].1);
    complete_result_set(&world, &good, &input).await;
    assert!(
        world
            .keys(&world.output, &format!("results/{poison}/"))
            .await
            .is_empty(),
        "the poison never got past the fetch"
    );
    assert!(survivor.terminate());
    assert_eq!(world.ready(&world.queue).await, 0);
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_job_fails_alone() {
    let (world, input, mut events) = world_with_input().await;
    let mut worker = world.start_worker(&[("RETOUCHER_FAULTS", "panic@after_fetch:boom-")]);

    let boom = unique("boom");
    let before = unique("before-boom");
    let after = unique("after-boom");
    for id in [&before, &boom, &after] {
        world.publish(&cat_job(&world, id)).await;
    }
    let got = events
        .wait_for(&[before.clone(), boom.clone(), after.clone()], WAIT)
        .await;
    assert_eq!(got[0].0, "job.succeeded", "{}", got[0].1);
    assert_eq!(got[2].0, "job.succeeded", "{}", got[2].1);
    let (key, event) = &got[1];
    assert_eq!(key, "job.failed", "{event}");
    assert_eq!(event["error"]["class"], "internal", "{event}");

    let dead = world.wait_dead_letters(1, WAIT).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].body, cat_job(&world, &boom));
    assert_eq!(dead[0].class, "internal");
    assert!(
        dead[0].reason.contains("panicked") && dead[0].reason.contains("injected fault"),
        "the reason names the panic: {:?}",
        dead[0].reason
    );

    // Still up and serving.
    assert!(worker.is_running());
    assert_eq!(http_get(worker.port, "/healthz").map(|(c, _)| c), Some(200));
    let later = unique("later");
    world.publish(&cat_job(&world, &later)).await;
    let got = events.wait_for(std::slice::from_ref(&later), WAIT).await;
    assert_eq!(got[0].0, "job.succeeded", "{}", got[0].1);
    for id in [&before, &after, &later] {
        complete_result_set(&world, id, &input).await;
    }
    assert!(worker.terminate(), "{}", worker.log_text());
    assert_eq!(world.ready(&world.queue).await, 0);
    world.cleanup().await;
}

/// The jobs that were in flight when the worker took the signal and finished during the drain,
/// read from its log: held by the fault hook before `shutdown requested`, `job done` after it.
/// A job done before the signal does not count, however many there are. (Ids are unique, so
/// matching them anywhere in a line is enough; the log may carry colour codes around fields.)
fn finished_during_the_drain<'a>(log: &str, ids: &'a [String]) -> Vec<&'a String> {
    let Some(signal) = log.find("shutdown requested") else {
        return Vec::new();
    };
    let (before, after) = log.split_at(signal);
    let held_before = |id: &str| {
        before
            .lines()
            .any(|l| l.contains("fault injection: sleeping") && l.contains(id))
    };
    let done = |text: &str, id: &str| {
        text.lines()
            .any(|l| l.contains("job done") && l.contains(id))
    };
    ids.iter()
        .filter(|id| held_before(id) && !done(before, id) && done(after, id))
        .collect()
}

/// SIGTERM with jobs in flight, then a fresh worker: every job ends with one complete result set.
async fn sigterm_under_load(drain_timeout_secs: &str, faults: &str, expect_unfinished: bool) {
    let (world, input, mut events) = world_with_input().await;
    let mut first = world.spawn_worker(&[
        ("RETOUCHER_FAULTS", faults),
        ("RETOUCHER__WORKER__DRAIN_TIMEOUT_SECS", drain_timeout_secs),
    ]);
    first.try_wait_ready(READY).unwrap();

    // Slow jobs (held after the fetch) and quick ones, mixed.
    let ids: Vec<String> = (0..12)
        .map(|i| match i % 3 {
            0 => unique(&format!("slow-{i}")),
            1 if expect_unfinished && i < 6 => unique(&format!("stuck-{i}")),
            _ => unique(&format!("quick-{i}")),
        })
        .collect();
    for id in &ids {
        world.publish(&cat_job(&world, id)).await;
    }
    assert!(
        first.wait_log("fault injection: sleeping", WAIT),
        "no job in flight:\n{}",
        first.log_text()
    );
    first.signal_term();
    let status = first
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("the worker did not stop:\n{}", first.log_text()));
    let log = first.log_text();
    assert!(status.success(), "exit 0 after SIGTERM ({status}):\n{log}");
    assert!(log.contains("shutdown requested"), "{log}");
    assert_eq!(
        log.contains("drain timeout"),
        expect_unfinished,
        "drain outcome:\n{log}"
    );

    let mut second = world.start_worker(&[]);
    let got = events.wait_for(&ids, WAIT).await;
    let mut attempts: HashMap<&str, u64> = HashMap::new();
    for ((key, event), id) in got.iter().zip(&ids) {
        assert_eq!(key, "job.succeeded", "{id}: {event}");
        attempts.insert(id, event["attempt"].as_u64().unwrap_or(0));
    }
    for id in &ids {
        complete_result_set(&world, id, &input).await;
    }
    // Every job acked once: no late second completion, nothing left, nothing dead.
    assert_no_second_completion(&mut events, &ids).await;
    if expect_unfinished {
        assert!(
            ids.iter()
                .filter(|id| id.starts_with("stuck-"))
                .all(|id| attempts[id.as_str()] >= 2),
            "the stuck jobs were requeued and redone: {attempts:?}"
        );
    } else {
        let drained = finished_during_the_drain(&log, &ids);
        assert!(
            !drained.is_empty(),
            "no job that was in flight at the signal finished during the drain:\n{log}"
        );
    }
    assert!(second.terminate(), "{}", second.log_text());
    assert_eq!(world.ready(&world.queue).await, 0, "queue is empty");
    assert_eq!(world.ready(&world.dead_queue()).await, 0, "nothing dead");
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_in_flight_jobs() {
    sigterm_under_load("30", "sleep@after_fetch=1500:slow-", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_requeues_what_the_drain_deadline_cuts_off() {
    sigterm_under_load(
        "3",
        "sleep@after_fetch=1500:slow-,sleep@after_fetch=30000:stuck-",
        true,
    )
    .await;
}
