//! The command line (clap): `serve`, `worker`, `run`, `bench`, and the HTTP client commands.
//!
//! `main.rs` only calls [`main`]; every command is a call into the library. Flags override
//! `HARVEST_*` variables, which override config.toml.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use harvest::config::Config;
use harvest::service::Harvest;

pub mod client;
mod http;

/// harvest: a durable queue of web-scraping sessions.
///
/// Exit codes: 0 done (for `run`, `wait` and `--wait`: the crawl or session COMPLETED); 1 an
/// error; 2 a command line that does not parse; 3 the session or run FAILED; 4 it was
/// CANCELLED; 5 a wait timed out with the session still active; 130 `run` stopped by Ctrl-C.
#[derive(Debug, Parser)]
#[command(name = "harvest", version, about, long_about = None, after_help = EXIT_CODES)]
pub struct Cli {
    /// Server and token of the client commands, accepted before the command too.
    #[command(flatten)]
    pub remote: client::ServerArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

const EXIT_CODES: &str = "Exit codes: 0 done (for run, wait and --wait: COMPLETED), 1 error, \
2 bad command line, 3 FAILED, 4 CANCELLED, 5 wait timed out, 130 run stopped by Ctrl-C.";

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API, the workers and the scheduler.
    Serve(ServeArgs),
    /// Run workers (and maintenance) without the HTTP API, sharing the store. Its only
    /// listener is `metrics.bind` (`/metrics`, `/healthz`, `/readyz`), when set.
    Worker(WorkerArgs),
    /// One local crawl without the service: records as JSON lines on stdout, progress on stderr.
    Run(RunArgs),
    /// Serve the generated test shop (the tour's site) until Ctrl-C.
    Testsite(TestsiteArgs),
    /// Benchmarks: a temporary store (and a generated local site), one JSON object of results.
    Bench {
        /// Which benchmark.
        #[command(subcommand)]
        which: BenchCommand,
    },
    /// Client commands, talking to a running server over HTTP.
    #[command(flatten)]
    Client(client::ClientCommand),
}

/// Flags of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// API listen address (overrides server.bind).
    #[arg(long)]
    pub bind: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub common: WorkerArgs,
}

/// Flags of `worker` (and of `serve`).
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The service configuration file (missing: built-in defaults, unless given explicitly).
    #[arg(
        long,
        short = 'c',
        env = "HARVEST_CONFIG",
        default_value = "config.toml"
    )]
    pub config: PathBuf,
    /// Listen address of the metrics and health endpoints only (overrides metrics.bind).
    #[arg(long)]
    pub metrics_bind: Option<std::net::SocketAddr>,
    /// sled directory (overrides data_dir).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Sessions at once in this process (overrides workers.concurrency).
    #[arg(long)]
    pub workers: Option<usize>,
}

/// `harvest bench ...`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Durable submit → claim → complete of no-op sessions.
    Queue(crate::bench::queue::QueueBenchArgs),
    /// One crawl of a generated site on loopback: pages/s, records/s, peak memory.
    Crawl(CrawlBenchArgs),
    /// A crawl of a tree of many small pages (millions of distinct URLs) checkpointing into a
    /// sled store: urls, pages/s, peak memory.
    Frontier(FrontierBenchArgs),
}

/// Flags of `harvest bench frontier`.
#[derive(Debug, clap::Args)]
pub struct FrontierBenchArgs {
    /// Distinct URLs (pages) on the generated site.
    #[arg(long, default_value_t = 1_000_000)]
    pub urls: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Print only the JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `harvest bench crawl`.
#[derive(Debug, clap::Args)]
pub struct CrawlBenchArgs {
    /// Product pages on the generated site.
    #[arg(long, default_value_t = 5000)]
    pub products: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Checkpoint into a sled store in a temporary directory (as a worker does) instead of
    /// keeping the crawl state in memory.
    #[arg(long)]
    pub store: bool,
    /// Run N rounds without the store and N with it, alternating, and print the median pages/s
    /// of each and their ratio (the cost of durable checkpoints).
    #[arg(long, value_name = "N", conflicts_with = "store", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub compare: Option<u32>,
    /// Print only the JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `harvest run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The scraper config (TOML or JSON).
    pub config: PathBuf,
    /// A parameter overriding the config's `[vars]`, as `name=value` (repeatable).
    #[arg(long = "param", short = 'p', value_parser = parse_param)]
    pub params: Vec<(String, String)>,
    /// Refuse fetching private, loopback and link-local addresses.
    #[arg(long)]
    pub guard: bool,
    /// Checkpoint into a sled store in DIR and resume from it: run the same command again after
    /// Ctrl-C or a kill and it continues where it stopped. Records go to stdout once committed,
    /// so across runs each is printed once.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
}

/// Flags of `harvest testsite`.
#[derive(Debug, clap::Args)]
pub struct TestsiteArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:18080")]
    pub bind: std::net::SocketAddr,
    /// Product pages.
    #[arg(long, default_value_t = 100)]
    pub products: usize,
}

