//! `mcpcord chat`: the engine on stdin/stdout. One message per line; tool
//! calls and the answer on stdout, problems on stderr. Ctrl-C during a turn
//! stops that turn; a second one, or one while idle, ends the chat.

use std::io::Write;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::conversation::elicitation::{Field, complete};
use crate::conversation::tasks::result_input;
use crate::conversation::{
    Answer, ApprovalRequest, Approver, Ask, Decision, Engine, Message, Place, Question,
    QuestionKind, TaskRecord, TaskSink, ToolOutcome, TurnEvent, TurnInput,
};

/// The input, shared by the chat loop and approval questions.
type Input = Arc<Mutex<LossyLines>>;

/// Lines of input; bytes that are not UTF-8 become U+FFFD with a warning
/// instead of ending the chat.
struct LossyLines {
    reader: Box<dyn AsyncBufRead + Unpin + Send>,
    buffer: Vec<u8>,
}

impl LossyLines {
    /// The next line. Cancel-safe: what was read of a line before the
    /// future was dropped stays for the next call.
    async fn next_line(&mut self) -> std::io::Result<Option<String>> {
        if self.reader.read_until(b'\n', &mut self.buffer).await? == 0 && self.buffer.is_empty() {
            return Ok(None);
        }
        let bytes = self.buffer.strip_suffix(b"\n").unwrap_or(&self.buffer);
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        let line = match std::str::from_utf8(bytes) {
            Ok(text) => text.to_owned(),
            Err(_) => {
                eprintln!(
                    "warning: this line is not valid UTF-8; the bytes that are not were replaced by \u{FFFD}"
                );
                String::from_utf8_lossy(bytes).into_owned()
            }
        };
        self.buffer.clear();
        Ok(Some(line))
    }
}

/// How tool calls that need approval are decided in the terminal, and
/// whether servers' questions are asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approvals {
    /// `--yes` with piped input: approve everything, ask nothing.
    All,
    /// `--yes` at a terminal: approve everything, but ask servers'
    /// questions.
    AllAsking,
    /// Interactive input: ask on the terminal.
    Ask,
    /// Piped input without `--yes`: decline, saying why.
    Decline,
}

/// Why calls are declined when nobody can be asked.
const NOT_INTERACTIVE: &str = "it needs approval and the input is not interactive; run `mcpcord chat --yes` to allow tool calls without asking";
/// Why servers' questions are declined when the input is piped.
const NO_QUESTIONS: &str = "the input is not interactive, so nobody can answer it; run `mcpcord chat` at a terminal to answer servers' questions";

/// Answers without asking: approves every call or declines it, and
/// declines servers' questions.
struct Unasked {
    approve: bool,
}

#[async_trait]
impl Approver for Unasked {
    async fn decide(&self, _request: &ApprovalRequest) -> Decision {
        if self.approve {
            Decision::Approve
        } else {
            Decision::Decline(NOT_INTERACTIVE.into())
        }
    }

    fn not_asked(&self) -> Option<&str> {
        Some(NO_QUESTIONS)
    }
}

/// Asks on stderr and reads the answer from the chat's own input.
struct Prompt {
    input: Input,
    /// `--yes`: calls are approved without asking.
    approve_all: bool,
}

/// A line the person typed for a question: `None` when the input ended.
async fn answer_line(input: &mut LossyLines, prompt: &str) -> Option<String> {
    eprint!("{prompt}");
    input.next_line().await.ok().flatten()
}

#[async_trait]
impl Approver for Prompt {
    async fn decide(&self, request: &ApprovalRequest) -> Decision {
        if self.approve_all {
            return Decision::Approve;
        }
        // Holding the input for the whole question asks one call at a time.
        let mut input = self.input.lock().await;
        let prompt = format!("Allow {} {}? [y/N] ", request.tool, request.arguments);
        match answer_line(&mut input, &prompt).await {
            Some(answer) if matches!(answer.trim().to_lowercase().as_str(), "y" | "yes") => {
                Decision::Approve
            }
            Some(_) => Decision::Decline("the user said no".into()),
            None => Decision::Decline("the input ended before an answer".into()),
        }
    }

    async fn ask(&self, question: &Question) -> Answer {
        let mut input = self.input.lock().await;
        let message = if question.message.is_empty() {
            String::new()
        } else {
            format!(": {}", question.message)
        };
        eprintln!(
            "🔌 The tool server \"{}\" asks (for {}){message}",
            question.server, question.tool
        );
        match &question.kind {
            QuestionKind::Url(url) => ask_url(&mut input, url).await,
            QuestionKind::Form(fields) => ask_form(&mut input, fields).await,
        }
    }

