//! Export sinks: copies of a session's records outside the store, each written exactly once.
//!
//! A scraper config asks for sinks in its `[export]` table ([`ExportSpec`]); the service's
//! `[export]` section ([`ExportConfig`]) says where they write, so a tenant cannot choose files
//! or databases the operator did not allow.
//!
//! - **PostgreSQL table** (`postgres_table = "items"`): after each committed checkpoint the
//!   worker copies the session's committed records that the table does not have yet. Each copy
//!   is one database transaction that inserts the rows and advances the session's marker row
//!   (`harvest_export_marks`: session id and seq, table, next record seq) under a row lock, so a
//!   retried or concurrent copy (a stale worker, a resumed attempt) finds the marker already past
//!   those records and writes nothing. The records come from the store, never from the engine's
//!   memory: the table only ever holds a prefix of what the store committed, and a copy that was
//!   skipped (a crash right after a checkpoint) is caught up by the next one.
//! - **JSON lines / CSV files** (`jsonl = true`, `csv = true`): written when the session
//!   completes, to `<dir>/<client>/<session>.jsonl|csv`: a temp file, fsync, rename, fsync of
//!   the directory. A file is complete or absent; a retry rewrites it whole.
//!
//! The worker runs every sink of a completing session after committing its last checkpoint and
//! before committing COMPLETED: a crash in between leaves the session RUNNING, its next attempt
//! resumes with nothing left to do, and the sinks run again, idempotently. When a session is
//! removed (timeout, close, a single agent's new run) with `cleanup_external`, its rows and
//! marker are deleted; files are the user's deliverable and stay.
//!
//! Rows are keyed by (session id, `session_seq`, record seq): `session_seq` is the store's
//! sequence number of the session, different for every session ever submitted, so a session
//! that reuses the id of a removed one whose rows were kept (`cleanup_external = false`) writes
//! beside them. Tables made before this column existed get it at first use (rows already there
//! get 0); their primary key stays (session id, seq), and harvest says at startup how to widen
//! it (id reuse after kept rows fails on it until then).
//!
//! This module never changes a session: it reads committed records from the store.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio_postgres::NoTls;

use crate::config::{Config, ExportConfig, is_sql_identifier};
use crate::session::{Record, Session};
use crate::store::{RecordsPage, Store, StoreError};

/// Records per copy transaction and per store read. 2,000: a few hundred kB of JSON per
/// statement, well below PostgreSQL's limits, and few round trips.
const CHUNK: usize = 2_000;
/// At most this many chunks per call (bounds one call; `limits.max_records` is at most 1e8, so
/// a larger backlog simply continues at the next checkpoint or attempt).
const MAX_CHUNKS: usize = 50_000;
/// CSV columns kept at most (keys beyond are dropped, with a log line).
const MAX_CSV_COLUMNS: usize = 1_024;
/// Connections of the export database pool of one process.
const POOL_SIZE: usize = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Advisory lock class of export table creation (next to the store's classes).
const ADVISORY_CLASS_EXPORT: i32 = 0x6876_0003;

/// `[export]` of a scraper config: which sinks its sessions write. `{{vars}}` are not
/// substituted here (the table and files must be known before the crawl runs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSpec {
    /// Write `<export.dir>/<client>/<session>.jsonl` when the session completes.
    #[serde(default)]
    pub jsonl: bool,
    /// Write `<export.dir>/<client>/<session>.csv` when the session completes.
    #[serde(default)]
    pub csv: bool,
    /// Copy records, exactly once, into this table of the export schema
    /// (`[a-z_][a-z0-9_]*`; created when missing).
    #[serde(default)]
    pub postgres_table: Option<String>,
}

