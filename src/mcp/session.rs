//! One live MCP client session (rmcp), over stdio or Streamable HTTP.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use rmcp::handler::client::progress::ProgressDispatcher;
use rmcp::model::ErrorCode;
use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CancelTaskParams, CancelledNotificationParam,
    ClientCapabilities, ClientConfig, ClientRequest, CustomRequest, ElicitRequestParams,
    ElicitResult, ElicitationAction, ElicitationCapability, FormElicitationCapability,
    GetTaskParams, Implementation, InputRequest, InputRequests, InputResponses, ListToolsRequest,
    PaginatedRequestParams, ProgressNotificationParam, ProtocolVersion, Request, RequestId,
    RequestOptionalParam, ServerResult, TASKS_EXTENSION_ID, UpdateTaskParams,
    UrlElicitationCapability,
};
use rmcp::service::{
    ClientLifecycleMode, ClientServiceExt, NotificationContext, Peer, PeerRequestOptions,
    RequestContext, RunningService,
};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::auth::AuthClient;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, RoleClient, ServiceError};
use serde_json::Value;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::config::{ServerSpec, Transport};
use super::oauth::TokenVault;
use super::schema::{normalise, open_object};
use super::stdio::{ChildTransport, Launch};
use super::tasks::State as TaskState;
use crate::config::{Limits, Redactor};
use crate::conversation::CallContext;
use crate::conversation::elicitation::Answer;

/// How long closing a session may take before it is abandoned.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pages of `tools/list` read before the rest is left out.
pub const MAX_LIST_PAGES: usize = 32;
/// Times one call may come back asking for input before it is given up.
pub const MAX_INPUT_ROUNDS: usize = 8;
/// Characters of a server's instructions kept and sent to the model.
pub const MAX_INSTRUCTIONS_CHARS: usize = 4096;
/// Characters of a tool description kept and sent to the model.
pub const MAX_DESCRIPTION_CHARS: usize = 2048;

/// A tool as the server lists it, with its schema already normalised.
#[derive(Debug, Clone)]
pub struct RemoteTool {
    pub name: String,
    pub description: String,
    pub parameters: Value,
    pub read_only: bool,
}

/// A server's tools, and what was wrong with the list it sent.
#[derive(Debug, Clone, Default)]
pub struct ServerTools {
    pub tools: Vec<RemoteTool>,
    /// One sentence per tool that was changed or left out, and per bound hit.
    pub warnings: Vec<String>,
    /// What the server says about using it (from `server/discover` or
    /// `initialize`), shortened to [`MAX_INSTRUCTIONS_CHARS`].
    pub instructions: Option<String>,
}

/// A question a server of the handshake era sent as its own request during
/// a call, on its way to that call; the answer goes back as MCP's JSON.
type Asked = (Value, oneshot::Sender<Value>);

/// Questions waiting for a running call to take them; more are declined.
const QUESTIONS_WAITING: usize = 4;

/// Receives server notifications and requests. `tools/list_changed` marks
/// the cached list stale; progress goes to whoever waits for that request;
/// an `elicitation/create` goes to the running call.
#[derive(Debug, Clone)]
struct Handler {
    tools_stale: Arc<AtomicBool>,
    progress: ProgressDispatcher,
    info: ClientConfig,
    questions: mpsc::Sender<Asked>,
    /// Calls running now: a question while more than one runs cannot be
    /// told apart, and is declined.
    calls: Arc<std::sync::atomic::AtomicUsize>,
    server: String,
    /// Set on `prompts/list_changed` and `resources/list_changed`.
    lists_stale: Arc<AtomicBool>,
}

/// What a server offers besides tools, from its capabilities.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offers {
    pub prompts: bool,
    pub resources: bool,
    pub completions: bool,
}

/// A server's prompts, resources and resource templates, as listed.
#[derive(Debug, Default)]
pub struct Lists {
    pub prompts: Vec<Value>,
    pub resources: Vec<Value>,
    pub templates: Vec<Value>,
}

impl Handler {
    /// Passes a server's question to the call that is running, or
    /// declines it when there is none (or which one cannot be told).
    async fn pass_question(&self, params: Value) -> Value {
        let running = self.calls.load(Ordering::SeqCst);
        if running != 1 {
            tracing::warn!(
                server = %self.server,
                running,
                "a server asked a question {}; declined",
                if running > 1 { "while several of its calls ran, so which one it meant is not known" } else { "outside any call" }
            );
            return Answer::Decline.to_mcp();
        }
        let (reply, answer) = oneshot::channel();
        if self.questions.try_send((params, reply)).is_err() {
            return Answer::Decline.to_mcp();
        }
        // Dropped unanswered (the call ended first): declined.
        answer.await.unwrap_or_else(|_| Answer::Decline.to_mcp())
    }
}

