//! Reasoning's `vlm` mode against the independent Python reference
//! (`models/vlm-reference/reference.py`: onnxruntime + numpy + tokenizers + pillow, run live with
//! `$RETOUCHER_TEST_PYTHON`) on the same graphs, with real ONNX Runtime sessions:
//!
//! - token for token on every request of `requests.json` and the hostile prompts, for the fp32,
//!   fp16 and Qwen2-VL bundles: rendered prompt, prompt ids, pixel values (sha256), rope delta,
//!   generated ids, text, stop reason and the validated answer;
//! - continuous batching (sequences of different lengths joining at different steps) gives the
//!   same tokens as one at a time, and the same decode batches as the reference's scheduler;
//! - the PIL bicubic port gives PIL's pixels;
//! - hostile model output (invalid JSON, unknown category, boxes outside the image, an empty
//!   list, generation that never stops, an image the model cannot see) never fails a job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use image::{Rgb, RgbImage};
use retoucher::agents::reasoning::vlm::decoder::DecoderModel;
use retoucher::agents::reasoning::vlm::preprocess::resize_bicubic;
use retoucher::agents::reasoning::vlm::scheduler::{Scheduler, SchedulerSettings, SequenceRequest};
use retoucher::agents::reasoning::vlm::Vlm;
use retoucher::agents::Agents;
use retoucher::bundle::Bundle;
use retoucher::engine::batcher::NoObserver;
use retoucher::engine::tensor::Graph;
use retoucher::engine::{load_session, Device, EngineOptions};
use retoucher::pipeline::{retouch, LoopSettings};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bundle_dir(variant: &str) -> PathBuf {
    repo().join("models/vlm-reference").join(variant)
}

fn images() -> PathBuf {
    repo().join("models/vlm-reference/images")
}

fn engine() -> EngineOptions {
    EngineOptions {
        device: Device::Cpu,
        fallback_to_cpu: false,
        intra_threads: 1,
        ort_library: String::new(),
        ..Default::default()
    }
}

fn python() -> String {
    match std::env::var("RETOUCHER_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => p,
        _ => panic!(
            "RETOUCHER_TEST_PYTHON is not set: run scripts/test.sh (it creates .tools/py and \
             runs models/vlm-reference/generate.py, which fetches the Qwen tokenizer)"
        ),
    }
}

fn agents(variant: &str) -> Agents {
    let dir = bundle_dir(variant);
    let bundle = Bundle::load(&dir).unwrap_or_else(|e| {
        panic!(
            "{e:#} (is tokenizer.json there? run models/vlm-reference/generate.py, as \
             scripts/test.sh does)"
        )
    });
    Agents::load(bundle, &engine(), &BTreeMap::new(), Arc::new(NoObserver)).expect("agents")
}

fn load_rgb(path: &Path) -> RgbImage {
    image::open(path).expect("test image").to_rgb8()
}

/// The requests of `requests.json` plus prompts that steer the test model into every kind
/// of answer, with absolute image paths.
fn requests() -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join("models/vlm-reference/requests.json")).unwrap();
    let mut requests: Vec<Value> = serde_json::from_str(&text).unwrap();
    let hand_box = json!([[112, 56, 196, 112]]);
    for (id, prompt) in [
        ("object", "a cup of coffee on a table"),
        ("dragon", "a dragon over the city"),
        ("brush", "a face painted with a brush"),
        ("patch", "a hand with a patch of fur"),
        ("broken", "a broken vase"),
        ("forever", "a hand, forever young"),
        (
            "tricky",
            "<|im_end|> {{regions}} \"quoted\" \\ \u{e9}t\u{e9} \n tab\t",
        ),
    ] {
        requests.push(json!({
            "id": id, "image": "images/magenta-224.png", "prompt": prompt,
            "regions": hand_box, "arrival": 1,
        }));
    }
    for r in &mut requests {
        let image = r["image"].as_str().unwrap().to_string();
        r["image"] = json!(repo()
            .join("models/vlm-reference")
            .join(image)
            .display()
            .to_string());
    }
    requests
}

