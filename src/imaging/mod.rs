//! Pixels in and out: guarded decoding of untrusted PNG/JPEG bytes, lossless PNG encoding,
//! model pre-processing (CHW tensors), dense saliency maps, and the binary-mask helpers
//! (dilate, feather, composite, crop rectangles) that keep edits confined to their regions.

use std::io::Cursor;

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, GrayImage, ImageEncoder, ImageError, ImageFormat, ImageReader};
use image::{Luma, RgbImage};

use crate::error::{ErrorClass, JobError};

pub mod resample;

/// Mask pixels at or above this value count as inside. Masks are meant to be 0/255, but a mask
/// that went through a resampling filter has intermediate values at its edge; splitting at the
/// midpoint keeps the region the same size it was.
pub const MASK_INSIDE: u8 = 128;

/// Upper bounds on what [`decode`] accepts, so hostile input cannot exhaust memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted encoded size, in bytes.
    pub max_bytes: u64,
    /// Largest accepted width × height, checked from the header before any pixel is decoded.
    pub max_pixels: u64,
}

/// A decoded input image, always 8-bit RGB, and the container it came in.
#[derive(Clone, Debug)]
pub struct DecodedImage {
    pub rgb: RgbImage,
    /// `"png"` or `"jpeg"`, as reported in diagnostics.
    pub format: &'static str,
}

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";
const JPEG_MAGIC: &[u8] = &[0xFF, 0xD8, 0xFF];

/// Head room for decoder-internal buffers on top of the output buffer (zune-jpeg and png keep a
/// few rows and Huffman tables; 16 MiB is far above what they need for any image we accept).
const DECODER_SLACK_BYTES: u64 = 16 << 20;

/// Decodes untrusted PNG or JPEG bytes to RGB8.
///
/// Sniffs the format from magic bytes (PNG, JPEG; anything else is
/// [`ErrorClass::UndecodableImage`] naming what it saw), rejects `bytes.len() > max_bytes` and,
/// from the header alone, `width × height > max_pixels` with [`ErrorClass::ImageTooLarge`] so a
/// decompression bomb never gets a buffer. The decoder also runs under `image::Limits` derived
/// from the header, as a second line of defence. Alpha is dropped (not composited) and 16-bit
/// samples are reduced to 8 bits. Truncated or corrupt data is
/// [`ErrorClass::UndecodableImage`] with the decoder's reason.
pub fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<DecodedImage, JobError> {
    let len = bytes.len() as u64;
    if len > limits.max_bytes {
        return Err(JobError::new(
            ErrorClass::ImageTooLarge,
            format!(
                "image is {len} bytes, over the limit of {} bytes",
                limits.max_bytes
            ),
        ));
    }
    let (format, name) = sniff(bytes)?;

    let header = ImageReader::with_format(Cursor::new(bytes), format);
    let (width, height) = header
        .into_dimensions()
        .map_err(|e| decode_error(name, "header", e))?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(JobError::new(
            ErrorClass::ImageTooLarge,
            format!(
                "{name} image is {width}x{height} = {pixels} pixels, over the limit of {} pixels",
                limits.max_pixels
            ),
        ));
    }
    if pixels == 0 {
        return Err(JobError::new(
            ErrorClass::UndecodableImage,
            format!("{name} image has no pixels ({width}x{height})"),
        ));
    }

    // The JPEG decoder fills a stream cut short with grey instead of failing; a truncated
    // upload must be rejected, not retouched.
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(JobError::new(
            ErrorClass::UndecodableImage,
            "truncated jpeg: the data ends before the end-of-image marker",
        ));
    }

    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(width);
    decoder_limits.max_image_height = Some(height);
    // 8 bytes per pixel covers the widest layout either codec produces (RGBA, 16 bits).
    decoder_limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(DECODER_SLACK_BYTES));
    reader.limits(decoder_limits);
    let image = reader.decode().map_err(|e| decode_error(name, "data", e))?;
    Ok(DecodedImage {
        rgb: image.into_rgb8(),
        format: name,
    })
}

/// Whether a JPEG stream reaches its EOI marker: walks the marker segments from SOI, skipping
/// each scan's entropy-coded data (where 0xFF is always followed by 0x00 or an RSTn marker).
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let len = bytes.len();
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let mut i = 2;
    loop {
        if i >= len || bytes[i] != 0xFF {
            return false;
        }
        while i < len && bytes[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = bytes.get(i) else {
            return false;
        };
        i += 1;
        match marker {
            0xD9 => return true,
            0x01 | 0xD0..=0xD7 => continue,
            _ => {
                let Some(seg) = bytes.get(i..i + 2) else {
                    return false;
                };
                let seg = usize::from(u16::from_be_bytes([seg[0], seg[1]]));
                if seg < 2 {
                    return false;
                }
                i += seg;
                if marker == 0xDA {
                    loop {
                        let (Some(&b), Some(&next)) = (bytes.get(i), bytes.get(i + 1)) else {
                            return false;
                        };
                        if b == 0xFF && next != 0x00 && !(0xD0..=0xD7).contains(&next) {
                            break;
                        }
                        i += if b == 0xFF { 2 } else { 1 };
                    }
                }
            }
        }
    }
}
/// Identifies the container from its first bytes; only PNG and JPEG are accepted, and the
/// error says what the bytes looked like so an operator can tell a WebP from an HTML error page.
fn sniff(bytes: &[u8]) -> Result<(ImageFormat, &'static str), JobError> {
    if bytes.starts_with(PNG_MAGIC) {
        return Ok((ImageFormat::Png, "png"));
    }
    if bytes.starts_with(JPEG_MAGIC) {
        return Ok((ImageFormat::Jpeg, "jpeg"));
    }
    let seen = if bytes.is_empty() {
        "an empty file".to_string()
    } else if let Some(known) = known_other_format(bytes) {
        format!("{known} data")
    } else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!("unrecognised bytes {}", head.join(" "))
    };
    Err(JobError::new(
        ErrorClass::UndecodableImage,
        format!("not a PNG or JPEG image: saw {seen}"),
    ))
}

