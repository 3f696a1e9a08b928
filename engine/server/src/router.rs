//! The engine's router task, on the control-link thread: it owns the device directory
//! (`roost_session::Router`), so claims from every shard, commands from control and their
//! answers meet in one place with no lock. Shards reach it through a [`RouterTx`]; it reaches
//! shards through their command channels and control through the link's queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::Sender;
use roost_model::link::EngineFrame;
use roost_session::{Router, RouterOutput};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

pub use roost_session::RouterInput;

use crate::metrics::Metrics;
use crate::shard::ShardCommand;

/// A shard that has not answered a delivery in this long is answered for with `TimedOut`.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// The router's input. Sending never blocks a shard; after shutdown it is a no-op.
#[derive(Clone)]
pub struct RouterTx(UnboundedSender<RouterInput>);

impl RouterTx {
    pub fn channel() -> (Self, UnboundedReceiver<RouterInput>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Self(tx), rx)
    }

    pub fn send(&self, input: RouterInput) {
        let _ = self.0.send(input);
    }

    /// A frame for control, through the router (so it keeps its order with claims).
    pub fn report(&self, frame: EngineFrame) {
        self.send(RouterInput::Report(frame));
    }
}

/// Runs until every [`RouterTx`] is dropped.
pub async fn run(
    mut inputs: UnboundedReceiver<RouterInput>,
    shards: Vec<Sender<ShardCommand>>,
    to_control: UnboundedSender<EngineFrame>,
    metrics: Arc<Metrics>,
) {
    let mut router = Router::new(COMMAND_TIMEOUT);
    let mut out = Vec::new();
    loop {
        let timeout = router.poll_timeout();
        let timer = async {
            match timeout {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            input = inputs.recv() => match input {
                Some(input) => router.handle(Instant::now(), input, &mut out),
                None => return,
            },
            _ = timer => router.handle_timeout(Instant::now(), &mut out),
        }
        for o in out.drain(..) {
            match o {
                RouterOutput::ToControl(frame) => {
                    let _ = to_control.send(frame);
                }
                RouterOutput::Finished { kind, outcome } => metrics
                    .commands
                    .with_label_values(&[kind, outcome.error_code()])
                    .inc(),
                RouterOutput::Kick {
                    shard,
                    conn,
                    reason,
                } => send(&shards, shard, ShardCommand::Kick { conn, reason }),
                RouterOutput::Deliver {
                    shard,
                    id,
                    conn,
                    command,
                } => send(&shards, shard, ShardCommand::Deliver { id, conn, command }),
            }
        }
    }
}

/// Shards drain their commands on their housekeeping tick (every 100 ms).
fn send(shards: &[Sender<ShardCommand>], shard: usize, cmd: ShardCommand) {
    if let Some(tx) = shards.get(shard) {
        let _ = tx.send(cmd);
    }
}
