//! The `keymeter` command: parses the command line and calls [`keymeter::run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keymeter::config::{Config, EXIT_USAGE, LogFormat};
use keymeter::outbox::DirLocked;
use keymeter::{Listeners, RunError, dev, telemetry};

/// Exit code when another process holds the outbox directory (sysexits.h
/// `EX_TEMPFAIL`): nothing is wrong with this process, it can start once that one
/// has stopped.
const EXIT_OUTBOX_LOCKED: u8 = 75;

#[derive(Parser)]
#[command(
    name = "keymeter",
    version,
    about = "Envoy ext_authz API-key checks and usage metering for an MQTT billing system",
    after_help = "Environment overrides: KEYMETER_MQTT_HOST, KEYMETER_MQTT_PORT, \
KEYMETER_MQTT_USERNAME, KEYMETER_MQTT_PASSWORD, KEYMETER_MQTT_CLIENT_ID, \
KEYMETER_MQTT_PROTOCOL, KEYMETER_MQTT_TLS_ENABLED, KEYMETER_MQTT_TLS_CA_FILE, KEYMETER_GRPC_LISTEN, \
KEYMETER_ADMIN_LISTEN, KEYMETER_REPORT_LISTEN, KEYMETER_KEYS_FILE, KEYMETER_KEYS_SNAPSHOT, KEYMETER_OUTBOX_DIR, KEYMETER_LOG_FORMAT, \
KEYMETER_LOG_LEVEL (RUST_LOG overrides the log level).\n\n\
Try it locally without a broker: `keymeter dev`."
)]
struct Cli {
    /// Configuration file (TOML); see deploy/keymeter.example.toml.
    #[arg(short, long, env = "KEYMETER_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Local sandbox, NOT for production: an in-process MQTT broker, a billing-system
    /// stand-in serving keys from a file and printing every billing/report, and keymeter.
    Dev {
        /// Keys the billing stand-in serves ({"keys": [...]}); without it, the sample
        /// keys of examples/keys.json, built in (so `keymeter dev` runs anywhere).
        #[arg(long)]
        keys: Option<PathBuf>,
        /// gRPC listener (ext_authz Check, health).
        #[arg(long, default_value = "127.0.0.1:9191")]
        grpc: SocketAddr,
        /// Admin HTTP listener (/healthz, /readyz, /metrics).
        #[arg(long, default_value = "127.0.0.1:9192")]
        admin: SocketAddr,
        /// Embedded MQTT broker (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:0")]
        broker: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match runtime_builder().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keymeter: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::Dev {
            keys,
            grpc,
            admin,
            broker,
        }) => runtime.block_on(run_dev(keys, grpc, admin, broker)),
        None => runtime.block_on(run_configured(cli.config, cli.check_config)),
    }
}

async fn run_configured(path: Option<PathBuf>, check_only: bool) -> ExitCode {
    let Some(path) = path else {
        eprintln!(
            "keymeter: no configuration given.\n  \
             Production: keymeter --config /etc/keymeter/keymeter.toml (see deploy/keymeter.example.toml)\n  \
             Local sandbox with an embedded broker and billing stand-in: keymeter dev"
        );
        return ExitCode::from(EXIT_USAGE as u8);
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keymeter: {e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    if check_only {
        // Everything a start would stumble on: files, directories, certificates.
        if let Err(e) = keymeter::preflight::check(&config) {
            eprintln!("keymeter: {e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
        println!("{}: configuration is valid", path.display());
        return ExitCode::SUCCESS;
    }
    telemetry::init(config.log.format, &config.log.level);
    serve(config).await
}

async fn serve(config: Config) -> ExitCode {
    let listeners = match Listeners::bind(&config).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, grpc = %config.listen.grpc, admin = %config.listen.admin, "cannot bind listeners");
            return ExitCode::FAILURE;
        }
    };
    match keymeter::run(listeners, config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ (RunError::Mqtt(_) | RunError::KeysFile(_))) => {
            tracing::error!(error = %e, "bad configuration");
            ExitCode::from(EXIT_USAGE as u8)
        }
        Err(e) if outbox_locked(&e) => {
            tracing::error!(error = %e, "another keymeter has this outbox open; not starting");
            ExitCode::from(EXIT_OUTBOX_LOCKED)
        }
        Err(e) => {
            tracing::error!(error = %e, "keymeter stopped with an error");
            ExitCode::FAILURE
        }
    }
}

/// Whether `e` is another process holding the outbox directory.
fn outbox_locked(e: &RunError) -> bool {
    matches!(e, RunError::Outbox(_, io) if io.get_ref().is_some_and(|inner| inner.is::<DirLocked>()))
}

async fn run_dev(
    keys: Option<PathBuf>,
    grpc: SocketAddr,
    admin: SocketAddr,
    broker_addr: SocketAddr,
) -> ExitCode {
    // rumqttd logs ordinary connection teardown at ERROR ("no-connection id 0 is
    // already gone", "router-drop": the broker's readiness probe at start-up, every
    // client at shutdown), which alarms on a normal run. The embedded broker is a
    // sandbox; what matters about it (bind failures) keymeter reports itself.
    telemetry::init(LogFormat::Text, "info,rumqttd=off");
    let loaded = match &keys {
        Some(path) => dev::load_keys_file(path),
        None => dev::sample_keys(),
    };
    let entries = match loaded {
        Ok(k) => k,
        Err(e) => {
            eprintln!("keymeter dev: {e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    let source = keys.map_or_else(
        || "the built-in samples (examples/keys.json)".to_string(),
        |p| p.display().to_string(),
    );
    let broker = match dev::broker::EmbeddedBroker::start(broker_addr) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("keymeter dev: cannot start the embedded MQTT broker on {broker_addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let scratch = match dev::scratch_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("keymeter dev: cannot create a private temp directory for the outbox: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut config =
        Config::for_local_broker(&broker.addr().ip().to_string(), broker.addr().port());
    config.listen.grpc = grpc;
    config.listen.admin = admin;
    config.outbox.dir = scratch.path().join("outbox");
    let standin = match dev::billing::BillingStandIn::start(dev::billing::StandInOptions {
        host: broker.addr().ip().to_string(),
        port: broker.addr().port(),
        topics: config.topics.clone(),
        keys: entries.clone(),
        print_reports: true,
    })
    .await
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keymeter dev: cannot start the billing stand-in: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "\n==================== keymeter dev mode — NOT FOR PRODUCTION ====================\n\
         ext_authz Check (gRPC)   {grpc}\n\
         admin HTTP               http://{admin}/readyz  /metrics  /healthz\n\
         embedded MQTT broker     {} (no TLS, no auth)\n\
         billing stand-in         serves {} keys from {}; prints every billing/report\n\
         outbox                   {} (private, removed on exit)\n\
         Point Envoy's ext_authz at {grpc}, or run ./scripts/demo.sh for Envoy in front.\n\
         Ctrl-C stops everything.\n\
         ================================================================================\n",
        broker.addr(),
        entries.len(),
        source,
        config.outbox.dir.display(),
    );
    let code = serve(config).await;
    standin.stop().await;
    // Removed only now: the outbox is closed.
    drop(scratch);
    code
}

/// One worker thread (`TOKIO_WORKER_THREADS=1`, e.g. keymeter pinned to one core)
/// gets tokio's single-threaded scheduler, which skips the work-stealing machinery;
/// anything else the multi-threaded one (one worker per core by default).
fn runtime_builder() -> tokio::runtime::Builder {
    match std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .as_deref()
        .map(str::trim)
    {
        Some("1") => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
}

/// Resolves on SIGINT or SIGTERM (Kubernetes' stop signal).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