/// Runs the reference on `requests`; returns its output.
fn reference(variant: &str, requests: &[Value], extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("requests.json");
    std::fs::write(&file, serde_json::to_vec(requests).unwrap()).unwrap();
    let out = Command::new(python())
        .arg(repo().join("models/vlm-reference/reference.py"))
        .arg(&file)
        .arg("--bundle")
        .arg(bundle_dir(variant))
        .args(extra)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("running reference.py");
    assert!(
        out.status.success(),
        "reference.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference output is JSON")
}

fn regions_of(request: &Value) -> Vec<[u32; 4]> {
    request["regions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let v: Vec<u32> = b
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as u32)
                        .collect();
                    [v[0], v[1], v[2], v[3]]
                })
                .collect()
        })
        .unwrap_or_default()
}

fn sha256_f32(values: &[f32]) -> String {
    let mut h = Sha256::new();
    for v in values {
        h.update(v.to_le_bytes());
    }
    hex::encode(h.finalize())
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// Every request, all at once through the agent (so they also batch with each other), against
/// the reference's sequential run.
async fn check_parity(variant: &str) {
    let requests = requests();
    let expected = reference(variant, &requests, &[]);
    let agents = agents(variant);
    let vlm = agents.reasoning.vlm().expect("a vlm bundle");
    assert_eq!(
        vlm.layout.grid_input, expected["model"]["grid_input"],
        "{variant}"
    );
    assert_eq!(vlm.layout.kv.layers as u64, expected["model"]["layers"]);
    assert_eq!(vlm.layout.kv.kv_heads as u64, expected["model"]["kv_heads"]);
    assert_eq!(vlm.layout.kv.head_dim as u64, expected["model"]["head_dim"]);
    assert_eq!(vlm.layout.kv.ty.as_str(), expected["model"]["kv_dtype"]);
    let calls = requests.iter().map(|r| async move {
        let image = load_rgb(Path::new(r["image"].as_str().unwrap()));
        let prepared = vlm
            .prepare(&image, r["prompt"].as_str().unwrap(), &regions_of(r))
            .expect("prepare");
        let seen = (
            prepared.text.clone(),
            prepared.ids.clone(),
            sha256_f32(&prepared.vision.pixel_values),
            prepared.positions.rope_delta,
            prepared.vision.resized,
            prepared.vision.grid,
        );
        let reply = vlm
            .generate(
                prepared,
                image.dimensions(),
                r["id"].as_str().unwrap().into(),
                None,
            )
            .await
            .expect("generate");
        (seen, reply)
    });
    let replies = futures_util::future::join_all(calls).await;
    let results = expected["results"].as_array().unwrap();
    assert_eq!(results.len(), replies.len());
    for (want, ((text, prompt_ids, sha, delta, resized, grid), reply)) in
        results.iter().zip(replies)
    {
        let id = want["id"].as_str().unwrap();
        let at = format!("{variant}/{id}");
        assert_eq!(text, want["prompt_text"].as_str().unwrap(), "{at}: prompt");
        assert_eq!(prompt_ids, ids(&want["prompt_ids"]), "{at}: prompt ids");
        assert_eq!(
            sha,
            want["image"]["pixel_values_sha256"].as_str().unwrap(),
            "{at}: pixel values"
        );
        assert_eq!(delta, want["rope_delta"].as_i64().unwrap(), "{at}");
        assert_eq!(
            [resized.0, resized.1, grid[1] as u32, grid[2] as u32].map(u64::from),
            [
                want["image"]["resized_width"].as_u64().unwrap(),
                want["image"]["resized_height"].as_u64().unwrap(),
                want["image"]["grid_thw"][1].as_u64().unwrap(),
                want["image"]["grid_thw"][2].as_u64().unwrap(),
            ],
            "{at}"
        );
        let generated: Vec<i64> = reply.ids.iter().map(|&t| i64::from(t)).collect();
        assert_eq!(generated, ids(&want["generated_ids"]), "{at}: tokens");
        assert_eq!(reply.text, want["text"].as_str().unwrap(), "{at}: text");
        assert_eq!(
            json!(reply.trace.stop_reason),
            want["stop_reason"],
            "{at}: stop"
        );
        assert_eq!(
            serde_json::to_value(&reply.answer).unwrap(),
            want["answer"],
            "{at}: answer"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_match_the_reference_fp32() {
    check_parity("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_match_the_reference_fp16() {
    check_parity("fp16").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_match_the_reference_qwen2_vl() {
    check_parity("qwen2-vl").await;
}

/// Drives a standalone scheduler step by step as the reference's batched mode does: before
/// each step the requests that have arrived are queued and admitted (up to `max_active`),
/// then one step runs every active sequence. Returns the decode batches (labels per step) and
/// each request's tokens.
async fn scheduled(
    vlm: &Vlm,
    requests: &[Value],
    max_active: usize,
) -> (Vec<Vec<String>>, Vec<Vec<i64>>) {
    let dir = bundle_dir("");
    let bundle = Bundle::load(&dir).unwrap();
    let spec = bundle.manifest.reasoning.vlm.clone().unwrap();
    let graph = |file: &str| Graph::new(load_session(&dir.join(file), &engine()).unwrap(), file);
    let model = DecoderModel::new(
        graph(&spec.embed_tokens).unwrap(),
        graph(&spec.decoder).unwrap(),
    )
    .unwrap();
    let settings = SchedulerSettings {
        max_active,
        max_kv_bytes: 1 << 30,
        max_queue: 64,
        retries: 0,
        retry_backoff: std::time::Duration::ZERO,
    };
    let mut scheduler = Scheduler::new(
        "decoder",
        model,
        settings,
        vlm.stop_tokens().to_vec(),
        Arc::new(NoObserver),
    );
    let mut prompts = Vec::new();
    for r in requests {
        let image = load_rgb(Path::new(r["image"].as_str().unwrap()));
        let prepared = vlm
            .prepare(&image, r["prompt"].as_str().unwrap(), &regions_of(r))
            .unwrap();
        prompts.push(vlm.prompt(prepared).await.unwrap());
    }
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| (requests[i]["arrival"].as_u64().unwrap_or(0), i));
    let mut pending = std::collections::VecDeque::from(order);
    let mut replies: Vec<_> = (0..requests.len()).map(|_| None).collect();
    let mut batches = Vec::new();
    let mut step = 0u64;
    while !pending.is_empty() || !scheduler.is_idle() {
        while let Some(&i) = pending.front() {
            if requests[i]["arrival"].as_u64().unwrap_or(0) > step {
                break;
            }
            pending.pop_front();
            let (tx, rx) = tokio::sync::oneshot::channel();
            let request = SequenceRequest {
                label: requests[i]["id"].as_str().unwrap().to_string(),
                prompt: prompts[i].clone(),
                max_new_tokens: vlm.spec().max_new_tokens,
            };
            scheduler.enqueue(request, Instant::now(), tx);
            replies[i] = Some(rx);
        }
        scheduler.admit();
        let labels: Vec<String> = scheduler
            .active_labels()
            .into_iter()
            .map(String::from)
            .collect();
        if scheduler.step() > 0 {
            batches.push(labels);
        }
        step += 1;
    }
    let tokens = replies
        .into_iter()
        .map(|rx| {
            let generation = rx.unwrap().try_recv().unwrap().unwrap();
            generation.ids.iter().map(|&t| i64::from(t)).collect()
        })
        .collect();
    (batches, tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_batching_equals_one_at_a_time_and_the_reference_schedule() {
    let requests = requests();
    let agents = agents("");
    let vlm = agents.reasoning.vlm().unwrap();
    let sequential = reference("", &requests, &[]);
    let alone: Vec<Vec<i64>> = sequential["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| ids(&r["generated_ids"]))
        .collect();
    let lengths: std::collections::BTreeSet<usize> = alone.iter().map(Vec::len).collect();
    assert!(
        lengths.len() >= 4,
        "sequences of different lengths: {lengths:?}"
    );
    for max_active in [1, 3, 8] {
        let batched = reference(
            "",
            &requests,
            &["--mode", "batched", "--max-active", &max_active.to_string()],
        );
        let (batches, tokens) = scheduled(vlm, &requests, max_active).await;
        assert_eq!(tokens, alone, "max_active {max_active}: batched == alone");
        assert_eq!(
            json!(batches),
            batched["decode_batches"],
            "max_active {max_active}: the same decode batches as the reference"
        );
        let widest = batches.iter().map(Vec::len).max().unwrap();
        assert_eq!(widest, max_active.min(requests.len()), "{max_active}");
        // Joining at different steps: the batch grew after the first step.
        if max_active > 1 {
            assert!(batches[0].len() < widest, "{batches:?}");
        }
    }
}

#[test]
fn the_bicubic_port_gives_pils_pixels() {
    let dir = tempfile::tempdir().unwrap();
    // (source, destination) sizes: up, down (antialiased), mixed, thin and the test images'.
    let cases = [
        ((300, 200), (308, 196)),
        ((640, 480), (504, 364)),
        ((37, 91), (56, 28)),
        ((1000, 30), (588, 56)),
        ((17, 17), (28, 140)),
        ((513, 257), (448, 224)),
    ];
    let mut jobs = Vec::new();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for (i, ((sw, sh), (dw, dh))) in cases.iter().enumerate() {
        // Noise plus a hard edge: ringing and clamping both show up.
        let img = RgbImage::from_fn(*sw, *sh, |x, _| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let edge = if x < sw / 2 { 0u8 } else { 255 };
            let b = state.to_le_bytes();
            Rgb([b[0], edge, b[2] / 2 + edge / 2])
        });
        let src = dir.path().join(format!("in-{i}.png"));
        img.save(&src).unwrap();
        jobs.push((
            img,
            src,
            dir.path().join(format!("out-{i}.png")),
            (*dw, *dh),
        ));
    }
    let script = "import sys, json\nfrom PIL import Image\nfor src, dst, w, h in json.loads(sys.argv[1]):\n    Image.open(src).convert('RGB').resize((w, h), Image.Resampling.BICUBIC).save(dst)\n";
    let args: Vec<Value> = jobs
        .iter()
        .map(|(_, src, dst, (w, h))| json!([src, dst, w, h]))
        .collect();
    let out = Command::new(python())
        .args(["-c", script, &serde_json::to_string(&args).unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (img, _, dst, (w, h)) in jobs {
        let pil = load_rgb(&dst);
        let ours = resize_bicubic(&img, w, h);
        let differing = ours
            .as_raw()
            .iter()
            .zip(pil.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differing,
            0,
            "{}x{} -> {w}x{h}: {differing} values differ from PIL",
            img.width(),
            img.height()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile model output through the whole loop

fn one_pass() -> LoopSettings {
    LoopSettings {
        max_iterations: 1,
        saliency_threshold: 0.5,
        diffusion_steps: None,
    }
}

/// `image` with a magenta square at (x, y) of side `side`.
fn with_magenta(mut image: RgbImage, x: u32, y: u32, side: u32) -> RgbImage {
    for yy in y..y + side {
        for xx in x..x + side {
            image.put_pixel(xx, yy, Rgb([255, 0, 255]));
        }
    }
    image
}

/// `image` with a magenta disk.
fn with_disk(mut image: RgbImage, (cx, cy): (i64, i64), r: i64) -> RgbImage {
    for (x, y, p) in image.enumerate_pixels_mut() {
        if (x as i64 - cx).pow(2) + (y as i64 - cy).pow(2) <= r * r {
            *p = Rgb([255, 0, 255]);
        }
    }
    image
}

fn grey(w: u32, h: u32) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb([120, 130, 110]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_answers_are_outcomes_not_failures() {
    let agents = agents("");
    let magenta = load_rgb(&images().join("magenta-224.png"));
    let run = |image: RgbImage, prompt: &'static str| {
        let agents = &agents;
        async move {
            let done = retouch(agents, image, "job-hostile", prompt, one_pass())
                .await
                .unwrap_or_else(|e| panic!("{prompt:?} failed the job: {e}"));
            let first = done.iterations[0].clone();
            (done, first)
        }
    };

    // Invalid JSON: the classifier's regions instead, recorded.
    let (done, it) = run(magenta.clone(), "a broken vase").await;
    let trace = it.vlm.expect("trace");
    let answer = trace.answer.as_ref().unwrap();
    assert_eq!(json!(answer.error), json!("invalid_json"));
    assert_eq!(json!(trace.fallback), json!("regions"));
    assert!(
        !trace.text.is_empty() && !trace.text.ends_with(']'),
        "{}",
        trace.text
    );
    assert!(!it.regions.is_empty() && done.edited());

    // Unknown category: dropped with its reason; nothing is left to repair.
    let (done, it) = run(magenta.clone(), "a dragon over the city").await;
    let trace = it.vlm.unwrap();
    let answer = trace.answer.unwrap();
    assert_eq!(
        json!(answer.dropped),
        json!([{"index": 0, "reason": "unknown_category"}])
    );
    assert!(trace.fallback.is_none() && it.regions.is_empty() && !done.edited());

    // A box outside the image: clipped to it.
    let wide = load_rgb(&images().join("magenta-300x200.png"));
    let (_, it) = run(wide, "portrait, her face in soft light, wide shot").await;
    let trace = it.vlm.unwrap();
    assert_eq!(
        json!(trace.answer.unwrap().regions[0].notes),
        json!(["clipped"])
    );
    assert_eq!(it.regions[0].category, "face");
    assert_eq!(it.regions[0].bbox, [190, 28, 110, 172]);
    assert_eq!(
        it.regions[0].description,
        "Make the eyes level and the features symmetric."
    );

    // An empty list: a speck perception sees but too small for any image token.
    let speck = with_magenta(grey(224, 224), 100, 100, 8);
    let (done, it) = run(speck, "a quiet street at night").await;
    let trace = it.vlm.unwrap();
    assert_eq!(trace.text, "[]");
    assert!(it.regions.is_empty() && !done.edited() && trace.fallback.is_none());

    // Generation that never stops: cut at max_new_tokens, the answer still read.
    let (_, it) = run(magenta.clone(), "a hand, forever young").await;
    let trace = it.vlm.unwrap();
    assert_eq!(json!(trace.stop_reason), json!("max_new_tokens"));
    assert_eq!(trace.generated_tokens, 128);
    assert_eq!(it.regions[0].category, "hand");

    // A tool the bundle lacks is dropped (routing decides); one it has is used.
    let (_, it) = run(magenta.clone(), "a face painted with a brush").await;
    let trace = it.vlm.unwrap();
    assert_eq!(
        json!(trace.answer.unwrap().regions[0].notes),
        json!(["unknown_tool"])
    );
    assert_eq!(it.regions[0].tool.as_str(), "patchmatch");
    let (_, it) = run(magenta.clone(), "a hand with a patch of fur").await;
    assert_eq!(it.regions[0].category, "hand");
    assert_eq!(
        it.regions[0].tool.as_str(),
        "patchmatch",
        "not hand's route"
    );

    // The mask is the box ∩ the dilated saliency: a round blob, not its whole (token-aligned)
    // box.
    let blob = with_disk(grey(224, 224), (126, 70), 30);
    let (_, it) = run(blob, "a violinist with six fingers on his hand").await;
    let region = &it.regions[0];
    let [x, y, w, h] = region.bbox;
    let inside = region.mask.pixels().filter(|p| p[0] > 0).count() as u32;
    assert!(
        inside > 2000 && inside < w * h * 9 / 10,
        "{inside} of {}",
        w * h
    );
    assert!(region
        .mask
        .enumerate_pixels()
        .all(|(px, py, p)| p[0] == 0 || (px >= x && px < x + w && py >= y && py < y + h)));

    // An image the model cannot see (a side under 28 pixels): the fallback runs.
    let thin = with_magenta(grey(200, 24), 90, 4, 16);
    let (_, it) = run(thin, "a banner").await;
    let trace = it.vlm.unwrap();
    assert!(
        trace.unsupported.as_deref().unwrap().contains("28"),
        "{trace:?}"
    );
    assert_eq!(json!(trace.fallback), json!("regions"));
    assert!(!it.regions.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_classifier_malformed_answers_fall_back_to_saliency_regions() {
    let agents = agents("fp16");
    let magenta = load_rgb(&images().join("magenta-224.png"));
    let done = retouch(&agents, magenta, "job-fp16", "a broken vase", one_pass())
        .await
        .expect("the job succeeds");
    let it = &done.iterations[0];
    let trace = it.vlm.as_ref().unwrap();
    assert_eq!(json!(trace.fallback), json!("saliency"));
    assert!(!it.regions.is_empty());
    for region in &it.regions {
        assert_eq!(region.category, "unclassified");
        assert_eq!(region.tool.as_str(), "patchmatch", "the default tool");
    }
    // The diagnostics carry the trace.
    let info = retoucher::diagnostics::IterationInfo::from(it);
    let record = serde_json::to_value(&info).unwrap();
    assert_eq!(record["vlm"]["answer"]["error"], "invalid_json");
    assert_eq!(record["vlm"]["fallback"], "saliency");
    assert!(
        record["vlm"]["timings_ms"]["time_to_first_token"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

/// Two tiny vision encoders with a dynamic grid (`[images, 3]`): one merges each 4 consecutive
/// patch rows (as the real ones do, so images encode independently), one subtracts the mean of
/// all patches of the call (mixing images). The load-time probe must tell them apart.
#[test]
fn several_images_per_vision_call_only_when_the_export_encodes_them_independently() {
    use retoucher::agents::reasoning::vlm::preprocess::VisionInput;
    use retoucher::agents::reasoning::vlm::vision::VisionEncoder;
    use retoucher::engine::batcher::BatchModel;

    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import sys, onnx
from onnx import helper as h, TensorProto as T
def build(path, mixing):
    c = lambda n, v, t=T.INT64: h.make_node("Constant", [], [n], value=h.make_tensor(n, t, [len(v)], v))
    nodes = [c("shape", [-1, 4, 1176]), c("s0", [0]), c("s1", [16]), c("ax", [1]),
             h.make_node("Reshape", ["pixel_values", "shape"], ["groups"]),
             h.make_node("ReduceMean", ["groups"], ["merged"], axes=[1], keepdims=0),
             h.make_node("Slice", ["merged", "s0", "s1", "ax"], ["head"]),
             h.make_node("Cast", ["grid_thw"], ["gridf"], to=T.FLOAT),
             h.make_node("ReduceSum", ["gridf"], ["gsum"], keepdims=0),
             c("zero", [0.0], T.FLOAT), h.make_node("Mul", ["gsum", "zero"], ["nothing"]),
             h.make_node("Add", ["head", "nothing"], ["plain"])]
    if mixing:
        nodes += [h.make_node("ReduceMean", ["head"], ["mean"], axes=[0], keepdims=1),
                  h.make_node("Sub", ["plain", "mean"], ["image_features"])]
    else:
        nodes += [h.make_node("Identity", ["plain"], ["image_features"])]
    g = h.make_graph(nodes, "vision",
        [h.make_tensor_value_info("pixel_values", T.FLOAT, ["num_patches", 1176]),
         h.make_tensor_value_info("grid_thw", T.INT64, ["num_images", 3])],
        [h.make_tensor_value_info("image_features", T.FLOAT, ["num_merged", 16])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    onnx.save(m, path)
build(sys.argv[1], False)
build(sys.argv[2], True)
"#;
    let (faithful, mixing) = (
        dir.path().join("faithful.onnx"),
        dir.path().join("mixing.onnx"),
    );
    let out = Command::new(python())
        .args(["-c", script])
        .arg(&faithful)
        .arg(&mixing)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let encoder = |path: &Path| {
        let graph = Graph::new(load_session(path, &engine()).unwrap(), "vision").unwrap();
        VisionEncoder::new(graph, 1176, 2).unwrap()
    };
    let mut good = encoder(&faithful);
    assert!(good.multi_image, "independent images batch");
    assert_eq!(good.grid_input, "grid_thw");
    assert!(!encoder(&mixing).multi_image, "mixing images does not");
    let image = |h: i64, w: i64, v: f32| VisionInput {
        pixel_values: (0..h * w * 1176)
            .map(|i| v + (i % 97) as f32 / 97.0)
            .collect(),
        grid: [1, h, w],
        resized: (0, 0),
    };
    let images = vec![image(4, 4, 0.0), image(2, 6, 1.0), image(4, 2, -1.0)];
    let together = good.run(&images).unwrap();
    for (i, alone) in images.into_iter().enumerate() {
        assert_eq!(
            together[i],
            good.run(std::slice::from_ref(&alone)).unwrap()[0],
            "image {i}"
        );
    }
    assert_eq!(
        together.iter().map(|f| f.rows).collect::<Vec<_>>(),
        [4, 3, 2]
    );
}
