//! The engine's router, sans-IO: it owns the [`Directory`] and the [`CommandTracker`], takes
//! what the shards and the control link report, and says what must happen next. The engine
//! runs it on its control-link thread (one owner, no lock); tests drive it in memory.
//!
//! Inputs, in the order they happened: shards' claims and releases, their answers to
//! deliveries, device revocations from registry changes, commands from control, and the
//! clock. Outputs: a kick or a delivery for a shard, a frame for control.

use std::time::{Duration, Instant};

use roost_model::link::{CommandOutcome, DeviceCommand, EngineFrame, TwinOp};

use crate::commands::{CommandTracker, Route};
use crate::directory::{Directory, Holder};
use crate::reason::DisconnectReason;
use crate::twin_waits::TwinWaits;

/// How long a device's twin request waits for control before the router answers it with
/// 504 (control is down or too slow: the device must still get an answer).
pub const TWIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Ids of deliveries the router makes itself (answers it gives for control); control's own
/// command ids count up from 0 and never reach these.
const LOCAL_IDS: u64 = 1 << 63;

/// Something the router was told.
#[derive(Debug, Clone)]
pub enum RouterInput {
    /// A frame for control from a shard (connection state, activity), passed through.
    Report(EngineFrame),
    /// Connection `holder` authenticated as `client_id` (device `device_id`, module
    /// `module_id`) at Unix milliseconds `at_ms`.
    Claimed {
        client_id: String,
        device_id: String,
        module_id: Option<String>,
        holder: Holder,
        /// The CA its certificate chained to, if it authenticated through one.
        ca: Option<String>,
        at_ms: u64,
    },
    /// Connection `conn` of `client_id` ended at `at_ms`.
    Released {
        client_id: String,
        device_id: String,
        module_id: Option<String>,
        conn: u64,
        at_ms: u64,
    },
    /// A shard's answer to delivery `id`.
    CommandDone {
        id: u64,
        kind: &'static str,
        outcome: CommandOutcome,
    },
    /// From control: deliver `command` to `client_id`.
    Command {
        id: u64,
        client_id: String,
        command: DeviceCommand,
    },
    /// The device may no longer connect (disabled, deleted, keys changed): close every
    /// connection of it and its modules.
    Revoke { device_id: String },
    /// The CAs the hub trusts now (`x509::ca_id`): close every connection authenticated
    /// through another.
    TrustedCas { ids: Vec<String> },
    /// A connected client's twin request, for control.
    TwinRequest {
        client_id: String,
        device_id: String,
        module_id: Option<String>,
        rid: String,
        op: TwinOp,
    },
}

/// Something the router wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouterOutput {
    Kick {
        shard: usize,
        conn: u64,
        reason: DisconnectReason,
    },
    Deliver {
        shard: usize,
        id: u64,
        conn: u64,
        command: DeviceCommand,
    },
    /// A frame for control.
    ToControl(EngineFrame),
    /// A command finished (for metrics): its kind and outcome.
    Finished {
        kind: &'static str,
        outcome: CommandOutcome,
    },
}

#[derive(Debug)]
pub struct Router {
    directory: Directory,
    tracker: CommandTracker,
    /// Kind of each command in flight, for the metric of its outcome.
    kinds: std::collections::HashMap<u64, &'static str>,
    twin_waits: TwinWaits,
    next_local: u64,
}

