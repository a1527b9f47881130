//! The worker's error type. Variants carry the file, key or tensor concerned so a message
//! can be read without a debugger.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: not a GGUF file (starts with {found:02x?}, expected \"GGUF\")")]
    NotGguf { path: PathBuf, found: Vec<u8> },

    #[error("{path}: malformed GGUF at byte {offset}: {what}")]
    Gguf { path: PathBuf, offset: u64, what: String },

    #[error("metadata `{key}`: {what}")]
    Metadata { key: String, what: String },

    #[error("tensor `{name}` {what}")]
    Tensor { name: String, what: String },

    #[error("unsupported architecture `{found}` (kiln supports: {supported})")]
    UnsupportedArchitecture { found: String, supported: String },

    #[error("unsupported tokenizer: {0}")]
    UnsupportedTokenizer(String),

    #[error(transparent)]
    Tokenizer(#[from] kiln_shared::tokenizer::TokenizerError),

    #[error(transparent)]
    ChatTemplate(#[from] kiln_shared::chat::ChatTemplateError),

    #[error(transparent)]
    Kernel(#[from] kiln_kernels::KernelError),

    #[error("{0}")]
    InvalidRequest(String),

    /// No room for the request now; a later try may succeed.
    #[error("{0}")]
    Busy(String),

    #[error("prompt has {prompt_tokens} tokens but the context holds {context_len}")]
    PromptTooLong { prompt_tokens: usize, context_len: usize },

    /// A rank of a tensor-parallel group died, hung or fell out of step.
    #[error(transparent)]
    Collective(#[from] crate::parallel::CollectiveError),

    /// The model cannot be split as asked (heads, blocks or experts do not divide).
    /// The device a model computes on failed or cannot do what was asked (out of device
    /// memory, a format or layer the backend lacks).
    #[error("{0}")]
    Backend(String),

    #[error("cannot split the model over {size} tensor-parallel ranks: {what}")]
    Sharding { size: usize, what: String },

    #[error("model `{name}`: {what}")]
    ModelSource { name: String, what: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
