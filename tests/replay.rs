//! `retoucher replay` against the real broker and S3: exactly the selected dead letters move
//! back to the jobs queue, with their attempts reset, and then complete; a dry run moves nothing.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

fn replay(world: &World, args: &[&str]) -> (bool, String, String) {
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_retoucher"))
            .arg("replay")
            .args(["--queue", &world.queue])
            .args(args)
            .env("RETOUCHER__BROKER__URL", amqp_url()),
        CLI_LIMIT,
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn dead_count_settles(world: &World, expected: u32) {
    for _ in 0..200 {
        if world.ready(&world.dead_queue()).await == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "dead queue has {} messages, expected {expected}",
        world.ready(&world.dead_queue()).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_moves_exactly_the_selected_dead_letters_and_they_complete() {
    let world = World::new().await;
    let mut events = world.events().await;
    let _worker = world.start_worker(&[]);
    // Two jobs whose image is not there yet, one invalid job.
    let missing: Vec<String> = (0..2).map(|i| unique(&format!("late-{i}"))).collect();
    for id in &missing {
        world
            .publish(
                json!({"job_id": id, "image": format!("s3://{}/late.png", world.input), "prompt": "p"})
                    .to_string()
                    .as_bytes(),
            )
            .await;
    }
    world.publish(br#"{"job_id": "broken", "prompt": 1}"#).await;
    let failed = events.wait_for(&missing, Duration::from_secs(60)).await;
    assert!(failed.iter().all(|(k, _)| k == "job.failed"));
    dead_count_settles(&world, 3).await;

    // Dry run: lists the two, moves nothing.
    let (ok, stdout, stderr) = replay(&world, &["--class", "image_not_found", "--dry-run"]);
    assert!(ok, "{stderr}");
    for id in &missing {
        assert!(
            stdout.contains(&format!("would move\t{id}\timage_not_found")),
            "{stdout}"
        );
    }
    assert!(!stdout.contains("broken"), "{stdout}");
    dead_count_settles(&world, 3).await;

    // The image arrives; replay only one of them by job id, then the other by class.
    world
        .put(&world.input, "late.png", example("coffee-blemished.png"))
        .await;
    let (ok, stdout, stderr) = replay(&world, &["--job-id", &missing[0]]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let done = events
        .wait_for(&missing[..1], Duration::from_secs(60))
        .await;
    assert_eq!(done[0].0, "job.succeeded");
    assert_eq!(done[0].1["attempt"], 1, "attempts start again");
    dead_count_settles(&world, 2).await;

    let (ok, stdout, stderr) = replay(&world, &["--class", "image_not_found"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&missing[1]) && stdout.lines().count() == 1,
        "{stdout}"
    );
    let done = events
        .wait_for(&missing[1..], Duration::from_secs(60))
        .await;
    assert_eq!(done[0].0, "job.succeeded");

    // Only the invalid job is left, untouched.
    dead_count_settles(&world, 1).await;
    let left = world.drain_dead().await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0, br#"{"job_id": "broken", "prompt": 1}"#);
    assert_eq!(left[0].1, "invalid_message");
    world.cleanup().await;
}
