//! Flood mode: what an unauthenticated attacker does to a broker, bounded in count and time.
//! Three kinds of socket at once, each from its own range of source addresses (so a per-source
//! cap sees many sources, and the devices of a parallel publish run, in 127.1.0.0/16, none):
//!
//! - `--flood-silent N` TCP sockets (127.2.0.0/16) that connect and then send nothing (or,
//!   with `--flood-silent-bytes B`, the first B bytes of a CONNECT that never ends: the most a
//!   pre-authentication socket can make the server buffer); the report says how many the
//!   server closed, how soon (the longest, the 99th percentile), how many were still open when
//!   the run ended, and the server's RSS per open socket;
//! - `--flood-bad-rate R` CONNECTs per second (127.3.0.0/16) with a token that fails;
//! - `--flood-oversize-rate R` sockets per second (127.4.0.0/16) whose first frame claims a
//!   remaining length of 256 MiB and then sends 1 KiB of it.
//!
//! Plain TCP only: a flood of TLS handshakes measures the attacker's CPU, not the server's
//! limits (silent sockets at a TLS port still test its handshake deadline).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

use crate::readback::latency_histogram;
use crate::report::Report;
use crate::{frame, pace, procfs, Args, Outcome, Setup};

/// How long one attacking socket waits for the server to close it.
const WAIT_CLOSE: Duration = Duration::from_secs(15);
/// Source addresses per range: 256 × 254.
const SPREAD: u64 = 256 * 254;

fn source(range: u8, n: u64) -> Ipv4Addr {
    let k = n % SPREAD;
    Ipv4Addr::new(127, range, (k / 254) as u8, (k % 254) as u8 + 1)
}

async fn open(target: SocketAddr, from: Ipv4Addr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4().context("socket")?;
    socket
        .bind(SocketAddr::new(IpAddr::V4(from), 0))
        .with_context(|| format!("bind to {from}"))?;
    Ok(
        tokio::time::timeout(Duration::from_secs(5), socket.connect(target))
            .await
            .context("TCP connect timed out")??,
    )
}

/// Reads (and drops) whatever comes until the server closes; how long after `t0` that was, or
/// `None` if it did not within `limit`.
async fn closed_since(stream: &mut TcpStream, t0: Instant, limit: Duration) -> Option<Duration> {
    let mut buf = [0u8; 512];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    closed.ok().map(|()| t0.elapsed())
}

#[derive(Default)]
struct Counts {
    attempts: AtomicU64,
    connect_errors: AtomicU64,
    closed: AtomicU64,
    held: AtomicU64,
}

impl Counts {
    fn report(&self, rep: &mut Report, prefix: &str) {
        for (k, v) in [
            ("attempts", &self.attempts),
            ("connect_errors", &self.connect_errors),
            ("closed", &self.closed),
            ("not_closed", &self.held),
        ] {
            rep.put(&format!("{prefix}_{k}"), v.load(Ordering::Relaxed));
        }
    }
}

/// Opens a socket from `range` at `rate` per second until `end`, each running `attack`.
async fn paced<F, Fut>(
    rate: f64,
    end: Instant,
    range: u8,
    target: SocketAddr,
    counts: Arc<Counts>,
    attack: F,
) where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    if rate <= 0.0 {
        return;
    }
    let attack = Arc::new(attack);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut tasks = JoinSet::new();
    while Instant::now() < end {
        let due = pace::due(rate, start.elapsed());
        while sent < due {
            let (counts, attack) = (counts.clone(), attack.clone());
            let from = source(range, sent);
            sent += 1;
            counts.attempts.fetch_add(1, Ordering::Relaxed);
            tasks.spawn(async move {
                let counter = match open(target, from).await {
                    Err(_) => &counts.connect_errors,
                    Ok(s) => match attack(s).await {
                        true => &counts.closed,
                        false => &counts.held,
                    },
                };
                counter.fetch_add(1, Ordering::Relaxed);
            });
        }
        while tasks.try_join_next().is_some() {}
        tokio::time::sleep(pace::tick_for(rate)).await;
    }
    while tasks.join_next().await.is_some() {}
}

/// The first `n` bytes of a CONNECT whose remaining length says it is 100 bytes longer.
fn unfinished_connect(n: usize) -> Vec<u8> {
    if n == 0 {
        return Vec::new();
    }
    let mut claim = n + 100;
    let mut out = vec![0x10];
    loop {
        let byte = (claim % 128) as u8;
        claim /= 128;
        out.push(byte | if claim > 0 { 0x80 } else { 0 });
        if claim == 0 {
            break;
        }
    }
    out.extend_from_slice(b"\x00\x04MQTT\x04\xc2\x00\x3c");
    out.resize(n.max(out.len()), b'x');
    out
}