impl Router {
    /// A router that answers `TimedOut` for a delivery a shard has not answered in `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            directory: Directory::default(),
            tracker: CommandTracker::new(timeout),
            kinds: std::collections::HashMap::new(),
            twin_waits: TwinWaits::new(TWIN_TIMEOUT),
            next_local: LOCAL_IDS,
        }
    }

    /// Twin requests waiting for control.
    pub fn twin_waits(&self) -> usize {
        self.twin_waits.len()
    }

    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Handles one input received at `now`; appends what must happen to `out`.
    pub fn handle(&mut self, now: Instant, input: RouterInput, out: &mut Vec<RouterOutput>) {
        match input {
            RouterInput::Report(frame) => out.push(RouterOutput::ToControl(frame)),
            RouterInput::Claimed {
                client_id,
                device_id,
                module_id,
                holder,
                ca,
                at_ms,
            } => {
                if let Some(old) = self.directory.claim(&client_id, holder, ca) {
                    out.push(RouterOutput::Kick {
                        shard: old.shard,
                        conn: old.conn,
                        reason: DisconnectReason::ReplacedByNewConnection,
                    });
                }
                out.push(RouterOutput::ToControl(EngineFrame::ConnectionState {
                    device_id,
                    module_id,
                    connected: true,
                    at_ms,
                }));
            }
            RouterInput::Released {
                client_id,
                device_id,
                module_id,
                conn,
                at_ms,
            } => {
                // Only the connection that still holds the client id says it left: the end of
                // a replaced connection is not the end of the client's presence.
                if self.directory.release(&client_id, conn) {
                    out.push(RouterOutput::ToControl(EngineFrame::ConnectionState {
                        device_id,
                        module_id,
                        connected: false,
                        at_ms,
                    }));
                }
            }
            RouterInput::TrustedCas { ids } => {
                for h in self.directory.anchored_outside(&ids) {
                    out.push(RouterOutput::Kick {
                        shard: h.shard,
                        conn: h.conn,
                        reason: DisconnectReason::CaRevoked,
                    });
                }
            }
            RouterInput::Revoke { device_id } => {
                for (_, h) in self.directory.clients_of_device(&device_id) {
                    out.push(RouterOutput::Kick {
                        shard: h.shard,
                        conn: h.conn,
                        reason: DisconnectReason::DeviceRevoked,
                    });
                }
            }
            RouterInput::TwinRequest {
                client_id,
                device_id,
                module_id,
                rid,
                op,
            } => {
                if self.twin_waits.submit(now, &client_id, &rid) {
                    out.push(RouterOutput::ToControl(EngineFrame::TwinRequest {
                        device_id,
                        module_id,
                        rid,
                        op,
                    }));
                } else {
                    let answer = twin_error(rid, 429, 429001, "too many twin requests in flight");
                    self.deliver_local(now, &client_id, answer, out);
                }
            }
            RouterInput::Command {
                id,
                client_id,
                command,
            } => {
                if let DeviceCommand::TwinResponse { rid, .. } = &command {
                    self.twin_waits.answered(&client_id, rid);
                }
                let kind = command.kind();
                match self.tracker.submit(&self.directory, now, id, &client_id) {
                    Route::Shard(h) => {
                        self.kinds.insert(id, kind);
                        out.push(RouterOutput::Deliver {
                            shard: h.shard,
                            id,
                            conn: h.conn,
                            command,
                        });
                    }
                    Route::Done(outcome) => Self::answer(out, id, kind, outcome),
                }
            }
            RouterInput::CommandDone { id, kind, outcome } => {
                if let Some(outcome) = self.tracker.on_answer(id, outcome) {
                    self.kinds.remove(&id);
                    Self::answer(out, id, kind, outcome);
                }
            }
        }
    }

    /// Answers every delivery whose shard did not answer in time, and every twin request
    /// control did not answer in time (504).
    pub fn handle_timeout(&mut self, now: Instant, out: &mut Vec<RouterOutput>) {
        for id in self.tracker.handle_timeout(now) {
            let kind = self.kinds.remove(&id).unwrap_or("unknown");
            Self::answer(out, id, kind, CommandOutcome::TimedOut);
        }
        for (client_id, rid) in self.twin_waits.expired(now) {
            let answer = twin_error(
                rid,
                504,
                504101,
                "the hub did not answer the twin request in time",
            );
            self.deliver_local(now, &client_id, answer, out);
        }
    }

    /// When [`Self::handle_timeout`] must next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.tracker.poll_timeout(), self.twin_waits.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Delivers a command the router itself gives (an answer on control's behalf).
    fn deliver_local(
        &mut self,
        now: Instant,
        client_id: &str,
        command: DeviceCommand,
        out: &mut Vec<RouterOutput>,
    ) {
        let id = self.next_local;
        self.next_local = self.next_local.wrapping_add(1).max(LOCAL_IDS);
        let kind = command.kind();
        match self.tracker.submit(&self.directory, now, id, client_id) {
            Route::Shard(h) => {
                self.kinds.insert(id, kind);
                out.push(RouterOutput::Deliver {
                    shard: h.shard,
                    id,
                    conn: h.conn,
                    command,
                });
            }
            Route::Done(outcome) => Self::answer(out, id, kind, outcome),
        }
    }

    fn answer(out: &mut Vec<RouterOutput>, id: u64, kind: &'static str, outcome: CommandOutcome) {
        if id < LOCAL_IDS {
            out.push(RouterOutput::ToControl(EngineFrame::CommandResult {
                id,
                outcome,
            }));
        }
        out.push(RouterOutput::Finished { kind, outcome });
    }
}

