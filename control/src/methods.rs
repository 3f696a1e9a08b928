//! Direct methods (spec §2.4, §4.4): `POST /twins/{id}/methods` sends a method request to the
//! engine holding the device and waits, without a thread, for the device's answer on
//! `$iothub/methods/res/{status}/?$rid=…`, which comes back over the control link.
//!
//! A call waits for the device to be connected and subscribed for up to
//! `connectTimeoutInSeconds` (404103 after that), then for its answer for up to
//! `responseTimeoutInSeconds` (504101 after that). Calls in flight are independent: each has its
//! own request id and waiter, so a slow device never delays another's call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roost_model::link::{CommandOutcome, DeviceCommand};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::linkserver::Commands;
use crate::metrics::ControlMetrics;
use crate::store::Store;

/// IoT Hub's bounds on a call's timeouts, in seconds.
const RESPONSE_TIMEOUT: std::ops::RangeInclusive<u64> = 5..=300;
const DEFAULT_RESPONSE_TIMEOUT: u64 = 30;
const MAX_CONNECT_TIMEOUT: u64 = 300;
/// The largest method payload IoT Hub takes (request and response).
pub const MAX_PAYLOAD: usize = 128 * 1024;
/// Calls waiting for devices at once; past it a call is refused (429).
const MAX_IN_FLIGHT: usize = 100_000;
/// How long the engine has to put a request in the device's inbox.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a call waiting for its device to connect or subscribe tries again.
const CONNECT_RETRY: Duration = Duration::from_millis(250);

/// A method call as the service sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodCall {
    pub name: String,
    pub payload: Value,
    pub response_timeout: Duration,
    pub connect_timeout: Duration,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct CallBody {
    method_name: Option<String>,
    #[serde(default)]
    payload: Value,
    response_timeout_in_seconds: Option<u64>,
    connect_timeout_in_seconds: Option<u64>,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MethodFailure {
    #[error("{0}")]
    BadRequest(String),
    #[error("device {0} is not registered")]
    DeviceNotFound(String),
    #[error("module {0} is not registered")]
    ModuleNotFound(String),
    #[error("the device is not connected, or has not subscribed to methods")]
    NotOnline,
    #[error("the device did not answer in time")]
    Timeout,
    #[error("too many method calls in flight")]
    TooMany,
    #[error("store: {0}")]
    Store(String),
}

impl MethodFailure {
    /// The label of the outcome metric.
    fn label(&self) -> &'static str {
        match self {
            MethodFailure::BadRequest(_) => "bad_request",
            MethodFailure::DeviceNotFound(_) | MethodFailure::ModuleNotFound(_) => "not_found",
            MethodFailure::NotOnline => "not_online",
            MethodFailure::Timeout => "timeout",
            MethodFailure::TooMany => "too_many",
            MethodFailure::Store(_) => "server_error",
        }
    }
}

impl MethodCall {
    /// Parses and checks a call's body (spec §4.4).
    pub fn parse(body: &[u8]) -> Result<MethodCall, MethodFailure> {
        let bad = |m: String| MethodFailure::BadRequest(m);
        let b: CallBody =
            serde_json::from_slice(body).map_err(|e| bad(format!("invalid method call: {e}")))?;
        let name = b
            .method_name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("methodName is required".into()))?;
        // It goes into an MQTT topic level: no separators, no wildcards.
        if name.len() > 1024 || name.contains(['/', '+', '#', '\0']) {
            return Err(bad(format!("invalid methodName {name:?}")));
        }
        let response = b
            .response_timeout_in_seconds
            .unwrap_or(DEFAULT_RESPONSE_TIMEOUT);
        if !RESPONSE_TIMEOUT.contains(&response) {
            return Err(bad(format!(
                "responseTimeoutInSeconds must be from {} to {}, not {response}",
                RESPONSE_TIMEOUT.start(),
                RESPONSE_TIMEOUT.end()
            )));
        }
        let connect = b.connect_timeout_in_seconds.unwrap_or(0);
        if connect > MAX_CONNECT_TIMEOUT {
            return Err(bad(format!(
                "connectTimeoutInSeconds must be at most {MAX_CONNECT_TIMEOUT}, not {connect}"
            )));
        }
        if b.payload.to_string().len() > MAX_PAYLOAD {
            return Err(bad(format!("the payload is over {MAX_PAYLOAD} bytes")));
        }
        Ok(MethodCall {
            name,
            payload: b.payload,
            response_timeout: Duration::from_secs(response),
            connect_timeout: Duration::from_secs(connect),
        })
    }
}

/// The device's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodResult {
    pub status: u16,
    pub payload: Value,
}

struct Waiting {
    client_id: String,
    answer: oneshot::Sender<MethodResult>,
}

pub struct Methods {
    pub store: Arc<Store>,
    pub commands: Arc<Commands>,
    pub metrics: Arc<ControlMetrics>,
    waiting: Mutex<HashMap<String, Waiting>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A request id no earlier call (nor a device replaying an old one) can match.
fn new_rid() -> String {
    let mut b = [0u8; 12];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Removes a call's waiter however the call ends.
struct Forget<'a> {
    methods: &'a Methods,
    rid: String,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        locked(&self.methods.waiting).remove(&self.rid);
    }
}

