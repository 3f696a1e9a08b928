//! Who the generator talks to and as whom: a roost hub (IoT Hub devices with SAS tokens and
//! telemetry topics with a property bag) or a peer MQTT broker (anonymous clients on
//! `bench/{i}`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{handshake, FrameReader};
use crate::frame;
use crate::hub::{self, Hub};
use crate::net::{self, Sources, Stream, Transport};

/// Keep-alive sent in CONNECT: IoT Hub's largest (1177 s). Runs are shorter than the 1.5×
/// silence a broker allows, so no PINGREQ is ever needed.
pub const KEEP_ALIVE: u16 = 1177;
/// Longest a run may hold a connection without traffic (below 1.5 × [`KEEP_ALIVE`]).
pub const MAX_SILENCE: Duration = Duration::from_secs(1500);
/// SAS tokens are valid this long; runs are bounded well below.
const TOKEN_TTL_SECS: u64 = 3 * 3600;

pub enum Kind {
    Roost { hub: Hub, key: String },
    Mqtt,
}

pub struct Target {
    pub kind: Kind,
    pub addr: SocketAddr,
    pub transport: Transport,
    pub sources: Sources,
    pub prefix: String,
    /// Run id, in every payload stamp and (roost) in the `run` application property.
    pub run: u64,
    pub max_frame: usize,
}

impl Target {
    pub fn client_id(&self, i: usize) -> String {
        format!("{}{i}", self.prefix)
    }

    /// Connection `i` as errors name it: index, client id and address.
    fn describe(&self, i: usize) -> String {
        format!("connection {i} ({}) to {}", self.client_id(i), self.addr)
    }

    /// The `run` application property value roost records carry.
    pub fn run_prop(&self) -> String {
        format!("{:016x}", self.run)
    }

    pub fn topic(&self, i: usize) -> String {
        match &self.kind {
            Kind::Roost { .. } => roost_topic(&self.client_id(i), &self.run_prop()),
            Kind::Mqtt => format!("bench/{i}"),
        }
    }

    pub fn connect_frame(&self, i: usize) -> anyhow::Result<Bytes> {
        let id = self.client_id(i);
        match &self.kind {
            Kind::Roost { hub, key } => {
                let (client_id, username, token) =
                    hub::device_credentials(&hub.hostname, &id, key, TOKEN_TTL_SECS)?;
                Ok(frame::connect(
                    &client_id,
                    Some(&username),
                    Some(&token),
                    KEEP_ALIVE,
                )?)
            }
            Kind::Mqtt => Ok(frame::connect(&id, None, None, KEEP_ALIVE)?),
        }
    }

    /// Connects connection `i` and completes its MQTT handshake with `connect`.
    pub async fn open_with(
        &self,
        connect: &[u8],
        timeout: Duration,
    ) -> anyhow::Result<(Stream, FrameReader)> {
        let mut stream =
            net::connect(self.addr, self.sources.next(), &self.transport, timeout).await?;
        let reader = handshake(&mut stream, connect, self.max_frame, timeout).await?;
        Ok((stream, reader))
    }

    pub async fn open(&self, i: usize, timeout: Duration) -> anyhow::Result<(Stream, FrameReader)> {
        let connect = self.connect_frame(i)?;
        self.open_with(&connect, timeout).await
    }
}

/// A device's telemetry topic with the bag `$.ct=application/octet-stream&run={run}`.
fn roost_topic(device: &str, run_prop: &str) -> String {
    let bag = format!("%24.ct=application%2Foctet-stream&run={run_prop}");
    roost_iothub::topic::telemetry_topic(device, None, &bag)
}

/// Opens connections `0..n` with at most `concurrency` handshakes in flight; any failure fails
/// the whole set (the rest are dropped).
pub async fn open_all(
    target: Arc<Target>,
    n: usize,
    concurrency: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<(Stream, FrameReader)>> {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    let mut out: Vec<Option<(Stream, FrameReader)>> = (0..n).map(|_| None).collect();
    for i in 0..n {
        let permit = permits.clone().acquire_owned().await?;
        let t = target.clone();
        set.spawn(async move {
            let r = t.open(i, timeout).await;
            drop(permit);
            (i, r)
        });
        // Collect finished ones as we go, so a failure stops the loop early.
        while let Some(done) = set.try_join_next() {
            let (i, r) = done?;
            out[i] = Some(r.with_context(|| target.describe(i))?);
        }
    }
    while let Some(done) = set.join_next().await {
        let (i, r) = done?;
        out[i] = Some(r.with_context(|| target.describe(i))?);
    }
    out.into_iter()
        .enumerate()
        .map(|(i, c)| c.with_context(|| format!("connection {i} did not finish")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mqtt_target() -> Target {
        let addr: SocketAddr = "127.0.0.1:1883".parse().expect("addr");
        Target {
            kind: Kind::Mqtt,
            addr,
            transport: Transport::Plain,
            sources: Sources::for_target(addr),
            prefix: "b-".into(),
            run: 0xab,
            max_frame: 1 << 20,
        }
    }

    #[test]
    fn peer_topics_and_ids() {
        let t = mqtt_target();
        assert_eq!(t.topic(12), "bench/12");
        assert_eq!(t.client_id(12), "b-12");
        assert_eq!(t.run_prop(), "00000000000000ab");
    }

    #[test]
    fn roost_topic_carries_the_run_property() {
        let topic = roost_topic("b-3", "00000000000000ab");
        let parsed = roost_iothub::topic::parse_publish_topic(&topic).expect("a telemetry topic");
        let roost_iothub::topic::DeviceTopic::Telemetry { device, bag, .. } = parsed else {
            panic!("not telemetry")
        };
        assert_eq!(device, "b-3");
        let bag = roost_iothub::props::decode_bag(bag).expect("bag");
        assert_eq!(
            bag.system.content_type.as_deref(),
            Some("application/octet-stream")
        );
        assert_eq!(
            bag.app,
            vec![("run".to_string(), "00000000000000ab".to_string())]
        );
    }
}
