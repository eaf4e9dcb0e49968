//! In-memory fakes of the domain's three ports, for engine and worker tests
//! that need no process, no socket and no wall clock: a store that can be
//! told to fail, a scripted model that panics on a request it was not told
//! about, and tools that answer at once or when a test lets them.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use mcpcord::conversation::{
    ChatModel, ChatRequest, Completion, FinishReason, Inbound, LastInput, Message, ModelError,
    ModelInfo, ModelLookup, ReasoningEffort, Replace, Role, Store, StoreError, TaskRecord,
    TaskTicket, TextSink, ToolCall, ToolHost, ToolList, ToolOutcome, ToolSpec, Unbilled,
    UnbilledUpdate, Usage,
};
use serde_json::Value;
use tokio::sync::Semaphore;

/// Keeps everything in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<Stored>,
}

#[derive(Debug, Default)]
struct Stored {
    models: HashMap<String, Option<String>>,
    prompts: HashMap<String, Option<String>>,
    efforts: HashMap<String, Option<ReasoningEffort>>,
    off: HashMap<String, Vec<String>>,
    messages: HashMap<String, Vec<Message>>,
    inbox: BTreeMap<(String, u64), Inbound>,
    /// Unbilled replies and when each is due (`None`: billed or given up).
    unbilled: Vec<(Unbilled, Option<i64>, Option<Usage>)>,
    tasks: Vec<TaskRecord>,
    /// When set, every write fails with this reason.
    failing: Option<String>,
    /// When set, taking an input (storing a turn's message) fails.
    failing_takes: Option<String>,
}

impl MemoryStore {
    /// Makes every write fail (with `Some`) or work again (`None`).
    pub fn fail_writes(&self, reason: Option<&str>) {
        self.lock().failing = reason.map(str::to_owned);
    }

    /// Makes taking inputs fail (with `Some`) while other writes work.
    pub fn fail_takes(&self, reason: Option<&str>) {
        self.lock().failing_takes = reason.map(str::to_owned);
    }

    pub fn messages(&self, conversation: &str) -> Vec<Message> {
        self.lock()
            .messages
            .get(conversation)
            .cloned()
            .unwrap_or_default()
    }

    /// The user messages' texts, in order.
    pub fn user_texts(&self, conversation: &str) -> Vec<String> {
        self.messages(conversation)
            .iter()
            .filter(|m| m.role() == Role::User)
            .map(|m| m.text().to_owned())
            .collect()
    }

    /// Kept inputs as (conversation, position).
    pub fn kept(&self) -> Vec<(String, u64)> {
        self.lock().inbox.keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stored> {
        self.state.lock().unwrap()
    }

    fn writable(&self) -> Result<std::sync::MutexGuard<'_, Stored>, StoreError> {
        let state = self.lock();
        match &state.failing {
            Some(reason) => Err(StoreError::Failed(reason.clone())),
            None => Ok(state),
        }
    }
}

fn same_task(kept: &TaskRecord, conversation: &str, task: &TaskTicket) -> bool {
    kept.conversation == conversation
        && kept.ticket.server == task.server
        && kept.ticket.task_id == task.task_id
}

#[async_trait]
impl Store for MemoryStore {
    async fn instance_salt(&self) -> Result<String, StoreError> {
        Ok("memory-salt".into())
    }

