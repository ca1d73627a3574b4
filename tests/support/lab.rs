//! A real ocserv test lab on one machine: ocserv in one network namespace, openconnect clients
//! in another, joined by a veth pair (reference/ocserv.md §7).
//!
//! Inputs: [`LabOptions`] (users, `max-clients`, optional connect/disconnect scripts or the
//! shipped hook, raw extra `ocserv.conf` lines). Needs root and the binaries `ocserv`, `occtl`,
//! `ocpasswd`, `certtool`, `openconnect`, `ip` and `ping`.
//!
//! Outputs: a running [`Lab`] (its own temp dir with a throwaway CA and server certificate, a
//! plain-auth passwd file, config-per-user/group dirs, the occtl socket and ocserv's log) and
//! [`Client`]s (openconnect processes whose tun devices live in the client namespace).
//!
//! Isolation: tests run in parallel in separate processes, so each lab takes a numbered slot
//! `N`. The slot lock is an abstract Unix socket `ocserv-agent-lab-slot-N` bound by the owning
//! process: binding is atomic and the kernel releases it when the owner dies, even by SIGKILL,
//! so a crashed test never leaks a slot. The visible marker `/tmp/ocserv-agent-lab/slot-N.lock`
//! holds the owner's pid and is removed on drop. Everything else derives from `N`: namespaces
//! `oalabN-srv`/`oalabN-cli`, veth `oalNs`/`oalNc`, veth network `10.231.N.0/24`, VPN pool
//! `10.232.N.0/24`, tun prefix `oaNt`. A slot left behind by a dead owner is cleaned up (its
//! processes killed, its namespaces deleted) before reuse.
//!
//! Safety of the host: clients use a tiny `--script` that only configures their tun device, so
//! the host's resolv.conf and routes are never touched, whatever routes and DNS ocserv pushes;
//! all addresses exist only inside the lab's namespaces.
//!
//! Failure behaviour: every wait polls with a deadline and fails with an error naming what was
//! awaited plus the relevant log tail. `Drop` never panics: it kills the lab's clients and ocserv
//! by pid (SIGTERM, then SIGKILL), kills whatever is left in the two namespaces, deletes them and
//! removes the temp dir, also when the test panics.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{SocketAddr as UnixSocketAddr, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use eyre::{bail, eyre, Result, WrapErr};
use ipnet::Ipv4Net;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where the visible slot markers live.
const SLOT_DIR: &str = "/tmp/ocserv-agent-lab";
/// Number of slots; each maps to one /24 in 10.231/16 and 10.232/16.
const SLOTS: u32 = 200;
/// Each server has its own network namespace, so one port fits all labs.
const PORT: u16 = 4443;
/// How long `start`/`start_ocserv` wait for the occtl socket to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `connect` waits for a client to be fully connected.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for one helper command (occtl has no timeout of its own).
const CMD_TIMEOUT: Duration = Duration::from_secs(15);
/// Poll interval of every wait.
const POLL: Duration = Duration::from_millis(50);

/// One plain-auth user of the lab.
#[derive(Debug, Clone)]
pub struct LabUser {
    pub name: String,
    pub password: String,
    pub group: Option<String>,
}

impl LabUser {
    pub fn new(name: &str, password: &str) -> Self {
        LabUser {
            name: name.to_owned(),
            password: password.to_owned(),
            group: None,
        }
    }

    pub fn in_group(mut self, g: &str) -> Self {
        self.group = Some(g.to_owned());
        self
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub users: Vec<LabUser>,
    /// `max-clients` (default 64).
    pub max_clients: u32,
    /// Raw `ocserv.conf` lines appended after the generated ones. For scalar keys the later
    /// line wins (verified with `max-same-clients = 1`), so these can override lab defaults.
    pub extra_config: Vec<String>,
    /// Written as `connect-script = PATH` when set (ocserv runs it as root, no arguments).
    pub connect_script: Option<PathBuf>,
    /// Written as `disconnect-script = PATH` when set.
    pub disconnect_script: Option<PathBuf>,
    /// Environment variables ocserv is started with (its scripts inherit them).
    pub env: Vec<(String, String)>,
    /// The built hook program (`ocserv-agent-hook`). When set, the shipped `/bin/sh` wrapper is
    /// installed beside a link to it in the lab dir's `bin/` ([`super::hook::install`]) and runs
    /// as connect- and disconnect-script (replacing `connect_script` and `disconnect_script`),
    /// asking on `hook.sock` in the lab dir (`OCSERV_AGENT_HOOK_SOCKET` in ocserv's
    /// environment, see [`super::hook::socket`]) with a 3 s deadline. Everything stays in the
    /// lab dir, so it goes away with the lab.
    pub hook: Option<PathBuf>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            users: Vec::new(),
            max_clients: 64,
            extra_config: Vec::new(),
            connect_script: None,
            disconnect_script: None,
            env: Vec::new(),
            hook: None,
        }
    }
}

