//! The integration tests, in one binary (one link instead of one per file).
//!
//! - `workers`, and parts of `engine`: the engine and the conversations'
//!   workers over in-memory ports, with tokio's clock paused.
//! - `discord`: the real serenity client against a loopback Discord.
//! - `mcp`, `mcp_in_process`, `hostile_mcp`: real MCP servers (npm, PyPI),
//!   rmcp servers in process, and misbehaving ones in raw JSON-RPC.
//! - `engine`, `hostile_model`, `openrouter`: the loopback OpenAI-compatible
//!   model, as OpenRouter and as a plain server.
//! - `cli`, `check`, `storage`: the `mcpcord` binary itself.
//! - `parsers`: property tests of the parsers.
//! - `shards`: two bot processes on one database, each running a shard.
//! - `postgres`: what only PostgreSQL has; the whole suite also runs on it
//!   under `.ci/with-postgres`.
//! - `real_llm`: llama.cpp's `llama-server` with a small real model, when
//!   one is built (optional; it skips with a message otherwise).
//!
//! Tests that need the real MCP servers skip, saying so, when
//! `.ci/install-test-servers` has not been run; under CI they fail instead.

mod support;

mod check;
mod cli;
mod discord;
mod engine;
mod hostile_mcp;
mod hostile_model;
mod mcp;
mod mcp_in_process;
mod oauth;
mod openrouter;
mod parsers;
mod postgres;
mod real_llm;
mod shards;
mod storage;
mod tasks;
mod workers;