    async fn keep_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        let mut state = self.writable()?;
        state
            .tasks
            .retain(|t| !same_task(t, &task.conversation, &task.ticket));
        state.tasks.push(task.clone());
        Ok(())
    }

    async fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        Ok(self.lock().tasks.clone())
    }

    async fn note_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        let mut state = self.writable()?;
        for kept in &mut state.tasks {
            if same_task(kept, &task.conversation, &task.ticket) {
                kept.message.clone_from(&task.message);
            }
        }
        Ok(())
    }

    async fn drop_task(&self, conversation: &str, task: &TaskTicket) -> Result<(), StoreError> {
        let mut state = self.writable()?;
        state.tasks.retain(|t| !same_task(t, conversation, task));
        Ok(())
    }

    async fn keep_unbilled(
        &self,
        unbilled: &Unbilled,
        first_try_at: i64,
    ) -> Result<(), StoreError> {
        let mut state = self.writable()?;
        if !state
            .unbilled
            .iter()
            .any(|(u, ..)| u.generation_id == unbilled.generation_id)
        {
            state
                .unbilled
                .push((unbilled.clone(), Some(first_try_at), None));
        }
        Ok(())
    }

    async fn unbilled_due(&self, now: i64) -> Result<Vec<Unbilled>, StoreError> {
        Ok(self
            .lock()
            .unbilled
            .iter()
            .filter(|(_, due, _)| due.is_some_and(|at| at <= now))
            .map(|(u, ..)| u.clone())
            .collect())
    }

    async fn update_unbilled(
        &self,
        generation_id: &str,
        update: &UnbilledUpdate,
    ) -> Result<(), StoreError> {
        let mut state = self.writable()?;
        if let Some((unbilled, due, usage)) = state
            .unbilled
            .iter_mut()
            .find(|(u, ..)| u.generation_id == generation_id)
        {
            match update {
                UnbilledUpdate::Billed(billed) => (*due, *usage) = (None, Some(*billed)),
                UnbilledUpdate::RetryAt { attempts, at } => {
                    unbilled.attempts = *attempts;
                    *due = Some(*at);
                }
                UnbilledUpdate::GaveUp => *due = None,
            }
        }
        Ok(())
    }

    async fn model(&self, conversation: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock().models.get(conversation).cloned().flatten())
    }

    async fn set_model(&self, conversation: &str, model: Option<&str>) -> Result<(), StoreError> {
        let mut state = self.writable()?;
        state
            .models
            .insert(conversation.to_owned(), model.map(str::to_owned));
        Ok(())
    }

    async fn system_prompt(&self, conversation: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock().prompts.get(conversation).cloned().flatten())
    }

    async fn set_system_prompt(
        &self,
        conversation: &str,
        prompt: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut state = self.writable()?;
        state
            .prompts
            .insert(conversation.to_owned(), prompt.map(str::to_owned));
        Ok(())
    }

    async fn servers_off(&self, conversation: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .lock()
            .off
            .get(conversation)
            .cloned()
            .unwrap_or_default())
    }

    async fn set_servers_off(&self, conversation: &str, off: &[String]) -> Result<(), StoreError> {
        self.writable()?
            .off
            .insert(conversation.to_owned(), off.to_vec());
        Ok(())
    }

    async fn reasoning(&self, conversation: &str) -> Result<Option<ReasoningEffort>, StoreError> {
        Ok(self.lock().efforts.get(conversation).copied().flatten())
    }

    async fn set_reasoning(
        &self,
        conversation: &str,
        effort: Option<ReasoningEffort>,
    ) -> Result<(), StoreError> {
        self.writable()?
            .efforts
            .insert(conversation.to_owned(), effort);
        Ok(())
    }

    async fn reasoning_of(
        &self,
        conversation: &str,
        position: u64,
    ) -> Result<Vec<String>, StoreError> {
        let messages = self.messages(conversation);
        let Some(start) = messages.iter().rposition(|m| m.position == Some(position)) else {
            return Ok(Vec::new());
        };
        Ok(messages[start + 1..]
            .iter()
            .take_while(|m| m.position.is_none())
            .filter_map(|m| m.reasoning.clone())
            .collect())
    }

    async fn inherit(&self, conversation: &str, from: &str) -> Result<(), StoreError> {
        let mut guard = self.writable()?;
        let state = &mut *guard;
        for map in [&mut state.models, &mut state.prompts] {
            if let Some(Some(value)) = map.get(from).cloned() {
                map.entry(conversation.to_owned())
                    .or_default()
                    .get_or_insert(value);
            }
        }
        if let Some(off) = state.off.get(from).cloned() {
            state.off.entry(conversation.to_owned()).or_insert(off);
        }
        Ok(())
    }

    async fn history(&self, conversation: &str) -> Result<Vec<Message>, StoreError> {
        Ok(self.messages(conversation))
    }

    async fn append(&self, conversation: &str, messages: &[Message]) -> Result<(), StoreError> {
        let mut state = self.writable()?;
        state
            .messages
            .entry(conversation.to_owned())
            .or_default()
            .extend_from_slice(messages);
        Ok(())
    }

    async fn reset(&self, conversation: &str) -> Result<(), StoreError> {
        self.writable()?.messages.remove(conversation);
        Ok(())
    }

    async fn last_input(&self, conversation: &str) -> Result<Option<LastInput>, StoreError> {
        let messages = self.messages(conversation);
        Ok(messages
            .iter()
            .rev()
            .find(|m| m.position.is_some())
            .map(|m| LastInput {
                position: m.position,
                author: m.author.as_ref().map(|a| a.id),
            }))
    }

    async fn replace(
        &self,
        conversation: &str,
        what: Replace,
        of: Option<u64>,
    ) -> Result<bool, StoreError> {
        let mut state = self.writable()?;
        let messages = state.messages.entry(conversation.to_owned()).or_default();
        let Some(last) = messages.iter().rposition(|m| m.position.is_some()) else {
            return Ok(false);
        };
        if of.is_some_and(|of| messages[last].position != Some(of)) {
            return Ok(false);
        }
        messages.truncate(match what {
            Replace::Answer => last + 1,
            Replace::Exchange => last,
        });
        Ok(true)
    }

    async fn keep_input(&self, conversation: &str, input: &Inbound) -> Result<bool, StoreError> {
        let mut state = self.writable()?;
        let key = (conversation.to_owned(), input.position);
        if state.inbox.contains_key(&key) {
            return Ok(false);
        }
        state.inbox.insert(key, input.clone());
        Ok(true)
    }

    async fn kept_inputs(&self) -> Result<Vec<(String, Inbound)>, StoreError> {
        let state = self.lock();
        Ok(state
            .inbox
            .iter()
            .map(|((conversation, _), input)| (conversation.clone(), input.clone()))
            .collect())
    }

    async fn take_input(
        &self,
        conversation: &str,
        position: u64,
        message: &Message,
    ) -> Result<(), StoreError> {
        let mut state = self.writable()?;
        if let Some(reason) = &state.failing_takes {
            return Err(StoreError::Failed(reason.clone()));
        }
        state
            .messages
            .entry(conversation.to_owned())
            .or_default()
            .push(message.clone());
        state.inbox.remove(&(conversation.to_owned(), position));
        Ok(())
    }

    async fn drop_input(&self, conversation: &str, position: u64) -> Result<(), StoreError> {
        self.writable()?
            .inbox
            .remove(&(conversation.to_owned(), position));
        Ok(())
    }

    async fn update_input(&self, conversation: &str, input: &Inbound) -> Result<bool, StoreError> {
        let mut state = self.writable()?;
        match state
            .inbox
            .get_mut(&(conversation.to_owned(), input.position))
        {
            Some(kept) => {
                *kept = input.clone();
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// Lets a test hold a fake at a point and release it: the fake calls
/// `pass`, the test waits for `reached` and then calls `open`.
#[derive(Debug)]
pub struct Gate {
    reached: Semaphore,
    open: Semaphore,
}

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate {
            reached: Semaphore::new(0),
            open: Semaphore::new(0),
        })
    }

    /// Waits until a fake is held at this gate.
    pub async fn reached(&self) {
        self.reached.acquire().await.unwrap().forget();
    }

    /// Lets one held fake go on.
    pub fn open(&self) {
        self.open.add_permits(1);
    }

    /// Holds the caller here until the test opens the gate.
    pub async fn pass(&self) {
        self.reached.add_permits(1);
        self.open.acquire().await.unwrap().forget();
    }
}