/// Parses `name=value`.
pub fn parse_param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not name=value")),
    }
}

/// Loads config.toml (or defaults when the default path is missing), then the environment.
pub fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    if !path.exists() && path == std::path::Path::new("config.toml") {
        let mut cfg = Config::default();
        cfg.apply_env(|k| std::env::var(k).ok())?;
        cfg.validate()?;
        return Ok(cfg);
    }
    Ok(Config::load(path)?)
}

/// Sets up logging: `RUST_LOG` (default `info`), text or JSON.
pub fn init_tracing(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Runs the command line.
pub async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args, true).await,
        Command::Worker(args) => {
            serve(
                ServeArgs {
                    bind: None,
                    common: args,
                },
                false,
            )
            .await
        }
        Command::Bench { which } => match which {
            BenchCommand::Queue(args) => crate::bench::queue::main(args).await,
            BenchCommand::Crawl(args) => {
                if !args.json {
                    eprintln!(
                        "bench crawl: {} products at concurrency {} on a generated loopback site",
                        args.products, args.concurrency
                    );
                }
                let out = match args.compare {
                    Some(rounds) => {
                        crate::bench::crawl::compare(
                            args.products,
                            args.concurrency,
                            rounds as usize,
                        )
                        .await?
                    }
                    None => {
                        crate::bench::crawl::crawl_with(args.products, args.concurrency, args.store)
                            .await?
                    }
                };
                println!("{}", serde_json::to_string(&out)?);
                Ok(())
            }
            BenchCommand::Frontier(args) => {
                if !args.json {
                    eprintln!(
                        "bench frontier: {} URLs at concurrency {} on a generated loopback site, \
                         checkpointing into a temporary sled store",
                        args.urls, args.concurrency
                    );
                }
                let out = crate::bench::crawl::frontier(args.urls, args.concurrency).await?;
                println!("{}", serde_json::to_string(&out)?);
                Ok(())
            }
        },
        Command::Run(args) => run_local(args).await,
        Command::Testsite(args) => testsite(args).await,
        Command::Client(cmd) => client::run(&cli.remote, cmd).await,
    }
}