/// Names a few formats that are commonly mistaken for images we take.
fn known_other_format(bytes: &[u8]) -> Option<&'static str> {
    if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return Some("WebP");
    }
    if bytes.starts_with(b"\x89PNG") {
        return Some("truncated PNG signature");
    }
    let table: [(&[u8], &'static str); 9] = [
        (b"GIF87a", "GIF"),
        (b"GIF89a", "GIF"),
        (b"BM", "BMP"),
        (b"II*\0", "TIFF"),
        (b"MM\0*", "TIFF"),
        (b"\0\0\0\x0cjP  ", "JPEG 2000"),
        (b"<", "text/HTML/XML"),
        (b"{", "JSON"),
        (b"%PDF", "PDF"),
    ];
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        return Some("ISO-BMFF (HEIC/AVIF/MP4)");
    }
    table
        .iter()
        .find(|(magic, _)| bytes.starts_with(magic))
        .map(|(_, name)| *name)
}

/// Classifies a decoder failure: a limit hit is the image's size, anything else its content.
fn decode_error(format: &str, stage: &str, error: ImageError) -> JobError {
    match error {
        ImageError::Limits(e) => JobError::new(
            ErrorClass::ImageTooLarge,
            format!("{format} image exceeds decoding limits: {e}"),
        ),
        other => JobError::new(
            ErrorClass::UndecodableImage,
            format!("corrupt or truncated {format} {stage}: {other}"),
        ),
    }
}

/// Encodes RGB8 as PNG (lossless, so nothing outside an edit changes).
///
/// An image with a zero dimension cannot be a PNG; [`decode`] never produces one, and for it
/// the result is empty rather than a panic.
pub fn encode_png(img: &RgbImage) -> Vec<u8> {
    encode(
        img.as_raw(),
        img.width(),
        img.height(),
        ExtendedColorType::Rgb8,
    )
}

/// Encodes an 8-bit grey image (saliency maps) as PNG. Same zero-size rule as
/// [`encode_png`].
pub fn encode_gray_png(img: &GrayImage) -> Vec<u8> {
    encode(
        img.as_raw(),
        img.width(),
        img.height(),
        ExtendedColorType::L8,
    )
}

/// Encodes a binary 0/255 mask as an 8-bit grey PNG without row filters: a mask is runs of
/// two values, which deflate packs as well unfiltered, and trying five filters on every row of
/// an image-sized mask costs more than the rest of its encoding.
pub fn encode_mask_png(mask: &GrayImage) -> Vec<u8> {
    encode_with(
        mask.as_raw(),
        mask.width(),
        mask.height(),
        ExtendedColorType::L8,
        image::codecs::png::FilterType::NoFilter,
    )
}

fn encode(raw: &[u8], width: u32, height: u32, color: ExtendedColorType) -> Vec<u8> {
    encode_with(
        raw,
        width,
        height,
        color,
        image::codecs::png::FilterType::Adaptive,
    )
}

fn encode_with(
    raw: &[u8],
    width: u32,
    height: u32,
    color: ExtendedColorType,
    filter: image::codecs::png::FilterType,
) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail for I/O reasons; the only failures are zero or inconsistent
    // dimensions, which no caller can put to use anyway.
    // Fast deflate: the files are written once per job on the hot path; a few percent more
    // bytes cost less than the CPU time the default level takes.
    let encoder =
        PngEncoder::new_with_quality(&mut out, image::codecs::png::CompressionType::Fast, filter);
    if encoder.write_image(raw, width, height, color).is_err() {
        out.clear();
    }
    out
}

/// Resizes RGB to `size`×`size` (stretched, no letterbox) and lays it out as a CHW f32 buffer
/// with `(v/255 - mean[c]) / std[c]`.
///
/// The resize is bilinear with the kernel widened when shrinking (`FilterType::Triangle`, the
/// same as PIL's `BILINEAR`), which is what the Hugging Face image processors that models are
/// usually trained with do; plain 4-tap bilinear would alias badly going from 1024 px to 224.
/// An empty image gives the buffer of a black image.
pub fn to_chw(img: &RgbImage, size: u32, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let plane = size as usize * size as usize;
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * std[c]));
    let offset: [f32; 3] = std::array::from_fn(|c| -mean[c] / std[c]);
    if plane == 0 {
        return Vec::new();
    }
    let (w, h) = (img.width() as usize, img.height() as usize);
    let size = size as usize;
    let mut out = resample::resize_u8(img.as_raw(), 3, (w, h), (size, size));
    for (c, chunk) in out.chunks_exact_mut(plane).enumerate() {
        for v in chunk {
            *v = *v * scale[c] + offset[c];
        }
    }
    out
}

/// A dense f32 map (saliency), row-major, `data.len() == width * height`.
///
/// The fields are public for the agents that fill them; every method tolerates a `data` of the
/// wrong length by reading missing values as 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Map {
    pub width: u32,
    pub height: u32,
    pub data: Vec<f32>,
}

