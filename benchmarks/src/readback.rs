//! Reading the messages back: roost's `events` consumer API (ops port), or one MQTT subscriber
//! on `bench/#` for peer brokers. Both feed a [`Tally`] of what arrived.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::BytesMut;
use hdrhistogram::Histogram;
use hyper::Method;
use roost_mqtt::{encode_puback, Packet, QoS, SubackCode};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::client::{handshake, FrameReader};
use crate::net::{self, Sources, Transport};
use crate::stamp::Stamp;
use crate::{frame, unix_nanos};

/// Records asked for per consumer-API call.
const PAGE: usize = 5000;
/// Pause after a poll that found nothing new (part of roost's measured end-to-end latency).
const IDLE_POLL: Duration = Duration::from_millis(2);

/// A set of sequence numbers.
#[derive(Debug, Default, Clone)]
pub struct SeqSet(Vec<u64>);

impl SeqSet {
    /// Adds `seq`; false if it was already there.
    pub fn insert(&mut self, seq: u32) -> bool {
        let (word, bit) = (seq as usize / 64, seq % 64);
        if word >= self.0.len() {
            self.0.resize(word + 1, 0);
        }
        let had = self.0[word] & (1 << bit) != 0;
        self.0[word] |= 1 << bit;
        !had
    }

    pub fn len(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Members of `self` that `other` lacks.
    pub fn missing_from(&self, other: &SeqSet) -> u64 {
        self.0
            .iter()
            .enumerate()
            .map(|(i, w)| u64::from((w & !other.0.get(i).copied().unwrap_or(0)).count_ones()))
            .sum()
    }
}

/// What the reader saw.
pub struct Tally {
    run: u64,
    pub received: Vec<SeqSet>,
    pub unique: u64,
    pub duplicates: u64,
    /// Messages of other runs, unstamped, or from a connection this run did not open.
    pub stray: u64,
    /// End-to-end latency in µs of messages sent at or after `measure_from_ns`.
    pub e2e: Histogram<u64>,
    measure_from_ns: u64,
    /// Unique messages sent at or after `measure_from_ns`.
    pub measured: u64,
    pub last_at: Option<Instant>,
}

impl Tally {
    pub fn new(run: u64, conns: usize, measure_from_ns: u64) -> anyhow::Result<Self> {
        Ok(Tally {
            run,
            received: vec![SeqSet::default(); conns],
            unique: 0,
            duplicates: 0,
            stray: 0,
            e2e: latency_histogram()?,
            measure_from_ns,
            measured: 0,
            last_at: None,
        })
    }

    /// Counts one payload that arrived at `now_ns` (Unix nanoseconds).
    pub fn record(&mut self, payload: &[u8], now_ns: u64) {
        // hot path: one per message read back.
        let Some(s) = Stamp::read(payload).filter(|s| s.run == self.run) else {
            self.stray += 1;
            return;
        };
        let Some(seen) = self.received.get_mut(s.conn as usize) else {
            self.stray += 1;
            return;
        };
        if !seen.insert(s.seq) {
            self.duplicates += 1;
            return;
        }
        self.unique += 1;
        if s.sent_ns >= self.measure_from_ns {
            self.measured += 1;
            let _ = self.e2e.record(now_ns.saturating_sub(s.sent_ns) / 1000);
        }
    }
}

/// An HDR histogram of microseconds from 1 µs to 10 minutes, 3 significant digits.
pub fn latency_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

/// When the reader may stop: once every message published arrived (the count is known when
/// publishing ends), or once nothing new arrived for `drain` after publishing ended, and at the
/// latest `max_drain` after publishing ended. A reader still catching up on a backlog keeps
/// reading; one waiting for messages that will never come stops after `drain`.
pub struct Goal {
    start: Instant,
    drain_ms: u64,
    max_drain_ms: u64,
    expected: AtomicU64,
    /// Publishing end, ms since `start` (`u64::MAX` while publishing).
    end_ms: AtomicU64,
    /// Last time the reader got a new message, ms since `start`.
    progress_ms: AtomicU64,
}

impl Goal {
    pub fn new(drain: Duration, max_drain: Duration) -> Self {
        Goal {
            start: Instant::now(),
            drain_ms: drain.as_millis() as u64,
            max_drain_ms: max_drain.max(drain).as_millis() as u64,
            expected: AtomicU64::new(u64::MAX),
            end_ms: AtomicU64::new(u64::MAX),
            progress_ms: AtomicU64::new(0),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_millis() as u64
    }

    /// Publishing ended at `end` with `expected` messages out.
    pub fn set(&self, expected: u64, end: Instant) {
        self.expected.store(expected, Ordering::Release);
        self.end_ms.store(self.ms(end), Ordering::Release);
    }

    /// The reader got new messages now.
    pub fn progress(&self) {
        self.progress_ms
            .fetch_max(self.ms(Instant::now()), Ordering::Relaxed);
    }

    pub fn reached(&self, unique: u64) -> bool {
        self.reached_at(unique, Instant::now())
    }

    fn reached_at(&self, unique: u64, now: Instant) -> bool {
        if unique >= self.expected.load(Ordering::Acquire) {
            return true;
        }
        let end = self.end_ms.load(Ordering::Acquire);
        if end == u64::MAX {
            return false;
        }
        let now = self.ms(now);
        let quiet_since = end.max(self.progress_ms.load(Ordering::Relaxed));
        now >= end.saturating_add(self.max_drain_ms)
            || now >= quiet_since.saturating_add(self.drain_ms)
    }
}

#[derive(Deserialize)]
struct Partitions {
    partitions: Vec<PartitionInfo>,
}

/// One partition of the events log, as the consumer API lists it.
#[derive(Deserialize)]
pub struct PartitionInfo {
    pub partition: usize,
    /// Its oldest record kept.
    pub first: u64,
    /// The offset its next record gets.
    pub next: u64,
}

#[derive(Deserialize)]
struct Page<'a> {
    #[serde(borrow)]
    records: Vec<Record<'a>>,
    next: u64,
}

#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow)]
    body: Cow<'a, str>,
    #[serde(rename = "bodyEncoding", borrow, default)]
    body_encoding: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    properties: HashMap<Cow<'a, str>, Cow<'a, str>>,
}

