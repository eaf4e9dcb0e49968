//! `mcpcord check`: validates the environment and the MCP file, starts every
//! MCP server and lists its tools as the model will see them, checks the
//! OpenRouter key and the default model, and the Discord token when set.
//! Prints a report; any problem makes the command fail.

use std::io::Write;

use crate::config::{Config, DiscordConfig, ModelApi};
use crate::conversation::{ModelLookup, StoreError};
use crate::discord::rest::Rest;
use crate::llm::OpenRouter;
use crate::mcp::{self, McpHost, Step, Transport, Unavailable};
use crate::store::SqlStore;

/// Tool names shown per server before the list is shortened.
const NAMES_SHOWN: usize = 12;

/// Writes the report to `out` and returns how many problems were found.
pub async fn run(out: &mut impl Write) -> std::io::Result<usize> {
    let mut report = Report { out, problems: 0 };
    report.line("mcpcord check")?;
    let config = match Config::from_env() {
        Ok(config) => {
            report.ok(&format!(
                "configuration: model {}, database {}, MCP file {}",
                config.default_model,
                crate::store::redacted(&config.database_url),
                config.mcp_config.display()
            ))?;
            config
        }
        Err(error) => {
            report.problem(&format!("configuration: {error}"))?;
            return report.finish();
        }
    };
    crate::app::install_crypto();

    match SqlStore::open(&config.database_url).await {
        Ok(store) => {
            report.ok(&format!(
                "database: {} opened and up to date",
                crate::store::redacted(&config.database_url)
            ))?;
            store.close().await;
        }
        Err(error) => {
            let advice = match error {
                // The sentence already says whose files are in the way.
                StoreError::NotWritable(_) => "",
                StoreError::Busy(_) => {
                    " Another process holds it: stop it, or give each process its own DATABASE_URL."
                }
                StoreError::Full(_) => " Free some space on that disk.",
                StoreError::Unreachable(_) => {
                    " Check that the database server runs and that DATABASE_URL names it."
                }
                StoreError::Corrupt(_) => " Restore it from a backup.",
                StoreError::Open(_) | StoreError::Failed(_) => {
                    " Check DATABASE_URL and that its folder exists and is writable."
                }
            };
            report.problem(&format!("database: {error}.{advice}"))?
        }
    }

    check_mcp(&config, &mut report).await?;
    check_model(&config, &mut report).await?;
    check_discord(&mut report).await?;
    report.finish()
}

async fn check_mcp(config: &Config, report: &mut Report<'_, impl Write>) -> std::io::Result<()> {
    let servers = match mcp::config::load(&config.mcp_config, config.mcp_config_explicit, &|name| {
        std::env::var(name).ok()
    }) {
        Ok(servers) => servers,
        Err(error) => return report.problem(&format!("{error}")),
    };
    if servers.is_empty() {
        return report.ok(&format!(
            "MCP file {}: no servers, so no tools",
            config.mcp_config.display()
        ));
    }
    report.ok(&format!(
        "MCP file {}: {} server(s)",
        config.mcp_config.display(),
        servers.len()
    ))?;
    let host = McpHost::new(servers.clone(), config.limits.clone())
        .redacting(&crate::app::own_secrets(config));
    let mcp::Listing {
        tools,
        problems,
        warnings,
        ..
    } = host.list("check").await;
    for server in &servers {
        let names: Vec<&str> = tools
            .iter()
            .filter(|t| t.server == server.name)
            .map(|t| t.exposed.as_str())
            .collect();
        let failed = problems.iter().find(|p| p.server == server.name);
        match failed {
            Some(problem) => {
                let advice = match (&problem.why, &server.transport) {
                    (
                        Unavailable::Failed {
                            step: Step::Start, ..
                        },
                        Transport::Stdio { .. },
                    ) => "Check its command, args, env and cwd.",
                    (
                        Unavailable::Failed {
                            step: Step::Start, ..
                        },
                        Transport::Http { .. },
                    ) => "Check its url and headers, and that the server is running.",
                    (
                        Unavailable::Failed {
                            step: Step::List, ..
                        },
                        _,
                    ) => {
                        "It started but its tool list could not be read; check that it is an MCP server and that its version is current."
                    }
                    (Unavailable::Busy { .. } | Unavailable::Reloaded, _) => {
                        "Try again when the bot is less busy."
                    }
                };
                report.problem(&format!(
                    "MCP server \"{}\": {problem} {advice}",
                    server.name
                ))?
            }
            None => {
                let shown = mcp::shorten_list(&names, NAMES_SHOWN);
                report.ok(&format!(
                    "MCP server \"{}\": {} tool(s): {shown}",
                    server.name,
                    names.len()
                ))?;
                for (_, warning) in warnings.iter().filter(|(s, _)| *s == server.name) {
                    report.note(&format!("MCP server \"{}\": {warning}", server.name))?;
                }
            }
        }
    }
    if tools.len() > mcp::MAX_TOOLS_PER_REQUEST {
        report.problem(&format!(
            "the MCP servers offer {} tools together, more than the {} one request may carry; the last {} would be left out. Narrow them with \"allowedTools\" or \"blockedTools\".",
            tools.len(),
            mcp::MAX_TOOLS_PER_REQUEST,
            tools.len() - mcp::MAX_TOOLS_PER_REQUEST
        ))?;
    }
    host.shutdown().await;
    Ok(())
}