/// A twin response with an error `status` and an IoT Hub error body.
pub fn twin_error(rid: String, status: u16, code: u32, message: &str) -> DeviceCommand {
    DeviceCommand::TwinResponse {
        rid,
        status,
        version: None,
        body: format!(r#"{{"errorCode":{code},"message":"{message}"}}"#).into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    //! The command path, two-ended in memory: control → router → shard → the session's inbox
    //! → the answer back, with fake shards holding fake sessions (an inbox per connection).

    use std::collections::HashMap;

    use super::*;
    use crate::inbox::Inbox;

    /// A shard as the router sees it: connections by id, each with a session inbox.
    #[derive(Default)]
    struct FakeShard {
        sessions: HashMap<u64, Inbox>,
        closed: Vec<(u64, DisconnectReason)>,
        /// Deliveries this shard swallows without answering (a stuck shard).
        stuck: bool,
    }

    struct Engine {
        router: Router,
        shards: Vec<FakeShard>,
        to_control: Vec<EngineFrame>,
        finished: Vec<(&'static str, CommandOutcome)>,
        now: Instant,
    }

    impl Engine {
        fn new(shards: usize) -> Self {
            Self {
                router: Router::new(Duration::from_secs(10)),
                shards: (0..shards).map(|_| FakeShard::default()).collect(),
                to_control: Vec::new(),
                finished: Vec::new(),
                now: Instant::now(),
            }
        }

        /// Feeds one input and carries every output to its destination until nothing moves
        /// (bounded: a livelock fails instead of hanging).
        fn drive(&mut self, input: RouterInput) {
            let mut inputs = vec![input];
            for _ in 0..1000 {
                let Some(input) = inputs.pop() else { return };
                let mut out = Vec::new();
                self.router.handle(self.now, input, &mut out);
                for o in out {
                    if let Some(next) = self.carry(o) {
                        inputs.push(next);
                    }
                }
            }
            panic!("the command path did not settle");
        }

        fn carry(&mut self, o: RouterOutput) -> Option<RouterInput> {
            match o {
                RouterOutput::ToControl(f) => {
                    self.to_control.push(f);
                    None
                }
                RouterOutput::Finished { kind, outcome } => {
                    self.finished.push((kind, outcome));
                    None
                }
                RouterOutput::Kick {
                    shard,
                    conn,
                    reason,
                } => {
                    let s = &mut self.shards[shard];
                    if s.sessions.remove(&conn).is_some() {
                        s.closed.push((conn, reason));
                    }
                    None
                }
                RouterOutput::Deliver {
                    shard,
                    id,
                    conn,
                    command,
                } => {
                    let s = &mut self.shards[shard];
                    if s.stuck {
                        return None;
                    }
                    let kind = command.kind();
                    let outcome = match s.sessions.get_mut(&conn) {
                        None => CommandOutcome::NotConnected,
                        Some(inbox) => match inbox.push(command) {
                            Ok(()) => CommandOutcome::Delivered,
                            Err(_) => CommandOutcome::InboxFull,
                        },
                    };
                    Some(RouterInput::CommandDone { id, kind, outcome })
                }
            }
        }

        fn connect(&mut self, shard: usize, conn: u64, client_id: &str) {
            self.shards[shard].sessions.insert(conn, Inbox::new(2));
            let (device_id, module_id) = split(client_id);
            self.drive(RouterInput::Claimed {
                client_id: client_id.into(),
                device_id,
                module_id,
                holder: Holder { shard, conn },
                ca: None,
                at_ms: 1,
            });
        }

        fn disconnect(&mut self, shard: usize, conn: u64, client_id: &str) {
            self.shards[shard].sessions.remove(&conn);
            self.drive(released(client_id, conn));
        }

        /// (client id, connected) of every connection-state report, in order.
        fn presence(&self) -> Vec<(String, bool)> {
            self.to_control
                .iter()
                .filter_map(|f| match f {
                    EngineFrame::ConnectionState {
                        device_id,
                        module_id,
                        connected,
                        ..
                    } => Some((
                        crate::auth::client_id_of(device_id, module_id.as_deref()),
                        *connected,
                    )),
                    _ => None,
                })
                .collect()
        }

        fn command(&mut self, id: u64, client_id: &str) -> CommandOutcome {
            self.drive(RouterInput::Command {
                id,
                client_id: client_id.into(),
                command: DeviceCommand::MethodRequest {
                    name: "reboot".into(),
                    rid: id.to_string(),
                    payload: b"{}".to_vec(),
                },
            });
            self.outcome(id).expect("answered")
        }

        fn outcome(&self, id: u64) -> Option<CommandOutcome> {
            self.to_control.iter().rev().find_map(|f| match f {
                EngineFrame::CommandResult { id: i, outcome } if *i == id => Some(*outcome),
                _ => None,
            })
        }
    }

    fn split(client_id: &str) -> (String, Option<String>) {
        match client_id.split_once('/') {
            Some((d, m)) => (d.to_string(), Some(m.to_string())),
            None => (client_id.to_string(), None),
        }
    }

    fn released(client_id: &str, conn: u64) -> RouterInput {
        let (device_id, module_id) = split(client_id);
        RouterInput::Released {
            client_id: client_id.into(),
            device_id,
            module_id,
            conn,
            at_ms: 2,
        }
    }

    fn rid(cmd: &DeviceCommand) -> &str {
        match cmd {
            DeviceCommand::MethodRequest { rid, .. } => rid,
            _ => "",
        }
    }

    #[test]
    fn a_command_reaches_the_inbox_of_the_right_connection_and_is_answered() {
        let mut e = Engine::new(2);
        e.connect(0, 10, "dev");
        e.connect(1, 20, "dev/mod");
        assert_eq!(e.command(1, "dev/mod"), CommandOutcome::Delivered);
        assert_eq!(e.command(2, "dev"), CommandOutcome::Delivered);
        let module_inbox = e.shards[1].sessions.get_mut(&20).expect("module session");
        assert_eq!(rid(&module_inbox.pop().expect("one command")), "1");
        assert!(
            module_inbox.pop().is_none(),
            "the device's command went elsewhere"
        );
        let device_inbox = e.shards[0].sessions.get_mut(&10).expect("device session");
        assert_eq!(rid(&device_inbox.pop().expect("one command")), "2");
        assert!(
            e.shards.iter().all(|s| s.closed.is_empty()),
            "device and module coexist"
        );
        assert_eq!(
            e.finished,
            vec![
                ("method_request", CommandOutcome::Delivered),
                ("method_request", CommandOutcome::Delivered)
            ]
        );
    }

    #[test]
    fn an_offline_client_is_not_connected_and_a_full_inbox_says_so() {
        let mut e = Engine::new(1);
        assert_eq!(e.command(1, "dev"), CommandOutcome::NotConnected);
        e.connect(0, 10, "dev");
        assert_eq!(e.command(2, "dev"), CommandOutcome::Delivered);
        assert_eq!(e.command(3, "dev"), CommandOutcome::Delivered);
        assert_eq!(e.command(4, "dev"), CommandOutcome::InboxFull);
        e.disconnect(0, 10, "dev");
        assert_eq!(e.command(5, "dev"), CommandOutcome::NotConnected);
    }

    #[test]
    fn a_reconnect_on_another_shard_kicks_the_old_connection_and_takes_its_commands() {
        let mut e = Engine::new(2);
        e.connect(0, 10, "dev");
        e.connect(1, 20, "dev");
        assert_eq!(
            e.shards[0].closed,
            vec![(10, DisconnectReason::ReplacedByNewConnection)]
        );
        // The old connection's release arrives late: the new one stays in the directory, and
        // control hears nothing of the old one leaving.
        e.drive(released("dev", 10));
        assert_eq!(e.command(1, "dev"), CommandOutcome::Delivered);
        assert!(e.shards[1].sessions[&20].len() == 1);
        assert_eq!(
            e.presence(),
            vec![("dev".to_string(), true), ("dev".to_string(), true)]
        );
        e.disconnect(1, 20, "dev");
        assert_eq!(e.presence().last(), Some(&("dev".to_string(), false)));
    }

    #[test]
    fn a_revoked_device_loses_its_own_and_its_modules_connections_only() {
        let mut e = Engine::new(2);
        e.connect(0, 10, "dev");
        e.connect(1, 20, "dev/mod");
        e.connect(1, 30, "dev2");
        e.drive(RouterInput::Revoke {
            device_id: "dev".into(),
        });
        assert_eq!(
            e.shards[0].closed,
            vec![(10, DisconnectReason::DeviceRevoked)]
        );
        assert_eq!(
            e.shards[1].closed,
            vec![(20, DisconnectReason::DeviceRevoked)]
        );
        assert!(e.shards[1].sessions.contains_key(&30));
    }

    #[test]
    fn a_twin_request_goes_to_control_and_is_answered_for_when_control_is_silent() {
        let mut e = Engine::new(1);
        e.connect(0, 10, "dev");
        let request = |rid: &str| RouterInput::TwinRequest {
            client_id: "dev".into(),
            device_id: "dev".into(),
            module_id: None,
            rid: rid.into(),
            op: TwinOp::Get,
        };
        e.drive(request("a"));
        e.drive(request("b"));
        let sent: Vec<&str> = e
            .to_control
            .iter()
            .filter_map(|f| match f {
                EngineFrame::TwinRequest { rid, .. } => Some(rid.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(sent, ["a", "b"]);
        // Control answers "a"; "b" is never answered.
        e.drive(RouterInput::Command {
            id: 1,
            client_id: "dev".into(),
            command: DeviceCommand::TwinResponse {
                rid: "a".into(),
                status: 200,
                version: None,
                body: b"{}".to_vec(),
            },
        });
        let deadline = e.router.poll_timeout().expect("b waits");
        let mut out = Vec::new();
        e.router.handle_timeout(deadline, &mut out);
        for o in out {
            if let Some(next) = e.carry(o) {
                e.drive(next);
            }
        }
        let inbox = e.shards[0].sessions.get_mut(&10).expect("session");
        let statuses: Vec<(String, u16)> = std::iter::from_fn(|| inbox.pop())
            .map(|c| match c {
                DeviceCommand::TwinResponse { rid, status, .. } => (rid, status),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(statuses, [("a".to_string(), 200), ("b".to_string(), 504)]);
        // The router's own answer is not reported to control as a command result.
        let results = e
            .to_control
            .iter()
            .filter(|f| matches!(f, EngineFrame::CommandResult { .. }))
            .count();
        assert_eq!(results, 1);
        assert_eq!(e.router.twin_waits(), 0);
        assert_eq!(e.router.poll_timeout(), None);
    }

    #[test]
    fn a_shard_that_does_not_answer_times_out_once() {
        let mut e = Engine::new(1);
        e.connect(0, 10, "dev");
        e.shards[0].stuck = true;
        e.drive(RouterInput::Command {
            id: 7,
            client_id: "dev".into(),
            command: DeviceCommand::Disconnect {
                reason: "test".into(),
            },
        });
        assert_eq!(e.outcome(7), None);
        let deadline = e.router.poll_timeout().expect("armed");
        let mut out = Vec::new();
        e.router
            .handle_timeout(deadline - Duration::from_millis(1), &mut out);
        assert!(out.is_empty());
        e.router.handle_timeout(deadline, &mut out);
        for o in out {
            e.carry(o);
        }
        assert_eq!(e.outcome(7), Some(CommandOutcome::TimedOut));
        assert_eq!(e.finished, vec![("disconnect", CommandOutcome::TimedOut)]);
        // A late answer is dropped, not sent twice.
        e.drive(RouterInput::CommandDone {
            id: 7,
            kind: "disconnect",
            outcome: CommandOutcome::Delivered,
        });
        assert_eq!(
            e.to_control
                .iter()
                .filter(|f| matches!(f, EngineFrame::CommandResult { .. }))
                .count(),
            1
        );
    }
}