impl ClientHandler for Handler {
    async fn on_prompt_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.lists_stale.store(true, Ordering::SeqCst);
    }

    async fn on_resource_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.lists_stale.store(true, Ordering::SeqCst);
    }

    async fn create_elicitation(
        &self,
        request: ElicitRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, rmcp::ErrorData> {
        let params = serde_json::to_value(&request).unwrap_or(Value::Null);
        let answer = self.pass_question(params).await;
        Ok(serde_json::from_value(answer)
            .unwrap_or_else(|_| ElicitResult::new(ElicitationAction::Decline)))
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.tools_stale.store(true, Ordering::SeqCst);
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.progress.handle_notification(params).await;
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

impl CallError {
    fn sentence(&self) -> String {
        match self {
            CallError::Disconnected(m) => format!("the server disconnected ({m})"),
            CallError::Protocol(m) => m.clone(),
        }
    }
}

/// Sends `notifications/cancelled` for a request nobody waits for any more.
struct CancelOnDrop {
    peer: Peer<RoleClient>,
    /// `None` once the answer has arrived.
    id: Option<RequestId>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else {
            return;
        };
        let peer = self.peer.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let param =
                CancelledNotificationParam::new(Some(id), Some("abandoned by mcpcord".into()));
            // Bounded: a peer that does not take it within a second is skipped.
            runtime.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), peer.notify_cancelled(param))
                    .await;
            });
        }
    }
}

/// A result as JSON; whatever rmcp could not type is kept as the server
/// sent it.
fn as_json(result: ServerResult) -> Value {
    match result {
        ServerResult::CustomResult(custom) => custom.0,
        typed => serde_json::to_value(&typed).unwrap_or(Value::Null),
    }
}

/// The answer to something a server of the current revision asks before it
/// finishes a call of `tool`. Roots and sampling are not declared, so a
/// server that asks for them anyway gets the answer of a client without.
async fn answer_input(
    server: &str,
    tool: &str,
    request: InputRequest,
    context: &dyn CallContext,
) -> Result<Value, CallError> {
    match request {
        InputRequest::Elicitation(request) => {
            let params = serde_json::to_value(&request)
                .ok()
                .and_then(|mut r| r.get_mut("params").map(Value::take))
                .unwrap_or(Value::Null);
            Ok(ask(server, tool, &params, context).await)
        }
        InputRequest::ListRoots(_) => Ok(serde_json::json!({"roots": []})),
        InputRequest::CreateMessage(_) => Err(CallError::Protocol(
            "it asked to use the model itself (sampling), which mcpcord does not offer".into(),
        )),
        _ => Err(CallError::Protocol(
            "it asked for a kind of input mcpcord does not know".into(),
        )),
    }
}

/// Whether a tool's error result is a 2025-11-25 server's refusal of a
/// plain call to a tool that runs only as a task.
fn wants_a_task(result: &rmcp::model::CallToolResult) -> bool {
    result.is_error == Some(true)
        && result.content.iter().any(|block| {
            block
                .as_text()
                .is_some_and(|t| t.text.contains("-32601") && t.text.contains("task"))
        })
}

/// A `tools/call` of `params`.
fn call_request(params: Value) -> Result<ClientRequest, serde_json::Error> {
    let params: CallToolRequestParams = serde_json::from_value(params)?;
    let request: CallToolRequest = Request::new(params);
    Ok(ClientRequest::CallToolRequest(request))
}

/// A request of the 2025-11-25 tasks about `task_id`, which rmcp does not
/// type.
fn custom(method: &str, task_id: &str) -> ClientRequest {
    ClientRequest::CustomRequest(CustomRequest::new(
        method,
        Some(serde_json::json!({"taskId": task_id})),
    ))
}

/// Asks the person what `server` wants to know during a call of `tool`,
/// through the call's context; a question that cannot be shown is
/// declined.
async fn ask(server: &str, tool: &str, params: &Value, context: &dyn CallContext) -> Value {
    match super::elicit::question(server, tool, params) {
        Ok(question) => context.elicit(question).await.to_mcp(),
        Err(problem) => {
            tracing::warn!(server, tool, "a server's question was declined: {problem}");
            Answer::Decline.to_mcp()
        }
    }
}

/// Counts a running call while it lives. When the last one ends, the
/// questions nobody took are declined, so none reaches a later call.
struct Running<'a>(&'a Session);

impl<'a> Running<'a> {
    fn new(session: &'a Session) -> Self {
        session.calls.fetch_add(1, Ordering::SeqCst);
        Running(session)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.0.calls.fetch_sub(1, Ordering::SeqCst) == 1
            && let Ok(mut waiting) = self.0.questions.try_lock()
        {
            while let Ok((_, reply)) = waiting.try_recv() {
                let _ = reply.send(Answer::Decline.to_mcp());
            }
        }
    }
}

