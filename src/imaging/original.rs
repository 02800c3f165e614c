//! What a result keeps of its input beyond the 8-bit RGB the agents work on.
//!
//! The models and tools see 8-bit RGB, straight (not premultiplied) colour, transparent pixels
//! included. The retouched PNG then gets back:
//! - the **alpha channel**, byte for byte (RGBA in, RGBA out; grey + alpha comes back as RGBA):
//!   repairs change colour only, under the original alpha;
//! - **16-bit samples**: a 16-bit PNG comes back as a 16-bit PNG. A pixel whose 8-bit value the
//!   loop did not change keeps its exact 16-bit samples, which is every pixel outside the edited
//!   regions (and inside them wherever a repair happened to give the same 8-bit value); an edited
//!   pixel has 8-bit precision (`v × 257`), the precision the models work at;
//! - the input's **metadata** (colour profile, EXIF, text; see [`super::codec::KEPT_PNG_CHUNKS`]).
//!
//! So the results contract holds for every input: pixels outside every edited region equal the
//! decoded input, alpha and bit depth included. Grey input comes back as RGB (equal values).

use image::{DynamicImage, ExtendedColorType, RgbImage};

use super::codec::{encode_with_metadata, Metadata};

/// The sample layout of the retouched PNG, which is the input's as far as the result keeps it.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    Rgb8,
    Rgba8,
    Rgb16,
    Rgba16,
}

/// The parts of a decoded input the agents do not see.
#[derive(Clone, Debug, Default)]
pub struct Original {
    width: u32,
    height: u32,
    /// 8-bit alpha, one sample per pixel (8-bit input with alpha).
    alpha8: Option<Vec<u8>>,
    /// 16-bit samples, RGB or RGBA interleaved (16-bit input).
    deep: Option<Deep>,
    metadata: Metadata,
}

#[derive(Clone, Debug)]
struct Deep {
    /// Samples per pixel: 3 (RGB) or 4 (RGBA).
    channels: usize,
    samples: Vec<u16>,
}

/// A 16-bit sample reduced to 8 bits, rounded to nearest; `to8(v * 257) == v`.
pub(super) fn to8(v: u16) -> u8 {
    ((u32::from(v) * 255 + 32767) / 65535) as u8
}

impl Original {
    /// Splits a decoded image into the 8-bit RGB the agents work on and the rest.
    pub(super) fn split(image: DynamicImage, metadata: Metadata) -> (RgbImage, Original) {
        let (width, height) = (image.width(), image.height());
        let mut original = Original {
            width,
            height,
            metadata,
            ..Original::default()
        };
        let rgb = match image {
            DynamicImage::ImageRgb8(rgb) => rgb,
            DynamicImage::ImageRgba8(_) | DynamicImage::ImageLumaA8(_) => {
                let rgba = image.into_rgba8().into_raw();
                original.alpha8 = Some(rgba.chunks_exact(4).map(|p| p[3]).collect());
                let rgb = rgba
                    .chunks_exact(4)
                    .flat_map(|p| [p[0], p[1], p[2]])
                    .collect();
                RgbImage::from_raw(width, height, rgb).unwrap_or_default()
            }
            DynamicImage::ImageRgb16(_) | DynamicImage::ImageLuma16(_) => {
                original.deep_from(image.into_rgb16().into_raw(), 3)
            }
            DynamicImage::ImageRgba16(_) | DynamicImage::ImageLumaA16(_) => {
                original.deep_from(image.into_rgba16().into_raw(), 4)
            }
            // Grey 8-bit; (neither codec decodes to floats).
            other => other.into_rgb8(),
        };
        (rgb, original)
    }

    /// Keeps 16-bit samples and returns their 8-bit RGB reduction.
    fn deep_from(&mut self, samples: Vec<u16>, channels: usize) -> RgbImage {
        let rgb = samples
            .chunks_exact(channels)
            .flat_map(|p| [to8(p[0]), to8(p[1]), to8(p[2])])
            .collect();
        self.deep = Some(Deep { channels, samples });
        RgbImage::from_raw(self.width, self.height, rgb).unwrap_or_default()
    }

    /// The layout of the retouched PNG.
    #[cfg(test)]
    pub(crate) fn layout(&self) -> Layout {
        match (&self.deep, &self.alpha8) {
            (Some(deep), _) if deep.channels == 4 => Layout::Rgba16,
            (Some(_), _) => Layout::Rgb16,
            (None, Some(_)) => Layout::Rgba8,
            (None, None) => Layout::Rgb8,
        }
    }

