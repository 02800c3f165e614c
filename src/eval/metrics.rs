//! The quality figures of `retoucher eval` as pure functions of pixels, so each one can be
//! checked against a case worked out by hand. How they are pooled over images lives in
//! [`super::score`].
//!
//! - Pixel ROC AUC is exact: the Mann–Whitney U statistic over every (defect, non-defect)
//!   pixel pair, a tie counting one half; the scores are kept, sorted, not binned.
//! - PSNR is over the 8-bit RGB values (peak 255) of the pixels considered, all three channels.
//! - SSIM (Wang et al. 2004) is computed on luma (BT.601: 0.299 R + 0.587 G + 0.114 B) with a
//!   Gaussian window of σ = 1.5 px truncated at 5 px (11 × 11), weights renormalised where the
//!   window leaves the image, C1 = (0.01·255)², C2 = (0.03·255)²; restricted to a mask it is the
//!   mean of the SSIM map over the mask's pixels (windows centred inside the mask, so they see a
//!   few pixels around it: a seam at the mask's edge counts).

use image::{GrayImage, RgbImage};

use crate::agents::reasoning::components::connected_regions;
use crate::imaging::Map;

/// The PSNR that identical pixels are counted as when PSNRs are averaged (their own PSNR is
/// infinite).
pub const PSNR_CAP_DB: f64 = 100.0;

const SSIM_SIGMA: f64 = 1.5;
const SSIM_RADIUS: usize = 5;
const SSIM_C1: f64 = (0.01 * 255.0) * (0.01 * 255.0);
const SSIM_C2: f64 = (0.03 * 255.0) * (0.03 * 255.0);

/// Sorts scores ascending in the order [`auc`] and [`roc`] expect (NaN last, though callers
/// replace NaN by 0 first, as the pipeline never counts NaN as salient).
pub fn sort_scores(scores: &mut [f32]) {
    scores.sort_unstable_by(f32::total_cmp);
}

/// Exact ROC AUC of `positives` against `negatives`, both sorted ascending: the share of
/// (positive, negative) pairs where the positive scores higher, ties counted one half. `None`
/// without both kinds of pixel.
pub fn auc(positives: &[f32], negatives: &[f32]) -> Option<f64> {
    if positives.is_empty() || negatives.is_empty() {
        return None;
    }
    // For each positive: negatives strictly below it (`below`) and up to equal (`up_to`); both
    // only grow as the positives do.
    let (mut below, mut up_to) = (0usize, 0usize);
    let mut wins = 0.0f64;
    for &p in positives {
        while below < negatives.len() && negatives[below].total_cmp(&p).is_lt() {
            below += 1;
        }
        up_to = up_to.max(below);
        while up_to < negatives.len() && negatives[up_to].total_cmp(&p).is_le() {
            up_to += 1;
        }
        wins += below as f64 + 0.5 * (up_to - below) as f64;
    }
    Some(wins / (positives.len() as f64 * negatives.len() as f64))
}

/// Points `(false positive rate, true positive rate)` of the ROC curve for "score > t", from
/// (0, 0) to (1, 1), at thresholds taken at `steps` evenly spaced quantiles of each kind of
/// score (so both ends of the curve are drawn finely). Inputs sorted ascending.
pub fn roc(positives: &[f32], negatives: &[f32], steps: usize) -> Vec<(f64, f64)> {
    if positives.is_empty() || negatives.is_empty() {
        return Vec::new();
    }
    let quantile = |v: &[f32], k: usize| v[(k * (v.len() - 1)) / steps.max(1)];
    let mut thresholds: Vec<f32> = (0..=steps)
        .flat_map(|k| [quantile(positives, k), quantile(negatives, k)])
        .collect();
    sort_scores(&mut thresholds);
    thresholds.dedup();
    let above = |v: &[f32], t: f32| v.len() - v.partition_point(|x| x.total_cmp(&t).is_le());
    let rate = |v: &[f32], t: f32| above(v, t) as f64 / v.len() as f64;
    let mut points = vec![(1.0, 1.0)];
    points.extend(
        thresholds
            .iter()
            .map(|&t| (rate(negatives, t), rate(positives, t))),
    );
    points.push((0.0, 0.0));
    points.reverse();
    points.dedup();
    points
}

