//! The connect hook as an operator installs it (the shipped `/bin/sh` wrapper beside the built
//! `ocserv-agent-hook`), labs whose ocserv runs it, and a raw client of the hook socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ocserv_agent::hook_proto::{self, HookResponse};

use super::lab::{Lab, LabOptions, LabUser};

/// The shipped wrapper copied into `dir/bin` beside a link to the built hook program `built`
/// (a test passes `env!("CARGO_BIN_EXE_ocserv-agent-hook")`, the demo the release build next
/// to itself); returns the wrapper's path. [`LabOptions::hook`] does this in the lab's own dir.
pub fn install(dir: &Path, built: &Path) -> eyre::Result<PathBuf> {
    use eyre::WrapErr;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).wrap_err_with(|| format!("creating {}", bin.display()))?;
    let wrapper = bin.join("ocserv-agent-hook.sh");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/ocserv-agent-hook.sh");
    std::fs::copy(&shipped, &wrapper)
        .wrap_err_with(|| format!("copying {} to {}", shipped.display(), wrapper.display()))?;
    std::os::unix::fs::symlink(built, bin.join("ocserv-agent-hook"))
        .wrap_err_with(|| format!("linking {} into {}", built.display(), bin.display()))?;
    Ok(wrapper)
}

/// A lab whose ocserv runs the hook (`built`, see [`install`]) for connects and disconnects,
/// asking on a socket of its own in the lab dir ([`socket`]).
pub fn lab(users: &[LabUser], built: &str) -> Lab {
    Lab::start(LabOptions {
        users: users.to_vec(),
        hook: Some(built.into()),
        ..Default::default()
    })
    .expect("lab starts")
}

/// The hook socket a [`lab`]'s scripts ask on.
pub fn socket(lab: &Lab) -> PathBuf {
    let (_, v) = lab
        .env
        .iter()
        .find(|(k, _)| k == "OCSERV_AGENT_HOOK_SOCKET")
        .expect("a hooked lab");
    PathBuf::from(v)
}

/// Sends `bytes` on a new connection and reads the answer, if any (blocking).
pub fn exchange(socket: &Path, bytes: &[u8]) -> Option<HookResponse> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (out.len() > 4).then(|| hook_proto::parse_response(&out[4..]).expect("a valid answer"))
}

/// One frame holding `json`.
pub fn frame(json: &str) -> Vec<u8> {
    hook_proto::encode_frame(json.as_bytes()).unwrap()
}

/// A connect request for `user` (session ID `id`), as the hook program sends it.
pub fn connect(user: &str, group: &str, id: u32) -> Vec<u8> {
    frame(&format!(
        r#"{{"reason":"connect","username":"{user}","groupname":"{group}","session_id":{id},"ip_real":"192.0.2.1","ip_remote":"10.0.0.2","device":"vpns0"}}"#
    ))
}