impl ExportSpec {
    /// The `[export]` table of a (raw) scraper config; the default (no sinks) when absent.
    pub fn of(config: &serde_json::Value) -> Result<ExportSpec, String> {
        let Some(v) = config.get("export") else {
            return Ok(ExportSpec::default());
        };
        let spec: ExportSpec = serde_path_to_error::deserialize(v.clone()).map_err(|e| {
            let path = match e.path().to_string() {
                p if p == "." => "export".to_string(),
                p => format!("export.{p}"),
            };
            format!("{path}: {}", e.into_inner())
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks the fields; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = &self.postgres_table
            && (!is_sql_identifier(t) || t == "harvest_export_marks")
        {
            return Err(format!(
                "export.postgres_table: {t:?} must be a lower-case SQL name ([a-z_][a-z0-9_]*, at \
                 most 63 bytes, not harvest_export_marks); {{{{vars}}}} are not substituted here"
            ));
        }
        Ok(())
    }

    /// Whether the table is its only sink (files are written only at completion).
    pub fn table_only(&self) -> bool {
        self.postgres_table.is_some() && !self.jsonl && !self.csv
    }

    /// Whether it asks for no sink.
    pub fn is_empty(&self) -> bool {
        !self.jsonl && !self.csv && self.postgres_table.is_none()
    }
}

/// What one table export did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Exported {
    /// Rows written now.
    pub written: u64,
    /// The table has the session's records numbered below this (0: not known).
    pub upto: u64,
}

/// Errors of the sinks.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Reading the session's records failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The export database failed or is not configured.
    #[error("export database: {0}")]
    Database(String),
    /// A file could not be written.
    #[error("export file {path}: {source}; check that export.dir is writable")]
    File {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The sinks of this process: the export settings and a lazily opened export database pool.
pub struct Sinks {
    cfg: ExportConfig,
    url: Option<String>,
    pool: tokio::sync::OnceCell<Pool>,
    /// Tables known to exist (created or checked once per process).
    tables: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Sinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sinks")
            .field("dir", &self.cfg.dir)
            .field("schema", &self.cfg.schema)
            .finish_non_exhaustive()
    }
}

fn db_err(what: &'static str) -> impl Fn(tokio_postgres::Error) -> SinkError {
    move |e| SinkError::Database(format!("{what}: {e}"))
}

impl Sinks {
    /// The sinks of a service configuration (nothing is opened yet).
    pub fn new(config: &Config) -> Sinks {
        Sinks {
            cfg: config.export.clone(),
            url: config
                .export
                .database_url
                .clone()
                .or_else(|| config.database_url.clone()),
            pool: tokio::sync::OnceCell::new(),
            tables: Mutex::new(HashSet::new()),
        }
    }

    async fn pool(&self) -> Result<&Pool, SinkError> {
        self.pool
            .get_or_try_init(|| async {
                let url = self.url.as_deref().ok_or_else(|| {
                    SinkError::Database(
                        "a session asks for export.postgres_table, but neither export.database_url \
                         nor database_url is configured"
                            .into(),
                    )
                })?;
                let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
                    SinkError::Database(format!("export.database_url is not valid: {e}"))
                })?;
                config.connect_timeout(CONNECT_TIMEOUT);
                config.application_name("harvest-export");
                let manager = Manager::from_config(
                    config,
                    NoTls,
                    ManagerConfig {
                        recycling_method: RecyclingMethod::Fast,
                    },
                );
                Pool::builder(manager)
                    .max_size(POOL_SIZE)
                    .runtime(Runtime::Tokio1)
                    .wait_timeout(Some(Duration::from_secs(30)))
                    .create_timeout(Some(CONNECT_TIMEOUT))
                    .build()
                    .map_err(|e| SinkError::Database(format!("building the export pool: {e}")))
            })
            .await
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, SinkError> {
        self.pool()
            .await?
            .get()
            .await
            .map_err(|e| SinkError::Database(format!("connecting: {e}")))
    }