async fn serve(args: ServeArgs, http: bool) -> anyhow::Result<()> {
    let common = args.common;
    let mut cfg = load_config(&common.config)?;
    if let Some(b) = args.bind {
        cfg.server.bind = b;
    }
    if let Some(b) = common.metrics_bind {
        cfg.metrics.bind = Some(b);
    }
    if let Some(d) = common.data_dir {
        cfg.data_dir = d;
    }
    if let Some(w) = common.workers {
        cfg.workers.concurrency = w;
    }
    cfg.validate()?;
    init_tracing(&cfg.log.format);
    // Without clients nothing asks for a token: every listener stays on loopback, the metrics
    // one too (its per-client labels and session counts are the operator's business).
    if cfg.clients.is_empty() {
        if http && !cfg.server.bind.ip().is_loopback() {
            anyhow::bail!(
                "refusing to bind {}: no [[clients]] are configured, so the API would be open to anyone; \
                 bind a loopback address or configure clients with tokens",
                cfg.server.bind
            );
        }
        if let Some(b) = cfg.metrics.bind.filter(|b| !b.ip().is_loopback()) {
            anyhow::bail!(
                "refusing to bind metrics.bind {b}: no [[clients]] are configured, so every \
                 listener stays on loopback; bind a loopback address or configure clients"
            );
        }
    }
    let metrics = harvest::metrics::install(cfg.metrics.per_client_labels);
    let grace = Duration::from_secs(cfg.workers.shutdown_grace_secs);
    // sled opens at once (or fails at once: a data directory held by another process), before
    // listening. With PostgreSQL, listen first: until the store is open (a database that is
    // not up yet), every route but /healthz answers 503 with Retry-After, so probes see "alive,
    // not ready".
    let opened = if cfg.store == harvest::config::StoreKind::Postgres {
        None
    } else {
        Some(open_waiting(&cfg).await?)
    };
    // Each listener serves its router once the store is open (see `gate`).
    type Cell = std::sync::Arc<tokio::sync::OnceCell<axum::Router>>;
    let (api_app, metrics_app): (Cell, Cell) = Default::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    // Bind every listener before saying so, so a "listening" line means all of them answer.
    let api = match http {
        true => {
            let bind = cfg.server.bind;
            let listener = tokio::net::TcpListener::bind(bind)
                .await
                .with_context(|| format!("binding server.bind {bind}"))?;
            Some(listener)
        }
        false => None,
    };
    let mut listeners = Vec::new();
    if let Some(bind) = cfg.metrics.bind {
        let listener = tokio::net::TcpListener::bind(bind).await.with_context(|| {
            format!(
                "binding metrics.bind {bind} (each process on a host needs its own: \
                 set --metrics-bind or HARVEST_METRICS_BIND for this one)"
            )
        })?;
        tracing::info!(metrics_addr = %listener.local_addr()?, "metrics and health endpoints");
        listeners.push((listener, gate(metrics_app.clone())));
    }
    if let Some(listener) = api {
        tracing::info!(addr = %listener.local_addr()?, "listening");
        tracing::info!(url = %format!("http://{}/", listener.local_addr()?), "web console");
        listeners.push((listener, gate(api_app.clone())));
    }
    for (listener, app) in listeners {
        let mut rx = stop_rx.clone();
        servers.push(tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.changed().await;
                })
                .await
        }));
    }
    let harvest = match opened {
        Some(h) => h,
        None => tokio::select! {
            h = open_waiting(&cfg) => h?,
            () = shutdown_signal() => {
                tracing::info!("stopped before the store was open");
                let _ = stop_tx.send(true);
                return Ok(());
            }
        },
    };
    harvest.start();
    let _ = api_app.set(harvest::api::router(harvest.clone(), metrics.clone()));
    let _ = metrics_app.set(harvest::api::metrics_router(
        harvest.clone(),
        metrics.clone(),
    ));
    tracing::info!(
        backend = harvest.store().backend(),
        workers = cfg.workers.concurrency,
        "harvest started"
    );
    shutdown_signal().await;
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: no new claims; running sessions get the grace period"
    );
    let _ = stop_tx.send(true);
    shutdown_watchdog(grace + SHUTDOWN_MARGIN);
    harvest.shutdown(grace).await?;
    for s in servers {
        let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// What shutdown may take beyond the grace: handing sessions back, closing the store.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(5);

/// Ends the process (exit code 1) when shutdown has not finished within `limit`: a store whose
/// flush blocks (a full or failing disk) must not keep the process, and with it the data
/// directory's lock, forever. Nothing acknowledged is lost: an acknowledgment waits for its
/// flush, so whatever the stuck flush held was never acknowledged.
fn shutdown_watchdog(limit: Duration) {
    let spawned = std::thread::Builder::new()
        .name("harvest-shutdown-watchdog".into())
        .spawn(move || {
            std::thread::sleep(limit);
            tracing::error!(
                limit_secs = limit.as_secs(),
                "shutdown did not finish in time (is the store's disk full or failing?); \
                 exiting without it: writes not yet acknowledged are not kept"
            );
            eprintln!(
                "harvest: shutdown did not finish within {} s; exiting without waiting for the store",
                limit.as_secs()
            );
            std::process::exit(1);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "the shutdown watchdog did not start");
    }
}

/// Opens the service; with PostgreSQL, waits for a database that does not answer yet, trying
/// again with backoff for up to `database_wait_secs` (logged, rate-limited). Any other failure
/// (a sled data directory held by another process, a bad URL, a newer schema) ends at once.
async fn open_waiting(cfg: &Config) -> anyhow::Result<Harvest> {
    let patient = cfg.store == harvest::config::StoreKind::Postgres;
    let started = std::time::Instant::now();
    let limit = Duration::from_secs(cfg.database_wait_secs);
    let mut pause = Duration::from_millis(200);
    loop {
        match Harvest::open(cfg.clone()).await {
            Ok(h) => {
                if started.elapsed() > Duration::from_secs(1) {
                    harvest::store::outage::answered("opening the store");
                }
                return Ok(h);
            }
            Err(harvest::HarvestError::Store(e))
                if patient && e.is_unavailable() && started.elapsed() + pause < limit =>
            {
                harvest::store::outage::unavailable("opening the store", &e);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) if patient && started.elapsed() >= Duration::from_secs(1) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "opening the store (gave up after {} s; database_wait_secs = {})",
                    started.elapsed().as_secs(),
                    cfg.database_wait_secs
                )));
            }
            Err(e) => return Err(anyhow::Error::new(e).context("opening the store")),
        }
    }
}

