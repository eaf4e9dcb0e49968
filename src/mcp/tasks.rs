//! MCP tasks as the servers send them, in both shapes: the tasks extension
//! of the current revision (`io.modelcontextprotocol/tasks`: a `tools/call`
//! answered with `resultType: "task"`, the result inline in `tasks/get`,
//! questions answered with `tasks/update`), and the experimental tasks of
//! 2025-11-25 (a `tools/call` sent with a `task` parameter is answered with
//! `{"task": {…}}`; the result is fetched with `tasks/result`).

use serde_json::Value;

/// The time to live asked for a task of the 2025-11-25 shape: a day. The
/// server may keep it for less, and says so.
pub const REQUESTED_TTL_MS: u64 = 24 * 60 * 60 * 1000;

/// A task a server made of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub task_id: String,
    /// The 2025-11-25 shape.
    pub legacy: bool,
    pub poll_ms: Option<u64>,
    pub message: Option<String>,
}

/// Where a task is, as `tasks/get` says.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Working {
        message: Option<String>,
        poll_ms: Option<u64>,
    },
    /// The server waits for answers. In the current shape the questions
    /// come with it (`inputRequests`); in the 2025-11-25 shape they come
    /// while `tasks/result` is open.
    InputRequired {
        requests: Option<Value>,
        message: Option<String>,
    },
    /// Done; the current shape carries the `CallToolResult` inline, the
    /// 2025-11-25 one leaves it to `tasks/result`.
    Completed {
        result: Option<Value>,
    },
    Failed {
        error: String,
    },
    Cancelled,
}

/// The task in a call's result, when the server made one of the call.
pub fn created(result: &Value) -> Option<Created> {
    let (task, legacy) = match result.get("task") {
        Some(task) if task.is_object() && result.get("content").is_none() => (task, true),
        _ if result.get("resultType").and_then(Value::as_str) == Some("task") => (result, false),
        _ => return None,
    };
    let task_id = task.get("taskId")?.as_str()?.to_owned();
    Some(Created {
        task_id,
        legacy,
        poll_ms: poll_ms(task),
        message: message(task),
    })
}

fn poll_ms(task: &Value) -> Option<u64> {
    task.get("pollIntervalMs")
        .or_else(|| task.get("pollInterval"))
        .and_then(Value::as_u64)
}

fn message(task: &Value) -> Option<String> {
    task.get("statusMessage")
        .and_then(Value::as_str)
        .filter(|m| !m.trim().is_empty())
        .map(str::to_owned)
}

/// Reads a `tasks/get` answer of either shape.
pub fn state(answer: &Value) -> Result<State, String> {
    let status = answer
        .get("status")
        .and_then(Value::as_str)
        .ok_or("its task status has no status")?;
    Ok(match status {
        "working" => State::Working {
            message: message(answer),
            poll_ms: poll_ms(answer),
        },
        "input_required" => State::InputRequired {
            requests: answer.get("inputRequests").cloned(),
            message: message(answer),
        },
        "completed" => State::Completed {
            result: answer.get("result").cloned(),
        },
        "failed" => State::Failed {
            error: answer
                .pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| message(answer))
                .unwrap_or_else(|| "the server gave no reason".to_owned()),
        },
        "cancelled" => State::Cancelled,
        other => return Err(format!("its task has an unknown status \"{other}\"")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_shapes_of_a_created_task_are_read() {
        let modern = json!({"resultType": "task", "taskId": "t1", "status": "working",
            "createdAt": "x", "lastUpdatedAt": "x", "ttlMs": null, "pollIntervalMs": 250});
        assert_eq!(
            created(&modern),
            Some(Created {
                task_id: "t1".into(),
                legacy: false,
                poll_ms: Some(250),
                message: None
            })
        );
        let legacy = json!({"task": {"taskId": "t2", "status": "working", "ttl": 300000,
            "pollInterval": 1000, "statusMessage": "Gathering sources..."}});
        assert_eq!(
            created(&legacy),
            Some(Created {
                task_id: "t2".into(),
                legacy: true,
                poll_ms: Some(1000),
                message: Some("Gathering sources...".into())
            })
        );
    }

    #[test]
    fn ordinary_results_are_not_tasks() {
        assert_eq!(created(&json!({"content": [], "isError": false})), None);
        // A tool whose structured output has a field called task.
        assert_eq!(
            created(&json!({"content": [], "task": {"taskId": "x"}})),
            None
        );
        assert_eq!(created(&json!({"resultType": "task"})), None);
    }

    #[test]
    fn states_of_both_shapes_are_read() {
        assert_eq!(
            state(
                &json!({"taskId": "t", "status": "working", "statusMessage": "Analyzing", "pollInterval": 500})
            ),
            Ok(State::Working {
                message: Some("Analyzing".into()),
                poll_ms: Some(500)
            })
        );
        let done = json!({"taskId": "t", "status": "completed", "result": {"content": [{"type": "text", "text": "ok"}]}});
        assert_eq!(
            state(&done),
            Ok(State::Completed {
                result: Some(json!({"content": [{"type": "text", "text": "ok"}]}))
            })
        );
        assert_eq!(
            state(&json!({"taskId": "t", "status": "completed"})),
            Ok(State::Completed { result: None })
        );
        assert_eq!(
            state(&json!({"status": "failed", "error": {"code": -32603, "message": "boom"}})),
            Ok(State::Failed {
                error: "boom".into()
            })
        );
        assert_eq!(state(&json!({"status": "cancelled"})), Ok(State::Cancelled));
        assert!(state(&json!({"status": "sleeping"})).is_err());
        assert!(state(&json!({})).is_err());
    }
}
