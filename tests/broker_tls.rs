//! TLS to the broker (`amqps://`, issue 9) against a real RabbitMQ TLS listener: the private node
//! that `scripts/rabbitmq-tls.sh` starts on loopback with certificates it generates (a test CA,
//! a server certificate for localhost and 127.0.0.1, a client certificate, and a second CA that
//! signed nothing the broker knows). `scripts/test.sh` starts it and exports where it is.
//!
//! Covered: connecting with the CA of `broker.tls.ca_file`, topology, confirmed publishes and
//! consuming over TLS; mutual TLS (the broker sees the client certificate, refuses one from
//! another CA); a wrong CA and a host name the certificate does not list, each refused at once
//! with a message that names the setting to fix and never the password; TLS files that cannot
//! be used; and a worker process that takes a job over mutual TLS to its complete result set.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use retoucher::broker::{self, topology, BrokerError, Endpoint, Publisher, TlsFiles};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

fn tls_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{name} is not set: run scripts/test.sh, which starts the TLS test broker \
             (scripts/rabbitmq-tls.sh start; eval \"$(scripts/rabbitmq-tls.sh env)\")"
        ),
    }
}

fn cert(name: &str) -> PathBuf {
    PathBuf::from(tls_env("RETOUCHER_TEST_TLS_CERTS")).join(name)
}

/// The TLS listener, trusting `ca` (a file of the test certificates; `None`: system roots
/// only), presenting `client` (`client` → client.pem + client.key) when given.
fn amqps(ca: Option<&str>, client: Option<&str>) -> Endpoint {
    amqps_at(&tls_env("RETOUCHER_TEST_TLS_AMQPS_URL"), ca, client)
}

fn amqps_at(url: &str, ca: Option<&str>, client: Option<&str>) -> Endpoint {
    Endpoint::new(url).with_tls(TlsFiles {
        ca_file: ca.map(cert).unwrap_or_default(),
        cert_file: client
            .map(|c| cert(&format!("{c}.pem")))
            .unwrap_or_default(),
        key_file: client
            .map(|c| cert(&format!("{c}.key")))
            .unwrap_or_default(),
    })
}

async fn refused(endpoint: &Endpoint) -> BrokerError {
    match broker::connect(endpoint, "retoucher-tls-refused").await {
        Ok(conn) => {
            broker::close(&conn, "done").await;
            panic!("connected to the TLS broker with {endpoint:?}: it should have been refused")
        }
        Err(e) => e,
    }
}

#[tokio::test]
async fn amqps_with_the_ca_file_connects_consumes_and_confirms() {
    // Server-only TLS: the broker asks for a client certificate but does not require one.
    let endpoint = amqps(Some("ca.pem"), None);
    let conn = broker::connect(&endpoint, "retoucher-tls-test")
        .await
        .unwrap_or_else(|e| panic!("amqps with the test CA: {e}"));
    let queue = format!("{}.jobs", unique("retoucher-tls"));

    // The topology goes over TLS like everything else.
    let report = broker::migrate(&conn, &queue)
        .await
        .expect("migrate over TLS");
    assert_eq!(report.to, topology::latest_version());
    assert_eq!(
        broker::verify(&conn, &queue).await.expect("verify"),
        topology::latest_version()
    );

    // Confirmed publishes: each call returns once the broker has confirmed the message.
    let publisher = Publisher::new(&conn).await.expect("publisher");
    let bodies: Vec<Vec<u8>> = (0..5)
        .map(|i| format!("{{\"tls\": {i}}}").into_bytes())
        .collect();
    for body in &bodies {
        publisher
            .publish_job(&queue, body)
            .await
            .expect("a confirmed publish over TLS");
    }
    // An unroutable publish is reported, not lost: confirms and returns work over TLS too.
    let error = publisher
        .publish_job(&format!("{queue}.nowhere"), b"{}")
        .await
        .expect_err("no such queue");
    assert!(matches!(error, BrokerError::Unroutable { .. }), "{error}");

    // Consumed back in order, over TLS.
    let channel = conn.create_channel().await.expect("channel");
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "tls-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume over TLS");
    for body in &bodies {
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("a delivery in time")
            .expect("consumer open")
            .expect("delivery");
        assert_eq!(&delivery.data, body);
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack over TLS");
    }
    let _ = channel.close(200, "done".into()).await;
    delete_topology(&conn, &queue).await;
    broker::close(&conn, "done").await;
}

