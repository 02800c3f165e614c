//! The `diffusion-inpaint` tool on the diffusion reference bundle (models/diffusion-reference):
//! - exports without the inpainting layout are refused at load, naming the reason;
//! - parity with the independent Python reference (`reference.py`, run live with onnxruntime
//!   and numpy on the same graphs and noise): the latents after every step within 1e-3, on
//!   every export variant, DDIM and Euler, with and without classifier-free guidance;
//! - the real CLIP tokenizer: special tokens, padding with the bundle's pad id, truncation;
//! - the engine's batching of UNet calls: a scalar timestep splits a batch into equal-timestep
//!   calls, a `[N]` timestep takes rows at different steps in one call, and either gives each
//!   item what it gets alone;
//! - repairs of different regions and jobs share UNet batches, and a region's pixels do not
//!   depend on what it was batched with;
//! - end to end through RabbitMQ and S3: a region routed to diffusion-inpaint is repaired,
//!   pixels outside every mask are untouched, and a redelivered job writes the same bytes.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use image::{GrayImage, Luma, Rgb, RgbImage};
use retoucher::agents::action::diffusion::{
    DiffusionInpaint, DiffusionSpec, InpaintRequest, SchedulerKind, Trace,
};
use retoucher::agents::text::{EncodingSpec, PromptEncoder};
use retoucher::agents::LoadContext;
use retoucher::bundle::Bundle;
use retoucher::engine::batcher::{BatchObserver, NoObserver};
use retoucher::engine::{load_session, InputSpec, OnnxModel, TensorData};
use serde_json::{json, Value};

fn bundle_root() -> PathBuf {
    repo().join("models/diffusion-reference")
}

/// The tool on the reference bundle with some keys of its table replaced.
fn load_tool(
    overrides: &[(&str, toml::Value)],
    observer: Arc<dyn BatchObserver>,
) -> DiffusionInpaint {
    env_var("ORT_DYLIB_PATH");
    let mut bundle = Bundle::load(&bundle_root()).expect(
        "the diffusion reference bundle (its CLIP tokenizer.json is built by scripts/test.sh)",
    );
    let table = bundle
        .manifest
        .action
        .tools
        .get_mut("diffusion-inpaint")
        .and_then(toml::Value::as_table_mut)
        .expect("[action.tools.diffusion-inpaint]");
    for (key, value) in overrides {
        table.insert(key.to_string(), value.clone());
    }
    let spec = DiffusionSpec::parse(&toml::Value::Table(table.clone())).unwrap();
    let bundle = Arc::new(bundle);
    let ctx = LoadContext {
        bundle: &bundle,
        engine: &cpu_engine(1),
        batching: &BTreeMap::new(),
        observer,
    };
    DiffusionInpaint::load(&ctx, spec).expect("loading diffusion-inpaint")
}

/// A crop with a smooth background and a magenta ellipse, and the ellipse as its hole.
fn scene(width: u32, height: u32, seed: u32) -> (RgbImage, GrayImage) {
    let (cx, cy) = (width as f32 * 0.45, height as f32 * 0.55);
    let (rx, ry) = (width as f32 * 0.22, height as f32 * 0.18);
    let inside =
        |x: u32, y: u32| ((x as f32 - cx) / rx).powi(2) + ((y as f32 - cy) / ry).powi(2) <= 1.0;
    let crop = RgbImage::from_fn(width, height, |x, y| {
        if inside(x, y) {
            Rgb([255, 0, 255])
        } else {
            let v = |base: u32, k: u32| ((base + k * x / 3 + (seed * 13 + y) / 2) % 200) as u8;
            Rgb([v(40, 1), v(110, 2), v(150, 1)])
        }
    });
    let hole = GrayImage::from_fn(width, height, |x, y| {
        Luma([if inside(x, y) { 255 } else { 0 }])
    });
    (crop, hole)
}

const INSTRUCTION: &str = "a natural hand with five distinct fingers";
const PROMPT: &str = "a red car on a rainy street";
const CATEGORY: &str = "hand";