    fn not_asked(&self) -> Option<&str> {
        None
    }
}

/// A page to open: shown whole with its site, never opened here.
async fn ask_url(input: &mut LossyLines, url: &str) -> Answer {
    let site = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    eprintln!("It asks you to open this page in your browser (mcpcord does not open it):");
    eprintln!("  {url}");
    eprintln!("  The site is {site}. Open it only if you trust it.");
    let prompt = "Press Enter when you are done there, or type n to decline, c to cancel: ";
    match answer_line(input, prompt).await.as_deref().map(str::trim) {
        Some("" | "y" | "yes" | "done") => Answer::Accept(Default::default()),
        Some("n" | "no") => Answer::Decline,
        _ => Answer::Cancel,
    }
}

/// A form, one field a line; a value that does not fit is asked again.
async fn ask_form(input: &mut LossyLines, fields: &[Field]) -> Answer {
    eprintln!(
        "Type each value and press Enter; an empty line keeps the default or skips an optional field. !decline or !cancel ends the form."
    );
    let mut values = serde_json::Map::new();
    for field in fields {
        let mut prompt = format!("  {}", field.title);
        if field.required {
            prompt.push_str(" (required)");
        }
        if let Some(description) = &field.description {
            prompt.push_str(&format!(" — {description}"));
        }
        prompt.push_str(&format!(" [{}]", field.hint()));
        if let Some(default) = &field.default {
            prompt.push_str(&format!(" (default {default})"));
        }
        prompt.push_str(": ");
        loop {
            let Some(line) = answer_line(input, &prompt).await else {
                return Answer::Cancel;
            };
            match line.trim() {
                "!decline" => return Answer::Decline,
                "!cancel" => return Answer::Cancel,
                _ => {}
            }
            match field.read(&line) {
                Ok(Some(value)) => {
                    values.insert(field.name.clone(), value);
                    break;
                }
                Ok(None) => break,
                Err(problem) => eprintln!("  {problem}; try again."),
            }
        }
    }
    match complete(fields, &values) {
        Ok(()) => Answer::Accept(values),
        Err(_) => Answer::Cancel,
    }
}

/// The conversation key of a terminal conversation.
pub fn conversation_key(name: &str) -> String {
    format!("terminal:{name}")
}

