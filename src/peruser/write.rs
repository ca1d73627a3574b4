//! The atomic writer of config-per-user and config-per-group files (DESIGN §4: temp file +
//! fsync + rename + fsync of the directory).
//!
//! Role: one [`Writer`] owns one directory (ocserv's `config-per-user` or `config-per-group`
//! directory) and replaces `DIR/NAME` with the rendered model, keeping earlier versions.
//! Inputs: a name and a [`PerUserConfig`]. Outputs: [`WriteOutcome`] / [`RemoveOutcome`].
//! Blocking std I/O: the actor calls it on a blocking thread, one call at a time per directory
//! (two writers racing on one name could interleave their backup rotation).
//!
//! On-disk layout:
//! - `DIR/NAME`: the file ocserv reads, mode 0640. ocserv reads it as root (sec-mod), nobody
//!   else needs to; the mode is set with `fchmod`, so the umask does not change it.
//! - `DIR/.NAME.tmp.PID.N`: the temp file of a write in progress, created with `O_EXCL` in the
//!   same directory (so the rename is atomic) and removed on any failure. Its name starts with
//!   `.`, which no accepted user or group name does, so ocserv never reads it as a user's file.
//!   Only a crash of the whole process mid-write can leave one behind.
//! - `DIR/.backups/NAME.1` … `NAME.K`: earlier versions, `.1` the newest, at most `backups` of
//!   them. A subdirectory, so backups are never mistaken for a user's file; `NAME.<digits>`
//!   never collides across names because the suffix after the last dot holds no dot. The
//!   current file is hard-linked into the ring before it is replaced, so `DIR/NAME` exists at
//!   every instant.
//!
//! Failure behaviour: the name and the model are checked before anything is touched. Any error
//! before the rename leaves `DIR/NAME` as it was and removes the temp file. An error while
//! rotating backups leaves the ring short of a version but never touches `DIR/NAME`. An error
//! fsyncing the directory after the rename is reported: the new content is in place but may
//! not survive a power loss. Errors name the directory or file and the operation.
//!
//! Failure injection: all file-system calls go through the small [`Fs`] trait; [`OsFs`] is the
//! real implementation and tests substitute one that fails at a chosen step.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{render, Kind, PerUserConfig, PerUserError, MAX_FILE_BYTES};
use crate::validate::NameError;

/// Mode of the files ocserv reads.
pub const FILE_MODE: u32 = 0o640;
/// Mode of the backup directory.
pub const BACKUP_DIR_MODE: u32 = 0o750;
/// Name of the backup directory inside the config directory.
pub const BACKUP_DIR: &str = ".backups";
/// Most backups kept per name.
pub const MAX_BACKUPS: usize = 64;