/// Reads one `tools/list` page into `out`; returns the next cursor.
fn read_tools_page(result: &Value, out: &mut ServerTools) -> Result<Option<String>, String> {
    let items = result
        .get("tools")
        .and_then(Value::as_array)
        .ok_or("its tools/list answer has no \"tools\" list")?;
    for item in items {
        match read_tool(item) {
            Ok((tool, warning)) => {
                out.warnings.extend(warning);
                out.tools.push(tool);
            }
            Err(warning) => out.warnings.push(warning),
        }
    }
    Ok(result
        .get("nextCursor")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
        .map(str::to_owned))
}

/// One tool as listed, leniently: only a name is required.
fn read_tool(item: &Value) -> Result<(RemoteTool, Option<String>), String> {
    let name = item
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.trim().is_empty())
        .ok_or("a tool without a name was left out")?;
    let text = |key: &str| item.get(key).and_then(Value::as_str);
    let (parameters, warning) = match item.get("inputSchema").map(normalise) {
        Some(Ok(schema)) => (schema, None),
        Some(Err(problem)) => (
            open_object(),
            Some(format!(
                "the tool \"{name}\" is offered with an open argument schema: {problem}"
            )),
        ),
        None => (
            open_object(),
            Some(format!(
                "the tool \"{name}\" has no inputSchema; it is offered with an open argument schema"
            )),
        ),
    };
    let description = text("description").or(text("title")).unwrap_or(name);
    let description = shorten(description, MAX_DESCRIPTION_CHARS);
    let tool = RemoteTool {
        description,
        parameters,
        read_only: item
            .pointer("/annotations/readOnlyHint")
            .and_then(Value::as_bool)
            == Some(true),
        name: name.to_owned(),
    };
    Ok((tool, warning))
}

/// `text` cut to `chars` characters, marked with "…" when cut.
fn shorten(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Scheme, host and port of `url`: its path and query may carry a token
/// expanded from `${VAR}`, and these sentences reach logs and Discord.
fn origin(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(parsed) => match (parsed.host_str(), parsed.port()) {
            (Some(host), Some(port)) => format!("{}://{host}:{port}", parsed.scheme()),
            (Some(host), None) => format!("{}://{host}", parsed.scheme()),
            _ => "the server's URL".to_owned(),
        },
        Err(_) => "the server's URL".to_owned(),
    }
}

/// The first `shown` names, then how many more: "a, b, and 3 more".
pub fn shorten_list(names: &[impl AsRef<str>], shown: usize) -> String {
    let mut text = names
        .iter()
        .take(shown)
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > shown {
        text.push_str(&format!(", and {} more", names.len() - shown));
    }
    text
}

