//! Model file formats.

pub mod gguf;
pub mod gguf_value;
pub mod gguf_export;
pub mod gguf_write;
pub mod hf_tokenizer;
pub mod gguf_vocab;
pub mod names;
pub mod safetensors;