impl Methods {
    pub fn new(store: Arc<Store>, commands: Arc<Commands>, metrics: Arc<ControlMetrics>) -> Self {
        Self {
            store,
            commands,
            metrics,
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// Invokes `call` on `device_id` (or its module) and waits for the answer.
    pub async fn invoke(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        call: MethodCall,
    ) -> Result<MethodResult, MethodFailure> {
        let started = Instant::now();
        let result = self.call(device_id, module_id, call).await;
        let outcome = match &result {
            Ok(_) => "answered",
            Err(e) => e.label(),
        };
        self.metrics
            .method_calls
            .with_label_values(&[outcome])
            .inc();
        if result.is_ok() {
            self.metrics
                .method_latency
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    async fn call(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        call: MethodCall,
    ) -> Result<MethodResult, MethodFailure> {
        let device = self
            .store
            .device(device_id)
            .map_err(|e| MethodFailure::Store(e.to_string()))?;
        if device.is_none() {
            return Err(MethodFailure::DeviceNotFound(device_id.to_string()));
        }
        let client_id = match module_id {
            None => device_id.to_string(),
            Some(m) => {
                let module = self
                    .store
                    .module(device_id, m)
                    .map_err(|e| MethodFailure::Store(e.to_string()))?;
                if module.is_none() {
                    return Err(MethodFailure::ModuleNotFound(format!("{device_id}/{m}")));
                }
                format!("{device_id}/{m}")
            }
        };
        let rid = new_rid();
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = locked(&self.waiting);
            if waiting.len() >= MAX_IN_FLIGHT {
                return Err(MethodFailure::TooMany);
            }
            waiting.insert(
                rid.clone(),
                Waiting {
                    client_id: client_id.clone(),
                    answer: tx,
                },
            );
        }
        let _forget = Forget {
            methods: self,
            rid: rid.clone(),
        };
        let payload = call.payload.to_string().into_bytes();
        let connect_by = Instant::now() + call.connect_timeout;
        loop {
            let command = DeviceCommand::MethodRequest {
                name: call.name.clone(),
                rid: rid.clone(),
                payload: payload.clone(),
            };
            match self
                .commands
                .send(&client_id, command, DELIVERY_TIMEOUT)
                .await
            {
                CommandOutcome::Delivered => break,
                CommandOutcome::InboxFull => return Err(MethodFailure::TooMany),
                CommandOutcome::NotConnected
                | CommandOutcome::NotSubscribed
                | CommandOutcome::TimedOut => {
                    if Instant::now() + CONNECT_RETRY > connect_by {
                        return Err(MethodFailure::NotOnline);
                    }
                    tokio::time::sleep(CONNECT_RETRY).await;
                }
            }
        }
        match tokio::time::timeout(call.response_timeout, rx).await {
            Ok(Ok(result)) => Ok(result),
            _ => Err(MethodFailure::Timeout),
        }
    }

    /// A device's answer from an engine: completes the call waiting for `rid` if `client_id`
    /// is the client it was sent to (a device cannot answer another's call).
    pub fn on_response(&self, client_id: &str, rid: &str, status: u16, payload: &[u8]) {
        let mut waiting = locked(&self.waiting);
        if !waiting.get(rid).is_some_and(|w| w.client_id == client_id) {
            return;
        }
        let Some(w) = waiting.remove(rid) else { return };
        drop(waiting);
        let _ = w.answer.send(MethodResult {
            status,
            payload: response_payload(payload),
        });
    }

    pub fn in_flight(&self) -> usize {
        locked(&self.waiting).len()
    }
}

/// A device's response body as the REST answer's `payload`: its JSON (an empty body is
/// `null`); a body that is not JSON is passed on as a string.
fn response_payload(body: &[u8]) -> Value {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_body_is_checked_as_iot_hub_does() {
        let c = MethodCall::parse(br#"{"methodName":"reboot","payload":{"delay":5}}"#).unwrap();
        assert_eq!(c.name, "reboot");
        assert_eq!(c.response_timeout, Duration::from_secs(30));
        assert_eq!(c.connect_timeout, Duration::ZERO);
        let c = MethodCall::parse(
            br#"{"methodName":"m","responseTimeoutInSeconds":5,"connectTimeoutInSeconds":300}"#,
        )
        .unwrap();
        assert_eq!(c.payload, Value::Null);
        assert_eq!(c.response_timeout, Duration::from_secs(5));
        for bad in [
            &br#"{"payload":1}"#[..],
            br#"{"methodName":""}"#,
            br#"{"methodName":"a/b"}"#,
            br#"{"methodName":"m","responseTimeoutInSeconds":4}"#,
            br#"{"methodName":"m","responseTimeoutInSeconds":301}"#,
            br#"{"methodName":"m","connectTimeoutInSeconds":301}"#,
            b"not json",
        ] {
            assert!(
                matches!(MethodCall::parse(bad), Err(MethodFailure::BadRequest(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let big = format!(
            r#"{{"methodName":"m","payload":"{}"}}"#,
            "x".repeat(MAX_PAYLOAD)
        );
        assert!(MethodCall::parse(big.as_bytes()).is_err());
    }

    fn methods() -> (Methods, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "roost-methods-test-{}-{}",
            std::process::id(),
            new_rid()
        ));
        let store = Store::open(&dir).expect("store");
        let device = crate::device::Device {
            device_id: "d1".into(),
            generation_id: "1".into(),
            etag: "e".into(),
            connection_state: "Connected".into(),
            status: "enabled".into(),
            status_reason: None,
            connection_state_updated_time: String::new(),
            status_updated_time: String::new(),
            last_activity_time: String::new(),
            cloud_to_device_message_count: 0,
            authentication: Default::default(),
            capabilities: Default::default(),
            device_scope: None,
            parent_scopes: Vec::new(),
        };
        store.put_device(&device, true).expect("device");
        let m = Methods::new(
            store,
            Arc::new(Commands::default()),
            Arc::new(ControlMetrics::new()),
        );
        (m, dir)
    }

    fn call(response_ms: u64, connect_ms: u64) -> MethodCall {
        MethodCall {
            name: "reboot".into(),
            payload: serde_json::json!({"delay": 1}),
            response_timeout: Duration::from_millis(response_ms),
            connect_timeout: Duration::from_millis(connect_ms),
        }
    }

    #[tokio::test]
    async fn a_call_reaches_its_device_and_only_that_device_answers_it() {
        let (m, dir) = methods();
        let m = Arc::new(m);
        assert_eq!(
            m.invoke("ghost", None, call(1000, 0)).await,
            Err(MethodFailure::DeviceNotFound("ghost".into()))
        );
        assert_eq!(
            m.invoke("d1", None, call(1000, 0)).await,
            Err(MethodFailure::NotOnline)
        );
        // Connected on a link: the request goes there, the engine says delivered, the device
        // answers; another device's answer with the same rid changes nothing.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let link = m.commands.add_link(tx);
        m.commands.connection_state(link, "d1", true);
        let caller = {
            let m = m.clone();
            tokio::spawn(async move { m.invoke("d1", None, call(5000, 0)).await })
        };
        let Some(roost_model::link::ControlFrame::Command {
            id,
            client_id,
            command,
        }) = rx.recv().await
        else {
            panic!("a command on the link");
        };
        assert_eq!(client_id, "d1");
        let DeviceCommand::MethodRequest { name, rid, payload } = command else {
            panic!("a method request")
        };
        assert_eq!(name, "reboot");
        assert_eq!(payload, br#"{"delay":1}"#);
        m.commands.answer(id, CommandOutcome::Delivered);
        m.on_response("d2", &rid, 200, b"{}");
        assert_eq!(
            m.in_flight(),
            1,
            "a foreign answer does not complete the call"
        );
        m.on_response("d1", &rid, 201, br#"{"done":true}"#);
        let result = caller.await.expect("task");
        assert_eq!(
            result,
            Ok(MethodResult {
                status: 201,
                payload: serde_json::json!({"done": true})
            })
        );
        assert_eq!(m.in_flight(), 0);
        // Delivered but never answered: 504 after the response timeout, and forgotten.
        let caller = {
            let m = m.clone();
            tokio::spawn(async move { m.invoke("d1", None, call(50, 0)).await })
        };
        let Some(roost_model::link::ControlFrame::Command { id, .. }) = rx.recv().await else {
            panic!()
        };
        m.commands.answer(id, CommandOutcome::Delivered);
        assert_eq!(caller.await.expect("task"), Err(MethodFailure::Timeout));
        assert_eq!(m.in_flight(), 0);
        // Not subscribed, then subscribed within the connect timeout: delivered on a retry.
        let caller = {
            let m = m.clone();
            tokio::spawn(async move { m.invoke("d1", None, call(5000, 2000)).await })
        };
        let Some(roost_model::link::ControlFrame::Command { id, .. }) = rx.recv().await else {
            panic!()
        };
        m.commands.answer(id, CommandOutcome::NotSubscribed);
        let Some(roost_model::link::ControlFrame::Command { id, command, .. }) = rx.recv().await
        else {
            panic!()
        };
        m.commands.answer(id, CommandOutcome::Delivered);
        let DeviceCommand::MethodRequest { rid, .. } = command else {
            panic!()
        };
        m.on_response("d1", &rid, 200, b"");
        assert_eq!(
            caller.await.expect("task"),
            Ok(MethodResult {
                status: 200,
                payload: Value::Null
            })
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_response_payload_is_json_or_null_or_a_string() {
        assert_eq!(response_payload(b""), Value::Null);
        assert_eq!(response_payload(b"null"), Value::Null);
        assert_eq!(
            response_payload(br#"{"ok":true}"#),
            serde_json::json!({"ok": true})
        );
        assert_eq!(response_payload(b"plain"), Value::String("plain".into()));
    }
}