/// A running session. Calls go through a clone of the peer, so several run
/// at once; `service` is only taken out to close the session.
pub struct Session {
    /// The server's name, for logs.
    server: String,
    peer: Peer<RoleClient>,
    service: Mutex<Option<RunningService<RoleClient, Handler>>>,
    tools_stale: Arc<AtomicBool>,
    progress: ProgressDispatcher,
    tools: Mutex<Option<Arc<ServerTools>>>,
    /// Set when a request found the transport gone.
    disconnected: AtomicBool,
    /// See [`ServerTools::instructions`].
    instructions: Option<String>,
    /// Questions the server sent as requests, for the running call.
    questions: Mutex<mpsc::Receiver<Asked>>,
    calls: Arc<std::sync::atomic::AtomicUsize>,
    offers: Offers,
    lists_stale: Arc<AtomicBool>,
    lists: Mutex<Option<Arc<Lists>>>,
    era: Era,
    /// Tools of a 2025-11-25 server found to run only as tasks.
    task_tools: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        crate::metrics::mcp_session(&self.server, -1.0);
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl Session {
    /// Starts the server of `spec` and runs the MCP handshake of `era`
    /// (both, when unknown). A stdio server's stderr is forwarded to the log
    /// by a task on `tasks`.
    pub async fn start(
        spec: &ServerSpec,
        limits: &Limits,
        redactor: &Redactor,
        tasks: &TaskTracker,
        era: Era,
        vault: Option<&Arc<dyn TokenVault>>,
    ) -> Result<Session, String> {
        let tools_stale = Arc::new(AtomicBool::new(true));
        let mut info = ClientConfig::new(
            capabilities(),
            Implementation::new("mcpcord", env!("CARGO_PKG_VERSION")),
        );
        if era == Era::Legacy {
            info = info.with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE);
        }
        let progress = ProgressDispatcher::new();
        let (questions, waiting) = mpsc::channel(QUESTIONS_WAITING);
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let lists_stale = Arc::new(AtomicBool::new(true));
        let handler = Handler {
            lists_stale: lists_stale.clone(),
            tools_stale: tools_stale.clone(),
            progress: progress.clone(),
            info,
            questions,
            calls: calls.clone(),
            server: spec.name.clone(),
        };
        let timeout = limits.mcp_start_timeout;
        let connecting = connect(spec, limits, redactor, handler, tasks, era, vault);
        let service = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| {
                format!(
                    "it did not finish starting within {} s (MCP_START_TIMEOUT_SECS)",
                    timeout.as_secs()
                )
            })??;
        let info = service.peer().peer_info();
        let offers = info.as_ref().map_or_else(Offers::default, |i| Offers {
            prompts: i.capabilities.prompts.is_some(),
            resources: i.capabilities.resources.is_some(),
            completions: i.capabilities.completions.is_some(),
        });
        let instructions = info
            .as_ref()
            .and_then(|i| i.instructions.as_deref())
            .map(str::trim)
            .filter(|text| !text.is_empty())
            .map(|text| shorten(text, MAX_INSTRUCTIONS_CHARS));
        tracing::info!(
            server = %spec.name,
            protocol = info.as_ref().map(|i| i.protocol_version.to_string()).unwrap_or_default(),
            "MCP session started"
        );
        let era = match info.as_ref().map(|i| &i.protocol_version) {
            Some(version) if *version == ProtocolVersion::LATEST => Era::Modern,
            Some(_) => Era::Legacy,
            None => Era::Unknown,
        };
        crate::metrics::mcp_session(&spec.name, 1.0);
        Ok(Session {
            era,
            task_tools: Default::default(),
            instructions,
            server: spec.name.clone(),
            peer: service.peer().clone(),
            service: Mutex::new(Some(service)),
            tools_stale,
            progress,
            tools: Mutex::new(None),
            disconnected: AtomicBool::new(false),
            questions: Mutex::new(waiting),
            calls,
            offers,
            lists_stale,
            lists: Mutex::new(None),
        })
    }

    /// Whether the connection to the server is gone.
    pub fn is_closed(&self) -> bool {
        self.disconnected.load(Ordering::SeqCst) || self.peer.is_transport_closed()
    }

    /// The server's tools, listed again after `tools/list_changed`. Listing
    /// is bounded in time, pages and tools; a tool with an unusable schema
    /// is offered with an open one, or left out alone, with a warning.
    pub async fn tools(&self, limits: &Limits) -> Result<Arc<ServerTools>, String> {
        let mut cached = self.tools.lock().await;
        if let Some(tools) = cached.as_ref()
            && !self.tools_stale.load(Ordering::SeqCst)
        {
            return Ok(tools.clone());
        }
        self.tools_stale.store(false, Ordering::SeqCst);
        let timeout = limits.mcp_list_timeout;
        let listed = tokio::time::timeout(timeout, self.list_tools(limits))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "listing its tools took longer than {} s (MCP_LIST_TIMEOUT_SECS)",
                    timeout.as_secs()
                ))
            });
        let tools = listed.inspect_err(|_| self.tools_stale.store(true, Ordering::SeqCst))?;
        for warning in &tools.warnings {
            tracing::warn!(server = %self.server, "{warning}");
        }
        let tools = Arc::new(tools);
        *cached = Some(tools.clone());
        Ok(tools)
    }

    async fn list_tools(&self, limits: &Limits) -> Result<ServerTools, String> {
        let mut out = ServerTools {
            instructions: self.instructions.clone(),
            ..Default::default()
        };
        let mut cursor: Option<String> = None;
        for page in 1.. {
            let params = PaginatedRequestParams::default().with_cursor(cursor.take());
            let request: ListToolsRequest = RequestOptionalParam::with_param(params);
            let result = self
                .typed_request(ClientRequest::ListToolsRequest(request), &(), None)
                .await
                .map(as_json)
                .map_err(|e| format!("listing its tools failed: {}", e.sentence()))?;
            let next = read_tools_page(&result, &mut out)?;
            if out.tools.len() > limits.mcp_max_tools_per_server {
                let extra: Vec<String> = out
                    .tools
                    .drain(limits.mcp_max_tools_per_server..)
                    .map(|t| t.name)
                    .collect();
                out.warnings.push(format!(
                    "it lists more than {} tools (MCP_MAX_TOOLS_PER_SERVER); these were left out: {}",
                    limits.mcp_max_tools_per_server,
                    shorten_list(&extra, 10)
                ));
                break;
            }
            match next {
                None => break,
                Some(_) if page >= MAX_LIST_PAGES => {
                    out.warnings.push(format!(
                        "its tool list goes on past {MAX_LIST_PAGES} pages; the rest was left out"
                    ));
                    break;
                }
                Some(next) => cursor = Some(next),
            }
        }
        Ok(out)
    }

    /// Calls `tool`; the result is the `CallToolResult` as JSON, as the
    /// server sent it when rmcp could not read it.
    /// A server of the current revision that needs something first answers
    /// `input_required`; the call is sent again with the answers and the
    /// state it gave, at most [`MAX_INPUT_ROUNDS`] times.
    ///
    /// The result may be a task (see [`super::tasks::created`]): a server
    /// of the current revision makes one when it decides to, one of
    /// 2025-11-25 when the call asks for it (see [`Session::call_legacy`]).
    pub async fn call(
        &self,
        tool: &str,
        arguments: Value,
        context: &dyn CallContext,
    ) -> Result<Value, CallError> {
        let mut params = serde_json::json!({"name": tool});
        if arguments.is_object() {
            params["arguments"] = arguments;
        }
        if self.era == Era::Legacy {
            return self.call_legacy(tool, params, context).await;
        }
        self.with_inputs(tool, params, context, call_request).await
    }

    /// A call to a server of the handshake era. A tool that must run as a
    /// task (2025-11-25 `taskSupport: "required"`, which rmcp's tool list
    /// does not keep) is refused with -32601 when called plainly (the
    /// TypeScript SDK sends that error as the tool's error result); it is
    /// called again as a task, and so from then on in this session.
    async fn call_legacy(
        &self,
        tool: &str,
        mut params: Value,
        context: &dyn CallContext,
    ) -> Result<Value, CallError> {
        let _running = Running::new(self);
        let as_task = self
            .task_tools
            .lock()
            .expect("task tools poisoned")
            .contains(tool);
        if !as_task {
            let request = call_request(params.clone()).map_err(|e| {
                CallError::Protocol(format!("its request could not be written ({e})"))
            })?;
            match self.raw_request(request, context, Some(tool)).await {
                Err(ServiceError::McpError(error)) if error.code == ErrorCode::METHOD_NOT_FOUND => {
                    self.runs_as_task(tool);
                }
                Ok(ServerResult::CallToolResult(result)) if wants_a_task(&result) => {
                    self.runs_as_task(tool);
                }
                answered => return answered.map(as_json).map_err(|e| self.failed(e)),
            }
        }
        params["task"] = serde_json::json!({"ttl": super::tasks::REQUESTED_TTL_MS});
        // rmcp's typed call has no `task`: the request goes as written.
        let request = ClientRequest::CustomRequest(CustomRequest::new("tools/call", Some(params)));
        Ok(as_json(
            self.typed_request(request, context, Some(tool)).await?,
        ))
    }

    fn runs_as_task(&self, tool: &str) {
        tracing::debug!(server = %self.server, tool, "the tool runs only as a task; calling it as one");
        self.task_tools
            .lock()
            .expect("task tools poisoned")
            .insert(tool.to_owned());
    }

    /// Where the task `task_id` made of a call of `tool` is. Questions its
    /// server asks go to `context`: those of the current revision come with
    /// the status and are answered with `tasks/update`; those of 2025-11-25
    /// come while its result is fetched (`tasks/result`, which waits for
    /// the end), so the result is fetched once the task needs input or is
    /// done.
    pub async fn task_state(
        &self,
        tool: &str,
        task_id: &str,
        legacy: bool,
        context: &dyn CallContext,
    ) -> Result<TaskState, CallError> {
        let _running = Running::new(self);
        let request = if legacy {
            custom("tasks/get", task_id)
        } else {
            ClientRequest::GetTaskRequest(Request::new(GetTaskParams::new(task_id)))
        };
        let answer = as_json(self.typed_request(request, context, None).await?);
        let state = super::tasks::state(&answer).map_err(CallError::Protocol)?;
        match state {
            TaskState::InputRequired {
                requests: Some(requests),
                message,
            } if !legacy => {
                let requests: InputRequests = serde_json::from_value(requests).map_err(|e| {
                    CallError::Protocol(format!(
                        "its task asked for input that could not be read ({e})"
                    ))
                })?;
                let mut answers = InputResponses::new();
                for (key, request) in requests {
                    answers.insert(
                        key,
                        answer_input(&self.server, tool, request, context).await?,
                    );
                }
                let update = ClientRequest::UpdateTaskRequest(Request::new(UpdateTaskParams::new(
                    task_id, answers,
                )));
                self.typed_request(update, context, None).await?;
                Ok(TaskState::Working {
                    message,
                    poll_ms: None,
                })
            }
            TaskState::InputRequired { .. } | TaskState::Completed { result: None } if legacy => {
                let result = self
                    .typed_request(custom("tasks/result", task_id), context, Some(tool))
                    .await?;
                Ok(TaskState::Completed {
                    result: Some(as_json(result)),
                })
            }
            state => Ok(state),
        }
    }

    /// Asks the server to stop the task `task_id`.
    pub async fn cancel_task(&self, task_id: &str, legacy: bool) -> Result<(), CallError> {
        let request = if legacy {
            custom("tasks/cancel", task_id)
        } else {
            ClientRequest::CancelTaskRequest(Request::new(CancelTaskParams::new(task_id)))
        };
        self.typed_request(request, &(), None).await.map(drop)
    }

    /// Sends the request `build` makes of `params` on behalf of `what` (a
    /// tool, prompt or resource), and again with the answers and the state
    /// while the server answers `input_required`, at most
    /// [`MAX_INPUT_ROUNDS`] times. The result is JSON.
    async fn with_inputs(
        &self,
        what: &str,
        mut params: Value,
        context: &dyn CallContext,
        build: impl Fn(Value) -> Result<ClientRequest, serde_json::Error>,
    ) -> Result<Value, CallError> {
        let _running = Running::new(self);
        for round in 0..MAX_INPUT_ROUNDS {
            let request = build(params.clone()).map_err(|e| {
                CallError::Protocol(format!("its request could not be written ({e})"))
            })?;
            let asked = match self.typed_request(request, context, Some(what)).await? {
                ServerResult::InputRequiredResult(asked) => asked,
                other => return Ok(as_json(other)),
            };
            let requests = asked.input_requests.unwrap_or_default();
            if requests.is_empty() && asked.request_state.is_none() {
                return Err(CallError::Protocol(
                    "it asked for input without saying what it needs".into(),
                ));
            }
            if requests.is_empty() {
                // Only its state: the server is not done yet.
                let wait = Duration::from_millis(50 << round.min(3));
                tokio::time::sleep(wait).await;
            }
            let mut answers = serde_json::Map::new();
            for (key, request) in requests {
                let answer = answer_input(&self.server, what, request, context).await?;
                answers.insert(key, answer);
            }
            let object = params
                .as_object_mut()
                .expect("request parameters are an object");
            object.remove("inputResponses");
            object.remove("requestState");
            if !answers.is_empty() {
                object.insert("inputResponses".into(), Value::Object(answers));
            }
            if let Some(state) = asked.request_state {
                object.insert("requestState".into(), Value::String(state));
            }
        }
        Err(CallError::Protocol(format!(
            "it asked for input {MAX_INPUT_ROUNDS} times without finishing the call"
        )))
    }

    /// The revision the server turned out to speak.
    pub fn era(&self) -> Era {
        self.era
    }

    /// What the server offers besides tools.
    pub fn offers(&self) -> Offers {
        self.offers
    }

    /// Its prompts, resources and resource templates (what it offers of
    /// them), listed again after a `list_changed`. Bounded like tools.
    pub async fn lists(&self, limits: &Limits) -> Result<Arc<Lists>, String> {
        let mut cached = self.lists.lock().await;
        if let Some(lists) = cached.as_ref()
            && !self.lists_stale.load(Ordering::SeqCst)
        {
            return Ok(lists.clone());
        }
        self.lists_stale.store(false, Ordering::SeqCst);
        let listing = async {
            let mut lists = Lists::default();
            if self.offers.prompts {
                lists.prompts = self
                    .list_all("prompts", |p| {
                        ClientRequest::ListPromptsRequest(RequestOptionalParam::with_param(p))
                    })
                    .await?;
            }
            if self.offers.resources {
                lists.resources = self
                    .list_all("resources", |p| {
                        ClientRequest::ListResourcesRequest(RequestOptionalParam::with_param(p))
                    })
                    .await?;
                lists.templates = self
                    .list_all("resourceTemplates", |p| {
                        ClientRequest::ListResourceTemplatesRequest(
                            RequestOptionalParam::with_param(p),
                        )
                    })
                    .await
                    .unwrap_or_default();
            }
            Ok::<_, String>(lists)
        };
        let timeout = limits.mcp_list_timeout;
        let lists = tokio::time::timeout(timeout, listing)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "listing its prompts and resources took longer than {} s (MCP_LIST_TIMEOUT_SECS)",
                    timeout.as_secs()
                ))
            })
            .inspect_err(|_| self.lists_stale.store(true, Ordering::SeqCst))?;
        let lists = Arc::new(lists);
        *cached = Some(lists.clone());
        Ok(lists)
    }

    /// Every page of a list, up to [`MAX_LIST_PAGES`]: the items under `key`.
    async fn list_all(
        &self,
        key: &str,
        request: impl Fn(PaginatedRequestParams) -> ClientRequest,
    ) -> Result<Vec<Value>, String> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let params = PaginatedRequestParams::default().with_cursor(cursor.take());
            let page = self
                .typed_request(request(params), &(), None)
                .await
                .map(as_json)
                .map_err(|e| format!("listing its {key} failed: {}", e.sentence()))?;
            items.extend(
                page.get(key)
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
            );
            match page.get("nextCursor").and_then(Value::as_str) {
                Some(next) if !next.is_empty() => cursor = Some(next.to_owned()),
                _ => break,
            }
        }
        Ok(items)
    }

    /// `prompts/get`: the prompt's messages, filled in with `arguments`.
    pub async fn get_prompt(
        &self,
        name: &str,
        arguments: serde_json::Map<String, Value>,
        context: &dyn CallContext,
    ) -> Result<Value, CallError> {
        let params = serde_json::json!({"name": name, "arguments": arguments});
        let build = |params: Value| {
            let request: rmcp::model::GetPromptRequest =
                Request::new(serde_json::from_value(params)?);
            Ok(ClientRequest::GetPromptRequest(request))
        };
        self.with_inputs(name, params, context, build).await
    }

    /// `resources/read`: the contents of `uri`.
    pub async fn read_resource(
        &self,
        uri: &str,
        context: &dyn CallContext,
    ) -> Result<Value, CallError> {
        let params = serde_json::json!({"uri": uri});
        let build = |params: Value| {
            let request: rmcp::model::ReadResourceRequest =
                Request::new(serde_json::from_value(params)?);
            Ok(ClientRequest::ReadResourceRequest(request))
        };
        self.with_inputs(uri, params, context, build).await
    }

    /// `completion/complete` for the argument `argument` of the prompt or
    /// resource template `reference` (`{"type": "ref/prompt", "name": …}`),
    /// typed so far as `value`, with the other arguments given.
    pub async fn complete(
        &self,
        reference: Value,
        argument: &str,
        value: &str,
        others: &serde_json::Map<String, Value>,
    ) -> Result<Vec<String>, CallError> {
        let mut params =
            serde_json::json!({"ref": reference, "argument": {"name": argument, "value": value}});
        if !others.is_empty() {
            params["context"] = serde_json::json!({"arguments": others});
        }
        let request: rmcp::model::CompleteRequest =
            Request::new(serde_json::from_value(params).map_err(|e| {
                CallError::Protocol(format!("its request could not be written ({e})"))
            })?);
        let result = self
            .typed_request(ClientRequest::CompleteRequest(request), &(), None)
            .await
            .map(as_json)?;
        Ok(result
            .pointer("/completion/values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect())
    }

    /// Sends one request and returns its result, passing on the progress
    /// the server reports, and for a call of `tool`, the questions it asks
    /// meanwhile. Dropping the future (a timeout, an aborted turn) cancels
    /// the request on the server.
    async fn typed_request(
        &self,
        request: ClientRequest,
        context: &dyn CallContext,
        tool: Option<&str>,
    ) -> Result<ServerResult, CallError> {
        self.raw_request(request, context, tool)
            .await
            .map_err(|e| self.failed(e))
    }

    /// [`Session::typed_request`] with rmcp's error as it is.
    async fn raw_request(
        &self,
        request: ClientRequest,
        context: &dyn CallContext,
        tool: Option<&str>,
    ) -> Result<ServerResult, ServiceError> {
        let handle = self
            .peer
            .send_request_with_option(request, PeerRequestOptions::no_options())
            .await?;
        let mut guard = CancelOnDrop {
            peer: self.peer.clone(),
            id: Some(handle.id.clone()),
        };
        let mut reports = self.progress.subscribe(handle.progress_token.clone()).await;
        let response = handle.await_response();
        tokio::pin!(response);
        let result = loop {
            tokio::select! {
                result = &mut response => break result,
                Some(report) = reports.next() => {
                    context.progress(report.progress, report.total, report.message);
                }
                Some((params, reply)) = self.next_question(tool.is_some()) => {
                    let tool = tool.unwrap_or_default();
                    let _ = reply.send(ask(&self.server, tool, &params, context).await);
                }
            }
        };
        guard.id = None;
        result
    }

    /// The next question the server sent as a request, when `listening`.
    async fn next_question(&self, listening: bool) -> Option<Asked> {
        if !listening {
            return std::future::pending().await;
        }
        self.questions.lock().await.recv().await
    }

    fn failed(&self, error: ServiceError) -> CallError {
        if self.is_closed()
            || matches!(
                error,
                ServiceError::TransportClosed | ServiceError::TransportSend(_)
            )
        {
            self.disconnected.store(true, Ordering::SeqCst);
            return CallError::Disconnected(error.to_string());
        }
        match error {
            ServiceError::McpError(error) => CallError::Protocol(error.message.to_string()),
            error => CallError::Protocol(error.to_string()),
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

/// What mcpcord does for servers: forms and web pages to open
/// (elicitation), and calls run as tasks (the tasks extension). Nothing
/// else is declared.
fn capabilities() -> ClientCapabilities {
    let mut capabilities = ClientCapabilities::default();
    capabilities
        .extensions
        .get_or_insert_with(Default::default)
        .insert(TASKS_EXTENSION_ID.to_owned(), Default::default());
    capabilities.elicitation = Some(
        ElicitationCapability::new()
            .with_form(FormElicitationCapability::new())
            .with_url(UrlElicitationCapability::new()),
    );
    capabilities
}

/// Which revision of the protocol a server speaks, once a session found
/// out: later sessions start the right way at once (a server that ignores
/// `server/discover` would otherwise cost each one rmcp's 10 s probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Era {
    #[default]
    Unknown,
    /// The stateless revision, through `server/discover`.
    Modern,
    /// The `initialize` handshake.
    Legacy,
}

/// How to start a session of a server of `era`. Unknown: the current
/// (stateless) revision first, through `server/discover`; a server that
/// does not know it gets the `initialize` handshake of the newest revision
/// that has one.
fn lifecycle(era: Era) -> ClientLifecycleMode {
    match era {
        Era::Unknown => ClientLifecycleMode::Auto {
            preferred_versions: vec![ProtocolVersion::LATEST],
            legacy_version: Some(ProtocolVersion::LATEST_WITH_INITIALIZE),
        },
        Era::Modern => ClientLifecycleMode::Discover {
            preferred_versions: vec![ProtocolVersion::LATEST],
        },
        Era::Legacy => ClientLifecycleMode::Initialize,
    }
}

async fn connect(
    spec: &ServerSpec,
    limits: &Limits,
    redactor: &Redactor,
    handler: Handler,
    tasks: &TaskTracker,
    era: Era,
    vault: Option<&Arc<dyn TokenVault>>,
) -> Result<RunningService<RoleClient, Handler>, String> {
    match &spec.transport {
        Transport::Stdio {
            command,
            args,
            env,
            cwd,
            inherit_env,
        } => {
            let launch = Launch {
                server: &spec.name,
                command,
                args,
                env,
                cwd: cwd.as_deref(),
                inherit: inherit_env,
                max_message_bytes: limits.mcp_max_message_bytes,
            };
            let transport = ChildTransport::spawn(&launch, redactor, tasks)?;
            handler
                .serve_with_lifecycle(transport, lifecycle(era))
                .await
                .map_err(|e| format!("the MCP handshake failed: {e}"))
        }
        Transport::Http {
            url,
            headers,
            oauth,
        } => {
            let mut custom = HashMap::new();
            for (name, value) in headers {
                let name = name
                    .parse::<reqwest::header::HeaderName>()
                    .map_err(|_| format!("header name {name:?} is not valid"))?;
                let value = reqwest::header::HeaderValue::from_str(value.expose())
                    .map_err(|_| format!("the value of header {name} is not valid"))?;
                custom.insert(name, value);
            }
            let config = StreamableHttpClientTransportConfig::with_uri(url.as_str())
                .custom_headers(custom)
                .max_json_response_size(limits.mcp_max_message_bytes)
                .max_sse_event_size(limits.mcp_max_message_bytes);
            let Some(oauth) = oauth else {
                let transport = StreamableHttpClientTransport::from_config(config);
                return handler
                    .serve_with_lifecycle(transport, lifecycle(era))
                    .await
                    .map_err(|e| format!("could not connect to {}: {e}", origin(url)));
            };
            let manager = super::oauth::stored_manager(&spec.name, url, oauth, vault).await?;
            let client = AuthClient::new(reqwest::Client::new(), manager);
            let transport = StreamableHttpClientTransport::with_client(client, config);
            handler
                .serve_with_lifecycle(transport, lifecycle(era))
                .await
                .map_err(|e| {
                    if super::oauth::is_refusal(&e) {
                        format!(
                            "{} refused mcpcord's OAuth authorization (it expired or was revoked); {}",
                            origin(url),
                            super::oauth::remedy(&spec.name)
                        )
                    } else {
                        format!("could not connect to {}: {e}", origin(url))
                    }
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn urls_are_shown_without_path_query_or_credentials() {
        assert_eq!(
            origin("https://user:pw@mcp.example.com/mcp?token=s3cret"),
            "https://mcp.example.com"
        );
        assert_eq!(
            origin("http://127.0.0.1:8080/x/s3cret"),
            "http://127.0.0.1:8080"
        );
        assert_eq!(origin("not a url s3cret"), "the server's URL");
    }

    #[test]
    fn a_tool_list_keeps_what_it_can() {
        let page = json!({"tools": [
            {"name": "good", "inputSchema": {"type": "object", "properties": {"a": {"type": "string"}}}},
            {"name": "no_schema", "description": "d"},
            {"name": "string_schema", "inputSchema": "object"},
            {"description": "nameless"}
        ], "nextCursor": "2"});
        let mut out = ServerTools::default();
        assert_eq!(
            read_tools_page(&page, &mut out).unwrap().as_deref(),
            Some("2")
        );
        let names: Vec<&str> = out.tools.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["good", "no_schema", "string_schema"]);
        assert_eq!(out.tools[1].parameters, open_object());
        assert_eq!(out.warnings.len(), 3, "{:?}", out.warnings);
        assert!(out.warnings[0].contains("\"no_schema\" has no inputSchema"));
        assert!(out.warnings[1].contains("\"string_schema\""));
        assert!(out.warnings[2].contains("without a name"));
        assert!(read_tools_page(&json!({"items": []}), &mut out).is_err());
        let long = json!({"tools": [{"name": "wordy", "description": "é".repeat(10_000)}]});
        let mut out = ServerTools::default();
        read_tools_page(&long, &mut out).unwrap();
        assert_eq!(
            out.tools[0].description.chars().count(),
            MAX_DESCRIPTION_CHARS + 1
        );
    }
}
