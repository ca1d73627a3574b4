//! Writer tests in temp directories, with failures injected through [`Fs`].

use std::cell::RefCell;
use std::os::unix::fs::MetadataExt;

use super::*;
use crate::peruser::{parse, render, HEADER};

/// Version `n` of a model: versions differ in content.
fn version(n: u32) -> PerUserConfig {
    PerUserConfig {
        routes: vec!["10.0.0.0/8".parse().unwrap()],
        mtu: Some(1000 + n),
        ..PerUserConfig::default()
    }
}

/// Names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap()
}

fn user_writer(dir: &Path, backups: usize) -> Writer {
    Writer::new(dir, Kind::User, backups).unwrap()
}

#[test]
fn writes_the_rendered_model_with_mode_0640() {
    let tmp = tempfile::tempdir().unwrap();
    let w = user_writer(tmp.path(), 2);
    assert_eq!(
        w.write("alice", &version(1)).unwrap(),
        WriteOutcome::Written
    );
    let path = tmp.path().join("alice");
    assert_eq!(read(&path), render(&version(1)));
    assert_eq!(parse(&read(&path)), Ok(version(1)));
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, FILE_MODE);
    // The first write has nothing to back up; nothing else is left in the directory.
    assert_eq!(entries(tmp.path()), ["alice"]);
}

#[test]
fn unsafe_names_are_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let long = "x".repeat(65);
    for (kind, field) in [(Kind::User, "username"), (Kind::Group, "groupname")] {
        let w = Writer::new(tmp.path(), kind, 2).unwrap();
        for bad in [
            "",
            "../etc/passwd",
            "a/b",
            ".hidden",
            ".backups",
            "-rf",
            "a\nb",
            "a\0b",
            &long,
        ] {
            match w.write(bad, &version(1)) {
                Err(WriteError::Name(e)) => assert_eq!(e.field, field, "{bad:?}"),
                other => panic!("{bad:?}: {other:?}"),
            }
            assert!(matches!(w.remove(bad), Err(WriteError::Name(_))), "{bad:?}");
            assert!(matches!(
                w.validate_only(bad, &version(1)),
                Err(WriteError::Name(_))
            ));
        }
    }
    assert!(entries(tmp.path()).is_empty());
    // 64 bytes is still accepted.
    let w = user_writer(tmp.path(), 0);
    assert_eq!(
        w.write(&"x".repeat(64), &version(1)).unwrap(),
        WriteOutcome::Written
    );
}

