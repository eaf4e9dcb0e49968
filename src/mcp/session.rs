//! One live MCP client session (rmcp), over stdio or Streamable HTTP.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use process_wrap::tokio::{CommandWrap, KillOnDrop, ProcessGroup};
use rmcp::model::{
    CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation, ProtocolVersion,
};
use rmcp::service::{NotificationContext, Peer, RunningService, ServiceExt};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ClientHandler, RoleClient, ServiceError};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Mutex;
use tokio_util::task::TaskTracker;

use super::config::{ServerSpec, Transport};
use super::schema::normalise;

/// How long a server may take to start and answer `initialize`.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long closing a session may take before it is abandoned.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A tool as the server lists it, with its schema already normalised.
#[derive(Debug, Clone)]
pub struct RemoteTool {
    pub name: String,
    pub description: String,
    pub parameters: Value,
    pub read_only: bool,
}

/// Receives server notifications. `tools/list_changed` marks the cached
/// list stale.
#[derive(Debug, Clone)]
struct Handler {
    tools_stale: Arc<AtomicBool>,
    info: ClientConfig,
}

impl ClientHandler for Handler {
    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.tools_stale.store(true, Ordering::SeqCst);
    }

    fn get_info(&self) -> ClientConfig {
        self.info.clone()
    }
}

/// Why a call failed.
#[derive(Debug)]
pub enum CallError {
    /// The session is gone (the server crashed or disconnected).
    Disconnected(String),
    /// The server answered with a protocol error.
    Protocol(String),
}

/// A running session. Calls go through a clone of the peer, so several run
/// at once; `service` is only taken out to close the session.
pub struct Session {
    peer: Peer<RoleClient>,
    service: Mutex<Option<RunningService<RoleClient, Handler>>>,
    tools_stale: Arc<AtomicBool>,
    tools: Mutex<Option<Arc<Vec<RemoteTool>>>>,
    /// Set when a request found the transport gone.
    disconnected: AtomicBool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl Session {
    /// Starts the server of `spec` and runs the MCP handshake. A stdio
    /// server's stderr is forwarded to the log by a task on `tasks`.
    pub async fn start(spec: &ServerSpec, tasks: &TaskTracker) -> Result<Session, String> {
        let tools_stale = Arc::new(AtomicBool::new(true));
        let mut info = ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("mcpcord", env!("CARGO_PKG_VERSION")),
        );
        // Servers in use today negotiate the initialize-era protocol.
        info.protocol_version = ProtocolVersion::LATEST_WITH_INITIALIZE;
        let handler = Handler {
            tools_stale: tools_stale.clone(),
            info,
        };
        let service = tokio::time::timeout(STARTUP_TIMEOUT, connect(spec, handler, tasks))
            .await
            .map_err(|_| {
                format!(
                    "did not finish starting within {} s",
                    STARTUP_TIMEOUT.as_secs()
                )
            })??;
        Ok(Session {
            peer: service.peer().clone(),
            service: Mutex::new(Some(service)),
            tools_stale,
            tools: Mutex::new(None),
            disconnected: AtomicBool::new(false),
        })
    }

    /// Whether the connection to the server is gone.
    pub fn is_closed(&self) -> bool {
        self.disconnected.load(Ordering::SeqCst) || self.peer.is_transport_closed()
    }

