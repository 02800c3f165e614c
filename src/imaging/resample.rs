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
/// that would fall outside are dropped and the rest renormalised (edge clamping).
fn triangle_taps(src: usize, dst: usize) -> Vec<Taps> {
    let scale = src as f64 / dst as f64;
    // The filter's radius in source pixels: 1 when enlarging, the scale when shrinking.
    let support = scale.max(1.0);
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

/// Interleaved 8-bit pixels (`channels` per pixel) as CHW f32 planes, values 0..=255.
pub fn planes_u8(raw: &[u8], channels: usize) -> Vec<f32> {
    let n = raw.len() / channels.max(1);
    let mut out = vec![0.0f32; n * channels];
    for (i, px) in raw.chunks_exact(channels.max(1)).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            out[c * n + i] = f32::from(v);
        }
    }
    out
}

/// Resizes `channels` CHW planes of `sw`×`sh` to `dw`×`dh`. An empty source gives zeros; a
/// `src` shorter than the planes reads as 0.
pub fn resize_planes(
    src: &[f32],
    channels: usize,
    (sw, sh): (usize, usize),
    (dw, dh): (usize, usize),
) -> Vec<f32> {
    let mut out = vec![0.0f32; channels * dw * dh];
    if sw == 0 || sh == 0 || dw == 0 || dh == 0 {
        return out;
    }
    let at = |i: usize| src.get(i).copied().unwrap_or(0.0);
    if (sw, sh) == (dw, dh) {
        out.iter_mut().enumerate().for_each(|(i, v)| *v = at(i));
        return out;
    }
    let xt = triangle_taps(sw, dw);
    let yt = triangle_taps(sh, dh);
    // Rows first: every source row to the output width.
    let mut rows = vec![0.0f32; channels * sh * dw];
    for (r, row) in rows.chunks_exact_mut(dw).enumerate() {
        let base = r * sw;
        for (x, (start, weights)) in xt.iter().enumerate() {
            row[x] = weights
                .iter()
                .enumerate()
                .map(|(k, w)| w * at(base + start + k))
                .sum();
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

    #[test]
    fn taps_sum_to_one_and_stay_inside() {
        for (src, dst) in [(1, 7), (7, 1), (10, 3), (3, 10), (512, 224), (97, 512)] {
            for (start, w) in triangle_taps(src, dst) {
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
