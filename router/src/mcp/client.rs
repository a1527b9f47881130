//! kiln as an MCP client: the servers named in `--mcp-config` (the `mcpServers` JSON that
//! desktop MCP hosts use), each kept connected by its own task. A server that cannot start,
//! dies, or stops answering pings is reported (`/health`, `kiln_router_mcp_server_up`, a log
//! line) and connected again with backoff; meanwhile requests simply do not see its tools.
//! Nothing a server does can take the router down: every exchange has a timeout, and a stdio
//! server's process is killed when its connection is dropped.

use crate::metrics::Metrics;
use axum::http::{HeaderName, HeaderValue};
use rmcp::model::{CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, ClientRequest, ContentBlock, Implementation, PingRequest, ResourceContents};
use rmcp::service::{NotificationContext, Peer, RoleClient, RunningService, ServiceError};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ClientHandler, ServiceExt};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::sync::Notify;

/// What separates a server's name from its tool's in the names models see.
pub const SEPARATOR: &str = "__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the MCP config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the MCP config {path} is not valid JSON: {source}")]
    Json { path: String, source: serde_json::Error },
    #[error("the MCP config {path}: {problem}")]
    Invalid { path: String, problem: String },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Transport {
    /// A program speaking MCP on its standard input and output.
    Stdio { command: String, args: Vec<String>, env: Vec<(String, String)>, cwd: Option<String> },
    /// A streamable HTTP endpoint.
    Http { url: String, headers: Vec<(String, String)> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServerSpec {
    pub name: String,
    pub transport: Transport,
}

/// Reads `--mcp-config`.
pub fn load(path: &std::path::Path) -> Result<Vec<ServerSpec>, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
    parse(&text).map_err(|e| match e {
        ParseError::Json(source) => ConfigError::Json { path: shown.clone(), source },
        ParseError::Invalid(problem) => ConfigError::Invalid { path: shown.clone(), problem },
    })
}

#[derive(Debug)]
pub enum ParseError {
    Json(serde_json::Error),
    Invalid(String),
}

/// Parses the `mcpServers` shape: `{"mcpServers": {"name": {"command", "args", "env", "cwd"}
/// | {"url", "headers"}}}`. Keys other hosts add (`disabled`, `autoApprove`, ...) are
/// accepted; `"disabled": true` leaves a server out.
pub fn parse(text: &str) -> Result<Vec<ServerSpec>, ParseError> {
    let invalid = |s: String| ParseError::Invalid(s);
    let root: Value = serde_json::from_str(text).map_err(ParseError::Json)?;
    let servers = root.get("mcpServers").ok_or_else(|| invalid("has no `mcpServers` object".into()))?;
    let servers = servers.as_object().ok_or_else(|| invalid("`mcpServers` must be an object of servers by name".into()))?;
    let mut out = Vec::new();
    for (name, spec) in servers {
        let problem = |p: &str| invalid(format!("server `{name}`: {p}"));
        if name.is_empty() || name.len() > 32 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') || name.contains(SEPARATOR) {
            return Err(problem("names must be 1 to 32 letters, digits, dashes or single underscores (they prefix its tools' names)"));
        }
        let spec = spec.as_object().ok_or_else(|| problem("expected an object"))?;
        if spec.get("disabled").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        let string = |key: &str| -> Result<Option<String>, ParseError> {
            match spec.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(problem(&format!("`{key}` must be a string"))),
            }
        };
        let pairs = |key: &str| -> Result<Vec<(String, String)>, ParseError> {
            match spec.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())).ok_or_else(|| problem(&format!("`{key}.{k}` must be a string"))))
                    .collect(),
                Some(_) => Err(problem(&format!("`{key}` must be an object of strings"))),
            }
        };
        let kind = string("type")?;
        let transport = match (string("command")?, string("url")?) {
            (Some(_), Some(_)) => return Err(problem("has both `command` and `url`; a server is one or the other")),
            (None, None) => return Err(problem("needs `command` (a program speaking MCP on stdio) or `url` (streamable HTTP)")),
            (Some(command), None) => {
                if kind.as_deref().is_some_and(|k| k != "stdio") {
                    return Err(problem("`type` must be `stdio` for a server with a `command`"));
                }
                let args = match spec.get("args") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(a)) => a.iter().map(|v| v.as_str().map(str::to_string).ok_or_else(|| problem("`args` must be an array of strings"))).collect::<Result<_, _>>()?,
                    Some(_) => return Err(problem("`args` must be an array of strings")),
                };
                Transport::Stdio { command, args, env: pairs("env")?, cwd: string("cwd")? }
            }
            (None, Some(url)) => {
                match kind.as_deref() {
                    None | Some("http" | "streamable-http" | "streamableHttp") => {}
                    Some("sse") => return Err(problem("the older HTTP+SSE transport is not supported; use the server's streamable HTTP endpoint")),
                    Some(other) => return Err(problem(&format!("unknown `type` `{other}` for a server with a `url`; expected `http`"))),
                }
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(problem("`url` must be an http:// or https:// URL"));
                }
                let headers = pairs("headers")?;
                for (k, v) in &headers {
                    if HeaderName::try_from(k.as_str()).is_err() || HeaderValue::try_from(v.as_str()).is_err() {
                        return Err(problem(&format!("header `{k}` is not a valid HTTP header")));
                    }
                }
                Transport::Http { url, headers }
            }
        };
        out.push(ServerSpec { name: name.clone(), transport });
    }
    Ok(out)
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// Starting a server and its `initialize` and `tools/list` exchanges.
    pub connect_timeout: Duration,
    /// One tool call.
    pub call_timeout: Duration,
    /// How often a connected server is pinged; one that does not answer within the connect
    /// timeout is reconnected.
    pub ping_interval: Duration,
    /// The longest wait between connection attempts (the wait doubles from half a second).
    pub max_backoff: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { connect_timeout: Duration::from_secs(10), call_timeout: Duration::from_secs(60), ping_interval: Duration::from_secs(15), max_backoff: Duration::from_secs(30) }
    }
}

