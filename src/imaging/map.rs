//! Dense f32 maps (the saliency map): resizing to image size, statistics, grey rendering.

use image::{GrayImage, Luma};

use super::resample;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
