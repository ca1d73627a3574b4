//! `ConfigWriter` in a running agent (on a fake ocserv control socket, no real ocserv needed):
//! `Apply` writes exactly `peruser::render` of the model, atomically and only on change;
//! unsafe names are refused and nothing is written; a missing directory is an error, not a
//! crash; the local policy's routes become files at start and follow SIGHUP (a broken file
//! keeps the old policy and files, and stops a start with exit 64); killing and panicking the
//! writer during a burst of writes leaves every caller answered and every file complete.
//!
//! Hermetic: the configuration is the embedded defaults with every path in a fresh temporary
//! directory; neither the machine's configuration file nor `OCSERV_AGENT__*` variables are read.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ocserv_agent::actors::config_writer::{self, model_of};
use ocserv_agent::actors::{Child, CONFIG_WRITER};
use ocserv_agent::app::Agent;
use ocserv_agent::config::{load_with_env, Config, Loaded};
use ocserv_agent::messages::{WriteFailure, WriteFailureCause};
use ocserv_agent::ocserv::fake::FakeOcserv;
use ocserv_agent::peruser::write::{RemoveOutcome, WriteOutcome, BACKUP_DIR};
use ocserv_agent::peruser::{parse, render, Kind, PerUserConfig};
use support::agent;

/// The bound of a call to the writer: not a speed target. Generous, because every write is
/// fsynced and a CI machine running the whole suite can stall fsync for seconds; a call lost
/// with a crashed writer still fails at this bound.
const CALL: Duration = Duration::from_secs(10);

