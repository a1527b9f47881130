//! Images as models' preprocessors see them: decoded (PNG, JPEG, WebP, GIF's first frame)
//! to 8-bit RGB, with transparency composited onto white as transformers does, and resized
//! with the same fixed-point bilinear filter as Pillow, which the Hugging Face image
//! processors call, so a resized image is the same bytes.

use std::io::Cursor;

/// What an image may be before it is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    pub max_bytes: usize,
    /// Width × height.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits { max_bytes: 20 << 20, max_pixels: 50_000_000 }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("the image is {bytes} bytes; the limit is {limit}")]
    TooManyBytes { bytes: usize, limit: usize },
    #[error("the image is {width}x{height} pixels; the limit is {limit} pixels")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("the data is not an image in a supported format (PNG, JPEG, WebP, GIF)")]
    UnknownFormat,
    #[error("the image cannot be decoded: {0}")]
    Corrupt(String),
    #[error("the image has no pixels")]
    Empty,
}

/// An 8-bit RGB image, rows top to bottom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    /// `[height, width, 3]`.
    pub pixels: Vec<u8>,
}

/// Reads the size from the header only: cheap, and checked before anything is decoded.
pub fn dimensions(data: &[u8], limits: &ImageLimits) -> Result<(u32, u32), ImageError> {
    if data.len() > limits.max_bytes {
        return Err(ImageError::TooManyBytes { bytes: data.len(), limit: limits.max_bytes });
    }
    let reader = image::ImageReader::new(Cursor::new(data)).with_guessed_format().map_err(|e| ImageError::Corrupt(e.to_string()))?;
    if reader.format().is_none() {
        return Err(ImageError::UnknownFormat);
    }
    let (width, height) = reader.into_dimensions().map_err(|e| ImageError::Corrupt(e.to_string()))?;
    if width == 0 || height == 0 {
        return Err(ImageError::Empty);
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(ImageError::TooManyPixels { width, height, limit: limits.max_pixels });
    }
    Ok((width, height))
}

/// Decodes `data` to RGB. Images with an alpha channel or a transparent palette entry are
/// composited onto white (transformers' `convert_to_rgb`, with Pillow's integer rounding).
pub fn decode_rgb(data: &[u8], limits: &ImageLimits) -> Result<RgbImage, ImageError> {
    let (width, height) = dimensions(data, limits)?;
    let mut reader = image::ImageReader::new(Cursor::new(data)).with_guessed_format().map_err(|e| ImageError::Corrupt(e.to_string()))?;
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(width);
    decoder_limits.max_image_height = Some(height);
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(16));
    reader.limits(decoder_limits);
    let decoded = reader.decode().map_err(|e| ImageError::Corrupt(e.to_string()))?;
    let pixels = if decoded.color().has_alpha() {
        decoded.to_rgba8().pixels().flat_map(|p| composite_on_white(p.0)).collect()
    } else {
        decoded.to_rgb8().into_raw()
    };
    Ok(RgbImage { width: decoded.width(), height: decoded.height(), pixels })
}

/// Pillow's `alpha_composite` of a pixel over opaque white, to RGB.
fn composite_on_white([r, g, b, a]: [u8; 4]) -> [u8; 3] {
    const BITS: u32 = 7;
    if a == 0 {
        return [255; 3];
    }
    let a = u32::from(a);
    let blend = 255 * (255 - a);
    let out_a255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << BITS) / out_a255;
    let coef2 = 255 * (1 << BITS) - coef1;
    let shift_div255 = |v: u32| ((v >> 8) + v) >> 8;
    let mix = |c: u8| (shift_div255(u32::from(c) * coef1 + 255 * coef2 + (0x80 << BITS)) >> BITS) as u8;
    [mix(r), mix(g), mix(b)]
}

/// Fixed-point precision of Pillow's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input pixel read and the fixed-point weights of the inputs.
struct Coefficients {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// A resampling filter of Pillow's: its kernel and how far it reaches (at scale 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Triangle, support 1 (`Image.BILINEAR`, resample 2).
    Bilinear,
    /// Keys cubic with a = -0.5, support 2 (`Image.BICUBIC`, resample 3).
    Bicubic,
}

