//! The `ocserv-agent` binary: a thin shell over the library (`ocserv_agent`).
#![forbid(unsafe_code)]

use clap::Parser;
use ocserv_agent::cli::{Cli, Command, Target, TargetArgs};
use ocserv_agent::config::{self, ConfigSource, LogFormat};

/// Sets up logging; returns how to change the level later (SIGHUP). RUST_LOG, when set, wins
/// over `log.level` (and then a SIGHUP does not change it).
fn init_logging(cfg: &config::LogConfig) -> ocserv_agent::app::SetLogLevel {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let from_env = EnvFilter::try_from_default_env().ok();
    let pinned = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(&cfg.level));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match cfg.format {
        LogFormat::Json => registry.with(fmt.json()).init(),
        LogFormat::Text => registry.with(fmt).init(),
    }
    Box::new(move |level: &str| {
        if pinned {
            return Err("RUST_LOG is set and takes precedence".into());
        }
        handle
            .reload(EnvFilter::new(level))
            .map_err(|e| e.to_string())
    })
}

fn load_or_exit(path: Option<&std::path::Path>) -> config::Loaded {
    match config::load(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ocserv-agent: {e}");
            std::process::exit(config::EXIT_CONFIG);
        }
    }
}

/// Where the CLI reaches the agent: `--addr`, `--socket`, else the configured control socket.
fn target(t: TargetArgs, path: Option<&std::path::Path>) -> Target {
    match (t.addr, t.socket) {
        (Some(addr), _) => Target::Tcp(addr),
        (None, Some(socket)) => Target::Socket(socket),
        (None, None) => Target::Socket(load_or_exit(path).config.grpc.socket),
    }
}

fn main() {
    let cli = Cli::parse();
    let path = cli.config.as_deref();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ocserv-agent: cannot start the async runtime: {e}");
            std::process::exit(ocserv_agent::app::EXIT_START_FAILED);
        }
    };
    let code = match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let loaded = load_or_exit(path);
            let set_log_level = init_logging(&loaded.config.log);
            match &loaded.source {
                ConfigSource::File(p) => {
                    tracing::info!(file = %p.display(), "configuration loaded")
                }
                ConfigSource::EmbeddedDefaults => tracing::info!(
                    "no configuration file (looked for {}); running on embedded defaults",
                    config::DEFAULT_PATH
                ),
            }
            for line in loaded.describe_defaults() {
                tracing::info!("default used: {line}");
            }
            rt.block_on(ocserv_agent::app::run(
                loaded.config,
                path.map(std::path::Path::to_path_buf),
                set_log_level,
            ))
        }
        Command::CheckConfig => {
            let loaded = load_or_exit(path);
            print!("{}", loaded.render());
            let c = &loaded.config;
            // Not opened here: a running agent holds it.
            let store = ocserv_agent::store::Store::path_in(&c.agent.state_dir);
            let state = if store.exists() {
                "exists"
            } else {
                "created at the first start"
            };
            println!("# state store: {} ({state})", store.display());
            match (c.policy.source, &c.local_policy.path) {
                (_, Some(p)) => match ocserv_agent::policy::local::load(p) {
                    Ok(_) => println!("# local policy: {} is valid", p.display()),
                    Err(e) => {
                        eprintln!("ocserv-agent: local_policy.path: {e}");
                        std::process::exit(config::EXIT_CONFIG);
                    }
                },
                (config::PolicySource::Local, None) => {
                    println!("# local policy: {}", c.local_policy.describe())
                }
                (config::PolicySource::Portal, None) => {}
            }
            if c.portal.is_tls() {
                if let Err(e) = ocserv_agent::actors::portal_link::tls_config(&c.portal) {
                    eprintln!("ocserv-agent: {e}");
                    std::process::exit(config::EXIT_CONFIG);
                }
                println!("# portal TLS files: readable and valid");
            }
            0
        }
        Command::Policy(ocserv_agent::cli::PolicyCommand::Test { user, group }) => {
            let loaded = load_or_exit(path);
            finish(rt.block_on(ocserv_agent::cli::policy_test(
                &loaded.config,
                &user,
                &group,
            )))
        }
        Command::Sessions {
            user,
            json,
            target: t,
        } => {
            let t = target(t, path);
            finish(rt.block_on(ocserv_agent::cli::sessions(&t, user, json)))
        }
        Command::Disconnect {
            user,
            all,
            reason,
            target: t,
        } => {
            let t = target(t, path);
            finish(rt.block_on(ocserv_agent::cli::disconnect(&t, user, all, reason)))
        }
        Command::Health { tier, target: t } => {
            let t = target(t, path);
            finish(rt.block_on(ocserv_agent::cli::health(&t, tier)))
        }
    };
    std::process::exit(code);
}

fn finish(r: Result<String, ocserv_agent::cli::CliError>) -> i32 {
    match r {
        Ok(out) => {
            print!("{out}");
            0
        }
        Err(e) => {
            eprintln!("ocserv-agent: {}", e.message);
            e.code
        }
    }
}
