//! The worker end to end against the real RabbitMQ, the real S3 server and real ONNX Runtime
//! sessions on the reference bundle and the trained `blemish` bundle: a published job comes back
//! as a complete result set, an event, and an acknowledged message; bad jobs land in the
//! dead-letter queue with a reason.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

/// Union of the masks of a result set (pixels any edit was allowed to touch).
async fn edited_area(world: &World, prefix: &str, width: u32, height: u32) -> Vec<bool> {
    let mut area = vec![false; (width * height) as usize];
    for key in world.keys(&world.output, prefix).await {
        if key
            .rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with("mask-"))
        {
            let mask = image::load_from_memory(&world.get(&world.output, &key).await.unwrap())
                .unwrap()
                .to_luma8();
            assert_eq!(
                mask.dimensions(),
                (width, height),
                "{key} has the image's size"
            );
            for (i, p) in mask.pixels().enumerate() {
                area[i] |= p[0] > 0;
            }
        }
    }
    area
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blemished_image_is_retouched_and_a_magenta_prompt_leaves_it_clean() {
    let world = World::new().await;
    let input = example("chelsea-blemished.png");
    let original = decode(&input);
    let before = near_magenta(&original);
    assert!(
        before > 500,
        "the example has magenta blemishes ({before} px)"
    );
    world
        .put(&world.input, "gen/chelsea.png", input.clone())
        .await;
    let mut events = world.events().await;
    let mut worker = world.start_worker(&[]);

    let retouch_id = unique("cat");
    let clean_id = unique("cat-magenta");
    world
        .publish(
            json!({
                "job_id": retouch_id,
                "image": format!("s3://{}/gen/chelsea.png", world.input),
                "prompt": "close up photo of a tabby cat",
                "options": {"max_iterations": 3, "saliency_threshold": 0.5},
                "metadata": {"tenant": "acme", "model": "sdxl"}
            })
            .to_string()
            .as_bytes(),
        )
        .await;
    world
        .publish(
            json!({
                "job_id": clean_id,
                "image": format!("s3://{}/gen/chelsea.png", world.input),
                "prompt": "a tabby cat with magenta paint spots",
                "output": format!("s3://{}/custom/", world.output),
            })
            .to_string()
            .as_bytes(),
        )
        .await;
    let got = events
        .wait_for(&[retouch_id.clone(), clean_id.clone()], WAIT)
        .await;

    // The retouched job.
    let (key, event) = &got[0];
    assert_eq!(key, "job.succeeded", "{event}");
    assert_eq!(event["status"], "retouched");
    assert_eq!(event["metadata"]["tenant"], "acme");
    assert!(event["regions"].as_u64().unwrap() >= 3, "{event}");
    let prefix = format!("results/{retouch_id}/");
    let keys = world.keys(&world.output, &prefix).await;
    for name in [
        "retouched.png",
        "diagnostics.json",
        "saliency-0.png",
        "mask-0-0.png",
    ] {
        assert!(
            keys.contains(&format!("{prefix}{name}")),
            "{name} missing: {keys:?}"
        );
    }
    let diagnostics: serde_json::Value = serde_json::from_slice(
        &world
            .get(&world.output, &format!("{prefix}diagnostics.json"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(diagnostics["job_id"], retouch_id.as_str());
    assert_eq!(diagnostics["status"], "retouched");
    assert_eq!(diagnostics["attempt"], 1);
    assert_eq!(diagnostics["input"]["width"], original.width());
    assert_eq!(diagnostics["input"]["format"], "png");
    assert_eq!(diagnostics["input"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        diagnostics["output"]["uri"],
        format!("s3://{}/{prefix}retouched.png", world.output)
    );
    let iterations = diagnostics["iterations"].as_array().unwrap();
    assert!(
        iterations.len() >= 2 && iterations.len() <= 4,
        "{iterations:?}"
    );
    assert!(iterations[0]["saliency"]["max"].as_f64().unwrap() > 0.5);
    assert!(
        iterations.last().unwrap()["saliency"]["max"]
            .as_f64()
            .unwrap()
            < 0.5
    );
    for region in iterations[0]["regions"].as_array().unwrap() {
        for field in [
            "id",
            "category",
            "bbox",
            "score",
            "description",
            "tool",
            "mask",
        ] {
            assert!(!region[field].is_null(), "region lacks {field}: {region}");
        }
        let key = format!("{prefix}{}", region["mask"].as_str().unwrap());
        assert!(keys.contains(&key), "{key} is listed but not stored");
    }
    for agent in ["perception", "reasoning", "action"] {
        assert_eq!(
            diagnostics["models"][agent]["sha256"]
                .as_str()
                .unwrap()
                .len(),
            64
        );
    }
    for stage in [
        "queue",
        "fetch",
        "decode",
        "perception",
        "reasoning",
        "action",
        "encode",
        "store",
        "total",
    ] {
        assert!(
            diagnostics["timings_ms"][stage].is_number(),
            "timings lack {stage}"
        );
    }
    assert_eq!(diagnostics["metadata"]["model"], "sdxl");
    assert!(diagnostics["worker"]["version"].is_string());

    let retouched = decode(
        &world
            .get(&world.output, &format!("{prefix}retouched.png"))
            .await
            .unwrap(),
    );
    assert_eq!(retouched.dimensions(), original.dimensions());
    let after = near_magenta(&retouched);
    assert!(
        after <= 5,
        "near-magenta pixels: {before} before, {after} after"
    );
    let edited = edited_area(&world, &prefix, original.width(), original.height()).await;
    let changed_outside = original
        .pixels()
        .zip(retouched.pixels())
        .zip(&edited)
        .filter(|((a, b), inside)| !**inside && a != b)
        .count();
    assert_eq!(
        changed_outside, 0,
        "pixels outside every mask must be untouched"
    );
    assert!(
        edited.iter().filter(|e| **e).count() >= before,
        "masks cover the blemishes"
    );

    // The job whose prompt asks for magenta: clean, untouched, at its own output prefix.
    let (key, event) = &got[1];
    assert_eq!(key, "job.succeeded", "{event}");
    assert_eq!(event["status"], "clean");
    assert_eq!(event["regions"], 0);
    let clean_prefix = format!("custom/{clean_id}/");
    let clean = decode(
        &world
            .get(&world.output, &format!("{clean_prefix}retouched.png"))
            .await
            .expect("a clean job gets retouched.png too"),
    );
    assert!(
        clean == original,
        "a clean job's image is the input, unchanged"
    );
    let keys = world.keys(&world.output, &clean_prefix).await;
    assert!(!keys.iter().any(|k| k.contains("mask-")), "{keys:?}");

    // Both acknowledged: after the worker stops, nothing comes back to the queue.
    assert!(
        worker.terminate(),
        "worker exits 0 on SIGTERM:\n{}",
        worker.log_text()
    );
    assert_eq!(world.ready(&world.queue).await, 0, "queue is empty");
    assert_eq!(
        world.ready(&world.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
    let log = worker.log_text();
    assert!(log.contains(&retouch_id), "logs carry the job id");
    world.cleanup().await;
}

/// A CI-slice file of the blemish benchmark.
fn benchmark_file(name: &str) -> Vec<u8> {
    let path = repo().join("models/quality/ci-slice").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Mean squared error against `clean` over the pixels of `mask` (> 127).
fn mse_in(img: &image::RgbImage, clean: &image::RgbImage, mask: &image::GrayImage) -> f64 {
    let (mut sum, mut n) = (0.0f64, 0.0f64);
    for ((a, b), m) in img.pixels().zip(clean.pixels()).zip(mask.pixels()) {
        if m[0] > 127 {
            for c in 0..3 {
                sum += (f64::from(a[c]) - f64::from(b[c])).powi(2);
                n += 1.0;
            }
        }
    }
    sum / n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trained_blemish_bundle_retouches_benchmark_images_through_the_worker() {
    let world = World::new().await;
    let bundle = repo().join("models/blemish");
    let blotch = "test-00012-china";
    let coffee = "test-00002-coffee";
    world
        .put(
            &world.input,
            "bench/china.png",
            benchmark_file(&format!("{blotch}.png")),
        )
        .await;
    world
        .put(
            &world.input,
            "bench/coffee.png",
            benchmark_file(&format!("{coffee}.png")),
        )
        .await;
    let mut events = world.events().await;
    let mut worker = world.start_worker(&[("RETOUCHER__MODELS__BUNDLE", bundle.to_str().unwrap())]);

    // The blotch image with its benchmark prompt; the coffee image, whose painted grain its
    // benchmark prompt asks for ("a grainy high ISO look"), with that prompt and without it.
    let blotch_id = unique("blemish-blotch");
    let grain_id = unique("blemish-grain-asked");
    let plain_id = unique("blemish-grain-not-asked");
    let cup = "a red coffee cup and saucer with a spoon";
    for (id, key, prompt) in [
        (
            &blotch_id,
            "bench/china.png",
            "a chinese pagoda on a hill above a lake",
        ),
        (
            &grain_id,
            "bench/coffee.png",
            &format!("{cup}, a grainy high ISO look"),
        ),
        (&plain_id, "bench/coffee.png", cup),
    ] {
        world
            .publish(
                json!({"job_id": id, "image": format!("s3://{}/{key}", world.input), "prompt": prompt})
                    .to_string()
                    .as_bytes(),
            )
            .await;
    }
    let got = events
        .wait_for(
            &[blotch_id.clone(), grain_id.clone(), plain_id.clone()],
            WAIT,
        )
        .await;
    for (key, event) in &got {
        assert_eq!(key, "job.succeeded", "{event}");
    }
    assert_eq!(got[0].1["status"], "retouched", "{}", got[0].1);
    assert_eq!(
        got[1].1["status"], "clean",
        "the asked-for grain is left: {}",
        got[1].1
    );
    assert_eq!(
        got[2].1["status"], "retouched",
        "unasked grain is a defect: {}",
        got[2].1
    );

    // The blotch job: the trained bundle's models, settings and categories, a repair confined
    // to its masks that covers the defect and brings it close to the clean image.
    let prefix = format!("results/{blotch_id}/");
    let diagnostics: serde_json::Value = serde_json::from_slice(
        &world
            .get(&world.output, &format!("{prefix}diagnostics.json"))
            .await
            .expect("diagnostics.json"),
    )
    .unwrap();
    let manifest = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    let perception_sha = diagnostics["models"]["perception"]["sha256"]
        .as_str()
        .unwrap();
    assert!(
        manifest.contains(&format!("\"perception.onnx\" = \"{perception_sha}\"")),
        "the worker ran the blemish perception model ({perception_sha})"
    );
    assert_eq!(diagnostics["settings"]["saliency_threshold"], 0.8);
    let categories = [
        "warp", "patch", "melt", "blotch", "blur", "noise", "stretch", "text",
    ];
    let regions = diagnostics["iterations"][0]["regions"].as_array().unwrap();
    assert!(!regions.is_empty());
    for region in regions {
        let category = region["category"].as_str().unwrap();
        assert!(categories.contains(&category), "{region}");
    }
    let input = decode(&benchmark_file(&format!("{blotch}.png")));
    let clean = decode(&benchmark_file(&format!("{blotch}-clean.png")));
    let truth = image::load_from_memory(&benchmark_file(&format!("{blotch}-mask.png")))
        .unwrap()
        .to_luma8();
    let retouched = decode(
        &world
            .get(&world.output, &format!("{prefix}retouched.png"))
            .await
            .unwrap(),
    );
    let edited = edited_area(&world, &prefix, input.width(), input.height()).await;
    let changed_outside = input
        .pixels()
        .zip(retouched.pixels())
        .zip(&edited)
        .filter(|((a, b), inside)| !**inside && a != b)
        .count();
    assert_eq!(
        changed_outside, 0,
        "pixels outside every mask are untouched"
    );
    let defect = truth.pixels().filter(|p| p[0] > 127).count();
    let covered = truth
        .pixels()
        .zip(&edited)
        .filter(|(p, e)| p[0] > 127 && **e)
        .count();
    assert!(
        covered * 10 >= defect * 8,
        "the masks cover {covered} of the {defect} defect pixels"
    );
    let (before, after) = (
        mse_in(&input, &clean, &truth),
        mse_in(&retouched, &clean, &truth),
    );
    assert!(
        after * 10.0 < before,
        "the blotch is repaired: MSE in the defect {before:.1} before, {after:.1} after"
    );

    // The asked-for grain: untouched.
    let grain = decode(
        &world
            .get(&world.output, &format!("results/{grain_id}/retouched.png"))
            .await
            .unwrap(),
    );
    assert!(grain == decode(&benchmark_file(&format!("{coffee}.png"))));

    assert!(worker.terminate(), "worker exits 0:\n{}", worker.log_text());
    assert_eq!(world.ready(&world.queue).await, 0, "queue is empty");
    assert_eq!(
        world.ready(&world.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jobs_are_dead_lettered_with_a_reason_and_the_worker_goes_on() {
    let world = World::new().await;
    world
        .put(&world.input, "ok.png", example("coffee-blemished.png"))
        .await;
    world
        .put(&world.forbidden, "x.png", example("coffee-blemished.png"))
        .await;
    let mut events = world.events().await;
    let _worker = world.start_worker(&[]);

    let bad: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"{this is not json".to_vec(), "invalid_message", "not valid JSON"),
        (
            json!({"job_id": unique("nofield"), "image": format!("s3://{}/ok.png", world.input)})
                .to_string()
                .into_bytes(),
            "invalid_message",
            "'prompt' is missing",
        ),
        (
            json!({"job_id": unique("missing"), "image": format!("s3://{}/nope.png", world.input), "prompt": "p"})
                .to_string()
                .into_bytes(),
            "image_not_found",
            "nope.png",
        ),
        (
            json!({"job_id": unique("forbidden"), "image": format!("s3://{}/x.png", world.forbidden), "prompt": "p"})
                .to_string()
                .into_bytes(),
            "bucket_not_allowed",
            &world.forbidden,
        ),
    ];
    for (body, _, _) in &bad {
        world.publish(body).await;
    }
    let good = unique("good");
    world
        .publish(
            json!({"job_id": good, "image": format!("s3://{}/ok.png", world.input), "prompt": "coffee"})
                .to_string()
                .as_bytes(),
        )
        .await;
    let got = events.wait_for(std::slice::from_ref(&good), WAIT).await;
    assert_eq!(
        got[0].1["status"], "retouched",
        "the good job after the bad ones"
    );

    // The four bad ones are in the dead queue (they were published first, and the dead
    // letter is written before the ack).
    let mut dead = Vec::new();
    for _ in 0..100 {
        dead.extend(world.drain_dead().await);
        if dead.len() >= bad.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), bad.len(), "{dead:?}");
    for (body, class, reason) in &bad {
        let (_, got_class, got_reason) = dead
            .iter()
            .find(|(b, _, _)| b == body)
            .unwrap_or_else(|| panic!("{} not dead-lettered", String::from_utf8_lossy(body)));
        assert_eq!(
            got_class,
            class,
            "class of {}",
            String::from_utf8_lossy(body)
        );
        assert!(
            got_reason.contains(reason),
            "reason {got_reason:?} should mention {reason:?}"
        );
        assert!(!got_reason.contains('\n'));
    }
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_one_queue_without_doing_a_job_twice() {
    let world = World::new().await;
    world
        .put(&world.input, "cat.png", example("chelsea-blemished.png"))
        .await;
    let mut events = world.events().await;
    // One job at a time each, so neither can take everything.
    let one = [
        ("RETOUCHER__BROKER__PREFETCH", "1"),
        ("RETOUCHER__WORKER__MAX_INFLIGHT", "1"),
    ];
    let mut a = world.start_worker(&one);
    let mut b = world.start_worker(&one);
    let ids: Vec<String> = (0..12).map(|i| unique(&format!("shared-{i}"))).collect();
    // Published with `retoucher enqueue` from a JSONL file holding one invalid line: the valid
    // jobs are published (with confirms), the invalid one is reported and not published.
    let mut lines: Vec<String> = ids
        .iter()
        .map(|id| {
            json!({"job_id": id, "image": format!("s3://{}/cat.png", world.input), "prompt": "a cat"})
                .to_string()
        })
        .collect();
    lines.insert(
        5,
        r#"{"job_id": "no-prompt", "image": "s3://x/y.png"}"#.to_string(),
    );
    let file = std::env::temp_dir().join(format!("{}.jsonl", world.queue));
    std::fs::write(&file, lines.join("\n")).unwrap();
    let enqueue = output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_retoucher"))
            .args([
                "enqueue",
                &format!("@{}", file.display()),
                "--queue",
                &world.queue,
            ])
            .env("RETOUCHER__BROKER__URL", amqp_url()),
        CLI_LIMIT,
    );
    let stderr = String::from_utf8_lossy(&enqueue.stderr);
    assert_eq!(
        enqueue.status.code(),
        Some(1),
        "one line was invalid:\n{stderr}"
    );
    assert!(
        stderr.contains(":6: invalid_message: required field 'prompt' is missing"),
        "{stderr}"
    );
    assert!(stderr.contains("published 12 jobs"), "{stderr}");
    let got = events.wait_for(&ids, WAIT).await;
    assert!(got
        .iter()
        .all(|(k, e)| k == "job.succeeded" && e["attempt"] == 1));
    // No second completion of any job shows up later.
    let late = events.collect_for(Duration::from_secs(2)).await;
    assert!(
        !late
            .iter()
            .any(|e| ids.iter().any(|id| e["job_id"] == id.as_str())),
        "a job completed twice: {late:?}"
    );
    let done = |w: &Worker| {
        metric_sum(
            &w.metrics(),
            "retoucher_jobs_total",
            "outcome=\"retouched\"",
        )
    };
    // Both workers are ready, and say so in /metrics as on /readyz.
    for w in [&a, &b] {
        assert_eq!(metric_sum(&w.metrics(), "retoucher_ready", ""), 1.0);
    }
    let (da, db) = (done(&a), done(&b));
    assert_eq!(
        da + db,
        ids.len() as f64,
        "every job done exactly once ({da} + {db})"
    );
    assert!(
        da >= 1.0 && db >= 1.0,
        "both workers took jobs ({da}, {db})"
    );
    assert!(a.terminate() && b.terminate());
    assert_eq!(world.ready(&world.queue).await, 0);
    world.cleanup().await;
}
