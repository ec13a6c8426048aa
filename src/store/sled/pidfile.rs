//! `harvest.pid` in the data directory: which process has it open, for the error a second
//! process gets (sled's own file lock only says "would block").

use std::path::Path;

const NAME: &str = "harvest.pid";

/// Records this process as the directory's holder. Best effort: failing to write it costs only a
/// vaguer error for a second process.
pub(super) fn write(dir: &Path) {
    let path = dir.join(NAME);
    if let Err(e) = std::fs::write(&path, format!("{}\n", std::process::id())) {
        tracing::debug!(path = %path.display(), error = %e, "cannot write the pid file");
    }
}

/// The pid the directory's pid file names, if that process still runs (where `/proc` can tell).
pub(super) fn holder(dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join(NAME)).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    let proc = Path::new("/proc");
    (!proc.is_dir() || proc.join(pid.to_string()).exists()).then_some(pid)
}
