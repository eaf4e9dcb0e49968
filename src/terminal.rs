//! `mcpcord chat`: the engine on stdin/stdout. One message per line; tool
//! calls and the answer on stdout, problems on stderr.

use std::io::Write;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::sync::mpsc;

use crate::conversation::{Engine, Message, TurnEvent};

/// The conversation key of a terminal conversation.
pub fn conversation_key(name: &str) -> String {
    format!("terminal:{name}")
}

/// Reads lines from `input` until EOF and answers each one.
pub async fn run(
    engine: &Engine,
    conversation: &str,
    input: impl AsyncBufRead + Unpin,
    out: &mut impl Write,
    err: &mut impl Write,
) -> std::io::Result<()> {
    let mut lines = input.lines();
    while let Some(line) = lines.next_line().await? {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/reset" {
            match engine.reset(conversation).await {
                Ok(()) => writeln!(out, "(conversation cleared)")?,
                Err(e) => writeln!(err, "error: {e}")?,
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("/model") {
            command_model(engine, conversation, rest.trim(), out, err).await?;
            continue;
        }
        turn(engine, conversation, line, out, err).await?;
    }
    Ok(())
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
    text: &str,
    out: &mut impl Write,
    err: &mut impl Write,
) -> std::io::Result<()> {
    let (events, mut received) = mpsc::unbounded_channel();
    let run = async move {
        let result = engine
            .run_turn(conversation, Message::user(text), &events)
            .await;
        drop(events);
        result
    };
    let render = async {
        // Whether streamed text left the cursor mid-line.
        let mut open_line = false;
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
                TurnEvent::ToolFinished { .. } => {}
                TurnEvent::Answer(answer) => {
                    if std::mem::take(&mut open_line) {
                        writeln!(out)?;
                    } else {
                        writeln!(out, "{answer}")?;
                    }
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
    let (outcome, rendered) = tokio::join!(run, render);
    if let Ok(outcome) = outcome {
        tracing::info!(
            conversation,
            model = %outcome.model,
            rounds = outcome.rounds,
            tool_calls = outcome.tool_calls,
            prompt_tokens = outcome.usage.prompt_tokens,
            completion_tokens = outcome.usage.completion_tokens,
            cost = outcome.usage.cost,
            duration_ms = outcome.duration.as_millis() as u64,
            "turn finished"
        );
    }
    rendered
}