pub async fn run(args: &Args, setup: Setup) -> anyhow::Result<Outcome> {
    let t = setup.target.clone();
    let target = t.addr;
    let duration = Duration::from_secs_f64(args.duration.unwrap_or(0.0));
    let before = procfs::sample(&setup.pids)?;

    // The silent sockets first, all at once (bounded concurrency), then the RSS they cost.
    let n = args.flood_silent;
    let mut silent = Vec::with_capacity(n);
    let mut open_errors = 0u64;
    let mut opening = JoinSet::new();
    let opened_at = Instant::now();
    let prefix = Arc::new(unfinished_connect(args.flood_silent_bytes));
    for i in 0..n {
        let from = source(2, i as u64);
        let prefix = prefix.clone();
        opening.spawn(async move {
            let mut s = open(target, from).await?;
            let t0 = Instant::now();
            s.write_all(&prefix).await?;
            anyhow::Ok((s, t0))
        });
        if opening.len() >= args.connect_concurrency {
            if let Some(r) = opening.join_next().await {
                match r.context("an open task panicked")? {
                    Ok(s) => silent.push(s),
                    Err(_) => open_errors += 1,
                }
            }
        }
    }
    while let Some(r) = opening.join_next().await {
        match r.context("an open task panicked")? {
            Ok(s) => silent.push(s),
            Err(_) => open_errors += 1,
        }
    }
    let open_secs = opened_at.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(200)).await; // accepted and registered
    let with_silent = procfs::sample(&setup.pids)?;
    let silent_open = silent.len();
    let mut watchers = JoinSet::new();
    for (mut s, t0) in silent {
        // How long after it was opened the server closed it.
        watchers.spawn(async move { closed_since(&mut s, t0, WAIT_CLOSE + duration).await });
    }

    let end = Instant::now() + duration;
    let bad = Arc::new(Counts::default());
    let oversize = Arc::new(Counts::default());
    let bad_connect = Arc::new(
        frame::connect(
            "flood",
            Some("localhost/flood/?api-version=2021-04-12"),
            Some("SharedAccessSignature sr=x&sig=eA%3D%3D&se=1"),
            60,
        )?
        .to_vec(),
    );
    let mut oversize_frame = vec![0x10, 0xff, 0xff, 0xff, 0x7f];
    oversize_frame.extend_from_slice(&[0u8; 1024]);
    // Each attack writes its frame and waits for the server to close the socket.
    let send = |frame: Arc<Vec<u8>>| {
        move |mut s: TcpStream| {
            let frame = frame.clone();
            async move {
                if s.write_all(&frame).await.is_err() {
                    return true;
                }
                closed_since(&mut s, Instant::now(), WAIT_CLOSE)
                    .await
                    .is_some()
            }
        }
    };
    let attacks = tokio::join!(
        paced(
            args.flood_bad_rate,
            end,
            3,
            target,
            bad.clone(),
            send(bad_connect)
        ),
        paced(
            args.flood_oversize_rate,
            end,
            4,
            target,
            oversize.clone(),
            send(Arc::new(oversize_frame))
        ),
    );
    let ((), ()) = attacks;
    let during = procfs::sample(&setup.pids)?;

    let mut closed_after: Histogram<u64> = latency_histogram()?;
    let mut still_open = 0u64;
    while let Some(r) = watchers.join_next().await {
        match r.context("a watcher panicked")? {
            Some(d) => {
                let _ = closed_after.record(d.as_micros() as u64);
            }
            None => still_open += 1,
        }
    }

    let mut rep = Report::with_header("flood", args.label.as_deref(), &t);
    rep.num("duration_s", duration.as_secs_f64());
    rep.put("silent_opened", silent_open);
    rep.put("silent_bytes_sent", prefix.len());
    rep.put("silent_open_errors", open_errors);
    rep.num("silent_open_s", open_secs);
    rep.put("silent_closed", closed_after.len());
    rep.put("silent_not_closed", still_open);
    rep.num(
        "silent_closed_p99_s",
        closed_after.value_at_quantile(0.99) as f64 / 1e6,
    );
    rep.num("silent_closed_max_s", closed_after.max() as f64 / 1e6);
    bad.report(&mut rep, "bad_connect");
    oversize.report(&mut rep, "oversize");
    if !setup.pids.is_empty() {
        rep.put("server_rss_before_kib", before.rss_kib);
        rep.put("server_rss_with_silent_kib", with_silent.rss_kib);
        rep.num(
            "server_kib_per_silent_socket",
            if silent_open > 0 {
                (with_silent.rss_kib as f64 - before.rss_kib as f64) / silent_open as f64
            } else {
                f64::NAN
            },
        );
        rep.num("server_cpu_s", during.cpu_secs - before.cpu_secs);
    }
    let failure =
        (still_open > 0).then(|| format!("{still_open} silent sockets were never closed"));
    Ok(Outcome {
        report: rep,
        failure,
    })
}