/// The router every listener serves: 503 (`not_ready`, with Retry-After) for everything but
/// `/healthz` until `api` is set, then `api`.
fn gate(api: std::sync::Arc<tokio::sync::OnceCell<axum::Router>>) -> axum::Router {
    use axum::response::IntoResponse;
    use tower::ServiceExt;
    axum::Router::new().fallback(move |req: axum::extract::Request| {
        let api = api.clone();
        async move {
            match api.get() {
                Some(router) => match router.clone().oneshot(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                },
                None if req.uri().path() == "/healthz" => {
                    axum::Json(serde_json::json!({"status": "ok"})).into_response()
                }
                None => harvest::api::error::ApiError::store_not_open().into_response(),
            }
        }
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run_local(args: RunArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let config = harvest::kinds::parse_config_text(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    let params = args.params.into_iter().collect();
    let settings = harvest::engine::EngineSettings {
        guard: args
            .guard
            .then(|| harvest::engine::NetGuard::new(Vec::new())),
        ..Default::default()
    };
    let stop = harvest::job::StopSignal::new();
    let on_ctrl_c = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("harvest run: stopping after the pages in flight (Ctrl-C again to abort)");
            on_ctrl_c.stop(harvest::job::StopReason::Cancelled);
            let _ = tokio::signal::ctrl_c().await;
            std::process::exit(130);
        }
    });
    let out = Box::new(std::io::stdout());
    let progress = harvest::local::Progress::Stderr;
    let summary = match &args.resume {
        Some(dir) => {
            harvest::local::run_local_resumable(
                &config, &params, settings, out, progress, stop, dir,
            )
            .await
        }
        None => harvest::local::run_local(&config, &params, settings, out, progress, stop).await,
    }
    .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    // A Web-Harvest config's result is its variables (it has no records): printed on stdout as
    // one JSON object, as `GET /v1/sessions/{id}/context` shows them.
    if harvest::kinds::kind_of(&config) == Some(harvest::kinds::Kind::WebHarvest)
        && let Some(variables) = &summary.context
    {
        println!("{}", serde_json::json!({ "variables": variables }));
    }
    eprintln!("{summary}");
    let code = match summary.status {
        _ if summary.is_completed() => return Ok(()),
        "stopped" => 130,
        "cancelled" => client::ExitCode::Cancelled as i32,
        _ => client::ExitCode::Failed as i32,
    };
    // The summary said why; the code says how it ended (see `harvest --help`).
    std::process::exit(code)
}

async fn testsite(args: TestsiteArgs) -> anyhow::Result<()> {
    let site = crate::sitegen::serve_at(
        args.bind,
        crate::sitegen::SiteOptions {
            products: args.products,
            ..Default::default()
        },
    )
    .await
    .with_context(|| format!("binding {}", args.bind))?;
    eprintln!(
        "test shop with {} products at {}/index.html (Ctrl-C to stop)",
        args.products,
        site.base_url()
    );
    let _ = tokio::signal::ctrl_c().await;
    site.shutdown().await;
    Ok(())
}
