//! Hostile input against one running worker (design §7, issue 4): a corpus of broken, oversized,
//! malicious and merely wrong jobs, each of which must land in `{queue}.dead` with the right
//! `x-retoucher-error-class` and a reason naming its cause, while the worker stays up (its
//! process never exits, `/healthz` stays 200) and keeps completing the good jobs published in
//! between. Real RabbitMQ, real S3 server, real ONNX Runtime.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// One bad job: its raw body, the class it must be dead-lettered with, a piece of the reason,
/// and its job id when the id itself is valid (then a `job.failed` event names it too).
struct Case {
    name: &'static str,
    body: Vec<u8>,
    class: &'static str,
    reason: String,
    id: Option<String>,
}

fn case(name: &'static str, body: Vec<u8>, class: &'static str, reason: &str) -> Case {
    Case {
        name,
        body,
        class,
        reason: reason.to_string(),
        id: None,
    }
}

/// A case whose body is a JSON object with a valid, unique `job_id`.
fn with_id(name: &'static str, mut body: Value, class: &'static str, reason: &str) -> Case {
    let id = unique(name);
    body["job_id"] = json!(id);
    Case {
        id: Some(id),
        ..case(name, body.to_string().into_bytes(), class, reason)
    }
}

/// A case whose body has no usable `job_id`: a nonce keeps the bodies apart.
fn no_id(name: &'static str, mut body: Value, class: &'static str, reason: &str) -> Case {
    body["nonce"] = json!(unique(name));
    case(name, body.to_string().into_bytes(), class, reason)
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode test image");
    out.into_inner()
}

/// A small blemished image: the good jobs.
fn good_image() -> image::RgbImage {
    let full = decode(&example("chelsea-blemished.png"));
    image::imageops::resize(
        &full,
        full.width() / 2,
        full.height() / 2,
        image::imageops::FilterType::Triangle,
    )
}

