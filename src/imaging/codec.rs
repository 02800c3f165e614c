//! Untrusted bytes in, lossless PNG out: guarded decoding of PNG/JPEG input (format sniffing,
//! byte and pixel limits checked from the header before any buffer is allocated, truncation
//! caught), the metadata a result keeps (colour profile, EXIF, text), and the PNG encoders of
//! the result set.

use std::io::Cursor;

use image::codecs::png::PngEncoder;
use image::RgbImage;
use image::{
    DynamicImage, ExtendedColorType, GrayImage, ImageDecoder, ImageEncoder, ImageError,
    ImageFormat, ImageReader,
};

use super::original::Original;
use crate::error::{ErrorClass, JobError};

/// Upper bounds on what [`decode`] accepts, so hostile input cannot exhaust memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted encoded size, in bytes.
    pub max_bytes: u64,
    /// Largest accepted width × height, checked from the header before any pixel is decoded.
    pub max_pixels: u64,
}

/// A decoded input image: the 8-bit RGB the agents work on, the container it came in, and what
/// the result keeps of it beyond that (alpha, 16-bit samples, metadata; see [`Original`]).
#[derive(Clone, Debug)]
pub struct DecodedImage {
    pub rgb: RgbImage,
    /// `"png"` or `"jpeg"`, as reported in diagnostics.
    pub format: &'static str,
    pub original: Original,
}

/// Metadata of the input that the retouched PNG carries over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metadata {
    /// PNG input: the ancillary chunks in [`KEPT_PNG_CHUNKS`], whole (length, type, data, CRC),
    /// in input order.
    pub png_chunks: Vec<Vec<u8>>,
    /// JPEG input: the ICC profile (written as `iCCP`).
    pub icc_profile: Option<Vec<u8>>,
    /// JPEG input: the EXIF block (written as `eXIf`).
    pub exif: Option<Vec<u8>>,
}

/// The PNG chunks a result keeps: how to interpret the colours (`iCCP`, `sRGB`, `gAMA`, `cHRM`,
/// `cICP`, and the HDR `mDCV`, `cLLI`), the physical pixel size (`pHYs`), text (`tEXt`, `zTXt`,
/// `iTXt`: generators write their parameters there) and EXIF (`eXIf`). The retouched pixels are
/// in the same colour space as the input's, so the colour chunks stay true. Dropped: what no
/// longer describes the output (`tRNS`, `PLTE`, `sBIT`, `bKGD`, `hIST`, `sPLT`: the output is
/// truecolour with an explicit alpha channel), `tIME` (the image was modified), animation
/// (`acTL`, `fcTL`, `fdAT`: the first frame is retouched), and chunks this code does not know.
pub const KEPT_PNG_CHUNKS: [&[u8; 4]; 12] = [
    b"iCCP", b"sRGB", b"gAMA", b"cHRM", b"cICP", b"mDCV", b"cLLI", b"pHYs", b"tEXt", b"zTXt",
    b"iTXt", b"eXIf",
];

/// At most this much metadata is carried over (an ICC profile is a few KiB to a few MiB); chunks
/// beyond it are dropped.
pub const MAX_METADATA_BYTES: usize = 8 << 20;

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
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| decode_error(name, "header", e))?;
    let metadata = match format {
        ImageFormat::Png => Metadata {
            png_chunks: png_metadata(bytes),
            ..Metadata::default()
        },
        // A profile or EXIF block the decoder cannot read is dropped: it must not cost the job.
        _ => Metadata {
            icc_profile: decoder.icc_profile().ok().flatten(),
            exif: decoder.exif_metadata().ok().flatten(),
            ..Metadata::default()
        },
    };
    let image = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(name, "data", e))?;
    let (rgb, original) = Original::split(image, metadata);
    Ok(DecodedImage {
        rgb,
        format: name,
        original,
    })
}

