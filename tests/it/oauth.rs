//! OAuth for HTTP servers: an rmcp server behind bearer tokens and an
//! authorization server, both in this process, that check what the MCP
//! authorization spec asks of a client (PKCE S256, the `resource`
//! parameter, the redirect), against `mcpcord auth` and the bot's sessions.

use crate::support;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};

use axum::extract::{Form, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use mcpcord::app::App;
use mcpcord::conversation::ToolHost;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use serde_json::{Value, json};
use sha2::Digest;
use tokio_util::sync::CancellationToken;

const CLIENT: &str = "mcpcord-test";

#[derive(Default)]
struct Grants {
    base: String,
    /// Code → (PKCE challenge, redirect URI).
    codes: HashMap<String, (String, String)>,
    access: HashSet<String>,
    refresh: HashSet<String>,
    issued: usize,
    /// What the authorization server refused, for the test to show.
    refused: Vec<String>,
    /// The `iss` sent back with a code (the issuer, unless a test changes it).
    iss: Option<String>,
}

#[derive(Clone, Default)]
struct Auth(Arc<Mutex<Grants>>);

impl Auth {
    fn refuse(&self, why: String) -> Response {
        self.0.lock().unwrap().refused.push(why.clone());
        (StatusCode::BAD_REQUEST, why).into_response()
    }

    fn tokens(&self) -> serde_json::Value {
        let mut grants = self.0.lock().unwrap();
        grants.issued += 1;
        let access = format!("at-{}", grants.issued);
        let refresh = format!("rt-{}", grants.issued);
        grants.access.insert(access.clone());
        grants.refresh.insert(refresh.clone());
        json!({"access_token": access, "token_type": "Bearer", "expires_in": 3600,
               "refresh_token": refresh, "scope": "research"})
    }

    /// Access tokens stop working; refresh tokens still do.
    fn expire_access(&self) {
        self.0.lock().unwrap().access.clear();
    }

    /// Nothing works any more.
    fn revoke(&self) {
        let mut grants = self.0.lock().unwrap();
        grants.access.clear();
        grants.refresh.clear();
    }
}

async fn resource_metadata(State(auth): State<Auth>) -> Response {
    let base = auth.0.lock().unwrap().base.clone();
    axum::Json(
        json!({"resource": format!("{base}/mcp"), "authorization_servers": [base],
        "scopes_supported": ["research"], "bearer_methods_supported": ["header"]}),
    )
    .into_response()
}

async fn server_metadata(State(auth): State<Auth>) -> Response {
    let base = auth.0.lock().unwrap().base.clone();
    axum::Json(json!({
        "issuer": base,
        "authorization_endpoint": format!("{base}/authorize"),
        "token_endpoint": format!("{base}/token"),
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "authorization_response_iss_parameter_supported": true,
        "scopes_supported": ["research"]
    }))
    .into_response()
}

async fn authorize(State(auth): State<Auth>, Query(q): Query<HashMap<String, String>>) -> Response {
    let base = auth.0.lock().unwrap().base.clone();
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    if get("client_id") != CLIENT {
        return auth.refuse(format!("unknown client {:?}", get("client_id")));
    }
    if get("code_challenge_method") != "S256" || get("code_challenge").is_empty() {
        return auth.refuse("no S256 PKCE challenge".into());
    }
    if get("resource") != format!("{base}/mcp") {
        return auth.refuse(format!("resource {:?}", get("resource")));
    }
    let redirect = get("redirect_uri");
    if !redirect.starts_with("http://127.0.0.1:") {
        return auth.refuse(format!("redirect {redirect:?}"));
    }
    let code = format!("code-{}", get("state").len());
    let iss = {
        let mut grants = auth.0.lock().unwrap();
        grants
            .codes
            .insert(code.clone(), (get("code_challenge"), redirect.clone()));
        grants.iss.clone().unwrap_or(base)
    };
    let mut location = reqwest::Url::parse(&redirect).unwrap();
    location
        .query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &get("state"))
        .append_pair("iss", &iss);
    (
        StatusCode::FOUND,
        [(header::LOCATION, location.to_string())],
    )
        .into_response()
}

async fn token(State(auth): State<Auth>, Form(f): Form<HashMap<String, String>>) -> Response {
    let base = auth.0.lock().unwrap().base.clone();
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    if get("resource") != format!("{base}/mcp") {
        return auth.refuse(format!("token request for resource {:?}", get("resource")));
    }
    match get("grant_type").as_str() {
        "authorization_code" => {
            let found = auth.0.lock().unwrap().codes.remove(&get("code"));
            let Some((challenge, redirect)) = found else {
                return auth.refuse("unknown code".into());
            };
            let digest = sha2::Sha256::digest(get("code_verifier").as_bytes());
            let expected = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
            if expected != challenge || redirect != get("redirect_uri") {
                return auth.refuse("PKCE verifier or redirect does not match".into());
            }
            axum::Json(auth.tokens()).into_response()
        }
        "refresh_token" => {
            let known = auth.0.lock().unwrap().refresh.remove(&get("refresh_token"));
            if !known {
                return (
                    StatusCode::BAD_REQUEST,
                    axum::Json(json!({"error": "invalid_grant"})),
                )
                    .into_response();
            }
            axum::Json(auth.tokens()).into_response()
        }
        other => auth.refuse(format!("grant {other:?}")),
    }
}