#[test]
fn invalid_models_are_refused_before_the_disk_is_touched() {
    let tmp = tempfile::tempdir().unwrap();
    let w = user_writer(tmp.path(), 2);
    w.write("alice", &version(1)).unwrap();
    let bad = PerUserConfig {
        iroutes: vec!["10.0.0.1/8".parse().unwrap()],
        ..version(2)
    };
    match w.write("alice", &bad) {
        Err(WriteError::Config(PerUserError::Invalid { key, reason, .. })) => {
            assert_eq!(key, "iroute");
            assert!(reason.contains("host bits"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let bad_dns = PerUserConfig {
        dns: vec!["0.0.0.0".parse().unwrap()],
        ..version(2)
    };
    let e = w.write("alice", &bad_dns).unwrap_err().to_string();
    assert!(e.contains("invalid dns") && e.contains("unicast"), "{e}");
    assert_eq!(read(&tmp.path().join("alice")), render(&version(1)));
    assert_eq!(entries(tmp.path()), ["alice"]);
}

#[test]
fn unchanged_content_touches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let w = user_writer(tmp.path(), 2);
    w.write("alice", &version(1)).unwrap();
    let path = tmp.path().join("alice");
    let before = fs::metadata(&path).unwrap();
    // Long enough for a rewrite to show in the nanosecond mtime on any file system we use.
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(
        w.write("alice", &version(1)).unwrap(),
        WriteOutcome::Unchanged
    );
    let after = fs::metadata(&path).unwrap();
    assert_eq!(before.ino(), after.ino());
    assert_eq!(before.modified().unwrap(), after.modified().unwrap());
    assert_eq!(entries(tmp.path()), ["alice"], "no backup, no temp file");
    // A changed model is written.
    assert_eq!(
        w.write("alice", &version(2)).unwrap(),
        WriteOutcome::Written
    );
    assert_ne!(fs::metadata(&path).unwrap().ino(), before.ino());
}

#[test]
fn backups_rotate_newest_first_and_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let w = user_writer(tmp.path(), 3);
    for n in 1..=5 {
        w.write("alice", &version(n)).unwrap();
    }
    w.write("bob", &version(7)).unwrap();
    assert_eq!(read(&tmp.path().join("alice")), render(&version(5)));
    for (k, n) in [(1, 4), (2, 3), (3, 2)] {
        assert_eq!(
            read(&w.backup_path("alice", k)),
            render(&version(n)),
            ".{k}"
        );
    }
    assert_eq!(
        entries(&tmp.path().join(BACKUP_DIR)),
        ["alice.1", "alice.2", "alice.3"]
    );
    assert_eq!(entries(tmp.path()), [BACKUP_DIR, "alice", "bob"]);
    let mode = fs::metadata(tmp.path().join(BACKUP_DIR)).unwrap().mode();
    assert_eq!(mode & 0o7777 & !BACKUP_DIR_MODE, 0, "{mode:o}");
}

#[test]
fn no_backups_means_no_backup_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let w = user_writer(tmp.path(), 0);
    w.write("alice", &version(1)).unwrap();
    w.write("alice", &version(2)).unwrap();
    assert_eq!(w.remove("alice").unwrap(), RemoveOutcome::Removed);
    assert!(entries(tmp.path()).is_empty());
    assert!(matches!(
        Writer::new(tmp.path(), Kind::User, MAX_BACKUPS + 1),
        Err(WriteError::TooManyBackups(65))
    ));
}

#[test]
fn remove_keeps_the_file_as_the_newest_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let w = Writer::new(tmp.path(), Kind::Group, 2).unwrap();
    w.write("staff", &version(1)).unwrap();
    w.write("staff", &version(2)).unwrap();
    assert_eq!(w.remove("staff").unwrap(), RemoveOutcome::Removed);
    assert!(!tmp.path().join("staff").exists());
    assert_eq!(read(&w.backup_path("staff", 1)), render(&version(2)));
    assert_eq!(read(&w.backup_path("staff", 2)), render(&version(1)));
    assert_eq!(w.remove("staff").unwrap(), RemoveOutcome::Absent);
    assert_eq!(entries(tmp.path()), [BACKUP_DIR]);
}

#[test]
fn empty_model_writes_a_header_only_file() {
    let tmp = tempfile::tempdir().unwrap();
    let w = user_writer(tmp.path(), 1);
    assert_eq!(
        w.write("alice", &PerUserConfig::default()).unwrap(),
        WriteOutcome::Written
    );
    assert_eq!(read(&tmp.path().join("alice")), HEADER);
}

#[test]
fn a_missing_directory_is_named_in_the_error() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("per-user");
    let w = user_writer(&missing, 2);
    let e = w.write("alice", &version(1)).unwrap_err();
    assert!(
        matches!(&e, WriteError::Dir { dir, .. } if *dir == missing),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains(&*missing.to_string_lossy()) && msg.contains("does not exist"),
        "{msg}"
    );
    assert!(matches!(w.remove("alice"), Err(WriteError::Dir { .. })));
    // Validation alone does not need the directory.
    assert_eq!(
        w.validate_only("alice", &version(1)).unwrap(),
        render(&version(1))
    );
    assert!(!missing.exists());

    let file = tmp.path().join("plain-file");
    fs::write(&file, "x").unwrap();
    let e = user_writer(&file, 2)
        .write("alice", &version(1))
        .unwrap_err();
    assert!(e.to_string().contains("is not a directory"), "{e}");
}

#[test]
fn a_backup_path_that_is_not_a_directory_leaves_the_file_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let w = user_writer(tmp.path(), 2);
    w.write("alice", &version(1)).unwrap();
    fs::write(tmp.path().join(BACKUP_DIR), "not a dir").unwrap();
    let e = w.write("alice", &version(2)).unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");
    assert_eq!(read(&tmp.path().join("alice")), render(&version(1)));
    assert_eq!(
        entries(tmp.path()),
        [BACKUP_DIR, "alice"],
        "no temp file left"
    );
}

/// A step of the write that [`Faulty`] makes fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Every temp name is taken.
    TempExists,
    /// The disk fills after half the content is written.
    PartialWrite,
    /// Linking the current file into the backup ring.
    Link,
    /// Renaming the temp file over the target (after it was written and fsynced).
    Rename,
    /// fsync of the config directory after the rename.
    SyncDir,
}

/// The real file system, failing at one step and recording what it removed.
struct Faulty {
    fail: Step,
    removed: RefCell<Vec<PathBuf>>,
}

