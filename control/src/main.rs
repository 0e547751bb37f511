//! The `switchyard` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use switchyard_control::cli::{self, Cli, Cmd};
use switchyard_control::client::default_socket;
use switchyard_control::daemon::{self, DaemonConfig, UplinkArgs};
use switchyard_control::error::{Error, Result};
use switchyard_control::{demo, run};

fn default_state_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/switchyard");
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("switchyard")
}

fn init_logging(level: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| Error::invalid(format!("invalid --log-level {level:?}: {e}")))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}

fn real_main(cli: Cli) -> Result<i32> {
    let socket = cli.socket.clone();
    match cli.cmd {
        Cmd::Daemon(a) => {
            init_logging(&a.log_level)?;
            let uplink = match (&a.uplink, &a.uplink_addr) {
                (Some(iface), Some(addr)) => {
                    let (ip, len) = addr
                        .split_once('/')
                        .and_then(|(i, l)| Some((i.parse().ok()?, l.parse::<u8>().ok()?)))
                        .filter(|(_, l)| *l <= 32)
                        .ok_or_else(|| {
                            Error::invalid(format!(
                                "invalid --uplink-addr {addr:?} (want e.g. 192.0.2.10/24)"
                            ))
                        })?;
                    Some(UplinkArgs {
                        iface: iface.clone(),
                        addr: ip,
                        prefix_len: len,
                        gateway: a.uplink_gateway,
                    })
                }
                _ => None,
            };
            daemon::run(DaemonConfig {
                socket: socket.unwrap_or_else(default_socket),
                state_dir: a.state_dir.unwrap_or_else(default_state_dir),
                uplink,
                host_loopback: a.host_loopback,
                dns: a.dns,
                bridge_dns: a.bridge_dns,
                busy_poll: std::time::Duration::from_micros(a.busy_poll),
                threads: a.threads.map_or_else(default_threads, usize::from),
                mac_aging: std::time::Duration::from_secs(a.mac_aging),
                conntrack_max: a.conntrack_max,
                group: match &a.group {
                    None => None,
                    Some(g) => Some(match g.parse::<u32>() {
                        Ok(gid) => gid,
                        Err(_) => nix::unistd::Group::from_name(g)
                            .ok()
                            .flatten()
                            .map(|gr| gr.gid.as_raw())
                            .ok_or_else(|| Error::invalid(format!("unknown group {g:?}")))?,
                    }),
                },
                docker_plugin: match (a.docker_plugin, a.docker_plugin_socket) {
                    (_, Some(p)) => Some(p),
                    (true, None) => Some(PathBuf::from("/run/docker/plugins/switchyard.sock")),
                    (false, None) => None,
                },
                conntrack_timeouts: a
                    .conntrack_timeouts
                    .iter()
                    .map(|t| {
                        t.split_once('=')
                            .and_then(|(k, v)| Some((k.to_string(), v.parse::<u64>().ok()?)))
                            .ok_or_else(|| {
                                Error::invalid(format!(
                                    "invalid --conntrack-timeout {t:?} (want NAME=SECS)"
                                ))
                            })
                    })
                    .collect::<Result<_>>()?,
            })?;
            Ok(0)
        }
        Cmd::Network(n) => cli::network(&socket, n),
        Cmd::Connect(a) => cli::connect(&socket, a),
        Cmd::Run(a) => run::run(socket.unwrap_or_else(default_socket), a),
        Cmd::RunChild { cmd } => run::child(cmd),
        Cmd::TapHelper { request } => Ok(switchyard_control::userns::helper(&request)),
        Cmd::Demo => demo::run(),
        Cmd::Capture {
            network,
            name,
            write,
            count,
        } => switchyard_control::capture::run(
            &socket.unwrap_or_else(default_socket),
            &network,
            &name,
            write.as_deref(),
            count,
        ),
        Cmd::Replay(a) => switchyard_control::replay::run(a),
        Cmd::InNetns { path, cmd } => demo::exec_in_netns(&path, &cmd),
        other => cli::simple(&socket, other),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                eprintln!("switchyard: error: a subcommand is missing (see switchyard --help)");
                return ExitCode::from(2);
            }
            // One line, like every other error; clap's usage hint is dropped.
            let msg = e.to_string();
            let text: Vec<&str> = msg
                .lines()
                .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
                .map(str::trim)
                .collect();
            let text = text.join(" ");
            let text = text.strip_prefix("error: ").unwrap_or(&text);
            eprintln!("switchyard: error: {text}");
            return ExitCode::from(2);
        }
    };
    match real_main(cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("switchyard: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Two dataplane workers (README, Dataplane threads: with conversation affinity, two cost one
/// conversation nothing on 2 cores and run independent ones in parallel), one on a single core.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
}
