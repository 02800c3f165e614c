//! Model pre-processing: an RGB image as the CHW f32 tensor a vision model takes.

use image::RgbImage;

use super::resample;

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

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([
                (x * 7 % 256) as u8,
                (y * 5 % 256) as u8,
                ((x + y) % 256) as u8,
            ])
        })
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
}