    /// The server's tools, listed again after `tools/list_changed`.
    pub async fn tools(&self) -> Result<Arc<Vec<RemoteTool>>, String> {
        let mut cached = self.tools.lock().await;
        if let Some(tools) = cached.as_ref()
            && !self.tools_stale.load(Ordering::SeqCst)
        {
            return Ok(tools.clone());
        }
        self.tools_stale.store(false, Ordering::SeqCst);
        let listed = self.peer.list_all_tools().await.map_err(|e| {
            self.tools_stale.store(true, Ordering::SeqCst);
            format!("listing its tools failed: {e}")
        })?;
        let tools: Vec<RemoteTool> = listed
            .into_iter()
            .map(|tool| {
                let json = serde_json::to_value(&tool).unwrap_or(Value::Null);
                RemoteTool {
                    description: tool
                        .description
                        .as_deref()
                        .or(tool.title.as_deref())
                        .unwrap_or(&tool.name)
                        .to_owned(),
                    parameters: normalise(json.get("inputSchema").unwrap_or(&Value::Null)),
                    read_only: json
                        .pointer("/annotations/readOnlyHint")
                        .and_then(Value::as_bool)
                        == Some(true),
                    name: tool.name.into_owned(),
                }
            })
            .collect();
        let tools = Arc::new(tools);
        *cached = Some(tools.clone());
        Ok(tools)
    }

    /// Calls `tool`; the result is the `CallToolResult` as JSON.
    pub async fn call(&self, tool: &str, arguments: Value) -> Result<Value, CallError> {
        let mut params = CallToolRequestParams::new(tool.to_owned());
        if let Value::Object(map) = arguments {
            params = params.with_arguments(map);
        }
        match self.peer.call_tool(params).await {
            Ok(result) => Ok(serde_json::to_value(&result).unwrap_or(Value::Null)),
            Err(error)
                if self.is_closed()
                    || matches!(
                        error,
                        ServiceError::TransportClosed | ServiceError::TransportSend(_)
                    ) =>
            {
                self.disconnected.store(true, Ordering::SeqCst);
                Err(CallError::Disconnected(error.to_string()))
            }
            Err(ServiceError::McpError(error)) => {
                Err(CallError::Protocol(error.message.to_string()))
            }
            Err(error) => Err(CallError::Protocol(error.to_string())),
        }
    }

    /// Ends the session: the transport closes and a stdio server's whole
    /// process group is killed.
    pub async fn close(&self) {
        if let Some(service) = self.service.lock().await.take() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, service.cancel()).await;
        }
    }
}

async fn connect(
    spec: &ServerSpec,
    handler: Handler,
    tasks: &TaskTracker,
) -> Result<RunningService<RoleClient, Handler>, String> {
    match &spec.transport {
        Transport::Stdio {
            command,
            args,
            env,
            cwd,
        } => {
            let mut cmd = tokio::process::Command::new(command);
            cmd.args(args);
            cmd.envs(env.iter().map(|(k, v)| (k, v.expose())));
            if let Some(cwd) = cwd {
                cmd.current_dir(cwd);
            }
            let mut wrapped = CommandWrap::from(cmd);
            // Its own process group, so `npx`/`uvx` grandchildren die with it.
            wrapped.wrap(ProcessGroup::leader()).wrap(KillOnDrop);
            let (transport, stderr) = TokioChildProcess::builder(wrapped)
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("could not run {command:?}: {e}"))?;
            if let Some(stderr) = stderr {
                let server = spec.name.clone();
                tasks.spawn(async move {
                    let mut lines = BufReader::new(stderr).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        tracing::info!(target: "mcpcord::mcp::stderr", server = %server, "{line}");
                    }
                });
            }
            handler
                .serve(transport)
                .await
                .map_err(|e| format!("the MCP handshake failed: {e}"))
        }
        Transport::Http { url, headers } => {
            let mut custom = HashMap::new();
            for (name, value) in headers {
                let name = name
                    .parse::<reqwest::header::HeaderName>()
                    .map_err(|_| format!("header name {name:?} is not valid"))?;
                let value = reqwest::header::HeaderValue::from_str(value.expose())
                    .map_err(|_| format!("the value of header {name} is not valid"))?;
                custom.insert(name, value);
            }
            let config =
                StreamableHttpClientTransportConfig::with_uri(url.as_str()).custom_headers(custom);
            let transport = StreamableHttpClientTransport::from_config(config);
            handler
                .serve(transport)
                .await
                .map_err(|e| format!("could not connect to {url}: {e}"))
        }
    }
}
