//! Running a program: the interpreter runs synchronously on a thread of its own (its script
//! engine is single-threaded, and deep configs need a deep stack); this async side serves its
//! host calls one at a time, reports progress every ~500 ms, and watches the stop signal. A stop
//! aborts the host call in flight (an HTTP request, a sleep) and interrupts a running script; the
//! interpreter also checks it before every processor. If the interpreter is inside something that
//! cannot be interrupted (a long XPath), the run returns after a short grace anyway and the thread
//! finishes on its own.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::Limits;
use super::eval::{FailKind, Flow, Interp};
use super::host::{
    FileOp, FileOutput, Host, HostError, HttpRequest, HttpResponse, LogLevel, Progress,
};
use super::parse::Program;
use super::value::{Value, VarValue};
use crate::job::{StopReason, StopSignal};

/// How often progress is reported while a run goes on.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// How long a stopped run waits for the interpreter to notice before returning without it.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// The interpreter thread's stack: room for [`super::eval::MAX_EVAL_DEPTH`] nested processors
/// in an unoptimised build (2000 levels measured to fit in 8 MiB) with room for the script
/// engine and larger frames; untouched stack costs no memory.
const INTERPRETER_STACK: usize = 64 << 20;

/// What a finished run leaves.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunOutput {
    /// The session scope's variables (a text, or a list of texts).
    pub variables: BTreeMap<String, VarValue>,
    /// Processors executed.
    pub processors: u64,
    /// The message of the `exit` that ended the run, if one did.
    pub exit_message: Option<String>,
}

/// Why a run did not complete.
#[derive(Debug, Clone, PartialEq)]
pub struct RunError {
    /// What kind of failure.
    pub kind: RunErrorKind,
    /// For a person: `config/loop[1]/body/http: … (line 7, column 9)`.
    pub message: String,
    /// What the run had when it ended (empty when the interpreter did not stop in time).
    pub output: RunOutput,
}

/// Kinds of [`RunError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunErrorKind {
    /// A processor failed (the config's own error).
    Failed,
    /// An HTTP request failed; `retryable` when another attempt may succeed.
    Http {
        /// Worth another attempt.
        retryable: bool,
    },
    /// A limit was hit (its name: `max_loops`, `call_depth`, `variable_memory`,
    /// `html_to_xml_size`, `xpath_input_size`, `script_time`, `script_memory`, `eval_depth`,
    /// `http_requests`).
    Limit(&'static str),
    /// The stop signal fired.
    Stopped,
    /// The lease was lost (progress could not be committed).
    LeaseLost,
    /// The run could not start (thread, HTTP client).
    Internal,
}

impl RunErrorKind {
    /// The session error kind.
    pub fn as_str(&self) -> &'static str {
        match self {
            RunErrorKind::Failed => "webharvest_failed",
            RunErrorKind::Http { .. } => "http_failed",
            RunErrorKind::Limit(_) => "limit_exceeded",
            RunErrorKind::Stopped => "stopped",
            RunErrorKind::LeaseLost => "lease_lost",
            RunErrorKind::Internal => "internal",
        }
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RunError {}

pub(crate) enum HostCall {
    Http(HttpRequest),
    File(FileOp),
    Sleep(Duration),
}

pub(crate) enum HostReply {
    Http(HttpResponse),
    File(FileOutput),
    Slept,
}

type Reply = oneshot::Sender<Result<HostReply, HostError>>;

/// The interpreter's blocking handle on the host.
pub(crate) struct Bridge {
    tx: mpsc::Sender<(HostCall, Reply)>,
    host: Arc<dyn Host>,
}

impl Bridge {
    fn call(&self, c: HostCall) -> Result<HostReply, HostError> {
        let (rtx, rrx) = oneshot::channel();
        self.tx
            .blocking_send((c, rtx))
            .map_err(|_| HostError::Stopped)?;
        rrx.blocking_recv().unwrap_or(Err(HostError::Stopped))
    }

    pub(crate) fn http(&self, r: HttpRequest) -> Result<HttpResponse, HostError> {
        match self.call(HostCall::Http(r))? {
            HostReply::Http(x) => Ok(x),
            _ => Err(HostError::Stopped),
        }
    }

    pub(crate) fn file(&self, op: FileOp) -> Result<FileOutput, HostError> {
        match self.call(HostCall::File(op))? {
            HostReply::File(x) => Ok(x),
            _ => Err(HostError::Stopped),
        }
    }

    pub(crate) fn sleep(&self, d: Duration) -> Result<(), HostError> {
        self.call(HostCall::Sleep(d)).map(|_| ())
    }

