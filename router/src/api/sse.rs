//! Server-sent event responses driven by a generation. A task relays the generation's updates
//! as events; when the client disconnects the task ends and drops the generation, which
//! cancels it on the worker.

use crate::error::ApiError;
use crate::generate::{Update, Updates};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// What the event writer is told: the next update, or `None` at the end.
pub type Step = Option<Result<Update, ApiError>>;

/// Streams `first`, then the events `on` makes of each step, until the generation ends or
/// fails.
pub fn stream(mut generation: impl Updates, first: Vec<Event>, mut on: impl FnMut(Step) -> Vec<Event> + Send + 'static) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        for e in first {
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
        loop {
            let step = tokio::select! {
                _ = tx.closed() => return,
                step = generation.next_update() => step,
            };
            let last = !matches!(step, Some(Ok(_)));
            for e in on(step) {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            if last {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response()
}

pub fn json_event(value: &serde_json::Value) -> Event {
    Event::default().data(value.to_string())
}
