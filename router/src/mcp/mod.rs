//! The Model Context Protocol, both ways: `server` is kiln's own `/mcp` endpoint; `client`
//! connects to the servers of `--mcp-config`, whose tools models can use in a request that
//! opts in (the tool loop is `api::mcp_loop`).

pub mod client;
pub mod server;

pub use server::service;
