//! `retoucher bench`, both ways: on local files (the default) and `--through-broker` against
//! the real RabbitMQ and S3, where an in-process worker consumes the published jobs.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn bench(args: &[&str], env: &[(String, String)]) -> serde_json::Value {
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_retoucher"))
            .arg("bench")
            .args(["--jobs", "8", "--concurrency", "4", "--image-size", "128"])
            .args(["--model-only-batches", "2", "--json"])
            .args(args)
            .envs(env.iter().cloned()),
        Duration::from_secs(600),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bench --json: {e}\n{stderr}"))
}

fn check_run(run: &serde_json::Value) {
    assert_eq!(run["jobs"], 8);
    assert_eq!(run["failed"], 0, "{run}");
    assert!(run["jobs_per_s"].as_f64().unwrap() > 0.0);
    assert!(
        run["latency"]["p99_ms"].as_f64().unwrap() >= run["latency"]["p50_ms"].as_f64().unwrap()
    );
    let perception = &run["models"]["perception"];
    assert!(perception["items"].as_u64().unwrap() >= 8, "{perception}");
    assert!(perception["model_only_items_per_s"].as_f64().unwrap() > 0.0);
    assert!(run["model_only_jobs_per_s"].as_f64().unwrap() > 0.0);
    assert!(run["stages_ms"]["decode"].as_f64().unwrap() > 0.0, "{run}");
    // Where the cores went: the worker's own work is measured apart from the model threads.
    // (Per-thread times come in 10 ms ticks, too coarse for 8 jobs to say more than this.)
    let cpu = &run["cpu"];
    let process = cpu["process_s"].as_f64().expect("cpu.process_s");
    let model = cpu["model_threads_s"].as_f64().unwrap();
    assert!(process > 0.0 && model <= process, "{cpu}");
    assert!(cpu["host_ms_per_job"].as_f64().unwrap() > 0.0, "{cpu}");
    assert!(
        cpu["host_ceiling_jobs_per_s"].as_f64().unwrap() > 0.0,
        "{cpu}"
    );
    let groups = cpu["threads_s"].as_object().expect("cpu.threads_s");
    for group in [
        "runtime",
        "model-perceptio",
        "model-classifie",
        "model-inpaint",
    ] {
        assert!(groups.contains_key(group), "no {group} threads: {cpu}");
    }
}

#[test]
fn bench_on_local_files_compares_with_batch_size_1() {
    env_var("ORT_DYLIB_PATH");
    let report = bench(&["--compare-batch-1"], &[]);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    check_run(&runs[0]);
    check_run(&runs[1]);
    assert_eq!(runs[1]["models"]["perception"]["mean_batch_size"], 1.0);
    // The headline ratio is the two runs' throughputs divided, dynamic batching first.
    let ratio = report["dynamic_over_batch_1"].as_f64().expect("the ratio");
    let dynamic = runs[0]["jobs_per_s"].as_f64().unwrap();
    let batch_1 = runs[1]["jobs_per_s"].as_f64().unwrap();
    assert!(
        (ratio - dynamic / batch_1).abs() <= 1e-9 * ratio.abs(),
        "dynamic_over_batch_1 {ratio} is not {dynamic} / {batch_1}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_through_the_broker_and_s3() {
    let world = World::new().await;
    let env = world.worker_env(free_port());
    let report = tokio::task::spawn_blocking(move || bench(&["--through-broker"], &env))
        .await
        .unwrap();
    check_run(&report["runs"][0]);
    // Every job went through S3: eight complete result sets.
    let keys = world.keys(&world.output, "results/").await;
    let diagnostics = keys
        .iter()
        .filter(|k| k.ends_with("/diagnostics.json"))
        .count();
    assert_eq!(diagnostics, 8, "{keys:?}");
    assert_eq!(world.ready(&world.queue).await, 0);
    world.cleanup().await;
}
