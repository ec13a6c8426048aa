//! What the interpreter may do outside itself: the [`Host`] trait, and [`FetchHost`], its real
//! implementation over harvest's fetcher (request-forgery guard, retries, robots.txt when the
//! config asks, usage counting, one cookie jar per session) and a confined [`DirFiles`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::file::DirFiles;
use crate::engine::NetGuard;
use crate::engine::config::HttpSettings;
use crate::engine::fetch::{Fetcher, PageError, Request};
use crate::job::{CheckpointSink, StopSignal};
use crate::session::{LogLine, Timestamp, TokenUsage};
use crate::store::CheckpointBatch;

/// Most log lines held between two progress reports (the oldest are dropped beyond).
const MAX_PENDING_LOG: usize = 1000;

/// An HTTP request of the `http` processor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// `GET` or `POST`.
    pub method: String,
    /// Absolute http(s) URL.
    pub url: String,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// Body (POST).
    pub body: Option<Vec<u8>>,
    /// Follow redirects.
    pub follow_redirects: bool,
}

/// Its response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// URL after redirects.
    pub url: String,
    /// Status code.
    pub status: u16,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

/// A `file` operation (paths relative to the session's directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOp {
    /// Read a file.
    Read {
        /// Path.
        path: String,
    },
    /// Write or append.
    Write {
        /// Path.
        path: String,
        /// Bytes.
        data: Vec<u8>,
        /// Append instead of replacing.
        append: bool,
    },
    /// List a directory.
    List {
        /// Path.
        path: String,
        /// `*`/`?` name filter.
        filter: Option<String>,
        /// Include files.
        files: bool,
        /// Include directories.
        dirs: bool,
        /// Descend.
        recursive: bool,
    },
}

/// A `file` operation's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOutput {
    /// A file's bytes.
    Data(Vec<u8>),
    /// Written.
    Written,
    /// Directory entries.
    Listing(Vec<String>),
}

/// Why the host could not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// The request failed; `retryable` when another attempt of the session may succeed
    /// (timeouts, connection failures).
    #[error("{message}")]
    Http {
        /// What happened.
        message: String,
        /// Worth another attempt.
        retryable: bool,
    },
    /// A file operation failed or was refused.
    #[error("{0}")]
    File(String),
    /// The session was stopped.
    #[error("stopped")]
    Stopped,
    /// Progress could not be committed (the lease was lost, or the attempt abandoned): stop,
    /// write nothing else.
    #[error("the session's progress could not be committed; another attempt owns it")]
    LeaseLost,
}

/// Log levels of [`Host::log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Information.
    Info,
    /// Something worth a look.
    Warn,
    /// A failure.
    Error,
}

impl LogLevel {
    /// As stored in session logs.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// Progress of a run, reported every ~500 ms while it runs (what the run did since is the host's
/// own: it made the requests and holds the log).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Processors executed so far.
    pub processors: u64,
}

/// The interpreter's only way out.
#[async_trait]
pub trait Host: Send + Sync {
    /// Sends one request of an `http` processor.
    async fn http(&self, req: HttpRequest) -> Result<HttpResponse, HostError>;
    /// Does one `file` operation.
    async fn file(&self, op: FileOp) -> Result<FileOutput, HostError>;
    /// A line for the session's log.
    fn log(&self, level: LogLevel, message: &str);
    /// Progress so far; an error stops the run (a lost lease).
    async fn progress(&self, p: Progress) -> Result<(), HostError>;
}

/// How [`FetchHost`] reaches out.
#[derive(Debug, Clone)]
pub struct HostSettings {
    /// HTTP settings (timeouts, retries, body cap, user agent, robots.txt).
    pub http: HttpSettings,
    /// The request-forgery guard; `None` lets the session fetch any address.
    pub guard: Option<NetGuard>,
    /// The directory `file` is confined to; `None` refuses `file`.
    pub files_dir: Option<PathBuf>,
    /// Bytes `file` may write in all.
    pub max_file_bytes: u64,
    /// Bytes `file` may read from one file.
    pub max_read_bytes: u64,
}

#[derive(Debug, Default)]
struct Pending {
    pages: u64,
    usage: TokenUsage,
    log: Vec<LogLine>,
}

/// The real [`Host`]: harvest's fetcher and a confined directory. With a checkpoint sink, each
/// progress report commits what happened since the last one (HTTP requests as pages, usage, log
/// lines); without one, everything stays pending for [`FetchHost::take_batch`].
pub struct FetchHost {
    fetcher: Fetcher,
    files: Option<Arc<DirFiles>>,
    pending: Mutex<Pending>,
    totals: Mutex<(u64, TokenUsage)>,
    /// Processors executed that committed batches counted (as elements) already.
    processors_counted: Mutex<u64>,
    sink: Option<Arc<dyn CheckpointSink>>,
    stop: StopSignal,
}