/// Saliency above τ against the ground truth, as pixel counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overlap {
    /// Defect pixels above τ.
    pub intersection: u64,
    /// Pixels that are defect or above τ.
    pub union: u64,
    /// Pixels above τ.
    pub above: u64,
    pub pixels: u64,
}

impl Overlap {
    /// |above ∩ defect| / |above ∪ defect|; `None` when both are empty.
    pub fn iou(&self) -> Option<f64> {
        (self.union > 0).then(|| self.intersection as f64 / self.union as f64)
    }

    /// Share of the image above τ.
    pub fn above_share(&self) -> f64 {
        if self.pixels == 0 {
            0.0
        } else {
            self.above as f64 / self.pixels as f64
        }
    }
}

/// Counts the overlap of `saliency > tau` with `defect` (same length).
pub fn overlap(saliency: &[f32], defect: &[bool], tau: f32) -> Overlap {
    let mut o = Overlap {
        pixels: saliency.len() as u64,
        ..Overlap::default()
    };
    for (&s, &d) in saliency.iter().zip(defect) {
        let above = s > tau;
        o.above += u64::from(above);
        o.intersection += u64::from(above && d);
        o.union += u64::from(above || d);
    }
    o
}

/// Ground-truth defects (8-connected components of the defect pixels) and how many of them
/// have at least one pixel of `saliency > tau`.
pub fn defects_hit(defect: &[bool], saliency: &Map, tau: f32) -> (usize, usize) {
    let truth = Map {
        width: saliency.width,
        height: saliency.height,
        data: defect.iter().map(|&d| if d { 1.0 } else { 0.0 }).collect(),
    };
    let regions = connected_regions(&truth, 0.5, 0, usize::MAX);
    let hit = regions
        .iter()
        .filter(|r| {
            r.mask
                .as_raw()
                .iter()
                .zip(&saliency.data)
                .any(|(&m, &s)| m > 0 && s > tau)
        })
        .count();
    (regions.len(), hit)
}

/// Mean squared error over the 8-bit RGB values of the pixels `within` marks (all pixels when
/// `None`); `None` when no pixel is considered or the sizes differ.
pub fn mse(a: &RgbImage, b: &RgbImage, within: Option<&[bool]>) -> Option<f64> {
    if a.dimensions() != b.dimensions() {
        return None;
    }
    let (mut sum, mut n) = (0.0f64, 0u64);
    for (i, (pa, pb)) in a.pixels().zip(b.pixels()).enumerate() {
        if within.is_some_and(|w| !w.get(i).copied().unwrap_or(false)) {
            continue;
        }
        for c in 0..3 {
            let d = f64::from(pa[c]) - f64::from(pb[c]);
            sum += d * d;
        }
        n += 3;
    }
    (n > 0).then(|| sum / n as f64)
}

/// PSNR in dB of a mean squared error of 8-bit values: 10·log10(255² / mse), infinite for 0.
pub fn psnr(mse: f64) -> f64 {
    if mse <= 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    }
}

fn luma(img: &RgbImage) -> Vec<f64> {
    img.pixels()
        .map(|p| 0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2]))
        .collect()
}

/// Weighted local mean of `plane` under the Gaussian window, separably, the weights renormalised
/// over the part of the window inside the image.
fn window_mean(plane: &[f64], w: usize, h: usize, kernel: &[f64]) -> Vec<f64> {
    let r = kernel.len() / 2;
    let pass = |src: &[f64], along_rows: bool| {
        let mut out = vec![0.0; src.len()];
        for y in 0..h {
            for x in 0..w {
                let (pos, len) = if along_rows { (x, w) } else { (y, h) };
                let (mut acc, mut weight) = (0.0, 0.0);
                for (k, &kw) in kernel.iter().enumerate() {
                    let Some(q) = (pos + k).checked_sub(r).filter(|q| *q < len) else {
                        continue;
                    };
                    let i = if along_rows { y * w + q } else { q * w + x };
                    acc += kw * src[i];
                    weight += kw;
                }
                out[y * w + x] = acc / weight;
            }
        }
        out
    };
    pass(&pass(plane, true), false)
}

