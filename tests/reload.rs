//! SIGHUP re-reads the configuration: the keys that can change live are applied to the running
//! agent, the others are named as needing a restart (and keep their running values), and an
//! invalid file keeps the running configuration.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ocserv_agent::config::{load_with_env, Loaded};
use support::agent;
use support::lab::{Lab, LabOptions};

fn config_text(lab: &Lab, reconcile: &str, level: &str, max_connections: u32) -> String {
    format!(
        "[agent]\nstate_dir = {:?}\n\n\
         [ocserv]\ncontrol_socket = {:?}\nreconcile_interval = {reconcile:?}\n\n\
         [grpc]\nsocket = {:?}\nmax_connections = {max_connections}\n\n\
         [hook]\nsocket = {:?}\n\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\n[log]\nlevel = {level:?}\n",
        lab.dir.join("state").display().to_string(),
        lab.occtl_socket.display().to_string(),
        lab.dir.join("agent.sock").display().to_string(),
        lab.dir.join("hook.sock").display().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_live_keys_names_the_rest_and_keeps_the_old_on_error() {
    let lab = Lab::start(LabOptions::default()).unwrap();
    let file = lab.dir.join("agent.toml");
    std::fs::write(&file, config_text(&lab, "300ms", "info", 4096)).unwrap();
    // Hermetic: the file and an empty environment, never the process's.
    let load = {
        let file = file.clone();
        move || -> Result<Loaded, _> { load_with_env(Some(&file), &[]) }
    };
    let a = agent::start(load().unwrap().config).await;
    let levels = Arc::new(Mutex::new(Vec::<String>::new()));
    let set_level = {
        let levels = levels.clone();
        move |l: &str| {
            levels.lock().unwrap().push(l.to_owned());
            Ok(())
        }
    };

    // 1. Live keys apply at once; others are named and keep their running values.
    std::fs::write(&file, config_text(&lab, "2s", "debug", 10)).unwrap();
    let changes = ocserv_agent::app::reload(&a.ctx, load.clone(), &set_level)
        .await
        .expect("a valid file is applied");
    let mut applied = changes.applied.clone();
    applied.sort();
    assert_eq!(applied, ["log.level", "ocserv.reconcile_interval"]);
    assert_eq!(changes.need_restart, ["grpc.max_connections"]);
    let running = a.ctx.config();
    assert_eq!(running.ocserv.reconcile_interval, Duration::from_secs(2));
    assert_eq!(running.log.level, "debug");
    assert_eq!(
        running.grpc.max_connections, 4096,
        "a key that needs a restart keeps its running value"
    );
    assert_eq!(a.ctx.health.reconcile_interval(), Duration::from_secs(2));
    assert_eq!(*levels.lock().unwrap(), ["debug"]);

    // 2. An invalid file is refused and the running configuration kept.
    std::fs::write(&file, config_text(&lab, "soon", "debug", 10)).unwrap();
    let e = ocserv_agent::app::reload(&a.ctx, load.clone(), &set_level)
        .await
        .unwrap_err();
    assert!(e.contains("reconcile_interval"), "{e}");
    assert_eq!(
        a.ctx.config().ocserv.reconcile_interval,
        Duration::from_secs(2)
    );
    std::fs::write(&file, "[grpc\n").unwrap();
    assert!(ocserv_agent::app::reload(&a.ctx, load.clone(), &set_level)
        .await
        .is_err());
    assert_eq!(a.ctx.config().log.level, "debug");
    assert_eq!(levels.lock().unwrap().len(), 1, "no level change on errors");

    // 3. The agent keeps serving through all of it.
    let mut c = agent::client(&a).await;
    agent::wait_sessions(&mut c, "", 0).await;
    a.shutdown().await;
}
