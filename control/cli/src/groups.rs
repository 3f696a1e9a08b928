//! `roost consumer-group create|list|delete`: the Event Hubs consumer groups
//! (`/roost/consumergroups`; docs/eventhubs.md).

use std::path::PathBuf;

use clap::Subcommand;
use hyper::Method;

use crate::routes::call_at;

#[derive(Subcommand)]
pub enum GroupCmd {
    /// Create a consumer group (1 to 50 letters, digits, '.', '-', '_').
    Create {
        name: String,
        #[arg(long, default_value = "./roost-data")]
        data_dir: PathBuf,
    },
    /// List the consumer groups ($Default first).
    List {
        #[arg(long, default_value = "./roost-data")]
        data_dir: PathBuf,
    },
    /// Delete a consumer group ($Default cannot be deleted).
    Delete {
        name: String,
        #[arg(long, default_value = "./roost-data")]
        data_dir: PathBuf,
    },
}

fn path(name: &str) -> String {
    format!("/roost/consumergroups/{}", crate::cli::path_id(name))
}

pub fn run(cmd: GroupCmd) -> anyhow::Result<()> {
    match cmd {
        GroupCmd::Create { name, data_dir } => {
            call_at(&data_dir, Method::PUT, &path(&name), None)?;
            println!("{name}");
        }
        GroupCmd::List { data_dir } => {
            let v = call_at(&data_dir, Method::GET, "/roost/consumergroups", None)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        GroupCmd::Delete { name, data_dir } => {
            call_at(&data_dir, Method::DELETE, &path(&name), None)?;
        }
    }
    Ok(())
}