impl Map {
    /// Bilinear resize with `align_corners = false` (PyTorch's `interpolate` convention, which
    /// the perception models' training used for their targets); no antialiasing, since maps are
    /// almost always enlarged to image size. Resizing an empty map gives zeros.
    pub fn resize(&self, width: u32, height: u32) -> Map {
        let data = resample::bilinear_planes(
            &self.data,
            1,
            (self.width as usize, self.height as usize),
            (width as usize, height as usize),
        );
        Map {
            width,
            height,
            data,
        }
    }

    /// Largest value; 0 for an empty map. NaNs are ignored.
    pub fn max(&self) -> f32 {
        self.data.iter().copied().fold(0.0f32, f32::max)
    }

    /// Arithmetic mean (accumulated in f64); 0 for an empty map.
    pub fn mean(&self) -> f32 {
        if self.data.is_empty() {
            return 0.0;
        }
        let sum: f64 = self.data.iter().map(|&v| f64::from(v)).sum();
        (sum / self.data.len() as f64) as f32
    }

    /// Fraction of pixels strictly above `t`; 0 for an empty map.
    pub fn area_above(&self, t: f32) -> f32 {
        if self.data.is_empty() {
            return 0.0;
        }
        let above = self.data.iter().filter(|&&v| v > t).count();
        (above as f64 / self.data.len() as f64) as f32
    }

    /// 8-bit grey rendering: `round(clamp(v, 0, 1) * 255)` (NaN becomes 0).
    pub fn to_gray(&self) -> GrayImage {
        GrayImage::from_fn(self.width, self.height, |x, y| {
            let i = y as usize * self.width as usize + x as usize;
            let v = self.data.get(i).copied().unwrap_or(0.0);
            Luma([resample::to_u8(v.clamp(0.0, 1.0) * 255.0)])
        })
    }
}

fn inside(v: u8) -> bool {
    v >= MASK_INSIDE
}

/// Grows a binary mask by `radius` pixels with a square structuring element (chessboard
/// distance ≤ `radius`), returning a strict 0/255 mask.
///
/// Square rather than disk because it is separable (two running-count passes, O(pixels)
/// whatever the radius), and a slightly generous margin is what callers want around a defect.
pub fn dilate(mask: &GrayImage, radius: u32) -> GrayImage {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let mut out = GrayImage::new(mask.width(), mask.height());
    // Only the window around the inside pixels can change: a region is usually a small part
    // of the image, and the mask is image-sized.
    let Some([bx, by, bw, bh]) = inside_bbox(mask) else {
        return out;
    };
    let r = radius as usize;
    let (x0, y0) = (
        (bx as usize).saturating_sub(r),
        (by as usize).saturating_sub(r),
    );
    let x1 = (bx as usize + bw as usize + r).min(w);
    let y1 = (by as usize + bh as usize + r).min(h);
    let (ww, wh) = (x1 - x0, y1 - y0);
    let raw = mask.as_raw();
    let mut binary = Vec::with_capacity(ww * wh);
    for y in y0..y1 {
        binary.extend(raw[y * w + x0..y * w + x1].iter().map(|&v| inside(v)));
    }
    let horizontal = box_any(&binary, ww, wh, r, true);
    let both = box_any(&horizontal, ww, wh, r, false);
    let dst: &mut [u8] = &mut out;
    for (row, y) in both.chunks_exact(ww).zip(y0..y1) {
        for (d, &b) in dst[y * w + x0..y * w + x1].iter_mut().zip(row) {
            *d = if b { 255 } else { 0 };
        }
    }
    out
}

/// Bounding box `[x, y, w, h]` of the pixels that count as inside (see [`MASK_INSIDE`]).
pub fn inside_bbox(mask: &GrayImage) -> Option<[u32; 4]> {
    let w = mask.width() as usize;
    if w == 0 {
        return None;
    }
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for (y, row) in mask.as_raw().chunks_exact(w).enumerate() {
        let Some(first) = row.iter().position(|&v| inside(v)) else {
            continue;
        };
        let last = row.iter().rposition(|&v| inside(v)).unwrap_or(first);
        x0 = x0.min(first);
        x1 = x1.max(last);
        y0 = y0.min(y);
        y1 = y;
    }
    (x0 != usize::MAX).then(|| {
        [
            x0 as u32,
            y0 as u32,
            (x1 - x0 + 1) as u32,
            (y1 - y0 + 1) as u32,
        ]
    })
}

fn box_any(src: &[bool], w: usize, h: usize, r: usize, along_rows: bool) -> Vec<bool> {
    let mut out = vec![false; src.len()];
    let (lines, len) = if along_rows { (h, w) } else { (w, h) };
    let index = |line: usize, k: usize| {
        if along_rows {
            line * w + k
        } else {
            k * w + line
        }
    };
    for line in 0..lines {
        // Running count of true values in the window [k - r, k + r].
        let mut count = 0usize;
        for k in 0..r.min(len) {
            count += usize::from(src[index(line, k)]);
        }
        for k in 0..len {
            if k + r < len {
                count += usize::from(src[index(line, k + r)]);
            }
            if k > r {
                count -= usize::from(src[index(line, k - r - 1)]);
            }
            out[index(line, k)] = count > 0;
        }
    }
    out
}