/// The SSIM map of two images of the same size (one value per pixel); empty if the sizes differ.
pub fn ssim_map(a: &RgbImage, b: &RgbImage) -> Vec<f64> {
    if a.dimensions() != b.dimensions() {
        return Vec::new();
    }
    let (w, h) = (a.width() as usize, a.height() as usize);
    let kernel: Vec<f64> = (0..=2 * SSIM_RADIUS)
        .map(|k| {
            let d = k as f64 - SSIM_RADIUS as f64;
            (-d * d / (2.0 * SSIM_SIGMA * SSIM_SIGMA)).exp()
        })
        .collect();
    let (x, y) = (luma(a), luma(b));
    let product = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(u, v)| u * v).collect::<Vec<_>>();
    let mean = |p: &[f64]| window_mean(p, w, h, &kernel);
    let (mx, my) = (mean(&x), mean(&y));
    let (mxx, myy, mxy) = (
        mean(&product(&x, &x)),
        mean(&product(&y, &y)),
        mean(&product(&x, &y)),
    );
    (0..w * h)
        .map(|i| {
            let (ux, uy) = (mx[i], my[i]);
            let vx = mxx[i] - ux * ux;
            let vy = myy[i] - uy * uy;
            let cxy = mxy[i] - ux * uy;
            ((2.0 * ux * uy + SSIM_C1) * (2.0 * cxy + SSIM_C2))
                / ((ux * ux + uy * uy + SSIM_C1) * (vx + vy + SSIM_C2))
        })
        .collect()
}

/// Mean SSIM over the pixels `within` marks; `None` when none is marked or the sizes differ.
pub fn ssim_within(a: &RgbImage, b: &RgbImage, within: &[bool]) -> Option<f64> {
    let map = ssim_map(a, b);
    let (mut sum, mut n) = (0.0, 0u64);
    for (v, _) in map.iter().zip(within).filter(|(_, &inside)| inside) {
        sum += v;
        n += 1;
    }
    (n > 0).then(|| sum / n as f64)
}

/// Pixels (any channel) that differ between `before` and `after` where `allowed` is false;
/// every pixel counts as changed when the sizes differ.
pub fn changed_outside(before: &RgbImage, after: &RgbImage, allowed: &[bool]) -> u64 {
    if before.dimensions() != after.dimensions() {
        return u64::from(before.width()) * u64::from(before.height());
    }
    before
        .pixels()
        .zip(after.pixels())
        .enumerate()
        .filter(|(i, (p, q))| !allowed.get(*i).copied().unwrap_or(false) && p != q)
        .count() as u64
}

