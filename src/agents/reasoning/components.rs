//! Saliency → connected regions: the deterministic first half of the reasoning agent's
//! `regions` mode, turning the perception agent's map into the masks and boxes that get
//! classified and edited.

use image::GrayImage;

use crate::imaging::Map;

/// One connected region of above-threshold saliency.
#[derive(Clone, Debug, PartialEq)]
pub struct Component {
    /// `[x, y, w, h]` of the region's pixels.
    pub bbox: [u32; 4],
    /// How many pixels the region has.
    pub pixels: u32,
    /// Highest saliency in the region.
    pub peak: f32,
    /// Mean saliency over the region.
    pub mean: f32,
    /// The map's size (the image's, once the map is resized to it), 255 inside, 0 outside.
    pub mask: GrayImage,
}

/// Running statistics of one component while it is labelled; its mask is drawn only if it
/// survives filtering, because full-size masks for hundreds of specks would waste memory.
struct Stats {
    label: u32,
    pixels: u32,
    x0: u32,
    y0: u32,
    x1: u32,
    y1: u32,
    peak: f32,
    sum: f64,
}

/// Finds the 8-connected components of pixels with saliency `> threshold`, drops those with
/// fewer than `min_pixels` pixels, and returns at most `max_regions`, largest first (ties by
/// bbox, then by scan order, so the result is deterministic).
///
/// The flood fill uses an explicit stack: a recursive one would overflow on a large region of a
/// large image. A `data` shorter than `width × height` reads as 0 (nothing salient).
pub fn connected_regions(
    map: &Map,
    threshold: f32,
    min_pixels: u32,
    max_regions: usize,
) -> Vec<Component> {
    let (w, h) = (map.width as usize, map.height as usize);
    let n = w * h;
    if n == 0 || max_regions == 0 {
        return Vec::new();
    }
    let value = |i: usize| map.data.get(i).copied().unwrap_or(0.0);
    // NaN compares false, so it is never salient.
    let salient: Vec<bool> = (0..n).map(|i| value(i) > threshold).collect();
    // 0 = unlabelled; components are numbered from 1 in scan order.
    let mut labels = vec![0u32; n];
    let mut found: Vec<Stats> = Vec::new();
    let mut stack: Vec<usize> = Vec::new();

    for start in 0..n {
        if !salient[start] || labels[start] != 0 {
            continue;
        }
        let label = found.len() as u32 + 1;
        let (sx, sy) = ((start % w) as u32, (start / w) as u32);
        let mut stats = Stats {
            label,
            pixels: 0,
            x0: sx,
            y0: sy,
            x1: sx,
            y1: sy,
            peak: f32::NEG_INFINITY,
            sum: 0.0,
        };
        labels[start] = label;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            let v = value(i);
            stats.pixels += 1;
            stats.x0 = stats.x0.min(x as u32);
            stats.x1 = stats.x1.max(x as u32);
            stats.y0 = stats.y0.min(y as u32);
            stats.y1 = stats.y1.max(y as u32);
            stats.peak = stats.peak.max(v);
            stats.sum += f64::from(v);
            for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                    let j = ny * w + nx;
                    if salient[j] && labels[j] == 0 {
                        labels[j] = label;
                        stack.push(j);
                    }
                }
            }
        }
        found.push(stats);
    }

    let bbox = |s: &Stats| [s.x0, s.y0, s.x1 - s.x0 + 1, s.y1 - s.y0 + 1];
    found.retain(|s| s.pixels >= min_pixels);
    // Stable sort: equal size and bbox keep scan order.
    found.sort_by(|a, b| b.pixels.cmp(&a.pixels).then_with(|| bbox(a).cmp(&bbox(b))));
    found.truncate(max_regions);

    found
        .iter()
        .map(|s| {
            let mut mask = GrayImage::new(map.width, map.height);
            for y in s.y0..=s.y1 {
                for x in s.x0..=s.x1 {
                    if labels[y as usize * w + x as usize] == s.label {
                        mask.put_pixel(x, y, image::Luma([255]));
                    }
                }
            }
            Component {
                bbox: bbox(s),
                pixels: s.pixels,
                peak: s.peak,
                mean: (s.sum / f64::from(s.pixels)) as f32,
                mask,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map from ASCII art: `#` = 0.9, `+` = 0.6, anything else 0.
    fn art(rows: &[&str]) -> Map {
        let height = rows.len() as u32;
        let width = rows.first().map_or(0, |r| r.len()) as u32;
        let data = rows
            .iter()
            .flat_map(|r| {
                r.chars().map(|c| match c {
                    '#' => 0.9,
                    '+' => 0.6,
                    _ => 0.0,
                })
            })
            .collect();
        Map {
            width,
            height,
            data,
        }
    }

    fn mask_pixels(c: &Component) -> Vec<(u32, u32)> {
        c.mask
            .enumerate_pixels()
            .filter(|p| p.2[0] == 255)
            .map(|p| (p.0, p.1))
            .collect()
    }

    #[test]
    fn finds_components_with_stats() {
        let m = art(&[
            "##....", //
            "#+....", //
            "....#.", //
            "...##.", //
        ]);
        let regions = connected_regions(&m, 0.5, 1, 10);
        assert_eq!(regions.len(), 2);
        let a = &regions[0];
        // Both have 3..4 pixels: the 4-pixel one comes first.
        assert_eq!(a.pixels, 4);
        assert_eq!(a.bbox, [0, 0, 2, 2]);
        assert_eq!(a.peak, 0.9);
        assert!((a.mean - 0.825).abs() < 1e-6);
        assert_eq!(mask_pixels(a), vec![(0, 0), (1, 0), (0, 1), (1, 1)]);
        let b = &regions[1];
        assert_eq!(b.pixels, 3);
        assert_eq!(b.bbox, [3, 2, 2, 2]);
        assert_eq!(mask_pixels(b), vec![(4, 2), (3, 3), (4, 3)]);
        assert_eq!(b.mask.dimensions(), (6, 4));
        assert!(b.mask.as_raw().iter().all(|&v| v == 0 || v == 255));
    }

    #[test]
    fn diagonal_neighbours_connect() {
        let m = art(&[
            "#...", //
            ".#..", //
            "..#.", //
            "...#", //
        ]);
        let regions = connected_regions(&m, 0.5, 1, 10);
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].pixels, 4);
        assert_eq!(regions[0].bbox, [0, 0, 4, 4]);
    }

    #[test]
    fn threshold_is_strict() {
        let m = art(&["++.##"]);
        assert_eq!(connected_regions(&m, 0.6, 1, 10).len(), 1);
        assert_eq!(connected_regions(&m, 0.59, 1, 10).len(), 2);
        assert!(connected_regions(&m, 0.9, 1, 10).is_empty());
    }

    #[test]
    fn small_components_are_dropped_and_count_is_capped() {
        let m = art(&[
            "#.##.###", //
            "........", //
            "####....", //
        ]);
        let all = connected_regions(&m, 0.5, 1, 10);
        let sizes: Vec<u32> = all.iter().map(|c| c.pixels).collect();
        assert_eq!(sizes, vec![4, 3, 2, 1]);
        let big = connected_regions(&m, 0.5, 3, 10);
        assert_eq!(big.iter().map(|c| c.pixels).collect::<Vec<_>>(), vec![4, 3]);
        let top = connected_regions(&m, 0.5, 1, 2);
        assert_eq!(top.len(), 2);
        assert_eq!(top[1].bbox, [5, 0, 3, 1]);
        assert!(connected_regions(&m, 0.5, 1, 0).is_empty());
    }

    #[test]
    fn ties_are_broken_by_bbox() {
        let m = art(&[
            "....#", //
            "#....", //
            "..#..", //
        ]);
        let r = connected_regions(&m, 0.5, 1, 10);
        let boxes: Vec<[u32; 4]> = r.iter().map(|c| c.bbox).collect();
        assert_eq!(boxes, vec![[0, 1, 1, 1], [2, 2, 1, 1], [4, 0, 1, 1]]);
    }

    #[test]
    fn ring_and_its_centre_are_separate() {
        let m = art(&[
            "#####", //
            "#...#", //
            "#.+.#", //
            "#...#", //
            "#####", //
        ]);
        let r = connected_regions(&m, 0.5, 1, 10);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].pixels, 16);
        assert_eq!(r[1].bbox, [2, 2, 1, 1]);
        assert_eq!(r[1].peak, 0.6);
    }

    #[test]
    fn large_region_does_not_overflow_the_stack() {
        let (w, h) = (1500u32, 1200u32);
        // A serpentine path is the worst case for a recursive fill.
        let data = (0..h)
            .flat_map(|y| {
                (0..w).map(move |x| {
                    let on = y % 2 == 0 || (y % 4 == 1 && x == w - 1) || (y % 4 == 3 && x == 0);
                    if on {
                        1.0
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let m = Map {
            width: w,
            height: h,
            data,
        };
        let r = connected_regions(&m, 0.5, 1, 4);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].bbox, [0, 0, w, h]);
        assert_eq!(r[0].pixels, w * h / 2 + h / 2);
    }

    #[test]
    fn degenerate_maps() {
        let empty = Map {
            width: 0,
            height: 0,
            data: vec![],
        };
        assert!(connected_regions(&empty, 0.5, 1, 5).is_empty());
        let short = Map {
            width: 3,
            height: 2,
            data: vec![1.0, f32::NAN],
        };
        let r = connected_regions(&short, 0.5, 1, 5);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].bbox, [0, 0, 1, 1]);
    }

    #[test]
    fn deterministic() {
        let m = art(&[
            "#.#.#.#", //
            ".......", //
            "#.#.#.#", //
        ]);
        let a = connected_regions(&m, 0.5, 1, 5);
        let b = connected_regions(&m, 0.5, 1, 5);
        assert_eq!(a, b);
        assert_eq!(a.len(), 5);
        assert_eq!(a[0].bbox, [0, 0, 1, 1]);
        assert_eq!(a[4].bbox, [4, 0, 1, 1]);
    }
}
