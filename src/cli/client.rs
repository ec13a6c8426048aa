//! The HTTP client commands: `submit`, `status`, `wait`, `cancel`, `close`, `sessions`,
//! `records`, `log`, `agents`.
//!
//! They talk to a running `harvest serve` at `--server` (env `HARVEST_SERVER`, default
//! `http://127.0.0.1:8080`) with `--token` (env `HARVEST_TOKEN`) as the bearer token. Output is
//! the server's JSON (pretty), except `records` (the body as the server streams it), `log` (one
//! line per log line) and `sessions` (one line per session). Errors show the server's message.
//!
//! Exit codes ([`ExitCode`]): 0 when the command did what it says (for `--wait` and `wait`: the
//! session COMPLETED), 1 for an error (bad input, server unreachable, an error answer), 2 for a
//! command line clap refuses, 3 when the awaited session ended FAILED, 4 CANCELLED, 5 when the
//! wait timed out with the session still active.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use futures::StreamExt;
use serde_json::{Value, json};

use super::http::{Client, enc};

mod submit;
use submit::submit;

/// Where the server is and how to authenticate: flags of every client command (also accepted
/// before the command, as `harvest --server URL submit ...`).
#[derive(Debug, Clone, Default, Args)]
pub struct ServerArgs {
    /// Base URL of the harvest server [env: HARVEST_SERVER] [default: http://127.0.0.1:8080].
    #[arg(long)]
    pub server: Option<String>,
    /// Bearer token, when the server has [[clients]] [env: HARVEST_TOKEN].
    #[arg(long)]
    pub token: Option<String>,
}

impl ServerArgs {
    /// These flags, else `outer`'s (given before the command), else the environment, else the
    /// default.
    fn resolve(&self, outer: &ServerArgs) -> (String, Option<String>) {
        let server = self
            .server
            .clone()
            .or_else(|| outer.server.clone())
            .or_else(|| {
                std::env::var("HARVEST_SERVER")
                    .ok()
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| "http://127.0.0.1:8080".into());
        let token = self
            .token
            .clone()
            .or_else(|| outer.token.clone())
            .or_else(|| std::env::var("HARVEST_TOKEN").ok())
            .filter(|t| !t.is_empty());
        (server, token)
    }
}

/// How a client command ends, as the process's exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// The awaited session ended FAILED.
    Failed = 3,
    /// The awaited session ended CANCELLED.
    Cancelled = 4,
    /// The wait timed out; the session is still active.
    Timeout = 5,
}

/// An error that ends the process with a given [`ExitCode`] (carried through `anyhow`).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    /// The code.
    pub code: ExitCode,
    /// What to print.
    pub message: String,
}

/// A session id argument (and the server flags).
#[derive(Debug, Args)]
pub struct IdArgs {
    /// Session id.
    pub id: String,
    #[command(flatten)]
    remote: ServerArgs,
}

/// `harvest context`.
#[derive(Debug, Args)]
pub struct ContextArgs {
    /// Session id.
    pub id: String,
    /// Only this variable: its value as JSON (a string, or an array of strings).
    pub name: Option<String>,
    #[command(flatten)]
    remote: ServerArgs,
}

/// `harvest wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Session id.
    pub id: String,
    /// Give up after this many seconds (exit 5; the session keeps running).
    #[arg(long)]
    pub timeout: Option<u64>,
    #[command(flatten)]
    remote: ServerArgs,
}

/// Client subcommands.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Submit a session: CONFIG is a scraper config file (TOML or JSON).
    Submit(SubmitArgs),
    /// Show a session.
    Status(IdArgs),
    /// Wait until a session ends, with a progress bar on stderr; exit 0 when it COMPLETED,
    /// 3 FAILED, 4 CANCELLED, 5 when --timeout passed first.
    Wait(WaitArgs),
    /// Cancel a session (idempotent).
    Cancel(IdArgs),
    /// Close a session: remove it and its data now.
    Close(IdArgs),
    /// List sessions, newest first.
    Sessions(SessionsArgs),
    /// Print a session's records.
    Records(RecordsArgs),
    /// Print a session's log.
    Log(IdArgs),
    /// Print a session's context (its variables when it ended), or one variable of it.
    Context(ContextArgs),
    /// Count your sessions by status (and by client), and what ended in the last hour.
    Stats(StatsArgs),
    /// Saved agents: list, get, put, delete, run.
    Agents {
        /// What to do.
        #[command(subcommand)]
        cmd: AgentsCommand,
    },
}

