//! Binary region masks and what keeps edits inside them: dilation, bounding boxes, inward
//! feathering, compositing a patch back, and the crop rectangle around a region.

use image::{GrayImage, RgbImage};

use super::resample;

/// Mask pixels at or above this value count as inside. Masks are meant to be 0/255, but a mask
/// that went through a resampling filter has intermediate values at its edge; splitting at the
/// midpoint keeps the region the same size it was.
pub const MASK_INSIDE: u8 = 128;

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
    use image::{Luma, Rgb};

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
}