/// The engine's ops port: its URL and the header its requests carry (the ops token).
#[derive(Debug, Clone)]
pub struct OpsEndpoint {
    pub url: String,
    pub auth: Vec<(&'static str, String)>,
}

impl OpsEndpoint {
    /// The events log's partitions as they are now.
    pub async fn partitions(&self) -> anyhow::Result<Vec<PartitionInfo>> {
        let mut client = roost_common::client::Client::new(&self.url, None)?;
        let resp = self
            .get(&mut client, "/events/partitions")
            .await
            .context("reading the events partitions")?;
        let p: Partitions = serde_json::from_slice(&resp.body).context("events partitions JSON")?;
        Ok(p.partitions)
    }

    pub async fn get(
        &self,
        client: &mut roost_common::client::Client,
        path: &str,
    ) -> anyhow::Result<roost_common::client::Response> {
        let resp = client.request(Method::GET, path, &self.auth, None).await?;
        if resp.status != 200 {
            bail!(
                "GET {}{path} answered {}: {}",
                self.url,
                resp.status,
                resp.text()
            );
        }
        Ok(resp)
    }
}

/// A reader of roost's `events` log from the offsets it had when the reader was created: one
/// fetcher per partition (requests and JSON decoding in parallel), feeding one tally.
pub struct OpsReader {
    ops: OpsEndpoint,
    positions: Vec<(usize, u64)>,
    run_prop: Arc<str>,
}

/// Payloads of this run from one page of records.
struct Batch {
    payloads: Vec<Vec<u8>>,
    stray: u64,
    now_ns: u64,
    at: Instant,
}

impl OpsReader {
    /// Notes where every partition ends now; only messages after that are read.
    pub async fn start(ops: &OpsEndpoint, run_prop: String) -> anyhow::Result<Self> {
        let positions = partition_ends(ops).await?;
        if positions.is_empty() {
            bail!("the events log has no partitions");
        }
        Ok(OpsReader {
            ops: ops.clone(),
            positions,
            run_prop: run_prop.into(),
        })
    }