/// A tool of a connected server, as offered to models.
#[derive(Clone, Debug)]
pub struct RemoteTool {
    /// `<server>__<tool>`, made to fit the APIs' rules for tool names.
    pub name: String,
    pub server: String,
    /// The name the server knows it by.
    pub remote: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    pub parameters: Value,
}

/// What a call gave back, as text for the model.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolOutcome {
    pub content: String,
    pub is_error: bool,
}

impl ToolOutcome {
    fn error(content: String) -> ToolOutcome {
        ToolOutcome { content, is_error: true }
    }
}

#[derive(Clone)]
enum Link {
    /// With why the last attempt failed, when one did.
    Connecting { previous: Option<String> },
    Ready { peer: Peer<RoleClient>, tools: Arc<Vec<RemoteTool>> },
    Down { error: String, retry_at: Instant },
}

struct Server {
    spec: ServerSpec,
    link: Mutex<Link>,
    /// When the server last stopped being usable (None while it is).
    down_since: Mutex<Option<Instant>>,
    /// Woken when a call finds the connection broken, so it is replaced at once.
    broken: Notify,
}

impl Server {
    fn link(&self) -> Link {
        self.link.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, link: Link) {
        let ready = matches!(link, Link::Ready { .. });
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = link;
        let mut since = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        match (ready, since.is_some()) {
            (true, _) => *since = None,
            (false, false) => *since = Some(Instant::now()),
            (false, true) => {}
        }
    }
}

/// A server's state for `/health` and `/metrics`.
pub struct ServerReport {
    pub name: String,
    pub up: bool,
    pub tools: usize,
    /// One line: `ready, 3 tools`, `connecting`, or `down for 12 s (why); retrying in 4 s`.
    pub detail: String,
}

pub struct McpHub {
    servers: Vec<Arc<Server>>,
    settings: Settings,
    metrics: Arc<Metrics>,
}

/// Which servers' tools a request wants.
#[derive(Clone, Debug, PartialEq)]
pub enum Selection {
    All,
    Named(Vec<String>),
}

impl McpHub {
    /// Starts one connecting task per server; returns at once.
    pub fn start(specs: Vec<ServerSpec>, settings: Settings, metrics: Arc<Metrics>) -> Arc<McpHub> {
        let servers: Vec<Arc<Server>> = specs
            .into_iter()
            .map(|spec| Arc::new(Server { spec, link: Mutex::new(Link::Connecting { previous: None }), down_since: Mutex::new(Some(Instant::now())), broken: Notify::new() }))
            .collect();
        let hub = Arc::new(McpHub { servers, settings, metrics });
        for server in &hub.servers {
            tokio::spawn(supervise(Arc::clone(server), hub.settings.clone(), Arc::clone(&hub.metrics)));
        }
        hub
    }

