//! What prompt caching saves on a long tool conversation.
//!
//! The real engine runs a 50-turn conversation on an Anthropic model: each
//! turn asks for one or two rounds of 1 to 12 parallel tool calls, then
//! answers. Every request is written exactly as mcpcord sends it to
//! OpenRouter (`request_body`), and a fake model bills it by Anthropic's
//! caching rules:
//! - a cache entry is written at each `cache_control` breakpoint whose
//!   prefix holds at least 1,024 tokens, at 1.25x the input price;
//! - a breakpoint reads the longest written prefix that ends within 20
//!   blocks before it (the lookback), at 0.1x; the prefix must match byte
//!   for byte;
//! - more than 4 breakpoints is an error;
//! - entries do not expire (the 5-minute lifetime is refreshed by every
//!   read, and the turns here follow each other at once).
//!
//! Blocks are counted as Anthropic sees the request OpenRouter forwards:
//! each tool definition, each text part, each tool call, each tool result.
//! Tokens are estimated at 4 bytes of JSON each.
//!
//! Run with `cargo bench --bench caching`. Prints the billed input cost
//! relative to sending the same prompts uncached, and the share of prompt
//! tokens read from the cache for turns 10 to 50 (target: at least 85%).

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use mcpcord::conversation::{
    ApproveAll, ChatModel, ChatRequest, Completion, Engine, EngineSettings, FinishReason, Message,
    ModelError, ModelInfo, ModelLookup, Role, TextSink, ToolCall, ToolHost, ToolList, ToolOutcome,
    ToolSpec, TurnEvent, Usage,
};
use mcpcord::llm::{Dialect, MAX_BREAKPOINTS, request_body};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const MODEL: &str = "anthropic/claude-sonnet-4.5";
const TURNS: usize = 50;
/// Turns measured for the target (the first ones build the cache).
const FROM_TURN: usize = 10;
const TARGET_PERCENT: f64 = 85.0;
/// Anthropic's minimum cacheable prefix (Sonnet and Opus).
const MIN_CACHE_TOKENS: u64 = 1024;
/// How far back from a breakpoint Anthropic looks for an earlier entry.
const LOOKBACK_BLOCKS: usize = 20;
const READ_PRICE: f64 = 0.1;
const WRITE_PRICE: f64 = 1.25;
const TOOLS: usize = 12;

/// A small deterministic generator (the run is the same every time).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// What one request cost, in tokens.
#[derive(Debug, Default, Clone, Copy)]
struct Bill {
    turn: usize,
    prompt: u64,
    read: u64,
    written: u64,
}

impl Bill {
    fn billed(&self) -> f64 {
        let plain = self.prompt - self.read - self.written;
        plain as f64 + self.read as f64 * READ_PRICE + self.written as f64 * WRITE_PRICE
    }
}

/// One content block: its bytes without markers, and whether it is a
/// breakpoint.
struct Block {
    text: String,
    marked: bool,
}

/// A block as `role` sent it: the same bytes whether or not it carried a
/// marker, and whether the text came as a string or as a part.
fn block(role: &Value, value: &Value) -> Block {
    let mut value = value.clone();
    let marked = value
        .as_object_mut()
        .and_then(|o| o.remove("cache_control"))
        .is_some();
    Block {
        text: format!("{role}:{value}"),
        marked,
    }
}