/// Blend weights for pasting an edit back: `min(1, d / (radius + 1))` where `d` is the
/// Euclidean distance from a mask pixel to the nearest pixel outside the mask, and exactly 0
/// outside the mask.
///
/// Feathering runs inward so every pixel outside the mask keeps its original value (the
/// results contract). The image border does not count as outside: there is no seam to hide
/// there, so a mask touching the border stays opaque up to it. A mask with no outside pixel is
/// all 1.
pub fn feather(mask: &GrayImage, radius: u32) -> Vec<f32> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let raw = mask.as_raw();
    // Larger than any squared distance inside an image, small enough to stay exact in f64.
    const FAR: f64 = 1e15;
    let mut d2: Vec<f64> = raw
        .iter()
        .map(|&v| if inside(v) { FAR } else { 0.0 })
        .collect();
    let mut line = Vec::new();
    let mut scratch = DtScratch::default();
    for x in 0..w {
        line.clear();
        line.extend((0..h).map(|y| d2[y * w + x]));
        distance_transform_1d(&line, &mut scratch);
        for y in 0..h {
            d2[y * w + x] = scratch.out[y];
        }
    }
    for y in 0..h {
        line.clear();
        line.extend_from_slice(&d2[y * w..(y + 1) * w]);
        distance_transform_1d(&line, &mut scratch);
        d2[y * w..(y + 1) * w].copy_from_slice(&scratch.out);
    }
    let ramp = f64::from(radius) + 1.0;
    raw.iter()
        .zip(&d2)
        .map(|(&v, &d)| {
            if !inside(v) {
                0.0
            } else if d >= FAR / 2.0 {
                1.0
            } else {
                (d.sqrt() / ramp).min(1.0) as f32
            }
        })
        .collect()
}

#[derive(Default)]
struct DtScratch {
    v: Vec<usize>,
    z: Vec<f64>,
    out: Vec<f64>,
}

/// Felzenszwalb–Huttenlocher squared distance transform of one line (lower envelope of
/// parabolas), O(n); two passes of it give the exact Euclidean distance transform.
fn distance_transform_1d(f: &[f64], s: &mut DtScratch) {
    let n = f.len();
    s.out.clear();
    s.out.resize(n, 0.0);
    if n == 0 {
        return;
    }
    s.v.clear();
    s.v.resize(n, 0);
    s.z.clear();
    s.z.resize(n + 1, 0.0);
    let mut k = 0usize;
    s.z[0] = f64::NEG_INFINITY;
    s.z[1] = f64::INFINITY;
    for q in 1..n {
        let qf = q as f64;
        loop {
            let p = s.v[k];
            let pf = p as f64;
            let cross = ((f[q] + qf * qf) - (f[p] + pf * pf)) / (2.0 * qf - 2.0 * pf);
            if cross <= s.z[k] && k > 0 {
                k -= 1;
            } else {
                k += 1;
                s.v[k] = q;
                s.z[k] = cross;
                s.z[k + 1] = f64::INFINITY;
                break;
            }
        }
    }
    k = 0;
    for q in 0..n {
        let qf = q as f64;
        while s.z[k + 1] < qf {
            k += 1;
        }
        let p = s.v[k];
        let dq = qf - p as f64;
        s.out[q] = dq * dq + f[p];
    }
}

/// `base = base * (1 - a) + patch * a` per pixel, rounded to nearest, touching only pixels with
/// `a > 0` (so the untouched ones stay bit-identical); `a` is clamped to 1.
///
/// `patch` must have `base`'s size and `alpha` one entry per pixel. A caller bug is not worth
/// a panic mid-job: a patch of another size leaves `base` unchanged, and a short `alpha`
/// blends only the pixels it covers.
pub fn composite(base: &mut RgbImage, patch: &RgbImage, alpha: &[f32]) {
    if base.dimensions() != patch.dimensions() {
        return;
    }
    let base_px = base.as_mut().chunks_exact_mut(3);
    let patch_px = patch.as_raw().chunks_exact(3);
    for ((b, p), &a) in base_px.zip(patch_px).zip(alpha) {
        if a > 0.0 {
            let a = a.min(1.0);
            for c in 0..3 {
                let v = f32::from(b[c]) * (1.0 - a) + f32::from(p[c]) * a;
                b[c] = resample::to_u8(v);
            }
        }
    }
}