/// The MCP endpoint takes only valid bearer tokens.
async fn guard(State(auth): State<Auth>, request: Request, next: Next) -> Response {
    let base = auth.0.lock().unwrap().base.clone();
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let valid = token.is_some_and(|t| auth.0.lock().unwrap().access.contains(&t));
    if valid {
        return next.run(request).await;
    }
    let challenge = format!(
        "Bearer resource_metadata=\"{base}/.well-known/oauth-protected-resource/mcp\", scope=\"research\""
    );
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, challenge)],
    )
        .into_response()
}

/// One tool, `whoami`, which says which token the request came with.
#[derive(Clone)]
struct Secure;

impl ServerHandler for Secure {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(vec![Tool::new(
            "whoami",
            "Says who is asking",
            Arc::new(json!({"type": "object"}).as_object().unwrap().clone()),
        )]))
    }

    async fn call_tool(
        &self,
        _request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let token = context
            .extensions
            .get::<axum::http::request::Parts>()
            .and_then(|p| p.headers.get(header::AUTHORIZATION))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        Ok(CallToolResult::success(vec![ContentBlock::text(token)]).into())
    }
}

async fn serve(auth: &Auth, stop: &CancellationToken) -> String {
    let mcp = support::mcp_router(Secure, stop)
        .layer(axum::middleware::from_fn_with_state(auth.clone(), guard));
    let router = axum::Router::new()
        .route(
            "/.well-known/oauth-protected-resource/mcp",
            get(resource_metadata),
        )
        .route(
            "/.well-known/oauth-protected-resource",
            get(resource_metadata),
        )
        .route(
            "/.well-known/oauth-authorization-server",
            get(server_metadata),
        )
        .route("/authorize", get(authorize))
        .route("/token", post(token))
        .with_state(auth.clone())
        .merge(mcp);
    // The base is known only once bound; the handlers read it from the state.
    let base = support::serve_router(router, stop).await;
    auth.0.lock().unwrap().base = base.clone();
    base
}

/// Runs `mcpcord auth secure` and plays the browser: opens the URL it
/// prints, follows the authorization server's redirect to the loopback
/// listener. Returns the page the listener answered with, and the
/// command's output.
async fn authorize_as_operator(
    model: &support::FakeModel,
    dir: &std::path::Path,
) -> (String, std::process::Output) {
    authorize_with(model, dir, false).await
}

/// [`authorize_as_operator`]; with `paste`, the browser cannot reach the
/// listener and the operator pastes the address it ended on instead.
async fn authorize_with(
    model: &support::FakeModel,
    dir: &std::path::Path,
    paste: bool,
) -> (String, std::process::Output) {
    let mut child = support::mcpcord(model, dir)
        .args(["auth", "secure"])
        .env("RUST_LOG", "trace")
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (url, rest) = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let url = lines
            .by_ref()
            .map_while(Result::ok)
            .find(|l| l.starts_with("http://127.0.0.1"))
            .expect("the URL to open");
        (url, lines)
    })
    .await
    .unwrap();
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let sent = browser.get(&url).send().await.unwrap();
    assert_eq!(
        sent.status(),
        StatusCode::FOUND,
        "{}",
        sent.text().await.unwrap()
    );
    let back = sent.headers()[header::LOCATION]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        back.starts_with("http://127.0.0.1:") && back.contains("/callback?"),
        "{back}"
    );
    let mut stdin = child.stdin.take().unwrap();
    let page = if paste {
        use std::io::Write;
        writeln!(stdin, "{back}").unwrap();
        String::new()
    } else {
        browser
            .get(&back)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    drop(stdin);
    let output = tokio::task::spawn_blocking(move || {
        let mut printed: Vec<String> = rest.map_while(Result::ok).collect();
        let mut output = child.wait_with_output().unwrap();
        printed.push(String::from_utf8_lossy(&output.stdout).into_owned());
        output.stdout = printed.join("\n").into_bytes();
        output
    })
    .await
    .unwrap();
    (page, output)
}

async fn whoami(app: &App, conversation: &str) -> Result<String, Vec<String>> {
    let tools = app.mcp.tools(conversation).await;
    if !tools.problems.is_empty() {
        return Err(tools.problems);
    }
    let outcome = app
        .mcp
        .call(conversation, "secure__whoami", json!({}))
        .await;
    assert!(!outcome.is_error, "{}", outcome.content);
    Ok(outcome.content)
}

struct Setup {
    auth: Auth,
    stop: CancellationToken,
    model: support::FakeModel,
    dir: tempfile::TempDir,
}

