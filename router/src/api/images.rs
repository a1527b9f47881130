//! Images in chat requests: OpenAI `image_url` parts and Anthropic `image` blocks, read from
//! `data:` URLs or base64 fields or fetched from http(s) URLs (with --allow-image-urls),
//! checked (size, pixels, that they decode) before anything is sent to a worker, which
//! prepares them for its model.

use super::ApiError;
use crate::tools::{Part, Turn};
use crate::AppState;
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

/// An image given as a URL: `data:<media type>;base64,<data>` is read here; an http(s) URL
/// is left for `resolve` to fetch.
pub fn from_url(url: &str, path: &str, limits: &ImageLimits) -> Result<Part, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, data)) = rest.split_once(',') else { return Err(ApiError::field(path, "a data URL needs a `,` before its data")) };
        let Some(media_type) = meta.strip_suffix(";base64") else { return Err(ApiError::field(path, "only base64 data URLs are supported (data:image/png;base64,...)")) };
        return Ok(Part::Image { path: path.to_string(), data: from_base64(media_type, data, path, limits)? });
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Ok(Part::RemoteImage { path: path.to_string(), url: url.to_string() });
    }
    Err(ApiError::field(path, "expected a data: URL (data:image/png;base64,...) or an http(s) URL"))
}

/// Fetches the images of `turns` named by http(s) URL, when the router allows it: each must
/// answer 200 with an image media type within the size limit and the time allowed.
pub async fn resolve(state: &AppState, turns: &mut [Turn], limits: &ImageLimits) -> Result<(), ApiError> {
    let remote = turns.iter().flat_map(|t| &t.parts).any(|p| matches!(p, Part::RemoteImage { .. }));
    if !remote {
        return Ok(());
    }
    let Some(timeout) = state.config.image_urls else {
        let path = turns.iter().flat_map(|t| &t.parts).find_map(|p| match p {
            Part::RemoteImage { path, .. } => Some(path.clone()),
            _ => None,
        });
        return Err(ApiError::field(path.unwrap_or_default(), "image URLs are not fetched by this router (it runs without --allow-image-urls); send the image inline as a data: URL"));
    };
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::limited(5))
        .build()
        .map_err(|e| ApiError::internal(format!("cannot make an HTTP client: {e}")))?;
    for part in turns.iter_mut().flat_map(|t| t.parts.iter_mut()) {
        if let Part::RemoteImage { path, url } = part {
            let data = fetch(&client, url, path, limits).await?;
            *part = Part::Image { path: path.clone(), data };
        }
    }
    Ok(())
}

async fn fetch(client: &reqwest::Client, url: &str, path: &str, limits: &ImageLimits) -> Result<Vec<u8>, ApiError> {
    let failed = |what: String| ApiError::field(path, format!("could not fetch the image at {url}: {what}"));
    let mut response = client.get(url).send().await.map_err(|e| failed(if e.is_timeout() { "timed out".into() } else { e.to_string() }))?;
    if !response.status().is_success() {
        return Err(failed(format!("the server answered {}", response.status())));
    }
    let media_type = response.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let essence = media_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if !MEDIA_TYPES.contains(&essence.as_str()) {
        return Err(failed(format!("it is served as `{media_type}`, not as an image (image/png, image/jpeg, image/webp, image/gif)")));
    }
    if let Some(len) = response.content_length().filter(|&n| n as usize > limits.max_bytes) {
        return Err(failed(ImageError::TooManyBytes { bytes: len as usize, limit: limits.max_bytes }.to_string()));
    }
    let mut data = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| failed(if e.is_timeout() { "timed out".into() } else { e.to_string() }))? {
        if data.len() + chunk.len() > limits.max_bytes {
            return Err(failed(format!("the image is over the limit of {} bytes", limits.max_bytes)));
        }
        data.extend_from_slice(&chunk);
    }
    Ok(data)
}

/// Checks that every image decodes within the limits (on a blocking thread: decoding is CPU
/// work); the error names the image's field.
pub async fn check_all(images: &[(&str, &[u8])], limits: ImageLimits) -> Result<(), ApiError> {
    if images.is_empty() {
        return Ok(());
    }
    // Owned for the blocking thread.
    let work: Vec<(String, Vec<u8>)> = images.iter().map(|(path, data)| (path.to_string(), data.to_vec())).collect();
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