    /// The metadata carried over to the result.
    #[cfg(test)]
    pub(crate) fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Encodes the retouched image (the agents' 8-bit RGB, same size as the input) as the
    /// result PNG: the input's layout, its alpha and unchanged 16-bit samples, its metadata.
    /// An image of another size (a caller bug) is encoded as it is, as 8-bit RGB.
    pub fn encode(&self, retouched: &RgbImage) -> Vec<u8> {
        let (width, height) = (self.width, self.height);
        if retouched.dimensions() != (width, height) {
            return encode_with_metadata(
                retouched.as_raw(),
                retouched.width(),
                retouched.height(),
                ExtendedColorType::Rgb8,
                &self.metadata,
            );
        }
        let rgb = retouched.as_raw().chunks_exact(3);
        let (raw, color) = match (&self.deep, &self.alpha8) {
            (Some(deep), _) => {
                let mut out = Vec::with_capacity(deep.samples.len() * 2);
                for (kept, now) in deep.samples.chunks_exact(deep.channels).zip(rgb) {
                    let unchanged = (0..3).all(|c| to8(kept[c]) == now[c]);
                    for c in 0..3 {
                        let v = if unchanged {
                            kept[c]
                        } else {
                            u16::from(now[c]) * 257
                        };
                        out.extend_from_slice(&v.to_ne_bytes());
                    }
                    if deep.channels == 4 {
                        out.extend_from_slice(&kept[3].to_ne_bytes());
                    }
                }
                let color = if deep.channels == 4 {
                    ExtendedColorType::Rgba16
                } else {
                    ExtendedColorType::Rgb16
                };
                (out, color)
            }
            (None, Some(alpha)) => {
                let mut out = Vec::with_capacity(alpha.len() * 4);
                for (p, &a) in rgb.zip(alpha) {
                    out.extend_from_slice(&[p[0], p[1], p[2], a]);
                }
                (out, ExtendedColorType::Rgba8)
            }
            (None, None) => (retouched.as_raw().clone(), ExtendedColorType::Rgb8),
        };
        encode_with_metadata(&raw, width, height, color, &self.metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};

    fn deep_rgba(w: u32, h: u32) -> ImageBuffer<Rgba<u16>, Vec<u16>> {
        ImageBuffer::from_fn(w, h, |x, y| {
            Rgba([
                (x * 3001 + y * 7) as u16,
                (y * 2039 + 5) as u16,
                (x * 97 + y * 13_000) as u16,
                (x * 4099 + y * 911) as u16,
            ])
        })
    }

    fn decode_png(bytes: &[u8]) -> DynamicImage {
        image::load_from_memory_with_format(bytes, image::ImageFormat::Png).expect("a PNG")
    }

    #[test]
    fn eight_bit_reduction_rounds_and_inverts_the_expansion() {
        for v in 0..=255u8 {
            assert_eq!(to8(u16::from(v) * 257), v);
        }
        assert_eq!(to8(0), 0);
        assert_eq!(to8(128), 0);
        assert_eq!(to8(129), 1);
        assert_eq!(to8(65535), 255);
    }

    #[test]
    fn rgba8_keeps_its_alpha_under_a_changed_colour() {
        let input = image::RgbaImage::from_fn(5, 4, |x, y| {
            Rgba([x as u8 * 40, y as u8 * 60, 7, (x * 50 + y) as u8])
        });
        let (rgb, original) =
            Original::split(DynamicImage::ImageRgba8(input.clone()), Metadata::default());
        assert_eq!(original.layout(), Layout::Rgba8);
        assert_eq!(rgb.get_pixel(3, 2), &Rgb([120, 120, 7]), "straight colour");
        let mut retouched = rgb.clone();
        retouched.put_pixel(1, 1, Rgb([9, 9, 9]));
        let out = decode_png(&original.encode(&retouched)).into_rgba8();
        for (x, y, p) in out.enumerate_pixels() {
            let want = input.get_pixel(x, y);
            assert_eq!(p[3], want[3], "alpha at ({x},{y})");
            if (x, y) == (1, 1) {
                assert_eq!(&p.0[..3], &[9, 9, 9]);
            } else {
                assert_eq!(p, want);
            }
        }
    }

    #[test]
    fn grey_alpha_comes_back_as_rgba_with_its_alpha() {
        let input = ImageBuffer::from_fn(3, 2, |x, y| LumaA([(x * 80) as u8, (y * 200) as u8]));
        let (rgb, original) =
            Original::split(DynamicImage::ImageLumaA8(input), Metadata::default());
        assert_eq!(original.layout(), Layout::Rgba8);
        let out = decode_png(&original.encode(&rgb));
        let out = out.as_rgba8().expect("RGBA8 output");
        assert_eq!(out.get_pixel(2, 1), &Rgba([160, 160, 160, 200]));
    }

    #[test]
    fn sixteen_bits_are_kept_where_the_loop_changed_nothing() {
        let input = deep_rgba(7, 5);
        let (rgb, original) = Original::split(
            DynamicImage::ImageRgba16(input.clone()),
            Metadata::default(),
        );
        assert_eq!(original.layout(), Layout::Rgba16);
        let mut retouched = rgb.clone();
        retouched.put_pixel(2, 3, Rgb([1, 2, 3]));
        let out = decode_png(&original.encode(&retouched));
        let out = out.as_rgba16().expect("RGBA16 output");
        for (x, y, p) in out.enumerate_pixels() {
            let want = input.get_pixel(x, y);
            if (x, y) == (2, 3) {
                assert_eq!(p, &Rgba([257, 514, 771, want[3]]));
            } else {
                assert_eq!(p, want, "({x},{y}) keeps its 16 bits");
            }
        }
        // Unchanged, the whole image comes back bit for bit.
        let same = decode_png(&original.encode(&rgb));
        assert_eq!(same.as_rgba16(), Some(&input));
    }

    #[test]
    fn sixteen_bit_grey_comes_back_as_sixteen_bit_rgb() {
        let input = ImageBuffer::from_fn(4, 3, |x, y| Luma([(x * 9000 + y * 31) as u16]));
        let (rgb, original) = Original::split(
            DynamicImage::ImageLuma16(input.clone()),
            Metadata::default(),
        );
        assert_eq!(original.layout(), Layout::Rgb16);
        let out = decode_png(&original.encode(&rgb));
        let out = out.as_rgb16().expect("RGB16 output");
        let v = input.get_pixel(3, 2)[0];
        assert_eq!(out.get_pixel(3, 2), &Rgb([v, v, v]));
    }
}
