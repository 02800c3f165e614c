//! Dynamic batching across jobs, seen from outside: concurrent jobs on one worker share model
//! calls (mean batch size > 1 in `/metrics`), and batching does not change results: the same
//! jobs on a worker with every `max_batch_size = 1` give the same images.
//!
//! Tolerance: batched and unbatched ONNX Runtime calls may differ in the last float bits, so
//! retouched pixels may differ by at most 2 levels per channel (after the inpainting output is
//! rounded to 8 bits), and every job must find the same number of regions.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const JOBS: usize = 16;

/// What one run of [`JOBS`] jobs produced: per job its `job.succeeded` event, retouched image
/// and diagnostics.
struct Run {
    jobs: Vec<(serde_json::Value, image::RgbImage, serde_json::Value)>,
}

impl Run {
    /// Perception passes: one per iteration of every job's loop.
    fn perception_passes(&self) -> usize {
        self.jobs
            .iter()
            .map(|(_, _, d)| d["iterations"].as_array().map_or(0, Vec::len))
            .sum()
    }

    /// Regions classified: every region of every iteration of every job.
    fn regions(&self) -> usize {
        self.jobs
            .iter()
            .flat_map(|(_, _, d)| d["iterations"].as_array().cloned().unwrap_or_default())
            .map(|it| it["regions"].as_array().map_or(0, Vec::len))
            .sum()
    }
}

async fn run_jobs(world: &World, tag: &str, worker: &Worker) -> Run {
    let mut events = world.events().await;
    let ids: Vec<String> = (0..JOBS).map(|i| format!("{tag}-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let image = if i % 2 == 0 { "cat.png" } else { "coffee.png" };
        world
            .publish(
                json!({"job_id": id, "image": format!("s3://{}/{image}", world.input), "prompt": "a photo"})
                    .to_string()
                    .as_bytes(),
            )
            .await;
    }
    let events = events.wait_for(&ids, Duration::from_secs(180)).await;
    let mut jobs = Vec::new();
    for (id, (key, event)) in ids.iter().zip(events) {
        assert_eq!(key, "job.succeeded", "{event}\n{}", worker.log_text());
        let png = world
            .get(&world.output, &format!("results/{id}/retouched.png"))
            .await
            .expect("retouched.png");
        let diagnostics = world
            .get(&world.output, &format!("results/{id}/diagnostics.json"))
            .await
            .expect("diagnostics.json");
        let diagnostics = serde_json::from_slice(&diagnostics).expect("diagnostics is JSON");
        jobs.push((event, decode(&png), diagnostics));
    }
    Run { jobs }
}

/// The batching counters of one model, as `/metrics` shows them now.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    /// Requests served (`retoucher_batch_size_sum`).
    items: f64,
    /// Model calls (`retoucher_batch_size_count`).
    calls: f64,
    /// Calls by why their batch closed (`retoucher_batches_total{reason}`).
    full: f64,
    timeout: f64,
    drained: f64,
}

impl Counts {
    fn of(metrics: &str, model: &str) -> Counts {
        let label = format!("model=\"{model}\"");
        let reason = |r: &str| {
            metric_sum(
                metrics,
                "retoucher_batches_total",
                &format!("{label},reason=\"{r}\""),
            )
        };
        Counts {
            items: metric_sum(metrics, "retoucher_batch_size_sum", &label),
            calls: metric_sum(metrics, "retoucher_batch_size_count", &label),
            full: reason("full"),
            timeout: reason("timeout"),
            drained: reason("drained"),
        }
    }