/// A fake ocserv and a temporary directory holding every path of the agent.
struct Setup {
    _fake: FakeOcserv,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        Setup {
            _fake: FakeOcserv::with_sessions(vec![]),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn users(&self) -> PathBuf {
        self.dir.path().join("users")
    }

    fn groups(&self) -> PathBuf {
        self.dir.path().join("groups")
    }

    fn policy(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    /// The embedded defaults pointed at the fake and the temporary directory, with both
    /// config directories created and set.
    fn config(&self) -> Config {
        let mut c = agent::config_in(self.dir.path(), self._fake.socket());
        c.ocserv.reconcile_interval = Duration::from_millis(300);
        std::fs::create_dir_all(self.users()).unwrap();
        std::fs::create_dir_all(self.groups()).unwrap();
        c.config_writer.per_user_dir = Some(self.users());
        c.config_writer.per_group_dir = Some(self.groups());
        c
    }

    /// A configuration file equal to [`Setup::config`] with `local_policy.path` set, for
    /// SIGHUP reloads.
    fn config_file(&self) -> PathBuf {
        let file = self.dir.path().join("agent.toml");
        let text = format!(
            "[agent]\nstate_dir = {:?}\n\n\
             [ocserv]\ncontrol_socket = {:?}\nreconcile_interval = \"300ms\"\n\n\
             [grpc]\nsocket = {:?}\n\n[hook]\nsocket = {:?}\n\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\n[supervisor]\nrestart_intensity = 1000\n\n\
             [local_policy]\npath = {:?}\n\n\
             [config_writer]\nper_user_dir = {:?}\nper_group_dir = {:?}\n",
            self.dir.path().join("state").display().to_string(),
            self._fake.socket().display().to_string(),
            self.dir.path().join("agent.sock").display().to_string(),
            self.dir.path().join("hook.sock").display().to_string(),
            self.policy().display().to_string(),
            self.users().display().to_string(),
            self.groups().display().to_string(),
        );
        std::fs::create_dir_all(self.users()).unwrap();
        std::fs::create_dir_all(self.groups()).unwrap();
        std::fs::write(&file, text).unwrap();
        file
    }
}

fn model(routes: &[&str], dns: &[&str]) -> PerUserConfig {
    PerUserConfig {
        routes: routes.iter().map(|r| r.parse().unwrap()).collect(),
        dns: dns.iter().map(|d| d.parse().unwrap()).collect(),
        ..PerUserConfig::default()
    }
}

async fn apply(kind: Kind, name: &str, m: &PerUserConfig) -> Result<WriteOutcome, WriteFailure> {
    config_writer::apply(kind, name, m, CALL)
        .await
        .expect("the writer answers within the call timeout")
}

/// The names in `dir` other than the backup directory, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != BACKUP_DIR)
        .collect();
    names.sort();
    names
}

async fn metrics_text(a: &Agent) -> String {
    agent::http_get(a.metrics_addr, "/metrics").await.1
}

fn writes(text: &str, kind: &str, status: &str) -> f64 {
    let prefix = format!("ocserv_agent_config_writes_total{{kind=\"{kind}\",status=\"{status}\"}}");
    agent::metric(text, &prefix).unwrap_or(0.0)
}

/// Polls until `path` holds exactly `text`.
async fn wait_content(path: &Path, text: &str) {
    let what = format!("{} to hold\n{text}", path.display());
    agent::wait_for(&what, Duration::from_secs(10), || async {
        (std::fs::read_to_string(path).ok().as_deref() == Some(text)).then_some(())
    })
    .await
}

async fn wait_absent(path: &Path) {
    let what = format!("{} to be removed", path.display());
    agent::wait_for(&what, Duration::from_secs(10), || async {
        (!path.exists()).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_writes_the_rendered_file_once_and_removes_it() {
    let s = Setup::new();
    let a = agent::start(s.config()).await;

    let m = model(&["10.10.0.0/16", "fd00::/64"], &["10.10.0.53"]);
    assert_eq!(
        apply(Kind::User, "alice", &m).await,
        Ok(WriteOutcome::Written)
    );
    let path = s.users().join("alice");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, render(&m), "the file is exactly the rendered model");
    assert_eq!(parse(&text).unwrap(), m);
    assert_eq!(entries(&s.users()), ["alice"], "no temp file left behind");

    assert_eq!(
        apply(Kind::User, "alice", &m).await,
        Ok(WriteOutcome::Unchanged)
    );
    let m2 = model(&["10.11.0.0/16"], &[]);
    assert_eq!(
        apply(Kind::User, "alice", &m2).await,
        Ok(WriteOutcome::Written)
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), render(&m2));
    let backup = s.users().join(BACKUP_DIR).join("alice.1");
    assert_eq!(std::fs::read_to_string(backup).unwrap(), render(&m));

    let g = model(&["10.20.0.0/16"], &[]);
    assert_eq!(
        apply(Kind::Group, "staff", &g).await,
        Ok(WriteOutcome::Written)
    );
    assert_eq!(
        std::fs::read_to_string(s.groups().join("staff")).unwrap(),
        render(&g)
    );
    assert_eq!(
        entries(&s.users()),
        ["alice"],
        "a group file goes to the group directory"
    );

    let removed = config_writer::remove(Kind::User, "alice", CALL)
        .await
        .unwrap();
    assert_eq!(removed, Ok(RemoveOutcome::Removed));
    assert!(!path.exists());
    let again = config_writer::remove(Kind::User, "alice", CALL)
        .await
        .unwrap();
    assert_eq!(again, Ok(RemoveOutcome::Absent));

    let text = metrics_text(&a).await;
    assert_eq!(writes(&text, "user", "written"), 2.0, "{text}");
    assert_eq!(writes(&text, "user", "unchanged"), 2.0, "{text}");
    assert_eq!(writes(&text, "user", "removed"), 1.0, "{text}");
    assert_eq!(writes(&text, "group", "written"), 1.0, "{text}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_names_and_invalid_models_are_refused_and_nothing_is_written() {
    let s = Setup::new();
    let a = agent::start(s.config()).await;
    let m = model(&["10.10.0.0/16"], &[]);
    let long = "a".repeat(65);
    let cases: [(&str, &str); 7] = [
        ("../x", "must not start with '-' or '.'"),
        ("-x", "must not start with '-' or '.'"),
        (".x", "must not start with '-' or '.'"),
        (&long, "65 bytes long, the limit is 64"),
        ("a/b", "'/'"),
        ("a\nb", "'\\n'"),
        ("", "must not be empty"),
    ];
    for (name, why) in cases {
        for kind in [Kind::User, Kind::Group] {
            let f = apply(kind, name, &m).await.unwrap_err();
            assert_eq!(f.cause, WriteFailureCause::Refused, "{name:?}: {f}");
            assert_eq!((f.kind, f.name.as_str()), (kind, name));
            let field = if kind == Kind::User {
                "username"
            } else {
                "groupname"
            };
            let msg = f.to_string();
            assert!(msg.contains(field) && msg.contains(why), "{name:?}: {msg}");
        }
        let r = config_writer::remove(Kind::User, name, CALL).await.unwrap();
        assert_eq!(r.unwrap_err().cause, WriteFailureCause::Refused);
    }
    // A network with host bits and a repeated route: refused naming the key.
    let mut bad = model(&["10.10.0.0/16", "10.10.0.0/16"], &[]);
    let f = apply(Kind::User, "alice", &bad).await.unwrap_err();
    assert_eq!(f.cause, WriteFailureCause::Refused);
    assert!(f.to_string().contains("route"), "{f}");
    bad.routes = vec!["10.10.0.1/16".parse().unwrap()];
    let f = apply(Kind::User, "alice", &bad).await.unwrap_err();
    assert!(f.to_string().contains("route"), "{f}");

    assert!(entries(&s.users()).is_empty(), "nothing written");
    assert!(entries(&s.groups()).is_empty(), "nothing written");
    assert!(!s.dir.path().join("x").exists() && !s.users().join("a").exists());
    let text = metrics_text(&a).await;
    assert_eq!(writes(&text, "user", "refused"), 16.0, "{text}");
    assert_eq!(writes(&text, "group", "refused"), 7.0, "{text}");
    assert_eq!(writes(&text, "user", "written"), 0.0, "{text}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_directory_is_an_error_until_created_and_an_unset_one_is_disabled() {
    let s = Setup::new();
    let mut c = s.config();
    let later = s.dir.path().join("later");
    c.config_writer.per_user_dir = Some(later.clone());
    c.config_writer.per_group_dir = None;
    let a = agent::start(c).await;
    let m = model(&["10.10.0.0/16"], &[]);

    let f = apply(Kind::User, "alice", &m).await.unwrap_err();
    assert_eq!(f.cause, WriteFailureCause::Io);
    let msg = f.to_string();
    assert!(
        msg.contains(&later.display().to_string()) && msg.contains("does not exist"),
        "{msg}"
    );
    std::fs::create_dir(&later).unwrap();
    assert_eq!(
        apply(Kind::User, "alice", &m).await,
        Ok(WriteOutcome::Written)
    );
    assert_eq!(
        std::fs::read_to_string(later.join("alice")).unwrap(),
        render(&m)
    );

    // Disabled: checked, then answered without touching any disk.
    assert_eq!(
        apply(Kind::Group, "staff", &m).await,
        Ok(WriteOutcome::Unchanged)
    );
    let f = apply(Kind::Group, "../staff", &m).await.unwrap_err();
    assert_eq!(f.cause, WriteFailureCause::Refused);
    assert!(entries(&s.groups()).is_empty());

    let text = metrics_text(&a).await;
    assert_eq!(writes(&text, "user", "error"), 1.0, "{text}");
    assert_eq!(writes(&text, "user", "written"), 1.0, "{text}");
    assert_eq!(writes(&text, "group", "unchanged"), 1.0, "{text}");
    assert!(
        ractor::registry::where_is(CONFIG_WRITER).is_some(),
        "a failed write does not stop the writer"
    );
    a.shutdown().await;
}

const POLICY_V1: &str = r#"
default = "deny"
[users.alice]
allow = true
routes = ["10.10.0.0/16"]
dns = ["10.10.0.53"]
[users.bob]
allow = false
routes = ["10.99.0.0/16"]
[users.carol]
allow = true
[groups.staff]
allow = true
routes = ["10.20.0.0/16"]
no_routes = ["10.20.9.0/24"]
"#;

const POLICY_V2: &str = r#"
default = "deny"
[users.alice]
allow = true
routes = ["10.12.0.0/16"]
[users.dave]
allow = true
dns = ["10.10.0.54"]
[groups.staff]
allow = true
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_policy_files_exist_after_start_and_follow_sighup() {
    let s = Setup::new();
    std::fs::write(s.policy(), POLICY_V1).unwrap();
    let file = s.config_file();
    let load = {
        let file = file.clone();
        move || -> Result<Loaded, _> { load_with_env(Some(&file), &[]) }
    };
    let a = agent::start(load().unwrap().config).await;
    let v1 = ocserv_agent::policy::local::parse(POLICY_V1, "v1").unwrap();
    assert_eq!(*a.ctx.local_policy(), v1);

    let alice = model_of(&v1.users()["alice"]);
    let staff = model_of(&v1.groups()["staff"]);
    wait_content(&s.users().join("alice"), &render(&alice)).await;
    wait_content(&s.groups().join("staff"), &render(&staff)).await;
    assert_eq!(parse(&render(&staff)).unwrap().no_routes.len(), 1);
    assert_eq!(
        entries(&s.users()),
        ["alice"],
        "a denial and an admission without routes or DNS get no file"
    );

    // SIGHUP with a changed policy: rewritten, added, and removed where routes went away.
    std::fs::write(s.policy(), POLICY_V2).unwrap();
    let no_level = |_: &str| Ok(());
    ocserv_agent::app::reload(&a.ctx, load.clone(), &no_level)
        .await
        .expect("the configuration is unchanged and valid");
    let v2 = ocserv_agent::policy::local::parse(POLICY_V2, "v2").unwrap();
    assert_eq!(*a.ctx.local_policy(), v2);
    let alice2 = model_of(&v2.users()["alice"]);
    let dave = model_of(&v2.users()["dave"]);
    wait_content(&s.users().join("alice"), &render(&alice2)).await;
    wait_content(&s.users().join("dave"), &render(&dave)).await;
    wait_absent(&s.groups().join("staff")).await;
    assert_eq!(entries(&s.users()), ["alice", "dave"]);

    // SIGHUP with a broken policy: the old policy and its files stay, and it is counted.
    std::fs::write(
        s.policy(),
        "default = \"deny\"\n[users.eve]\nallow = true\nroutes = [\"10.0.0/8\"]\n",
    )
    .unwrap();
    ocserv_agent::app::reload(&a.ctx, load.clone(), &no_level)
        .await
        .expect("the configuration itself is still valid");
    assert_eq!(*a.ctx.local_policy(), v2, "the running policy is kept");
    let err = ocserv_agent::app::reload_local_policy(&a.ctx)
        .await
        .unwrap_err();
    assert!(
        err.contains(&s.policy().display().to_string()) && err.contains("users.eve.routes[0]"),
        "{err}"
    );
    // The writer still answers, and the old policy's files are untouched.
    let probe = model(&["10.77.0.0/16"], &[]);
    assert_eq!(
        apply(Kind::User, "probe", &probe).await,
        Ok(WriteOutcome::Written)
    );
    assert_eq!(entries(&s.users()), ["alice", "dave", "probe"]);
    assert_eq!(
        std::fs::read_to_string(s.users().join("alice")).unwrap(),
        render(&alice2)
    );
    let text = metrics_text(&a).await;
    let reloads = |status: &str| {
        let prefix = format!("ocserv_agent_local_policy_reloads_total{{status=\"{status}\"}}");
        agent::metric(&text, &prefix).unwrap_or(0.0)
    };
    assert_eq!((reloads("ok"), reloads("error")), (1.0, 2.0), "{text}");

    // A restarted writer re-syncs the policy in force: a file deleted by hand comes back.
    std::fs::remove_file(s.users().join("dave")).unwrap();
    let old = Child::ConfigWriter.strike(false).expect("running");
    agent::wait_for("the writer to restart", Duration::from_secs(10), || async {
        ractor::registry::where_is(CONFIG_WRITER)
            .filter(|c| c.get_id() != old)
            .map(|_| ())
    })
    .await;
    wait_content(&s.users().join("dave"), &render(&dave)).await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_policy_file_stops_the_start_naming_the_file() {
    let s = Setup::new();
    std::fs::write(s.policy(), "default = \"maybe\"\n").unwrap();
    let mut c = s.config();
    c.local_policy.path = Some(s.policy());
    let e = match ocserv_agent::app::start(c).await {
        Ok(_) => panic!("an invalid policy file must stop the start"),
        Err(e) => e,
    };
    let msg = format!("{e:#}");
    assert!(
        msg.contains(&s.policy().display().to_string()) && msg.contains("default"),
        "{msg}"
    );
    assert!(!s.dir.path().join("agent.sock").exists(), "nothing bound");

    // The binary exits 64, like any invalid configuration.
    let file = s.config_file();
    let mut cmd = agent::agent_cmd(s.dir.path(), &["--config", file.to_str().unwrap(), "run"]);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the agent kept running with an invalid policy file");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&s.policy().display().to_string()),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_and_panicking_the_writer_during_a_burst_leaves_complete_files() {
    let s = Setup::new();
    let a = agent::start(s.config()).await;
    const NAMES: usize = 6;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));

    // Writers: each task cycles through names and ever-changing models.
    let mut burst = Vec::new();
    for t in 0..4u32 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        burst.push(tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("u{}", (i as usize + t as usize) % NAMES);
                let kind = if i % 5 == 0 { Kind::Group } else { Kind::User };
                let routes: Vec<String> = (0..1 + (i % 40))
                    .map(|r| format!("10.{t}.{}.0/24", (i + r) % 256))
                    .collect();
                let refs: Vec<&str> = routes.iter().map(String::as_str).collect();
                let m = model(&refs, &["10.0.0.53"]);
                let answered = tokio::time::timeout(
                    CALL + Duration::from_secs(1),
                    config_writer::apply(kind, &name, &m, CALL),
                )
                .await
                .expect("an Apply hung past the call timeout");
                match answered {
                    Ok(Ok(_)) => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(Err(f)) => {
                        eprintln!("apply answered with {f}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("apply call failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                i += 1;
            }
        }));
    }

    // A reader: every file ocserv could open at any instant is complete.
    let reader = {
        let (stop, users, groups) = (stop.clone(), s.users(), s.groups());
        tokio::task::spawn_blocking(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for dir in [&users, &groups] {
                    for name in entries(dir).into_iter().filter(|n| !n.starts_with('.')) {
                        let Ok(text) = std::fs::read_to_string(dir.join(&name)) else {
                            continue; // never removed here; only a race with listing
                        };
                        let parsed = parse(&text).unwrap_or_else(|e| {
                            panic!("{name}: incomplete or invalid file ({e}):\n{text}")
                        });
                        assert!(!parsed.routes.is_empty(), "{name}: no routes:\n{text}");
                        reads += 1;
                    }
                }
            }
            reads
        })
    };

