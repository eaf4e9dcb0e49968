//! The engine's own cost per turn: a model that answers instantly, a tool
//! that returns at once, SQLite writes included (a real file, WAL), and the
//! same engine over an in-memory store to show what is the database.
//!
//! Run with `cargo bench --bench engine`. Prints the mean and median time
//! per turn at history lengths of 2 and 50 turns, and resident memory with
//! many conversations open.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mcpcord::conversation::{
    ApproveAll, ChatModel, ChatRequest, Completion, Engine, EngineSettings, FinishReason, Inbound,
    Message, ModelError, ModelInfo, ModelLookup, Role, Stopped, Store, TextSink, ToolCall,
    ToolHost, ToolList, ToolOutcome, ToolSpec, TurnInput, TurnRunner, Usage, Workers,
};
use mcpcord::store::SqlStore;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Conversations measured at each history length.
const CONVERSATIONS: usize = 100;
/// Commits timed on their own.
const COMMITS: usize = 2000;
/// Conversations opened for the memory reading.
const OPEN_CONVERSATIONS: usize = 1000;

/// Asks for one tool call after a user message, answers after a result.
struct InstantModel;

#[async_trait]
impl ChatModel for InstantModel {
    async fn complete(
        &self,
        request: ChatRequest<'_>,
        text: &dyn TextSink,
    ) -> Result<Completion, ModelError> {
        let last = request.messages.last().map(Message::role);
        let usage = Usage {
            cached_tokens: 0,
            cache_write_tokens: 0,
            prompt_tokens: 100,
            completion_tokens: 10,
            cost: 0.0001,
        };
        let message = if last == Some(Role::User) {
            Message {
                role: Some(Role::Assistant),
                tool_calls: vec![ToolCall {
                    id: format!("call_{}", request.messages.len()),
                    name: "calc__add".into(),
                    arguments: r#"{"a":1,"b":2}"#.into(),
                }],
                ..Default::default()
            }
        } else {
            text.push("The sum is 3.");
            Message::assistant("The sum is 3.")
        };
        Ok(Completion {
            provider: None,
            citations: Vec::new(),
            message,
            finish_reason: FinishReason::Stop,
            usage,
        })
    }

    async fn model_info(&self, model: &str) -> ModelLookup {
        ModelLookup::Known(ModelInfo {
            id: model.to_owned(),
            context_length: Some(1_000_000),
            supports_tools: Some(true),
            supports_reasoning: false,
            supports_images: false,
            supports_audio: false,
        })
    }
}

/// One tool that adds two numbers.
struct Calculator;

