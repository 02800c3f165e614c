//! Separable resampling in f32 planes (CHW): the triangle (bilinear) filter with half-pixel
//! centres, widened by the scale when shrinking so every source pixel contributes (PIL's
//! `BILINEAR`, `image`'s `FilterType::Triangle`).
//!
//! Pre-processing resizes and normalises in one pass from the 8-bit pixels, and
//! post-processing resizes the model's float output before quantising it once, instead of
//! resizing 8-bit images (rounding twice) and converting them afterwards.

/// Filter taps of one output coordinate: the first source index and one weight per
/// consecutive source pixel from there, summing to 1.
type Taps = (usize, Vec<f32>);

/// Triangle-filter taps from `src` to `dst` samples along one axis. Near the edges the weights
/// that would fall outside are dropped and the rest renormalised (edge clamping). `widen`:
/// shrinking widens the filter to the scale (antialiased); without it the filter stays two
/// taps wide, plain bilinear interpolation at any scale.
fn triangle_taps(src: usize, dst: usize, widen: bool) -> Vec<Taps> {
    let scale = src as f64 / dst as f64;
    // The filter's radius in source pixels: 1 when enlarging, the scale when shrinking.
    let support = if widen { scale.max(1.0) } else { 1.0 };
    (0..dst)
        .map(|i| {
            let centre = (i as f64 + 0.5) * scale;
            let lo = (centre - support).floor().max(0.0) as usize;
            let hi = ((centre + support).ceil() as usize).min(src);
            let mut weights: Vec<f32> = (lo..hi)
                .map(|j| (1.0 - ((j as f64 + 0.5) - centre).abs() / support).max(0.0) as f32)
                .collect();
            let sum: f32 = weights.iter().sum();
            if sum > 0.0 {
                weights.iter_mut().for_each(|w| *w /= sum);
            } else {
                // Cannot happen for src > 0 (the nearest pixel is always inside the support),
                // but a degenerate axis takes its nearest pixel rather than producing zeros.
                let nearest = (centre.floor() as usize).min(src.saturating_sub(1));
                return (nearest, vec![1.0]);
            }
            (lo, weights)
        })
        .collect()
}

/// Resizes interleaved 8-bit pixels (`channels` per pixel, `sw`×`sh`) to CHW f32 planes of
/// `dw`×`dh` with the widened triangle filter, values 0..=255. Reads the pixels in place: no
/// intermediate planes at the source size.
pub fn resize_u8(
    raw: &[u8],
    channels: usize,
    (sw, sh): (usize, usize),
    (dw, dh): (usize, usize),
) -> Vec<f32> {
    if raw.len() < channels * sw * sh {
        return vec![0.0; channels * dw * dh];
    }
    resize_with(
        |c, y, x| f32::from(raw[(y * sw + x) * channels + c]),
        channels,
        (sw, sh),
        (dw, dh),
        true,
    )
}

/// Resizes `channels` CHW planes of `sw`×`sh` to `dw`×`dh` with the widened triangle filter.
/// An empty source gives zeros; a `src` shorter than the planes reads as 0.
pub fn resize_planes(
    src: &[f32],
    channels: usize,
    from: (usize, usize),
    to: (usize, usize),
) -> Vec<f32> {
    planes(src, channels, from, to, true)
}

/// [`resize_planes`] with plain bilinear interpolation (two taps per axis at any scale, no
/// antialiasing when shrinking): PyTorch's `interpolate(mode="bilinear", align_corners=False)`.
pub fn bilinear_planes(
    src: &[f32],
    channels: usize,
    from: (usize, usize),
    to: (usize, usize),
) -> Vec<f32> {
    planes(src, channels, from, to, false)
}

fn planes(
    src: &[f32],
    channels: usize,
    (sw, sh): (usize, usize),
    to: (usize, usize),
    widen: bool,
) -> Vec<f32> {
    let n = channels * sw * sh;
    if src.len() < n {
        let mut padded = src.to_vec();
        padded.resize(n, 0.0);
        return planes(&padded, channels, (sw, sh), to, widen);
    }
    if (sw, sh) == to {
        return src[..n].to_vec();
    }
    resize_with(
        |c, y, x| src[(c * sh + y) * sw + x],
        channels,
        (sw, sh),
        to,
        widen,
    )
}

/// The separable resize: every source row to the output width, then columns. `sample(c, y, x)`
/// reads the source (always in bounds).
fn resize_with(
    sample: impl Fn(usize, usize, usize) -> f32,
    channels: usize,
    (sw, sh): (usize, usize),
    (dw, dh): (usize, usize),
    widen: bool,
) -> Vec<f32> {
    let mut out = vec![0.0f32; channels * dw * dh];
    if sw == 0 || sh == 0 || dw == 0 || dh == 0 {
        return out;
    }
    let xt = triangle_taps(sw, dw, widen);
    let yt = triangle_taps(sh, dh, widen);
    // Only the source rows some output row uses.
    let (y_lo, y_hi) = yt.iter().fold((usize::MAX, 0), |(lo, hi), (start, w)| {
        (lo.min(*start), hi.max(start + w.len()))
    });
    let mut rows = vec![0.0f32; channels * sh * dw];
    for c in 0..channels {
        for y in y_lo..y_hi {
            let row = &mut rows[(c * sh + y) * dw..][..dw];
            for (o, (start, weights)) in row.iter_mut().zip(&xt) {
                *o = weights
                    .iter()
                    .enumerate()
                    .map(|(k, w)| w * sample(c, y, start + k))
                    .sum();
            }
        }
    }
    // Then columns, one output row at a time (the inner loop runs along contiguous rows).
    for c in 0..channels {
        for (y, (start, weights)) in yt.iter().enumerate() {
            let out_row = &mut out[(c * dh + y) * dw..][..dw];
            for (k, &w) in weights.iter().enumerate() {
                let row = &rows[(c * sh + start + k) * dw..][..dw];
                for (o, &v) in out_row.iter_mut().zip(row) {
                    *o += w * v;
                }
            }
        }
    }
    out
}