/// The chunks of [`KEPT_PNG_CHUNKS`] in a PNG stream, whole and with a correct CRC, up to
/// [`MAX_METADATA_BYTES`] in all. Walks the chunk list from the signature to `IEND` and stops at
/// the first chunk that does not fit the data.
fn png_metadata(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut kept = Vec::new();
    let mut total = 0usize;
    let mut at = PNG_MAGIC.len();
    while let Some(head) = bytes.get(at..at + 8) {
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let kind = &head[4..8];
        let Some(chunk) = at
            .checked_add(12)
            .and_then(|end| end.checked_add(len))
            .and_then(|end| bytes.get(at..end))
        else {
            break;
        };
        if kind == b"IEND" {
            break;
        }
        let (body, crc) = chunk[4..].split_at(len + 4);
        let crc_ok = crc32fast::hash(body).to_be_bytes() == crc;
        if KEPT_PNG_CHUNKS.iter().any(|k| k.as_slice() == kind)
            && crc_ok
            && total + chunk.len() <= MAX_METADATA_BYTES
        {
            total += chunk.len();
            kept.push(chunk.to_vec());
        }
        at += chunk.len();
    }
    kept
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

/// Encodes a retouched image (`Rgb8`, `Rgba8`, `Rgb16` or `Rgba16`; 16-bit samples in native
/// byte order) as PNG with the input's metadata: a JPEG's profile and EXIF through the encoder,
/// a PNG's kept chunks copied whole right after `IHDR` (where every one of them may stand).
pub(super) fn encode_with_metadata(
    raw: &[u8],
    width: u32,
    height: u32,
    color: ExtendedColorType,
    metadata: &Metadata,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    );
    // The PNG encoder takes both; it never refuses them.
    if let Some(icc) = &metadata.icc_profile {
        let _ = encoder.set_icc_profile(icc.clone());
    }
    if let Some(exif) = &metadata.exif {
        let _ = encoder.set_exif_metadata(exif.clone());
    }
    if encoder.write_image(raw, width, height, color).is_err() {
        return Vec::new();
    }
    // Signature (8) + IHDR (4 length, 4 type, 13 data, 4 CRC).
    const AFTER_IHDR: usize = 33;
    if !metadata.png_chunks.is_empty() && out.get(12..16) == Some(b"IHDR".as_slice()) {
        let tail = out.split_off(AFTER_IHDR);
        for chunk in &metadata.png_chunks {
            out.extend_from_slice(chunk);
        }
        out.extend_from_slice(&tail);
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, ImageBuffer, Luma, Rgb, Rgba};

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
    fn rgba_png_gives_the_agents_straight_colour_and_keeps_its_alpha() {
        let rgba = ImageBuffer::from_fn(4, 3, |x, _| Rgba([x as u8 * 10, 20, 30, (x * 60) as u8]));
        let decoded = decode(&png_of(DynamicImage::ImageRgba8(rgba)), &LIMITS).expect("decode");
        assert_eq!(decoded.rgb.dimensions(), (4, 3));
        assert_eq!(decoded.rgb.get_pixel(2, 1), &Rgb([20, 20, 30]));
        assert_eq!(
            decoded.original.layout(),
            super::super::original::Layout::Rgba8
        );
    }

    #[test]
    fn sixteen_bit_png_gives_the_agents_eight_bits_and_keeps_sixteen() {
        let img16: ImageBuffer<Rgb<u16>, Vec<u16>> =
            ImageBuffer::from_fn(3, 2, |x, _| Rgb([x as u16 * 0x1000, 0xFFFF, 0x0101]));
        let decoded = decode(&png_of(DynamicImage::ImageRgb16(img16)), &LIMITS).expect("decode");
        assert_eq!(decoded.rgb.get_pixel(0, 0), &Rgb([0, 255, 1]));
        assert_eq!(decoded.rgb.get_pixel(2, 0)[0], 32);
        assert_eq!(
            decoded.original.layout(),
            super::super::original::Layout::Rgb16
        );
    }

    /// A PNG chunk, whole: length, type, data, CRC.
    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc32fast::hash(&out[4..]).to_be_bytes());
        out
    }

    /// The chunk types of a PNG stream, in order.
    fn chunk_types(png: &[u8]) -> Vec<String> {
        let mut types = Vec::new();
        let mut at = 8;
        while at + 8 <= png.len() {
            let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
            types.push(String::from_utf8_lossy(&png[at + 4..at + 8]).into_owned());
            at += len + 12;
        }
        types
    }

    #[test]
    fn png_metadata_is_carried_over_and_stale_chunks_are_dropped() {
        let icc = b"not really a profile, but bytes to carry".to_vec();
        let img = gradient(6, 4);
        let mut png = Vec::new();
        let mut encoder = PngEncoder::new(&mut png);
        encoder.set_icc_profile(icc.clone()).unwrap();
        encoder
            .write_image(img.as_raw(), 6, 4, ExtendedColorType::Rgb8)
            .unwrap();
        let text = chunk(b"tEXt", b"parameters\0a cat, steps 30, cfg 7");
        let time = chunk(b"tIME", &[7, 234, 1, 2, 3, 4, 5]);
        let mut corrupt = chunk(b"tEXt", b"Comment\0flipped");
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        let tail = png.split_off(33);
        for c in [&text, &time, &corrupt] {
            png.extend_from_slice(c);
        }
        png.extend_from_slice(&tail);
        assert_eq!(
            chunk_types(&png),
            ["IHDR", "tEXt", "tIME", "tEXt", "iCCP", "IDAT", "IEND"]
        );

        let decoded = decode(&png, &LIMITS).expect("decode");
        assert_eq!(decoded.rgb, img);
        let kept = &decoded.original.metadata().png_chunks;
        assert_eq!(kept.len(), 2, "the intact tEXt and iCCP");
        assert_eq!(kept[0], text);

        let out = decoded.original.encode(&decoded.rgb);
        assert_eq!(
            chunk_types(&out),
            ["IHDR", "tEXt", "iCCP", "IDAT", "IEND"],
            "kept chunks right after IHDR, tIME and the corrupt chunk dropped"
        );
        let mut decoder = image::codecs::png::PngDecoder::new(Cursor::new(&out)).unwrap();
        assert_eq!(decoder.icc_profile().unwrap(), Some(icc));
        assert_eq!(DynamicImage::from_decoder(decoder).unwrap().to_rgb8(), img);
    }

    #[test]
    fn jpeg_profile_and_exif_are_carried_over() {
        let icc = b"an icc profile".to_vec();
        // A minimal big-endian TIFF header with no entries.
        let exif = b"MM\0*\0\0\0\x08\0\0".to_vec();
        let img = gradient(16, 8);
        let mut jpeg = Vec::new();
        let mut encoder = image::codecs::jpeg::JpegEncoder::new(&mut jpeg);
        encoder.set_icc_profile(icc.clone()).unwrap();
        encoder.set_exif_metadata(exif.clone()).unwrap();
        encoder
            .write_image(img.as_raw(), 16, 8, ExtendedColorType::Rgb8)
            .unwrap();
        let decoded = decode(&jpeg, &LIMITS).expect("decode");
        assert_eq!(decoded.original.metadata().icc_profile, Some(icc.clone()));
        assert_eq!(decoded.original.metadata().exif, Some(exif.clone()));
        let out = decoded.original.encode(&decoded.rgb);
        let mut decoder = image::codecs::png::PngDecoder::new(Cursor::new(&out)).unwrap();
        assert_eq!(decoder.icc_profile().unwrap(), Some(icc));
        assert_eq!(decoder.exif_metadata().unwrap(), Some(exif));
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
