//! The test harness itself: a [`World`] that a test never cleaned up (it failed, or returned
//! early) deletes its queues, version markers and buckets when dropped, so failing tests do not
//! leak broker and S3 state into the shared servers.

mod common;

use common::*;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::ExchangeKind;

/// Whether a queue exists (passive declare on a channel of its own).
async fn queue_exists(conn: &lapin::Connection, queue: &str) -> bool {
    let channel = conn.create_channel().await.expect("channel");
    let found = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    if found {
        let _ = channel.close(0, "done".into()).await;
    }
    found
}

async fn exchange_exists(conn: &lapin::Connection, exchange: &str) -> bool {
    let channel = conn.create_channel().await.expect("channel");
    let found = channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    if found {
        let _ = channel.close(0, "done".into()).await;
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_dropped_without_cleanup_deletes_its_queues_and_buckets() {
    let world = World::new().await;
    let conn = retoucher::broker::connect(&test_broker(), "retoucher-tests-harness")
        .await
        .expect("the test broker");
    let s3 = world.s3.clone();
    world
        .put(&world.output, "results/x/diagnostics.json", b"{}".to_vec())
        .await;
    let extra = format!("{}.extra", world.queue);
    let channel = conn.create_channel().await.expect("channel");
    channel
        .queue_declare(
            extra.as_str().into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare a queue of the test's own");
    world.track_queue(&extra);
    let queues = retoucher::broker::topology::queue_names(&world.queue).expect("queue names");
    let marker = retoucher::broker::topology::marker_exchange(&world.queue, 1);
    let buckets = [
        world.input.clone(),
        world.output.clone(),
        world.forbidden.clone(),
    ];
    for queue in queues.iter().chain([&extra]) {
        assert!(
            queue_exists(&conn, queue).await,
            "{queue} exists while the world lives"
        );
    }
    assert!(exchange_exists(&conn, &marker).await, "{marker}");

    drop(world);

    for queue in queues.iter().chain([&extra]) {
        assert!(!queue_exists(&conn, queue).await, "{queue} was left behind");
    }
    assert!(
        !exchange_exists(&conn, &marker).await,
        "{marker} was left behind"
    );
    for bucket in &buckets {
        assert!(
            s3.head_bucket().bucket(bucket).send().await.is_err(),
            "bucket {bucket} was left behind"
        );
    }
    retoucher::broker::close(&conn, "done").await;
}
