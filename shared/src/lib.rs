//! What kiln's router and workers share: the tokenizer, chat templates and sampling
//! parameters, image decoding, so both sides tokenize, render and validate with one implementation.

pub mod chat;
pub mod image;
pub mod sampling;
pub mod tokenizer;