/// The slot lock: an abstract Unix socket (released by the kernel when the owner dies) plus a
/// visible marker file with the owner's pid (removed on drop).
struct Slot {
    index: u32,
    file: PathBuf,
    _lock: UnixListener,
}

impl Slot {
    fn lock_name(index: u32) -> String {
        format!("ocserv-agent-lab-slot-{index}")
    }

    fn file_for(index: u32) -> PathBuf {
        Path::new(SLOT_DIR).join(format!("slot-{index}.lock"))
    }

    /// Tries to take slot `index`; `Ok(None)` when another live process holds it.
    fn try_lock(index: u32) -> Result<Option<UnixListener>> {
        let addr = UnixSocketAddr::from_abstract_name(Self::lock_name(index).as_bytes())
            .wrap_err("building the abstract slot socket address")?;
        match UnixListener::bind_addr(&addr) {
            Ok(l) => Ok(Some(l)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(None),
            Err(e) => Err(eyre!("binding slot lock socket for slot {index}: {e}")),
        }
    }

    fn acquire() -> Result<Slot> {
        fs::create_dir_all(SLOT_DIR).wrap_err_with(|| format!("creating {SLOT_DIR}"))?;
        reclaim_stale_slots();
        // Start at a pid-derived index so parallel test processes rarely probe the same slots.
        let start = std::process::id() % SLOTS;
        for i in 0..SLOTS {
            let index = (start + i) % SLOTS;
            if let Some(lock) = Self::try_lock(index)? {
                // A previous owner may have died without cleaning up: its namespaces and
                // processes belong to this slot, which is now ours.
                cleanup_slot_resources(index);
                let file = Self::file_for(index);
                fs::write(&file, format!("{}\n", std::process::id()))
                    .wrap_err_with(|| format!("writing slot marker {}", file.display()))?;
                return Ok(Slot {
                    index,
                    file,
                    _lock: lock,
                });
            }
        }
        bail!("no free lab slot: all {SLOTS} slots are held by live processes")
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.file);
    }
}