    /// Creates the export schema, `table` and the marker table when missing (once per process).
    async fn ensure_table(&self, table: &str) -> Result<(), SinkError> {
        if lock(&self.tables).contains(table) {
            return Ok(());
        }
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting the table check"))?;
        // Concurrent CREATE ... IF NOT EXISTS can still collide in the catalog: serialize them.
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&ADVISORY_CLASS_EXPORT, &self.cfg.schema],
        )
        .await
        .map_err(db_err("locking the export schema"))?;
        let s = &self.cfg.schema;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.harvest_export_marks (
                 session_id  text NOT NULL,
                 session_seq bigint NOT NULL,
                 tbl         text NOT NULL,
                 next_seq    bigint NOT NULL,
                 PRIMARY KEY (session_id, session_seq, tbl));
             ALTER TABLE {s}.harvest_export_marks
                 ADD COLUMN IF NOT EXISTS session_seq bigint NOT NULL DEFAULT 0;
             CREATE TABLE IF NOT EXISTS {s}.{table} (
                 session_id  text NOT NULL,
                 session_seq bigint NOT NULL,
                 seq         bigint NOT NULL,
                 client_id   text NOT NULL,
                 data        jsonb NOT NULL,
                 PRIMARY KEY (session_id, session_seq, seq));
             ALTER TABLE {s}.{table} ADD COLUMN IF NOT EXISTS session_seq bigint NOT NULL DEFAULT 0;"
        ))
        .await
        .map_err(db_err("creating the export tables"))?;
        // Markers made by an earlier harvest were keyed (session_id, tbl), so two tenants'
        // sessions with one id, or a session and an earlier one of its id whose marker stayed,
        // shared one: a few rows per session, so the key is rebuilt here. Their old markers
        // (session_seq 0) are read only to adopt a session's own position (see
        // `export_rows_marked`). (Workers of an earlier harvest must be stopped first: they
        // would write markers under the old key.)
        let marks_key = primary_key(&tx, &format!("{s}.harvest_export_marks")).await?;
        if !marks_key.iter().any(|c| c == "session_seq") {
            let drop = if marks_key.is_empty() {
                ""
            } else {
                "DROP CONSTRAINT harvest_export_marks_pkey,"
            };
            tx.batch_execute(&format!(
                "ALTER TABLE {s}.harvest_export_marks {drop}
                     ADD PRIMARY KEY (session_id, session_seq, tbl)"
            ))
            .await
            .map_err(db_err("re-keying the export markers"))?;
        }
        // A table made by an earlier harvest keeps its (session_id, seq) key: rebuilding the key
        // of a big table locks it for long, so that is left to its operator.
        let key = primary_key(&tx, &format!("{s}.{table}")).await?;
        if !key.iter().any(|c| c == "session_seq") {
            tracing::warn!(
                table = %format!("{s}.{table}"),
                "this export table was made by an earlier harvest and is keyed (session_id, seq): \
                 a session reusing the id of a removed one whose rows were kept \
                 (cleanup_external = false) cannot export to it. To allow that, run: ALTER TABLE \
                 {s}.{table} DROP CONSTRAINT {table}_pkey, ADD PRIMARY KEY (session_id, \
                 session_seq, seq)"
            );
        }
        tx.commit()
            .await
            .map_err(db_err("committing the export tables"))?;
        lock(&self.tables).insert(table.to_string());
        Ok(())
    }

    /// Copies the session's committed records that `spec.postgres_table` lacks; returns how many
    /// rows were written (0 when it had them all). Idempotent and safe to run concurrently for
    /// one session: each chunk's rows and marker commit in one transaction under the marker's
    /// row lock.
    pub async fn export_rows(
        &self,
        store: &dyn Store,
        session: &Session,
        spec: &ExportSpec,
    ) -> Result<u64, SinkError> {
        Ok(self.export_rows_marked(store, session, spec).await?.written)
    }

    /// [`Sinks::export_rows`], also saying how far the table has the session's records.
    pub async fn export_rows_marked(
        &self,
        store: &dyn Store,
        session: &Session,
        spec: &ExportSpec,
    ) -> Result<Exported, SinkError> {
        let Some(table) = &spec.postgres_table else {
            return Ok(Exported::default());
        };
        self.ensure_table(table).await?;
        let s = &self.cfg.schema;
        let id = session.id.as_str();
        let session_seq = session_seq_of(session)?;
        let mut written = 0u64;
        for _ in 0..MAX_CHUNKS {
            let mut client = self.client().await?;
            let tx = client
                .transaction()
                .await
                .map_err(db_err("starting an export"))?;
            // A new marker starts after the rows the table has of this session: none, unless
            // it exported under a marker of an earlier harvest (keyed by id alone). Its rows
            // then carry its seq; or, written before rows had `session_seq`, they carry 0 and
            // its client, and the old marker (now `session_seq` 0) stands right after them:
            // that position is adopted (a session of another client, or one whose rows do not
            // end at the old marker, starts at 0). Once the marker exists (every later chunk),
            // the NOT EXISTS gate skips those reads of the table.
            tx.execute(
                &format!(
                    "INSERT INTO {s}.harvest_export_marks (session_id, session_seq, tbl, next_seq)
                     SELECT $1, $3, $2, coalesce(
                         (SELECT max(seq) + 1 FROM {s}.{table}
                          WHERE session_id = $1 AND session_seq = $3),
                         (SELECT m.next_seq FROM {s}.harvest_export_marks m
                          WHERE m.session_id = $1 AND m.session_seq = 0 AND m.tbl = $2
                            AND m.next_seq = (SELECT max(seq) + 1 FROM {s}.{table}
                                              WHERE session_id = $1 AND session_seq = 0
                                                AND client_id = $4)),
                         0)
                     WHERE NOT EXISTS (SELECT 1 FROM {s}.harvest_export_marks
                                       WHERE session_id = $1 AND session_seq = $3 AND tbl = $2)
                     ON CONFLICT DO NOTHING"
                ),
                &[&id, table, &session_seq, &session.client.client_id()],
            )
            .await
            .map_err(db_err("creating the export marker"))?;
            let next: i64 = tx
                .query_one(
                    &format!(
                        "SELECT next_seq FROM {s}.harvest_export_marks
                         WHERE session_id = $1 AND session_seq = $3 AND tbl = $2 FOR UPDATE"
                    ),
                    &[&id, table, &session_seq],
                )
                .await
                .map_err(db_err("reading the export marker"))?
                .try_get(0)
                .map_err(db_err("reading the export marker"))?;
            let records = store
                .records_page(RecordsPage {
                    id: session.key(),
                    offset: u64::try_from(next).unwrap_or(0),
                    limit: CHUNK,
                })
                .await?;
            let Some(last) = records.last() else {
                // Nothing new; the transaction only created the marker.
                tx.commit()
                    .await
                    .map_err(db_err("committing the export marker"))?;
                return Ok(Exported {
                    written,
                    upto: u64::try_from(next).unwrap_or(0),
                });
            };
            let next_seq = i64::try_from(last.seq + 1)
                .map_err(|_| SinkError::Database("record seq out of range".into()))?;
            let seqs: Vec<i64> = records.iter().map(|r| r.seq as i64).collect();
            let data: Vec<&serde_json::Value> = records.iter().map(|r| &r.data).collect();
            // A plain INSERT (no ON CONFLICT): a duplicate would be a bug in the marker logic,
            // and must fail loudly rather than be hidden.
            tx.execute(
                &format!(
                    "INSERT INTO {s}.{table} (session_id, session_seq, seq, client_id, data)
                     SELECT $1, $5, u.seq, $2, u.data FROM unnest($3::bigint[], $4::jsonb[]) AS u(seq, data)"
                ),
                &[&id, &session.client.client_id(), &seqs, &data, &session_seq],
            )
            .await
            .map_err(db_err("inserting exported rows"))?;
            tx.execute(
                &format!(
                    "UPDATE {s}.harvest_export_marks SET next_seq = $3
                     WHERE session_id = $1 AND session_seq = $4 AND tbl = $2"
                ),
                &[&id, table, &next_seq, &session_seq],
            )
            .await
            .map_err(db_err("advancing the export marker"))?;
            tx.commit()
                .await
                .map_err(db_err("committing exported rows"))?;
            written += records.len() as u64;
            if records.len() < CHUNK {
                return Ok(Exported {
                    written,
                    upto: last.seq + 1,
                });
            }
        }
        Ok(Exported { written, upto: 0 })
    }

    /// Runs every sink of a completing session: the table copy, then the files.
    pub async fn export_all(
        &self,
        store: &dyn Store,
        session: &Session,
        spec: &ExportSpec,
    ) -> Result<(), SinkError> {
        self.export_rows(store, session, spec).await?;
        if spec.jsonl {
            self.write_file(store, session, FileFormat::Jsonl).await?;
        }
        if spec.csv {
            self.write_file(store, session, FileFormat::Csv).await?;
        }
        Ok(())
    }

    /// Where a session's export file goes.
    pub fn file_path(&self, session: &Session, ext: &str) -> PathBuf {
        self.cfg
            .dir
            .join(client_dir(session.client.client_id()))
            .join(format!("{}.{ext}", session.id.as_str()))
    }

    async fn write_file(
        &self,
        store: &dyn Store,
        session: &Session,
        format: FileFormat,
    ) -> Result<(), SinkError> {
        let ext = format.ext();
        let path = self.file_path(session, ext);
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let file_err = |p: &Path| {
            let p = p.to_path_buf();
            move |source| SinkError::File { path: p, source }
        };
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(file_err(&dir))?;
        let columns = match format {
            FileFormat::Csv => Some(csv_columns(store, session).await?),
            FileFormat::Jsonl => None,
        };
        // Unique per writer: a stale worker and a resumed attempt may write at once; each
        // renames a complete file of the same committed records.
        let tmp = dir.join(format!(
            ".{}.{ext}.tmp-{}",
            session.id.as_str(),
            uuid::Uuid::now_v7().simple()
        ));
        let result = async {
            let file = tokio::fs::File::create(&tmp)
                .await
                .map_err(file_err(&tmp))?;
            let mut out = tokio::io::BufWriter::new(file);
            if let Some(cols) = &columns
                && !cols.is_empty()
            {
                out.write_all(&csv_row(cols.iter().map(String::as_str)))
                    .await
                    .map_err(file_err(&tmp))?;
            }
            let mut offset = 0u64;
            for _ in 0..MAX_CHUNKS {
                let page = store
                    .records_page(RecordsPage {
                        id: session.key(),
                        offset,
                        limit: CHUNK,
                    })
                    .await?;
                let mut buf = Vec::new();
                for r in &page {
                    match &columns {
                        Some(cols) => {
                            let cells: Vec<String> = cols.iter().map(|c| csv_cell(r, c)).collect();
                            buf.extend(csv_row(cells.iter().map(String::as_str)));
                        }
                        None => {
                            if let Ok(line) = serde_json::to_vec(&r.data) {
                                buf.extend(line);
                                buf.push(b'\n');
                            }
                        }
                    }
                }
                out.write_all(&buf).await.map_err(file_err(&tmp))?;
                match page.last() {
                    Some(last) if page.len() == CHUNK => offset = last.seq + 1,
                    _ => break,
                }
            }
            out.flush().await.map_err(file_err(&tmp))?;
            let file = out.into_inner();
            file.sync_all().await.map_err(file_err(&tmp))?;
            drop(file);
            tokio::fs::rename(&tmp, &path)
                .await
                .map_err(file_err(&path))?;
            // The rename is durable only once the directory is.
            let d = dir.clone();
            tokio::task::spawn_blocking(move || std::fs::File::open(&d)?.sync_all())
                .await
                .map_err(|e| SinkError::File {
                    path: dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?
                .map_err(file_err(&dir))?;
            Ok::<(), SinkError>(())
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// Deletes what the table sink exported for a removed session, when its options ask for it
    /// (`cleanup_external`, the default). Files stay.
    ///
    /// The progress marker goes in any case (keyed by session id and seq, it would never be read
    /// again), with the id's marker of an earlier harvest (`session_seq` 0), if one is left.
    pub async fn cleanup(&self, session: &Session) -> Result<(), SinkError> {
        let Ok(spec) = ExportSpec::of(&session.job.config) else {
            return Ok(());
        };
        let Some(table) = &spec.postgres_table else {
            return Ok(());
        };
        self.ensure_table(table).await?;
        let s = &self.cfg.schema;
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting the export cleanup"))?;
        let id = session.id.as_str();
        if session.options.cleanup_external {
            // This session's rows; 0: rows written before `session_seq` existed (only this
            // session's, unless an older one with the id kept its rows).
            tx.execute(
                &format!(
                    "DELETE FROM {s}.{table} WHERE session_id = $1 AND session_seq IN ($2, 0)"
                ),
                &[&id, &session_seq_of(session)?],
            )
            .await
            .map_err(db_err("deleting exported rows"))?;
        }
        // With a marker an earlier harvest left (session_seq 0), no longer read.
        tx.execute(
            &format!(
                "DELETE FROM {s}.harvest_export_marks
                 WHERE session_id = $1 AND session_seq IN ($3, 0) AND tbl = $2"
            ),
            &[&id, table, &session_seq_of(session)?],
        )
        .await
        .map_err(db_err("deleting the export marker"))?;
        tx.commit()
            .await
            .map_err(db_err("committing the export cleanup"))?;
        Ok(())
    }
}

/// Runs [`Sinks::cleanup`] for removed sessions, logging (not failing on) errors: the removal
/// itself already happened.
pub async fn cleanup_removed(sinks: &Sinks, removed: &[Session]) {
    for s in removed {
        if let Err(e) = sinks.cleanup(s).await {
            tracing::warn!(session = %s.id, error = %e, "removing exported rows failed; they stay in the export table");
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum FileFormat {
    Jsonl,
    Csv,
}

impl FileFormat {
    fn ext(self) -> &'static str {
        match self {
            FileFormat::Jsonl => "jsonl",
            FileFormat::Csv => "csv",
        }
    }
}

/// The session's store sequence number as the export tables keep it.
/// The columns of `table`'s primary key (none when it has no key or does not exist).
async fn primary_key(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &str,
) -> Result<Vec<String>, SinkError> {
    Ok(tx
        .query(
            "SELECT a.attname FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = to_regclass($1) AND i.indisprimary",
            &[&table],
        )
        .await
        .map_err(db_err("reading an export table's key"))?
        .iter()
        .filter_map(|r| r.try_get::<_, String>(0).ok())
        .collect())
}

fn session_seq_of(session: &Session) -> Result<i64, SinkError> {
    i64::try_from(session.seq)
        .map_err(|_| SinkError::Database(format!("session seq {} out of range", session.seq)))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A client id as one directory name: safe (no separator, never `.` or `..`, at most 200
/// bytes) and injective, so that two clients never share a directory (`a/b` and `a_b` did):
/// letters, digits and `-` stay as they are, every other byte becomes `_` and two hex digits,
/// the empty id is `_`. A name that would be longer keeps its first 180 bytes and a hash of the
/// whole id.
pub fn client_dir(client: &str) -> String {
    use std::fmt::Write as _;
    if client.is_empty() {
        return "_".into();
    }
    let mut out = String::with_capacity(client.len());
    for b in client.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "_{b:02x}");
        }
    }
    if out.len() > 200 {
        // FNV-1a: stable across builds (the directory must not move between versions).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in client.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        out.truncate(180);
        let _ = write!(out, "~{h:016x}");
    }
    out
}

/// The CSV columns: keys of all records in order of first appearance (`value` for records that
/// are not objects), at most [`MAX_CSV_COLUMNS`].
async fn csv_columns(store: &dyn Store, session: &Session) -> Result<Vec<String>, SinkError> {
    let mut cols = Vec::new();
    let mut seen = HashSet::new();
    let mut offset = 0u64;
    for _ in 0..MAX_CHUNKS {
        let page = store
            .records_page(RecordsPage {
                id: session.key(),
                offset,
                limit: CHUNK,
            })
            .await?;
        for r in &page {
            let keys: Vec<&str> = match &r.data {
                serde_json::Value::Object(m) => m.keys().map(String::as_str).collect(),
                _ => vec!["value"],
            };
            for k in keys {
                if cols.len() < MAX_CSV_COLUMNS && seen.insert(k.to_string()) {
                    cols.push(k.to_string());
                }
            }
        }
        match page.last() {
            Some(last) if page.len() == CHUNK => offset = last.seq + 1,
            _ => break,
        }
    }
    Ok(cols)
}

fn csv_cell(r: &Record, column: &str) -> String {
    let v = match &r.data {
        serde_json::Value::Object(m) => m.get(column),
        other if column == "value" => Some(other),
        _ => None,
    };
    match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn csv_row<'a>(cells: impl Iterator<Item = &'a str>) -> Vec<u8> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let cells: Vec<&str> = cells.collect();
    // Writing to a Vec cannot fail.
    let _ = w.write_record(&cells);
    w.into_inner().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_defaults_and_validation() {
        let none = ExportSpec::of(&serde_json::json!({"start_urls": []})).unwrap();
        assert!(none.is_empty());
        let ok = ExportSpec::of(
            &serde_json::json!({"export": {"jsonl": true, "postgres_table": "items"}}),
        )
        .unwrap();
        assert_eq!(ok.postgres_table.as_deref(), Some("items"));
        let bad = ExportSpec::of(&serde_json::json!({"export": {"postgres_table": "x; DROP"}}));
        assert!(bad.unwrap_err().starts_with("export.postgres_table"));
        let unknown = ExportSpec::of(&serde_json::json!({"export": {"parquet": true}}));
        assert!(unknown.unwrap_err().contains("parquet"));
    }

    #[test]
    fn client_ids_are_safe_and_distinct_directory_names() {
        assert_eq!(client_dir("acme"), "acme");
        assert_eq!(client_dir("acme-2"), "acme-2");
        assert_eq!(client_dir(".."), "_2e_2e");
        assert_eq!(client_dir(""), "_");
        let ids = ["a/b", "a_b", "a_2fb", "a.b", "", "_", "é", "a b"];
        let dirs: std::collections::HashSet<String> = ids.iter().map(|c| client_dir(c)).collect();
        assert_eq!(dirs.len(), ids.len(), "{dirs:?}");
        for d in &dirs {
            assert!(!d.contains('/') && d != "." && d != "..", "{d}");
        }
        let long = client_dir(&"x".repeat(500));
        assert!(long.len() <= 200 && long != client_dir(&"x".repeat(501)));
    }

    /// Any JSON value (bounded depth and size).
    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            // Quarters: exact in binary and in decimal, so a read back compares equal (serde_json
            // without `float_roundtrip` may differ by one ulp on arbitrary floats).
            (-4_000_000i32..4_000_000).prop_map(|n| serde_json::Value::from(f64::from(n) / 4.0)),
            any::<String>().prop_map(serde_json::Value::from),
            "[,\"\r\n a]{0,8}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map("[a-c,\"]{0,3}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Fuzzing (issue 15): any record encodes to a CSV row that reads back cell for cell, and
    /// to a JSON line that reads back as the same value; nothing panics.
    #[test]
    fn records_encode_to_csv_and_jsonl_that_read_back() {
        use proptest::test_runner::{Config, TestRunner};
        let mut runner = TestRunner::new(Config {
            cases: 512,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&json_value(), |data| {
                let r = Record { seq: 0, data };
                let columns: Vec<String> = match &r.data {
                    serde_json::Value::Object(m) => m.keys().cloned().collect(),
                    _ => vec!["value".into()],
                };
                let cells: Vec<String> = columns.iter().map(|c| csv_cell(&r, c)).collect();
                let row = csv_row(cells.iter().map(String::as_str));
                let mut reader = csv::ReaderBuilder::new()
                    .has_headers(false)
                    .from_reader(row.as_slice());
                let back: Vec<String> = match reader.records().next() {
                    Some(Ok(rec)) => rec.iter().map(str::to_string).collect(),
                    Some(Err(e)) => {
                        return Err(proptest::test_runner::TestCaseError::fail(format!(
                            "row {:?} does not read back: {e}",
                            String::from_utf8_lossy(&row)
                        )));
                    }
                    None => Vec::new(),
                };
                // No cells, or one empty cell, is an empty line: CSV cannot tell the two apart.
                if !cells.concat().is_empty() || cells.len() > 1 {
                    proptest::prop_assert_eq!(&back, &cells);
                }
                let line = serde_json::to_vec(&r.data).expect("a JSON value serializes");
                proptest::prop_assert!(!line.contains(&b'\n'), "a JSON line holds a newline");
                let again: serde_json::Value =
                    serde_json::from_slice(&line).expect("a JSON line reads back");
                proptest::prop_assert_eq!(again, r.data);
                Ok(())
            })
            .unwrap();
    }
}