    /// The configuration of the server called `name`.
    pub fn spec(&self, name: &str) -> Option<&ServerSpec> {
        self.servers.iter().map(|s| &s.spec).find(|spec| spec.name == name)
    }

    pub fn names(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.spec.name.clone()).collect()
    }

    /// Waits until every server is connected or has failed once (for start-up logs and tests).
    pub async fn settled(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline && self.servers.iter().any(|s| matches!(s.link(), Link::Connecting { previous: None })) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The tools of the selected servers. All: those connected now; by name: each named
    /// server must be connected.
    pub fn tools(&self, selection: &Selection) -> Result<Vec<RemoteTool>, SelectionError> {
        let mut out = Vec::new();
        match selection {
            Selection::All => {
                for s in &self.servers {
                    if let Link::Ready { tools, .. } = s.link() {
                        out.extend(tools.iter().cloned());
                    }
                }
            }
            Selection::Named(names) => {
                for name in names {
                    let Some(s) = self.servers.iter().find(|s| &s.spec.name == name) else {
                        return Err(SelectionError::Unknown { name: name.clone(), known: self.names() });
                    };
                    match s.link() {
                        Link::Ready { tools, .. } => out.extend(tools.iter().cloned()),
                        Link::Connecting { previous: None } => return Err(SelectionError::Down { name: name.clone(), why: "it is still connecting".into() }),
                        Link::Connecting { previous: Some(error) } => return Err(SelectionError::Down { name: name.clone(), why: error }),
                        Link::Down { error, .. } => return Err(SelectionError::Down { name: name.clone(), why: error }),
                    }
                }
            }
        }
        Ok(out)
    }

    /// Calls `tool` with `arguments` (JSON object text). Every failure, timeouts included,
    /// comes back as an error outcome for the model to read.
    pub async fn call(&self, tool: &RemoteTool, arguments: &str) -> ToolOutcome {
        let started = Instant::now();
        let (outcome, label) = self.call_inner(tool, arguments).await;
        let server = tool.server.clone();
        self.metrics.add("kiln_router_mcp_tool_calls_total", vec![("server", server.clone()), ("outcome", label.to_string())], 1.0);
        self.metrics.observe("kiln_router_mcp_tool_call_duration_seconds", vec![("server", server)], started.elapsed().as_secs_f64());
        outcome
    }

    async fn call_inner(&self, tool: &RemoteTool, arguments: &str) -> (ToolOutcome, &'static str) {
        let Some(server) = self.servers.iter().find(|s| s.spec.name == tool.server) else {
            return (ToolOutcome::error(format!("no MCP server `{}`", tool.server)), "unavailable");
        };
        let Link::Ready { peer, .. } = server.link() else {
            return (ToolOutcome::error(format!("the MCP server `{}` is not connected; the tool could not be called", tool.server)), "unavailable");
        };
        let arguments = match serde_json::from_str::<Value>(arguments) {
            Ok(Value::Object(m)) => m,
            _ => return (ToolOutcome::error("the arguments are not a JSON object".into()), "error"),
        };
        let params = CallToolRequestParams::new(tool.remote.clone()).with_arguments(arguments);
        let secs = self.settings.call_timeout.as_secs_f64();
        match tokio::time::timeout(self.settings.call_timeout, peer.call_tool(params)).await {
            Err(_) => (ToolOutcome::error(format!("the tool did not answer within {secs} s")), "timeout"),
            Ok(Ok(result)) => {
                let is_error = result.is_error == Some(true);
                (ToolOutcome { content: result_text(&result), is_error }, if is_error { "error" } else { "ok" })
            }
            Ok(Err(ServiceError::McpError(e))) => (ToolOutcome::error(e.message.to_string()), "error"),
            Ok(Err(e)) => {
                server.broken.notify_one();
                (ToolOutcome::error(format!("the MCP server `{}` failed: {e}", tool.server)), "unavailable")
            }
        }
    }

    pub fn report(&self) -> Vec<ServerReport> {
        self.servers
            .iter()
            .map(|s| {
                let down = s.down_since.lock().unwrap_or_else(|e| e.into_inner()).map(|t| t.elapsed().as_secs());
                let (up, tools, detail) = match s.link() {
                    Link::Ready { tools, .. } => (true, tools.len(), format!("ready, {} tools", tools.len())),
                    Link::Connecting { previous: None } => (false, 0, format!("connecting (for {} s)", down.unwrap_or(0))),
                    Link::Connecting { previous: Some(error) } => (false, 0, format!("down for {} s ({error}); connecting again", down.unwrap_or(0))),
                    Link::Down { error, retry_at } => {
                        let wait = retry_at.saturating_duration_since(Instant::now()).as_secs_f64();
                        (false, 0, format!("down for {} s ({error}); retrying in {wait:.0} s", down.unwrap_or(0)))
                    }
                };
                ServerReport { name: s.spec.name.clone(), up, tools, detail }
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SelectionError {
    #[error("no MCP server `{name}`; this router has {}", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    Unknown { name: String, known: Vec<String> },
    #[error("the MCP server `{name}` is not connected: {why}")]
    Down { name: String, why: String },
}

/// A result's content as text: text blocks and text resources as they are, other content
/// named by what it is (the model reads text only), the structured result when there is
/// nothing else.
fn result_text(r: &CallToolResult) -> String {
    let mut parts: Vec<String> = Vec::new();
    for block in &r.content {
        parts.push(match block {
            ContentBlock::Text(t) => t.text.clone(),
            ContentBlock::Resource(e) => match &e.resource {
                ResourceContents::TextResourceContents { text, .. } => text.clone(),
                ResourceContents::BlobResourceContents { uri, .. } => format!("[binary resource {uri}]"),
                _ => "[a resource of a kind this router does not read]".to_string(),
            },
            ContentBlock::ResourceLink(link) => format!("[resource {}]", link.uri),
            ContentBlock::Image(i) => format!("[an image ({}), not shown]", i.mime_type),
            ContentBlock::Audio(a) => format!("[audio ({}), not shown]", a.mime_type),
            _ => "[content of a kind this router does not read]".to_string(),
        });
    }
    if parts.is_empty() {
        if let Some(s) = &r.structured_content {
            return s.to_string();
        }
    }
    parts.join("\n")
}

/// The name models see for a server's tool: `<server>__<tool>` with characters the APIs do
/// not allow in names made underscores; None when that is longer than they allow.
pub fn offered_name(server: &str, tool: &str) -> Option<String> {
    let clean: String = tool.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
    let name = format!("{server}{SEPARATOR}{clean}");
    (!clean.is_empty() && name.len() <= 64).then_some(name)
}

/// The client side of one connection: hears that the server's tools changed.
#[derive(Clone)]
struct Listener {
    changed: Arc<Notify>,
}

impl ClientHandler for Listener {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(ClientCapabilities::default(), Implementation::new("kiln-router", env!("CARGO_PKG_VERSION")))
    }

    async fn on_tool_list_changed(&self, _: NotificationContext<RoleClient>) {
        self.changed.notify_one();
    }
}

type Connection = RunningService<RoleClient, Listener>;

async fn connect(spec: &ServerSpec, listener: Listener) -> Result<Connection, String> {
    match &spec.transport {
        Transport::Stdio { command, args, env, cwd } => {
            let mut cmd = tokio::process::Command::new(command);
            cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
            if let Some(dir) = cwd {
                cmd.current_dir(dir);
            }
            let (transport, stderr) =
                TokioChildProcess::builder(cmd).stderr(std::process::Stdio::piped()).spawn().map_err(|e| format!("cannot start `{command}`: {e}"))?;
            // A server's own messages go to the router's log, under its name.
            if let Some(stderr) = stderr {
                let name = spec.name.clone();
                tokio::spawn(async move {
                    let mut lines = tokio::io::BufReader::new(stderr).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        tracing::info!(mcp_server = %name, "{line}");
                    }
                });
            }
            listener.serve(transport).await.map_err(|e| format!("the MCP handshake failed: {e}"))
        }
        Transport::Http { url, headers } => {
            let headers: HashMap<HeaderName, HeaderValue> =
                headers.iter().filter_map(|(k, v)| Some((HeaderName::try_from(k.as_str()).ok()?, HeaderValue::try_from(v.as_str()).ok()?))).collect();
            let config = StreamableHttpClientTransportConfig::with_uri(url.clone()).custom_headers(headers);
            listener.serve(StreamableHttpClientTransport::from_config(config)).await.map_err(|e| format!("the MCP handshake with {url} failed: {e}"))
        }
    }
}

async fn list_tools(server: &str, peer: &Peer<RoleClient>) -> Result<Vec<RemoteTool>, String> {
    let listed = peer.list_all_tools().await.map_err(|e| format!("listing its tools failed: {e}"))?;
    let mut tools: Vec<RemoteTool> = Vec::new();
    for t in listed {
        let Some(name) = offered_name(server, &t.name) else {
            tracing::warn!(mcp_server = %server, "tool `{}` is left out: `{server}{SEPARATOR}<name>` would be longer than 64 characters", t.name);
            continue;
        };
        if tools.iter().any(|o| o.name == name) {
            tracing::warn!(mcp_server = %server, "tool `{}` is left out: its name reads as `{name}`, like another tool's", t.name);
            continue;
        }
        let mut parameters = Map::clone(&t.input_schema);
        parameters.entry("type").or_insert_with(|| Value::String("object".into()));
        tools.push(RemoteTool {
            name,
            server: server.to_string(),
            remote: t.name.to_string(),
            description: t.description.map(|d| d.to_string()),
            parameters: Value::Object(parameters),
        });
    }
    Ok(tools)
}

async fn ping(peer: &Peer<RoleClient>) -> Result<(), ServiceError> {
    peer.send_request(ClientRequest::PingRequest(PingRequest { method: Default::default(), extensions: Default::default() })).await.map(|_| ())
}

/// Keeps one server connected for the router's lifetime.
async fn supervise(server: Arc<Server>, settings: Settings, metrics: Arc<Metrics>) {
    let name = server.spec.name.clone();
    let first_wait = Duration::from_millis(500);
    let mut backoff = first_wait;
    let mut previous = None;
    loop {
        server.set(Link::Connecting { previous: previous.take() });
        let changed = Arc::new(Notify::new());
        let attempt = async {
            let connection = connect(&server.spec, Listener { changed: Arc::clone(&changed) }).await?;
            let tools = list_tools(&name, connection.peer()).await?;
            Ok::<_, String>((connection, tools))
        };
        let error = match tokio::time::timeout(settings.connect_timeout, attempt).await {
            Err(_) => format!("it did not finish connecting within {} s", settings.connect_timeout.as_secs_f64()),
            Ok(Err(e)) => e,
            Ok(Ok((connection, tools))) => {
                tracing::info!(mcp_server = %name, "MCP server connected with {} tools: {}", tools.len(), tools.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", "));
                let peer = connection.peer().clone();
                server.set(Link::Ready { peer: peer.clone(), tools: Arc::new(tools) });
                backoff = first_wait;
                serve_until_lost(&server, connection, &peer, &changed, &settings).await
            }
        };
        metrics.add("kiln_router_mcp_connect_failures_total", vec![("server", name.clone())], 1.0);
        tracing::warn!(mcp_server = %name, "MCP server unavailable: {error}; retrying in {:.1} s", backoff.as_secs_f64());
        server.set(Link::Down { error: error.clone(), retry_at: Instant::now() + backoff });
        previous = Some(error);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(settings.max_backoff);
    }
}

/// Watches a connected server until it is lost, refreshing its tools when it says they
/// changed; returns why it was lost. Dropping the connection ends it (and its process).
async fn serve_until_lost(server: &Server, connection: Connection, peer: &Peer<RoleClient>, changed: &Notify, settings: &Settings) -> String {
    let name = &server.spec.name;
    let closed = connection.waiting();
    tokio::pin!(closed);
    let mut pings = tokio::time::interval(settings.ping_interval);
    pings.tick().await;
    loop {
        tokio::select! {
            _ = &mut closed => return "the connection closed".into(),
            _ = server.broken.notified() => return "a call found the connection broken".into(),
            _ = pings.tick() => match tokio::time::timeout(settings.connect_timeout, ping(peer)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return format!("a ping failed: {e}"),
                Err(_) => return format!("it did not answer a ping within {} s", settings.connect_timeout.as_secs_f64()),
            },
            _ = changed.notified() => match tokio::time::timeout(settings.connect_timeout, list_tools(name, peer)).await {
                Ok(Ok(tools)) => {
                    tracing::info!(mcp_server = %name, "MCP server's tools changed; now {}", tools.len());
                    server.set(Link::Ready { peer: peer.clone(), tools: Arc::new(tools) });
                }
                Ok(Err(e)) => return e,
                Err(_) => return format!("listing its changed tools took longer than {} s", settings.connect_timeout.as_secs_f64()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_desktop_shape() {
        let specs = parse(
            r#"{"mcpServers": {
                "files": {"command": "npx", "args": ["-y", "server-files", "/tmp"], "env": {"DEBUG": "1"}, "autoApprove": []},
                "search": {"type": "http", "url": "https://example.com/mcp", "headers": {"Authorization": "Bearer k"}},
                "off": {"command": "x", "disabled": true}
            }}"#,
        )
        .unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(
            specs[0],
            ServerSpec {
                name: "files".into(),
                transport: Transport::Stdio { command: "npx".into(), args: vec!["-y".into(), "server-files".into(), "/tmp".into()], env: vec![("DEBUG".into(), "1".into())], cwd: None }
            }
        );
        assert_eq!(specs[1].transport, Transport::Http { url: "https://example.com/mcp".into(), headers: vec![("Authorization".into(), "Bearer k".into())] });
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        let problem = |text: &str| match parse(text) {
            Err(ParseError::Invalid(p)) => p,
            Err(ParseError::Json(e)) => format!("json: {e}"),
            Ok(s) => panic!("accepted {s:?}"),
        };
        assert!(problem("[]").contains("no `mcpServers`"));
        assert!(problem(r#"{"mcpServers": {"a b": {"command": "x"}}}"#).contains("server `a b`: names must be"));
        assert!(problem(r#"{"mcpServers": {"a__b": {"command": "x"}}}"#).contains("single underscores"));
        assert!(problem(r#"{"mcpServers": {"a": {}}}"#).contains("needs `command`"));
        assert!(problem(r#"{"mcpServers": {"a": {"command": "x", "url": "http://h"}}}"#).contains("both"));
        assert!(problem(r#"{"mcpServers": {"a": {"command": ["x"]}}}"#).contains("`command` must be a string"));
        assert!(problem(r#"{"mcpServers": {"a": {"command": "x", "args": [1]}}}"#).contains("`args` must be an array of strings"));
        assert!(problem(r#"{"mcpServers": {"a": {"url": "ftp://h"}}}"#).contains("http:// or https://"));
        assert!(problem(r#"{"mcpServers": {"a": {"type": "sse", "url": "http://h/sse"}}}"#).contains("HTTP+SSE transport is not supported"));
        assert!(problem(r#"{"mcpServers": {"a": {"url": "http://h", "headers": {"bad header": "v"}}}}"#).contains("not a valid HTTP header"));
        assert!(matches!(parse("{"), Err(ParseError::Json(_))));
    }

    #[test]
    fn offered_names_fit_the_apis() {
        assert_eq!(offered_name("files", "read_file").as_deref(), Some("files__read_file"));
        assert_eq!(offered_name("web", "search.query v2").as_deref(), Some("web__search_query_v2"));
        assert_eq!(offered_name("s", &"x".repeat(61)).map(|n| n.len()), Some(64));
        assert_eq!(offered_name("s", &"x".repeat(62)), None);
        assert_eq!(offered_name("s", ""), None);
    }

    #[test]
    fn results_read_as_text() {
        let r: CallToolResult = serde_json::from_value(serde_json::json!({
            "content": [{"type": "text", "text": "a"}, {"type": "image", "data": "AA==", "mimeType": "image/png"}],
            "isError": false
        }))
        .unwrap();
        assert_eq!(result_text(&r), "a\n[an image (image/png), not shown]");
        let r: CallToolResult = serde_json::from_value(serde_json::json!({"content": [], "structuredContent": {"t": 21}})).unwrap();
        assert_eq!(result_text(&r), r#"{"t":21}"#);
    }
}