/// The servers running, and an MCP file naming the protected one.
async fn setup() -> Setup {
    let auth = Auth::default();
    let stop = CancellationToken::new();
    let base = serve(&auth, &stop).await;
    let dir = tempfile::tempdir().unwrap();
    support::write_mcp(
        dir.path(),
        json!({"secure": {"url": format!("{base}/mcp"), "auth": "oauth", "clientId": CLIENT}}),
    );
    Setup {
        auth,
        stop,
        model: support::FakeModel::start().await,
        dir,
    }
}

#[tokio::test]
async fn an_oauth_server_is_authorized_by_the_operator_refreshed_and_reported_when_revoked() {
    let Setup {
        auth,
        stop,
        model,
        dir,
    } = setup().await;
    let config = support::config(&model, dir.path(), &[]);

    // Not authorized yet: the problem says what to run.
    let app = App::build(&config).await.unwrap();
    let problems = whoami(&app, "a").await.unwrap_err();
    assert!(
        problems[0].contains("needs authorizing") && problems[0].contains("`mcpcord auth secure`"),
        "{problems:?}"
    );
    app.shutdown().await;

    let (page, output) = authorize_as_operator(&model, dir.path()).await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    assert!(page.contains("mcpcord is authorized"), "{page}");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(stdout.contains("Authorized"), "{stdout}");
    assert!(
        auth.0.lock().unwrap().refused.is_empty(),
        "{:?}",
        auth.0.lock().unwrap().refused
    );
    // Tokens never reach the log, even at trace level.
    assert!(
        !stderr.contains("at-1") && !stderr.contains("rt-1"),
        "{stderr}"
    );

    let app = App::build(&config).await.unwrap();
    assert_eq!(whoami(&app, "a").await.unwrap(), "Bearer at-1");
    app.shutdown().await;

    // An expired access token is refreshed, and the new one kept.
    auth.expire_access();
    let app = App::build(&config).await.unwrap();
    assert_eq!(whoami(&app, "b").await.unwrap(), "Bearer at-2");
    app.shutdown().await;
    let app = App::build(&config).await.unwrap();
    assert_eq!(
        whoami(&app, "c").await.unwrap(),
        "Bearer at-2",
        "the refreshed token was stored"
    );

    // Revoked: the next session says what to run.
    auth.revoke();
    app.mcp.close_conversation("c").await;
    let problems = whoami(&app, "d").await.unwrap_err();
    assert!(
        problems[0].contains("`mcpcord auth secure`") && !problems[0].contains("rt-"),
        "{problems:?}"
    );
    app.shutdown().await;
    stop.cancel();
}

#[tokio::test]
async fn the_address_the_browser_ended_on_can_be_pasted() {
    let Setup {
        auth: _,
        stop,
        model,
        dir,
    } = setup().await;
    // A confidential client: its secret goes with it.
    let text = std::fs::read_to_string(dir.path().join("mcp.json")).unwrap();
    let mut file: Value = serde_json::from_str(&text).unwrap();
    file["mcpServers"]["secure"]["clientSecret"] = json!("s3cret");
    std::fs::write(dir.path().join("mcp.json"), file.to_string()).unwrap();
    let (_, output) = authorize_with(&model, dir.path(), true).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let app = App::build(&support::config(&model, dir.path(), &[]))
        .await
        .unwrap();
    assert_eq!(whoami(&app, "a").await.unwrap(), "Bearer at-1");
    app.shutdown().await;
    stop.cancel();
}

#[tokio::test]
async fn an_answer_from_another_issuer_is_refused() {
    let Setup {
        auth,
        stop,
        model,
        dir,
    } = setup().await;
    auth.0.lock().unwrap().iss = Some("http://127.0.0.1:1".into());
    let (page, output) = authorize_as_operator(&model, dir.path()).await;
    assert!(!output.status.success());
    assert!(page.contains("The authorization failed"), "{page}");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(stderr.contains("authorization failed"), "{stderr}");
    // No code was redeemed.
    assert_eq!(auth.0.lock().unwrap().issued, 0);
    stop.cancel();
}

#[tokio::test]
async fn oauth_keys_are_checked_in_the_mcp_file() {
    let check = |entry: Value| {
        let text = json!({"mcpServers": {"s": entry}}).to_string();
        mcpcord::mcp::config::parse(&text, "mcp.json", &|_| None)
            .unwrap_err()
            .to_string()
    };
    assert!(
        check(json!({"command": "x", "auth": "oauth"}))
            .contains("key \"auth\": is for HTTP servers")
    );
    assert!(
        check(json!({"url": "http://h/mcp", "auth": "basic"}))
            .contains("\"basic\" is not \"oauth\"")
    );
    assert!(
        check(json!({"url": "http://h/mcp", "clientId": "x"}))
            .contains("key \"clientId\": needs \"auth\": \"oauth\"")
    );
    assert!(
        check(json!({"url": "http://h/mcp", "auth": "oauth", "clientSecret": "s"}))
            .contains("needs \"clientId\"")
    );
    assert!(
        check(
            json!({"url": "http://h/mcp", "auth": "oauth", "clientMetadataUrl": "http://h/c.json"})
        )
        .contains("must be an https:// URL")
    );
}