/// Runs reference.py on one request; returns its result.
fn reference(request: &Value) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let (req, out) = (
        dir.path().join("request.json"),
        dir.path().join("result.json"),
    );
    std::fs::write(&req, request.to_string()).unwrap();
    let run = output_within(
        Command::new(env_var("RETOUCHER_TEST_PYTHON"))
            .arg(bundle_root().join("reference.py"))
            .arg(&req)
            .arg("--out")
            .arg(&out)
            .env("OMP_NUM_THREADS", "1"),
        Duration::from_secs(300),
    );
    assert!(
        run.status.success(),
        "reference.py failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap()
}

fn floats(array: &Value) -> Vec<f64> {
    array["data"]
        .as_array()
        .expect("an array {shape, data}")
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// Largest absolute difference, after checking the lengths agree.
fn max_diff(what: &str, ours: &[f32], theirs: &[f64]) -> f64 {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths differ");
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max)
}

struct Case {
    export: &'static str,
    scheduler: SchedulerKind,
    steps: u32,
    guidance: f64,
}

async fn parity(case: &Case) {
    let label = format!(
        "{} {} {} steps g={}",
        case.export,
        case.scheduler.as_str(),
        case.steps,
        case.guidance
    );
    let tool = load_tool(
        &[
            ("export", toml::Value::from(case.export)),
            ("scheduler", toml::Value::from(case.scheduler.as_str())),
            ("guidance_scale", toml::Value::from(case.guidance)),
        ],
        Arc::new(NoObserver),
    );
    let (crop, hole) = scene(57, 43, case.steps);
    let (job_id, iteration, region) = ("job-parity.7", 1usize, 2usize);
    let text = tool.spec().conditioning_text(INSTRUCTION, PROMPT, CATEGORY);
    let mut trace = Trace::default();
    let patch = tool
        .inpaint(
            &InpaintRequest {
                crop: &crop,
                hole: &hole,
                text: &text,
                job_id,
                iteration,
                region,
                steps: case.steps,
            },
            Some(&mut trace),
        )
        .await
        .unwrap_or_else(|e| panic!("{label}: {e}"));

    let request = json!({
        "bundle": bundle_root(),
        "export": case.export,
        "image": {"width": crop.width(), "height": crop.height(), "rgb": crop.as_raw()},
        "mask": {"width": hole.width(), "height": hole.height(), "data": hole.as_raw()},
        "instruction": INSTRUCTION, "prompt": PROMPT, "category": CATEGORY,
        "job_id": job_id, "iteration": iteration, "region": region,
        "scheduler": case.scheduler.as_str(), "steps": case.steps,
        "guidance_scale": case.guidance,
    });
    let theirs = tokio::task::block_in_place(|| reference(&request));
    let r = &theirs;
    assert_eq!(r["settings"]["text"], text.as_str(), "{label}");

    // What was detected from the sessions.
    let variant = tool.variant();
    let v = &r["variant"];
    let ids = match variant.input_ids {
        retoucher::agents::action::diffusion::export::IdType::I32 => "int32",
        retoucher::agents::action::diffusion::export::IdType::I64 => "int64",
    };
    assert_eq!(v["input_ids"], ids, "{label}");
    let timestep = match variant.timestep {
        retoucher::agents::action::diffusion::export::TimestepType::F32 => "float32",
        retoucher::agents::action::diffusion::export::TimestepType::I64 => "int64",
        retoucher::agents::action::diffusion::export::TimestepType::I32 => "int32",
    };
    assert_eq!(v["timestep"], timestep, "{label}");
    assert_eq!(
        v["timestep_rank"],
        u64::from(!variant.scalar_timestep),
        "{label}"
    );
    let vae = match variant.vae_output {
        retoucher::agents::action::diffusion::export::VaeOutput::LatentSample => "latent_sample",
        retoucher::agents::action::diffusion::export::VaeOutput::LatentParameters => {
            "latent_parameters"
        }
    };
    assert_eq!(v["vae_encoder_output"], vae, "{label}");

    // Text and schedule, exactly.
    let want_ids: Vec<Vec<i64>> = if case.guidance > 1.0 {
        vec![
            serde_json::from_value(r["input_ids"]["uncond"].clone()).unwrap(),
            serde_json::from_value(r["input_ids"]["cond"].clone()).unwrap(),
        ]
    } else {
        vec![serde_json::from_value(r["input_ids"]["cond"].clone()).unwrap()]
    };
    assert_eq!(trace.input_ids, want_ids, "{label}");
    let timesteps: Vec<usize> = serde_json::from_value(r["schedule"]["timesteps"].clone()).unwrap();
    assert_eq!(trace.timesteps, timesteps, "{label}");
    assert_eq!(timesteps.len(), case.steps as usize);
    let sigma = r["schedule"]["init_noise_sigma"].as_f64().unwrap();
    assert!(
        (trace.init_noise_sigma - sigma).abs() <= 1e-12 * sigma,
        "{label}"
    );

    // Inputs of the loop.
    for (name, array, tolerance) in [
        ("noise", &trace.noise, 1e-6),
        ("initial_latents", &trace.initial_latents, 1e-5),
        ("mask_latent", &trace.mask_latent, 0.0),
        ("masked_image_latents", &trace.masked_image_latents, 1e-5),
        ("text_embeddings", &trace.text_embeddings, 1e-5),
    ] {
        let d = max_diff(name, array, &floats(&r[name]));
        assert!(d <= tolerance, "{label}: {name} differs by {d}");
    }
    assert!(
        trace.mask_latent.contains(&1.0) && trace.mask_latent.contains(&0.0),
        "{label}: the scene has known and hole cells"
    );

    // Every step's latents.
    let steps = r["steps"].as_array().unwrap();
    assert_eq!(trace.steps.len(), steps.len(), "{label}");
    let mut worst = 0.0f64;
    for (ours, theirs) in trace.steps.iter().zip(steps) {
        assert_eq!(ours.timestep as u64, theirs["timestep"].as_u64().unwrap());
        let d = max_diff("latents", &ours.latents, &floats(&theirs["latents"]));
        assert!(
            d <= 1e-3,
            "{label}: latents after the step at t = {} differ by {d}",
            ours.timestep
        );
        worst = worst.max(d);
    }
    let decoded = max_diff("decoded", &trace.decoded, &floats(&r["decoded"]));
    assert!(decoded <= 1e-3, "{label}: decoded differs by {decoded}");
    // The crop-sized patch, through the same resampling and rounding (ported): a level at most.
    let theirs: Vec<u8> = serde_json::from_value(r["patch"]["rgb"].clone()).unwrap();
    let off = patch
        .as_raw()
        .iter()
        .zip(&theirs)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert_eq!(theirs.len(), patch.as_raw().len());
    assert!(off <= 1, "{label}: patch differs by {off} levels");
    eprintln!(
        "{label}: latents within {worst:.2e} at every step, decoded {decoded:.2e}, patch {off}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_export_and_scheduler_matches_the_python_reference_at_every_step() {
    env_var("RETOUCHER_TEST_PYTHON");
    for export in ["sd-inpaint", "variants/optimum-1x", "variants/optimum-onnx"] {
        parity(&Case {
            export,
            scheduler: SchedulerKind::Ddim,
            steps: 20,
            guidance: 7.5,
        })
        .await;
        parity(&Case {
            export,
            scheduler: SchedulerKind::Euler,
            steps: 12,
            guidance: 7.5,
        })
        .await;
    }
    // Without guidance the conditional branch runs alone.
    parity(&Case {
        export: "variants/optimum-onnx",
        scheduler: SchedulerKind::Euler,
        steps: 6,
        guidance: 1.0,
    })
    .await;
}

#[test]
fn the_real_clip_tokenizer_adds_its_special_tokens_pads_and_truncates() {
    let path = bundle_root().join("sd-inpaint/tokenizer/tokenizer.json");
    assert!(
        path.is_file(),
        "{} is built by scripts/test.sh (generate.py --tokenizer)",
        path.display()
    );
    let (bos, eos): (i64, i64) = (49406, 49407);
    const EOS: u32 = 49407;
    let encoder = |pad_id: Option<u32>| {
        PromptEncoder::load(
            &path,
            EncodingSpec {
                max_tokens: 77,
                add_special_tokens: true,
                pad_id,
            },
        )
        .unwrap()
    };
    // SD 1.x pads with <|endoftext|>, which the tokenizer file itself also says.
    assert_eq!(encoder(None).pad_id(), EOS);
    let tokens = encoder(Some(EOS))
        .encode("A Photo of a RED hand!!")
        .unwrap();
    let mut want = vec![bos, 320, 1125, 539, 320, 736, 2463, 748, eos];
    want.resize(77, eos);
    assert_eq!(tokens.ids, want);
    assert_eq!(tokens.attention_mask.iter().sum::<i64>(), 9);
    // SD 2.x pads with "!" (0): the bundle's pad id wins over the file's.
    let tokens = encoder(Some(0)).encode("a red hand").unwrap();
    assert_eq!(tokens.ids[..5], [bos, 320, 736, 2463, eos]);
    assert!(tokens.ids[5..].iter().all(|&id| id == 0));
    // A long prompt is cut to 77 ids, <|endoftext|> kept last.
    let long = "a violinist playing on a rainy street at night ".repeat(12);
    let tokens = encoder(Some(EOS)).encode(&long).unwrap();
    assert_eq!(tokens.ids.len(), 77);
    assert_eq!((tokens.ids[0], tokens.ids[76]), (bos, eos));
    assert_eq!(tokens.ids.iter().filter(|&&id| id == eos).count(), 1);
    assert!(tokens.attention_mask.iter().all(|&m| m == 1));
    // The empty negative prompt: the two special tokens, then padding.
    let empty = encoder(Some(EOS)).encode("").unwrap();
    assert_eq!(empty.ids[..2], [bos, eos]);
    assert_eq!(empty.attention_mask.iter().sum::<i64>(), 2);
}

/// A UNet request of one CFG pair for an export's `unet/model.onnx`.
fn unet_item(t: usize, seed: f32, timestep: &dyn Fn(usize) -> TensorData) -> Vec<TensorData> {
    let (h, l, d) = (16usize, 77usize, 32usize);
    let sample: Vec<f32> = (0..2 * 9 * h * h)
        .map(|i| ((i as f32 * 0.37 + seed).sin() * 1.5).clamp(-1.0, 1.0))
        .collect();
    let hidden: Vec<f32> = (0..2 * l * d)
        .map(|i| ((i as f32 * 0.11 + seed).cos()) * 0.5)
        .collect();
    vec![
        TensorData::F32(sample),
        timestep(t),
        TensorData::F32(hidden),
    ]
}

fn unet_model(export: &str, scalar: bool) -> OnnxModel {
    let path = bundle_root().join(export).join("unet/model.onnx");
    let session = load_session(&path, &cpu_engine(1)).unwrap();
    let model = OnnxModel::new(
        session,
        vec![
            InputSpec {
                name: "sample".into(),
                item_shape: vec![9, 16, 16],
            },
            InputSpec {
                name: "timestep".into(),
                item_shape: vec![],
            },
            InputSpec {
                name: "encoder_hidden_states".into(),
                item_shape: vec![77, 32],
            },
        ],
        "out_sample",
        export,
    )
    .unwrap()
    .with_rows_per_item(2);
    if scalar {
        model.with_shared_input("timestep").unwrap()
    } else {
        model
    }
}

fn assert_same_as_alone(model: &mut OnnxModel, items: &[Vec<TensorData>]) {
    let together = model.run_batch(items).unwrap();
    for (item, out) in items.iter().zip(&together) {
        let alone = model
            .run_batch(std::slice::from_ref(item))
            .unwrap()
            .remove(0);
        assert_eq!(out.len(), 2 * 4 * 16 * 16);
        let d = out
            .iter()
            .zip(&alone)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0.0f32, f32::max);
        assert!(
            d <= 1e-5,
            "an item of a mixed batch differs from its run alone by {d}"
        );
    }
    // Different timesteps do give different outputs (so the comparison above means something).
    assert_ne!(together[0], together[1]);
}

