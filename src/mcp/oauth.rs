//! OAuth for HTTP servers (MCP authorization, through rmcp's `auth`):
//! `mcpcord auth SERVER` runs the authorization code flow for the operator
//! (protected-resource and authorization-server metadata discovery, a
//! pre-registered client, a client metadata document or dynamic
//! registration, PKCE S256, the `resource` parameter, the `iss` check) with
//! a loopback redirect, and keeps the tokens in the database; sessions use
//! them and refresh them. Tokens never reach a log.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use rmcp::transport::auth::{
    AuthError, AuthorizationCallback, AuthorizationManager, AuthorizationRequest,
    AuthorizationSession, CredentialStore, OAuthClientConfig, StoredCredentials,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::config::{OAuth, ServerSpec, Transport};

/// How long `mcpcord auth` waits for the browser to come back.
pub const CALLBACK_WAIT: std::time::Duration = std::time::Duration::from_secs(600);
/// How long one connection to the redirect listener may take to say what
/// it wants.
const REQUEST_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// The path of the loopback redirect.
const CALLBACK_PATH: &str = "/callback";

/// Where servers' OAuth credentials are kept (the database): one JSON
/// document per server. Errors are sentences.
#[async_trait]
pub trait TokenVault: Send + Sync + fmt::Debug {
    async fn load(&self, server: &str) -> Result<Option<String>, String>;
    async fn save(&self, server: &str, credentials: &str) -> Result<(), String>;
    async fn clear(&self, server: &str) -> Result<(), String>;
}

/// rmcp's credential store over the vault, for one server.
struct Vaulted {
    vault: Arc<dyn TokenVault>,
    server: String,
}

#[async_trait]
impl CredentialStore for Vaulted {
    async fn load(&self) -> Result<Option<StoredCredentials>, AuthError> {
        let Some(text) = self
            .vault
            .load(&self.server)
            .await
            .map_err(AuthError::CredentialStoreError)?
        else {
            return Ok(None);
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            AuthError::CredentialStoreError(format!("the stored credentials cannot be read ({e})"))
        })
    }

    async fn save(&self, credentials: StoredCredentials) -> Result<(), AuthError> {
        let text = serde_json::to_string(&credentials)
            .map_err(|e| AuthError::CredentialStoreError(e.to_string()))?;
        self.vault
            .save(&self.server, &text)
            .await
            .map_err(AuthError::CredentialStoreError)
    }

    async fn clear(&self) -> Result<(), AuthError> {
        self.vault
            .clear(&self.server)
            .await
            .map_err(AuthError::CredentialStoreError)
    }
}

/// What an admin runs to authorize `server` (again).
pub fn remedy(server: &str) -> String {
    format!("an admin should run `mcpcord auth {server}` on the bot's machine (with its settings)")
}

/// Whether a failure to connect was the server refusing the credentials
/// (none, expired, revoked).
pub fn is_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        let text = error.to_string();
        if text.contains("Auth required")
            || text.contains("OAuth authorization required")
            || text.contains("refresh token was rejected")
        {
            return true;
        }
        next = error.source();
    }
    false
}

/// A manager for the server at `url` with the stored credentials of
/// `server`; without any, the sentence says what to run.
pub async fn stored_manager(
    server: &str,
    url: &str,
    oauth: &OAuth,
    vault: Option<&Arc<dyn TokenVault>>,
) -> Result<AuthorizationManager, String> {
    let vault = vault.ok_or_else(|| {
        format!("the tool server \"{server}\" uses OAuth, and this mode keeps no tokens")
    })?;
    let mut manager = AuthorizationManager::new(url)
        .await
        .map_err(|e| format!("its OAuth set-up failed: {e}"))?;
    manager.set_credential_store(Vaulted {
        vault: vault.clone(),
        server: server.to_owned(),
    });
    let found = manager.initialize_from_store().await.map_err(|e| {
        format!(
            "its OAuth credentials could not be used ({e}); {}",
            remedy(server)
        )
    })?;
    if !found {
        return Err(format!(
            "the tool server \"{server}\" needs authorizing: {}",
            remedy(server)
        ));
    }
    if let (Some(id), Some(secret)) = (&oauth.client_id, &oauth.client_secret) {
        // A confidential client needs its secret to refresh.
        // rmcp wants a valid redirect; a refresh never uses it.
        let config = OAuthClientConfig::new(id.clone(), format!("http://127.0.0.1{CALLBACK_PATH}"))
            .with_client_secret(secret.expose().to_owned())
            .with_scopes(oauth.scopes.clone());
        manager
            .configure_client(config)
            .map_err(|e| format!("its OAuth client could not be set up: {e}"))?;
    }
    Ok(manager)
}

/// The OAuth settings and URL of the server `name`, or why it has none.
pub fn oauth_server<'a>(
    servers: &'a [ServerSpec],
    name: &str,
) -> Result<(&'a str, &'a OAuth), String> {
    let Some(spec) = servers.iter().find(|s| s.name == name) else {
        let names: Vec<&str> = servers.iter().map(|s| s.name.as_str()).collect();
        return Err(format!(
            "there is no server \"{name}\" in the MCP file (it has: {})",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        ));
    };
    match &spec.transport {
        Transport::Http {
            url,
            oauth: Some(oauth),
            ..
        } => Ok((url, oauth)),
        Transport::Http { .. } => Err(format!(
            "the server \"{name}\" is not set up for OAuth: add \"auth\": \"oauth\" to its entry"
        )),
        Transport::Stdio { .. } => Err(format!(
            "the server \"{name}\" is a stdio server; OAuth is for HTTP servers"
        )),
    }
}

/// One authorization in progress: the URL to open, and the listener its
/// redirect comes back to.
pub struct Authorizing {
    server: String,
    session: AuthorizationSession,
    listener: TcpListener,
}