    for round in 0..10 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let old = Child::ConfigWriter
            .strike(round % 2 == 1)
            .expect("the writer is running before each strike");
        agent::wait_for("the writer to restart", Duration::from_secs(10), || async {
            ractor::registry::where_is(CONFIG_WRITER)
                .filter(|c| c.get_id() != old)
                .map(|_| ())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    for b in burst {
        b.await.expect("burst task");
    }
    let reads = reader.await.expect("reader");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("applies ok={ok} failed={failed} reads={reads}");
    assert!(ok > 20, "the burst made progress: {ok}");
    // A caller whose request died queued with a crashed writer gets it resent to the next one
    // (an Apply is idempotent); one in flight is answered by its write task.
    assert_eq!(
        failed, 0,
        "applies answered with an error across the crashes"
    );
    assert!(reads > 0, "the reader saw files");

    // Settled: a last write per name lands, every file is exactly its last model, and no temp
    // file is left in either directory.
    let last = model(&["10.200.0.0/16"], &["10.0.0.54"]);
    for n in 0..NAMES {
        let name = format!("u{n}");
        for kind in [Kind::User, Kind::Group] {
            assert!(apply(kind, &name, &last).await.is_ok());
        }
    }
    for dir in [s.users(), s.groups()] {
        let names = entries(&dir);
        assert!(
            names.iter().all(|n| !n.starts_with('.')),
            "temp files left in {}: {names:?}",
            dir.display()
        );
        for n in &names {
            assert_eq!(std::fs::read_to_string(dir.join(n)).unwrap(), render(&last));
        }
    }
    let text = metrics_text(&a).await;
    let restarts = agent::metric(
        &text,
        "ocserv_agent_actor_restarts_total{actor=\"config_writer\"}",
    );
    assert_eq!(restarts, Some(10.0), "{text}");
    a.shutdown().await;
}
