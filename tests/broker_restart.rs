//! RabbitMQ restarted under load (design §7, issue 4): a worker with jobs in flight and jobs
//! still queued loses its broker (`rabbitmqctl stop_app`), the broker comes back ~3 s later
//! (`rabbitmqctl start_app`), and the worker must reconnect by itself (retrying with backoff up
//! to `broker.connect_timeout_secs`), declare itself ready again, and finish every job with one
//! complete result set, leaving the queues empty.
//!
//! This is its own test binary on purpose: cargo runs test binaries one after another, so no
//! other test of this crate shares the broker while it is down. It restarts the broker on
//! `RETOUCHER_TEST_AMQP_URL` with `rabbitmqctl`: the node `RETOUCHER_TEST_RABBITMQ_NODE` names
//! (`rabbitmqctl -n`), or by default the machine's node (127.0.0.1:5672). On a machine whose
//! broker others use, point both at the private node of `scripts/rabbitmq-tls.sh` (its plain
//! listener) instead. Run it as root (or as a user holding the broker's Erlang cookie). A guard
//! starts the broker again whatever happens, panics included.
//!
//! Events published while the broker is down are lost, and so is this test's own connection,
//! so completion is checked in S3 (the commit marker of every job) and, after the restart, over
//! a fresh AMQP connection (queues empty, no `job.failed`).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const JOBS: usize = 30;
/// How long the broker stays stopped.
const OUTAGE: Duration = Duration::from_secs(3);
/// Bound on any one `rabbitmqctl` command.
const CTL: Duration = Duration::from_secs(120);
/// Bound on every wait below.
const WAIT: Duration = Duration::from_secs(180);

fn job(world: &World, id: &str) -> Vec<u8> {
    json!({
        "job_id": id,
        "image": format!("s3://{}/in.png", world.input),
        "prompt": "close up photo of a tabby cat",
        "metadata": {"test": "broker_restart"},
    })
    .to_string()
    .into_bytes()
}

fn gauge(worker: &Worker, name: &str) -> f64 {
    metric_sum(&worker.metrics(), name, "")
}