/// The file-system calls the writer makes, so a test can fail any one of them.
pub trait Fs {
    /// Whether `path` is a directory; `NotFound` when it does not exist.
    fn is_dir(&self, path: &Path) -> io::Result<bool>;
    /// Whether anything (file, link, directory) exists at `path`, without following links.
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// The file's content, at most `limit` bytes; `None` when it does not exist.
    fn read(&self, path: &Path, limit: u64) -> io::Result<Option<Vec<u8>>>;
    /// Creates `path` (failing with `AlreadyExists` if it exists), sets `mode`, writes
    /// `contents` and fsyncs it.
    fn write_new(&self, path: &Path, contents: &[u8], mode: u32) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Creates a directory with `mode`; `AlreadyExists` if something is there.
    fn create_dir(&self, path: &Path, mode: u32) -> io::Result<()>;
    /// fsyncs a directory, making renames and links in it durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsFs;

impl Fs for OsFs {
    fn is_dir(&self, path: &Path) -> io::Result<bool> {
        fs::metadata(path).map(|m| m.is_dir())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        match fs::symlink_metadata(path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn read(&self, path: &Path, limit: u64) -> io::Result<Option<Vec<u8>>> {
        match File::open(path) {
            Ok(f) => {
                let mut buf = Vec::new();
                f.take(limit).read_to_end(&mut buf)?;
                Ok(Some(buf))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_new(&self, path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        // The mode given to open() is masked by the umask; fchmod is not.
        f.set_permissions(Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::hard_link(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn create_dir(&self, path: &Path, mode: u32) -> io::Result<()> {
        fs::DirBuilder::new().mode(mode).create(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }
}

/// What [`Writer::write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The file was created or replaced.
    Written,
    /// The file already held exactly this content; nothing was touched.
    Unchanged,
}

/// What [`Writer::remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveOutcome {
    /// The file was removed (and kept as the newest backup when backups are on).
    Removed,
    /// There was no file.
    Absent,
}

/// Why a write or removal was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Config(#[from] PerUserError),
    #[error("config directory {}: {reason}", dir.display())]
    Dir { dir: PathBuf, reason: String },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("backups: {0} is above the limit {MAX_BACKUPS}")]
    TooManyBackups(usize),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> WriteError {
    let path = path.to_owned();
    move |source| WriteError::Io { op, path, source }
}

/// Distinguishes temp files of one process; the pid distinguishes processes.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
/// Attempts at a fresh temp name before giving up (names only collide with leftovers of an
/// earlier process that had the same pid).
const TEMP_ATTEMPTS: usize = 16;

/// Writes the config files of one directory; see the module documentation for the layout.
#[derive(Debug, Clone)]
pub struct Writer<F: Fs = OsFs> {
    dir: PathBuf,
    kind: Kind,
    backups: usize,
    fs: F,
}

impl Writer<OsFs> {
    /// A writer for `dir` (ocserv's config-per-user directory for [`Kind::User`], its
    /// config-per-group directory for [`Kind::Group`]) keeping `backups` earlier versions of
    /// each file (0 keeps none, at most [`MAX_BACKUPS`]).
    pub fn new(dir: impl Into<PathBuf>, kind: Kind, backups: usize) -> Result<Self, WriteError> {
        Writer::with_fs(dir, kind, backups, OsFs)
    }
}

impl<F: Fs> Writer<F> {
    /// [`Writer::new`] over another file system (tests inject failures with it).
    pub fn with_fs(
        dir: impl Into<PathBuf>,
        kind: Kind,
        backups: usize,
        fs: F,
    ) -> Result<Self, WriteError> {
        if backups > MAX_BACKUPS {
            return Err(WriteError::TooManyBackups(backups));
        }
        Ok(Writer {
            dir: dir.into(),
            kind,
            backups,
            fs,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Everything [`Writer::write`] checks, without touching the disk: the name, the model's
    /// bounds; returns the text that would be written.
    pub fn validate_only(&self, name: &str, model: &PerUserConfig) -> Result<String, WriteError> {
        self.kind.check_name(name)?;
        model.validate()?;
        Ok(render(model))
    }

    /// Makes `DIR/name` hold the rendered `model`, atomically, keeping the previous version as
    /// a backup. An empty model writes a header-only file (no settings, and no fallback to
    /// ocserv's default config either); use [`Writer::remove`] to remove the file.
    pub fn write(&self, name: &str, model: &PerUserConfig) -> Result<WriteOutcome, WriteError> {
        let text = self.validate_only(name, model)?;
        self.check_dir()?;
        let target = self.dir.join(name);
        // One byte over the largest file we write is enough to tell "different".
        let current = self
            .fs
            .read(&target, MAX_FILE_BYTES as u64 + 1)
            .map_err(io_err("read", &target))?;
        if current.as_deref() == Some(text.as_bytes()) {
            return Ok(WriteOutcome::Unchanged);
        }
        let temp = self.write_temp(name, text.as_bytes())?;
        let replaced = (|| {
            if current.is_some() {
                self.keep_backup(name, &target)?;
            }
            self.fs
                .rename(&temp, &target)
                .map_err(io_err("rename temp file over", &target))
        })();
        if let Err(e) = replaced {
            // Best effort: the error that matters is the one already in hand.
            let _ = self.fs.remove_file(&temp);
            return Err(e);
        }
        self.fs
            .sync_dir(&self.dir)
            .map_err(io_err("fsync directory", &self.dir))?;
        Ok(WriteOutcome::Written)
    }

    /// Removes `DIR/name`, keeping it as the newest backup; ocserv then falls back to its
    /// default per-user (or per-group) config, if one is configured.
    pub fn remove(&self, name: &str) -> Result<RemoveOutcome, WriteError> {
        self.kind.check_name(name)?;
        self.check_dir()?;
        let target = self.dir.join(name);
        if !self.fs.exists(&target).map_err(io_err("stat", &target))? {
            return Ok(RemoveOutcome::Absent);
        }
        self.keep_backup(name, &target)?;
        self.fs
            .remove_file(&target)
            .map_err(io_err("remove", &target))?;
        self.fs
            .sync_dir(&self.dir)
            .map_err(io_err("fsync directory", &self.dir))?;
        Ok(RemoveOutcome::Removed)
    }

    /// Path of backup `n` (1 = newest) of `name`.
    pub fn backup_path(&self, name: &str, n: usize) -> PathBuf {
        self.dir.join(BACKUP_DIR).join(format!("{name}.{n}"))
    }

    fn check_dir(&self) -> Result<(), WriteError> {
        let reason = match self.fs.is_dir(&self.dir) {
            Ok(true) => return Ok(()),
            Ok(false) => "is not a directory".to_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => "does not exist".to_owned(),
            Err(e) => e.to_string(),
        };
        Err(WriteError::Dir {
            dir: self.dir.clone(),
            reason,
        })
    }

    /// Writes and fsyncs a fresh temp file next to the target; on failure nothing is left.
    fn write_temp(&self, name: &str, contents: &[u8]) -> Result<PathBuf, WriteError> {
        let pid = std::process::id();
        let mut last = None;
        for _ in 0..TEMP_ATTEMPTS {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let temp = self.dir.join(format!(".{name}.tmp.{pid}.{n}"));
            match self.fs.write_new(&temp, contents, FILE_MODE) {
                Ok(()) => return Ok(temp),
                // Someone else's file: leave it alone and pick another name.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some((temp, e)),
                Err(e) => {
                    // Created by us (O_EXCL succeeded) or never created: removing is safe.
                    let _ = self.fs.remove_file(&temp);
                    return Err(io_err("write temp file", &temp)(e));
                }
            }
        }
        let (temp, e) = last.expect("TEMP_ATTEMPTS is above zero");
        Err(io_err("create temp file", &temp)(e))
    }

    /// Shifts the backup ring of `name` by one and hard-links the current file in as `.1`.
    fn keep_backup(&self, name: &str, target: &Path) -> Result<(), WriteError> {
        if self.backups == 0 {
            return Ok(());
        }
        let dir = self.dir.join(BACKUP_DIR);
        match self.fs.create_dir(&dir, BACKUP_DIR_MODE) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if !self.fs.is_dir(&dir).map_err(io_err("stat", &dir))? {
                    return Err(WriteError::Dir {
                        dir,
                        reason: "exists and is not a directory".into(),
                    });
                }
            }
            Err(e) => return Err(io_err("create backup directory", &dir)(e)),
        }
        let ignore_absent = |r: io::Result<()>| match r {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        };
        let oldest = self.backup_path(name, self.backups);
        ignore_absent(self.fs.remove_file(&oldest)).map_err(io_err("remove backup", &oldest))?;
        for n in (1..self.backups).rev() {
            let from = self.backup_path(name, n);
            let to = self.backup_path(name, n + 1);
            ignore_absent(self.fs.rename(&from, &to)).map_err(io_err("rotate backup", &from))?;
        }
        let newest = self.backup_path(name, 1);
        self.fs
            .hard_link(target, &newest)
            .map_err(io_err("link backup", &newest))?;
        self.fs
            .sync_dir(&dir)
            .map_err(io_err("fsync directory", &dir))
    }
}

#[cfg(test)]
mod tests;