#[async_trait]
impl ToolHost for Calculator {
    async fn tools(&self, _conversation: &str) -> ToolList {
        ToolList {
            specs: vec![ToolSpec {
                name: "calc__add".into(),
                description: "Adds two numbers".into(),
                parameters: json!({"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}),
                needs_approval: false,
                server: "calc".into(),
            }],
            ..Default::default()
        }
    }

    async fn call(&self, _conversation: &str, _name: &str, arguments: Value) -> ToolOutcome {
        let sum = arguments["a"].as_f64().unwrap_or(0.0) + arguments["b"].as_f64().unwrap_or(0.0);
        ToolOutcome {
            content: sum.to_string(),
            is_error: false,
            full_output: None,
            images: Vec::new(),
            links: Vec::new(),
        }
    }

    async fn close_conversation(&self, _conversation: &str) {}
}

/// Keeps messages in memory: the engine's cost without any database.
#[path = "../tests/it/support/memory.rs"]
mod memory;
use memory::MemoryStore;

fn engine(store: Arc<dyn Store>) -> Engine {
    Engine::new(
        Arc::new(InstantModel),
        Arc::new(Calculator),
        store,
        EngineSettings {
            default_model: "bench/model".into(),
            system_prompt: Some("You are a calculator.".into()),
            timezone: jiff::tz::TimeZone::UTC,
            transcription_model: None,
            clock: Default::default(),
            max_tool_rounds: 10,
            fallback_context_tokens: 1_000_000,
        },
    )
}

/// Median time of the last turn of conversations `length` turns long.
async fn measure(engine: &Engine, label: &str, length: usize) -> f64 {
    let mut samples = Vec::with_capacity(CONVERSATIONS);
    for c in 0..CONVERSATIONS {
        let key = format!("{label}:{length}:{c}");
        for _ in 1..length {
            one_turn(engine, &key).await;
        }
        samples.push(one_turn(engine, &key).await);
    }
    report(&format!("{label}, turn {length}"), samples)
}

async fn one_turn(engine: &Engine, conversation: &str) -> Duration {
    let (events, mut received) = mpsc::unbounded_channel();
    let started = Instant::now();
    engine
        .run_turn(
            conversation,
            Message::user("What is 1 + 2?"),
            &events,
            &ApproveAll,
        )
        .await
        .expect("turn failed");
    let elapsed = started.elapsed();
    drop(events);
    while received.recv().await.is_some() {}
    elapsed
}

/// Runs each input's turn with the engine and says when it is done.
struct Runner {
    engine: Arc<Engine>,
    done: mpsc::UnboundedSender<()>,
}

#[async_trait]
impl TurnRunner for Runner {
    async fn run(
        &self,
        conversation: &str,
        input: Inbound,
        _resumed: bool,
        stop: CancellationToken,
    ) {
        let (events, _received) = mpsc::unbounded_channel();
        let turn = TurnInput {
            ask: mcpcord::conversation::Ask::New(Message::user(input.text)),
            kept: Some(input.position),
            stop,
            place: Default::default(),
        };
        self.engine
            .run_turn(conversation, turn, &events, &ApproveAll)
            .await
            .expect("turn failed");
        let _ = self.done.send(());
    }

    async fn crashed(&self, _conversation: &str, _input: &Inbound) {}

    async fn stopped(&self, _conversation: &str, _stopped: Stopped) {}
}

fn memory_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn report(label: &str, mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    let mean = samples.iter().sum::<Duration>().as_secs_f64() / samples.len() as f64;
    let median = samples[samples.len() / 2].as_secs_f64();
    let p95 = samples[samples.len() * 95 / 100].as_secs_f64();
    println!(
        "{label}: mean {:.3} ms, median {:.3} ms, p95 {:.3} ms per turn ({} turns)",
        mean * 1e3,
        median * 1e3,
        p95 * 1e3,
        samples.len()
    );
    median
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let store = SqlStore::open(&url).await.expect("database");
    let sqlite = engine(Arc::new(store.clone()));
    let memory = engine(Arc::new(MemoryStore::default()));

    println!("Each turn: 2 model calls, 1 tool call; with SQLite, 3 commits.");
    let short = measure(&sqlite, "SQLite", 2).await;
    let long = measure(&sqlite, "SQLite", 50).await;
    println!("SQLite, turn 50 / turn 2 (medians): {:.2}", long / short);
    let short = measure(&memory, "in memory", 2).await;
    let long = measure(&memory, "in memory", 50).await;
    println!("in memory, turn 50 / turn 2 (medians): {:.2}", long / short);

    // The way a Discord message goes: kept in the inbox first, then its
    // worker's turn moves it into the history.
    let (done, mut finished) = mpsc::unbounded_channel();
    let runner = Arc::new(Runner {
        engine: Arc::new(engine(Arc::new(store.clone()))),
        done,
    });
    let workers = Workers::new(Arc::new(store.clone()), runner);
    let mut samples = Vec::with_capacity(CONVERSATIONS);
    for c in 0..CONVERSATIONS {
        let input = Inbound {
            author_name: String::new(),
            position: c as u64 + 1,
            author: 1,
            text: "What is 1 + 2?".into(),
            ..Default::default()
        };
        let started = Instant::now();
        workers
            .accept(&format!("workers:{c}"), input)
            .await
            .expect("accept");
        finished.recv().await.expect("the turn ran");
        samples.push(started.elapsed());
    }
    report("SQLite through the workers (kept, then taken)", samples);
    workers.shutdown(Duration::from_secs(5)).await;

    // The share of a turn that is SQLite: one commit of one message.
    let message = [Message::user("What is 1 + 2?")];
    let started = Instant::now();
    for _ in 0..COMMITS {
        store
            .append("bench:commits", &message)
            .await
            .expect("append");
    }
    println!(
        "one SQLite commit (append of one message): {:.1} us",
        started.elapsed().as_secs_f64() * 1e6 / COMMITS as f64
    );

    for c in 0..OPEN_CONVERSATIONS {
        one_turn(&sqlite, &format!("open:{c}")).await;
    }
    println!(
        "memory after {} conversations ({} turns): resident {:.1} MiB, peak {:.1} MiB",
        OPEN_CONVERSATIONS + 2 * CONVERSATIONS,
        OPEN_CONVERSATIONS + CONVERSATIONS * 52,
        memory_kib("VmRSS:") as f64 / 1024.0,
        memory_kib("VmHWM:") as f64 / 1024.0
    );
    store.close().await;
}