impl Filter {
    /// The filter Pillow numbers `resample` (what processors' configs store).
    pub fn from_pil(resample: u64) -> Option<Filter> {
        match resample {
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc`: the filter widens to cover every
/// input pixel when shrinking.
fn coefficients(filter: Filter, in_size: usize, out_size: usize) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let mut first = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's truncating casts, as Pillow writes them.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
        let raw: Vec<f64> = (xmin..xmax).map(|x| filter.weight((x as f64 - center + 0.5) / filter_scale)).collect();
        let total: f64 = raw.iter().sum();
        let fixed = raw
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                let v = w * f64::from(1u32 << PRECISION_BITS);
                (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
            })
            .collect();
        first.push(xmin);
        weights.push(fixed);
    }
    Coefficients { first, weights }
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS) << 8 {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes to `width` x `height` exactly as Pillow's `Image.resize(..., BILINEAR)` does.
pub fn resize_bilinear(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize(img, width, height, Filter::Bilinear)
}

/// Resizes to `width` x `height` exactly as Pillow's `Image.resize` does for an RGB image with
/// `filter`: a horizontal pass over the rows the vertical pass reads, then a vertical pass,
/// each rounding to 8 bits.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (in_w, in_h) = (img.width as usize, img.height as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    let mut src = img.pixels.clone();
    let mut src_w = in_w;
    let vertical = coefficients(filter, in_h, out_h);
    let mut row_offset = 0;
    if out_w != in_w {
        let h = coefficients(filter, in_w, out_w);
        // Only the rows the vertical pass will read.
        let first_row = vertical.first.first().copied().unwrap_or(0);
        let last_row = vertical.first.last().zip(vertical.weights.last()).map_or(in_h, |(f, w)| f + w.len());
        let rows = last_row - first_row;
        row_offset = first_row;
        let mut out = vec![0u8; rows * out_w * 3];
        for y in 0..rows {
            let line = &src[(y + first_row) * in_w * 3..(y + first_row + 1) * in_w * 3];
            for x in 0..out_w {
                let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
                for (i, &k) in h.weights[x].iter().enumerate() {
                    let p = &line[(h.first[x] + i) * 3..(h.first[x] + i) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += i64::from(p[c]) * i64::from(k);
                    }
                }
                for c in 0..3 {
                    out[(y * out_w + x) * 3 + c] = clip8(acc[c]);
                }
            }
        }
        src = out;
        src_w = out_w;
    }
    // Same height: Pillow skips the vertical pass (the horizontal one covered every row).
    if out_h != in_h {
        let mut out = vec![0u8; out_h * src_w * 3];
        for y in 0..out_h {
            let first = vertical.first[y] - row_offset;
            for x in 0..src_w {
                let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
                for (i, &k) in vertical.weights[y].iter().enumerate() {
                    let p = &src[((first + i) * src_w + x) * 3..((first + i) * src_w + x) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += i64::from(p[c]) * i64::from(k);
                    }
                }
                for c in 0..3 {
                    out[(y * src_w + x) * 3 + c] = clip8(acc[c]);
                }
            }
        }
        src = out;
    }
    RgbImage { width, height, pixels: src }
}

/// The size Qwen2-VL's processor resizes a `height` x `width` image to (`smart_resize`): each
/// side a multiple of `factor`, the area within `min_pixels..=max_pixels`, the aspect kept
/// as far as that allows. None when the aspect ratio exceeds 200 (the processor refuses it).
pub fn smart_resize(height: u32, width: u32, factor: u32, min_pixels: u64, max_pixels: u64) -> Option<(u32, u32)> {
    let (h, w, f) = (f64::from(height), f64::from(width), f64::from(factor));
    if h.max(w) / h.min(w) > 200.0 || factor == 0 {
        return None;
    }
    // Python's round() rounds halves to even.
    let round = |v: f64| -> f64 {
        let r = v.round();
        if (v - v.trunc()).abs() == 0.5 && r % 2.0 != 0.0 { r - v.signum() } else { r }
    };
    let (mut hb, mut wb) = (round(h / f) * f, round(w / f) * f);
    if hb * wb > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        hb = f.max((h / beta / f).floor() * f);
        wb = f.max((w / beta / f).floor() * f);
    } else if hb * wb < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        hb = (h * beta / f).ceil() * f;
        wb = (w * beta / f).ceil() * f;
    }
    Some((hb as u32, wb as u32))
}

/// How a prompt's text holds images: the chat template writes `placeholder` for each, which
/// becomes `before`, the image's count of `token`, then `after` (what the Hugging Face
/// processors do to the rendered text before tokenizing it).
pub struct ImageMarkup<'a> {
    pub placeholder: &'a str,
    pub token: &'a str,
    pub before: &'a str,
    pub after: &'a str,
}

impl ImageMarkup<'_> {
    /// `text` with its placeholders expanded, the i-th to `counts[i]` tokens (placeholders past
    /// the counts are left as they are).
    pub fn expand(&self, text: &str, counts: &[usize]) -> String {
        let mut pieces = text.split(self.placeholder);
        let mut out = pieces.next().unwrap_or_default().to_string();
        for (i, rest) in pieces.enumerate() {
            match counts.get(i) {
                Some(&n) => {
                    out.push_str(self.before);
                    out.push_str(&self.token.repeat(n));
                    out.push_str(self.after);
                }
                None => out.push_str(self.placeholder),
            }
            out.push_str(rest);
        }
        out
    }
}

/// Channels-first f32 values of an RGB image: each byte times `rescale` (in f64, as
/// transformers rescales), then `(v - mean[c]) / std[c]` in f32.
pub fn normalize(img: &RgbImage, rescale: f64, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let n = img.width as usize * img.height as usize;
    let mut out = vec![0.0f32; 3 * n];
    for (i, p) in img.pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let v = (f64::from(p[c]) * rescale) as f32;
            out[c * n + i] = (v - mean[c]) / std[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(width: u32, height: u32, f: impl Fn(u32, u32, usize) -> u8) -> RgbImage {
        let mut pixels = Vec::new();
        for y in 0..height {
            for x in 0..width {
                for c in 0..3 {
                    pixels.push(f(x, y, c));
                }
            }
        }
        RgbImage { width, height, pixels }
    }

    #[test]
    fn same_size_is_unchanged_and_flat_images_stay_flat() {
        let img = image(5, 3, |x, y, c| (x * 40 + y * 7 + c as u32) as u8);
        assert_eq!(resize_bilinear(&img, 5, 3), img);
        let flat = image(37, 23, |_, _, c| [10, 128, 250][c]);
        for (w, h) in [(64, 64), (8, 8), (1, 1), (100, 7)] {
            let r = resize_bilinear(&flat, w, h);
            assert!(r.pixels.chunks(3).all(|p| p == [10, 128, 250]), "{w}x{h}");
        }
    }

    #[test]
    fn halving_averages_pairs() {
        // Shrinking 4 -> 2 widens the triangle to 2 pixels each side of the centers 1.0 and
        // 3.0: pixels 0, 1, 2 weigh 3/7, 3/7, 1/7 for the first (400/7 = 57.1) and pixels
        // 1, 2, 3 weigh 1/7, 3/7, 3/7 for the second (1280/7 = 182.9).
        let img = image(4, 1, |x, _, _| [0, 80, 160, 240][x as usize]);
        let r = resize_bilinear(&img, 2, 1);
        assert_eq!(r.pixels.chunks(3).map(|p| p[0]).collect::<Vec<_>>(), vec![57, 183]);
    }

    #[test]
    fn smart_resize_matches_the_qwen2_vl_processor() {
        // Values from transformers' smart_resize (factor 28, min 56*56, max 28*28*1280).
        let (min, max) = (56 * 56, 28 * 28 * 1280);
        assert_eq!(smart_resize(100, 151, 28, min, max), Some((112, 140)));
        assert_eq!(smart_resize(2000, 3000, 28, min, max), Some((812, 1204)));
        assert_eq!(smart_resize(42, 70, 28, min, max), Some((56, 56)));
        assert_eq!(smart_resize(1, 50, 28, min, max), Some((28, 420)));
        assert_eq!(smart_resize(23, 37, 28, min, max), Some((56, 84)));
        assert_eq!(smart_resize(640, 427, 28, min, max), Some((644, 420)));
        assert_eq!(smart_resize(10, 3000, 28, min, max), None);
    }

    #[test]
    fn transparency_composites_onto_white() {
        assert_eq!(composite_on_white([0, 0, 0, 0]), [255; 3]);
        assert_eq!(composite_on_white([10, 20, 30, 255]), [10, 20, 30]);
        let half = composite_on_white([0, 0, 0, 128]);
        assert!(half.iter().all(|&v| v == 127), "{half:?}");
    }

    #[test]
    fn limits_and_bad_data_are_errors() {
        assert_eq!(dimensions(b"not an image at all", &ImageLimits::default()), Err(ImageError::UnknownFormat));
        let limits = ImageLimits { max_bytes: 4, max_pixels: 10 };
        assert!(matches!(dimensions(b"12345", &limits), Err(ImageError::TooManyBytes { bytes: 5, limit: 4 })));
    }
}
