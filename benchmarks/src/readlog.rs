//! `--read-log amqp|json`: reads roost's whole `events` log, every partition from its first
//! record, once through the Event Hubs-compatible AMQP endpoint (an AMQP 1.0 client built on
//! `roost-amqp`'s codec: SASL ANONYMOUS, a `$cbs` put-token, one receiver per partition with
//! credit) or once through the JSON consumer API, and reports records per second and the
//! engine's CPU seconds per million records read.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use roost_amqp::frame::{check, write_frame, Frame, FrameType, AMQP_HEADER, SASL_HEADER};
use roost_amqp::{
    Attach, Begin, Body, Flow, Message, Open, Performative, Properties, Role, Sasl, Terminus,
    Transfer, Value,
};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::readback::PartitionInfo;
use crate::report::Report;
use crate::{procfs, Args, Outcome, Setup};

/// Credit a receiver keeps topped up.
const CREDIT: u32 = 2000;
/// Records per JSON page.
const PAGE: usize = 5000;

#[derive(Deserialize)]
struct Page {
    records: Vec<serde_json::Value>,
    next: u64,
}

/// What a `--follow` read saw when its window closed.
#[derive(Default)]
struct Followed {
    /// Records the log had beyond what the reader had read, when the window closed.
    behind_at_close: u64,
    /// From the window's close to the reader reaching the log's end as it was then.
    catch_up_secs: f64,
    /// Records in the log when the window closed (what the reader must read).
    expected: u64,
}

pub async fn run(args: &Args, setup: Setup, via: &str) -> anyhow::Result<Outcome> {
    let data_dir = args.hub.as_ref().context("--read-log needs --hub")?;
    let hub = crate::hub::Hub::read(data_dir)?;
    let parts = hub.ops.partitions().await?;
    let mut expected: u64 = parts.iter().map(|p| p.next - p.first).sum();
    let follow = args.follow.map(Duration::from_secs_f64);
    let before = procfs::sample(&setup.pids)?;
    let t0 = Instant::now();
    let mut followed = Followed::default();
    let read = match via {
        "json" => read_json(&hub, &parts).await?,
        "amqp" => read_amqp(data_dir, &hub, &parts, follow, &mut followed).await?,
        other => bail!("--read-log is amqp or json, not {other}"),
    };
    let secs = t0.elapsed().as_secs_f64();
    let after = procfs::sample(&setup.pids)?;
    let mut report = Report::with_header("read-log", args.label.as_deref(), &setup.target);
    report.put("via", via);
    if follow.is_some() {
        expected = followed.expected;
        report.put("follow_secs", args.follow.unwrap_or_default());
        report.put("behind_at_close", followed.behind_at_close);
        report.num("catch_up_secs", followed.catch_up_secs);
    }
    report.put("records_expected", expected);
    report.put("records_read", read);
    report.num("secs", secs);
    report.num("records_per_sec", read as f64 / secs);
    if !setup.pids.is_empty() && read > 0 {
        report.num(
            "server_cpu_secs_per_million",
            (after.cpu_secs - before.cpu_secs) / read as f64 * 1e6,
        );
    }
    let failure = (read < expected).then(|| format!("read {read} of {expected} records"));
    Ok(Outcome { report, failure })
}

async fn read_json(hub: &crate::hub::Hub, parts: &[PartitionInfo]) -> anyhow::Result<u64> {
    let mut total = 0;
    let mut tasks = tokio::task::JoinSet::new();
    for p in parts {
        let (ops, partition, mut from, end) = (hub.ops.clone(), p.partition, p.first, p.next);
        tasks.spawn(async move {
            let mut client = roost_common::client::Client::new(&ops.url, None)?;
            let mut n = 0u64;
            while from < end {
                let path = format!("/events/partitions/{partition}/records?from={from}&max={PAGE}");
                let resp = ops.get(&mut client, &path).await?;
                let page: Page = serde_json::from_slice(&resp.body).context("records page")?;
                n += page.records.len() as u64;
                if page.next == from {
                    break;
                }
                from = page.next;
            }
            anyhow::Ok(n)
        });
    }
    while let Some(r) = tasks.join_next().await {
        total += r??;
    }
    Ok(total)
}