impl FetchHost {
    /// A host with these settings (its own HTTP client and cookie jar).
    pub fn new(settings: HostSettings, stop: StopSignal) -> Result<FetchHost, String> {
        let fetcher = Fetcher::with_cookies(&settings.http, settings.guard, true)
            .map_err(|e| format!("cannot start the HTTP client: {e}"))?;
        Ok(FetchHost {
            fetcher,
            files: settings.files_dir.map(|d| {
                Arc::new(DirFiles::new(
                    d,
                    settings.max_file_bytes,
                    settings.max_read_bytes,
                ))
            }),
            pending: Mutex::new(Pending::default()),
            totals: Mutex::new((0, TokenUsage::default())),
            processors_counted: Mutex::new(0),
            sink: None,
            stop,
        })
    }

    /// Commits progress through `sink` at every report.
    pub fn with_sink(mut self, sink: Arc<dyn CheckpointSink>) -> FetchHost {
        self.sink = Some(sink);
        self
    }

    /// What happened since the last batch: pages (HTTP requests made), usage, log lines.
    pub fn take_batch(&self) -> CheckpointBatch {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let p = std::mem::take(&mut *p);
        CheckpointBatch {
            pages: p.pages,
            usage: p.usage,
            log: p.log,
            ..CheckpointBatch::default()
        }
    }

    /// [`FetchHost::take_batch`] with the processors executed since the last batch as its
    /// elements (`processors`: executed so far, in all).
    pub fn batch_upto(&self, processors: u64) -> CheckpointBatch {
        let mut batch = self.take_batch();
        let mut counted = self
            .processors_counted
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let new = processors.saturating_sub(*counted);
        if new > 0 {
            batch.elements = Some(new);
            *counted = processors;
        }
        batch
    }

    /// All HTTP requests made (pages) and usage since the host was made.
    pub fn totals(&self) -> (u64, TokenUsage) {
        *self.totals.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, pages: u64, usage: TokenUsage) {
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.pages += pages;
            p.usage += usage;
        }
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        t.0 += pages;
        t.1 += usage;
    }
}

#[async_trait]
impl Host for FetchHost {
    async fn http(&self, req: HttpRequest) -> Result<HttpResponse, HostError> {
        let bad = |m: String| HostError::Http {
            message: m,
            retryable: false,
        };
        let url =
            url::Url::parse(&req.url).map_err(|e| bad(format!("bad URL {:?}: {e}", req.url)))?;
        let method = reqwest::Method::from_bytes(req.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| bad(format!("bad method {:?}", req.method)))?;
        let request = Request {
            method,
            url,
            headers: req.headers,
            body: req.body,
            follow_redirects: req.follow_redirects,
        };
        let mut usage = TokenUsage::default();
        let res = self.fetcher.request(&request, &self.stop, &mut usage).await;
        self.count(u64::from(res.is_ok()), usage);
        match res {
            Ok(f) => Ok(HttpResponse {
                url: f.url.to_string(),
                status: f.status,
                headers: f.headers,
                body: f.body,
            }),
            Err(PageError::Stopped) => Err(HostError::Stopped),
            Err(e @ (PageError::Timeout(_) | PageError::Transport(_))) => Err(HostError::Http {
                message: e.to_string(),
                retryable: true,
            }),
            Err(e) => Err(bad(e.to_string())),
        }
    }

    async fn file(&self, op: FileOp) -> Result<FileOutput, HostError> {
        let Some(files) = &self.files else {
            return Err(HostError::File(
                "file access is not available to this session".into(),
            ));
        };
        let files = files.clone();
        // The file system is blocking: off the async threads.
        let r = tokio::task::spawn_blocking(move || match op {
            FileOp::Read { path } => files.read(&path).map(FileOutput::Data),
            FileOp::Write { path, data, append } => files
                .write(&path, &data, append)
                .map(|_| FileOutput::Written),
            FileOp::List {
                path,
                filter,
                files: f,
                dirs,
                recursive,
            } => files
                .list(&path, filter.as_deref(), f, dirs, recursive)
                .map(FileOutput::Listing),
        })
        .await
        .map_err(|e| HostError::File(format!("the file operation failed: {e}")))?;
        r.map_err(HostError::File)
    }

    fn log(&self, level: LogLevel, message: &str) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.log.len() >= MAX_PENDING_LOG {
            p.log.remove(0);
        }
        p.log.push(LogLine {
            at: Timestamp::now(),
            level: level.as_str().into(),
            message: message.to_string(),
        });
    }

    async fn progress(&self, p: Progress) -> Result<(), HostError> {
        let Some(sink) = &self.sink else {
            return Ok(());
        };
        let batch = self.batch_upto(p.processors);
        if batch.is_empty() {
            return Ok(());
        }
        sink.commit(batch).await.map_err(|_| HostError::LeaseLost)
    }
}