impl ClientCommand {
    /// The server flags given with the command.
    fn remote(&self) -> &ServerArgs {
        match self {
            ClientCommand::Submit(a) => &a.remote,
            ClientCommand::Context(a) => &a.remote,
            ClientCommand::Status(a)
            | ClientCommand::Cancel(a)
            | ClientCommand::Close(a)
            | ClientCommand::Log(a) => &a.remote,
            ClientCommand::Wait(a) => &a.remote,
            ClientCommand::Sessions(a) => &a.remote,
            ClientCommand::Stats(a) => &a.remote,
            ClientCommand::Records(a) => &a.remote,
            ClientCommand::Agents { cmd } => cmd.remote(),
        }
    }
}

/// `harvest agents ...`.
#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// List your agents (one line each: name, sessions, schedule).
    List {
        /// Print the server's JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: ServerArgs,
    },
    /// Show an agent.
    Get(NameArgs),
    /// Save (create or replace) an agent from a scraper config file.
    Put(AgentPutArgs),
    /// Delete an agent (its sessions stay until their own cleanup).
    Delete(NameArgs),
    /// Start a run of an agent.
    Run(AgentRunArgs),
}

impl AgentsCommand {
    fn remote(&self) -> &ServerArgs {
        match self {
            AgentsCommand::List { remote, .. } => remote,
            AgentsCommand::Get(a) | AgentsCommand::Delete(a) => &a.remote,
            AgentsCommand::Put(a) => &a.remote,
            AgentsCommand::Run(a) => &a.remote,
        }
    }
}

/// An agent name argument (and the server flags).
#[derive(Debug, Args)]
pub struct NameArgs {
    /// Agent name.
    pub name: String,
    #[command(flatten)]
    remote: ServerArgs,
}

/// `harvest agents put`.
#[derive(Debug, Args)]
pub struct AgentPutArgs {
    /// Agent name (1-128 characters of [A-Za-z0-9._:-]).
    pub name: String,
    /// The scraper config file (TOML, or JSON).
    pub config: PathBuf,
    /// Cron schedule with seconds, e.g. "0 */15 * * * *".
    #[arg(long)]
    pub schedule: Option<String>,
    /// At most one active run; a new run removes the previous runs' data.
    #[arg(long)]
    pub single: bool,
    /// A default parameter, as key=value (repeatable).
    #[arg(long = "param", short = 'p', value_parser = parse_param)]
    pub params: Vec<(String, String)>,
    /// Default options as JSON, e.g. '{"max_duration_secs": 600}'.
    #[arg(long)]
    pub options: Option<String>,
    #[command(flatten)]
    remote: ServerArgs,
}

/// `harvest agents run`.
#[derive(Debug, Args)]
pub struct AgentRunArgs {
    /// Agent name.
    pub name: String,
    /// A parameter merged over the agent's, as key=value (repeatable).
    #[arg(long = "param", short = 'p', value_parser = parse_param)]
    pub params: Vec<(String, String)>,
    /// A caller-chosen session id.
    #[arg(long)]
    pub session_id: Option<String>,
    /// Options as JSON, merged key by key over the agent's defaults.
    #[arg(long)]
    pub options: Option<String>,
    /// Wait until the run ends, with a progress bar on stderr; exit 0 when it COMPLETED, 3
    /// FAILED, 4 CANCELLED, 5 when --timeout passed first.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds (the run keeps running).
    #[arg(long)]
    pub timeout: Option<u64>,
    #[command(flatten)]
    remote: ServerArgs,
}

