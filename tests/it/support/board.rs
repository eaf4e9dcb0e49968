//! An rmcp server of the current revision whose one tool, `research`, runs
//! as a task (the tasks extension) on a board that outlives mcpcord: each
//! job runs until the test finishes it (at once for topics starting with
//! "instant"), or is cancelled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams, ContentBlock,
    CreateTaskResult, DetailedTask, GetTaskParams, GetTaskResult, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Task, TaskPayload, TaskStatus, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Where a job is.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    Running(String),
    Done(String),
    Cancelled,
}

#[derive(Clone, Default)]
pub struct Board {
    jobs: Arc<Mutex<HashMap<String, Job>>>,
    /// Ids whose cancellation was asked, in order.
    cancels: Arc<Mutex<Vec<String>>>,
}

impl Board {
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.jobs.lock().unwrap().keys().cloned().collect();
        ids.sort();
        ids
    }

    pub fn finish(&self, id: &str) {
        let mut jobs = self.jobs.lock().unwrap();
        if let Some(Job::Running(topic)) = jobs.get(id).cloned() {
            jobs.insert(id.to_owned(), Job::Done(topic));
        }
    }

    pub fn cancels(&self) -> Vec<String> {
        self.cancels.lock().unwrap().clone()
    }
}

impl ServerHandler for Board {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tasks()
                .build(),
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let schema = json!({"type": "object", "properties": {"topic": {"type": "string"}}});
        Ok(ListToolsResult::with_all_items(vec![Tool::new(
            "research",
            "Researches a topic, in the background",
            Arc::new(schema.as_object().unwrap().clone()),
        )]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        if !context
            .client_capabilities()
            .is_some_and(|c| c.supports_tasks())
        {
            return Ok(CallToolResult::error(vec![ContentBlock::text("tasks only")]).into());
        }
        let topic = request
            .arguments
            .and_then(|a| a.get("topic").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_default();
        let mut jobs = self.jobs.lock().unwrap();
        let id = format!("job-{}", jobs.len() + 1);
        let job = if topic.starts_with("instant") {
            Job::Done(topic)
        } else {
            Job::Running(topic)
        };
        jobs.insert(id.clone(), job);
        let task = Task::new(
            id,
            TaskStatus::Working,
            "2026-12-04T00:00:00Z",
            "2026-12-04T00:00:00Z",
        )
        .with_poll_interval_ms(100)
        .with_status_message("queued");
        Ok(CallToolResponse::Task(CreateTaskResult::new(task)))
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, McpError> {
        let job = self.jobs.lock().unwrap().get(&request.task_id).cloned();
        let base = Task::new(
            request.task_id.clone(),
            TaskStatus::Working,
            "2026-12-04T00:00:00Z",
            "2026-12-04T00:00:01Z",
        )
        .with_poll_interval_ms(100);
        let payload = match job {
            None => return Err(McpError::invalid_params("no such task", None)),
            Some(Job::Running(topic)) => {
                return Ok(GetTaskResult::new(DetailedTask::new(
                    base.with_status_message(format!("reading about {topic}")),
                    TaskPayload::Working,
                )));
            }
            Some(Job::Done(topic)) => TaskPayload::Completed {
                result: json!({"content": [{"type": "text", "text": format!("report on {topic}")}], "isError": false})
                    .as_object()
                    .unwrap()
                    .clone(),
            },
            Some(Job::Cancelled) => TaskPayload::Cancelled,
        };
        Ok(GetTaskResult::new(DetailedTask::new(base, payload)))
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.cancels.lock().unwrap().push(request.task_id.clone());
        self.jobs
            .lock()
            .unwrap()
            .insert(request.task_id, Job::Cancelled);
        Ok(())
    }
}

pub async fn serve_board(board: &Board, stop: &CancellationToken) -> String {
    let base = super::serve_router(super::mcp_router(board.clone(), stop), stop).await;
    format!("{base}/mcp")
}