#[test]
fn unet_batches_mix_timesteps_per_row_or_split_into_equal_timestep_calls() {
    env_var("ORT_DYLIB_PATH");
    // Items 0 and 2 share a timestep, item 1 is at another.
    // optimum-onnx: a scalar f32 timestep, one per call.
    let mut scalar = unet_model("variants/optimum-onnx", true);
    let f32_scalar = |t: usize| TensorData::F32(vec![t as f32]);
    let items: Vec<_> = [(951, 0.0), (1, 0.5), (951, 1.0)]
        .iter()
        .map(|&(t, s)| unet_item(t, s, &f32_scalar))
        .collect();
    assert_same_as_alone(&mut scalar, &items);
    // sd-inpaint: f32 [N], a timestep per row; optimum-1x: i64 [N].
    let mut per_row = unet_model("sd-inpaint", false);
    let f32_rows = |t: usize| TensorData::F32(vec![t as f32; 2]);
    let items: Vec<_> = [(951, 0.0), (1, 0.5), (451, 1.0)]
        .iter()
        .map(|&(t, s)| unet_item(t, s, &f32_rows))
        .collect();
    assert_same_as_alone(&mut per_row, &items);
    let mut per_row = unet_model("variants/optimum-1x", false);
    let i64_rows = |t: usize| TensorData::I64(vec![t as i64; 2]);
    let items: Vec<_> = [(951, 0.0), (1, 0.5)]
        .iter()
        .map(|&(t, s)| unet_item(t, s, &i64_rows))
        .collect();
    assert_same_as_alone(&mut per_row, &items);
    // A wrongly sized item is an error, not a panic.
    let mut bad = items[0].clone();
    bad[1] = TensorData::I64(vec![1; 3]);
    let err = per_row.run_batch(&[bad]).unwrap_err().to_string();
    assert!(err.contains("timestep"), "{err}");
}