/// A minimal AMQP client: frames in and out over one stream.
struct Wire<S> {
    stream: S,
    buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    async fn send(
        &mut self,
        kind: FrameType,
        channel: u16,
        f: impl FnOnce(&mut BytesMut),
    ) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        write_frame(kind, channel, &mut out, f);
        self.stream.write_all(&out).await?;
        Ok(())
    }

    async fn header(&mut self) -> anyhow::Result<[u8; 8]> {
        while self.buf.len() < 8 {
            self.fill().await?;
        }
        let h = self.buf.split_to(8);
        Ok(h[..].try_into().expect("8 bytes"))
    }

    async fn frame(&mut self) -> anyhow::Result<Frame> {
        loop {
            if let Some(len) = check(&self.buf, 16 << 20)? {
                return Ok(Frame::parse(self.buf.split_to(len).freeze())?);
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0u8; 64 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut chunk))
            .await
            .context("no answer from the AMQP endpoint in 30 s")??;
        if n == 0 {
            bail!("the AMQP endpoint closed the connection");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    async fn performative(&mut self) -> anyhow::Result<Performative> {
        loop {
            let f = self.frame().await?;
            if !f.body.is_empty() {
                return Ok(Performative::read(&f.body)?);
            }
        }
    }
}

fn terminus(address: &str) -> Terminus {
    Terminus::at(address)
}

fn attach(name: &str, handle: u32, role: Role, source: Terminus, target: Terminus) -> Performative {
    Performative::Attach(Attach {
        source: Some(source),
        target: Some(target),
        initial_delivery_count: (role == Role::Sender).then_some(0),
        ..Attach::new(name.into(), handle, role)
    })
}

async fn read_amqp(
    data_dir: &std::path::Path,
    hub: &crate::hub::Hub,
    parts: &[PartitionInfo],
    follow: Option<Duration>,
    followed: &mut Followed,
) -> anyhow::Result<u64> {
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(roost_common::hubfile::path(data_dir))?)?;
    let port = raw["ports"]["amqp"]
        .as_u64()
        .context("hub.json has no ports.amqp (the engine's --amqp)")?;
    let cs = raw["service_connection_string"]
        .as_str()
        .context("no service connection string")?;
    let field = |k: &str| {
        cs.split(';')
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    };
    let (policy, key) = (
        field("SharedAccessKeyName").context("policy")?,
        field("SharedAccessKey").context("key")?,
    );
    let entity = hub
        .hostname
        .split('.')
        .next()
        .unwrap_or(&hub.hostname)
        .to_string();

    let tls = roost_common::tls::ca_client_config(&roost_common::tls::CertPaths::of_ca(&hub.ca))?;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port as u16)).await?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(hub.hostname.clone())?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    let mut w = Wire {
        stream,
        buf: BytesMut::new(),
    };

    w.stream.write_all(&SASL_HEADER).await?;
    w.header().await?;
    w.frame().await?; // sasl-mechanisms
    w.send(FrameType::Sasl, 0, |o| {
        Sasl::Init {
            mechanism: "ANONYMOUS".into(),
            initial_response: None,
            hostname: None,
        }
        .write(o)
    })
    .await?;
    match Sasl::read(&w.frame().await?.body)? {
        Sasl::Outcome { code: 0, .. } => {}
        other => bail!("SASL refused: {other:?}"),
    }
    w.stream.write_all(&AMQP_HEADER).await?;
    w.header().await?;
    let open = Open {
        container_id: "roost-bench".into(),
        max_frame_size: Some(1 << 20),
        ..Open::default()
    };
    w.send(FrameType::Amqp, 0, |o| Performative::Open(open).write(o))
        .await?;
    let window = 1 << 20;
    let begin = Begin {
        next_outgoing_id: 0,
        incoming_window: window,
        outgoing_window: window,
        ..Begin::default()
    };
    w.send(FrameType::Amqp, 0, |o| Performative::Begin(begin).write(o))
        .await?;

    // $cbs: a sender (handle 0) and a receiver (handle 1) for the answer.
    w.send(FrameType::Amqp, 0, |o| {
        attach(
            "cbs-out",
            0,
            Role::Sender,
            terminus("client"),
            terminus("$cbs"),
        )
        .write(o)
    })
    .await?;
    w.send(FrameType::Amqp, 0, |o| {
        attach(
            "cbs-in",
            1,
            Role::Receiver,
            terminus("$cbs"),
            terminus("client"),
        )
        .write(o)
    })
    .await?;
    let credit = |handle: u32, count: u32, next_in: u32| Flow {
        next_incoming_id: Some(next_in),
        incoming_window: window,
        next_outgoing_id: 1,
        outgoing_window: window,
        handle: Some(handle),
        delivery_count: Some(count),
        link_credit: Some(CREDIT),
        ..Flow::default()
    };
    w.send(FrameType::Amqp, 0, |o| {
        Performative::Flow(credit(1, 0, 0)).write(o)
    })
    .await?;
    let expiry = crate::hub::unix_now() + 3600;
    let token = roost_iothub::sas::sign(
        &hub.hostname,
        &roost_iothub::sas::decode_key(&key)?,
        expiry,
        Some(&policy),
    );
    let put = Message {
        properties: Some(Properties {
            message_id: Value::Ulong(0),
            ..Properties::default()
        }),
        application_properties: vec![
            (Value::string("operation"), Value::string("put-token")),
            (
                Value::string("type"),
                Value::string("servicebus.windows.net:sastoken"),
            ),
            (Value::string("name"), Value::string(&hub.hostname)),
        ],
        body: Body::Value(Value::string(&token)),
        ..Message::default()
    };
    let mut payload = BytesMut::new();
    put.write(&mut payload);
    // Wait for the server's credit on the cbs sender, then send the token.
    let mut server_handles: HashMap<String, u32> = HashMap::new();
    let mut credited = false;
    while !credited {
        match w.performative().await? {
            Performative::Attach(a) => {
                server_handles.insert(a.name.as_str().to_string(), a.handle);
            }
            Performative::Flow(f) => credited |= f.link_credit.unwrap_or(0) > 0,
            _ => {}
        }
    }
    let transfer = Transfer {
        delivery_id: Some(0),
        delivery_tag: Some(Bytes::from_static(b"t")),
        message_format: Some(0),
        settled: Some(false),
        ..Transfer::new(0, payload.freeze())
    };
    w.send(FrameType::Amqp, 0, |o| {
        Performative::Transfer(transfer).write(o)
    })
    .await?;
    let mut transfers_in: u32 = 0;
    loop {
        if let Performative::Transfer(t) = w.performative().await? {
            transfers_in += 1;
            let answer = Message::read(&t.payload)?;
            match answer.application_property("status-code") {
                Some(Value::Int(200)) => break,
                other => bail!("put-token refused: {other:?}"),
            }
        }
    }

    // One receiver per partition, from its first record (following: on every partition, from
    // its end, with no end of the read until the window closes).
    let mut left: HashMap<u32, u64> = HashMap::new();
    let mut firsts: HashMap<u32, u64> = HashMap::new();
    for p in parts {
        if p.next == p.first && follow.is_none() {
            continue;
        }
        let handle = 2 + p.partition as u32;
        let mut source = terminus(&format!(
            "{entity}/ConsumerGroups/$Default/Partitions/{}",
            p.partition
        ));
        // Following starts at the log's end, reading only what is published meanwhile.
        let (start, selector) = match follow {
            Some(_) => (
                p.next,
                format!("amqp.annotation.x-opt-offset >= '{}'", p.next),
            ),
            None => (p.first, "amqp.annotation.x-opt-offset > '-1'".to_string()),
        };
        source.filter = Value::Map(vec![(
            Value::symbol("apache.org:selector-filter:string"),
            Value::Described(Box::new((
                Value::symbol("apache.org:selector-filter:string"),
                Value::string(&selector),
            ))),
        )]);
        w.send(FrameType::Amqp, 0, |o| {
            attach(
                &format!("p{}", p.partition),
                handle,
                Role::Receiver,
                source,
                terminus("bench"),
            )
            .write(o)
        })
        .await?;
        w.send(FrameType::Amqp, 0, |o| {
            Performative::Flow(credit(handle, 0, transfers_in)).write(o)
        })
        .await?;
        firsts.insert(handle, start);
        left.insert(
            handle,
            match follow {
                Some(_) => u64::MAX,
                None => p.next - p.first,
            },
        );
    }
    let close_at = follow.map(|f| tokio::time::Instant::now() + f);
    let mut closed_at: Option<Instant> = None;
    // The server names links by its own handles: map them back through the link names.
    let mut by_server: HashMap<u32, u32> = HashMap::new();
    let mut got: HashMap<u32, (u64, u32)> = HashMap::new();
    let mut total = 0u64;
    while left.values().any(|n| *n > 0) {
        let next = tokio::select! {
            p = w.performative() => p?,
            _ = async { tokio::time::sleep_until(close_at.expect("guarded")).await },
                if close_at.is_some() && closed_at.is_none() => {
                // The window closes: the reader must now reach the log's end as it is.
                closed_at = Some(Instant::now());
                let now = hub.ops.partitions().await?;
                followed.expected = 0;
                for p in &now {
                    let handle = 2 + p.partition as u32;
                    let first = firsts.get(&handle).copied().unwrap_or(p.first);
                    let read = got.get(&handle).map_or(0, |g| g.0);
                    let total = p.next - first;
                    followed.expected += total;
                    followed.behind_at_close += total.saturating_sub(read);
                    left.insert(handle, total.saturating_sub(read));
                }
                continue;
            }
        };
        match next {
            Performative::Attach(a) => {
                if let Some(p) = a
                    .name
                    .as_str()
                    .strip_prefix('p')
                    .and_then(|p| p.parse::<u32>().ok())
                {
                    by_server.insert(a.handle, 2 + p);
                }
            }
            Performative::Detach(d) => bail!("a receiver was detached: {:?}", d.error),
            Performative::Transfer(t) => {
                transfers_in = transfers_in.wrapping_add(1);
                if t.more {
                    continue;
                }
                let Some(&mine) = by_server.get(&t.handle) else {
                    continue;
                };
                let entry = got.entry(mine).or_default();
                entry.0 += 1;
                entry.1 = entry.1.wrapping_add(1);
                total += 1;
                if let Some(n) = left.get_mut(&mine) {
                    *n = n.saturating_sub(1);
                }
                // Top the credit up once half is used.
                if entry.1.is_multiple_of(CREDIT / 2) {
                    let count = entry.1;
                    w.send(FrameType::Amqp, 0, |o| {
                        Performative::Flow(credit(mine, count, transfers_in)).write(o)
                    })
                    .await?;
                }
            }
            _ => {}
        }
    }
    if let Some(at) = closed_at {
        followed.catch_up_secs = at.elapsed().as_secs_f64();
    }
    let _ = w
        .send(FrameType::Amqp, 0, |o| Performative::Close(None).write(o))
        .await;
    Ok(total)
}