impl fmt::Debug for Authorizing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizing")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Authorizing {
    /// Discovers the server's authorization server and prepares the
    /// request, with a redirect to a loopback port (`port`, or any free
    /// one).
    pub async fn start(
        server: &str,
        url: &str,
        oauth: &OAuth,
        vault: Arc<dyn TokenVault>,
        port: u16,
    ) -> Result<Authorizing, String> {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|e| format!("cannot listen on 127.0.0.1:{port} for the redirect: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let redirect = format!("http://127.0.0.1:{port}{CALLBACK_PATH}");
        let mut manager = AuthorizationManager::new(url)
            .await
            .map_err(|e| format!("OAuth set-up failed: {e}"))?;
        manager.set_credential_store(Vaulted {
            vault,
            server: server.to_owned(),
        });
        let found = manager
            .resolve_metadata_from_challenge(None)
            .await
            .map_err(|e| format!("the server's authorization server could not be found: {e}"))?;
        manager.set_metadata(found.metadata);
        let mut request = AuthorizationRequest::new(redirect).with_client_name("mcpcord");
        if !oauth.scopes.is_empty() {
            request = request.with_scopes(oauth.scopes.iter().map(String::as_str));
        }
        if let Some(id) = &oauth.client_id {
            request = request.with_preregistered_client(id.clone());
        }
        if let Some(secret) = &oauth.client_secret {
            request = request.with_client_secret(secret.expose().to_owned());
        }
        if let Some(document) = &oauth.client_metadata_url {
            request = request.with_client_metadata_url(document.clone());
        }
        let session = AuthorizationSession::new(manager, request)
            .await
            .map_err(|(_, e)| format!("the authorization could not be prepared: {e}"))?;
        Ok(Authorizing {
            server: server.to_owned(),
            session,
            listener,
        })
    }

    /// The URL to open in a browser.
    pub fn url(&self) -> &str {
        self.session.get_authorization_url()
    }

    /// Waits for the redirect to the loopback listener, or for the address
    /// it led to pasted as a line of `pasted` (when the browser runs on
    /// another machine and could not reach it); checks it (state, issuer),
    /// redeems the code and stores the tokens.
    pub async fn finish(
        self,
        mut pasted: tokio::sync::mpsc::UnboundedReceiver<String>,
    ) -> Result<(), String> {
        let mut typing = true;
        loop {
            let (url, mut stream) = tokio::select! {
                accepted = self.listener.accept() => {
                    let (mut stream, _) =
                        accepted.map_err(|e| format!("the redirect listener failed: {e}"))?;
                    let target = tokio::time::timeout(REQUEST_WAIT, request_target(&mut stream)).await;
                    match target.ok().flatten() {
                        Some(target) if target.starts_with(CALLBACK_PATH) => {
                            (format!("http://127.0.0.1{target}"), Some(stream))
                        }
                        _ => {
                            let _ = respond(&mut stream, "404 Not Found", "Not found.").await;
                            continue;
                        }
                    }
                }
                line = pasted.recv(), if typing => match line {
                    Some(line) if line.contains("code=") || line.contains("error=") => {
                        (line.trim().to_owned(), None)
                    }
                    Some(_) => continue,
                    None => {
                        typing = false;
                        continue;
                    }
                },
            };
            let outcome = self.redeem(&url).await;
            if let Some(stream) = stream.as_mut() {
                let (status, text) = match &outcome {
                    Ok(()) => (
                        "200 OK",
                        "mcpcord is authorized. You can close this page.".to_owned(),
                    ),
                    Err(problem) => (
                        "400 Bad Request",
                        format!("The authorization failed: {problem}."),
                    ),
                };
                let _ = respond(stream, status, &text).await;
            }
            return outcome;
        }
    }

    /// Redeems the code of the redirect to `url`.
    async fn redeem(&self, url: &str) -> Result<(), String> {
        if let Some(error) = redirect_error(url) {
            return Err(format!("the authorization server refused: {error}"));
        }
        let callback = AuthorizationCallback::from_redirect_url(url)
            .map_err(|e| format!("that was not an authorization answer: {e}"))?;
        self.session
            .handle_callback_with_issuer(
                &callback.code,
                &callback.csrf_token,
                callback.issuer.as_deref(),
            )
            .await
            .map_err(|e| format!("the authorization failed: {e}"))?;
        tracing::info!(server = %self.server, "OAuth tokens stored");
        Ok(())
    }
}

/// The target of an HTTP GET read from `stream`, when it is one.
async fn request_target(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buffer.windows(4).any(|w| w == b"\r\n\r\n") && buffer.len() < 16 * 1024 {
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            break;
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
    let head = String::from_utf8_lossy(&buffer);
    let line = head.lines().next()?;
    let mut words = line.split(' ');
    (words.next()? == "GET").then_some(())?;
    words.next().map(str::to_owned)
}

/// The `error` (and its description) of a redirect that refused.
fn redirect_error(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let error = pairs.iter().find(|(k, _)| k == "error")?.1.clone();
    Some(match pairs.iter().find(|(k, _)| k == "error_description") {
        Some((_, description)) => format!("{error} ({description})"),
        None => error,
    })
}

async fn respond(
    stream: &mut tokio::net::TcpStream,
    status: &str,
    text: &str,
) -> std::io::Result<()> {
    let body = format!("{text}\n");
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_redirect_says_why() {
        assert_eq!(
            redirect_error(
                "http://127.0.0.1/callback?error=access_denied&error_description=no+thanks&state=x"
            ),
            Some("access_denied (no thanks)".to_owned())
        );
        assert_eq!(
            redirect_error("http://127.0.0.1/callback?code=1&state=x"),
            None
        );
    }
}
