//! `roost`: one binary for the hub's processes and its command line (DESIGN.md §9).

mod cas;
mod cli;
mod dps;
mod groups;
mod manage;
mod output;
mod routes;

use clap::Parser;
use cli::{Cli, Cmd};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ROOST_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Cmd::Up(args) => cli::run_up(args),
        Cmd::Engine(args) => cli::run_engine(args),
        Cmd::Control(args) => cli::run_control(args),
        Cmd::Device {
            action,
            data_dir,
            output,
        } => cli::run_device(action, &data_dir, output),
        Cmd::Twin {
            action,
            data_dir,
            output,
        } => cli::run_twin(action, &data_dir, output),
        Cmd::Method {
            action,
            data_dir,
            output,
        } => cli::run_method(action, &data_dir, output),
        Cmd::C2d {
            action,
            data_dir,
            output,
        } => cli::run_c2d(action, &data_dir, output),
        Cmd::Module {
            action,
            data_dir,
            output,
        } => manage::run_module(action, &data_dir, output),
        Cmd::Query {
            query,
            max,
            data_dir,
            output,
        } => manage::run_query(&query, max, &data_dir, output),
        Cmd::Job {
            action,
            data_dir,
            output,
        } => manage::run_job(action, &data_dir, output),
        Cmd::Events { action, data_dir } => cli::run_events(action, &data_dir),
        Cmd::Routes { action } => routes::run(action),
        Cmd::ConsumerGroup { action } => groups::run(action),
        Cmd::Ca { action } => cas::run(action),
        Cmd::Dps { action } => dps::run(action),
    }
}