fn jobs_total(worker: &Worker, outcome: &str) -> f64 {
    metric_sum(
        &worker.metrics(),
        "retoucher_jobs_total",
        &format!("outcome=\"{outcome}\""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restarted_under_load_the_worker_reconnects_and_every_job_completes() {
    if let Err(e) = rabbitmqctl_test_node(&["status"], CTL) {
        panic!(
            "this test restarts RabbitMQ with `rabbitmqctl stop_app` / `start_app`, and rabbitmqctl \
             cannot control the broker here. Run it on the machine of the broker at \
             RETOUCHER_TEST_AMQP_URL, as root (or a user with the broker's Erlang cookie).\n{e}"
        );
    }
    // A previous run killed half-way could have left it stopped: the guard's job, but be sure.
    rabbitmqctl_test_node(&["start_app"], CTL).expect("start the broker before the test");
    rabbitmqctl_test_node(&["await_startup"], CTL).expect("wait for the broker before the test");

    let mut world = World::new().await;
    let input = example("chelsea-blemished.png");
    let size = decode(&input).dimensions();
    world.put(&world.input, "in.png", input.clone()).await;

    // Each job is held 1 s after its fetch, and at most 4 are in flight (prefetch 4), so the
    // 30 jobs take well over 8 s: the restart lands with jobs in flight *and* jobs queued.
    let mut worker = world.start_worker(&[
        ("RETOUCHER_FAULTS", "sleep@after_fetch=1000"),
        ("RETOUCHER__BROKER__PREFETCH", "4"),
        ("RETOUCHER__BROKER__CONNECT_TIMEOUT_SECS", "120"),
    ]);
    let ids: Vec<String> = (0..JOBS).map(|i| unique(&format!("restart-{i}"))).collect();
    for id in &ids {
        world.publish(&job(&world, id)).await;
    }

    // Under load: a few jobs done, some in flight, the rest still queued.
    let loaded = wait_until(WAIT, || {
        jobs_total(&worker, "retouched") + jobs_total(&worker, "clean") >= 3.0
            && gauge(&worker, "retoucher_inflight_jobs") >= 1.0
    })
    .await;
    assert!(loaded, "the worker never got going:\n{}", worker.log_text());
    let queued = world.ready(&world.queue).await;
    let in_flight = gauge(&worker, "retoucher_inflight_jobs") as u64;
    assert!(
        queued > 0,
        "every job had left the queue before the restart: nothing would test the resumed \
         consumer (lengthen the jobs)"
    );

    // The restart. From here on the guard starts the broker again whatever happens.
    let guard = BrokerGuard;
    let stopped_at = Instant::now();
    rabbitmqctl_test_node(&["stop_app"], CTL).expect("stop the broker");
    let mut saw_disconnected = false;
    let mut saw_unready = false;
    while stopped_at.elapsed() < OUTAGE {
        saw_disconnected |= gauge(&worker, "retoucher_broker_connected") == 0.0;
        // /readyz and retoucher_ready agree: both say not ready, in one poll.
        saw_unready |= http_get(worker.port, "/readyz").is_some_and(|(code, _)| code == 503)
            && gauge(&worker, "retoucher_ready") == 0.0;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        worker.is_running(),
        "the worker died with the broker:\n{}",
        worker.log_text()
    );
    rabbitmqctl_test_node(&["start_app"], CTL).expect("start the broker again");
    rabbitmqctl_test_node(&["await_startup"], CTL).expect("wait for the broker to start");
    let outage = stopped_at.elapsed();
    drop(guard);
    assert!(
        saw_disconnected && saw_unready,
        "while the broker was down the worker should report retoucher_broker_connected 0 \
         (seen: {saw_disconnected}) and /readyz 503 with retoucher_ready 0 (seen: {saw_unready}):\n{}",
        worker.log_text()
    );

    // The test's own connection died with the broker: open a fresh one.
    world.conn = connect_amqp_retry(Duration::from_secs(60)).await;
    let mut events = world.events().await;

    // The worker reconnects by itself.
    let reconnect_started = Instant::now();
    let reconnected = wait_until(WAIT, || {
        gauge(&worker, "retoucher_broker_connected") == 1.0
            && http_get(worker.port, "/readyz").is_some_and(|(code, _)| code == 200)
            && gauge(&worker, "retoucher_ready") == 1.0
    })
    .await;
    assert!(
        worker.is_running(),
        "the worker exited instead of reconnecting:\n{}",
        worker.log_text()
    );
    assert!(
        reconnected,
        "the worker did not reconnect within {WAIT:?} of the broker's return \
         (retoucher_broker_connected = {}, /readyz = {:?}):\n{}",
        gauge(&worker, "retoucher_broker_connected"),
        http_get(worker.port, "/readyz"),
        worker.log_text()
    );
    let reconnect_after = reconnect_started.elapsed();

    // Every job completes: its commit marker appears in S3.
    let deadline = Instant::now() + WAIT;
    let missing = loop {
        let keys: HashSet<String> = all_keys(&world.s3, &world.output, "results/")
            .await
            .into_iter()
            .collect();
        let missing: Vec<&String> = ids
            .iter()
            .filter(|id| !keys.contains(&format!("results/{id}/diagnostics.json")))
            .collect();
        if missing.is_empty() || Instant::now() > deadline || !worker.is_running() {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        missing.is_empty(),
        "{} of {JOBS} jobs never completed after the restart: {missing:?}\n{}",
        missing.len(),
        worker.log_text()
    );
    let keys: HashSet<String> = all_keys(&world.s3, &world.output, "results/")
        .await
        .into_iter()
        .collect();
    for id in &ids {
        if let Err(why) = check_result_set(&world, &keys, id, size).await {
            panic!("incomplete result set: {why}\n{}", worker.log_text());
        }
    }

    // Nothing left over: the queue drains and the worker goes idle.
    let mut settled = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if world.ready(&world.queue).await == 0 && gauge(&worker, "retoucher_inflight_jobs") == 0.0
        {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        settled,
        "the queue did not drain ({} ready, {} in flight):\n{}",
        world.ready(&world.queue).await,
        gauge(&worker, "retoucher_inflight_jobs"),
        worker.log_text()
    );
    let late = events.collect_for(Duration::from_secs(2)).await;
    let failed: Vec<_> = late
        .iter()
        .filter(|e| ids.iter().any(|id| e["job_id"] == id.as_str()))
        .filter(|e| e["status"] == "failed")
        .collect();
    assert!(failed.is_empty(), "jobs failed: {failed:?}");

    // Counters as integers (an empty sum of f64 is -0.0).
    let succeeded = (jobs_total(&worker, "retouched") + jobs_total(&worker, "clean")) as u64;
    let duplicates = jobs_total(&worker, "duplicate") as u64;
    let dead = jobs_total(&worker, "dead") as u64;
    let retried = jobs_total(&worker, "retried") as u64;
    assert_eq!(dead, 0, "no job is dead-lettered:\n{}", worker.log_text());
    assert!(
        succeeded + duplicates >= JOBS as u64,
        "every job acknowledged once at least: {succeeded} succeeded + {duplicates} duplicates"
    );
    assert!(
        worker.terminate(),
        "the worker stops cleanly after the restart:\n{}",
        worker.log_text()
    );

    // With the worker gone, anything it held unacknowledged would be back in the queues.
    for queue in retoucher::broker::topology::queue_names(&world.queue).expect("queue names") {
        assert_eq!(
            world.ready(&queue).await,
            0,
            "{queue} is empty at the end:\n{}",
            worker.log_text()
        );
    }
    eprintln!(
        "broker restart: {JOBS} jobs, {queued} queued and {in_flight} in flight at the stop; \
         broker down {:.1} s; worker ready again {:.1} s after start_app returned; \
         {succeeded} succeeded, {duplicates} duplicates (result set already complete), \
         {retried} retried, {dead} dead",
        outage.as_secs_f64(),
        reconnect_after.as_secs_f64()
    );
    world.cleanup().await;
}