/// Pixels at or above the inside level of 8-bit masks, as one flag per pixel (their union).
pub fn union_of(masks: &[&GrayImage], pixels: usize) -> Vec<bool> {
    let mut union = vec![false; pixels];
    for mask in masks {
        for (u, &v) in union.iter_mut().zip(mask.as_raw()) {
            *u |= v >= crate::imaging::MASK_INSIDE;
        }
    }
    union
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn sorted(v: &[f32]) -> Vec<f32> {
        let mut v = v.to_vec();
        sort_scores(&mut v);
        v
    }

    #[test]
    fn auc_counts_pairs_and_half_ties() {
        // Positives {0.9, 0.5, 0.3}, negatives {0.5, 0.2, 0.1, 0.3}: of the 12 pairs, 0.9 beats
        // all 4; 0.5 beats 0.2, 0.1, 0.3 and ties 0.5 (3.5); 0.3 beats 0.2, 0.1 and ties 0.3
        // (2.5): 10 / 12.
        let auc = auc(&sorted(&[0.9, 0.5, 0.3]), &sorted(&[0.5, 0.2, 0.1, 0.3])).unwrap();
        assert!((auc - 10.0 / 12.0).abs() < 1e-12, "{auc}");
        // All equal: every pair a tie.
        assert_eq!(auc_of(&[0.4, 0.4], &[0.4, 0.4, 0.4]), Some(0.5));
        // Perfect and inverted separation.
        assert_eq!(auc_of(&[0.8, 0.7], &[0.1, 0.2]), Some(1.0));
        assert_eq!(auc_of(&[0.1], &[0.8, 0.7]), Some(0.0));
        // Undefined without both kinds.
        assert_eq!(auc_of(&[], &[0.1]), None);
        assert_eq!(auc_of(&[0.1], &[]), None);
    }

    fn auc_of(p: &[f32], n: &[f32]) -> Option<f64> {
        auc(&sorted(p), &sorted(n))
    }

    #[test]
    fn roc_runs_from_corner_to_corner_and_matches_the_rates() {
        let (p, n) = (sorted(&[0.9, 0.5, 0.3]), sorted(&[0.5, 0.2, 0.1, 0.3]));
        let curve = roc(&p, &n, 100);
        assert_eq!(curve.first(), Some(&(0.0, 0.0)));
        assert_eq!(curve.last(), Some(&(1.0, 1.0)));
        // At "score > 0.3": positives 0.9 and 0.5 (2/3), negatives 0.5 (1/4).
        assert!(curve.contains(&(0.25, 2.0 / 3.0)), "{curve:?}");
        assert!(curve
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        // The trapezoids under the curve give the AUC back (ties are diagonal steps).
        let area: f64 = curve
            .windows(2)
            .map(|w| (w[1].0 - w[0].0) * (w[0].1 + w[1].1) / 2.0)
            .sum();
        assert!((area - 10.0 / 12.0).abs() < 1e-12, "{area}");
    }

    #[test]
    fn iou_of_a_hand_drawn_case() {
        // Saliency above 0.5 at pixels 1, 2, 3; defect at 2, 3, 4, 5 of 8 pixels:
        // intersection {2, 3} = 2, union {1..5} = 5.
        let s = [0.1, 0.6, 0.9, 0.7, 0.5, 0.2, 0.0, 0.0];
        let d = [false, false, true, true, true, true, false, false];
        let o = overlap(&s, &d, 0.5);
        assert_eq!(
            o,
            Overlap {
                intersection: 2,
                union: 5,
                above: 3,
                pixels: 8
            }
        );
        assert_eq!(o.iou(), Some(0.4));
        assert_eq!(o.above_share(), 3.0 / 8.0);
        // Nothing above and no defect: IoU undefined; a false-positive area of 0.
        let none = overlap(&[0.1; 4], &[false; 4], 0.5);
        assert_eq!(none.iou(), None);
        assert_eq!(none.above_share(), 0.0);
    }

    #[test]
    fn recall_counts_8_connected_defects_with_any_hit() {
        // 5 x 4: three defects (A and B touch diagonally, so they are one; C; D), saliency
        // above τ on one pixel of C only, and on a pixel outside every defect.
        let rows = ["AA...", "..B.C", "....C", "D...."];
        let defect: Vec<bool> = rows
            .iter()
            .flat_map(|r| r.chars().map(|c| c != '.'))
            .collect();
        let mut saliency = Map {
            width: 5,
            height: 4,
            data: vec![0.0; 20],
        };
        saliency.data[2 * 5 + 4] = 0.9; // C
        saliency.data[3 * 5 + 3] = 0.9; // outside
        assert_eq!(defects_hit(&defect, &saliency, 0.5), (3, 1));
        saliency.data[5 + 2] = 0.51; // B, so the A-B defect too
        assert_eq!(defects_hit(&defect, &saliency, 0.5), (3, 2));
        // Exactly τ is not above it.
        saliency.data[3 * 5] = 0.5; // D
        assert_eq!(defects_hit(&defect, &saliency, 0.5), (3, 2));
    }

    #[test]
    fn false_positive_area_is_the_share_above_tau() {
        let s = [0.9, 0.8, 0.1, 0.2, 0.0, 0.95, 0.3, 0.4, 0.5, 0.6];
        let o = overlap(&s, &[false; 10], 0.5);
        assert_eq!(o.above, 4);
        assert_eq!(o.above_share(), 0.4);
    }

    fn image(w: u32, h: u32, px: &[[u8; 3]]) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb(px[(y * w + x) as usize]))
    }

    #[test]
    fn psnr_by_hand_and_of_identical_images() {
        let a = image(2, 1, &[[10, 20, 30], [100, 100, 100]]);
        let b = image(2, 1, &[[13, 20, 26], [100, 100, 100]]);
        // Pixel 0: squared errors 9 + 0 + 16 = 25 over 3 values.
        let inside = [true, false];
        let m = mse(&a, &b, Some(&inside)).unwrap();
        assert!((m - 25.0 / 3.0).abs() < 1e-12);
        let expected = 10.0 * (65025.0f64 / (25.0 / 3.0)).log10(); // 38.923 dB
        assert!((psnr(m) - expected).abs() < 1e-9);
        assert!((psnr(m) - 38.9226).abs() < 1e-3);
        // Whole image: 25 over 6 values.
        assert!((mse(&a, &b, None).unwrap() - 25.0 / 6.0).abs() < 1e-12);
        // Identical pixels: infinite PSNR; nothing considered or a size mismatch: no figure.
        assert_eq!(psnr(mse(&a, &a, None).unwrap()), f64::INFINITY);
        assert_eq!(mse(&a, &b, Some(&[false, false])), None);
        assert_eq!(mse(&a, &image(1, 1, &[[0, 0, 0]]), None), None);
        // Error 255 everywhere: 0 dB.
        let black = image(1, 1, &[[0, 0, 0]]);
        let white = image(1, 1, &[[255, 255, 255]]);
        assert_eq!(psnr(mse(&black, &white, None).unwrap()), 0.0);
    }

    fn grey(w: u32, values: &[u8]) -> RgbImage {
        RgbImage::from_fn(w, values.len() as u32 / w, |x, y| {
            let v = values[(y * w + x) as usize];
            Rgb([v, v, v])
        })
    }

    #[test]
    fn ssim_by_hand() {
        // Identical images: 1 everywhere.
        let a = grey(4, &[10, 200, 30, 90, 0, 255, 128, 64]);
        assert!(ssim_map(&a, &a).iter().all(|v| (v - 1.0).abs() < 1e-12));
        // Flat images a and b: no variance, SSIM = (2ab + C1) / (a² + b² + C1).
        let (x, y) = (grey(3, &[100; 6]), grey(3, &[120; 6]));
        let want =
            (2.0 * 100.0 * 120.0 + SSIM_C1) / (100.0f64.powi(2) + 120.0f64.powi(2) + SSIM_C1);
        for v in ssim_map(&x, &y) {
            assert!((v - want).abs() < 1e-9, "{v} vs {want}");
        }
        // Two pixels [m-d, m+d] against their swap. Each pixel's window covers both, weights
        // p (itself) and q = 1 - p (the other) with q/p = exp(-1/(2·1.5²)). Then
        // μx = m + d(q-p), μy = m - d(q-p), σx² = σy² = 4pq d², σxy = -4pq d².
        let (m, d) = (100.0f64, 20.0f64);
        let e = (-1.0f64 / 4.5).exp();
        let (p, q) = (1.0 / (1.0 + e), e / (1.0 + e));
        let (ux, uy) = (m + d * (q - p), m - d * (q - p));
        let v = 4.0 * p * q * d * d;
        let want = ((2.0 * ux * uy + SSIM_C1) * (-2.0 * v + SSIM_C2))
            / ((ux * ux + uy * uy + SSIM_C1) * (2.0 * v + SSIM_C2));
        let (x, y) = (grey(2, &[80, 120]), grey(2, &[120, 80]));
        let map = ssim_map(&x, &y);
        assert!((map[0] - want).abs() < 1e-9, "{} vs {want}", map[0]);
        assert!((map[1] - want).abs() < 1e-9);
        assert!(
            want < -0.8,
            "anti-correlated structure scores far below 0: {want}"
        );
        // Restricted to a mask: the mean over its pixels only.
        let mixed = grey(2, &[80, 80]);
        let full = ssim_map(&x, &mixed);
        assert_eq!(ssim_within(&x, &mixed, &[false, true]), Some(full[1]));
        assert_eq!(ssim_within(&x, &mixed, &[false, false]), None);
        assert_eq!(ssim_within(&x, &grey(1, &[1]), &[true]), None);
    }

    #[test]
    fn changed_outside_counts_only_pixels_no_mask_allowed() {
        let before = grey(3, &[1, 2, 3, 4, 5, 6]);
        let after = grey(3, &[9, 2, 9, 4, 9, 9]);
        // Changed: 0, 2, 4, 5. Allowed: 0 and 4 (the union of two masks).
        let m1 = GrayImage::from_raw(3, 2, vec![255, 0, 0, 0, 0, 0]).unwrap();
        let m2 = GrayImage::from_raw(3, 2, vec![0, 0, 0, 0, 128, 127]).unwrap();
        let allowed = union_of(&[&m1, &m2], 6);
        assert_eq!(allowed, [true, false, false, false, true, false]);
        assert_eq!(changed_outside(&before, &after, &allowed), 2);
        assert_eq!(changed_outside(&before, &before, &[false; 6]), 0);
        assert_eq!(changed_outside(&before, &grey(1, &[1]), &allowed), 6);
    }
}
