//! Storage against a real S3 server (SeaweedFS enforcing SigV4), no mocks.
//!
//! `scripts/test.sh` starts the server and exports `RETOUCHER_TEST_S3_ENDPOINT`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_REGION`. Without them these tests fail
//! loudly instead of skipping: a green run must mean the S3 path was exercised.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use bytes::Bytes;
use retoucher::error::ErrorClass;
use retoucher::storage::{Location, RequestObserver, S3Settings, S3Tuning, Storage};

struct TestEnv {
    endpoint: String,
    region: String,
}

fn test_env() -> TestEnv {
    let var = |name: &str| match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("{name} is not set: run scripts/test.sh (it starts the S3 server)"),
    };
    // Checked here so a missing secret fails with the hint, not deep inside the SDK.
    var("AWS_ACCESS_KEY_ID");
    var("AWS_SECRET_ACCESS_KEY");
    TestEnv {
        endpoint: var("RETOUCHER_TEST_S3_ENDPOINT"),
        region: var("AWS_REGION"),
    }
}

fn settings(env: &TestEnv, allowed: &[&str]) -> S3Settings {
    S3Settings {
        endpoint: env.endpoint.clone(),
        region: env.region.clone(),
        force_path_style: true,
        allowed_buckets: allowed.iter().map(|b| b.to_string()).collect(),
    }
}

/// A plain SDK client with the environment's credentials, to set up and inspect buckets
/// independently of the code under test.
async fn admin_client(env: &TestEnv) -> aws_sdk_s3::Client {
    let shared = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(env.region.clone()))
        .load()
        .await;
    let config = aws_sdk_s3::config::Builder::from(&shared)
        .endpoint_url(&env.endpoint)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// A fresh bucket per test, so tests run in parallel and reruns never see old objects.
async fn new_bucket(admin: &aws_sdk_s3::Client) -> String {
    let bucket = format!("retoucher-test-{:016x}", rand::random::<u64>());
    admin
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("create test bucket");
    bucket
}

/// Best-effort cleanup; a leftover bucket only costs the throwaway test server some disk.
async fn drop_bucket(admin: &aws_sdk_s3::Client, bucket: &str) {
    if let Ok(list) = admin.list_objects_v2().bucket(bucket).send().await {
        for object in list.contents() {
            if let Some(key) = object.key() {
                let _ = admin.delete_object().bucket(bucket).key(key).send().await;
            }
        }
    }
    let _ = admin.delete_bucket().bucket(bucket).send().await;
}

fn s3(bucket: &str, key: &str) -> Location {
    Location::S3 {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
    }
}

type Calls = Arc<Mutex<Vec<(&'static str, &'static str)>>>;

fn recorder() -> (Calls, RequestObserver) {
    let calls: Calls = Arc::default();
    let sink = calls.clone();
    let observer: RequestObserver = Arc::new(move |op, outcome| {
        sink.lock().unwrap().push((op, outcome));
    });
    (calls, observer)
}

#[tokio::test]
async fn put_get_exists_roundtrip() {
    let env = test_env();
    let admin = admin_client(&env).await;
    let bucket = new_bucket(&admin).await;
    let (calls, observer) = recorder();
    let storage = Storage::s3(&settings(&env, &[&bucket]))
        .await
        .unwrap()
        .with_observer(observer);

    storage.check().await.expect("check on an existing bucket");

    let prefix = Location::parse_s3_prefix(&format!("s3://{bucket}/v1")).unwrap();
    let loc = prefix.join("job-1/retouched.png");
    assert_eq!(
        loc.to_string(),
        format!("s3://{bucket}/v1/job-1/retouched.png")
    );
    assert!(!storage.exists(&loc).await.unwrap());

    let body = Bytes::from((0..=255u8).cycle().take(300_000).collect::<Vec<u8>>());
    storage
        .put(&loc, body.clone(), "image/png")
        .await
        .expect("put");
    assert!(storage.exists(&loc).await.unwrap());
    assert_eq!(storage.get(&loc, 300_000).await.unwrap(), body);

    // The content type reached the server.
    let head = admin
        .head_object()
        .bucket(&bucket)
        .key("v1/job-1/retouched.png")
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_type(), Some("image/png"));

    // Overwriting replaces the object; empty objects work.
    storage.put(&loc, Bytes::new(), "image/png").await.unwrap();
    assert_eq!(storage.get(&loc, 0).await.unwrap(), Bytes::new());

    // Clones share the observer; one call per operation.
    let clone = storage.clone();
    assert!(clone.exists(&loc).await.unwrap());
    assert_eq!(
        *calls.lock().unwrap(),
        vec![
            ("check", "ok"),
            ("head", "not_found"),
            ("put", "ok"),
            ("head", "ok"),
            ("get", "ok"),
            ("put", "ok"),
            ("get", "ok"),
            ("head", "ok"),
        ]
    );
    drop_bucket(&admin, &bucket).await;
}