/// Cleans up slots whose marker file exists but whose lock nobody holds (owner died).
fn reclaim_stale_slots() {
    let Ok(entries) = fs::read_dir(SLOT_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(index) = name
            .to_str()
            .and_then(|n| n.strip_prefix("slot-"))
            .and_then(|n| n.strip_suffix(".lock"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(Some(_lock)) = Slot::try_lock(index) {
            cleanup_slot_resources(index);
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn slot_names(index: u32) -> (String, String, String, String) {
    (
        format!("oalab{index}-srv"),
        format!("oalab{index}-cli"),
        format!("oal{index}s"),
        format!("oal{index}c"),
    )
}

/// Kills everything in the slot's namespaces and deletes them. Errors mean "already gone".
fn cleanup_slot_resources(index: u32) {
    let (server_ns, client_ns, _, _) = slot_names(index);
    for ns in [&client_ns, &server_ns] {
        delete_namespace(ns);
    }
}

fn namespace_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

fn namespace_pids(ns: &str) -> Vec<u32> {
    let Ok(out) = output_with_timeout(Command::new("ip").args(["netns", "pids", ns]), CMD_TIMEOUT)
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|&p| p != std::process::id())
        .collect()
}

fn delete_namespace(ns: &str) {
    if !namespace_exists(ns) {
        return;
    }
    // Every process in the namespace was started by this lab (or a dead previous owner of
    // the slot): terminate them so the namespace and its veth really go away.
    let pids = namespace_pids(ns);
    for &pid in &pids {
        send_signal(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while pids.iter().any(|&p| pid_running(p)) && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
    for &pid in &pids {
        if pid_running(pid) {
            send_signal(pid, Signal::SIGKILL);
        }
    }
    let _ = output_with_timeout(Command::new("ip").args(["netns", "del", ns]), CMD_TIMEOUT);
}

/// The running lab. See the module docs.
pub struct Lab {
    /// This instance's temp dir (removed on drop).
    pub dir: PathBuf,
    /// `occtl-socket-file`.
    pub occtl_socket: PathBuf,
    pub config_per_user_dir: PathBuf,
    pub config_per_group_dir: PathBuf,
    pub server_ns: String,
    pub client_ns: String,
    /// ocserv's veth address (inside `server_ns`).
    pub server_addr: Ipv4Addr,
    /// The client namespace's veth address: what ocserv reports as the client's real IP.
    pub client_addr: Ipv4Addr,
    pub port: u16,
    /// Tun device prefix of this instance (`oaNt` → `oaNt0`, `oaNt1`, ...).
    pub device_prefix: String,
    pub vpn_network: Ipv4Net,
    pub connect_script: Option<PathBuf>,
    pub disconnect_script: Option<PathBuf>,
    pub env: Vec<(String, String)>,

    /// The ocserv.conf in use.
    pub config_file: PathBuf,
    /// The plain-auth passwd file.
    pub passwd_file: PathBuf,
    /// ocserv's stdout and stderr.
    pub ocserv_log: PathBuf,
    /// `pin-sha256:...` of the server certificate.
    pub server_pin: String,

    veth_server: String,
    veth_client: String,
    client_script: PathBuf,
    ocserv: Option<Child>,
    clients: Arc<Mutex<Vec<u32>>>,
    next_client: AtomicU32,
    // Dropped after `Drop::drop` has stopped everything: dir first, then the slot.
    tempdir: Option<tempfile::TempDir>,
    slot: Option<Slot>,
}

impl Lab {
    /// Creates the namespaces, certificates, users and config, starts ocserv and returns once
    /// `occtl show status` answers.
    pub fn start(opts: LabOptions) -> Result<Lab> {
        preflight()?;
        let slot = Slot::acquire()?;
        let n = slot.index;
        let (server_ns, client_ns, veth_server, veth_client) = slot_names(n);

        let tempdir = tempfile::Builder::new()
            .prefix(&format!("oalab{n}-"))
            .tempdir()
            .wrap_err("creating the lab temp dir")?;
        let dir = tempdir.path().to_path_buf();
        // ocserv's workers run as nobody and must reach the sockets in this dir.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .wrap_err_with(|| format!("chmod 0755 {}", dir.display()))?;

        let vpn_network = Ipv4Net::new(Ipv4Addr::new(10, 232, n as u8, 0), 24)
            .wrap_err("building the VPN network")?;
        let (mut connect_script, mut disconnect_script) =
            (opts.connect_script.clone(), opts.disconnect_script.clone());
        let mut env = opts.env.clone();
        if let Some(built) = &opts.hook {
            let wrapper = super::hook::install(&dir, built)?;
            connect_script = Some(wrapper.clone());
            disconnect_script = Some(wrapper);
            env.push((
                "OCSERV_AGENT_HOOK_SOCKET".into(),
                dir.join("hook.sock").display().to_string(),
            ));
            env.push(("OCSERV_AGENT_HOOK_TIMEOUT".into(), "3s".into()));
        }
        let mut lab = Lab {
            occtl_socket: dir.join("occtl.socket"),
            config_per_user_dir: dir.join("config-per-user"),
            config_per_group_dir: dir.join("config-per-group"),
            config_file: dir.join("ocserv.conf"),
            passwd_file: dir.join("passwd"),
            ocserv_log: dir.join("ocserv.log"),
            client_script: dir.join("client-script.sh"),
            dir,
            server_ns,
            client_ns,
            server_addr: Ipv4Addr::new(10, 231, n as u8, 1),
            client_addr: Ipv4Addr::new(10, 231, n as u8, 2),
            port: PORT,
            device_prefix: format!("oa{n}t"),
            vpn_network,
            connect_script,
            disconnect_script,
            env,
            server_pin: String::new(),
            veth_server,
            veth_client,
            ocserv: None,
            clients: Arc::new(Mutex::new(Vec::new())),
            next_client: AtomicU32::new(0),
            tempdir: Some(tempdir),
            slot: Some(slot),
        };
        // From here on, an error drops `lab`, which cleans up whatever was created.
        fs::create_dir_all(&lab.config_per_user_dir).wrap_err("creating config-per-user dir")?;
        fs::create_dir_all(&lab.config_per_group_dir).wrap_err("creating config-per-group dir")?;
        lab.make_certificates()?;
        fs::write(&lab.passwd_file, "").wrap_err("creating the passwd file")?;
        for user in &opts.users {
            lab.add_user(user)?;
        }
        lab.write_client_script()?;
        lab.write_config(&opts)?;
        lab.make_namespaces()?;
        lab.start_ocserv()?;
        Ok(lab)
    }

    /// The visible slot marker file (`/tmp/ocserv-agent-lab/slot-N.lock`).
    pub fn slot_file(&self) -> PathBuf {
        self.slot
            .as_ref()
            .map(|s| s.file.clone())
            .unwrap_or_default()
    }

    /// Adds (or replaces) a user in the passwd file with `ocpasswd`; ocserv reads the file at
    /// every login, so this works while ocserv runs.
    pub fn add_user(&self, user: &LabUser) -> Result<()> {
        let mut cmd = Command::new("ocpasswd");
        cmd.arg("-c").arg(&self.passwd_file);
        if let Some(g) = &user.group {
            cmd.args(["-g", g]);
        }
        cmd.arg(&user.name);
        let input = format!("{0}\n{0}\n", user.password);
        let out = output_with_input(&mut cmd, input.as_bytes(), CMD_TIMEOUT)
            .wrap_err_with(|| format!("running ocpasswd for user {:?}", user.name))?;
        if !out.status.success() {
            bail!(
                "ocpasswd for user {:?} failed ({}): {}",
                user.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Starts openconnect for `user` in the client namespace and returns once its tun device
    /// has the VPN address and ocserv lists the session as connected.
    pub fn connect(&self, user: &str, password: &str) -> Result<Client> {
        let k = self.next_client.fetch_add(1, Ordering::SeqCst);
        let iface = format!("oacl{k}");
        let pid_file = self.dir.join(format!("client-{k}.pid"));
        let log = self.dir.join(format!("client-{k}.log"));
        let log_file =
            fs::File::create(&log).wrap_err_with(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.client_ns, "openconnect"])
            .arg("--user")
            .arg(user)
            .args(["--passwd-on-stdin", "--non-inter", "--background"])
            .arg("--servercert")
            .arg(&self.server_pin)
            .arg("--pid-file")
            .arg(&pid_file)
            .args(["--interface", &iface])
            .arg("--script")
            .arg(&self.client_script)
            .arg(format!("https://{}:{}", self.server_addr, self.port))
            .stdin(Stdio::piped())
            .stdout(Stdio::from(
                log_file
                    .try_clone()
                    .wrap_err("cloning the client log handle")?,
            ))
            .stderr(Stdio::from(log_file));
        let mut parent = cmd.spawn().wrap_err("spawning ip netns exec openconnect")?;
        if let Some(mut stdin) = parent.stdin.take() {
            // A failed write means openconnect already exited; its log says why.
            let _ = stdin.write_all(format!("{password}\n").as_bytes());
        }
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let describe = |what: &str| {
            format!(
                "openconnect for user {user:?} ({iface}): {what}\n--- openconnect output ---\n{}\n--- ocserv log tail ---\n{}",
                log_tail(&log, 30),
                log_tail(&self.ocserv_log, 30)
            )
        };

        // With --background the foreground process exits once the tunnel is up (status 0) or
        // when authentication or setup fails (non-zero).
        let status = loop {
            match parent.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = parent.kill();
                    let _ = parent.wait();
                    if let Some(pid) = read_pid_file(&pid_file) {
                        terminate(pid, "openconnect", Duration::from_secs(2));
                    }
                    bail!(describe("timed out waiting for it to go to the background"));
                }
                Ok(None) => std::thread::sleep(POLL),
                Err(e) => bail!(describe(&format!("waiting for it failed: {e}"))),
            }
        };
        if !status.success() {
            if let Some(pid) = read_pid_file(&pid_file) {
                terminate(pid, "openconnect", Duration::from_secs(2));
            }
            bail!(describe(&format!("exited with {status}")));
        }
        let pid = loop {
            if let Some(pid) = read_pid_file(&pid_file) {
                break pid;
            }
            if Instant::now() >= deadline {
                bail!(describe(&format!(
                    "no pid in {} after going to the background",
                    pid_file.display()
                )));
            }
            std::thread::sleep(POLL);
        };
        if let Ok(mut list) = self.clients.lock() {
            list.push(pid);
        }
        let mut client = Client {
            pid,
            user: user.to_owned(),
            iface: iface.clone(),
            client_ns: self.client_ns.clone(),
            server_tun_ip: self.server_tun_ip(),
            log: log.clone(),
            lab_dir: self.dir.clone(),
        };

        loop {
            if !client.is_alive() {
                client.stop();
                bail!(describe(
                    "the background process died before the session was up"
                ));
            }
            let last = match client.vpn_ip() {
                None => format!("tun {} has no IPv4 address yet", client.iface),
                Some(ip) => match self.session_state(ip) {
                    Ok(Some(state)) if state == "connected" => return Ok(client),
                    Ok(Some(state)) => format!("ocserv lists {ip} in state {state:?}"),
                    Ok(None) => format!("ocserv does not list a session with IPv4 {ip}"),
                    Err(e) => format!("occtl show users failed: {e:#}"),
                },
            };
            if Instant::now() >= deadline {
                client.stop();
                bail!(describe(&format!(
                    "timed out after {CONNECT_TIMEOUT:?} waiting for the session to be connected (last: {last})"
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// The `State` ocserv reports for the session whose client VPN address is `ip`.
    fn session_state(&self, ip: Ipv4Addr) -> Result<Option<String>> {
        let out = self.occtl(&["-j", "show", "users"])?;
        if !out.status.success() {
            bail!(
                "exit {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let users: serde_json::Value =
            serde_json::from_slice(&out.stdout).wrap_err("parsing occtl -j show users")?;
        let ip = ip.to_string();
        Ok(users.as_array().and_then(|list| {
            list.iter()
                .find(|u| u.get("IPv4").and_then(|v| v.as_str()) == Some(ip.as_str()))
                .map(|u| {
                    u.get("State")
                        .and_then(|s| s.as_str())
                        .unwrap_or("")
                        .to_owned()
                })
        }))
    }

    /// SIGTERMs ocserv's main process and waits for it (and its sec-mod and workers) to exit.
    pub fn stop_ocserv(&mut self) -> Result<()> {
        let Some(mut child) = self.ocserv.take() else {
            return Ok(());
        };
        let pid = child.id();
        send_signal(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut forced = false;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() >= deadline && !forced => {
                    send_signal(pid, Signal::SIGKILL);
                    forced = true;
                }
                Ok(None) => std::thread::sleep(POLL),
                Err(e) => bail!("waiting for ocserv (pid {pid}) to exit: {e}"),
            }
        }
        // The main process stops its sec-mod and workers; make sure none linger.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left: Vec<u32> = namespace_pids(&self.server_ns)
                .into_iter()
                .filter(|&p| process_name(p).is_some_and(|n| n.starts_with("ocserv")))
                .collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for p in left {
                    send_signal(p, Signal::SIGKILL);
                }
                break;
            }
            std::thread::sleep(POLL);
        }
        if forced {
            bail!(
                "ocserv (pid {pid}) ignored SIGTERM for 10 s and was killed\n--- ocserv log tail ---\n{}",
                log_tail(&self.ocserv_log, 30)
            );
        }
        Ok(())
    }

    /// Starts ocserv (same config, same sockets) and waits until the occtl socket answers.
    pub fn start_ocserv(&mut self) -> Result<()> {
        if self.ocserv.is_some() {
            return Ok(());
        }
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.ocserv_log)
            .wrap_err_with(|| format!("opening {}", self.ocserv_log.display()))?;
        let _ = writeln!(log, "=== lab: starting ocserv ===");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.server_ns])
            // `-d 1` makes sec-mod print its auth and session messages to stderr (our log);
            // without it they only go to syslog.
            .args(["ocserv", "-f", "-d", "1", "-c"])
            .arg(&self.config_file)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                log.try_clone().wrap_err("cloning the ocserv log handle")?,
            ))
            .stderr(Stdio::from(log))
            .spawn()
            .wrap_err("spawning ip netns exec ocserv")?;
        self.ocserv = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.ocserv.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.ocserv = None;
                    bail!(
                        "ocserv exited with {status} before its occtl socket answered\n--- ocserv log tail ---\n{}",
                        log_tail(&self.ocserv_log, 40)
                    );
                }
            }
            if let Ok(out) = self.occtl(&["show", "status"]) {
                if out.status.success() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "ocserv did not answer `occtl -s {} show status` within {READY_TIMEOUT:?}\n--- ocserv log tail ---\n{}",
                    self.occtl_socket.display(),
                    log_tail(&self.ocserv_log, 40)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// ocserv's main pid, while this lab runs it.
    pub fn ocserv_pid(&self) -> Option<u32> {
        self.ocserv.as_ref().map(|c| c.id())
    }

    /// `occtl -s SOCK <args>` in the host namespace (cannot read tun counters there).
    pub fn occtl(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new("occtl");
        cmd.arg("-s").arg(&self.occtl_socket).args(args);
        output_with_timeout(&mut cmd, CMD_TIMEOUT)
            .wrap_err_with(|| format!("running occtl {args:?}"))
    }

    /// `occtl -s SOCK <args>` inside `server_ns`, where it can read the tun counters.
    pub fn occtl_in_server_ns(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.server_ns, "occtl", "-s"])
            .arg(&self.occtl_socket)
            .args(args);
        output_with_timeout(&mut cmd, CMD_TIMEOUT)
            .wrap_err_with(|| format!("running occtl {args:?} in {}", self.server_ns))
    }

    /// The server's address on the VPN side: ocserv gives every server-side tun the first
    /// address of the pool (the ping target for traffic).
    pub fn server_tun_ip(&self) -> Ipv4Addr {
        let base = u32::from(self.vpn_network.network());
        Ipv4Addr::from(base + 1)
    }

    fn make_certificates(&mut self) -> Result<()> {
        let d = &self.dir;
        let ca_tmpl = d.join("ca.tmpl");
        let srv_tmpl = d.join("server.tmpl");
        fs::write(
            &ca_tmpl,
            "cn = \"ocserv-agent lab CA\"\nserial = 1\nexpiration_days = 30\nca\ncert_signing_key\ncrl_signing_key\n",
        )
        .wrap_err("writing ca.tmpl")?;
        fs::write(
            &srv_tmpl,
            format!(
                "cn = \"{0}\"\nip_address = \"{0}\"\nserial = 2\nexpiration_days = 30\nsigning_key\ntls_www_server\n",
                self.server_addr
            ),
        )
        .wrap_err("writing server.tmpl")?;
        let p = |name: &str| d.join(name);
        certtool(&[
            "--generate-privkey".as_ref(),
            "--key-type=ecdsa".as_ref(),
            "--outfile".as_ref(),
            p("ca-key.pem").as_os_str(),
        ])?;
        certtool(&[
            "--generate-self-signed".as_ref(),
            "--load-privkey".as_ref(),
            p("ca-key.pem").as_os_str(),
            "--template".as_ref(),
            ca_tmpl.as_os_str(),
            "--outfile".as_ref(),
            p("ca-cert.pem").as_os_str(),
        ])?;
        certtool(&[
            "--generate-privkey".as_ref(),
            "--key-type=ecdsa".as_ref(),
            "--outfile".as_ref(),
            p("server-key.pem").as_os_str(),
        ])?;
        certtool(&[
            "--generate-certificate".as_ref(),
            "--load-privkey".as_ref(),
            p("server-key.pem").as_os_str(),
            "--load-ca-certificate".as_ref(),
            p("ca-cert.pem").as_os_str(),
            "--load-ca-privkey".as_ref(),
            p("ca-key.pem").as_os_str(),
            "--template".as_ref(),
            srv_tmpl.as_os_str(),
            "--outfile".as_ref(),
            p("server-cert.pem").as_os_str(),
        ])?;
        let info = certtool(&[
            "-i".as_ref(),
            "--infile".as_ref(),
            p("server-cert.pem").as_os_str(),
        ])?;
        let text = String::from_utf8_lossy(&info.stdout);
        self.server_pin = text
            .split_whitespace()
            .find(|w| w.starts_with("pin-sha256:"))
            .map(str::to_owned)
            .ok_or_else(|| eyre!("certtool -i printed no pin-sha256 for the server certificate"))?;
        Ok(())
    }

    /// The client's `--script`: only brings its own tun up with the VPN address, so the host's
    /// DNS and routes are never touched (openconnect's default vpnc-script would).
    fn write_client_script(&self) -> Result<()> {
        let script = format!(
            r#"#!/bin/sh
# ocserv-agent test lab: configure only this client's tun device.
case "$reason" in
connect)
    ip link set dev "$TUNDEV" up mtu "${{INTERNAL_IP4_MTU:-1300}}" || exit 1
    ip addr add "$INTERNAL_IP4_ADDRESS/32" peer "{peer}/32" dev "$TUNDEV" || exit 1
    # What ocserv pushed (routes, DNS), for tests to read (Client::pushed).
    env | grep -E '^(CISCO_SPLIT_|INTERNAL_IP4_DNS|INTERNAL_IP6_DNS)' > "{dir}/pushed-$TUNDEV" || true
    ;;
esac
exit 0
"#,
            peer = self.server_tun_ip(),
            dir = self.dir.display()
        );
        fs::write(&self.client_script, script).wrap_err("writing the client script")?;
        fs::set_permissions(&self.client_script, fs::Permissions::from_mode(0o755))
            .wrap_err("chmod the client script")?;
        Ok(())
    }

    fn write_config(&self, opts: &LabOptions) -> Result<()> {
        let d = &self.dir;
        let mut c = String::new();
        let mut line = |s: String| {
            c.push_str(&s);
            c.push('\n');
        };
        line(format!(
            "auth = \"plain[passwd={}]\"",
            self.passwd_file.display()
        ));
        line(format!("listen-host = {}", self.server_addr));
        line(format!("tcp-port = {}", self.port));
        line(format!("udp-port = {}", self.port));
        line("run-as-user = nobody".into());
        line("run-as-group = nogroup".into());
        line(format!("socket-file = {}", d.join("ocserv.sock").display()));
        line(format!(
            "occtl-socket-file = {}",
            self.occtl_socket.display()
        ));
        line("use-occtl = true".into());
        line(format!(
            "server-cert = {}",
            d.join("server-cert.pem").display()
        ));
        line(format!(
            "server-key = {}",
            d.join("server-key.pem").display()
        ));
        line(format!("ca-cert = {}", d.join("ca-cert.pem").display()));
        line("isolate-workers = false".into());
        line(format!("max-clients = {}", opts.max_clients));
        line("max-same-clients = 0".into());
        line("keepalive = 32400".into());
        line("dpd = 90".into());
        line("mobile-dpd = 1800".into());
        line("try-mtu-discovery = false".into());
        line("auth-timeout = 240".into());
        line("cookie-timeout = 300".into());
        line("deny-roaming = false".into());
        line("rekey-time = 172800".into());
        line("rekey-method = ssl".into());
        line("use-utmp = false".into());
        line(format!("pid-file = {}", d.join("ocserv.pid").display()));
        line(format!("device = {}", self.device_prefix));
        line("predictable-ips = true".into());
        line(format!("ipv4-network = {}", self.vpn_network.network()));
        line(format!("ipv4-netmask = {}", self.vpn_network.netmask()));
        line(format!("route = {}", self.vpn_network));
        line(format!(
            "config-per-user = {}/",
            self.config_per_user_dir.display()
        ));
        line(format!(
            "config-per-group = {}/",
            self.config_per_group_dir.display()
        ));
        if let Some(s) = &self.connect_script {
            line(format!("connect-script = {}", s.display()));
        }
        if let Some(s) = &self.disconnect_script {
            line(format!("disconnect-script = {}", s.display()));
        }
        for extra in &opts.extra_config {
            line(extra.clone());
        }
        fs::write(&self.config_file, c)
            .wrap_err_with(|| format!("writing {}", self.config_file.display()))
    }

    fn make_namespaces(&self) -> Result<()> {
        let ip = |args: &[&str]| -> Result<()> {
            let out = output_with_timeout(Command::new("ip").args(args), CMD_TIMEOUT)
                .wrap_err_with(|| format!("running ip {}", args.join(" ")))?;
            if !out.status.success() {
                bail!(
                    "ip {} failed ({}): {}",
                    args.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        let (s, c) = (self.server_ns.as_str(), self.client_ns.as_str());
        let (vs, vc) = (self.veth_server.as_str(), self.veth_client.as_str());
        ip(&["netns", "add", s])?;
        ip(&["netns", "add", c])?;
        ip(&[
            "link", "add", "name", vs, "netns", s, "type", "veth", "peer", "name", vc, "netns", c,
        ])?;
        let saddr = format!("{}/24", self.server_addr);
        let caddr = format!("{}/24", self.client_addr);
        ip(&["-n", s, "link", "set", "lo", "up"])?;
        ip(&["-n", c, "link", "set", "lo", "up"])?;
        ip(&["-n", s, "addr", "add", &saddr, "dev", vs])?;
        ip(&["-n", c, "addr", "add", &caddr, "dev", vc])?;
        ip(&["-n", s, "link", "set", vs, "up"])?;
        ip(&["-n", c, "link", "set", vc, "up"])?;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let pids: Vec<u32> = match self.clients.lock() {
            Ok(list) => list.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        for pid in pids {
            terminate(pid, "openconnect", Duration::from_secs(3));
        }
        let _ = self.stop_ocserv();
        if let Some(mut child) = self.ocserv.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        delete_namespace(&self.client_ns);
        delete_namespace(&self.server_ns);
        // Then the temp dir, then the slot (fields drop in this order after this body).
        if let Some(dir) = self.tempdir.take() {
            let _ = dir.close();
        }
        drop(self.slot.take());
    }
}

/// One openconnect client running in the lab's client namespace.
#[derive(Debug)]
pub struct Client {
    /// The background openconnect's pid.
    pub pid: u32,
    pub user: String,
    /// Its tun device in the client namespace.
    pub iface: String,
    client_ns: String,
    server_tun_ip: Ipv4Addr,
    log: PathBuf,
    lab_dir: PathBuf,
}

impl Client {
    /// What ocserv pushed to this client (openconnect's script environment: `CISCO_SPLIT_INC_*`
    /// routes, `INTERNAL_IP4_DNS`), as `NAME=value` lines.
    pub fn pushed(&self) -> String {
        fs::read_to_string(self.lab_dir.join(format!("pushed-{}", self.iface))).unwrap_or_default()
    }

    pub fn is_alive(&self) -> bool {
        process_name(self.pid).is_some_and(|n| n == "openconnect") && pid_running(self.pid)
    }

    /// Waits up to `timeout` for the process to exit; true when it did.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_alive() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }

    /// The client's VPN address as configured on its tun device.
    pub fn vpn_ip(&self) -> Option<Ipv4Addr> {
        let out = output_with_timeout(
            Command::new("ip")
                .args(["-n", &self.client_ns, "-4", "-o", "addr", "show", "dev"])
                .arg(&self.iface),
            CMD_TIMEOUT,
        )
        .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        words.find(|w| *w == "inet")?;
        words.next()?.split('/').next()?.parse().ok()
    }

    /// Pings the server's tun address `packets` times with 1000-byte payloads, bound to this
    /// client's tun so the traffic goes through this session (all clients share one namespace).
    pub fn send_traffic(&self, packets: u32) -> Result<()> {
        let count = packets.to_string();
        let target = self.server_tun_ip.to_string();
        let timeout = Duration::from_secs(10) + Duration::from_millis(20 * u64::from(packets));
        let out = output_with_timeout(
            Command::new("ip").args([
                "netns",
                "exec",
                &self.client_ns,
                "ping",
                "-q",
                "-n",
                "-c",
                &count,
                "-i",
                "0.01",
                "-s",
                "1000",
                "-W",
                "1",
                "-I",
                &self.iface,
                &target,
            ]),
            timeout,
        )
        .wrap_err_with(|| format!("running ping through {}", self.iface))?;
        if !out.status.success() {
            bail!(
                "ping {target} through {} ({}) failed with {}: {}{}",
                self.iface,
                self.user,
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// openconnect's own output so far.
    pub fn log(&self) -> String {
        log_tail(&self.log, 200)
    }

    /// SIGTERM (openconnect then says goodbye to ocserv), SIGKILL after 5 s.
    pub fn stop(&mut self) {
        terminate(self.pid, "openconnect", Duration::from_secs(5));
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop();
    }
}

fn preflight() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the ocserv test lab needs root (network namespaces, tun devices); run the tests as root");
    }
    let missing: Vec<&str> = [
        "ocserv",
        "occtl",
        "ocpasswd",
        "certtool",
        "openconnect",
        "ip",
        "ping",
    ]
    .into_iter()
    .filter(|b| find_in_path(b).is_none())
    .collect();
    if !missing.is_empty() {
        bail!(
            "the ocserv test lab needs these programs, not found in PATH: {} (install: apt-get install ocserv openconnect gnutls-bin iproute2 iputils-ping)",
            missing.join(", ")
        );
    }
    Ok(())
}

fn find_in_path(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

fn certtool(args: &[&std::ffi::OsStr]) -> Result<Output> {
    let out = output_with_timeout(Command::new("certtool").args(args), CMD_TIMEOUT)
        .wrap_err_with(|| format!("running certtool {args:?}"))?;
    if !out.status.success() {
        bail!(
            "certtool {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `cmd` with stdin closed, capturing output; kills it after `timeout`.
fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    output_with_input(cmd, &[], timeout)
}

/// Runs `cmd` feeding `input` on stdin, capturing output; kills it after `timeout`.
fn output_with_input(cmd: &mut Command, input: &[u8], timeout: Duration) -> Result<Output> {
    cmd.stdin(if input.is_empty() {
        Stdio::null()
    } else {
        Stdio::piped()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().wrap_err("spawn failed")?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(res) => res.wrap_err("waiting for the command failed"),
        Err(_) => {
            send_signal(pid, Signal::SIGKILL);
            let _ = rx.recv_timeout(Duration::from_secs(5));
            bail!("timed out after {timeout:?}")
        }
    }
}

fn read_pid_file(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `/proc/PID/comm`, if the process exists.
fn process_name(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// True when the pid exists and is not a zombie (reparented daemons may stay zombies until
/// init reaps them).
fn pid_running(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may contain spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

fn send_signal(pid: u32, sig: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(raw), sig);
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL, but only if the pid still runs `name`
/// (pids are recycled).
fn terminate(pid: u32, name: &str, grace: Duration) {
    let ours = || process_name(pid).is_some_and(|n| n == name) && pid_running(pid);
    if !ours() {
        return;
    }
    send_signal(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while ours() {
        if Instant::now() >= deadline {
            send_signal(pid, Signal::SIGKILL);
            let hard = Instant::now() + Duration::from_secs(2);
            while ours() && Instant::now() < hard {
                std::thread::sleep(POLL);
            }
            return;
        }
        std::thread::sleep(POLL);
    }
}

/// The last `lines` lines of a log file (lossy UTF-8), or a note why there are none.
fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let mut out = String::new();
            for l in &all[all.len().saturating_sub(lines)..] {
                let _ = writeln!(out, "{l}");
            }
            if out.is_empty() {
                out.push_str("(empty)");
            }
            out
        }
        Err(e) => format!("({} unreadable: {e})", path.display()),
    }
}
