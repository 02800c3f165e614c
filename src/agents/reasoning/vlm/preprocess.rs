//! The image as the VLM's vision encoder takes it (transformers' `Qwen2VLImageProcessor`, the
//! PIL path): smart resize to multiples of `patch_size × merge_size` within the bundle's pixel
//! bounds, PIL's bicubic resampling on the 8-bit image (ported exactly, so the pixels and hence
//! the tokens equal the reference's on any image), rescale and CLIP normalisation, and the
//! patchify permutation into `[patches, channels × temporal × patch²]` rows.

use image::RgbImage;

use super::spec::VlmSpec;

/// The vision encoder's input for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionInput {
    /// `[patches, 3 × temporal_patch_size × patch_size²]`, row-major.
    pub pixel_values: Vec<f32>,
    /// `(t, h, w)` in patches.
    pub grid: [i64; 3],
    /// `(width, height)` of the resized image.
    pub resized: (u32, u32),
}

impl VisionInput {
    /// Values per patch row.
    pub fn row_len(&self) -> usize {
        self.pixel_values.len() / self.patches().max(1)
    }

    pub fn patches(&self) -> usize {
        (self.grid[0] * self.grid[1] * self.grid[2]) as usize
    }

    /// Image tokens after merging `merge × merge` patches.
    pub fn tokens(&self, merge: u32) -> usize {
        self.patches() / (merge as usize * merge as usize)
    }
}

/// Why an image cannot be shown to the VLM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("image {width}x{height} cannot be shown to the VLM: {reason}")]
pub struct Unsupported {
    pub width: u32,
    pub height: u32,
    pub reason: String,
}

/// Qwen2-VL's `smart_resize`: `(height, width)` as multiples of `factor` with an area within
/// `[min_pixels, max_pixels]`, rounding half to even as Python's `round`.
pub fn smart_resize(
    height: u32,
    width: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32), Unsupported> {
    let unsupported = |reason: String| Unsupported {
        width,
        height,
        reason,
    };
    if height < factor || width < factor {
        return Err(unsupported(format!(
            "each side must be at least {factor} pixels"
        )));
    }
    let (h, w, f) = (f64::from(height), f64::from(width), f64::from(factor));
    if h.max(w) / h.min(w) > 200.0 {
        return Err(unsupported("aspect ratio above 200".into()));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as u32, w_bar as u32))
}