impl Faulty {
    fn new(fail: Step) -> Self {
        Faulty {
            fail,
            removed: RefCell::default(),
        }
    }
}

fn injected() -> io::Error {
    io::Error::other("injected failure")
}

impl Fs for Faulty {
    fn is_dir(&self, path: &Path) -> io::Result<bool> {
        OsFs.is_dir(path)
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        OsFs.exists(path)
    }
    fn read(&self, path: &Path, limit: u64) -> io::Result<Option<Vec<u8>>> {
        OsFs.read(path, limit)
    }
    fn write_new(&self, path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
        match self.fail {
            Step::TempExists => Err(io::ErrorKind::AlreadyExists.into()),
            Step::PartialWrite => {
                OsFs.write_new(path, &contents[..contents.len() / 2], mode)?;
                Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "injected: disk full",
                ))
            }
            _ => OsFs.write_new(path, contents, mode),
        }
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        // Only the rename of the temp file over the target; backup rotation goes through.
        let is_temp = from.to_string_lossy().contains(".tmp.");
        if self.fail == Step::Rename && is_temp {
            return Err(injected());
        }
        OsFs.rename(from, to)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        if self.fail == Step::Link {
            return Err(injected());
        }
        OsFs.hard_link(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.removed.borrow_mut().push(path.to_owned());
        OsFs.remove_file(path)
    }
    fn create_dir(&self, path: &Path, mode: u32) -> io::Result<()> {
        OsFs.create_dir(path, mode)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        if self.fail == Step::SyncDir && path.file_name() != Some(BACKUP_DIR.as_ref()) {
            return Err(injected());
        }
        OsFs.sync_dir(path)
    }
}

/// Writes version 1 for real, then version 2 through a file system failing at `step`.
fn fail_second_write(step: Step) -> (tempfile::TempDir, WriteError) {
    let tmp = tempfile::tempdir().unwrap();
    user_writer(tmp.path(), 2)
        .write("alice", &version(1))
        .unwrap();
    let w = Writer::with_fs(tmp.path(), Kind::User, 2, Faulty::new(step)).unwrap();
    let e = w.write("alice", &version(2)).unwrap_err();
    (tmp, e)
}

fn assert_old_file_intact_and_no_temp(dir: &Path) {
    assert_eq!(read(&dir.join("alice")), render(&version(1)));
    let left: Vec<String> = entries(dir)
        .into_iter()
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(left.is_empty(), "temp files left: {left:?}");
}

#[test]
fn a_failure_between_write_and_rename_leaves_the_old_file_and_no_temp() {
    let (tmp, e) = fail_second_write(Step::Rename);
    assert!(
        matches!(&e, WriteError::Io { op: "rename temp file over", path, .. } if *path == tmp.path().join("alice")),
        "{e:?}"
    );
    assert_old_file_intact_and_no_temp(tmp.path());
}

#[test]
fn a_partial_temp_write_is_removed_and_the_old_file_stays() {
    let (tmp, e) = fail_second_write(Step::PartialWrite);
    assert!(
        matches!(
            &e,
            WriteError::Io {
                op: "write temp file",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("disk full"), "{e}");
    assert_old_file_intact_and_no_temp(tmp.path());
    // No backup was taken for a write that never got going.
    assert!(!tmp.path().join(BACKUP_DIR).exists());
}

#[test]
fn a_failed_backup_link_leaves_the_old_file_and_no_temp() {
    let (tmp, e) = fail_second_write(Step::Link);
    assert!(
        matches!(
            &e,
            WriteError::Io {
                op: "link backup",
                ..
            }
        ),
        "{e:?}"
    );
    assert_old_file_intact_and_no_temp(tmp.path());
}

#[test]
fn temp_names_taken_by_someone_else_are_never_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = Faulty::new(Step::TempExists);
    let w = Writer::with_fs(tmp.path(), Kind::User, 2, fs).unwrap();
    let e = w.write("alice", &version(1)).unwrap_err();
    assert!(
        matches!(
            &e,
            WriteError::Io {
                op: "create temp file",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(w.fs.removed.borrow().is_empty(), "{:?}", w.fs.removed);
    assert!(entries(tmp.path()).is_empty());
}

#[test]
fn a_failed_directory_fsync_is_reported_with_the_new_file_in_place() {
    let (tmp, e) = fail_second_write(Step::SyncDir);
    assert!(
        matches!(
            &e,
            WriteError::Io {
                op: "fsync directory",
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(read(&tmp.path().join("alice")), render(&version(2)));
    assert_eq!(entries(tmp.path()), [BACKUP_DIR, "alice"]);
}
