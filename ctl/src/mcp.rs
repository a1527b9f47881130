//! `kilnctl mcp`: the router's MCP endpoint (`/mcp`, streamable HTTP) served on standard
//! input and output, for MCP hosts that launch their servers as programs. Requests go through
//! one upstream connection; progress comes back to the host under the host's own token, and a
//! call the host cancels is cancelled upstream too (which ends its generation on the worker).

use anyhow::{Context, Result};
use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResponse, CancelledNotificationParam, ClientRequest, ErrorData, ProgressToken, ServerResult, ListResourcesResult, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam,
    ReadResourceRequestParams, ReadResourceResponse, ResultType, ServerConfig,
};
use rmcp::service::{NotificationContext, Peer, PeerRequestOptions, RequestContext, RoleClient, RoleServer, ServiceError};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientHandler, ServerHandler, ServiceExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

// Results are passed on as the router sent them, marked complete again: the upstream
// connection's parsing leaves that marker out, and hosts on the current protocol need it.

/// The host's side, known once it has sent a request, and which host progress token each
/// upstream call's token stands for (the upstream connection numbers its own).
#[derive(Clone, Default)]
struct Host {
    peer: Arc<Mutex<Option<Peer<RoleServer>>>>,
    tokens: Arc<Mutex<HashMap<ProgressToken, ProgressToken>>>,
}

impl Host {
    fn remember(&self, peer: &Peer<RoleServer>) {
        *self.peer.lock().unwrap_or_else(|e| e.into_inner()) = Some(peer.clone());
    }

    fn get(&self) -> Option<Peer<RoleServer>> {
        self.peer.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<ProgressToken, ProgressToken>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The connection to the router: passes its progress notifications on to the host.
struct Upstream {
    host: Host,
}

impl ClientHandler for Upstream {
    async fn on_progress(&self, mut params: ProgressNotificationParam, _: NotificationContext<RoleClient>) {
        let Some(token) = self.host.tokens().get(&params.progress_token).cloned() else { return };
        params.progress_token = token;
        if let Some(host) = self.host.get() {
            let _ = host.notify_progress(params).await;
        }
    }
}

#[derive(Clone)]
struct Bridge {
    upstream: Peer<RoleClient>,
    info: ServerConfig,
    host: Host,
}

fn upstream_error(e: ServiceError) -> ErrorData {
    match e {
        ServiceError::McpError(e) => e,
        other => ErrorData::internal_error(format!("the router's MCP endpoint: {other}"), None),
    }
}

impl ServerHandler for Bridge {
    fn get_info(&self) -> ServerConfig {
        self.info.clone()
    }

    async fn list_tools(&self, params: Option<PaginatedRequestParams>, ctx: RequestContext<RoleServer>) -> Result<ListToolsResult, ErrorData> {
        self.host.remember(&ctx.peer);
        let mut r = self.upstream.list_tools(params).await.map_err(upstream_error)?;
        r.result_type = Some(ResultType::COMPLETE);
        Ok(r)
    }

    async fn call_tool(&self, params: CallToolRequestParams, ctx: RequestContext<RoleServer>) -> Result<CallToolResponse, ErrorData> {
        self.host.remember(&ctx.peer);
        let request = ClientRequest::CallToolRequest(CallToolRequest::new(params));
        let handle = self.upstream.send_request_with_option(request, PeerRequestOptions::no_options()).await.map_err(upstream_error)?;
        let (id, upstream_token) = (handle.id.clone(), handle.progress_token.clone());
        if let Some(token) = ctx.meta.get_progress_token() {
            self.host.tokens().insert(upstream_token.clone(), token);
        }
        let result = tokio::select! {
            _ = ctx.ct.cancelled() => {
                // The host gave up: so does the router, which ends the generation.
                let _ = self.upstream.notify_cancelled(CancelledNotificationParam::new(Some(id), Some("cancelled by the MCP host".into()))).await;
                Err(ErrorData::internal_error("cancelled", None))
            }
            r = handle.await_response() => match r.map_err(upstream_error)? {
                ServerResult::CallToolResult(mut result) => {
                    result.result_type = Some(ResultType::COMPLETE);
                    Ok(CallToolResponse::Complete(result))
                }
                _ => Err(ErrorData::internal_error("the router's MCP endpoint answered a tool call with something else", None)),
            },
        };
        self.host.tokens().remove(&upstream_token);
        result
    }

    async fn list_resources(&self, params: Option<PaginatedRequestParams>, ctx: RequestContext<RoleServer>) -> Result<ListResourcesResult, ErrorData> {
        self.host.remember(&ctx.peer);
        let mut r = self.upstream.list_resources(params).await.map_err(upstream_error)?;
        r.result_type = Some(ResultType::COMPLETE);
        Ok(r)
    }

    async fn read_resource(&self, params: ReadResourceRequestParams, ctx: RequestContext<RoleServer>) -> Result<ReadResourceResponse, ErrorData> {
        self.host.remember(&ctx.peer);
        match self.upstream.read_resource_once(params).await.map_err(upstream_error)? {
            ReadResourceResponse::Complete(mut result) => {
                result.result_type = Some(ResultType::COMPLETE);
                Ok(ReadResourceResponse::Complete(result))
            }
            other => Ok(other),
        }
    }
}

pub async fn run(router: &str, api_key: Option<String>) -> Result<()> {
    let url = format!("{}/mcp", router.trim_end_matches('/'));
    let mut config = StreamableHttpClientTransportConfig::with_uri(url.clone());
    config.auth_header = api_key;
    let host = Host::default();
    let upstream = Upstream { host: host.clone() }
        .serve(StreamableHttpClientTransport::from_config(config))
        .await
        .with_context(|| format!("cannot open an MCP connection to {url}"))?;
    let peer = upstream.peer().peer_info().context("the router's MCP endpoint sent no server information")?;
    // The host negotiates its own protocol version with the bridge; the rest is the router's.
    let mut info = ServerConfig::new(peer.capabilities.clone());
    if let Some(server) = &peer.server_info {
        info = info.with_server_info(server.clone());
    }
    if let Some(text) = &peer.instructions {
        info = info.with_instructions(text.clone());
    }
    let bridge = Bridge { upstream: upstream.peer().clone(), info, host };
    let server = bridge.serve(rmcp::transport::stdio()).await.context("cannot serve MCP on standard input and output")?;
    server.waiting().await.context("the MCP session on standard input and output failed")?;
    Ok(())
}