/// `harvest submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The config file (TOML, JSON or Web-Harvest XML). Several: one batch submit
    /// (`POST /v1/sessions/batch`), the same params and options for each.
    #[arg(required_unless_present = "jsonl")]
    pub config: Vec<PathBuf>,
    /// A JSON-lines file (`-`: stdin), each line a `POST /v1/sessions` body; submitted in
    /// batches of up to 1000 (one durable write each). Prints one JSON line per session.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["config", "session_id", "wait"])]
    pub jsonl: Option<PathBuf>,
    /// A parameter overriding the config's [vars], as key=value (repeatable).
    #[arg(long = "param", short = 'p', value_parser = parse_param)]
    pub params: Vec<(String, String)>,
    /// A caller-chosen session id (1-128 characters of [A-Za-z0-9._:-]).
    #[arg(long)]
    pub session_id: Option<String>,
    /// Options as JSON, e.g. '{"max_duration_secs": 600, "priority": 5}'.
    #[arg(long)]
    pub options: Option<String>,
    /// The client id the session belongs to (the seed's ClientContext; with [[clients]] the
    /// server takes it from the token).
    #[arg(long = "client")]
    pub client: Option<String>,
    /// Client metadata, as key=value (repeatable); a value that parses as JSON (a number,
    /// true/false, an object) is kept as JSON, anything else as a string.
    #[arg(long = "meta", value_parser = parse_param)]
    pub meta: Vec<(String, String)>,
    /// Wait until the session ends, with a progress bar on stderr; exit 0 when it COMPLETED, 3
    /// FAILED, 4 CANCELLED, 5 when --timeout passed first.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds (the session keeps running).
    #[arg(long)]
    pub timeout: Option<u64>,
    #[command(flatten)]
    remote: ServerArgs,
}

/// `harvest sessions`.
#[derive(Debug, Args)]
pub struct SessionsArgs {
    /// Only sessions in this status.
    #[arg(long)]
    pub status: Option<String>,
    /// Only this client's sessions.
    #[arg(long)]
    pub client: Option<String>,
    /// At most this many (1..=1000).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// The next_cursor printed by a previous call.
    #[arg(long)]
    pub cursor: Option<String>,
    /// Print the server's JSON instead of one line per session.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    remote: ServerArgs,
}

/// `harvest stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Print the server's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    remote: ServerArgs,
}

/// `harvest records`.
#[derive(Debug, Args)]
pub struct RecordsArgs {
    /// Session id.
    pub id: String,
    /// json, jsonl or csv.
    #[arg(long, default_value = "jsonl")]
    pub format: String,
    /// First record.
    #[arg(long)]
    pub offset: Option<u64>,
    /// At most this many (1..=10000); default all.
    #[arg(long)]
    pub limit: Option<u64>,
    #[command(flatten)]
    remote: ServerArgs,
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Runs a client command; `outer` are the server flags given before the command.
pub async fn run(outer: &ServerArgs, cmd: ClientCommand) -> anyhow::Result<()> {
    let (server, token) = cmd.remote().resolve(outer);
    let client = Client::new(&server, token)?;
    match cmd {
        ClientCommand::Submit(args) => submit(&client, args).await,
        ClientCommand::Wait(args) => {
            let path = format!("/v1/sessions/{}", enc(&args.id));
            let session = client
                .json(client.request(reqwest::Method::GET, &path))
                .await?;
            wait_session(&client, session, args.timeout).await
        }
        ClientCommand::Context(args) => {
            let mut path = format!("/v1/sessions/{}/context", enc(&args.id));
            if let Some(n) = &args.name {
                path.push('/');
                path.push_str(&enc(n));
            }
            let v = client
                .json(client.request(reqwest::Method::GET, &path))
                .await?;
            match args.name {
                Some(_) => print_json(&v["value"]),
                None => print_json(&v),
            }
        }
        ClientCommand::Status(IdArgs { id, .. }) => {
            let v = client
                .json(client.request(reqwest::Method::GET, &format!("/v1/sessions/{}", enc(&id))))
                .await?;
            print_json(&v)
        }
        ClientCommand::Cancel(IdArgs { id, .. }) => {
            let v = client
                .post_json(&format!("/v1/sessions/{}/cancel", enc(&id)), &json!({}))
                .await?;
            print_json(&v)
        }
        ClientCommand::Close(IdArgs { id, .. }) => {
            let v = client
                .json(client.request(
                    reqwest::Method::DELETE,
                    &format!("/v1/sessions/{}", enc(&id)),
                ))
                .await?;
            print_json(&v)
        }
        ClientCommand::Sessions(args) => sessions(&client, args).await,
        ClientCommand::Stats(args) => stats(&client, args).await,
        ClientCommand::Records(args) => records(&client, args).await,
        ClientCommand::Log(IdArgs { id, .. }) => {
            let v = client
                .json(client.request(
                    reqwest::Method::GET,
                    &format!("/v1/sessions/{}/log", enc(&id)),
                ))
                .await?;
            let mut out = std::io::stdout().lock();
            for l in v["lines"].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "{} {:5} {}",
                    l["at"].as_str().unwrap_or(""),
                    l["level"].as_str().unwrap_or(""),
                    l["message"].as_str().unwrap_or("")
                )?;
            }
            Ok(())
        }
        ClientCommand::Agents { cmd } => agents(&client, cmd).await,
    }
}

