//! Images in chat requests: OpenAI `image_url` parts and Anthropic `image` blocks, read from
//! `data:` URLs or base64 fields, checked (size, pixels, that they decode) before anything is
//! sent to a worker, which prepares them for its model.

use super::ApiError;
use base64::Engine;
use kiln_shared::image::{ImageError, ImageLimits};

/// Media types accepted for images, as OpenAI and Anthropic list them.
const MEDIA_TYPES: &[&str] = &["image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"];

/// Bytes of an image given as base64 with its media type; `path` names the field in errors.
pub fn from_base64(media_type: &str, data: &str, path: &str, limits: &ImageLimits) -> Result<Vec<u8>, ApiError> {
    if !MEDIA_TYPES.contains(&media_type.to_ascii_lowercase().as_str()) {
        return Err(ApiError::field(path, format!("media type `{media_type}` is not supported (image/png, image/jpeg, image/webp, image/gif)")));
    }
    // Base64 takes 4 characters per 3 bytes: refuse before decoding what is too large anyway.
    if data.len() / 4 * 3 > limits.max_bytes + 3 {
        return Err(ApiError::field(path, ImageError::TooManyBytes { bytes: data.len() / 4 * 3, limit: limits.max_bytes }.to_string()));
    }
    let cleaned: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(cleaned.as_bytes()).map_err(|e| ApiError::field(path, format!("is not valid base64: {e}")))
}

/// Bytes of an image given as a URL: `data:<media type>;base64,<data>`. Other URLs are refused
/// (the router does not fetch images from the network).
pub fn from_url(url: &str, path: &str, limits: &ImageLimits) -> Result<Vec<u8>, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, data)) = rest.split_once(',') else { return Err(ApiError::field(path, "a data URL needs a `,` before its data")) };
        let Some(media_type) = meta.strip_suffix(";base64") else { return Err(ApiError::field(path, "only base64 data URLs are supported (data:image/png;base64,...)")) };
        return from_base64(media_type, data, path, limits);
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(ApiError::field(path, "image URLs are not fetched; send the image inline as a data: URL (data:image/png;base64,...)"));
    }
    Err(ApiError::field(path, "expected a data: URL (data:image/png;base64,...)"))
}

/// Checks that every image decodes within the limits (on a blocking thread: decoding is CPU
/// work); the error names the image's field.
pub async fn check_all(images: &[(String, Vec<u8>)], limits: ImageLimits) -> Result<(), ApiError> {
    if images.is_empty() {
        return Ok(());
    }
    let work: Vec<(String, Vec<u8>)> = images.to_vec();
    let result = tokio::task::spawn_blocking(move || {
        for (path, data) in &work {
            if let Err(e) = kiln_shared::image::decode_rgb(data, &limits) {
                return Err(ApiError::field(path.as_str(), format!("is not a usable image: {e}")));
            }
        }
        Ok(())
    })
    .await;
    result.map_err(|e| ApiError::internal(format!("image check failed: {e}")))?
}