/// Reads lines from `input` until EOF and answers each one. Each value
/// from `interrupts` is a Ctrl-C: during a turn the first stops it and the
/// second ends the chat; while idle one ends it.
pub async fn run(
    engine: &Engine,
    conversation: &str,
    input: impl AsyncBufRead + Unpin + Send + 'static,
    approvals: Approvals,
    interrupts: &mut mpsc::UnboundedReceiver<()>,
    out: &mut impl Write,
    err: &mut impl Write,
) -> std::io::Result<()> {
    let input: Input = Arc::new(Mutex::new(LossyLines {
        reader: Box::new(input),
        buffer: Vec::new(),
    }));
    let approver: Box<dyn Approver> = match approvals {
        Approvals::All => Box::new(Unasked { approve: true }),
        Approvals::Decline => Box::new(Unasked { approve: false }),
        Approvals::Ask | Approvals::AllAsking => Box::new(Prompt {
            input: input.clone(),
            approve_all: approvals == Approvals::AllAsking,
        }),
    };
    let (delivered, mut finished) = mpsc::unbounded_channel();
    let delivery = Arc::new(ChatDelivery {
        conversation: conversation.to_owned(),
        to: delivered,
    });
    match engine.tasks().start(delivery).await {
        Ok(0) => {}
        Ok(followed) => writeln!(
            out,
            "({followed} tool calls of this chat run in the background)"
        )?,
        Err(e) => writeln!(
            err,
            "warning: the background tasks kept from before could not be read: {e}"
        )?,
    }
    loop {
        let line = {
            let mut input = input.lock().await;
            tokio::select! {
                line = input.next_line() => Next::Line(line?),
                Some(()) = interrupts.recv() => Next::Line(None),
                Some(done) = finished.recv() => Next::Task(Box::new(done)),
            }
        };
        // Said to a background task's delivery once its result was answered.
        let mut answered = None;
        let line = match line {
            Next::Line(Some(line)) => line,
            Next::Line(None) => break,
            Next::Task(done) => {
                let (record, outcome, taken) = *done;
                answered = Some(taken);
                writeln!(
                    out,
                    "(the background task {} of {} {})",
                    record.ticket.task_id,
                    record.ticket.tool,
                    if outcome.is_error {
                        "ended without a result"
                    } else {
                        "finished"
                    }
                )?;
                result_input(&record, &outcome)
            }
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let ask = match word {
            _ if answered.is_some() => Ask::New(Message::user(line)),
            "/reset" if rest.trim().is_empty() => {
                match engine.reset(conversation).await {
                    Ok(()) => writeln!(out, "(conversation cleared)")?,
                    Err(e) => writeln!(err, "error: {e}")?,
                }
                continue;
            }
            "/undo" if rest.trim().is_empty() => {
                match engine.undo(conversation, None).await {
                    Ok(true) => writeln!(out, "(the last exchange was removed)")?,
                    Ok(false) => writeln!(out, "(nothing to undo)")?,
                    Err(e) => writeln!(err, "error: {e}")?,
                }
                continue;
            }
            "/retry" if rest.trim().is_empty() => Ask::Again { of: None },
            "/model" => {
                command_model(engine, conversation, rest.trim(), out, err).await?;
                continue;
            }
            "/system" => {
                command_system(engine, conversation, rest.trim(), out, err).await?;
                continue;
            }
            "/tasks" => {
                command_tasks(engine, conversation, rest.trim(), out, err).await?;
                continue;
            }
            "/prompt" => match command_prompt(engine, conversation, rest.trim(), out).await? {
                Picked::Send(text) => Ask::New(Message::user(text)),
                Picked::Listed => continue,
                Picked::Refused(problem) => {
                    writeln!(err, "error: {problem}")?;
                    continue;
                }
            },
            "/resource" => match command_resource(engine, conversation, rest.trim(), out).await? {
                Picked::Send(text) => Ask::New(Message::user(text)),
                Picked::Listed => continue,
                Picked::Refused(problem) => {
                    writeln!(err, "error: {problem}")?;
                    continue;
                }
            },
            _ if word.starts_with('/') && !word[1..].contains('/') => {
                writeln!(
                    err,
                    "error: there is no command {word}. Commands: /reset, /retry, /undo, /model [name], /system [prompt | --default], /prompt [SERVER__NAME key=value ...], /resource [URI [question]], /tasks [cancel ID]."
                )?;
                continue;
            }
            _ => Ask::New(Message::user(line)),
        };
        let stop = CancellationToken::new();
        let turn = turn(
            engine,
            conversation,
            ask,
            approver.as_ref(),
            stop.clone(),
            out,
            err,
        );
        let ended = watch(turn, &stop, interrupts).await?;
        if let Some(taken) = answered {
            let _ = taken.send(());
        }
        if let Ended::Chat = ended {
            break;
        }
    }
    Ok(())
}

/// `/tasks` lists the tool calls running in the background; `/tasks cancel
/// ID` cancels one (with no id: the only one).
async fn command_tasks(
    engine: &Engine,
    conversation: &str,
    rest: &str,
    out: &mut impl Write,
    err: &mut impl Write,
) -> std::io::Result<()> {
    let tasks = engine.tasks();
    let (word, id) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    match word {
        "" => {
            let running = tasks.running(conversation);
            if running.is_empty() {
                writeln!(out, "(no tool call runs in the background)")?;
            }
            for record in running {
                let said = record
                    .message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                writeln!(
                    out,
                    "{}  {}{said}",
                    record.ticket.task_id, record.ticket.tool
                )?;
            }
        }
        "cancel" => {
            let cancelled = match tasks.find(conversation, id.trim()) {
                Ok(record) => tasks.cancel(&record).await.map(|()| record),
                Err(problem) => Err(problem),
            };
            match cancelled {
                Ok(record) => writeln!(
                    out,
                    "(cancelled the background task {})",
                    record.ticket.task_id
                )?,
                Err(problem) => writeln!(err, "error: {problem}")?,
            }
        }
        other => writeln!(
            err,
            "error: /tasks takes nothing or cancel ID, not {other:?}"
        )?,
    }
    Ok(())
}

/// What the chat loop got next.
enum Next {
    Line(Option<String>),
    Task(Box<Finished>),
}

/// A background task's result on its way to the chat, and where to say
/// it was answered.
type Finished = (TaskRecord, ToolOutcome, oneshot::Sender<()>);

/// Brings this chat's background task results to its loop.
struct ChatDelivery {
    conversation: String,
    to: mpsc::UnboundedSender<Finished>,
}

#[async_trait]
impl TaskSink for ChatDelivery {
    async fn deliver(&self, task: &TaskRecord, outcome: &ToolOutcome) -> Result<(), String> {
        let (taken, answered) = oneshot::channel();
        self.to
            .send((task.clone(), outcome.clone(), taken))
            .map_err(|_| "the chat ended".to_owned())?;
        answered
            .await
            .map_err(|_| "the chat ended before it was answered".to_owned())
    }

    async fn takes(&self, conversation: &str) -> bool {
        conversation == self.conversation
    }
}

/// How a turn in the terminal ended.
enum Ended {
    Turn,
    /// Ctrl-C a second time: the chat ends too.
    Chat,
}

/// Runs `turn` while watching for Ctrl-C: the first cancels `stop` (the
/// turn ends cleanly), the second ends the chat at once.
async fn watch(
    turn: impl Future<Output = std::io::Result<()>>,
    stop: &CancellationToken,
    interrupts: &mut mpsc::UnboundedReceiver<()>,
) -> std::io::Result<Ended> {
    let interrupted = async {
        if interrupts.recv().await.is_some() {
            stop.cancel();
            if interrupts.recv().await.is_some() {
                return;
            }
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        result = turn => result.map(|()| Ended::Turn),
        () = interrupted => Ok(Ended::Chat),
    }
}

/// What `/prompt` or `/resource` came to.
enum Picked {
    /// The text of the person's turn.
    Send(String),
    /// What there is was printed; nothing to send.
    Listed,
    Refused(String),
}

/// `/prompt` lists the prompts; `/prompt KEY key=value ...` fills one in
/// as the text of the person's turn.
async fn command_prompt(
    engine: &Engine,
    conversation: &str,
    rest: &str,
    out: &mut impl Write,
) -> std::io::Result<Picked> {
    let (key, arguments) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    if key.is_empty() {
        let prompts = match engine.prompts(conversation).await {
            Ok(prompts) => prompts,
            Err(error) => return Ok(Picked::Refused(error.to_string())),
        };
        if prompts.is_empty() {
            return Ok(Picked::Refused("no tool server here offers prompts".into()));
        }
        for prompt in prompts {
            let arguments: Vec<String> = prompt
                .arguments
                .iter()
                .map(|a| format!("{}{}", a.name, if a.required { "*" } else { "" }))
                .collect();
            let about = prompt.description.as_deref().unwrap_or(&prompt.title);
            writeln!(out, "{} — {about} ({})", prompt.key(), arguments.join(", "))?;
        }
        writeln!(out, "(* required; use one with /prompt KEY name=value ...)")?;
        return Ok(Picked::Listed);
    }
    let arguments = match crate::conversation::offers::parse_arguments(arguments) {
        Ok(arguments) => arguments,
        Err(problem) => return Ok(Picked::Refused(problem)),
    };
    Ok(
        match engine.fill_prompt(conversation, key, &arguments).await {
            Ok(text) => Picked::Send(text),
            Err(problem) => Picked::Refused(problem),
        },
    )
}

/// `/resource` lists the resources; `/resource URI [question]` reads one
/// and sends it (with the question) as the person's turn.
async fn command_resource(
    engine: &Engine,
    conversation: &str,
    rest: &str,
    out: &mut impl Write,
) -> std::io::Result<Picked> {
    let (uri, question) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    if uri.is_empty() {
        let resources = match engine.resources(conversation).await {
            Ok(resources) => resources,
            Err(error) => return Ok(Picked::Refused(error.to_string())),
        };
        if resources.is_empty() {
            return Ok(Picked::Refused(
                "no tool server here offers resources".into(),
            ));
        }
        for resource in resources {
            let kind = if resource.template {
                " (template: fill in the {…})"
            } else {
                ""
            };
            writeln!(
                out,
                "{} — {} [{}]{kind}",
                resource.uri, resource.name, resource.server
            )?;
        }
        return Ok(Picked::Listed);
    }
    let (server, contents) = match engine.read_resource(conversation, uri).await {
        Ok(read) => read,
        Err(problem) => return Ok(Picked::Refused(problem)),
    };
    let mut text = engine.resource_context(&server, uri, &contents);
    if !question.trim().is_empty() {
        text.push_str("\n\n");
        text.push_str(question.trim());
    }
    Ok(Picked::Send(text))
}

/// `/system` shows the prompt, `/system TEXT` sets it, `/system --default`
/// goes back to the global one.
async fn command_system(
    engine: &Engine,
    conversation: &str,
    prompt: &str,
    out: &mut impl Write,
    err: &mut impl Write,
) -> std::io::Result<()> {
    let set = match prompt {
        "" => {
            return match engine.system_prompt_of(conversation).await {
                Ok(Some(prompt)) => writeln!(out, "(system prompt: {prompt})"),
                Ok(None) => writeln!(out, "(no system prompt)"),
                Err(e) => writeln!(err, "error: {e}"),
            };
        }
        "--default" => None,
        prompt => Some(prompt),
    };
    match engine.set_system_prompt(conversation, set).await {
        Ok(()) if set.is_some() => writeln!(out, "(system prompt set)"),
        Ok(()) => writeln!(out, "(back to the default system prompt)"),
        Err(e) => writeln!(err, "error: {e}"),
    }
}

async fn command_model(
    engine: &Engine,
    conversation: &str,
    model: &str,
    out: &mut impl Write,
    err: &mut impl Write,
) -> std::io::Result<()> {
    if model.is_empty() {
        match engine.model_of(conversation).await {
            Ok(model) => writeln!(out, "(model: {model})"),
            Err(e) => writeln!(err, "error: {e}"),
        }
    } else {
        match engine.set_model(conversation, Some(model)).await {
            Ok(model) => writeln!(out, "(model set to {model})"),
            Err(e) => writeln!(err, "error: {e}"),
        }
    }
}

async fn turn(
    engine: &Engine,
    conversation: &str,
    ask: Ask,
    approver: &dyn Approver,
    stop: CancellationToken,
    out: &mut impl Write,
    err: &mut impl Write,
) -> std::io::Result<()> {
    let (events, mut received) = mpsc::unbounded_channel();
    let input = TurnInput {
        ask,
        kept: None,
        stop,
        place: Place {
            channel: "the terminal".into(),
            server: "this computer".into(),
        },
    };
    let run = async move {
        let result = engine
            .run_turn(conversation, input, &events, approver)
            .await;
        drop(events);
        result
    };
    let render = async {
        // Whether streamed text left the cursor mid-line.
        let mut open_line = false;
        // Per call: when its last progress line was printed.
        let mut progressed: std::collections::HashMap<String, std::time::Instant> =
            Default::default();
        while let Some(event) = received.recv().await {
            match event {
                TurnEvent::Text(fragment) => {
                    write!(out, "{fragment}")?;
                    out.flush()?;
                    open_line = true;
                }
                TurnEvent::ToolStarted {
                    name, arguments, ..
                } => {
                    if std::mem::take(&mut open_line) {
                        writeln!(out)?;
                    }
                    writeln!(out, "→ {name} {arguments}")?;
                }
                TurnEvent::ToolProgress {
                    call_id,
                    name,
                    progress,
                    total,
                    message,
                } => {
                    let now = std::time::Instant::now();
                    let due = progressed
                        .get(&call_id)
                        .is_none_or(|at| now.duration_since(*at) >= PROGRESS_EVERY);
                    if due {
                        progressed.insert(call_id, now);
                        if std::mem::take(&mut open_line) {
                            writeln!(out)?;
                        }
                        writeln!(
                            out,
                            "{}",
                            progress_line(&name, progress, total, message.as_deref())
                        )?;
                    }
                }
                TurnEvent::ToolFinished { .. } => {}
                TurnEvent::Answer { text: answer, .. } => {
                    if std::mem::take(&mut open_line) {
                        writeln!(out)?;
                    } else {
                        writeln!(out, "{answer}")?;
                    }
                }
                TurnEvent::Stopped => {
                    if std::mem::take(&mut open_line) {
                        writeln!(out)?;
                    }
                    writeln!(out, "(stopped)")?;
                }
                TurnEvent::Warning(warning) => writeln!(err, "warning: {warning}")?,
                TurnEvent::Error(error) => {
                    if std::mem::take(&mut open_line) {
                        writeln!(out)?;
                    }
                    writeln!(err, "error: {error}")?;
                }
            }
        }
        out.flush()?;
        std::io::Result::Ok(())
    };
    let (_, rendered) = tokio::join!(run, render);
    rendered
}

/// At most one progress line per call in this time.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// `  … name: 40% (message)`, or the count when there is no total.
fn progress_line(name: &str, progress: f64, total: Option<f64>, message: Option<&str>) -> String {
    let amount = crate::discord::render::progress_amount(progress, total);
    match (amount, message.map(str::trim).filter(|m| !m.is_empty())) {
        (Some(amount), Some(message)) => format!("  … {name}: {amount} ({message})"),
        (Some(amount), None) => format!("  … {name}: {amount}"),
        (None, Some(message)) => format!("  … {name}: {message}"),
        (None, None) => format!("  … {name}: working"),
    }
}