fn options_arg(o: Option<&str>) -> anyhow::Result<Option<Value>> {
    match o {
        None => Ok(None),
        Some(o) => {
            let v: Value =
                serde_json::from_str(o).context("--options must be a JSON object of options")?;
            Ok(Some(v))
        }
    }
}

async fn agents(client: &Client, cmd: AgentsCommand) -> anyhow::Result<()> {
    let path = |name: &str| format!("/v1/agents/{}", enc(name));
    match cmd {
        AgentsCommand::List { json, .. } => {
            let v = client
                .json(client.request(reqwest::Method::GET, "/v1/agents"))
                .await?;
            if json {
                return print_json(&v);
            }
            let mut out = std::io::stdout().lock();
            for a in v["agents"].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "{}\t{}\t{}",
                    a["name"].as_str().unwrap_or(""),
                    a["sessions"].as_str().unwrap_or(""),
                    a["schedule"].as_str().unwrap_or("-"),
                )?;
            }
            Ok(())
        }
        AgentsCommand::Get(NameArgs { name, .. }) => {
            let v = client
                .json(client.request(reqwest::Method::GET, &path(&name)))
                .await?;
            print_json(&v)
        }
        AgentsCommand::Delete(NameArgs { name, .. }) => {
            let v = client
                .json(client.request(reqwest::Method::DELETE, &path(&name)))
                .await?;
            print_json(&v)
        }
        AgentsCommand::Put(args) => {
            let text = std::fs::read_to_string(&args.config)
                .with_context(|| format!("reading the config {}", args.config.display()))?;
            let params: BTreeMap<String, String> = args.params.into_iter().collect();
            let mut body = json!({
                "config": text,
                "params": params,
                "sessions": if args.single { "single" } else { "multiple" },
            });
            if let Some(s) = &args.schedule {
                body["schedule"] = json!(s);
            }
            if let Some(o) = options_arg(args.options.as_deref())? {
                body["options"] = o;
            }
            let v = client
                .send_json(reqwest::Method::PUT, &path(&args.name), &body)
                .await?;
            print_json(&v)
        }
        AgentsCommand::Run(args) => {
            let params: BTreeMap<String, String> = args.params.into_iter().collect();
            let mut body = json!({"params": params});
            if let Some(id) = &args.session_id {
                body["session_id"] = json!(id);
            }
            if let Some(o) = options_arg(args.options.as_deref())? {
                body["options"] = o;
            }
            let session = client
                .post_json(&format!("{}/run", path(&args.name)), &body)
                .await?;
            if args.wait {
                wait_session(client, session, args.timeout).await
            } else {
                print_json(&session)
            }
        }
    }
}