    /// Reads until the goal is reached; also returns how many records were still unread in the
    /// log at that point (non-zero means the reader fell behind, so "lost" is an upper bound).
    pub async fn run(self, mut tally: Tally, goal: Arc<Goal>) -> anyhow::Result<(Tally, u64)> {
        let unique = Arc::new(AtomicU64::new(0));
        let (tx, mut rx) = mpsc::channel::<Batch>(16);
        let mut fetchers = JoinSet::new();
        for &(partition, from) in &self.positions {
            let (tx, goal, unique) = (tx.clone(), goal.clone(), unique.clone());
            let (ops, run_prop) = (self.ops.clone(), self.run_prop.clone());
            fetchers.spawn(async move {
                fetch(&ops, partition, from, &run_prop, tx, &goal, &unique)
                    .await
                    .map(|next| (partition, next))
            });
        }
        drop(tx);
        while let Some(batch) = rx.recv().await {
            for p in &batch.payloads {
                tally.record(p, batch.now_ns);
            }
            tally.stray += batch.stray;
            tally.last_at = Some(batch.at);
            if tally.unique > unique.swap(tally.unique, Ordering::Relaxed) {
                goal.progress();
            }
        }
        let mut read_to = Vec::new();
        while let Some(done) = fetchers.join_next().await {
            read_to.push(done.context("a partition reader panicked")??);
        }
        let ends = partition_ends(&self.ops).await?;
        let behind = ends
            .iter()
            .map(|(p, end)| {
                end.saturating_sub(
                    read_to
                        .iter()
                        .find(|(q, _)| q == p)
                        .map_or(*end, |(_, n)| *n),
                )
            })
            .sum();
        Ok((tally, behind))
    }
}

/// `(partition, next offset)` of every partition of the events log.
async fn partition_ends(ops: &OpsEndpoint) -> anyhow::Result<Vec<(usize, u64)>> {
    let parts = ops.partitions().await?;
    Ok(parts.iter().map(|p| (p.partition, p.next)).collect())
}

/// Reads one partition from `next` until the goal is reached; returns where it got to.
async fn fetch(
    ops: &OpsEndpoint,
    partition: usize,
    mut next: u64,
    run_prop: &str,
    tx: mpsc::Sender<Batch>,
    goal: &Goal,
    unique: &AtomicU64,
) -> anyhow::Result<u64> {
    let mut client = roost_common::client::Client::new(&ops.url, None)?;
    while !goal.reached(unique.load(Ordering::Relaxed)) {
        let path = format!("/events/partitions/{partition}/records?from={next}&max={PAGE}");
        let resp = ops.get(&mut client, &path).await?;
        let (now_ns, at) = (unix_nanos(), Instant::now());
        let page: Page<'_> = serde_json::from_slice(&resp.body)
            .with_context(|| format!("records JSON from {path}"))?;
        next = page.next.max(next);
        if page.records.is_empty() {
            tokio::time::sleep(IDLE_POLL).await;
            continue;
        }
        let mut batch = Batch {
            payloads: Vec::with_capacity(page.records.len()),
            stray: 0,
            now_ns,
            at,
        };
        for r in &page.records {
            if r.properties.get("run").map(|v| v.as_ref()) != Some(run_prop) {
                continue;
            }
            match r.body_encoding.as_deref() {
                Some("base64") => match STANDARD.decode(r.body.as_bytes()) {
                    Ok(body) => batch.payloads.push(body),
                    Err(_) => batch.stray += 1,
                },
                _ => batch.payloads.push(r.body.as_bytes().to_vec()),
            }
        }
        if tx.send(batch).await.is_err() {
            break;
        }
    }
    Ok(next)
}

/// One MQTT subscriber on `filter`, connected and subscribed.
pub struct Subscriber {
    stream: net::Stream,
    reader: FrameReader,
    qos: QoS,
}

impl Subscriber {
    pub async fn connect(
        target: SocketAddr,
        transport: &Transport,
        client_id: &str,
        filter: &str,
        qos: QoS,
        max_frame: usize,
    ) -> anyhow::Result<Self> {
        let timeout = Duration::from_secs(10);
        let mut stream = net::connect(
            target,
            Sources::for_target(target).next(),
            transport,
            timeout,
        )
        .await
        .context("subscriber")?;
        let connect = frame::connect(client_id, None, None, 1177)?;
        let mut reader = handshake(&mut stream, &connect, max_frame, timeout)
            .await
            .context("subscriber CONNECT")?;
        stream.write_all(&frame::subscribe(1, filter, qos)?).await?;
        let granted = tokio::time::timeout(timeout, async {
            loop {
                match reader.next(&mut stream).await? {
                    Some(Packet::SubAck(ack)) => return Ok(ack.codes.first().copied()),
                    Some(_) => continue,
                    None => bail!("the broker closed the subscriber before SUBACK"),
                }
            }
        })
        .await
        .context("no SUBACK within 10 s")??;
        let qos = match granted {
            Some(SubackCode::Granted(q)) => q,
            _ => bail!("the broker refused the subscription to {filter}"),
        };
        Ok(Subscriber {
            stream,
            reader,
            qos,
        })
    }

