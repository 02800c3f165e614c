//! Pixels in and out: [`codec`] (guarded decoding of untrusted PNG/JPEG bytes, lossless PNG
//! encoding, the metadata a result keeps), [`original`] (what a result keeps of its input beyond
//! the 8-bit RGB the agents see: alpha, 16-bit samples), [`tensor`] (model pre-processing),
//! [`map`] (dense saliency maps), [`mask`] (the binary-mask helpers that keep edits confined to
//! their regions) and [`resample`] (the filters they share).

mod codec;
mod map;
mod mask;
mod original;
pub mod resample;
mod tensor;

pub use codec::{decode, encode_gray_png, encode_mask_png, encode_png, DecodedImage, ImageLimits};
pub use map::Map;
pub use mask::{composite, dilate, feather, grow_rect, inside_bbox, MASK_INSIDE};
pub use tensor::to_chw;
