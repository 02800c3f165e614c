//! Rolling upgrades (issue 9): a worker accepts a broker migrated past its own topology version
//! by additive versions only and keeps consuming; a version that is not additive stops workers
//! that do not know it, with the version they need.
//!
//! Two migration sets stand for two releases, given to `retoucher migrate` and `retoucher
//! worker` through `broker.migrations` (a folder): the built-in files plus
//! - `0003_audit` (additive): a new queue `{queue}.audit` bound to `retoucher.events`;
//! - `0004_priority` (not additive): a queue the next release moves jobs to, so earlier workers
//!   would consume the wrong one.
//!
//! The worker of the current release uses the built-in migrations (version 2). Everything is
//! declared for this test's own jobs queue, so it disturbs no other test on the broker.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use retoucher::broker::topology;

const WAIT: Duration = Duration::from_secs(120);

const AUDIT: &str = r#"
description = "an audit queue bound to the events exchange"
additive = true

[[queue]]
name = "{queue}.audit"
durable = true
[queue.arguments]
x-queue-type = "quorum"

[[binding]]
queue = "{queue}.audit"
exchange = "retoucher.events"
routing_key = "{queue}.audit"
"#;

const PRIORITY: &str = r#"
description = "jobs move to a priority queue, which earlier workers do not consume"
additive = false

[[queue]]
name = "{queue}.priority"
durable = true
[queue.arguments]
x-queue-type = "quorum"
"#;

/// A release's migration folder: the built-in files plus `extra` (name, text).
fn release(dir: &Path, extra: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).expect("migration folder");
    for file in ["0001_initial.toml", "0002_retry_delays.toml"] {
        std::fs::copy(repo().join("migrations").join(file), dir.join(file))
            .expect("copy a built-in migration");
    }
    for (name, text) in extra {
        std::fs::write(dir.join(name), text).expect("write a migration");
    }
}

/// Runs `retoucher migrate` for the world's queue with the migrations of `folder` (`None`: the
/// built-in ones); returns (success, stdout + stderr).
fn migrate(world: &World, folder: Option<&Path>) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_retoucher"));
    command
        .args(["migrate", "--queue", &world.queue])
        .envs(broker_env(&world.broker));
    if let Some(folder) = folder {
        command.env("RETOUCHER__BROKER__MIGRATIONS", folder);
    }
    let out = output_within(&mut command, CLI_LIMIT);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Publishes one job and waits for its `job.succeeded`.
async fn one_job_succeeds(world: &World, events: &mut Events, worker: &Worker, tag: &str) {
    let id = unique(tag);
    world.publish(&cat_job(world, &id)).await;
    let got = events.wait_for(std::slice::from_ref(&id), WAIT).await;
    assert_eq!(
        got[0].0,
        "job.succeeded",
        "{tag}: {}\n{}",
        got[0].1,
        worker.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_follow_additive_versions_and_stop_at_one_that_is_not() {
    let world = World::new().await;
    world.track_queue(&format!("{}.audit", world.queue));
    world.track_queue(&format!("{}.priority", world.queue));
    let folders = tempfile::tempdir().expect("temp dir");
    let v3 = folders.path().join("v3");
    let v4 = folders.path().join("v4");
    release(&v3, &[("0003_audit.toml", AUDIT)]);
    release(
        &v4,
        &[("0003_audit.toml", AUDIT), ("0004_priority.toml", PRIORITY)],
    );
    world
        .put(&world.input, "in.png", example("chelsea-blemished.png"))
        .await;
    let mut events = world.events().await;

    // A worker of the current release (version 2) on a version 2 broker.
    let mut current = world.start_worker(&[]);
    one_job_succeeds(&world, &mut events, &current, "before").await;

    // The next release's migration, additive: applied under the running worker.
    let (ok, out) = migrate(&world, Some(&v3));
    assert!(ok, "migrate to version 3:\n{out}");
    assert!(out.contains("from version 2 to 3 (0003_audit)"), "{out}");
    assert_eq!(
        topology::current_version(&world.conn, &world.queue)
            .await
            .unwrap(),
        3
    );
    // The running worker goes on consuming.
    one_job_succeeds(&world, &mut events, &current, "after-additive").await;
    // A worker of the current release started now accepts the version 3 broker, and says so.
    let mut late = world.start_worker(&[]);
    assert!(
        late.wait_log("ahead of this worker by additive versions only", WAIT),
        "{}",
        late.log_text()
    );
    assert!(late.terminate(), "{}", late.log_text());
    // The current release's `migrate` (a rollback's migrate job) has nothing to do.
    let (ok, out) = migrate(&world, None);
    assert!(ok, "the built-in migrate on a version 3 broker:\n{out}");
    assert!(
        out.contains("ahead of this binary's version 2 by additive versions only"),
        "{out}"
    );

    // A release whose migration is not additive: earlier workers must stop.
    assert!(current.terminate(), "{}", current.log_text());
    let (ok, out) = migrate(&world, Some(&v4));
    assert!(ok, "migrate to version 4:\n{out}");
    assert!(out.contains("from version 3 to 4 (0004_priority)"), "{out}");
    let mut refused = world.spawn_worker(&[]);
    let status = refused.wait_exit(WAIT).unwrap_or_else(|| {
        panic!(
            "an old worker ran on a version 4 broker:\n{}",
            refused.log_text()
        )
    });
    let log = refused.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("version 4 of it is not additive")
            && log.contains("deploy one built with topology version 4 or later"),
        "the worker says which version it needs:\n{log}"
    );
    let (ok, out) = migrate(&world, None);
    assert!(
        !ok,
        "the built-in migrate must not touch a version 4 broker:\n{out}"
    );
    assert!(out.contains("topology version 4 or later"), "{out}");

    // The next release's worker runs.
    let v4_dir = v4.display().to_string();
    let mut next = world.start_worker(&[("RETOUCHER__BROKER__MIGRATIONS", v4_dir.as_str())]);
    one_job_succeeds(&world, &mut events, &next, "next-release").await;
    assert!(next.terminate(), "{}", next.log_text());
    assert_eq!(world.ready(&world.queue).await, 0);
    world.cleanup().await;
}