#[tokio::test]
async fn missing_objects_and_buckets_are_image_not_found() {
    let env = test_env();
    let admin = admin_client(&env).await;
    let bucket = new_bucket(&admin).await;
    let missing_bucket = format!("retoucher-missing-{:016x}", rand::random::<u64>());
    let (calls, observer) = recorder();
    let storage = Storage::s3(&settings(&env, &[&bucket, &missing_bucket]))
        .await
        .unwrap()
        .with_observer(observer);

    let err = storage
        .get(&s3(&bucket, "nope/missing.png"), 1 << 20)
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::ImageNotFound, "{err}");
    assert_eq!(
        err.message,
        format!("object s3://{bucket}/nope/missing.png does not exist")
    );
    assert!(!err.is_transient());

    let err = storage
        .get(&s3(&missing_bucket, "a.png"), 1 << 20)
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::ImageNotFound, "{err}");
    assert!(err.message.contains(&missing_bucket), "{err}");
    assert!(!storage.exists(&s3(&missing_bucket, "a.png")).await.unwrap());

    assert_eq!(
        *calls.lock().unwrap(),
        vec![
            ("get", "not_found"),
            ("get", "not_found"),
            ("head", "not_found")
        ]
    );
    drop_bucket(&admin, &bucket).await;
}

#[tokio::test]
async fn objects_over_the_limit_are_refused() {
    let env = test_env();
    let admin = admin_client(&env).await;
    let bucket = new_bucket(&admin).await;
    let storage = Storage::s3(&settings(&env, &[&bucket])).await.unwrap();
    let loc = s3(&bucket, "big.png");
    storage
        .put(&loc, Bytes::from(vec![7u8; 100_001]), "image/png")
        .await
        .unwrap();

    let err = storage.get(&loc, 100_000).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::ImageTooLarge, "{err}");
    assert!(err.message.contains("100001 bytes"), "{err}");
    assert!(err.message.contains("limit of 100000 bytes"), "{err}");
    assert_eq!(storage.get(&loc, 100_001).await.unwrap().len(), 100_001);
    drop_bucket(&admin, &bucket).await;
}

#[tokio::test]
async fn buckets_outside_the_allow_list_are_refused_without_a_request() {
    let env = test_env();
    let admin = admin_client(&env).await;
    let bucket = new_bucket(&admin).await;
    let other = new_bucket(&admin).await;
    let (calls, observer) = recorder();
    let storage = Storage::s3(&settings(&env, &[&bucket, "archive"]))
        .await
        .unwrap()
        .with_observer(observer);
    let loc = s3(&other, "a.png");

    let expected =
        format!("bucket '{other}' is not in s3.allowed_buckets (allowed: {bucket}, archive)");
    let err = storage.check_allowed(&loc).unwrap_err();
    assert_eq!(err.class, ErrorClass::BucketNotAllowed);
    assert_eq!(err.message, expected);
    let err = storage.get(&loc, 1 << 20).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::BucketNotAllowed);
    let err = storage
        .put(&loc, Bytes::from_static(b"x"), "image/png")
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::BucketNotAllowed);
    let err = storage.exists(&loc).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::BucketNotAllowed);
    assert!(calls.lock().unwrap().is_empty(), "no S3 request was made");
    // Nothing was written to the other bucket.
    let list = admin.list_objects_v2().bucket(&other).send().await.unwrap();
    assert!(list.contents().is_empty());

    // An empty allow-list allows nothing, and is not ready.
    let none = Storage::s3(&settings(&env, &[])).await.unwrap();
    let err = none.get(&s3(&bucket, "a.png"), 10).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::BucketNotAllowed);
    assert!(err.message.ends_with("(allowed: none)"), "{err}");
    assert!(none.check().await.is_err());

    drop_bucket(&admin, &bucket).await;
    drop_bucket(&admin, &other).await;
}