#[tokio::test]
async fn mutual_tls_the_broker_sees_the_client_certificate() {
    let endpoint = amqps(Some("ca.pem"), Some("client"));
    let name = unique("retoucher-mtls");
    let conn = broker::connect(&endpoint, &name)
        .await
        .unwrap_or_else(|e| panic!("mutual TLS: {e}"));
    // The broker's own view of this connection (found by its name): TLS, and the subject of
    // the certificate this client presented.
    let node = tls_env("RETOUCHER_TEST_TLS_NODE");
    let listing = rabbitmqctl(
        &[
            "-n",
            &node,
            "list_connections",
            "client_properties",
            "ssl",
            "peer_cert_subject",
            "--no-table-headers",
        ],
        Duration::from_secs(60),
    )
    .expect("rabbitmqctl list_connections on the TLS node");
    let line = listing
        .lines()
        .find(|l| l.contains(&name))
        .unwrap_or_else(|| panic!("connection {name} not listed by the broker:\n{listing}"));
    assert!(line.contains("true"), "not a TLS connection: {line}");
    assert!(
        line.contains("CN=retoucher-test-client"),
        "the broker did not see the client certificate: {line}"
    );
    broker::close(&conn, "done").await;
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused_by_the_broker() {
    let error = refused(&amqps(Some("ca.pem"), Some("other-client"))).await;
    let text = error.to_string();
    assert!(matches!(error, BrokerError::Tls { .. }), "{text}");
    assert!(
        text.contains("broker.tls.cert_file") && text.contains("other-client.pem"),
        "the message names the client certificate setting: {text}"
    );
}

#[tokio::test]
async fn a_wrong_ca_is_refused_at_once_with_the_setting_to_fix() {
    // A CA that did not sign the broker's certificate.
    let wrong = amqps(Some("other-ca.pem"), None);
    let error = refused(&wrong).await;
    let text = error.to_string();
    assert!(matches!(error, BrokerError::Tls { .. }), "{text}");
    assert!(text.contains("not trusted"), "{text}");
    assert!(
        text.contains("broker.tls.ca_file") && text.contains("other-ca.pem"),
        "the message says which setting to fix: {text}"
    );
    assert!(!text.contains("guest:guest"), "no password: {text}");

    // The system roots alone do not know the test CA either.
    let text = refused(&amqps(None, None)).await.to_string();
    assert!(
        text.contains("not trusted") && text.contains("broker.tls.ca_file (not set)"),
        "{text}"
    );

    // Waiting will not fix a certificate: no retries until the deadline.
    let started = Instant::now();
    let error = broker::connect_with_retry(&wrong, "retoucher-tls-refused", WAIT)
        .await
        .expect_err("refused");
    assert!(matches!(error, BrokerError::Tls { .. }), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "gave up after {:?}, not at once",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_host_name_the_certificate_does_not_list_is_refused() {
    // The same listener on 127.0.0.2, which the certificate (localhost, 127.0.0.1) does not
    // name: the right CA, the wrong name.
    let url = tls_env("RETOUCHER_TEST_TLS_MISNAMED_URL");
    let text = refused(&amqps_at(&url, Some("ca.pem"), None))
        .await
        .to_string();
    assert!(
        text.contains("not valid for `127.0.0.2`") && text.contains("broker.url"),
        "{text}"
    );
}

#[tokio::test]
async fn tls_files_that_cannot_be_used_are_refused_before_connecting() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A key file that is no key: named, never quoted.
    let key = dir.path().join("client.key");
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nbm90LWEta2V5LWJ1dC1zZWNyZXQtYW55d2F5\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let mut endpoint = amqps(Some("ca.pem"), Some("client"));
    endpoint.tls.key_file = key.clone();
    let error = refused(&endpoint).await;
    let text = error.to_string();
    assert!(matches!(error, BrokerError::TlsFile { .. }), "{text}");
    assert!(
        text.contains("broker.tls.key_file") && text.contains("private key cannot be used"),
        "{text}"
    );
    assert!(
        !text.contains("bm90LWEta2V5"),
        "the key is not quoted: {text}"
    );

    // A real key, but not the certificate's.
    let mut endpoint = amqps(Some("ca.pem"), Some("client"));
    endpoint.tls.key_file = cert("other-client.key");
    let text = refused(&endpoint).await.to_string();
    assert!(
        text.contains("broker.tls.key_file")
            && text.contains("not the private key of the certificate"),
        "{text}"
    );

    // A CA file that does not exist.
    let mut endpoint = amqps(Some("ca.pem"), None);
    endpoint.tls.ca_file = dir.path().join("missing-ca.pem");
    let text = refused(&endpoint).await.to_string();
    assert!(
        text.contains("broker.tls.ca_file") && text.contains("cannot read"),
        "{text}"
    );

    // A client certificate without its key.
    let mut endpoint = amqps(Some("ca.pem"), Some("client"));
    endpoint.tls.key_file = PathBuf::new();
    let error = refused(&endpoint).await;
    assert!(matches!(error, BrokerError::TlsSettings { .. }), "{error}");
}

#[test]
fn the_cli_reports_an_untrusted_broker_without_the_password() {
    let url = tls_env("RETOUCHER_TEST_TLS_AMQPS_URL").replace("guest:guest", "guest:hunter2");
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_retoucher"))
            .args(["migrate", "--queue", "retoucher-tls-never.jobs"])
            .env("RETOUCHER__BROKER__URL", &url)
            .env("RETOUCHER__BROKER__TLS__CA_FILE", cert("other-ca.pem")),
        CLI_LIMIT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "migrate succeeded:\n{stderr}");
    assert!(
        stderr.contains("not trusted") && stderr.contains("broker.tls.ca_file"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("hunter2"),
        "the password leaked:\n{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("hunter2"),
        "the password leaked on stdout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_takes_a_job_over_mutual_tls() {
    // Everything over mutual TLS: migrate, the worker, the harness's publishes and events.
    let world = World::on(amqps(Some("ca.pem"), Some("client"))).await;
    let input = example("chelsea-blemished.png");
    let size = decode(&input).dimensions();
    world.put(&world.input, "in.png", input).await;
    let mut events = world.events().await;
    let mut worker = world.start_worker(&[]);
    let id = unique("tls-job");
    world
        .publish(
            json!({
                "job_id": id,
                "image": format!("s3://{}/in.png", world.input),
                "prompt": "close up photo of a tabby cat",
            })
            .to_string()
            .as_bytes(),
        )
        .await;
    let got = events.wait_for(std::slice::from_ref(&id), WAIT).await;
    assert_eq!(
        got[0].0,
        "job.succeeded",
        "{}\n{}",
        got[0].1,
        worker.log_text()
    );
    let keys = all_keys(&world.s3, &world.output, "results/")
        .await
        .into_iter()
        .collect();
    if let Err(why) = check_result_set(&world, &keys, &id, size).await {
        panic!("{why}\n{}", worker.log_text());
    }
    assert!(worker.terminate(), "{}", worker.log_text());
    assert_eq!(world.ready(&world.queue).await, 0);
    world.cleanup().await;
}