/// Polls a session until it ends (or `timeout` seconds pass), with a progress bar on stderr;
/// prints it and fails unless it COMPLETED, with the [`ExitCode`] of how it ended.
async fn wait_session(client: &Client, session: Value, timeout: Option<u64>) -> anyhow::Result<()> {
    let id = session["id"]
        .as_str()
        .ok_or_else(|| anyhow!("the server's answer has no session id"))?
        .to_string();
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let deadline = timeout.map(|t| tokio::time::Instant::now() + Duration::from_secs(t));
    let path = format!("/v1/sessions/{}", enc(&id));
    let last = loop {
        let s = client
            .json(client.request(reqwest::Method::GET, &path))
            .await?;
        let status = s["status"].as_str().unwrap_or("?").to_string();
        bar.set_message(format!(
            "{id} {status}: {} pages, {} records",
            s["metrics"]["pages_processed"], s["records"]
        ));
        if matches!(status.as_str(), "COMPLETED" | "FAILED" | "CANCELLED") {
            break s;
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            bar.abandon();
            return Err(Exit {
                code: ExitCode::Timeout,
                message: format!(
                    "session {id} is still {status} after --timeout; it keeps running on the server"
                ),
            }
            .into());
        }
        // Polling every 500 ms is cheap for the server and quick enough for a person watching.
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    bar.finish();
    print_json(&last)?;
    match last["status"].as_str() {
        Some("COMPLETED") => Ok(()),
        Some(other) => {
            let why = match last["error"].as_object() {
                Some(e) => format!(
                    ": {} ({})",
                    e.get("message").and_then(Value::as_str).unwrap_or(""),
                    e.get("kind").and_then(Value::as_str).unwrap_or("")
                ),
                None => String::new(),
            };
            let code = if other == "CANCELLED" {
                ExitCode::Cancelled
            } else {
                ExitCode::Failed
            };
            Err(Exit {
                code,
                message: format!("session {id} ended {other}{why}"),
            }
            .into())
        }
        None => bail!("session {id}: the server's answer has no status"),
    }
}

async fn sessions(client: &Client, args: SessionsArgs) -> anyhow::Result<()> {
    let mut q = vec![format!("limit={}", args.limit)];
    if let Some(s) = &args.status {
        q.push(format!("status={}", enc(s)));
    }
    if let Some(c) = &args.client {
        q.push(format!("client_id={}", enc(c)));
    }
    if let Some(c) = &args.cursor {
        q.push(format!("cursor={}", enc(c)));
    }
    let v = client
        .json(client.request(
            reqwest::Method::GET,
            &format!("/v1/sessions?{}", q.join("&")),
        ))
        .await?;
    if args.json {
        return print_json(&v);
    }
    let mut out = std::io::stdout().lock();
    for s in v["sessions"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "{}\t{}\t{}\t{} records\t{}",
            s["id"].as_str().unwrap_or(""),
            s["status"].as_str().unwrap_or(""),
            s["client"]["client_id"].as_str().unwrap_or(""),
            s["records"],
            s["created_at"].as_str().unwrap_or("")
        )?;
    }
    if let Some(c) = v["next_cursor"].as_str() {
        eprintln!("more: --cursor {c}");
    }
    Ok(())
}

async fn stats(client: &Client, args: StatsArgs) -> anyhow::Result<()> {
    let v = client
        .json(client.request(reqwest::Method::GET, "/v1/stats"))
        .await?;
    if args.json {
        return print_json(&v);
    }
    const STATUSES: [&str; 5] = ["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"];
    let mut out = std::io::stdout().lock();
    let row = |out: &mut dyn Write, name: &str, counts: &Value| -> std::io::Result<()> {
        write!(out, "{name:<24}")?;
        for st in STATUSES {
            write!(out, " {:>10}", counts[st].as_u64().unwrap_or(0))?;
        }
        writeln!(out)
    };
    write!(out, "{:<24}", "client")?;
    for st in STATUSES {
        write!(out, " {st:>10}")?;
    }
    writeln!(out)?;
    let clients = v["clients"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for c in clients {
        let id = c["client_id"].as_str().unwrap_or_default();
        row(
            &mut out,
            if id.is_empty() { "(none)" } else { id },
            &c["by_status"],
        )?;
    }
    if clients.len() != 1 {
        row(&mut out, "total", &v["by_status"])?;
    }
    let sum = |k: &str| -> u64 {
        v["last_hour"][k]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
            .sum()
    };
    writeln!(
        out,
        "last hour: {} sessions ended, {} records",
        sum("finished_per_minute"),
        sum("records_per_minute")
    )?;
    Ok(())
}

async fn records(client: &Client, args: RecordsArgs) -> anyhow::Result<()> {
    let mut q = vec![format!("format={}", enc(&args.format))];
    if let Some(o) = args.offset {
        q.push(format!("offset={o}"));
    }
    if let Some(l) = args.limit {
        q.push(format!("limit={l}"));
    }
    let resp = client
        .send(client.request(
            reqwest::Method::GET,
            &format!("/v1/sessions/{}/records?{}", enc(&args.id), q.join("&")),
        ))
        .await?;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("the records stream was cut off")?;
        std::io::stdout().write_all(&chunk)?;
    }
    let mut out = std::io::stdout().lock();
    if args.format == "json" {
        writeln!(out)?;
    }
    out.flush()?;
    Ok(())
}