/// The request's blocks in Anthropic's order: tools, system, messages.
fn blocks(body: &Value) -> Vec<Block> {
    let tool = json!("tool definition");
    let mut out: Vec<Block> = body["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| block(&tool, t))
        .collect();
    for message in body["messages"].as_array().into_iter().flatten() {
        let role = &message["role"];
        match &message["content"] {
            Value::Array(parts) => out.extend(parts.iter().map(|p| block(role, p))),
            Value::String(text) if !text.is_empty() => {
                out.push(block(role, &json!({"type": "text", "text": text})));
            }
            _ => {}
        }
        for call in message["tool_calls"].as_array().into_iter().flatten() {
            out.push(block(role, call));
        }
    }
    out
}

fn tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

/// The prompt cache of one Anthropic organisation: prefix hashes written
/// at breakpoints.
#[derive(Default)]
struct Cache {
    entries: HashSet<u64>,
}

impl Cache {
    /// Bills `body`; with `newest_only`, as if it carried only its last
    /// breakpoint (to show what the others are for).
    fn bill(&mut self, body: &Value, turn: usize, newest_only: bool) -> Bill {
        let blocks = blocks(body);
        let mut hashes = Vec::with_capacity(blocks.len());
        let mut totals = Vec::with_capacity(blocks.len());
        let (mut hasher, mut total) = (DefaultHasher::new(), 0);
        for b in &blocks {
            b.text.hash(&mut hasher);
            hashes.push(hasher.finish());
            total += tokens(&b.text);
            totals.push(total);
        }
        let mut breakpoints: Vec<usize> = (0..blocks.len()).filter(|&i| blocks[i].marked).collect();
        if newest_only {
            breakpoints.drain(..breakpoints.len().saturating_sub(1));
        }
        assert!(
            breakpoints.len() <= MAX_BREAKPOINTS,
            "{} breakpoints: Anthropic refuses the request",
            breakpoints.len()
        );
        let read_end = breakpoints
            .iter()
            .filter_map(|&b| {
                (b.saturating_sub(LOOKBACK_BLOCKS)..=b)
                    .rev()
                    .find(|&j| self.entries.contains(&hashes[j]))
            })
            .max();
        let read = read_end.map_or(0, |j| totals[j]);
        let mut written_to = read;
        for &b in &breakpoints {
            if totals[b] >= MIN_CACHE_TOKENS {
                self.entries.insert(hashes[b]);
                written_to = written_to.max(totals[b]);
            }
        }
        Bill {
            turn,
            prompt: total,
            read,
            written: written_to - read,
        }
    }
}

/// Asks for tool rounds by a fixed plan, bills each request.
struct BillingModel {
    cache: Mutex<Cache>,
    bills: Mutex<Vec<Bill>>,
    /// The same requests with only the newest breakpoint.
    newest_only: Mutex<(Cache, Vec<Bill>)>,
    turn: AtomicUsize,
    /// Per turn: the number of parallel calls of each round.
    plan: Vec<Vec<usize>>,
}

#[async_trait]
impl ChatModel for BillingModel {
    async fn complete(
        &self,
        request: ChatRequest<'_>,
        text: &dyn TextSink,
    ) -> Result<Completion, ModelError> {
        let turn = self.turn.load(Ordering::SeqCst);
        let body = request_body(&request, &Dialect::default(), None);
        let bill = self.cache.lock().unwrap().bill(&body, turn, false);
        self.bills.lock().unwrap().push(bill);
        let mut newest_only = self.newest_only.lock().unwrap();
        let other = newest_only.0.bill(&body, turn, true);
        newest_only.1.push(other);
        drop(newest_only);
        let asked = request
            .messages
            .iter()
            .rposition(|m| m.role() == Role::User && m.tool_call_id.is_none())
            .unwrap_or(0);
        let rounds_done = request.messages[asked..]
            .iter()
            .filter(|m| !m.tool_calls.is_empty())
            .count();
        let message = match self.plan[turn - 1].get(rounds_done) {
            Some(&calls) => Message {
                role: Some(Role::Assistant),
                tool_calls: (0..calls)
                    .map(|c| ToolCall {
                        id: format!("call_{turn}_{rounds_done}_{c}"),
                        name: format!("files__tool_{:02}", (turn + c) % TOOLS),
                        arguments:
                            json!({"path": format!("/data/report-{turn}-{c}.txt"), "lines": 40})
                                .to_string(),
                    })
                    .collect(),
                ..Default::default()
            },
            None => {
                let answer = format!(
                    "Turn {turn}: the reports agree; the totals are within two percent of each other."
                );
                text.push(&answer);
                Message::assistant(answer)
            }
        };
        Ok(Completion {
            message,
            finish_reason: FinishReason::Stop,
            usage: Usage {
                prompt_tokens: bill.prompt,
                completion_tokens: 60,
                cost: 0.0,
                cached_tokens: bill.read,
                cache_write_tokens: bill.written,
            },
            provider: None,
            citations: Vec::new(),
        })
    }

    async fn model_info(&self, model: &str) -> ModelLookup {
        ModelLookup::Known(ModelInfo {
            id: model.to_owned(),
            context_length: Some(200_000),
            supports_tools: Some(true),
            supports_reasoning: true,
            supports_images: true,
            supports_audio: false,
        })
    }
}

/// Twelve file tools with schemas of a realistic size; results of varying
/// length.
struct Files {
    sizes: Mutex<Lcg>,
}

#[async_trait]
impl ToolHost for Files {
    async fn tools(&self, _conversation: &str) -> ToolList {
        let specs = (0..TOOLS)
            .map(|i| ToolSpec {
                name: format!("files__tool_{i:02}"),
                description: format!(
                    "Reads, searches or summarises files under the allowed directories (operation {i}). \
                     Paths are absolute; large files are paged with `lines` and `offset`."
                ),
                parameters: json!({"type": "object", "properties": {
                    "path": {"type": "string", "description": "Absolute path of the file or directory"},
                    "lines": {"type": "integer", "description": "How many lines to return", "minimum": 1},
                    "offset": {"type": "integer", "description": "The first line to return, from 0"},
                    "pattern": {"type": "string", "description": "A glob or regular expression to match"}
                }, "required": ["path"]}),
                needs_approval: false,
                server: "files".into(),
            })
            .collect();
        ToolList {
            specs,
            ..Default::default()
        }
    }

    async fn call(&self, _conversation: &str, name: &str, arguments: Value) -> ToolOutcome {
        let length = 200 + self.sizes.lock().unwrap().below(1800) as usize;
        let line = format!("{name} {} ok; ", arguments["path"]);
        ToolOutcome {
            content: line.repeat(length / line.len() + 1)[..length].to_owned(),
            is_error: false,
            full_output: None,
            images: Vec::new(),
            links: Vec::new(),
        }
    }

    async fn close_conversation(&self, _conversation: &str) {}
}

/// Requests, prompt tokens, read, written and billed from turn `from` on.
fn sum(bills: &[Bill], from: usize) -> (usize, u64, u64, u64, f64) {
    let measured: Vec<&Bill> = bills.iter().filter(|b| b.turn >= from).collect();
    (
        measured.len(),
        measured.iter().map(|b| b.prompt).sum(),
        measured.iter().map(|b| b.read).sum(),
        measured.iter().map(|b| b.written).sum(),
        measured.iter().map(|b| b.billed()).sum(),
    )
}

#[path = "../tests/it/support/memory.rs"]
mod memory;
use memory::MemoryStore;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut plan = Lcg(7);
    let plan: Vec<Vec<usize>> = (0..TURNS)
        .map(|_| {
            let rounds = 1 + plan.below(2) as usize;
            (0..rounds).map(|_| 1 + plan.below(12) as usize).collect()
        })
        .collect();
    let model = Arc::new(BillingModel {
        cache: Mutex::default(),
        bills: Mutex::default(),
        newest_only: Mutex::default(),
        turn: AtomicUsize::new(0),
        plan,
    });
    let engine = Engine::new(
        model.clone(),
        Arc::new(Files {
            sizes: Mutex::new(Lcg(11)),
        }),
        Arc::new(MemoryStore::default()),
        EngineSettings {
            default_model: MODEL.into(),
            system_prompt: Some(
                "You are the team's file assistant. Read what is asked, compare the reports, \
                 and answer briefly with the figures that matter."
                    .into(),
            ),
            timezone: jiff::tz::TimeZone::UTC,
            transcription_model: None,
            clock: Default::default(),
            max_tool_rounds: 10,
            fallback_context_tokens: 200_000,
        },
    );
    let (mut calls, mut trims) = (0, 0);
    for turn in 1..=TURNS {
        model.turn.store(turn, Ordering::SeqCst);
        let (events, mut received) = mpsc::unbounded_channel();
        let outcome = engine
            .run_turn(
                "bench:caching",
                Message::user(format!(
                    "Turn {turn}: compare the latest reports and tell me what changed."
                )),
                &events,
                &ApproveAll,
            )
            .await
            .expect("turn failed");
        drop(events);
        while let Some(event) = received.recv().await {
            // The only warning here: the oldest exchanges were left out.
            trims += usize::from(matches!(event, TurnEvent::Warning(_)));
        }
        calls += outcome.tool_calls;
    }
    let bills = model.bills.lock().unwrap().clone();
    println!(
        "{TURNS} turns on {MODEL}: {} requests, {calls} tool calls (rounds of 1 to 12 parallel calls); \
         the oldest exchanges were left out {trims} time(s)",
        bills.len()
    );
    let newest_only = model.newest_only.lock().unwrap().1.clone();
    for (label, from, bills) in [
        ("all turns", 1, &bills),
        ("turns 10-50", FROM_TURN, &bills),
        (
            "turns 10-50, newest breakpoint only",
            FROM_TURN,
            &newest_only,
        ),
    ] {
        let (requests, prompt, read, written, billed) = sum(bills, from);
        println!(
            "{label}: {requests} requests, {prompt} prompt tokens, {:.1}% read from cache, \
             {:.1}% written; billed input {:.3} of uncached",
            read as f64 * 100.0 / prompt as f64,
            written as f64 * 100.0 / prompt as f64,
            billed / prompt as f64
        );
    }
    let (_, prompt, read, ..) = sum(&bills, FROM_TURN);
    let share = read as f64 * 100.0 / prompt as f64;
    let worst = bills
        .iter()
        .filter(|b| b.turn >= FROM_TURN)
        .map(|b| b.read as f64 * 100.0 / b.prompt as f64)
        .fold(f64::INFINITY, f64::min);
    println!("lowest read share of one request from turn {FROM_TURN}: {worst:.1}%");
    println!(
        "target: cache reads at least {TARGET_PERCENT}% of prompt tokens from turn {FROM_TURN}: {} ({share:.1}%)",
        if share >= TARGET_PERCENT {
            "met"
        } else {
            "NOT MET"
        }
    );
}