/// Runs requests concurrently; returns each patch and trace.
async fn inpaint_all(
    tool: &DiffusionInpaint,
    scenes: &[(RgbImage, GrayImage)],
    requests: &[(&str, u32)],
) -> Vec<(RgbImage, Trace)> {
    let calls = requests
        .iter()
        .zip(scenes)
        .map(|(&(job_id, steps), (crop, hole))| async move {
            let mut trace = Trace::default();
            let patch = tool
                .inpaint(
                    &InpaintRequest {
                        crop,
                        hole,
                        text: "a natural hand, a photo",
                        job_id,
                        iteration: 0,
                        region: 0,
                        steps,
                    },
                    Some(&mut trace),
                )
                .await
                .unwrap();
            (patch, trace)
        });
    futures_util::future::join_all(calls).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_of_different_jobs_share_unet_batches_and_get_what_they_get_alone() {
    let sizes = Arc::new(BatchSizes::default());
    let tool = load_tool(&[], sizes.clone());
    // Three jobs at different step counts: their schedules share only t = 1.
    let requests = [("job-a", 20), ("job-b", 12), ("job-c", 7)];
    let scenes: Vec<_> = (0..3).map(|i| scene(60 + 7 * i, 44 + 5 * i, i)).collect();
    let together = inpaint_all(&tool, &scenes, &requests).await;
    let unet = sizes.take("unet");
    assert_eq!(unet.iter().sum::<usize>(), 20 + 12 + 7, "{unet:?}");
    let shared: usize = unet.iter().filter(|&&n| n > 1).sum();
    // At most three items (one per job, at t = 1) could share a timestep.
    assert!(
        shared > 3,
        "items at different timesteps share UNet calls: batch sizes {unet:?}"
    );
    let text = sizes.take("text_encoder");
    assert!(text.iter().any(|&n| n > 1), "text encoder batches {text:?}");
    assert!(sizes.take("vae_decoder").iter().sum::<usize>() == 3);

    for (i, (patch, trace)) in together.iter().enumerate() {
        let alone = inpaint_all(&tool, &scenes[i..=i], &requests[i..=i]).await;
        let (alone_patch, alone_trace) = &alone[0];
        assert_eq!(
            trace.steps.last().unwrap().latents,
            alone_trace.steps.last().unwrap().latents,
            "{}: the final latents depend on the batch",
            requests[i].0
        );
        assert_eq!(patch.as_raw(), alone_patch.as_raw(), "{}", requests[i].0);
        // Not magenta any more: the hole took the surroundings' colour.
        let (crop, hole) = &scenes[i];
        let magenta = hole
            .pixels()
            .zip(patch.pixels())
            .filter(|(h, p)| h[0] > 0 && p.0[0] > 200 && p.0[1] < 60 && p.0[2] > 200)
            .count();
        assert_eq!(magenta, 0, "{}", requests[i].0);
        assert_eq!(patch.dimensions(), crop.dimensions());
    }
    // Another job draws other noise: other latents.
    assert_ne!(
        together[0].1.initial_latents, together[1].1.initial_latents,
        "the noise is keyed by the job"
    );
}

/// Copies a folder tree.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Loading the tool from a copy of the reference bundle whose `sd-inpaint/{part}/model.onnx`
/// is another part's graph (its sha256 updated, so only the layout check can refuse it).
fn load_with_swapped(part: &str, with: &str) -> String {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bundle");
    copy_tree(&bundle_root(), &root);
    let file = format!("sd-inpaint/{part}/model.onnx");
    let bytes = std::fs::read(root.join(format!("sd-inpaint/{with}/model.onnx"))).unwrap();
    let old = hex::encode(sha2::Sha256::digest(
        std::fs::read(root.join(&file)).unwrap(),
    ));
    std::fs::write(root.join(&file), &bytes).unwrap();
    let manifest = std::fs::read_to_string(root.join("bundle.toml")).unwrap();
    let new = hex::encode(sha2::Sha256::digest(&bytes));
    let line = format!("\"{file}\" = \"{old}\"");
    assert!(manifest.contains(&line), "{line}");
    std::fs::write(
        root.join("bundle.toml"),
        manifest.replace(&line, &format!("\"{file}\" = \"{new}\"")),
    )
    .unwrap();
    let bundle = Arc::new(Bundle::load(&root).unwrap());
    let table = &bundle.manifest.action.tools["diffusion-inpaint"];
    let ctx = LoadContext {
        bundle: &bundle,
        engine: &cpu_engine(1),
        batching: &BTreeMap::new(),
        observer: Arc::new(NoObserver),
    };
    match DiffusionInpaint::load(&ctx, DiffusionSpec::parse(table).unwrap()) {
        Ok(_) => panic!("a {part} that is a {with} was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_without_the_inpainting_layout_are_refused_naming_the_reason() {
    env_var("ORT_DYLIB_PATH");
    let err = load_with_swapped("unet", "vae_decoder");
    assert!(
        err.contains("unet inputs are [\"latent_sample\"]")
            && err.contains("takes exactly sample, timestep and encoder_hidden_states"),
        "{err}"
    );
    assert!(err.contains("export \"sd-inpaint\""), "{err}");
    let err = load_with_swapped("text_encoder", "vae_encoder");
    assert!(err.contains("text_encoder has no \"input_ids\""), "{err}");
    let err = load_with_swapped("vae_encoder", "vae_decoder");
    assert!(err.contains("vae_encoder has no \"sample\""), "{err}");
    let err = load_with_swapped("vae_decoder", "vae_encoder");
    assert!(
        err.contains("vae_decoder has no \"latent_sample\""),
        "{err}"
    );
}

const WAIT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diffusion_region_is_repaired_through_the_broker_and_a_redelivery_writes_the_same_bytes()
{
    let world = World::new().await;
    let input = example("chelsea-blemished.png");
    let original = decode(&input);
    world.put(&world.input, "gen/chelsea.png", input).await;
    let mut events = world.events().await;
    let bundle = bundle_root().display().to_string();
    let worker = world.start_worker(&[("RETOUCHER__MODELS__BUNDLE", &bundle)]);

    let job = |id: &str| {
        json!({
            "job_id": id,
            "image": format!("s3://{}/gen/chelsea.png", world.input),
            "prompt": "close up photo of a tabby cat",
            "options": {"max_iterations": 1, "diffusion_steps": 12},
        })
        .to_string()
    };
    // Two jobs on the same image at once: their regions share UNet batches (and job a is
    // redelivered alone below).
    let (a, b) = (unique("diffusion-a"), unique("diffusion-b"));
    world.publish(job(&a).as_bytes()).await;
    world.publish(job(&b).as_bytes()).await;
    let got = events.wait_for(&[a.clone(), b.clone()], WAIT).await;
    for (key, event) in &got {
        assert_eq!(key, "job.succeeded", "{event}\n{}", worker.log_text());
        assert_eq!(event["status"], "retouched", "{event}");
    }
    let prefix = format!("results/{a}/");
    let diagnostics: Value = serde_json::from_slice(
        &world
            .get(&world.output, &format!("{prefix}diagnostics.json"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(diagnostics["settings"]["diffusion_steps"], 12);
    let regions = diagnostics["iterations"][0]["regions"].as_array().unwrap();
    let diffused: Vec<&Value> = regions
        .iter()
        .filter(|r| r["tool"] == "diffusion-inpaint")
        .collect();
    assert!(
        !diffused.is_empty(),
        "no region went to diffusion-inpaint: {regions:?}"
    );
    assert!(diffused.iter().all(|r| r["category"] == "hand"));
    assert!(
        diagnostics["models"]["action.diffusion-inpaint"]["name"]
            .as_str()
            .unwrap()
            .ends_with("sd-inpaint/unet/model.onnx"),
        "{}",
        diagnostics["models"]
    );
    let first = world
        .get(&world.output, &format!("{prefix}retouched.png"))
        .await
        .unwrap();
    let retouched = decode(&first);
    assert_eq!(retouched.dimensions(), original.dimensions());

    // Every diffusion region is repaired: no magenta left inside its mask.
    let mut edited = vec![false; (original.width() * original.height()) as usize];
    for region in regions {
        let mask = world
            .get(
                &world.output,
                &format!("{prefix}{}", region["mask"].as_str().unwrap()),
            )
            .await
            .unwrap();
        let mask = image::load_from_memory(&mask).unwrap().to_luma8();
        let mut before = 0;
        let mut after = 0;
        for (i, ((m, p), q)) in mask
            .pixels()
            .zip(original.pixels())
            .zip(retouched.pixels())
            .enumerate()
        {
            if m[0] > 0 {
                edited[i] = true;
                let magenta = |p: &Rgb<u8>| p.0[0] > 200 && p.0[1] < 80 && p.0[2] > 200;
                before += usize::from(magenta(p));
                after += usize::from(magenta(q));
            }
        }
        if region["tool"] == "diffusion-inpaint" {
            assert!(before > 100, "{region}: {before} magenta pixels before");
            assert_eq!(after, 0, "{region}: magenta left after the repair");
        }
    }
    // Pixels outside every mask are byte-identical to the input.
    let changed_outside = original
        .pixels()
        .zip(retouched.pixels())
        .zip(&edited)
        .filter(|((p, q), inside)| !**inside && p != q)
        .count();
    assert_eq!(changed_outside, 0, "pixels outside every mask changed");

    // A redelivery that finds no complete result set recomputes, alone this time: same bytes.
    world
        .s3
        .delete_object()
        .bucket(&world.output)
        .key(format!("{prefix}diagnostics.json"))
        .send()
        .await
        .unwrap();
    world
        .s3
        .delete_object()
        .bucket(&world.output)
        .key(format!("{prefix}retouched.png"))
        .send()
        .await
        .unwrap();
    world.publish(job(&a).as_bytes()).await;
    let again = events.wait_for(std::slice::from_ref(&a), WAIT).await;
    assert_eq!(again[0].0, "job.succeeded", "{}", again[0].1);
    let second = world
        .get(&world.output, &format!("{prefix}retouched.png"))
        .await
        .unwrap();
    assert!(second == first, "the redelivered job wrote other bytes");

    let metrics = worker.metrics();
    let steps = metric_sum(
        &metrics,
        "retoucher_diffusion_steps_total",
        "scheduler=\"ddim\"",
    );
    assert!(
        steps >= (3 * diffused.len() * 12) as f64,
        "steps counted: {steps}"
    );
    assert!(metric_sum(&metrics, "retoucher_batch_size_count", "model=\"unet\"") > 0.0);
    assert!(metric_sum(&metrics, "retoucher_diffusion_step_seconds_count", "") >= steps);
    drop(worker);
    world.cleanup().await;
}
