//! `myconet-ctl`: the operator's view of a running `myconet-agent`, over the agent's
//! gRPC control socket. Tables for people, `--json` (the proto messages as they are)
//! for scripts and tests.

mod cli;
mod client;
mod content;
// The same generator as the agent's, shared by path (the CLI does not link the agent).
#[path = "../../myconet-agent/src/generate.rs"]
mod generate;
mod render;

use std::{io::Write, process::ExitCode};

use anyhow::Context;
use clap::{CommandFactory, Parser};
use myconet_proto::v1 as pb;

use crate::{
    cli::{Cli, Command, PeersCommand, PinsCommand, RouteCommand},
    client::CtlError,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(dir) = &cli.generate_docs {
        return match generate::write_docs(Cli::command(), dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("myconet-ctl: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(command) = cli.command else {
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingSubcommand,
                "a command is required (see --help)",
            )
            .exit()
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("myconet-ctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.socket, cli.json, command)) {
        Ok(text) => write_stdout(&text),
        Err(e) => {
            eprintln!("myconet-ctl: {e:#}");
            ExitCode::from(e.downcast_ref::<CtlError>().map_or(1, CtlError::exit_code))
        }
    }
}

/// Writes the output; a closed pipe (`myconet-ctl routes | head -1`) is not an error.
fn write_stdout(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("myconet-ctl: writing output: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The response as pretty JSON with the proto field names, or the human rendering.
fn show<T: serde::Serialize>(
    json: bool,
    value: &T,
    human: impl FnOnce(&T) -> String,
) -> anyhow::Result<String> {
    if json {
        let mut s = serde_json::to_string_pretty(value).context("encoding JSON")?;
        s.push('\n');
        Ok(s)
    } else {
        Ok(human(value))
    }
}

/// Runs one command and returns what to print.
async fn run(socket: std::path::PathBuf, json: bool, command: Command) -> anyhow::Result<String> {
    if let Command::Content { action } = command {
        return content::run(&socket, json, action).await;
    }
    let mut client = client::connect(&socket).await?;
    match command {
        Command::Status => show(json, &client.status().await?, render::status),
        Command::Peers { action } => match action.unwrap_or(PeersCommand::List) {
            PeersCommand::List => show(json, &client.peers().await?, render::peers),
            PeersCommand::Add(a) => {
                let e = a.endpoint;
                let req = pb::AddPeerRequest {
                    address: e.addr.to_string(),
                    port: u32::from(e.port),
                    interface: e.interface.unwrap_or_default(),
                    cost: a.cost.map(u32::from),
                };
                show(json, &client.add_peer(req).await?, render::peer_added)
            }
            PeersCommand::Remove(e) => {
                let req = pb::RemovePeerRequest {
                    address: e.addr.to_string(),
                    port: u32::from(e.port),
                    interface: e.interface.unwrap_or_default(),
                };
                let (address, port) = (req.address.clone(), req.port);
                show(json, &client.remove_peer(req).await?, |r| {
                    render::peer_removed(&address, port, r.removed)
                })
            }
        },
        Command::Routes => show(json, &client.routes().await?, render::routes),
        Command::Route { action } => match action {
            RouteCommand::Add(a) => {
                let req = pb::AddRouteRequest {
                    prefix: a.prefix,
                    next_hop: Some(pb::NextHop {
                        address: a.next_hop.to_string(),
                        port: u32::from(a.port),
                        ifindex: a.ifindex,
                    }),
                };
                show(json, &client.add_route(req).await?, render::route_added)
            }
            RouteCommand::Get { address } => {
                let req = pb::GetRouteRequest {
                    address: address.to_string(),
                };
                show(
                    json,
                    &client.get_route(req).await?,
                    render::route_explanation,
                )
            }
            RouteCommand::Del { prefix } => {
                let req = pb::RemoveRouteRequest {
                    prefix: prefix.clone(),
                };
                show(json, &client.remove_route(req).await?, |r| {
                    render::route_removed(&prefix, r.removed)
                })
            }
        },
        Command::Stats { all } => show(json, &client.stats().await?, |s| render::stats(s, all)),
        // Handled before the control client connects; kept here for completeness.
        Command::Content { action } => content::run(&socket, json, action).await,
        Command::Pins { action } => match action.unwrap_or(PinsCommand::List) {
            PinsCommand::List => show(json, &client.pins().await?, render::pins),
            PinsCommand::Set { key } => {
                let req = pb::SetPinRequest { key };
                show(json, &client.set_pin(req).await?, render::pin_set)
            }
            PinsCommand::Forget { prefix } => {
                let req = pb::ForgetPinRequest {
                    prefix: prefix.clone(),
                };
                show(json, &client.forget_pin(req).await?, |r| {
                    render::pin_forgotten(&prefix, r.forgotten)
                })
            }
        },
    }
}
