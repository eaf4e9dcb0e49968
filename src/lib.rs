//! mcpcord: a self-hosted assistant that talks to people in Discord threads (or a
//! terminal) and uses MCP tools through OpenRouter's chat completions API.
//!
//! - [`conversation`]: the domain: messages, the agent loop ([`conversation::Engine`]),
//!   history repair and context fitting, and the ports the adapters implement.
//! - [`llm`]: the OpenRouter (OpenAI-compatible) client: streaming, retries, catalogue.
//! - [`mcp`]: the MCP host: the `mcpServers` file, sessions per conversation or shared,
//!   tool naming, schema normalisation, results for the model.
//! - [`store`]: SQLite persistence with embedded migrations.
//! - [`config`]: the environment, read once into a typed struct.
//! - [`discord`]: the Discord bot (`mcpcord run`): threads as conversations.
//! - [`terminal`]: `mcpcord chat`, the engine on stdin/stdout.
//! - [`check`]: `mcpcord check`, a report on the configuration and its peers.
//! - [`app`]: the composition root: builds the adapters, runs a surface, shuts down in order.

pub mod app;
pub mod backup;
pub mod check;
pub mod config;
pub mod conversation;
pub mod discord;
pub mod llm;
pub mod mcp;
pub mod metrics;
pub mod store;
pub mod terminal;