/// One scripted reply of the model.
#[derive(Debug, Clone)]
pub enum Scripted {
    /// A plain answer.
    Answer(String),
    /// Tool calls: (name, arguments).
    Calls(Vec<(String, String)>),
    /// Fails with this error.
    Fail(ModelError),
    /// Panics, as a bug would.
    Panic,
    /// Waits at the gate, then replies.
    Held(Arc<Gate>, Box<Scripted>),
}

pub fn answer(text: &str) -> Scripted {
    Scripted::Answer(text.to_owned())
}

pub fn calls(names: &[&str]) -> Scripted {
    Scripted::Calls(
        names
            .iter()
            .map(|n| ((*n).to_owned(), "{}".to_owned()))
            .collect(),
    )
}

/// A model that replies from its script, and panics when asked more than
/// the script holds (a test then fails where the extra request came from).
#[derive(Debug, Default)]
pub struct ScriptedModel {
    script: Mutex<VecDeque<Scripted>>,
    /// The messages of every request, as sent.
    requests: Mutex<Vec<Vec<Message>>>,
    /// The system prompt of every request.
    systems: Mutex<Vec<Option<String>>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl ScriptedModel {
    pub fn new(script: impl IntoIterator<Item = Scripted>) -> Arc<Self> {
        let model = ScriptedModel::default();
        model.script(script);
        Arc::new(model)
    }

    pub fn script(&self, replies: impl IntoIterator<Item = Scripted>) {
        self.script.lock().unwrap().extend(replies);
    }

    pub fn requests(&self) -> Vec<Vec<Message>> {
        self.requests.lock().unwrap().clone()
    }

    /// The system prompt of each request.
    pub fn systems(&self) -> Vec<Option<String>> {
        self.systems.lock().unwrap().clone()
    }

    /// The last user message of each request.
    pub fn asked(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| {
                r.iter()
                    .rev()
                    .find(|m| m.role() == Role::User)
                    .map(|m| m.text().to_owned())
                    .unwrap_or_default()
            })
            .collect()
    }