    pub(crate) fn log(&self, level: LogLevel, message: &str) {
        self.host.log(level, message)
    }
}

type Finished = (Result<Option<String>, Flow>, BTreeMap<String, Value>);

/// Runs `program` with `params` as its first session variables, reaching out through `host`,
/// until it ends or `stop` fires.
pub async fn run_program(
    program: Arc<Program>,
    params: &BTreeMap<String, String>,
    host: Arc<dyn Host>,
    limits: Limits,
    stop: StopSignal,
) -> Result<RunOutput, RunError> {
    let processors = Arc::new(AtomicU64::new(0));
    // The interpreter's own signal: the caller's stop, or a lost lease found by a progress report.
    let inner = StopSignal::new();
    // Dropped before the end (an aborted task): the interpreter stops rather than runs on.
    let _stop_on_drop = StopOnDrop(inner.clone());
    let (tx, mut rx) = mpsc::channel::<(HostCall, Reply)>(1);
    let (done_tx, mut done_rx) = oneshot::channel::<Finished>();
    let bridge = Bridge {
        tx,
        host: host.clone(),
    };
    let params = params.clone();
    let (p, s) = (processors.clone(), inner.clone());
    let spawned = std::thread::Builder::new()
        .name("webharvest".into())
        .stack_size(INTERPRETER_STACK)
        .spawn(move || {
            let mut interp = Interp::new(&program, bridge, limits, s, p);
            let mut r = Ok(());
            for (k, v) in &params {
                if let Err(e) = interp.vars.borrow_mut().define(k, Value::text(v.as_str())) {
                    r = Err(Flow::Fail(super::eval::Failure {
                        path: "params".into(),
                        line: 0,
                        column: 0,
                        message: format!("param {k}: {e}"),
                        kind: FailKind::Limit("variable_memory"),
                    }));
                    break;
                }
            }
            let r = r.and_then(|_| interp.run());
            let r = match r {
                Ok(()) => Ok(None),
                Err(Flow::Exit(m)) => Ok(Some(m)),
                Err(e) => Err(e),
            };
            let _ = done_tx.send((r, interp.session_vars()));
        });
    if let Err(e) = spawned {
        return Err(RunError {
            kind: RunErrorKind::Internal,
            message: format!("cannot start the interpreter thread: {e}"),
            output: RunOutput::default(),
        });
    }

    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    type Call = Pin<Box<dyn Future<Output = Result<HostReply, HostError>> + Send>>;
    // The host call in flight and where its answer goes (both set, or both unset).
    let mut call: Option<Call> = None;
    let mut reply: Option<Reply> = None;
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut lease_lost = false;
    // Bounded: ends when the interpreter finishes, or STOP_GRACE after a stop.
    let finished: Option<Finished> = loop {
        tokio::select! {
            biased;
            r = &mut done_rx => match r {
                Ok(f) => break Some(f),
                // The thread ended without an answer: it panicked.
                Err(_) => {
                    return Err(RunError {
                        kind: RunErrorKind::Internal,
                        message: "the interpreter failed unexpectedly; see the service log".into(),
                        output: RunOutput {
                            processors: processors.load(Ordering::Relaxed),
                            ..RunOutput::default()
                        },
                    });
                }
            },
            _ = stop.stopped(), if deadline.is_none() => {
                inner.stop(stop.reason().unwrap_or(StopReason::Cancelled));
                deadline = Some(tokio::time::Instant::now() + STOP_GRACE);
                call = None;
                if let Some(r) = reply.take() {
                    let _ = r.send(Err(HostError::Stopped));
                }
            }
            res = async { match call.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if reply.is_some() => {
                call = None;
                if let Some(r) = reply.take() {
                    let _ = r.send(res);
                }
            }
            msg = rx.recv(), if reply.is_none() => {
                if let Some((c, r)) = msg {
                    if deadline.is_some() {
                        let _ = r.send(Err(HostError::Stopped));
                    } else {
                        call = Some(serve(host.clone(), c));
                        reply = Some(r);
                    }
                }
            }
            // After a stop nothing more is committed: the job's final batch carries the rest.
            _ = tick.tick(), if deadline.is_none() => {
                let p = Progress {
                    processors: processors.load(Ordering::Relaxed),
                };
                if let Err(e) = host.progress(p).await {
                    if e == HostError::LeaseLost {
                        lease_lost = true;
                    }
                    inner.stop(StopReason::LeaseLost);
                    deadline = Some(tokio::time::Instant::now() + STOP_GRACE);
                    call = None;
                    if let Some(r) = reply.take() {
                        let _ = r.send(Err(HostError::Stopped));
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                break None;
            }
        }
    };
    let count = processors.load(Ordering::Relaxed);
    let Some((result, vars)) = finished else {
        return Err(RunError {
            kind: if lease_lost {
                RunErrorKind::LeaseLost
            } else {
                RunErrorKind::Stopped
            },
            message: "stopped while a processor was still running".into(),
            output: RunOutput {
                processors: count,
                ..RunOutput::default()
            },
        });
    };
    let output = |exit_message| RunOutput {
        variables: vars.iter().map(|(k, v)| (k.clone(), v.export())).collect(),
        processors: count,
        exit_message,
    };
    match result {
        Ok(exit) => Ok(output(exit)),
        Err(Flow::Exit(m)) => Ok(output(Some(m))),
        Err(Flow::Stopped) => Err(RunError {
            kind: if lease_lost {
                RunErrorKind::LeaseLost
            } else {
                RunErrorKind::Stopped
            },
            message: "stopped".into(),
            output: output(None),
        }),
        Err(Flow::Fail(f)) => Err(RunError {
            kind: match f.kind {
                FailKind::Runtime => RunErrorKind::Failed,
                FailKind::Http { retryable } => RunErrorKind::Http { retryable },
                FailKind::Limit(n) => RunErrorKind::Limit(n),
                FailKind::LeaseLost => RunErrorKind::LeaseLost,
            },
            message: f.describe(),
            output: output(None),
        }),
    }
}

/// Fires its signal when dropped.
struct StopOnDrop(StopSignal);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop(StopReason::Cancelled);
    }
}

fn serve(
    host: Arc<dyn Host>,
    c: HostCall,
) -> Pin<Box<dyn Future<Output = Result<HostReply, HostError>> + Send>> {
    Box::pin(async move {
        match c {
            HostCall::Http(r) => host.http(r).await.map(HostReply::Http),
            HostCall::File(op) => host.file(op).await.map(HostReply::File),
            HostCall::Sleep(d) => {
                tokio::time::sleep(d).await;
                Ok(HostReply::Slept)
            }
        }
    })
}