/// Rounds a value in 0..=255 to the nearest 8-bit level (halves up); anything outside is
/// clamped and NaN becomes 0. `f32::round` is a library call on baseline x86-64; this is not.
#[inline]
pub fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 255.0) + 0.5) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{imageops, RgbImage};

    /// Interleaved 8-bit pixels (`channels` per pixel) as CHW f32 planes, values 0..=255.
    fn planes_u8(raw: &[u8], channels: usize) -> Vec<f32> {
        let n = raw.len() / channels.max(1);
        let mut out = vec![0.0f32; n * channels];
        for (i, px) in raw.chunks_exact(channels.max(1)).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                out[c * n + i] = f32::from(v);
            }
        }
        out
    }

    #[test]
    fn taps_sum_to_one_and_stay_inside() {
        for (src, dst) in [(1, 7), (7, 1), (10, 3), (3, 10), (512, 224), (97, 512)] {
            for (start, w) in triangle_taps(src, dst, true) {
                assert!(start + w.len() <= src, "{src}->{dst}");
                assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{src}->{dst}");
                assert!(w.iter().all(|&v| v >= 0.0));
            }
        }
    }

    #[test]
    fn enlarging_is_half_pixel_bilinear() {
        // 2 -> 4: output centres at 0.25, 0.75, 1.25, 1.75 in source pixels.
        let out = resize_planes(&[0.0, 100.0], 1, (2, 1), (4, 1));
        assert_eq!(out, vec![0.0, 25.0, 75.0, 100.0]);
    }

    #[test]
    fn shrinking_averages_every_source_pixel() {
        // 4 -> 2: each output is the triangle-weighted mean over its widened support.
        let out = resize_planes(&[0.0, 0.0, 100.0, 100.0], 1, (4, 1), (2, 1));
        assert!(out[0] < 25.0 && out[1] > 75.0, "{out:?}");
        assert!((out[0] + out[1] - 100.0).abs() < 1e-4);
        // A single hot pixel is never lost, however far it shrinks.
        let mut one = vec![0.0f32; 100];
        one[37] = 255.0;
        assert!(resize_planes(&one, 1, (100, 1), (3, 1))
            .iter()
            .any(|&v| v > 0.0));
    }

    #[test]
    fn same_size_is_a_copy_and_constants_stay_constant() {
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(resize_planes(&src, 3, (2, 2), (2, 2)), src);
        let flat = vec![42.0f32; 3 * 5 * 7];
        for v in resize_planes(&flat, 3, (5, 7), (13, 3)) {
            assert!((v - 42.0).abs() < 1e-4);
        }
        assert_eq!(resize_planes(&[], 1, (0, 0), (2, 2)), vec![0.0; 4]);
    }

    #[test]
    fn matches_the_image_crates_triangle_filter_within_a_level() {
        let img = RgbImage::from_fn(37, 23, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 11) as u8, ((x * y) % 256) as u8])
        });
        for (dw, dh) in [(64, 64), (16, 9), (37, 50)] {
            let ours = resize_planes(&planes_u8(img.as_raw(), 3), 3, (37, 23), (dw, dh));
            let theirs =
                imageops::resize(&img, dw as u32, dh as u32, imageops::FilterType::Triangle);
            let plane = dw * dh;
            for (i, px) in theirs.pixels().enumerate() {
                for c in 0..3 {
                    let d = (ours[c * plane + i] - f32::from(px[c])).abs();
                    assert!(d <= 1.5, "{dw}x{dh} pixel {i} channel {c}: {d}");
                }
            }
        }
    }

    #[test]
    fn bytes_in_place_match_planes() {
        let raw: Vec<u8> = (0..(13 * 7 * 3)).map(|v| (v * 37 % 256) as u8).collect();
        for to in [(5, 3), (13, 7), (40, 20)] {
            let a = resize_u8(&raw, 3, (13, 7), to);
            let b = resize_planes(&planes_u8(&raw, 3), 3, (13, 7), to);
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-3, "{to:?}: {x} vs {y}");
            }
        }
        assert_eq!(
            resize_u8(&[1, 2], 3, (2, 2), (1, 1)),
            vec![0.0; 3],
            "short input"
        );
    }

    #[test]
    fn bilinear_does_not_widen_when_shrinking() {
        // 4 -> 2 bilinear: each output is the mean of its two nearest pixels only.
        let src = [0.0, 40.0, 100.0, 200.0];
        assert_eq!(bilinear_planes(&src, 1, (4, 1), (2, 1)), vec![20.0, 150.0]);
        let widened = resize_planes(&src, 1, (4, 1), (2, 1));
        assert!(widened[0] > 20.0, "{widened:?}");
        // Enlarging, both are the same bilinear filter.
        assert_eq!(
            bilinear_planes(&src, 1, (4, 1), (7, 1)),
            resize_planes(&src, 1, (4, 1), (7, 1))
        );
    }

    #[test]
    fn planes_and_rounding() {
        assert_eq!(
            planes_u8(&[1, 2, 3, 4, 5, 6], 3),
            vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
        );
        assert_eq!(to_u8(-3.0), 0);
        assert_eq!(to_u8(2.5), 3);
        assert_eq!(to_u8(2.49), 2);
        assert_eq!(to_u8(300.0), 255);
        assert_eq!(to_u8(f32::NAN), 0);
    }
}
