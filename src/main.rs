//! The `ocserv-agent` binary: a thin shell over the library (`ocserv_agent`).
#![forbid(unsafe_code)]

use clap::Parser;
use ocserv_agent::cli::{Cli, Command};
use ocserv_agent::config::{self, ConfigSource, LogFormat};

fn init_logging(cfg: &config::LogConfig) {
    // RUST_LOG, when set, wins over log.level.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
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

fn client_addr(explicit: Option<String>, path: Option<&std::path::Path>) -> String {
    explicit.unwrap_or_else(|| match load_or_exit(path).config.grpc.listen {
        Some(listen) => format!("http://{listen}"),
        None => {
            eprintln!("ocserv-agent: grpc.listen is not set; pass --addr http://HOST:PORT");
            std::process::exit(config::EXIT_CONFIG);
        }
    })
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
            init_logging(&loaded.config.log);
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
            ))
        }
        Command::CheckConfig => {
            let loaded = load_or_exit(path);
            print!("{}", loaded.render());
            0
        }
        Command::Sessions { user, json, addr } => {
            let addr = client_addr(addr, path);
            finish(rt.block_on(ocserv_agent::cli::sessions(&addr, user, json)))
        }
        Command::Disconnect {
            user,
            all,
            reason,
            addr,
        } => {
            let addr = client_addr(addr, path);
            finish(rt.block_on(ocserv_agent::cli::disconnect(&addr, user, all, reason)))
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