async fn check_model(config: &Config, report: &mut Report<'_, impl Write>) -> std::io::Result<()> {
    let endpoint = match config.model_api {
        ModelApi::OpenRouter => "OpenRouter",
        ModelApi::OpenAi => "model endpoint (MODEL_API=openai)",
    };
    let model = match OpenRouter::new(config) {
        Ok(model) => model,
        Err(error) => return report.problem(&format!("{endpoint}: {error}")),
    };
    match model.verify_key().await {
        Ok(()) => report.ok(&format!("{endpoint}: {} accepts the key", config.base_url))?,
        Err(error) => return report.problem(&format!("{endpoint}: {error}")),
    }
    let name = &config.default_model;
    match crate::conversation::ChatModel::model_info(&model, name).await {
        ModelLookup::Known(info) if info.supports_tools != Some(false) => {
            let tools = match info.supports_tools {
                Some(_) => "supports tools",
                None => "listed (the endpoint does not say whether it supports tools; they are offered)",
            };
            let context = match info.context_length {
                Some(tokens) => format!("context {tokens} tokens"),
                None => format!(
                    "context not listed, {} tokens assumed (FALLBACK_CONTEXT_TOKENS)",
                    config.limits.fallback_context_tokens
                ),
            };
            report.ok(&format!("default model {name}: {tools}, {context}"))
        }
        ModelLookup::Known(_) => report.problem(&format!(
            "default model {name} cannot use tools. Set DEFAULT_MODEL to a model whose supported parameters include tools."
        )),
        ModelLookup::Unlisted => report.problem(&format!(
            "default model {name} is not in the model list of {}. Check DEFAULT_MODEL (it needs the provider prefix, e.g. openai/…).",
            config.base_url
        )),
        ModelLookup::Unavailable => report.note(&format!(
            "default model {name}: the endpoint has no model list, so tool support cannot be checked"
        )),
    }
}

async fn check_discord(report: &mut Report<'_, impl Write>) -> std::io::Result<()> {
    let discord = match DiscordConfig::from_env() {
        Ok(discord) => discord,
        Err(crate::config::ConfigError::Missing(_)) => {
            return report.note("Discord: DISCORD_TOKEN is not set (needed for `mcpcord run`, not for `mcpcord chat`)");
        }
        Err(error) => return report.problem(&format!("Discord: {error}")),
    };
    let rest = match Rest::new(&discord.api_base, discord.token.clone()) {
        Ok(rest) => rest,
        Err(error) => return report.problem(&format!("Discord: {error}")),
    };
    match rest.current_application().await {
        Ok(application) => report.ok(&format!(
            "Discord: the token belongs to the application \"{}\"",
            application["name"].as_str().unwrap_or("?")
        )),
        Err(error) => report.problem(&format!("Discord: {error}")),
    }
}

struct Report<'a, W: Write> {
    out: &'a mut W,
    problems: usize,
}

impl<W: Write> Report<'_, W> {
    fn line(&mut self, text: &str) -> std::io::Result<()> {
        writeln!(self.out, "{text}")
    }

    fn ok(&mut self, text: &str) -> std::io::Result<()> {
        writeln!(self.out, "  ok       {text}")
    }

    fn note(&mut self, text: &str) -> std::io::Result<()> {
        writeln!(self.out, "  note     {text}")
    }

    fn problem(&mut self, text: &str) -> std::io::Result<()> {
        self.problems += 1;
        writeln!(self.out, "  PROBLEM  {text}")
    }

    fn finish(mut self) -> std::io::Result<usize> {
        let problems = self.problems;
        match problems {
            0 => self.line("All checks passed.")?,
            1 => self.line("1 problem found; fix it and run `mcpcord check` again.")?,
            n => self.line(&format!(
                "{n} problems found; fix them and run `mcpcord check` again."
            ))?,
        }
        Ok(problems)
    }
}
