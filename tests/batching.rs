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

async fn run_jobs(
    world: &World,
    tag: &str,
    worker: &Worker,
) -> Vec<(serde_json::Value, image::RgbImage)> {
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
    let mut out = Vec::new();
    for (id, (key, event)) in ids.iter().zip(events) {
        assert_eq!(key, "job.succeeded", "{event}\n{}", worker.log_text());
        let png = world
            .get(&world.output, &format!("results/{id}/retouched.png"))
            .await
            .expect("retouched.png");
        out.push((event, decode(&png)));
    }
    out
}

fn mean_batch(metrics: &str, model: &str) -> f64 {
    let label = format!("model=\"{model}\"");
    let sum = metric_sum(metrics, "retoucher_batch_size_sum", &label);
    let count = metric_sum(metrics, "retoucher_batch_size_count", &label);
    assert!(count > 0.0, "no {model} batches in /metrics");
    sum / count
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
    let warm_sum = metric_sum(
        &baseline,
        "retoucher_batch_size_sum",
        "model=\"perception\"",
    );
    let warm_count = metric_sum(
        &baseline,
        "retoucher_batch_size_count",
        "model=\"perception\"",
    );
    let with_batching = run_jobs(&world, &unique("b"), &worker).await;
    let metrics = worker.metrics();
    let sum = metric_sum(&metrics, "retoucher_batch_size_sum", "model=\"perception\"") - warm_sum;
    let count = metric_sum(
        &metrics,
        "retoucher_batch_size_count",
        "model=\"perception\"",
    ) - warm_count;
    let perception_mean = sum / count;
    assert!(
        perception_mean > 1.0,
        "perception mean batch size {perception_mean} ({sum} requests in {count} calls)"
    );
    assert!(mean_batch(&metrics, "classifier") >= 1.0);
    assert!(
        metric_sum(&metrics, "retoucher_batches_total", "reason=\"full\"")
            + metric_sum(&metrics, "retoucher_batches_total", "reason=\"timeout\"")
            > 0.0
    );
    assert!(worker.terminate());

    let one = [
        ("RETOUCHER__WORKER__MAX_INFLIGHT", "16"),
        ("RETOUCHER__BATCHING__PERCEPTION__MAX_BATCH_SIZE", "1"),
        ("RETOUCHER__BATCHING__CLASSIFIER__MAX_BATCH_SIZE", "1"),
        ("RETOUCHER__BATCHING__INPAINT__MAX_BATCH_SIZE", "1"),
    ];
    let mut single = world.start_worker(&one);
    let without = run_jobs(&world, &unique("s"), &single).await;
    let metrics = single.metrics();
    assert_eq!(
        mean_batch(&metrics, "perception"),
        1.0,
        "batch size 1 was applied"
    );
    assert!(single.terminate());

    for (i, ((ea, a), (eb, b))) in with_batching.iter().zip(&without).enumerate() {
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