    /// What happened between `before` and `self`.
    fn since(self, before: Counts) -> Counts {
        Counts {
            items: self.items - before.items,
            calls: self.calls - before.calls,
            full: self.full - before.full,
            timeout: self.timeout - before.timeout,
            drained: self.drained - before.drained,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_are_batched_and_batching_does_not_change_results() {
    let world = World::new().await;
    world
        .put(&world.input, "cat.png", example("chelsea-blemished.png"))
        .await;
    world
        .put(&world.input, "coffee.png", example("coffee-blemished.png"))
        .await;

    // Generous delay: the jobs arrive together and must meet in the batchers.
    let batched = [
        ("RETOUCHER__WORKER__MAX_INFLIGHT", "16"),
        ("RETOUCHER__BROKER__PREFETCH", "16"),
        ("RETOUCHER__BATCHING__PERCEPTION__MAX_BATCH_SIZE", "8"),
        ("RETOUCHER__BATCHING__PERCEPTION__MAX_DELAY_MS", "100"),
        ("RETOUCHER__BATCHING__CLASSIFIER__MAX_DELAY_MS", "50"),
        ("RETOUCHER__BATCHING__INPAINT__MAX_DELAY_MS", "50"),
    ];
    let mut worker = world.start_worker(&batched);
    // Warm-up batches count too: read the baseline first.
    let baseline = worker.metrics();
    let with_batching = run_jobs(&world, &unique("b"), &worker).await;
    let metrics = worker.metrics();
    let perception = Counts::of(&metrics, "perception").since(Counts::of(&baseline, "perception"));
    let classifier = Counts::of(&metrics, "classifier").since(Counts::of(&baseline, "classifier"));
    // Exact counts, from what the jobs did (their diagnostics): one perception request per
    // loop iteration, one classifier request per region found.
    let passes = with_batching.perception_passes();
    let regions = with_batching.regions();
    assert!(passes >= JOBS, "{passes} perception passes for {JOBS} jobs");
    assert!(regions > 0, "the blemished examples have regions");
    assert_eq!(
        perception.items, passes as f64,
        "perception requests: {perception:?}"
    );
    assert_eq!(
        classifier.items, regions as f64,
        "classifier requests: {classifier:?}"
    );
    // Batched: fewer perception calls than requests.
    assert!(
        perception.calls < perception.items,
        "perception mean batch size {} ({perception:?})",
        perception.items / perception.calls
    );
    // Every call is accounted for by why its batch closed, and none by a shutdown.
    for (model, counts) in [("perception", perception), ("classifier", classifier)] {
        assert_eq!(
            counts.full + counts.timeout,
            counts.calls,
            "{model}: every batch closed full or on its delay: {counts:?}"
        );
        assert_eq!(counts.drained, 0.0, "{model}: {counts:?}");
    }
    assert!(worker.terminate());

    let one = [
        ("RETOUCHER__WORKER__MAX_INFLIGHT", "16"),
        ("RETOUCHER__BATCHING__PERCEPTION__MAX_BATCH_SIZE", "1"),
        ("RETOUCHER__BATCHING__CLASSIFIER__MAX_BATCH_SIZE", "1"),
        ("RETOUCHER__BATCHING__INPAINT__MAX_BATCH_SIZE", "1"),
    ];
    let mut single = world.start_worker(&one);
    let baseline = single.metrics();
    let without = run_jobs(&world, &unique("s"), &single).await;
    let metrics = single.metrics();
    let perception = Counts::of(&metrics, "perception").since(Counts::of(&baseline, "perception"));
    let classifier = Counts::of(&metrics, "classifier").since(Counts::of(&baseline, "classifier"));
    // Batch size 1: one call per request, as many requests as the batched run.
    assert_eq!(perception.calls, perception.items, "{perception:?}");
    assert_eq!(classifier.calls, classifier.items, "{classifier:?}");
    assert_eq!(perception.items, passes as f64, "{perception:?}");
    assert_eq!(classifier.items, regions as f64, "{classifier:?}");
    assert!(single.terminate());

    for (i, ((ea, a, _), (eb, b, _))) in with_batching.jobs.iter().zip(&without.jobs).enumerate() {
        assert_eq!(ea["regions"], eb["regions"], "job {i}: same regions found");
        assert_eq!(ea["status"], eb["status"]);
        let max_diff = a
            .pixels()
            .zip(b.pixels())
            .flat_map(|(p, q)| (0..3).map(move |c| p[c].abs_diff(q[c])))
            .max()
            .unwrap_or(0);
        assert!(
            max_diff <= 2,
            "job {i}: batched and unbatched differ by {max_diff}"
        );
    }
    world.cleanup().await;
}