    pub fn remaining(&self) -> usize {
        self.script.lock().unwrap().len()
    }

    async fn reply(
        &self,
        scripted: Scripted,
        text: &dyn TextSink,
    ) -> Result<Completion, ModelError> {
        let mut scripted = scripted;
        while let Scripted::Held(gate, then) = scripted {
            gate.pass().await;
            scripted = *then;
        }
        let message = match scripted {
            Scripted::Answer(answer) => {
                text.push(&answer);
                Message::assistant(answer)
            }
            Scripted::Calls(calls) => Message {
                role: Some(Role::Assistant),
                tool_calls: calls
                    .into_iter()
                    .map(|(name, arguments)| ToolCall {
                        id: format!(
                            "call_{}",
                            self.next_id
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        ),
                        name,
                        arguments,
                    })
                    .collect(),
                ..Default::default()
            },
            Scripted::Fail(error) => return Err(error),
            Scripted::Panic => panic!("the scripted model was told to panic"),
            Scripted::Held(..) => unreachable!("unwrapped above"),
        };
        let finish_reason = if message.tool_calls.is_empty() {
            FinishReason::Stop
        } else {
            FinishReason::ToolCalls
        };
        Ok(Completion {
            provider: None,
            citations: Vec::new(),
            message,
            finish_reason,
            usage: Usage {
                cached_tokens: 0,
                cache_write_tokens: 0,
                prompt_tokens: 10,
                completion_tokens: 2,
                cost: 0.0,
            },
        })
    }
}

#[async_trait]
impl ChatModel for ScriptedModel {
    async fn complete(
        &self,
        request: ChatRequest<'_>,
        text: &dyn TextSink,
    ) -> Result<Completion, ModelError> {
        self.requests
            .lock()
            .unwrap()
            .push(request.messages.to_vec());
        self.systems
            .lock()
            .unwrap()
            .push(request.system.map(str::to_owned));
        let next = self.script.lock().unwrap().pop_front();
        let Some(next) = next else {
            panic!(
                "unexpected model request; its last message: {:?}",
                request.messages.last()
            );
        };
        self.reply(next, text).await
    }