/// A valid PNG whose IHDR (with a correct CRC) declares 60000×60000 pixels: a decompression
/// bomb that is tiny on disk.
fn png_bomb() -> Vec<u8> {
    let mut bytes = encode(
        &image::RgbImage::from_pixel(4, 4, image::Rgb([9, 9, 9])),
        image::ImageFormat::Png,
    );
    // Signature (8), IHDR length (4), "IHDR" (4), width (4), height (4), ... CRC over type+data.
    bytes[16..20].copy_from_slice(&60_000u32.to_be_bytes());
    bytes[20..24].copy_from_slice(&60_000u32.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

/// A JPEG whose SOF0 header declares 65000×65000 pixels.
fn jpeg_bomb() -> Vec<u8> {
    let mut bytes = encode(
        &image::RgbImage::from_pixel(16, 16, image::Rgb([9, 9, 9])),
        image::ImageFormat::Jpeg,
    );
    let sof = bytes
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline SOF0 marker");
    // Marker (2), length (2), precision (1), height (2), width (2).
    bytes[sof + 5..sof + 7].copy_from_slice(&65_000u16.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&65_000u16.to_be_bytes());
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corpus_of_bad_jobs_is_dead_lettered_while_good_jobs_go_on() {
    let world = World::new().await;
    let good = encode(&good_image(), image::ImageFormat::Png);
    let jpeg = encode(&good_image(), image::ImageFormat::Jpeg);
    // This worker's byte limit sits between the good image and the "big" one.
    let max_image_bytes = good.len() as u64 * 2;
    let mut big = b"\x89PNG\r\n\x1a\n".to_vec();
    big.resize(max_image_bytes as usize + 1000, 0);

    let (input, forbidden) = (world.input.clone(), world.forbidden.clone());
    for (key, body) in [
        ("ok.png", good.clone()),
        ("empty.png", Vec::new()),
        (
            "anim.gif",
            b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff;".to_vec(),
        ),
        ("notes.png", b"these are my notes, not an image\n".to_vec()),
        (
            "page.png",
            b"<html><body>503 Service Unavailable</body></html>".to_vec(),
        ),
        ("truncated.png", good[..good.len() / 2].to_vec()),
        ("truncated.jpg", jpeg[..jpeg.len() / 2].to_vec()),
        ("header-only.jpg", jpeg[..120.min(jpeg.len())].to_vec()),
        ("bomb.png", png_bomb()),
        ("bomb.jpg", jpeg_bomb()),
        ("big.png", big),
    ] {
        world.put(&input, key, body).await;
    }
    world.put(&forbidden, "x.png", good.clone()).await;

    let img = |key: &str| format!("s3://{input}/{key}");
    let ok = img("ok.png");
    let job = |image: &str| json!({"image": image, "prompt": "a cat"});
    let mut oversize_message = job(&ok);
    oversize_message["padding"] = json!("x".repeat(70_000));

    let corpus: Vec<Case> = vec![
        // The message itself.
        case(
            "invalid-json",
            format!("{{\"job_id\": \"{}\", \"image\": ", unique("trunc")).into_bytes(),
            "invalid_message",
            "not valid JSON",
        ),
        case(
            "json-array",
            json!([{"job_id": unique("arr"), "image": ok, "prompt": "p"}])
                .to_string()
                .into_bytes(),
            "invalid_message",
            "must be a JSON object",
        ),
        case(
            "json-string",
            json!(unique("just a string")).to_string().into_bytes(),
            "invalid_message",
            "must be a JSON object",
        ),
        no_id(
            "id-number",
            json!({"job_id": 12345, "image": ok, "prompt": "p"}),
            "invalid_message",
            "'job_id' must be a string, got a number",
        ),
        with_id(
            "image-number",
            json!({"image": 7, "prompt": "p"}),
            "invalid_message",
            "'image' must be a string",
        ),
        with_id(
            "prompt-array",
            json!({"image": ok, "prompt": ["a", "cat"]}),
            "invalid_message",
            "'prompt' must be a string, got an array",
        ),
        with_id(
            "output-bool",
            json!({"image": ok, "prompt": "p", "output": true}),
            "invalid_message",
            "'output' must be a string",
        ),
        with_id(
            "options-string",
            json!({"image": ok, "prompt": "p", "options": "fast"}),
            "invalid_message",
            "'options' must be a JSON object",
        ),
        no_id(
            "no-id",
            json!({"image": ok, "prompt": "p"}),
            "invalid_message",
            "'job_id' is missing",
        ),
        with_id(
            "no-image",
            json!({"prompt": "p"}),
            "invalid_message",
            "'image' is missing",
        ),
        with_id(
            "no-prompt",
            json!({"image": ok}),
            "invalid_message",
            "'prompt' is missing",
        ),
        no_id(
            "empty-id",
            json!({"job_id": "", "image": ok, "prompt": "p"}),
            "invalid_message",
            "1 to 128 characters, got 0",
        ),
        no_id(
            "id-slash",
            json!({"job_id": "tenant/../../etc", "image": ok, "prompt": "p"}),
            "invalid_message",
            "may only contain",
        ),
        no_id(
            "id-dotdot",
            json!({"job_id": "..", "image": ok, "prompt": "p"}),
            "invalid_message",
            "must not be '.' or '..'",
        ),
        no_id(
            "id-129",
            json!({"job_id": "a".repeat(129), "image": ok, "prompt": "p"}),
            "invalid_message",
            "1 to 128 characters, got 129",
        ),
        with_id(
            "long-prompt",
            json!({"image": ok, "prompt": "x".repeat(5000)}),
            "invalid_message",
            "'prompt' is 5000 bytes, over the limit of 4096",
        ),
        with_id(
            "big-metadata",
            json!({"image": ok, "prompt": "p", "metadata": {"blob": "x".repeat(20_000)}}),
            "invalid_message",
            "'metadata' is",
        ),
        with_id(
            "metadata-list",
            json!({"image": ok, "prompt": "p", "metadata": ["tenant", "acme"]}),
            "invalid_message",
            "'metadata' must be a JSON object",
        ),
        with_id(
            "iterations-9",
            json!({"image": ok, "prompt": "p", "options": {"max_iterations": 9}}),
            "invalid_message",
            "max_iterations must be an integer from 0 to 8, got 9",
        ),
        with_id(
            "iterations-negative",
            json!({"image": ok, "prompt": "p", "options": {"max_iterations": -1}}),
            "invalid_message",
            "max_iterations must be an integer from 0 to 8, got -1",
        ),
        with_id(
            "threshold-1.5",
            json!({"image": ok, "prompt": "p", "options": {"saliency_threshold": 1.5}}),
            "invalid_message",
            "saliency_threshold must be a number from 0 to 1, got 1.5",
        ),
        with_id(
            "threshold-negative",
            json!({"image": ok, "prompt": "p", "options": {"saliency_threshold": -0.2}}),
            "invalid_message",
            "saliency_threshold must be a number from 0 to 1, got -0.2",
        ),
        with_id(
            "huge-message",
            oversize_message,
            "invalid_message",
            "over the limit of 65536",
        ),
        // Locations.
        with_id(
            "image-http",
            job("https://example.com/cat.png"),
            "invalid_message",
            "does not start with s3://",
        ),
        with_id(
            "image-local-path",
            job("/etc/passwd"),
            "invalid_message",
            "does not start with s3://",
        ),
        with_id(
            "image-dotdot",
            job(&format!("s3://{input}/../{forbidden}/x.png")),
            "invalid_message",
            "'..' path segment",
        ),
        with_id(
            "image-double-slash",
            job(&format!("s3://{input}//ok.png")),
            "invalid_message",
            "the key starts with '/'",
        ),
        with_id(
            "image-empty-segment",
            job(&format!("s3://{input}/gen//ok.png")),
            "invalid_message",
            "empty path segment",
        ),
        with_id(
            "image-no-key",
            job(&format!("s3://{input}/")),
            "invalid_message",
            "the object key is empty",
        ),
        with_id(
            "image-forbidden-bucket",
            job(&format!("s3://{forbidden}/x.png")),
            "bucket_not_allowed",
            &forbidden,
        ),
        with_id(
            "output-forbidden-bucket",
            json!({"image": ok, "prompt": "p", "output": format!("s3://{forbidden}/out/")}),
            "bucket_not_allowed",
            &forbidden,
        ),
        with_id(
            "output-dotdot",
            json!({"image": ok, "prompt": "p", "output": format!("s3://{}/a/../b/", world.output)}),
            "invalid_message",
            "'..' path segment",
        ),
        // Objects.
        with_id(
            "missing-object",
            job(&img("does/not/exist.png")),
            "image_not_found",
            "does/not/exist.png",
        ),
        with_id(
            "zero-bytes",
            job(&img("empty.png")),
            "undecodable_image",
            "an empty file",
        ),
        with_id("gif", job(&img("anim.gif")), "undecodable_image", "GIF"),
        with_id(
            "text",
            job(&img("notes.png")),
            "undecodable_image",
            "not a PNG or JPEG",
        ),
        with_id(
            "html",
            job(&img("page.png")),
            "undecodable_image",
            "text/HTML/XML",
        ),
        with_id(
            "truncated-png",
            job(&img("truncated.png")),
            "undecodable_image",
            "truncated png",
        ),
        with_id(
            "truncated-jpeg",
            job(&img("truncated.jpg")),
            "undecodable_image",
            "jpeg",
        ),
        with_id(
            "header-only-jpeg",
            job(&img("header-only.jpg")),
            "undecodable_image",
            "jpeg",
        ),
        with_id(
            "png-bomb",
            job(&img("bomb.png")),
            "image_too_large",
            "60000x60000",
        ),
        with_id(
            "jpeg-bomb",
            job(&img("bomb.jpg")),
            "image_too_large",
            "65000x65000",
        ),
        with_id(
            "too-many-bytes",
            job(&img("big.png")),
            "image_too_large",
            &format!("over the limit of {max_image_bytes} bytes"),
        ),
    ];
    assert!(corpus.len() >= 25);

    let mut events = world.events().await;
    let limit = max_image_bytes.to_string();
    let mut worker = world.start_worker(&[("RETOUCHER__LIMITS__MAX_IMAGE_BYTES", &limit)]);

    // A few bad jobs, then a good one, and so on: the good ones must keep completing.
    let mut goods = Vec::new();
    for (round, batch) in corpus.chunks(5).enumerate() {
        for bad in batch {
            world.publish(&bad.body).await;
        }
        let good_id = unique(&format!("good-{round}"));
        world
            .publish(
                json!({"job_id": good_id, "image": ok, "prompt": "close up photo of a tabby cat"})
                    .to_string()
                    .as_bytes(),
            )
            .await;
        goods.push(good_id.clone());

        // Events: the good job succeeded, each bad job with a valid id failed with its class.
        let mut ids = vec![good_id.clone()];
        ids.extend(batch.iter().filter_map(|c| c.id.clone()));
        let got = events.wait_for(&ids, WAIT).await;
        assert_eq!(got[0].0, "job.succeeded", "{good_id}: {}", got[0].1);
        for ((key, event), bad) in got[1..].iter().zip(batch.iter().filter(|c| c.id.is_some())) {
            assert_eq!(key, "job.failed", "{}: {event}", bad.name);
            assert_eq!(event["error"]["class"], bad.class, "{}: {event}", bad.name);
        }

        // Dead letters: every bad job of the round, body untouched, with its class and reason.
        let dead = world.wait_dead_letters(batch.len(), WAIT).await;
        assert_eq!(dead.len(), batch.len(), "round {round}: {dead:?}");
        for bad in batch {
            let letter = dead
                .iter()
                .find(|d| d.body == bad.body)
                .unwrap_or_else(|| panic!("{} was not dead-lettered: {dead:?}", bad.name));
            assert_eq!(
                letter.class, bad.class,
                "{}: reason {:?}",
                bad.name, letter.reason
            );
            assert!(
                letter.reason.contains(&bad.reason),
                "{}: reason {:?} should mention {:?}",
                bad.name,
                letter.reason,
                bad.reason
            );
            assert!(
                !letter.reason.contains('\n') && letter.reason.len() < 2048,
                "{}: one bounded line",
                bad.name
            );
        }

        assert!(
            worker.is_running(),
            "the worker died in round {round}:\n{}",
            worker.log_text()
        );
        assert_eq!(
            http_get(worker.port, "/healthz").map(|(code, _)| code),
            Some(200),
            "healthz after round {round}"
        );
    }

    // The good jobs' result sets are complete; the metrics reconcile with what was sent.
    for id in &goods {
        let marker = world
            .get(&world.output, &format!("results/{id}/diagnostics.json"))
            .await;
        assert!(marker.is_some(), "{id}: diagnostics.json missing");
    }
    let metrics = worker.metrics();
    let outcome = |o: &str| {
        metric_sum(
            &metrics,
            "retoucher_jobs_total",
            &format!("outcome=\"{o}\""),
        )
    };
    assert_eq!(outcome("dead"), corpus.len() as f64, "dead-lettered jobs");
    assert_eq!(
        outcome("retouched") + outcome("clean"),
        goods.len() as f64,
        "completed jobs"
    );
    assert!(worker.terminate(), "clean exit:\n{}", worker.log_text());
    assert_eq!(world.ready(&world.queue).await, 0, "queue is empty");
    assert_eq!(
        world.ready(&world.dead_queue()).await,
        0,
        "all dead letters taken"
    );
    world.cleanup().await;
}
