//! Broker topology, publishing and enqueueing against a real RabbitMQ
//! (`RETOUCHER_TEST_AMQP_URL`, default the local guest account).
//!
//! Every test works on its own jobs queue name, so tests run in parallel and never see each
//! other's version markers, and deletes what it declared (queues and markers) even when it
//! fails. The shared exchanges (`retoucher.dlx`, `retoucher.events`) stay: any deployment on
//! the vhost may be using them.

use std::{future::Future, panic::AssertUnwindSafe, time::Duration};

use futures_util::FutureExt;
use lapin::{
    options::{
        BasicAckOptions, BasicGetOptions, BasicRejectOptions, ExchangeDeclareOptions,
        ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties, Connection, ExchangeKind,
};
use retoucher::{
    broker::{
        self,
        topology::{self, marker_exchange},
        BrokerError, Event, EventError, EventStatus, Publisher,
    },
    enqueue::enqueue,
    error::{ErrorClass, JobError},
};

fn amqp_url() -> String {
    std::env::var("RETOUCHER_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

async fn connection() -> Connection {
    broker::connect(&broker::Endpoint::new(amqp_url()), "retoucher-tests")
        .await
        .expect("RabbitMQ must be running for these tests (RETOUCHER_TEST_AMQP_URL)")
}

/// Runs `test` with a fresh jobs queue name, then deletes the queues and markers of that
/// name whether the test passed or panicked.
async fn with_queue<F, Fut>(test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let queue = format!("retoucher-test-{:016x}.jobs", rand::random::<u64>());
    let outcome = AssertUnwindSafe(test(queue.clone())).catch_unwind().await;
    cleanup(&queue).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn cleanup(queue: &str) {
    let conn = connection().await;
    // Deleting something absent is fine on RabbitMQ 3.10, but a failure closes the channel,
    // so each delete gets its own.
    let mut names = topology::queue_names(queue).unwrap_or_default();
    names.extend([queue.to_owned(), broker::dead_letter_queue(queue)]);
    for name in names {
        let channel = conn.create_channel().await.expect("channel");
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for version in 1..=topology::latest_version() + 2 {
        for marker in [
            marker_exchange(queue, version),
            topology::additive_marker(queue, version),
        ] {
            let channel = conn.create_channel().await.expect("channel");
            let _ = channel
                .exchange_delete(marker.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(200, "cleanup".into()).await;
}

async fn message_count(conn: &Connection, queue: &str) -> u32 {
    let channel = conn.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    declared.message_count()
}

/// Polls `queue` until a message arrives (dead-lettering and quorum commits are asynchronous).
async fn get_one(conn: &Connection, queue: &str) -> lapin::message::Delivery {
    let channel = conn.create_channel().await.expect("channel");
    for _ in 0..100 {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("basic.get");
        if let Some(message) = got {
            message
                .delivery
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
            return message.delivery;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no message arrived in `{queue}`");
}

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

fn header_str(properties: &BasicProperties, name: &str) -> String {
    match header(properties, name) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {name}: {other:?}"),
    }
}

#[test]
fn embedded_migrations_parse_and_are_numbered_from_one() {
    for (i, migration) in topology::Migrations::embedded().iter().enumerate() {
        assert_eq!(migration.version as usize, i + 1, "{}", migration.name);
        assert!(
            migration
                .name
                .starts_with(&format!("{:04}_", migration.version)),
            "{}",
            migration.name
        );
    }
    let plan = topology::plan("retoucher.jobs").expect("migrations parse");
    assert_eq!(plan.len(), topology::Migrations::embedded().len());
    let steps = plan[0].steps.join("\n");
    assert!(steps.contains("queue `retoucher.jobs`"), "{steps}");
    assert!(steps.contains("x-queue-type=quorum"), "{steps}");
    assert!(
        steps.contains("x-dead-letter-routing-key=retoucher.jobs.dead"),
        "{steps}"
    );
    assert!(!steps.contains("{queue}"), "{steps}");
    assert!(topology::plan("").is_err());
    assert!(topology::plan(&"q".repeat(250)).is_err());
}

#[test]
fn redact_hides_passwords_only() {
    assert_eq!(
        broker::redact("amqp://worker:s3cret@mq:5672/%2f"),
        "amqp://worker:***@mq:5672/%2f"
    );
    assert_eq!(
        broker::redact("amqps://u:p@ss/w?rd@mq/vh"),
        "amqps://u:***@mq/vh"
    );
    assert_eq!(broker::redact("amqp://mq:5672/%2f"), "amqp://mq:5672/%2f");
    assert_eq!(broker::redact("amqp://user@mq"), "amqp://user@mq");
    assert_eq!(broker::redact("not a url"), "not a url");
}

#[tokio::test]
async fn invalid_url_error_does_not_leak_the_password() {
    let error = broker::connect(&broker::Endpoint::new("amqp://user:hunter2@[::1"), "t")
        .await
        .expect_err("broken URL");
    assert!(matches!(error, BrokerError::InvalidUrl { .. }), "{error}");
    assert!(!error.to_string().contains("hunter2"), "{error}");

    let error = broker::connect_with_retry(
        &broker::Endpoint::new("amqp://user:hunter2@127.0.0.1:1/%2f"),
        "t",
        Duration::from_millis(600),
    )
    .await
    .expect_err("nothing listens on port 1");
    assert!(
        matches!(error, BrokerError::RetriesExhausted { attempts, .. } if attempts >= 2),
        "{error}"
    );
    assert!(!error.to_string().contains("hunter2"), "{error}");
    let job_error = JobError::from(error);
    assert_eq!(job_error.class, ErrorClass::BrokerUnavailable);
}

#[tokio::test]
async fn migrate_then_verify() {
    with_queue(|queue| async move {
        let conn = connection().await;
        let report = broker::migrate(&conn, &queue).await.expect("migrate");
        assert_eq!(report.from, 0);
        assert_eq!(report.to, topology::latest_version());
        assert_eq!(report.applied.len(), topology::Migrations::embedded().len());
        let version = broker::verify(&conn, &queue).await.expect("verify");
        assert_eq!(version, topology::latest_version());
    })
    .await;
}

#[tokio::test]
async fn migrate_twice_changes_nothing() {
    with_queue(|queue| async move {
        let conn = connection().await;
        broker::migrate(&conn, &queue).await.expect("first migrate");
        let second = broker::migrate(&conn, &queue)
            .await
            .expect("second migrate");
        assert!(second.applied.is_empty(), "{second}");
        assert_eq!(second.from, topology::latest_version());
        assert!(second.to_string().contains("up to date"), "{second}");
        broker::verify(&conn, &queue).await.expect("verify");
    })
    .await;
}

#[tokio::test]
async fn verify_before_migrate_says_run_migrate() {
    with_queue(|queue| async move {
        let conn = connection().await;
        let error = broker::verify(&conn, &queue)
            .await
            .expect_err("not migrated");
        assert!(
            matches!(error, BrokerError::TopologyBehind { current: 0, .. }),
            "{error}"
        );
        let message = error.to_string();
        assert!(message.contains("run `retoucher migrate`"), "{message}");
        assert!(message.contains("version 0"), "{message}");
    })
    .await;
}

#[tokio::test]
async fn verify_notices_a_deleted_queue() {
    with_queue(|queue| async move {
        let conn = connection().await;
        broker::migrate(&conn, &queue).await.expect("migrate");
        let channel = conn.create_channel().await.expect("channel");
        channel
            .queue_delete(
                broker::dead_letter_queue(&queue).as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await
            .expect("delete");
        let error = broker::verify(&conn, &queue).await.expect_err("queue gone");
        assert!(
            matches!(error, BrokerError::TopologyIncomplete { .. }),
            "{error}"
        );
        assert!(error.to_string().contains(".dead"), "{error}");

        // `retoucher migrate` is the advertised fix: it re-declares what is missing, bindings
        // included, although the version marker says v1 is done.
        let report = broker::migrate(&conn, &queue).await.expect("re-migrate");
        assert!(report.applied.is_empty(), "{report}");
        assert_eq!(
            report.repaired,
            [format!("queue `{}`", broker::dead_letter_queue(&queue))]
        );
        broker::verify(&conn, &queue)
            .await
            .expect("verify after repair");
        let publisher = Publisher::new(&conn).await.expect("publisher");
        publisher
            .publish(
                broker::DEAD_LETTER_EXCHANGE,
                &broker::dead_letter_queue(&queue),
                b"via dlx",
                BasicProperties::default(),
                true,
            )
            .await
            .expect("the dlx binding was re-created");
        let again = broker::migrate(&conn, &queue).await.expect("third migrate");
        assert!(
            again.repaired.is_empty() && again.applied.is_empty(),
            "{again}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_newer_topology_that_is_not_additive_is_refused() {
    with_queue(|queue| async move {
        let conn = connection().await;
        broker::migrate(&conn, &queue).await.expect("migrate");
        // Pretend a newer binary applied the next version, not an additive one (no additive
        // marker).
        let channel = conn.create_channel().await.expect("channel");
        let next = topology::latest_version() + 1;
        channel
            .exchange_declare(
                marker_exchange(&queue, next).as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    internal: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare marker");
        let error = broker::migrate(&conn, &queue).await.expect_err("newer");
        assert!(
            matches!(error, BrokerError::TopologyAhead { current, needed, .. } if current == next && needed == next),
            "{error}"
        );
        assert!(error.to_string().contains("upgrade the worker"), "{error}");
        let error = broker::verify(&conn, &queue).await.expect_err("newer");
        assert!(error.to_string().contains("upgrade the worker"), "{error}");
    })
    .await;
}

#[tokio::test]
async fn jobs_queue_is_quorum_with_delivery_limit_and_dead_letters() {
    with_queue(|queue| async move {
        let conn = connection().await;
        broker::migrate(&conn, &queue).await.expect("migrate");

        // A classic queue of that name would be "inequivalent": the broker refuses.
        let channel = conn.create_channel().await.expect("channel");
        let mut classic = FieldTable::default();
        classic.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("classic")),
        );
        let redeclared = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                classic,
            )
            .await;
        assert!(
            redeclared.is_err(),
            "the jobs queue accepted a classic redeclare"
        );

        // Behaviour: a message rejected with requeue more often than the delivery limit
        // allows ends up in `{queue}.dead` through retoucher.dlx, body intact.
        let publisher = Publisher::new(&conn).await.expect("publisher");
        publisher
            .publish_job(&queue, b"{\"poison\":true}")
            .await
            .expect("publish");
        let channel = conn.create_channel().await.expect("channel");
        let mut deliveries = 0;
        for _ in 0..50 {
            let got = channel
                .basic_get(queue.as_str().into(), BasicGetOptions::default())
                .await
                .expect("basic.get");
            match got {
                Some(message) => {
                    deliveries += 1;
                    message
                        .delivery
                        .reject(BasicRejectOptions { requeue: true })
                        .await
                        .expect("reject");
                }
                None if deliveries > 0 => break,
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        // x-delivery-limit = 5 in 0001_initial: the first delivery plus five redeliveries.
        assert_eq!(deliveries, 6, "deliveries before dead-lettering");
        let dead = get_one(&conn, &broker::dead_letter_queue(&queue)).await;
        assert_eq!(dead.data, b"{\"poison\":true}");
        let reason = match header(&dead.properties, "x-death") {
            Some(AMQPValue::FieldArray(deaths)) => match deaths.as_slice().first() {
                Some(AMQPValue::FieldTable(death)) => match death.inner().get("reason") {
                    Some(AMQPValue::LongString(s)) => {
                        String::from_utf8_lossy(s.as_bytes()).into_owned()
                    }
                    other => panic!("x-death reason: {other:?}"),
                },
                other => panic!("x-death entry: {other:?}"),
            },
            other => panic!("x-death: {other:?}"),
        };
        assert_eq!(reason, "delivery_limit");
    })
    .await;
}

#[tokio::test]
async fn dead_letter_keeps_body_and_properties_and_adds_headers() {
    with_queue(|queue| async move {
        let conn = connection().await;
        broker::migrate(&conn, &queue).await.expect("migrate");
        let publisher = Publisher::new(&conn).await.expect("publisher");

        let body: Vec<u8> = (0..=255u8)
            .chain(b"{\"job_id\":\"x\"}".iter().copied())
            .collect();
        let mut headers = FieldTable::default();
        headers.insert(
            "tenant".into(),
            AMQPValue::LongString(LongString::from("acme")),
        );
        let original = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_expiration("60000".into())
            .with_user_id("someone-else".into())
            .with_headers(headers);
        let message = format!("image not found:\n{}", "x".repeat(5000));
        publisher
            .dead_letter(
                &queue,
                &body,
                &original,
                ErrorClass::ImageNotFound,
                &message,
            )
            .await
            .expect("dead letter");

        let dead = get_one(&conn, &broker::dead_letter_queue(&queue)).await;
        assert_eq!(dead.data, body, "body changed");
        assert_eq!(
            header_str(&dead.properties, "x-retoucher-error-class"),
            "image_not_found"
        );
        let reason = header_str(&dead.properties, "x-retoucher-error");
        assert!(reason.starts_with("image not found: xxx"), "{reason}");
        assert!(!reason.contains('\n'));
        assert!(reason.len() <= 1024, "{} bytes", reason.len());
        assert_eq!(header_str(&dead.properties, "tenant"), "acme");
        assert_eq!(
            dead.properties.message_id().as_ref().map(|s| s.as_str()),
            Some("m-1")
        );
        assert_eq!(
            dead.properties
                .correlation_id()
                .as_ref()
                .map(|s| s.as_str()),
            Some("c-1")
        );
        assert_eq!(
            dead.properties.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(*dead.properties.delivery_mode(), Some(2));
        assert_eq!(
            *dead.properties.expiration(),
            None,
            "a dead letter must not expire"
        );

        // The publisher's channel is still usable afterwards.
        assert!(publisher.is_open().await);
    })
    .await;
}

#[tokio::test]
async fn unroutable_job_is_an_error_and_the_publisher_survives() {
    with_queue(|queue| async move {
        let conn = connection().await;
        let publisher = Publisher::new(&conn).await.expect("publisher");
        let error = publisher
            .publish_job(&queue, b"{}")
            .await
            .expect_err("queue does not exist yet");
        assert!(
            matches!(
                error,
                BrokerError::Unroutable {
                    reply_code: 312,
                    ..
                }
            ),
            "{error}"
        );
        broker::migrate(&conn, &queue).await.expect("migrate");
        publisher
            .publish_job(&queue, b"{}")
            .await
            .expect("publish after migrate");
        assert_eq!(message_count(&conn, &queue).await, 1);
        let delivered = get_one(&conn, &queue).await;
        assert_eq!(
            delivered
                .properties
                .content_type()
                .as_ref()
                .map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(*delivered.properties.delivery_mode(), Some(2));
    })
    .await;
}

#[tokio::test]
async fn events_are_routed_by_status() {
    with_queue(|queue| async move {
        let conn = connection().await;
        broker::migrate(&conn, &queue).await.expect("migrate");
        // A subscriber: a queue of our own bound to job.* (deleted by cleanup as `{queue}`'s
        // sibling would not be, so name it like the jobs queue's dead queue's neighbour).
        let subscriber = queue.clone();
        let channel = conn.create_channel().await.expect("channel");
        let events_queue = format!("{subscriber}.events-test");
        channel
            .queue_declare(
                events_queue.as_str().into(),
                QueueDeclareOptions {
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare subscriber");
        channel
            .queue_bind(
                events_queue.as_str().into(),
                broker::EVENTS_EXCHANGE.into(),
                "job.*".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");

        let publisher = Publisher::new(&conn).await.expect("publisher");
        let event = Event {
            job_id: format!("{queue}-job"),
            status: EventStatus::Failed,
            output: None,
            attempt: 3,
            iterations: 0,
            regions: 0,
            duration_ms: 12,
            error: Some(EventError {
                class: ErrorClass::ImageNotFound.as_str().into(),
                message: "no such key".into(),
            }),
            metadata: Some(serde_json::json!({"tenant": "acme"})),
        };
        publisher
            .publish_event(&event)
            .await
            .expect("publish event");
        let succeeded = Event {
            status: EventStatus::Retouched,
            output: Some("s3://out/x/".into()),
            error: None,
            ..event.clone()
        };
        publisher
            .publish_event(&succeeded)
            .await
            .expect("publish event");

        let first = get_one(&conn, &events_queue).await;
        assert_eq!(first.routing_key.as_str(), "job.failed");
        let received: Event = serde_json::from_slice(&first.data).expect("event JSON");
        assert_eq!(received, event);
        let second = get_one(&conn, &events_queue).await;
        assert_eq!(second.routing_key.as_str(), "job.succeeded");

        // With routable events required, an event nobody is bound to receive is an error.
        channel
            .queue_delete(events_queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete subscriber");
        let strict = Publisher::new(&conn)
            .await
            .expect("publisher")
            .require_routable_events(true);
        let unheard = Event {
            job_id: format!("{queue}-unheard"),
            status: EventStatus::Retrying,
            ..event.clone()
        };
        // Other test runs may have subscribers on this vhost; only assert when none is bound.
        if let Err(error) = strict.publish_event(&unheard).await {
            assert!(matches!(error, BrokerError::Unroutable { .. }), "{error}");
        }
        publisher
            .publish_event(&unheard)
            .await
            .expect("lenient publisher drops it quietly");
    })
    .await;
}

#[tokio::test]
async fn enqueue_publishes_every_job() {
    with_queue(|queue| async move {
        let conn = connection().await;
        broker::migrate(&conn, &queue).await.expect("migrate");
        let jobs: Vec<Vec<u8>> = (0..500)
            .map(|i| format!("{{\"job_id\":\"job-{i}\"}}").into_bytes())
            .collect();
        let report = enqueue(&broker::Endpoint::new(amqp_url()), &queue, jobs, false)
            .await
            .expect("enqueue");
        assert_eq!(report.published, 500, "{:?}", report.failed);
        assert!(report.failed.is_empty());
        // Quorum queues report their length once the commits are applied; give them a moment.
        let mut count = 0;
        for _ in 0..50 {
            count = message_count(&conn, &queue).await;
            if count == 500 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(count, 500);
    })
    .await;
}

#[tokio::test]
async fn enqueue_to_a_missing_queue_says_run_migrate() {
    with_queue(|queue| async move {
        let error = enqueue(
            &broker::Endpoint::new(amqp_url()),
            &queue,
            vec![b"{}".to_vec()],
            false,
        )
        .await
        .expect_err("queue missing");
        assert!(error.to_string().contains("retoucher migrate"), "{error}");
    })
    .await;
}

/// Throughput of the pipelined enqueue with the progress lines on:
/// `cargo test --test broker_topology -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "slow: 20 000 persistent messages"]
async fn enqueue_throughput() {
    with_queue(|queue| async move {
        let conn = connection().await;
        broker::migrate(&conn, &queue).await.expect("migrate");
        let jobs: Vec<Vec<u8>> = (0..20_000)
            .map(|i| {
                format!("{{\"job_id\":\"job-{i}\",\"image\":\"s3://in/{i}.png\",\"prompt\":\"p\"}}")
                    .into_bytes()
            })
            .collect();
        let report = enqueue(&broker::Endpoint::new(amqp_url()), &queue, jobs, true)
            .await
            .expect("enqueue");
        assert!(
            report.failed.is_empty(),
            "{:?}",
            &report.failed[..3.min(report.failed.len())]
        );
        eprintln!(
            "{} jobs in {:.2}s",
            report.published,
            report.elapsed.as_secs_f64()
        );
        // For comparison: one confirmed publish at a time, as the worker's Publisher does.
        let publisher = Publisher::new(&conn).await.expect("publisher");
        let started = std::time::Instant::now();
        for _ in 0..500 {
            publisher.publish_job(&queue, b"{}").await.expect("publish");
        }
        eprintln!(
            "Publisher: 500 confirmed publishes in {:.2}s",
            started.elapsed().as_secs_f64()
        );
    })
    .await;
}