/// The bbox `[x, y, w, h]` grown on every side by `margin × max(w, h)` pixels (at least 8),
/// clamped to a `width`×`height` image: the context an inpainting tool gets around a region.
/// A bbox starting outside the image is clamped into it first.
pub fn grow_rect(bbox: [u32; 4], margin: f32, width: u32, height: u32) -> [u32; 4] {
    let [x, y, w, h] = bbox;
    let x = x.min(width);
    let y = y.min(height);
    let grow = if margin.is_finite() && margin > 0.0 {
        (f64::from(margin) * f64::from(w.max(h)))
            .ceil()
            .min(f64::from(u32::MAX)) as u32
    } else {
        0
    };
    let grow = grow.max(8);
    let x0 = x.saturating_sub(grow);
    let y0 = y.saturating_sub(grow);
    let x1 = x.saturating_add(w).saturating_add(grow).min(width);
    let y1 = y.saturating_add(h).saturating_add(grow).min(height);
    [x0, y0, x1 - x0, y1 - y0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, ImageBuffer, Rgb, Rgba};

    const LIMITS: ImageLimits = ImageLimits {
        max_bytes: 10 << 20,
        max_pixels: 4_000_000,
    };

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([
                (x * 7 % 256) as u8,
                (y * 5 % 256) as u8,
                ((x + y) % 256) as u8,
            ])
        })
    }

    fn png_of(img: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png)
            .expect("encode test png");
        out.into_inner()
    }

    fn jpeg_of(img: &RgbImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut out, ImageFormat::Jpeg)
            .expect("encode test jpeg");
        out.into_inner()
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

    fn err_class(r: Result<DecodedImage, JobError>) -> (ErrorClass, String) {
        let e = r.expect_err("expected an error");
        (e.class, e.message)
    }

    #[test]
    fn png_round_trip_is_lossless() {
        let img = gradient(37, 23);
        let bytes = encode_png(&img);
        let decoded = decode(&bytes, &LIMITS).expect("decode");
        assert_eq!(decoded.format, "png");
        assert_eq!(decoded.rgb, img);
    }

    #[test]
    fn gray_png_round_trip() {
        let g = GrayImage::from_fn(9, 4, |x, y| Luma([(x * 20 + y) as u8]));
        let bytes = encode_gray_png(&g);
        let back = image::load_from_memory(&bytes).expect("load").into_luma8();
        assert_eq!(back, g);
    }

    #[test]
    fn mask_png_round_trip() {
        let m = GrayImage::from_fn(64, 48, |x, y| {
            Luma([if (x / 7 + y / 5) % 3 == 0 { 255 } else { 0 }])
        });
        let bytes = encode_mask_png(&m);
        let back = image::load_from_memory(&bytes).expect("load").into_luma8();
        assert_eq!(back, m);
    }

    #[test]
    fn encoding_an_empty_image_does_not_panic() {
        assert!(encode_png(&RgbImage::new(0, 5)).is_empty());
        assert!(encode_gray_png(&GrayImage::new(3, 0)).is_empty());
    }

    #[test]
    fn rgba_png_drops_alpha() {
        let rgba = ImageBuffer::from_fn(4, 3, |x, _| Rgba([x as u8 * 10, 20, 30, (x * 60) as u8]));
        let decoded = decode(&png_of(DynamicImage::ImageRgba8(rgba)), &LIMITS).expect("decode");
        assert_eq!(decoded.rgb.dimensions(), (4, 3));
        assert_eq!(decoded.rgb.get_pixel(2, 1), &Rgb([20, 20, 30]));
    }

    #[test]
    fn sixteen_bit_png_is_reduced_to_eight() {
        let img16: ImageBuffer<Rgb<u16>, Vec<u16>> =
            ImageBuffer::from_fn(3, 2, |x, _| Rgb([x as u16 * 0x1000, 0xFFFF, 0x0101]));
        let decoded = decode(&png_of(DynamicImage::ImageRgb16(img16)), &LIMITS).expect("decode");
        assert_eq!(decoded.rgb.get_pixel(0, 0), &Rgb([0, 255, 1]));
        assert_eq!(decoded.rgb.get_pixel(2, 0)[0], 32);
    }

    #[test]
    fn gray_png_becomes_rgb() {
        let g = GrayImage::from_fn(2, 2, |x, y| Luma([(x * 100 + y * 10) as u8]));
        let decoded = decode(&png_of(DynamicImage::ImageLuma8(g)), &LIMITS).expect("decode");
        assert_eq!(decoded.rgb.get_pixel(1, 1), &Rgb([110, 110, 110]));
    }

    #[test]
    fn jpeg_decodes_close_to_source() {
        let img = RgbImage::from_pixel(32, 16, Rgb([200, 100, 50]));
        let decoded = decode(&jpeg_of(&img), &LIMITS).expect("decode");
        assert_eq!(decoded.format, "jpeg");
        assert_eq!(decoded.rgb.dimensions(), (32, 16));
        let px = decoded.rgb.get_pixel(10, 10);
        for (got, want) in px.0.iter().zip([200u8, 100, 50]) {
            assert!(got.abs_diff(want) <= 4, "{px:?}");
        }
    }

    #[test]
    fn unknown_formats_are_named() {
        let (class, msg) = err_class(decode(b"GIF89a\x01\x00\x01\x00", &LIMITS));
        assert_eq!(class, ErrorClass::UndecodableImage);
        assert!(msg.contains("GIF"), "{msg}");

        let (_, msg) = err_class(decode(b"RIFF\x10\x00\x00\x00WEBPVP8 ", &LIMITS));
        assert!(msg.contains("WebP"), "{msg}");

        let (_, msg) = err_class(decode(b"<html><body>503</body></html>", &LIMITS));
        assert!(msg.contains("HTML"), "{msg}");

        let (class, msg) = err_class(decode(b"", &LIMITS));
        assert_eq!(class, ErrorClass::UndecodableImage);
        assert!(msg.contains("empty"), "{msg}");

        let (_, msg) = err_class(decode(&[0xde, 0xad, 0xbe, 0xef, 0x01], &LIMITS));
        assert!(msg.contains("de ad be ef 01"), "{msg}");
    }

    #[test]
    fn truncated_png_is_undecodable() {
        let bytes = encode_png(&gradient(64, 64));
        for cut in [8, 20, 40, bytes.len() / 2, bytes.len() - 13] {
            let (class, msg) = err_class(decode(&bytes[..cut], &LIMITS));
            assert_eq!(class, ErrorClass::UndecodableImage, "cut {cut}: {msg}");
            assert!(msg.contains("png"), "{msg}");
        }
    }

    #[test]
    fn corrupt_png_data_is_undecodable() {
        let mut bytes = encode_png(&gradient(64, 64));
        let n = bytes.len();
        for b in &mut bytes[60..n - 20] {
            *b ^= 0x5a;
        }
        let (class, _) = err_class(decode(&bytes, &LIMITS));
        assert_eq!(class, ErrorClass::UndecodableImage);
    }

    #[test]
    fn truncated_jpeg_is_undecodable() {
        let bytes = jpeg_of(&gradient(64, 64));
        for cut in [3, 10, 100] {
            let (class, msg) = err_class(decode(&bytes[..cut], &LIMITS));
            assert_eq!(class, ErrorClass::UndecodableImage, "cut {cut}: {msg}");
        }
    }

    #[test]
    fn too_many_bytes_is_too_large() {
        let bytes = encode_png(&gradient(16, 16));
        let limits = ImageLimits {
            max_bytes: bytes.len() as u64 - 1,
            max_pixels: 1 << 30,
        };
        let (class, _) = err_class(decode(&bytes, &limits));
        assert_eq!(class, ErrorClass::ImageTooLarge);
        let exact = ImageLimits {
            max_bytes: bytes.len() as u64,
            ..limits
        };
        assert!(decode(&bytes, &exact).is_ok());
    }

    #[test]
    fn too_many_pixels_is_too_large() {
        let bytes = encode_png(&gradient(20, 10));
        let tight = ImageLimits {
            max_bytes: 1 << 20,
            max_pixels: 199,
        };
        let (class, msg) = err_class(decode(&bytes, &tight));
        assert_eq!(class, ErrorClass::ImageTooLarge);
        assert!(msg.contains("20x10"), "{msg}");
        let exact = ImageLimits {
            max_pixels: 200,
            ..tight
        };
        assert!(decode(&bytes, &exact).is_ok());
    }

    /// A PNG whose header claims 60000×60000 but which carries almost no data: the header check
    /// must refuse it as too large before a decoder ever tries (and fails on truncation).
    #[test]
    fn png_bomb_is_rejected_from_the_header() {
        let mut bytes = encode_png(&gradient(4, 4));
        // IHDR data starts at 16: width (4 bytes), height (4 bytes); CRC after 13 data bytes.
        bytes[16..20].copy_from_slice(&60_000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&60_000u32.to_be_bytes());
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        let (class, msg) = err_class(decode(&bytes, &LIMITS));
        assert_eq!(class, ErrorClass::ImageTooLarge, "{msg}");
        assert!(msg.contains("60000x60000"), "{msg}");
    }

    #[test]
    fn jpeg_bomb_is_rejected_from_the_header() {
        let mut bytes = jpeg_of(&gradient(16, 16));
        let sof = bytes
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("baseline SOF0 marker");
        // SOF0: marker(2) length(2) precision(1) height(2) width(2).
        bytes[sof + 5..sof + 7].copy_from_slice(&50_000u16.to_be_bytes());
        bytes[sof + 7..sof + 9].copy_from_slice(&50_000u16.to_be_bytes());
        let (class, msg) = err_class(decode(&bytes, &LIMITS));
        assert_eq!(class, ErrorClass::ImageTooLarge, "{msg}");
    }

    #[test]
    fn to_chw_normalises_per_channel_in_chw_order() {
        let img = RgbImage::from_pixel(5, 3, Rgb([255, 0, 51]));
        let t = to_chw(&img, 4, [0.5, 0.0, 0.2], [0.5, 1.0, 0.1]);
        assert_eq!(t.len(), 3 * 16);
        assert!(t[..16].iter().all(|&v| (v - 1.0).abs() < 1e-5));
        assert!(t[16..32].iter().all(|&v| v.abs() < 1e-5));
        assert!(t[32..].iter().all(|&v| v.abs() < 1e-5), "{:?}", &t[32..]);
    }

    #[test]
    fn to_chw_keeps_layout_when_size_matches() {
        let img = gradient(6, 6);
        let t = to_chw(&img, 6, [0.0; 3], [1.0; 3]);
        let (x, y) = (4u32, 1u32);
        let i = (y * 6 + x) as usize;
        for c in 0..3 {
            let want = f32::from(img.get_pixel(x, y)[c]) / 255.0;
            assert!((t[c * 36 + i] - want).abs() < 1e-6);
        }
    }

    #[test]
    fn to_chw_stretches_without_letterbox() {
        // Left half black, right half white, wide image: the square result is still split
        // down the middle (a letterbox would add rows of padding instead).
        let img = RgbImage::from_fn(40, 10, |x, _| {
            if x < 20 {
                Rgb([0, 0, 0])
            } else {
                Rgb([255, 255, 255])
            }
        });
        let t = to_chw(&img, 8, [0.0; 3], [1.0; 3]);
        for y in 0..8 {
            assert!(t[y * 8] < 0.05);
            assert!(t[y * 8 + 7] > 0.95);
        }
    }

    #[test]
    fn to_chw_empty_inputs() {
        assert!(to_chw(&gradient(3, 3), 0, [0.0; 3], [1.0; 3]).is_empty());
        let t = to_chw(&RgbImage::new(0, 0), 2, [0.5; 3], [0.25; 3]);
        assert_eq!(t, vec![-2.0; 12]);
    }

    fn map(w: u32, h: u32, data: Vec<f32>) -> Map {
        Map {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn map_resize_matches_half_pixel_bilinear() {
        // PyTorch: F.interpolate([[0, 1]], size=4, mode="bilinear", align_corners=False)
        // gives [0, 0.25, 0.75, 1].
        let m = map(2, 1, vec![0.0, 1.0]).resize(4, 1);
        let want = [0.0, 0.25, 0.75, 1.0];
        for (g, w) in m.data.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{:?}", m.data);
        }
        let v = map(1, 2, vec![0.0, 1.0]).resize(1, 4);
        for (g, w) in v.data.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{:?}", v.data);
        }
    }

    #[test]
    fn map_resize_identity_and_constant() {
        let m = map(3, 2, vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6]);
        assert_eq!(m.resize(3, 2), m);
        let c = map(2, 2, vec![0.7; 4]).resize(13, 9);
        assert_eq!(c.data.len(), 13 * 9);
        assert!(c.data.iter().all(|&v| (v - 0.7).abs() < 1e-6));
    }

    #[test]
    fn map_resize_down_averages_pairs() {
        let m = map(4, 1, vec![0.0, 1.0, 2.0, 3.0]).resize(2, 1);
        assert_eq!(m.data, vec![0.5, 2.5]);
    }

    #[test]
    fn map_resize_empty_and_short_data() {
        let e = map(0, 0, vec![]).resize(3, 2);
        assert_eq!(e.data, vec![0.0; 6]);
        let short = map(2, 1, vec![1.0]).resize(2, 1);
        assert_eq!(short.data, vec![1.0, 0.0]);
    }

    #[test]
    fn map_statistics() {
        let m = map(2, 2, vec![0.1, 0.9, 0.5, 0.5]);
        assert_eq!(m.max(), 0.9);
        assert!((m.mean() - 0.5).abs() < 1e-6);
        assert_eq!(m.area_above(0.5), 0.25);
        assert_eq!(m.area_above(0.0), 1.0);
        let empty = map(0, 0, vec![]);
        assert_eq!(
            (empty.max(), empty.mean(), empty.area_above(0.1)),
            (0.0, 0.0, 0.0)
        );
        assert_eq!(map(1, 2, vec![f32::NAN, 0.3]).max(), 0.3);
    }

    #[test]
    fn map_to_gray_rounds_and_clamps() {
        let m = map(5, 1, vec![-1.0, 0.5, 1.0, 2.0, f32::NAN]);
        let g = m.to_gray();
        assert_eq!(g.as_raw(), &vec![0, 128, 255, 255, 0]);
    }

    fn mask_from(w: u32, h: u32, on: &[(u32, u32)]) -> GrayImage {
        let mut m = GrayImage::new(w, h);
        for &(x, y) in on {
            m.put_pixel(x, y, Luma([255]));
        }
        m
    }

    #[test]
    fn dilate_matches_the_definition_on_scattered_masks() {
        // Chessboard distance <= r to some inside pixel, checked pixel by pixel.
        let (w, h) = (23u32, 17u32);
        for (seed, r) in [(1u32, 0u32), (2, 1), (3, 2), (4, 5), (5, 30)] {
            let on: Vec<(u32, u32)> = (0..4)
                .map(|i| ((seed * 7 + i * 11) % w, (seed * 5 + i * 3) % h))
                .collect();
            let mut mask = mask_from(w, h, &on);
            mask.put_pixel(0, 0, Luma([MASK_INSIDE - 1])); // below the split: outside
            let d = dilate(&mask, r);
            for (x, y, p) in d.enumerate_pixels() {
                let near = on
                    .iter()
                    .any(|&(ox, oy)| ox.abs_diff(x) <= r && oy.abs_diff(y) <= r);
                assert_eq!(p[0], if near { 255 } else { 0 }, "r {r} at ({x},{y})");
            }
        }
        assert_eq!(dilate(&GrayImage::new(5, 4), 3), GrayImage::new(5, 4));
    }

    #[test]
    fn bbox_of_the_inside_pixels() {
        let mut m = GrayImage::new(10, 10);
        assert_eq!(inside_bbox(&m), None);
        m.put_pixel(2, 3, Luma([255]));
        m.put_pixel(5, 7, Luma([MASK_INSIDE]));
        m.put_pixel(9, 9, Luma([MASK_INSIDE - 1]));
        assert_eq!(inside_bbox(&m), Some([2, 3, 4, 5]));
        assert_eq!(inside_bbox(&GrayImage::new(0, 0)), None);
    }

    #[test]
    fn dilate_is_a_square() {
        let m = mask_from(9, 9, &[(4, 4)]);
        let d = dilate(&m, 2);
        for y in 0..9 {
            for x in 0..9 {
                let want = (2..=6).contains(&x) && (2..=6).contains(&y);
                assert_eq!(d.get_pixel(x, y)[0] == 255, want, "({x},{y})");
                assert!(matches!(d.get_pixel(x, y)[0], 0 | 255));
            }
        }
        assert_eq!(dilate(&m, 0), m);
    }

    #[test]
    fn dilate_clips_at_border_and_binarises() {
        let mut m = mask_from(5, 3, &[(0, 0)]);
        m.put_pixel(4, 2, Luma([100])); // below the midpoint: outside
        let d = dilate(&m, 1);
        let on: Vec<(u32, u32)> = d
            .enumerate_pixels()
            .filter(|p| p.2[0] == 255)
            .map(|p| (p.0, p.1))
            .collect();
        assert_eq!(on, vec![(0, 0), (1, 0), (0, 1), (1, 1)]);
        let big = dilate(&m, 100);
        assert!(big.as_raw().iter().all(|&v| v == 255));
    }

    #[test]
    fn feather_ramps_inward_and_is_zero_outside() {
        // A 11x11 square inside a 21x21 image.
        let mut m = GrayImage::new(21, 21);
        for y in 5..16 {
            for x in 5..16 {
                m.put_pixel(x, y, Luma([255]));
            }
        }
        let a = feather(&m, 2);
        let at = |x: usize, y: usize| a[y * 21 + x];
        assert_eq!(at(4, 10), 0.0);
        assert_eq!(at(0, 0), 0.0);
        assert!((at(5, 10) - 1.0 / 3.0).abs() < 1e-6);
        assert!((at(6, 10) - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(at(7, 10), 1.0);
        assert_eq!(at(10, 10), 1.0);
        // Corner pixel: nearest outside pixel is the orthogonal neighbour (distance 1).
        assert!((at(5, 5) - 1.0 / 3.0).abs() < 1e-6);
        // One step diagonally in from the corner: the nearest outside pixels, (4,6) and
        // (6,4), are 2 away.
        assert!((at(6, 6) - 2.0 / 3.0).abs() < 1e-6);
        for (i, &v) in a.iter().enumerate() {
            let px = m.as_raw()[i];
            assert_eq!(px == 0, v == 0.0, "pixel {i}");
            assert!((0.0..=1.0).contains(&v));
        }
    }

    #[test]
    fn feather_uses_euclidean_distance() {
        // Only one outside pixel at (0,0): (3,4) is exactly 5 away.
        let mut m = GrayImage::from_pixel(8, 8, Luma([255]));
        m.put_pixel(0, 0, Luma([0]));
        let a = feather(&m, 9);
        assert!((a[4 * 8 + 3] - 0.5).abs() < 1e-6);
        assert_eq!(a[0], 0.0);
    }

    #[test]
    fn feather_treats_image_border_as_inside() {
        let full = GrayImage::from_pixel(6, 4, Luma([255]));
        assert!(feather(&full, 3).iter().all(|&v| v == 1.0));
        let none = GrayImage::new(6, 4);
        assert!(feather(&none, 3).iter().all(|&v| v == 0.0));
        assert!(feather(&GrayImage::new(0, 0), 2).is_empty());
    }

    #[test]
    fn composite_blends_only_where_alpha_positive() {
        let mut base = RgbImage::from_pixel(3, 1, Rgb([100, 0, 255]));
        let patch = RgbImage::from_pixel(3, 1, Rgb([201, 255, 0]));
        composite(&mut base, &patch, &[0.0, 0.5, 1.0]);
        assert_eq!(base.get_pixel(0, 0), &Rgb([100, 0, 255]));
        // 100*0.5 + 201*0.5 = 150.5 rounds to 151 (half away from zero); 127.5 -> 128.
        assert_eq!(base.get_pixel(1, 0), &Rgb([151, 128, 128]));
        assert_eq!(base.get_pixel(2, 0), &Rgb([201, 255, 0]));
    }

    #[test]
    fn composite_tolerates_mismatched_inputs() {
        let mut base = RgbImage::from_pixel(2, 1, Rgb([10, 10, 10]));
        composite(&mut base, &RgbImage::new(3, 1), &[1.0, 1.0, 1.0]);
        assert_eq!(base.get_pixel(0, 0), &Rgb([10, 10, 10]));
        composite(&mut base, &RgbImage::new(2, 1), &[1.0]);
        assert_eq!(base.get_pixel(0, 0), &Rgb([0, 0, 0]));
        assert_eq!(base.get_pixel(1, 0), &Rgb([10, 10, 10]));
    }

    #[test]
    fn composite_ignores_nan_and_clamps_alpha() {
        let mut base = RgbImage::from_pixel(2, 1, Rgb([10, 10, 10]));
        let patch = RgbImage::from_pixel(2, 1, Rgb([90, 90, 90]));
        composite(&mut base, &patch, &[f32::NAN, 7.0]);
        assert_eq!(base.get_pixel(0, 0), &Rgb([10, 10, 10]));
        assert_eq!(base.get_pixel(1, 0), &Rgb([90, 90, 90]));
    }

    #[test]
    fn grow_rect_grows_and_clamps() {
        // margin 0.25 of 40 = 10 px each side.
        assert_eq!(
            grow_rect([50, 60, 40, 20], 0.25, 200, 200),
            [40, 50, 60, 40]
        );
        // Minimum of 8 px.
        assert_eq!(grow_rect([50, 60, 4, 4], 0.1, 200, 200), [42, 52, 20, 20]);
        assert_eq!(
            grow_rect([50, 60, 4, 4], f32::NAN, 200, 200),
            [42, 52, 20, 20]
        );
        // Clamped at all edges.
        assert_eq!(grow_rect([2, 3, 10, 10], 1.0, 15, 14), [0, 0, 15, 14]);
        // Starting outside the image.
        assert_eq!(grow_rect([500, 500, 10, 10], 0.0, 100, 50), [92, 42, 8, 8]);
        assert_eq!(
            grow_rect([0, 0, u32::MAX, u32::MAX], 2.0, 10, 10),
            [0, 0, 10, 10]
        );
        assert_eq!(grow_rect([0, 0, 5, 5], 0.5, 0, 0), [0, 0, 0, 0]);
    }

    #[test]
    fn jpeg_cut_inside_the_image_data_is_undecodable() {
        let bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/astronaut-blemished.jpg"
        ))
        .unwrap();
        let limits = ImageLimits {
            max_bytes: 1 << 30,
            max_pixels: 1 << 30,
        };
        assert!(decode(&bytes, &limits).is_ok());
        for cut in [bytes.len() / 3, bytes.len() / 2, bytes.len() - 2] {
            let err = decode(&bytes[..cut], &limits).unwrap_err();
            assert_eq!(err.class, ErrorClass::UndecodableImage, "cut at {cut}");
            assert!(err.message.contains("truncated jpeg"), "{}", err.message);
        }
    }
}