#[tokio::test]
async fn wrong_credentials_are_a_transient_error() {
    let env = test_env();
    let admin = admin_client(&env).await;
    let bucket = new_bucket(&admin).await;
    admin
        .put_object()
        .bucket(&bucket)
        .key("a.png")
        .body(Bytes::from_static(b"x").into())
        .send()
        .await
        .unwrap();

    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(env.region.clone()))
        .endpoint_url(&env.endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            "wrong-access-key",
            "wrong-secret-key",
            None,
            None,
            "test",
        ))
        .build();
    let (calls, observer) = recorder();
    let storage = Storage::from_s3_client(
        aws_sdk_s3::Client::from_conf(config),
        vec![bucket.clone()],
        Duration::from_secs(10),
    )
    .with_observer(observer);

    let loc = s3(&bucket, "a.png");
    let err = storage.get(&loc, 1 << 20).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::StorageUnavailable, "{err}");
    assert!(err.is_transient());
    assert!(err.message.contains("403"), "{err}");
    assert!(!err.message.contains("wrong-secret-key"), "{err}");
    let err = storage
        .put(&loc, Bytes::from_static(b"y"), "image/png")
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::StorageUnavailable, "{err}");
    assert!(storage.exists(&loc).await.is_err());
    let err = storage.check().await.unwrap_err();
    assert_eq!(err.class, ErrorClass::StorageUnavailable, "{err}");
    assert_eq!(
        *calls.lock().unwrap(),
        vec![
            ("get", "error"),
            ("put", "error"),
            ("head", "error"),
            ("check", "error"),
        ]
    );

    // The object is untouched.
    let object = admin
        .get_object()
        .bucket(&bucket)
        .key("a.png")
        .send()
        .await
        .unwrap();
    assert_eq!(object.body.collect().await.unwrap().into_bytes(), "x");
    drop_bucket(&admin, &bucket).await;
}

#[tokio::test]
async fn unreachable_endpoint_is_storage_unavailable_and_fast() {
    let env = test_env();
    let mut unreachable = settings(&env, &["retoucher-unreachable"]);
    unreachable.endpoint = "http://127.0.0.1:1".to_owned();
    let tuning = S3Tuning {
        connect_timeout: Duration::from_secs(1),
        attempt_timeout: Duration::from_secs(2),
        operation_timeout: Duration::from_secs(5),
        max_attempts: 2,
    };
    let storage = Storage::s3_tuned(&unreachable, &tuning).await.unwrap();
    let loc = s3("retoucher-unreachable", "a.png");

    let started = Instant::now();
    let err = storage.get(&loc, 1 << 20).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::StorageUnavailable, "{err}");
    assert!(err.is_transient());
    let err = storage
        .put(&loc, Bytes::from_static(b"x"), "image/png")
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::StorageUnavailable, "{err}");
    let err = storage.exists(&loc).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::StorageUnavailable, "{err}");
    let err = storage.check().await.unwrap_err();
    assert_eq!(err.class, ErrorClass::StorageUnavailable, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn bad_endpoint_setting_is_refused() {
    let env = test_env();
    let mut bad = settings(&env, &["x12"]);
    bad.endpoint = "127.0.0.1:8333".to_owned();
    let err = Storage::s3(&bad).await.unwrap_err();
    assert!(err.message.contains("http://"), "{err}");
}

/// A TCP server that answers every request with `response` and then either closes the
/// connection or holds it open without a word: faults a real S3 server will not produce on
/// demand. `None` never answers at all.
async fn raw_server(response: Option<Vec<u8>>, hold_open: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let response = response.clone();
            tokio::spawn(async move {
                // Read the request head (a GET has no body) before answering.
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if let Some(response) = &response {
                    let _ = socket.write_all(response).await;
                }
                if hold_open || response.is_none() {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            });
        }
    });
    endpoint
}

async fn storage_at(env: &TestEnv, endpoint: String) -> Storage {
    let mut faulty = settings(env, &["faulty"]);
    faulty.endpoint = endpoint;
    let tuning = S3Tuning {
        connect_timeout: Duration::from_secs(1),
        attempt_timeout: Duration::from_secs(1),
        operation_timeout: Duration::from_secs(2),
        max_attempts: 2,
    };
    Storage::s3_tuned(&faulty, &tuning).await.unwrap()
}

#[tokio::test]
async fn size_limit_is_enforced_while_streaming() {
    let env = test_env();
    // Chunked: no Content-Length to refuse up front.
    let mut response =
        b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..4 {
        response.extend_from_slice(b"3e8\r\n");
        response.extend_from_slice(&[b'x'; 1000]);
        response.extend_from_slice(b"\r\n");
    }
    response.extend_from_slice(b"0\r\n\r\n");
    let storage = storage_at(&env, raw_server(Some(response), false).await).await;
    let loc = s3("faulty", "a.png");

    let err = storage.get(&loc, 2500).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::ImageTooLarge, "{err}");
    assert_eq!(storage.get(&loc, 4000).await.unwrap().len(), 4000);
}

#[tokio::test]
async fn stalled_and_silent_servers_time_out() {
    let env = test_env();
    let stalled = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly ten b".to_vec();
    let storage = storage_at(&env, raw_server(Some(stalled), true).await).await;
    let started = Instant::now();
    let err = storage
        .get(&s3("faulty", "a.png"), 1 << 20)
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::StorageUnavailable, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    let storage = storage_at(&env, raw_server(None, true).await).await;
    let started = Instant::now();
    let err = storage
        .get(&s3("faulty", "a.png"), 1 << 20)
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::StorageUnavailable, "{err}");
    assert!(err.message.contains("timed out"), "{err}");
    let err = storage.exists(&s3("faulty", "a.png")).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::StorageUnavailable, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
