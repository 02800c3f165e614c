//! What the worker gives back of its input, end to end (real RabbitMQ, S3 server and ONNX
//! Runtime on the reference bundle): an RGBA PNG comes back RGBA with its alpha channel byte for
//! byte, a 16-bit PNG comes back 16-bit with every pixel outside the edited regions bit for bit,
//! and the colour profile and text chunks come back too, while the magenta blemishes inside are
//! repaired.

mod common;

use std::io::Cursor;
use std::time::Duration;

use common::*;
use image::codecs::png::{PngDecoder, PngEncoder};
use image::{DynamicImage, ExtendedColorType, ImageDecoder, ImageEncoder};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);
const W: u32 = 96;
const H: u32 = 64;

/// Two round magenta blemishes (the reference perception's "distortion").
fn blemished(x: u32, y: u32) -> bool {
    [(30i64, 24i64), (70, 40)].iter().any(|&(cx, cy)| {
        let (dx, dy) = (i64::from(x) - cx, i64::from(y) - cy);
        dx * dx + dy * dy < 49
    })
}

/// A PNG chunk, whole: length, type, data, CRC.
fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32fast::hash(&out[4..]).to_be_bytes());
    out
}

const ICC: &[u8] = b"a colour profile travels with the image";
const TEXT: &[u8] = b"parameters\0a tabby cat, steps 30, cfg 7";

/// Encodes samples (native byte order for 16 bits) as PNG with an ICC profile and a tEXt chunk.
fn png_with_metadata(raw: &[u8], color: ExtendedColorType) -> Vec<u8> {
    let mut png = Vec::new();
    let mut encoder = PngEncoder::new(&mut png);
    encoder.set_icc_profile(ICC.to_vec()).unwrap();
    encoder.write_image(raw, W, H, color).unwrap();
    let tail = png.split_off(33);
    png.extend_from_slice(&chunk(b"tEXt", TEXT));
    png.extend_from_slice(&tail);
    png
}

/// An RGBA image: a colour gradient, alpha from transparent (left) to opaque (right), magenta
/// blemishes.
fn rgba_input() -> image::RgbaImage {
    image::RgbaImage::from_fn(W, H, |x, y| {
        let alpha = (x * 255 / (W - 1)) as u8;
        if blemished(x, y) {
            image::Rgba([255, 0, 255, alpha])
        } else {
            image::Rgba([(x * 2) as u8, (y * 3) as u8, 120, alpha])
        }
    })
}

/// A 16-bit RGB image whose samples use all 16 bits (no multiple of 257), magenta blemishes.
fn deep_input() -> image::ImageBuffer<image::Rgb<u16>, Vec<u16>> {
    image::ImageBuffer::from_fn(W, H, |x, y| {
        if blemished(x, y) {
            image::Rgb([65535, 0, 65535])
        } else {
            image::Rgb([
                (x * 500 + y * 3 + 1) as u16,
                (y * 800 + x + 2) as u16,
                (20_000 + x * 7 + y * 11) as u16,
            ])
        }
    })
}

/// The union of a result set's masks: the pixels an edit was allowed to touch.
async fn edited_area(world: &World, prefix: &str) -> Vec<bool> {
    let mut area = vec![false; (W * H) as usize];
    for key in world.keys(&world.output, prefix).await {
        if key
            .rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with("mask-"))
        {
            let bytes = world.get(&world.output, &key).await.unwrap();
            let mask = image::load_from_memory(&bytes).unwrap().to_luma8();
            for (i, p) in mask.pixels().enumerate() {
                area[i] |= p[0] > 0;
            }
        }
    }
    area
}

/// Runs one job on `input` and returns (the retouched PNG, the union of its masks).
async fn retouch(
    world: &World,
    events: &mut Events,
    name: &str,
    input: Vec<u8>,
) -> (Vec<u8>, Vec<bool>) {
    let key = format!("in/{name}.png");
    world.put(&world.input, &key, input).await;
    let id = unique(name);
    world
        .publish(
            json!({"job_id": id, "image": format!("s3://{}/{key}", world.input), "prompt": "a photo"})
                .to_string()
                .as_bytes(),
        )
        .await;
    let done = events.wait_for(std::slice::from_ref(&id), WAIT).await;
    assert_eq!(done[0].0, "job.succeeded", "{:?}", done[0].1);
    assert_eq!(done[0].1["status"], "retouched", "{:?}", done[0].1);
    let prefix = format!("results/{id}/");
    let png = world
        .get(&world.output, &format!("{prefix}retouched.png"))
        .await
        .expect("retouched.png");
    let area = edited_area(world, &prefix).await;
    assert!(area.iter().any(|&e| e), "{name}: something was edited");
    (png, area)
}

/// The ICC profile and tEXt chunk came back.
fn assert_metadata_kept(png: &[u8]) {
    let mut decoder = PngDecoder::new(Cursor::new(png)).unwrap();
    assert_eq!(decoder.icc_profile().unwrap().as_deref(), Some(ICC));
    let text = chunk(b"tEXt", TEXT);
    assert!(
        png.windows(text.len()).any(|w| w == text.as_slice()),
        "the tEXt chunk is carried over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpha_sixteen_bits_and_metadata_come_back() {
    let world = World::new().await;
    let mut events = world.events().await;
    let _worker = world.start_worker(&[]);

    // RGBA: alpha byte for byte everywhere; colour equal outside the edits; blemishes repaired.
    let input = rgba_input();
    let png = png_with_metadata(input.as_raw(), ExtendedColorType::Rgba8);
    let (out, area) = retouch(&world, &mut events, "rgba", png).await;
    assert_metadata_kept(&out);
    let out = image::load_from_memory(&out).unwrap();
    let DynamicImage::ImageRgba8(out) = out else {
        panic!("RGBA in, RGBA out: got {:?}", out.color());
    };
    let mut magenta = 0;
    for (i, (got, want)) in out.pixels().zip(input.pixels()).enumerate() {
        assert_eq!(got[3], want[3], "alpha of pixel {i}");
        if !area[i] {
            assert_eq!(got, want, "pixel {i} is outside every edit");
        }
        magenta += usize::from(got[0] > 200 && got[1] < 60 && got[2] > 200);
    }
    assert_eq!(magenta, 0, "the blemishes are repaired");

    // 16 bits: every pixel outside the edits bit for bit; the blemishes repaired.
    let input = deep_input();
    let raw: Vec<u8> = input
        .as_raw()
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    let png = png_with_metadata(&raw, ExtendedColorType::Rgb16);
    let (out, area) = retouch(&world, &mut events, "deep", png).await;
    assert_metadata_kept(&out);
    let out = image::load_from_memory(&out).unwrap();
    let DynamicImage::ImageRgb16(out) = out else {
        panic!("16-bit RGB in, 16-bit RGB out: got {:?}", out.color());
    };
    let mut magenta = 0;
    for (i, (got, want)) in out.pixels().zip(input.pixels()).enumerate() {
        if !area[i] {
            assert_eq!(got, want, "pixel {i} is outside every edit");
        }
        magenta += usize::from(got[0] > 50_000 && got[1] < 15_000 && got[2] > 50_000);
    }
    assert_eq!(magenta, 0, "the blemishes are repaired");
    world.cleanup().await;
}
