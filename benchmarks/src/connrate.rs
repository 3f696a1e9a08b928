//! Connect-rate mode: `--connections` loops, each repeatedly connecting (TCP, TLS, CONNECT →
//! CONNACK) and disconnecting until `--duration` is over; reports connects per second and the
//! handshake latency (TCP connect start to CONNACK).

use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

use crate::readback::latency_histogram;
use crate::report::Report;
use crate::{frame, procfs, Args, Outcome, Setup};

/// Pause after a failed connect, so a refusing broker is not hammered in a tight loop.
const BACKOFF: Duration = Duration::from_millis(10);

struct LoopResult {
    connects: u64,
    errors: u64,
    first_error: Option<String>,
    latency: Histogram<u64>,
}

pub async fn run(args: &Args, setup: Setup) -> anyhow::Result<Outcome> {
    let t = setup.target.clone();
    let n = args.connections;
    let duration = Duration::from_secs_f64(args.duration.unwrap_or(0.0));
    let before = procfs::sample(&setup.pids)?;
    let start = Instant::now();
    let end = start + duration;
    let mut set = JoinSet::new();
    for i in 0..n {
        let t = t.clone();
        let connect = t.connect_frame(i)?;
        let timeout = setup.connect_timeout;
        set.spawn(async move {
            let mut r = LoopResult {
                connects: 0,
                errors: 0,
                first_error: None,
                latency: latency_histogram()?,
            };
            while Instant::now() < end {
                let began = Instant::now();
                match t.open_with(&connect, timeout).await {
                    Ok((mut stream, _)) => {
                        let _ = r.latency.record(began.elapsed().as_micros() as u64);
                        r.connects += 1;
                        let _ = stream.write_all(&frame::disconnect()).await;
                        let _ = stream.shutdown().await;
                    }
                    Err(e) => {
                        r.errors += 1;
                        r.first_error.get_or_insert_with(|| format!("{e:#}"));
                        tokio::time::sleep(BACKOFF).await;
                    }
                }
            }
            anyhow::Ok(r)
        });
    }
    let mut latency = latency_histogram()?;
    let (mut connects, mut errors, mut first_error) = (0u64, 0u64, None);
    while let Some(done) = set.join_next().await {
        let r = done.context("a connect loop panicked")??;
        connects += r.connects;
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
        latency.add(&r.latency).context("merging histograms")?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = procfs::sample(&setup.pids)?;

    let mut rep = Report::with_header("connect-rate", args.label.as_deref(), &t);
    rep.put("tls_resume", args.tls_resume);
    rep.put("loops", n);
    rep.num("duration_s", elapsed);
    rep.put("connects", connects);
    rep.num("connects_per_s", connects as f64 / elapsed.max(1e-9));
    rep.put("connect_errors", errors);
    rep.latency("handshake", &latency);
    if setup.pids.is_empty() {
        for k in [
            "server_cpu_s",
            "server_cpu_ms_per_connect",
            "server_rss_before_kib",
            "server_rss_after_kib",
        ] {
            rep.put(k, serde_json::Value::Null);
        }
    } else {
        let cpu = after.cpu_secs - before.cpu_secs;
        rep.num("server_cpu_s", cpu);
        rep.num(
            "server_cpu_ms_per_connect",
            if connects > 0 {
                cpu * 1000.0 / connects as f64
            } else {
                f64::NAN
            },
        );
        rep.put("server_rss_before_kib", before.rss_kib);
        rep.put("server_rss_after_kib", after.rss_kib);
    }
    let failure = match (connects, first_error) {
        (0, e) => Some(format!(
            "no connect succeeded: {}",
            e.unwrap_or_else(|| "no attempt was made".into())
        )),
        (_, Some(e)) => Some(format!("{errors} connects failed; the first: {e}")),
        (_, None) => None,
    };
    Ok(Outcome {
        report: rep,
        failure,
    })
}