    async fn model_info(&self, model: &str) -> ModelLookup {
        known(model)
    }
}

/// Tools that echo their name and arguments. A tool whose name is listed
/// in `approval` needs approval; one with a gate waits at it.
#[derive(Debug, Default)]
pub struct FakeTools {
    pub specs: Vec<ToolSpec>,
    gates: HashMap<String, Arc<Gate>>,
    calls: Mutex<Vec<(String, String, Value)>>,
}

impl FakeTools {
    /// Tools named `server__tool`, with the names given.
    pub fn new(names: &[&str]) -> Self {
        FakeTools {
            specs: names.iter().map(|n| spec(n, false)).collect(),
            ..Default::default()
        }
    }

    pub fn needing_approval(mut self, name: &str) -> Self {
        self.specs.push(spec(name, true));
        self
    }

    pub fn held(mut self, name: &str, gate: Arc<Gate>) -> Self {
        self.gates.insert(name.to_owned(), gate);
        self
    }

    /// (conversation, tool, arguments) of every call, in order.
    pub fn calls(&self) -> Vec<(String, String, Value)> {
        self.calls.lock().unwrap().clone()
    }
}

fn spec(name: &str, needs_approval: bool) -> ToolSpec {
    ToolSpec {
        name: name.to_owned(),
        description: format!("The {name} tool."),
        parameters: serde_json::json!({"type": "object", "properties": {}}),
        needs_approval,
        server: name.split("__").next().unwrap_or(name).to_owned(),
    }
}

#[async_trait]
impl ToolHost for FakeTools {
    async fn tools(&self, _conversation: &str) -> ToolList {
        ToolList {
            specs: self.specs.clone(),
            ..Default::default()
        }
    }

    async fn call(&self, conversation: &str, name: &str, arguments: Value) -> ToolOutcome {
        self.calls.lock().unwrap().push((
            conversation.to_owned(),
            name.to_owned(),
            arguments.clone(),
        ));
        if let Some(gate) = self.gates.get(name) {
            gate.pass().await;
        }
        ToolOutcome {
            content: format!("{name} ran with {arguments}"),
            is_error: false,
            full_output: None,
            images: Vec::new(),
            links: Vec::new(),
        }
    }

    async fn close_conversation(&self, _conversation: &str) {}
}

/// A model that, for a user message, calls `tool` with the message as
/// `text`, and then answers with what the tool returned. A message with a
/// gate waits there before the call.
#[derive(Debug, Default)]
pub struct EchoModel {
    pub tool: String,
    pub gates: HashMap<String, Arc<Gate>>,
}

#[async_trait]
impl ChatModel for EchoModel {
    async fn complete(
        &self,
        request: ChatRequest<'_>,
        text: &dyn TextSink,
    ) -> Result<Completion, ModelError> {
        let last = request.messages.last().expect("a request has messages");
        let message = if last.role() == Role::User {
            if let Some(gate) = self.gates.get(last.text()) {
                gate.pass().await;
            }
            Message {
                role: Some(Role::Assistant),
                tool_calls: vec![ToolCall {
                    id: format!("call_{}", request.messages.len()),
                    name: self.tool.clone(),
                    arguments: serde_json::json!({"text": last.text()}).to_string(),
                }],
                ..Default::default()
            }
        } else {
            text.push(last.text());
            Message::assistant(last.text())
        };
        Ok(Completion {
            provider: None,
            citations: Vec::new(),
            message,
            finish_reason: FinishReason::Stop,
            usage: Usage::default(),
        })
    }

    async fn model_info(&self, model: &str) -> ModelLookup {
        known(model)
    }
}

/// What the fake models say of every model: known, with tools, no images.
fn known(model: &str) -> ModelLookup {
    ModelLookup::Known(ModelInfo {
        id: model.to_owned(),
        context_length: Some(100_000),
        supports_tools: Some(true),
        supports_reasoning: false,
        supports_images: false,
        supports_audio: false,
    })
}
