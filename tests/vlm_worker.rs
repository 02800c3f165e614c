//! A worker with the VLM bundle (`models/vlm-reference`, reasoning mode `vlm`) end to end
//! against the real RabbitMQ, the real S3 server and real ONNX Runtime sessions: the regions
//! carry the model's categories and instructions, `diagnostics.json` the generated text, token
//! counts and decode timings, a malformed answer falls back without failing the job, and the
//! decoder's metrics are exported.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(180);

fn test_image(name: &str) -> Vec<u8> {
    std::fs::read(repo().join("models/vlm-reference/images").join(name)).expect("test image")
}

async fn diagnostics(world: &World, job_id: &str) -> Value {
    let bytes = world
        .get(&world.output, &format!("results/{job_id}/diagnostics.json"))
        .await
        .expect("diagnostics.json");
    serde_json::from_slice(&bytes).expect("diagnostics is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vlm_explains_regions_through_broker_and_s3() {
    let world = World::new().await;
    world
        .put(&world.input, "vlm/hand.png", test_image("magenta-224.png"))
        .await;
    world
        .put(
            &world.input,
            "vlm/car.png",
            test_image("magenta-640x480.png"),
        )
        .await;
    let mut events = world.events().await;
    let bundle = repo().join("models/vlm-reference").display().to_string();
    let mut worker = world.start_worker(&[("RETOUCHER__MODELS__BUNDLE", &bundle)]);

    let jobs = [
        (
            unique("vlm-hand"),
            "hand.png",
            "a violinist with six fingers on his hand, cinematic light",
        ),
        (
            unique("vlm-car"),
            "car.png",
            "a red car parked by a fenced garden",
        ),
        (unique("vlm-broken"), "hand.png", "a broken vase"),
    ];
    for (job_id, image, prompt) in &jobs {
        world
            .publish(
                json!({
                    "job_id": job_id,
                    "image": format!("s3://{}/vlm/{image}", world.input),
                    "prompt": prompt,
                    "options": {"max_iterations": 2},
                })
                .to_string()
                .as_bytes(),
            )
            .await;
    }
    let ids: Vec<String> = jobs.iter().map(|j| j.0.clone()).collect();
    let got = events.wait_for(&ids, WAIT).await;
    for (key, event) in &got {
        assert_eq!(key, "job.succeeded", "{event}");
        assert_eq!(event["status"], "retouched", "{event}");
    }

    // The model's category, instruction and box; its route (hand -> onnx-inpaint).
    let hand = diagnostics(&world, &jobs[0].0).await;
    let first = &hand["iterations"][0];
    let region = &first["regions"][0];
    assert_eq!(region["category"], "hand", "{first}");
    assert_eq!(
        region["description"],
        "Redraw it with five distinct fingers and natural joints."
    );
    assert_eq!(region["bbox"], json!([112, 56, 84, 56]));
    assert_eq!(region["tool"], "onnx-inpaint");
    let vlm = &first["vlm"];
    assert_eq!(
        vlm["text"],
        "[{\"bbox_2d\":[112,56,196,112],\"category\":\"hand\",\"instruction\":\"Redraw it with five distinct fingers and natural joints.\"}]"
    );
    assert_eq!(vlm["generated_tokens"], 41);
    assert_eq!(vlm["prompt_tokens"], 228);
    assert_eq!(vlm["image_tokens"], 64);
    assert_eq!(vlm["stop_reason"], "stop_token");
    assert_eq!(vlm["proposals"], json!([[112, 56, 196, 112]]));
    assert!(vlm["fallback"].is_null());
    assert!(vlm["decode_steps"].as_u64().unwrap() == 40);
    for key in ["time_to_first_token", "prefill", "decode", "total"] {
        assert!(
            vlm["timings_ms"][key].as_f64().unwrap() > 0.0,
            "{key}: {vlm}"
        );
    }
    // The repair removed the magenta: the next pass finds nothing and asks no model.
    let last = hand["iterations"].as_array().unwrap().last().unwrap();
    assert!(last["vlm"].is_null() && last["regions"].as_array().unwrap().is_empty());

    // Boxes in resized-image pixels come back in input pixels; the fenced answer is read.
    let car = diagnostics(&world, &jobs[1].0).await;
    let first = &car["iterations"][0];
    assert_eq!(first["regions"][0]["category"], "object");
    assert_eq!(first["regions"][0]["bbox"], json!([71, 295, 143, 112]));
    assert!(first["vlm"]["text"]
        .as_str()
        .unwrap()
        .starts_with("```json\n"));
    assert_eq!(first["vlm"]["image_tokens"], 234);

    // A malformed answer: recorded, and the classifier's regions repaired instead.
    let broken = diagnostics(&world, &jobs[2].0).await;
    let first = &broken["iterations"][0];
    assert_eq!(first["vlm"]["answer"]["error"], "invalid_json");
    assert_eq!(first["vlm"]["fallback"], "regions");
    assert!(!first["regions"].as_array().unwrap().is_empty());
    assert_eq!(
        broken["models"]["reasoning"]["name"],
        "vlm-reference/decoder_model_merged.onnx"
    );

    let metrics = worker.metrics();
    assert!(metric_sum(&metrics, "retoucher_generated_tokens_total", "") >= 41.0 + 45.0);
    assert!(metric_sum(&metrics, "retoucher_time_to_first_token_seconds_count", "") >= 3.0);
    assert!(metric_sum(&metrics, "retoucher_decode_batch_size_count", "") >= 40.0);
    assert_eq!(metric_sum(&metrics, "retoucher_active_sequences", ""), 0.0);
    assert!(
        metric_sum(
            &metrics,
            "retoucher_vlm_answers_total",
            "outcome=\"invalid_json\""
        ) >= 1.0
    );
    assert!(worker.terminate(), "the worker drains and exits cleanly");
    world.cleanup().await;
}