/// Pre-processes one 8-bit RGB image.
pub fn preprocess(image: &RgbImage, spec: &VlmSpec) -> Result<VisionInput, Unsupported> {
    let (patch, merge, temporal) = (
        spec.patch_size as usize,
        spec.merge_size as usize,
        spec.temporal_patch_size as usize,
    );
    let (width, height) = image.dimensions();
    let (rh, rw) = smart_resize(
        height,
        width,
        spec.patch_size * spec.merge_size,
        spec.min_pixels,
        spec.max_pixels,
    )?;
    let resized;
    let pixels = if (rw, rh) == (width, height) {
        image
    } else {
        resized = resize_bicubic(image, rw, rh);
        &resized
    };
    // Rescale then normalise as the processor does: f32(f64(u8) / 255), then f32 arithmetic.
    let scale: [f32; 256] = std::array::from_fn(|v| (v as f64 * (1.0 / 255.0)) as f32);
    let normalised: [[f32; 256]; 3] =
        std::array::from_fn(|c| std::array::from_fn(|v| (scale[v] - spec.mean[c]) / spec.std[c]));
    let (gh, gw) = (rh as usize / patch, rw as usize / patch);
    let row_len = 3 * temporal * patch * patch;
    let mut pixel_values = Vec::with_capacity(gh * gw * row_len);
    let raw = pixels.as_raw();
    let stride = rw as usize * 3;
    // Rows: merged tokens row-major, within one the merge x merge patches row-major; each row
    // is channel, frame (the one image repeated), patch_size x patch_size.
    for bh in 0..gh / merge {
        for bw in 0..gw / merge {
            for mh in 0..merge {
                for mw in 0..merge {
                    let (py0, px0) = ((bh * merge + mh) * patch, (bw * merge + mw) * patch);
                    for (c, table) in normalised.iter().enumerate() {
                        for _frame in 0..temporal {
                            for y in py0..py0 + patch {
                                let line = &raw[y * stride..];
                                pixel_values.extend(
                                    (px0..px0 + patch).map(|x| table[line[x * 3 + c] as usize]),
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(VisionInput {
        pixel_values,
        grid: [1, gh as i64, gw as i64],
        resized: (rw, rh),
    })
}

/// Fixed-point precision of PIL's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Keys' cubic convolution kernel with a = -0.5 (PIL's `bicubic_filter`).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis: per output sample, the
/// first source index and the fixed-point weights of the consecutive sources from there.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f32 as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C casts truncate toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
            let weights: Vec<f64> = (0..xmax.max(0))
                .map(|x| bicubic(((x + xmin) as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let scaled = w * f64::from(1u32 << PRECISION_BITS);
                    if w < 0.0 {
                        (-0.5 + scaled) as i32
                    } else {
                        (0.5 + scaled) as i32
                    }
                })
                .collect();
            (xmin as usize, fixed)
        })
        .collect()
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// `Image.resize((width, height), Image.BICUBIC)` of Pillow on an 8-bit RGB image, bit for bit:
/// a horizontal pass then a vertical one, each rounded and clamped to 8 bits; an axis whose size
/// does not change is not resampled.
pub fn resize_bicubic(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (sw, sh) = (image.width() as usize, image.height() as usize);
    let (dw, dh) = (width as usize, height as usize);
    if dw == 0 || dh == 0 || sw == 0 || sh == 0 {
        return RgbImage::new(width, height);
    }
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut rows = image.as_raw().clone();
    let mut row_width = sw;
    if dw != sw {
        let coeffs = coefficients(sw, dw);
        let mut out = vec![0u8; dw * sh * 3];
        for y in 0..sh {
            let src = &rows[y * sw * 3..(y + 1) * sw * 3];
            let dst = &mut out[y * dw * 3..(y + 1) * dw * 3];
            for (xx, (xmin, k)) in coeffs.iter().enumerate() {
                for c in 0..3 {
                    let mut ss = half;
                    for (x, &w) in k.iter().enumerate() {
                        ss += i32::from(src[(xmin + x) * 3 + c]) * w;
                    }
                    dst[xx * 3 + c] = clip8(ss);
                }
            }
        }
        rows = out;
        row_width = dw;
    }
    if dh != sh {
        let coeffs = coefficients(sh, dh);
        let line = row_width * 3;
        let mut out = vec![0u8; dh * line];
        for (yy, (ymin, k)) in coeffs.iter().enumerate() {
            let dst = &mut out[yy * line..(yy + 1) * line];
            for (i, d) in dst.iter_mut().enumerate() {
                let mut ss = half;
                for (y, &w) in k.iter().enumerate() {
                    ss += i32::from(rows[(ymin + y) * line + i]) * w;
                }
                *d = clip8(ss);
            }
        }
        rows = out;
    }
    RgbImage::from_raw(width, height, rows).unwrap_or_else(|| RgbImage::new(width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_the_documented_sizes() {
        let r = |w, h| smart_resize(h, w, 28, 3136, 200704).map(|(h, w)| (w, h));
        assert_eq!(r(224, 224), Ok((224, 224)));
        assert_eq!(r(300, 200), Ok((308, 196)));
        assert_eq!(r(640, 480), Ok((504, 364)));
        assert_eq!(r(28, 28), Ok((56, 56)));
        assert_eq!(r(600, 42), Ok((588, 56)));
        assert!(r(27, 100).is_err());
        assert!(r(28 * 201, 28).unwrap_err().reason.contains("aspect"));
    }

    #[test]
    fn rounding_is_half_to_even() {
        // 42 / 28 = 1.5 -> 2 (even), 70 / 28 = 2.5 -> 2 (even).
        assert_eq!(smart_resize(42, 70, 28, 1, 1 << 30), Ok((56, 56)));
    }

    #[test]
    fn resampling_keeps_flat_images_flat_and_the_size() {
        let flat = RgbImage::from_pixel(37, 23, image::Rgb([200, 10, 99]));
        for (w, h) in [(56, 28), (14, 9), (37, 50), (80, 23)] {
            let out = resize_bicubic(&flat, w, h);
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| p.0 == [200, 10, 99]), "{w}x{h}");
        }
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(300, 308), (640, 504), (480, 364), (10, 3)] {
            for (_, k) in coefficients(i, o) {
                let sum: i32 = k.iter().sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i32,
                    "{i}->{o}"
                );
            }
        }
    }
}
