//! A small HTTP/1.1 client for the router's JSON and event-stream responses.

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub struct Client {
    base: String,
    api_key: Option<String>,
    inner: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
}

impl Client {
    pub fn new(base: &str, api_key: Option<String>) -> Result<Client> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            bail!("the router URL must start with http:// (got `{base}`)");
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector);
        Ok(Client { base, api_key, inner })
    }

    async fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Response<Incoming>> {
        let mut req = Request::builder().method(method).uri(format!("{}{path}", self.base));
        if let Some(key) = &self.api_key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        self.inner.request(req.body(body)?).await.with_context(|| format!("cannot reach the router at {}", self.base))
    }

    pub async fn get_text(&self, path: &str) -> Result<(u16, String)> {
        let response = self.send("GET", path, None).await?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }

    pub async fn get_json(&self, path: &str) -> Result<Value> {
        let (status, text) = self.get_text(path).await?;
        let value: Value = serde_json::from_str(&text).with_context(|| format!("{path}: not JSON: {text}"))?;
        if status != 200 {
            bail!("{path}: {}", error_message(&value));
        }
        Ok(value)
    }

    /// POSTs `body` and returns the JSON answer, or the API's error message.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        let response = self.send("POST", path, Some(body)).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value: Value = serde_json::from_slice(&bytes).with_context(|| format!("{path}: not JSON: {}", String::from_utf8_lossy(&bytes)))?;
        if status != 200 {
            bail!("{}", error_message(&value));
        }
        Ok(value)
    }

    /// POSTs `body` and returns the event stream, or the API's error message.
    pub async fn post_stream(&self, path: &str, body: &Value) -> Result<EventStream> {
        let response = self.send("POST", path, Some(body)).await?;
        if response.status() != 200 {
            let bytes = response.into_body().collect().await?.to_bytes();
            let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            bail!("{}", error_message(&value));
        }
        Ok(EventStream { body: response.into_body(), buffer: Vec::new() })
    }
}

fn error_message(v: &Value) -> String {
    v["error"]["message"].as_str().map_or_else(|| v.to_string(), str::to_string)
}

/// The `data:` payloads of a server-sent event stream.
pub struct EventStream {
    body: Incoming,
    buffer: Vec<u8>,
}

impl EventStream {
    /// The next event's data, or None at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<String>> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&event);
                let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.strip_prefix(' ').unwrap_or(d)).collect();
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                return Ok(Some(data.join("\n")));
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(bytes) = frame.map_err(|e| anyhow!("the stream broke: {e}"))?.into_data() {
                        self.buffer.extend_from_slice(&bytes);
                    }
                }
                None => return Ok(None),
            }
        }
    }
}
