//! `bench_tool`: the helpers `bench/run.sh` drives the benchmark with (see bench/README.md).
//!
//! Every subcommand does one thing: generate an input (key lists, a gRPC-framed Check
//! body, an Envoy config), play a part (a fast HTTP/1.1 backend, an access-log client,
//! a plain MQTT publisher, a `billing/report` subscriber), measure (run a load generator
//! and read `/proc` around it), or turn the raw measurements into `BENCHMARKS.md` and
//! `bench/results.json`. Timing assertions live here and in the script, never in
//! `cargo test`.
//!
//! This file is the command line and its dispatch; each subcommand (or group of them)
//! lives in its own module, the report in `report/`.
//!
//! ```sh
//! cargo build --release -p keymeter-bench
//! target/release/bench_tool --help
//! ```

mod admin;
mod backend;
mod common;
mod ingest;
mod inputs;
mod load;
mod open_loop;
mod procfs;
mod records;
mod report;
mod revocation;
mod spin;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::common::Result;

#[derive(Parser)]
#[command(
    name = "bench_tool",
    about = "Helpers for keymeter's benchmark (bench/run.sh)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Writes a key list `{"keys": [...], "saved_at": ...}` (a keys file or a snapshot)
    /// with keys `sk-bench-00000000`, `sk-bench-00000001`, ... all `ok`.
    Keys {
        #[arg(long)]
        n: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Writes a gRPC-framed ext_authz CheckRequest as Envoy sends it, carrying `api-key: KEY`.
    CheckBody {
        #[arg(long)]
        key: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Copies a text file replacing strings: each `--replace FROM=TO` must occur exactly
    /// once (so a template that drifted fails loudly); `--credentials KEYS_FILE` replaces
    /// `@CREDENTIALS@` with the key list as Envoy `api_key_auth` credentials.
    Render {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long = "replace")]
        replace: Vec<String>,
        #[arg(long)]
        credentials: Option<PathBuf>,
    },
    /// A minimal HTTP/1.1 backend: every request gets 200 and the x-billing-* headers.
    Backend {
        #[arg(long)]
        port: u16,
    },
    /// Streams synthetic HTTP access-log entries at keymeter over STREAMS concurrent
    /// streams and measures records/s until all are published (keymeter's /metrics).
    Als {
        /// keymeter's gRPC port.
        #[arg(long)]
        port: u16,
        /// keymeter's admin port (for `keymeter_usage_records_published_total`).
        #[arg(long)]
        admin_port: u16,
        #[arg(long)]
        streams: usize,
        #[arg(long)]
        entries: usize,
        /// Entries per StreamAccessLogsMessage (Envoy batches up to 16 KiB).
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Entries rotate over the first KEYS keys of the generated list.
        #[arg(long, default_value_t = 1000)]
        keys: usize,
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
        /// `name=pid` of processes whose CPU time and RSS to report.
        #[arg(long = "pid")]
        pids: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// A plain rumqttc QoS 1 publisher of N record-sized payloads; waits for every PUBACK.
    MqttPublish {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        n: usize,
        #[arg(long, default_value = "billing/report")]
        topic: String,
        /// Unacknowledged publishes in flight (keymeter's `outbox.max_inflight` default).
        #[arg(long, default_value_t = 100)]
        inflight: u16,
        #[arg(long = "pid")]
        pids: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Subscribes to TOPIC (QoS 1) and keeps `messages distinct_record_ids` in OUT
    /// (rewritten every 200 ms; the first write means "subscribed"). Stops on SIGTERM.
    Subscribe {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "billing/report")]
        topic: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 3600)]
        max_secs: u64,
    },
    /// Waits until OUT of `subscribe` shows TARGET distinct records, or until no new
    /// record arrived for STALL seconds; writes `{"requests","messages","distinct"}`.
    AwaitRecords {
        #[arg(long)]
        counts: PathBuf,
        #[arg(long)]
        target: u64,
        #[arg(long, default_value_t = 5)]
        stall_secs: u64,
        #[arg(long, default_value_t = 120)]
        max_secs: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Runs a load generator (h2load) and writes its results with the CPU time and RSS
    /// of the measured processes: `bench_tool load --out F [--log L] --pid n=PID -- CMD...`.
    Load {
        #[arg(long)]
        out: PathBuf,
        /// h2load's `--log-file` (the same path must be in CMD): latency percentiles.
        #[arg(long)]
        log: Option<PathBuf>,
        #[arg(long = "pid")]
        pids: Vec<String>,
        /// Also sample the processes' RSS every this many seconds while CMD runs.
        #[arg(long)]
        sample_secs: Option<u64>,
        /// h2load's `--warm-up-time`: CPU use and core load are counted after it.
        #[arg(long, default_value_t = 0.0)]
        warmup_secs: f64,
        /// CMD is killed (and the step fails) after this long.
        #[arg(long, default_value_t = 900)]
        timeout_secs: u64,
        /// Leave requests started in the first MS milliseconds out of the percentiles
        /// (a warm-up for `--timing-script-file` runs, which have no `--warm-up-time`).
        #[arg(long, default_value_t = 0)]
        skip_first_ms: u64,
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// Polls URL until it answers 200; prints `{"ready_ms": ...}` counted from SINCE_NS
    /// (epoch ns, `date +%s%N` just before the process was started).
    WaitReady {
        #[arg(long)]
        url: String,
        #[arg(long)]
        since_ns: Option<u128>,
        /// Fail at once if this process exits.
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Prints one sample of a Prometheus text endpoint (0 when absent).
    Metric {
        #[arg(long)]
        url: String,
        #[arg(long)]
        name: String,
    },
    /// Writes CPU seconds, RSS and peak RSS of `name=pid` processes as JSON.
    Proc {
        #[arg(long = "pid", required = true)]
        pids: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Prints one field of a JSON object file (numbers as plain numbers).
    Get {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        field: String,
    },
    /// An open-loop gRPC client: sends the gRPC-framed BODY to URL at RATE requests/s,
    /// evenly spaced (one request every 1/RATE s, spread over CONNECTIONS HTTP/2
    /// connections), for SECS seconds. Latency counts from when a request was due, not
    /// from when it was sent, so a stalled server cannot hide its queue. Prints h2load's
    /// summary lines and writes h2load's log format, so `load` can run it like h2load.
    OpenLoop {
        #[arg(long)]
        url: String,
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 8)]
        connections: usize,
        #[arg(long)]
        body: PathBuf,
        #[arg(long)]
        log: PathBuf,
    },
    /// Revocation latency through Envoy: N times, a billing system publishes key
    /// `PREFIX-i` as `ok` on `billing/keys/update`, waits until Envoy at URL allows it,
    /// then blocks it and measures from that publish to Envoy's first 401/403 for it.
    /// Writes every latency (block and add) and their percentiles as JSON.
    Revocation {
        /// A URL through Envoy (GET; the key goes in `api-key`).
        #[arg(long)]
        url: String,
        #[arg(long)]
        mqtt_port: u16,
        #[arg(long, default_value = "billing/keys/update")]
        topic: String,
        #[arg(long, default_value_t = 100)]
        n: usize,
        #[arg(long, default_value = "sk-revoke")]
        prefix: String,
        /// Give up on one key after this long.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
        /// Block keys of the generated list (`sk-bench-00000000`, ...) that Envoy already
        /// allows, instead of adding keys first: the list never grows (at scale, where a
        /// list at `xds.max_keys` must stay there).
        #[arg(long)]
        existing: bool,
        #[arg(long)]
        out: PathBuf,
    },
    /// Spins until killed (at most MAX_SECS): started with `chrt --idle 0` on a core, it
    /// keeps that core out of the (slow to leave) virtual-CPU idle state while taking
    /// only time that nothing else wants.
    Spin {
        #[arg(long, default_value_t = 7200)]
        max_secs: u64,
    },
    /// Turns the raw measurements of one run into BENCHMARKS.md and results.json.
    Report {
        #[arg(long)]
        raw: PathBuf,
        #[arg(long)]
        md: PathBuf,
        #[arg(long)]
        json: PathBuf,
        /// `key=value` facts about the run (mode, versions, settings), kept in order.
        #[arg(long = "info")]
        info: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench_tool: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_tool: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Keys { n, out } => inputs::write_keys(n, &out),
        Cmd::CheckBody { key, out } => inputs::write_check_body(&key, &out),
        Cmd::Render {
            input,
            out,
            replace,
            credentials,
        } => inputs::render(&input, &out, &replace, credentials.as_deref()),
        Cmd::Backend { port } => backend::backend(port).await,
        Cmd::Als {
            port,
            admin_port,
            streams,
            entries,
            batch,
            keys,
            timeout_secs,
            pids,
            out,
        } => {
            let opts = ingest::AlsOptions {
                port,
                admin_port,
                streams,
                entries,
                batch: batch.max(1),
                keys: keys.max(1),
                timeout: Duration::from_secs(timeout_secs),
            };
            ingest::run_als(&opts, &pids, &out).await
        }
        Cmd::MqttPublish {
            port,
            n,
            topic,
            inflight,
            pids,
            out,
        } => ingest::run_mqtt_publish(port, n, &topic, inflight, &pids, &out).await,
        Cmd::Subscribe {
            port,
            topic,
            out,
            max_secs,
        } => records::subscribe(port, &topic, &out, Duration::from_secs(max_secs)).await,
        Cmd::AwaitRecords {
            counts,
            target,
            stall_secs,
            max_secs,
            out,
        } => {
            records::run_await(
                &counts,
                target,
                Duration::from_secs(stall_secs),
                Duration::from_secs(max_secs),
                &out,
            )
            .await
        }
        Cmd::Load {
            out,
            log,
            pids,
            sample_secs,
            warmup_secs,
            timeout_secs,
            skip_first_ms,
            cmd,
        } => {
            let pids = procfs::parse_pids(&pids)?;
            let opts = load::LoadOptions {
                cmd: &cmd,
                log: log.as_deref(),
                pids: &pids,
                sample_every: sample_secs.map(Duration::from_secs),
                warmup: Duration::from_secs_f64(warmup_secs),
                timeout: Duration::from_secs(timeout_secs),
                skip_first_us: skip_first_ms * 1000,
            };
            load::run(&opts, &out).await
        }
        Cmd::WaitReady {
            url,
            since_ns,
            pid,
            timeout_secs,
            out,
        } => admin::print_ready(&url, since_ns, pid, Duration::from_secs(timeout_secs), out).await,
        Cmd::Metric { url, name } => admin::print_metric(&url, &name).await,
        Cmd::Proc { pids, out } => procfs::write_proc(&pids, &out),
        Cmd::Get { file, field } => common::print_field(&file, &field),
        Cmd::OpenLoop {
            url,
            rate,
            secs,
            connections,
            body,
            log,
        } => open_loop::open_loop(&url, rate, secs, connections.max(1), &body, &log).await,
        Cmd::Revocation {
            url,
            mqtt_port,
            topic,
            n,
            prefix,
            timeout_secs,
            existing,
            out,
        } => {
            revocation::run(
                &url,
                mqtt_port,
                &topic,
                n,
                (!existing).then_some(prefix.as_str()),
                Duration::from_secs(timeout_secs),
                &out,
            )
            .await
        }
        Cmd::Spin { max_secs } => {
            spin::spin(Duration::from_secs(max_secs));
            Ok(())
        }
        Cmd::Report {
            raw,
            md,
            json,
            info,
        } => report::write(&raw, &md, &json, &info),
    }
}