    pub async fn run(mut self, mut tally: Tally, goal: Arc<Goal>) -> anyhow::Result<Tally> {
        let mut acks = BytesMut::new();
        while !goal.reached(tally.unique) {
            match tokio::time::timeout(
                Duration::from_millis(50),
                self.reader.fill(&mut self.stream),
            )
            .await
            {
                Err(_) => continue,
                Ok(Err(e)) => return Err(e.context("subscriber read")),
                Ok(Ok(0)) => bail!("the broker closed the subscriber connection"),
                Ok(Ok(_)) => {}
            }
            let now = unix_nanos();
            let before = tally.unique;
            while let Some(p) = self.reader.buffered()? {
                if let Packet::Publish(p) = p {
                    tally.record(&p.payload, now);
                    if p.qos == QoS::AtLeastOnce && self.qos != QoS::AtMostOnce {
                        encode_puback(p.pkid, &mut acks);
                    }
                }
            }
            tally.last_at = Some(Instant::now());
            if tally.unique > before {
                goal.progress();
            }
            if !acks.is_empty() {
                self.stream
                    .write_all(&acks)
                    .await
                    .context("subscriber PUBACK")?;
                acks.clear();
            }
        }
        let _ = self.stream.write_all(&frame::disconnect()).await;
        Ok(tally)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(run: u64, conn: u32, seq: u32, sent_ns: u64) -> Vec<u8> {
        let mut p = vec![0; 30];
        Stamp {
            run,
            conn,
            seq,
            sent_ns,
        }
        .write(&mut p);
        p
    }

    #[test]
    fn seqset_counts_and_diffs() {
        let mut a = SeqSet::default();
        assert!(a.insert(0));
        assert!(a.insert(200));
        assert!(!a.insert(200));
        assert!(!a.insert(0));
        let mut b = SeqSet::default();
        b.insert(200);
        assert_eq!(a.len(), 2);
        assert_eq!(a.missing_from(&b), 1);
        assert_eq!(b.missing_from(&a), 0);
    }

    #[test]
    fn tally_counts_duplicates_strays_and_measured_latency() {
        let mut t = Tally::new(9, 2, 1_000_000).expect("tally");
        t.record(&payload(9, 0, 0, 500_000), 2_000_000); // warm-up: counted, no latency
        t.record(&payload(9, 1, 0, 1_000_000), 3_000_000); // 2 ms
        t.record(&payload(9, 1, 0, 1_000_000), 3_000_000); // duplicate
        t.record(&payload(8, 1, 1, 1_000_000), 3_000_000); // other run
        t.record(&payload(9, 2, 0, 1_000_000), 3_000_000); // no such connection
        t.record(b"short", 3_000_000);
        assert_eq!((t.unique, t.duplicates, t.stray, t.measured), (2, 1, 3, 1));
        assert_eq!(t.e2e.len(), 1);
        assert_eq!(t.e2e.value_at_quantile(0.5), 2000);
    }

    #[test]
    fn goal_waits_for_publishing_to_end() {
        let g = Goal::new(Duration::from_secs(10), Duration::from_secs(60));
        let t0 = g.start;
        assert!(
            !g.reached_at(1_000_000, t0 + Duration::from_secs(3600)),
            "still publishing"
        );
        g.set(10, t0 + Duration::from_secs(5));
        assert!(!g.reached_at(9, t0 + Duration::from_secs(6)));
        assert!(
            g.reached_at(10, t0 + Duration::from_secs(6)),
            "everything arrived"
        );
        assert!(
            g.reached_at(9, t0 + Duration::from_secs(15)),
            "nothing new for the drain time"
        );
    }

    #[test]
    fn goal_keeps_reading_while_catching_up_but_not_forever() {
        let g = Goal::new(Duration::from_secs(10), Duration::from_secs(60));
        let t0 = g.start;
        g.set(100, t0);
        g.progress_ms.store(30_000, Ordering::Relaxed);
        assert!(
            !g.reached_at(50, t0 + Duration::from_secs(35)),
            "progress 5 s ago"
        );
        assert!(
            g.reached_at(50, t0 + Duration::from_secs(40)),
            "quiet for the drain time"
        );
        g.progress_ms.store(59_000, Ordering::Relaxed);
        assert!(
            g.reached_at(50, t0 + Duration::from_secs(60)),
            "max drain reached"
        );
    }

    #[test]
    fn records_json_decodes_both_body_encodings() {
        let json = br#"{"records":[{"partition":0,"offset":1,"body":"aGk=","bodyEncoding":"base64","properties":{"run":"r1"}},{"body":"x\u0000y","bodyEncoding":"utf-8","properties":{}}],"next":3}"#;
        let page: Page<'_> = serde_json::from_slice(json).expect("parses");
        assert_eq!(page.next, 3);
        assert_eq!(
            page.records[0].properties.get("run").map(|v| v.as_ref()),
            Some("r1")
        );
        assert_eq!(
            STANDARD
                .decode(page.records[0].body.as_bytes())
                .expect("b64"),
            b"hi"
        );
        assert_eq!(page.records[1].body.as_bytes(), b"x\0y");
    }
}
