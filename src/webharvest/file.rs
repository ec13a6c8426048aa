//! `file`'s files, confined to one directory (the session's own under the export directory).
//!
//! A path is relative, with `/` or `\` between names; an absolute path, a drive, `..` or a NUL is
//! refused, and so is any symbolic link on the way (a link placed in the directory cannot lead
//! out of it): every directory on the path is checked, and the file is opened with
//! `O_NOFOLLOW`. Files written by the session are counted against a byte cap.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Most entries a `list` returns.
const MAX_LIST: usize = 10_000;

/// A directory a session's files are confined to.
#[derive(Debug)]
pub struct DirFiles {
    root: PathBuf,
    written: AtomicU64,
    max_written: u64,
    max_read: u64,
}

impl DirFiles {
    /// Files under `root` (created when first written), at most `max_written` bytes written in
    /// all and `max_read` bytes read per file.
    pub fn new(root: PathBuf, max_written: u64, max_read: u64) -> DirFiles {
        DirFiles {
            root,
            written: AtomicU64::new(0),
            max_written,
            max_read,
        }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Reads a file.
    pub fn read(&self, path: &str) -> Result<Vec<u8>, String> {
        let full = self.resolve(path, false)?;
        let mut f = open_nofollow(OpenOptions::new().read(true), &full)
            .map_err(|e| format!("cannot read {path:?}: {e}"))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len > self.max_read {
            return Err(format!(
                "{path:?} is {len} bytes, more than the variable memory cap ({} bytes)",
                self.max_read
            ));
        }
        let mut data = Vec::with_capacity(len as usize);
        Read::by_ref(&mut f)
            .take(self.max_read + 1)
            .read_to_end(&mut data)
            .map_err(|e| format!("cannot read {path:?}: {e}"))?;
        if data.len() as u64 > self.max_read {
            return Err(format!("{path:?} is larger than the variable memory cap"));
        }
        Ok(data)
    }

    /// Writes (or appends to) a file, creating its directories.
    pub fn write(&self, path: &str, data: &[u8], append: bool) -> Result<(), String> {
        let n = data.len() as u64;
        let before = self.written.fetch_add(n, Ordering::AcqRel);
        if before + n > self.max_written {
            self.written.fetch_sub(n, Ordering::AcqRel);
            return Err(format!(
                "writing {n} more bytes would pass the session's file cap ({} bytes written in all)",
                self.max_written
            ));
        }
        let full = self.resolve(path, true)?;
        let mut opts = OpenOptions::new();
        opts.create(true);
        if append {
            opts.append(true);
        } else {
            opts.write(true).truncate(true);
        }
        let mut f =
            open_nofollow(&mut opts, &full).map_err(|e| format!("cannot write {path:?}: {e}"))?;
        f.write_all(data)
            .map_err(|e| format!("cannot write {path:?}: {e}"))
    }

    /// Lists a directory: paths relative to the root, sorted.
    pub fn list(
        &self,
        path: &str,
        filter: Option<&str>,
        files: bool,
        dirs: bool,
        recursive: bool,
    ) -> Result<Vec<String>, String> {
        let full = if path.split(['/', '\\']).all(|n| n.is_empty() || n == ".") {
            self.root.clone()
        } else {
            self.resolve(path, false)?
        };
        let meta =
            std::fs::symlink_metadata(&full).map_err(|e| format!("cannot list {path:?}: {e}"))?;
        if !meta.is_dir() {
            return Err(format!("{path:?} is not a directory"));
        }
        let pattern = filter.map(glob_regex).transpose()?;
        let mut out = Vec::new();
        let mut pending = vec![full];
        // Bounded: at most MAX_LIST entries are collected, and links are never followed.
        while let Some(dir) = pending.pop() {
            let entries =
                std::fs::read_dir(&dir).map_err(|e| format!("cannot list {path:?}: {e}"))?;
            for entry in entries {
                let entry = entry.map_err(|e| format!("cannot list {path:?}: {e}"))?;
                let ft = entry
                    .file_type()
                    .map_err(|e| format!("cannot list {path:?}: {e}"))?;
                if ft.is_symlink() {
                    continue;
                }
                let p = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                let wanted = (ft.is_dir() && dirs) || (ft.is_file() && files);
                if wanted && pattern.as_ref().is_none_or(|re| re.is_match(&name)) {
                    let rel = p.strip_prefix(&self.root).unwrap_or(&p);
                    out.push(rel.to_string_lossy().replace('\\', "/"));
                    if out.len() >= MAX_LIST {
                        return Err(format!("{path:?} holds more than {MAX_LIST} entries"));
                    }
                }
                if recursive && ft.is_dir() {
                    pending.push(p);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The full path of `path` under the root, refusing anything that could leave it.
    fn resolve(&self, path: &str, create_dirs: bool) -> Result<PathBuf, String> {
        let names = safe_names(path)?;
        if create_dirs {
            std::fs::create_dir_all(&self.root).map_err(|e| {
                format!(
                    "cannot create the session's directory {}: {e}",
                    self.root.display()
                )
            })?;
        }
        let mut full = self.root.clone();
        let last = names.len().saturating_sub(1);
        for (i, name) in names.iter().enumerate() {
            full.push(name);
            match std::fs::symlink_metadata(&full) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(format!(
                        "{path:?} passes through a symbolic link; links are not followed"
                    ));
                }
                Ok(m) if i < last && !m.is_dir() => {
                    return Err(format!("{path:?}: {name:?} is not a directory"));
                }
                Ok(_) => {}
                Err(_) if i < last && create_dirs => std::fs::create_dir(&full)
                    .map_err(|e| format!("cannot create the directory of {path:?}: {e}"))?,
                Err(_) => {}
            }
        }
        Ok(full)
    }
}

/// The names of a relative path; refuses absolute paths, drives, `..` and NULs.
fn safe_names(path: &str) -> Result<Vec<&str>, String> {
    let refuse = |why: &str| {
        Err(format!(
            "file path {path:?} {why}; paths are relative to the session's directory and stay in it"
        ))
    };
    if path.contains('\0') {
        return refuse("contains a NUL");
    }
    if path.starts_with('/') || path.starts_with('\\') {
        return refuse("is absolute");
    }
    let b = path.as_bytes();
    if b.len() >= 2
        && b[0].is_ascii_alphabetic()
        && b[1] == b':'
        && matches!(b.get(2), None | Some(b'/' | b'\\'))
    {
        return refuse("names a drive");
    }
    let mut names = Vec::new();
    for n in path.split(['/', '\\']) {
        match n {
            "" | "." => {}
            ".." => return refuse("contains `..`"),
            n => names.push(n),
        }
    }
    if names.is_empty() {
        return refuse("names no file");
    }
    Ok(names)
}

/// A `*`/`?` file name filter as a regex (Web-Harvest's `listfilter`).
fn glob_regex(filter: &str) -> Result<regex::Regex, String> {
    let mut re = String::from("^");
    for c in filter.chars() {
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    regex::Regex::new(&re).map_err(|e| format!("listfilter {filter:?}: {e}"))
}

#[cfg(unix)]
fn open_nofollow(opts: &mut OpenOptions, path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    opts.custom_flags(libc::O_NOFOLLOW).open(path)
}

#[cfg(not(unix))]
fn open_nofollow(opts: &mut OpenOptions, path: &Path) -> std::io::Result<File> {
    opts.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> DirFiles {
        DirFiles::new(dir.join("session"), 1000, 1000)
    }

    #[test]
    fn writes_appends_reads_and_lists_inside_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let f = files(tmp.path());
        f.write("out/a.txt", b"one", false).unwrap();
        f.write("out/a.txt", b"two", true).unwrap();
        assert_eq!(f.read("./out/a.txt").unwrap(), b"onetwo");
        f.write("out\\b.csv", b"x", false).unwrap();
        assert_eq!(
            f.list("out", Some("*.txt"), true, true, false).unwrap(),
            ["out/a.txt"]
        );
        assert_eq!(f.list("out", None, true, false, true).unwrap().len(), 2);
        assert_eq!(f.list(".", None, false, true, false).unwrap(), ["out"]);
    }

    #[test]
    fn escaping_paths_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let f = files(tmp.path());
        for p in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "C:\\x",
            "\\\\server\\x",
            "",
            "a\0b",
        ] {
            let e = f.write(p, b"x", false).unwrap_err();
            assert!(e.contains("stay in it"), "{p}: {e}");
        }
        assert!(!tmp.path().join("x").exists());
    }

    #[cfg(unix)]
    #[test]
    fn symbolic_links_are_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "s").unwrap();
        let f = files(tmp.path());
        f.write("ok", b"x", false).unwrap();
        std::os::unix::fs::symlink(&outside, f.root().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), f.root().join("file")).unwrap();
        assert!(f.read("link/secret").unwrap_err().contains("symbolic link"));
        assert!(f.read("file").unwrap_err().contains("symbolic link"));
        assert!(f.write("link/new", b"x", false).is_err());
        assert!(!outside.join("new").exists());
    }

    #[test]
    fn the_write_cap_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let f = DirFiles::new(tmp.path().join("s"), 5, 5);
        f.write("a", b"1234", false).unwrap();
        assert!(f.write("b", b"12", false).unwrap_err().contains("cap"));
    }
}
