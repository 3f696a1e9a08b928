//! The publish run: reader first, then the publishers, a warm-up, the measured window, the
//! drain; then the report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::task::JoinSet;

use crate::frame::PublishTemplate;
use crate::publish::{self, ConnResult, Schedule};
use crate::readback::{latency_histogram, Goal, OpsReader, Subscriber, Tally};
use crate::report::Report;
use crate::target::Kind;
use crate::{open_measured, pace, procfs, Args, Opened, Outcome, Setup};

/// Delay between the last connect and the first publish, so every task is parked at its start.
const START_DELAY: Duration = Duration::from_millis(100);

enum Reader {
    Ops(OpsReader),
    Sub(Subscriber),
}

pub async fn run(args: &Args, setup: Setup) -> anyhow::Result<Outcome> {
    let t = setup.target.clone();
    let n = args.connections;
    let qos = args.qos();

    // The reader is in place before anything is published.
    let reader = if args.no_readback {
        None
    } else {
        Some(match &t.kind {
            Kind::Roost { hub, .. } => Reader::Ops(OpsReader::start(&hub.ops, t.run_prop()).await?),
            Kind::Mqtt => {
                let id = format!("{}sub-{:x}", t.prefix, t.run & 0xffff_ffff);
                Reader::Sub(
                    Subscriber::connect(t.addr, &t.transport, &id, "bench/#", qos, t.max_frame)
                        .await?,
                )
            }
        })
    };

    let Opened {
        conns,
        before,
        connected,
        connect_secs,
    } = open_measured(args, &setup).await?;
    eprintln!("roost-bench: {n} connections open in {connect_secs:.1} s; publishing");

    let start = Instant::now() + START_DELAY;
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = match args.duration {
        Some(d) => measure_from + Duration::from_secs_f64(d),
        None => start + Duration::from_secs_f64(args.max_time),
    };
    let drain = Duration::from_secs_f64(args.drain_timeout);
    let rate = pace::per_conn_rate(args.rate, n);
    let schedule = Schedule {
        qos,
        inflight: usize::from(args.inflight),
        rate,
        start,
        measure_from,
        end: Some(end),
        drain,
    };

    let goal = Arc::new(Goal::new(drain, Duration::from_secs_f64(args.max_drain)));
    let measure_from_ns = publish::instant_to_unix_ns(measure_from);
    let reader_task = match reader {
        None => None,
        Some(r) => {
            let tally = Tally::new(t.run, n, measure_from_ns)?;
            let goal = goal.clone();
            Some(tokio::spawn(async move {
                match r {
                    Reader::Ops(r) => r
                        .run(tally, goal)
                        .await
                        .map(|(t, behind)| (t, Some(behind))),
                    Reader::Sub(s) => s.run(tally, goal).await.map(|t| (t, None)),
                }
            }))
        }
    };

    let tick = pace::tick_for(rate);
    let mut set = JoinSet::new();
    for (i, (stream, frames)) in conns.into_iter().enumerate() {
        let template = PublishTemplate::new(&t.topic(i), qos, args.payload, t.run, i as u32)?;
        let quota = args.messages.map(|m| pace::quota(m, n, i));
        // Flat out there is no tick to spread.
        let phase = if rate > 0.0 {
            pace::phase(i, n, tick)
        } else {
            Duration::ZERO
        };
        set.spawn(async move {
            (
                i,
                publish::run(stream, frames, template, quota, phase, schedule).await,
            )
        });
    }
    let mut results: Vec<Option<ConnResult>> = (0..n).map(|_| None).collect();
    let mut failure = None;
    while let Some(done) = set.join_next().await {
        let (i, r) = done.context("a connection task panicked")?;
        let r = r.with_context(|| format!("connection {i}"))?;
        if let (None, Some(e)) = (&failure, &r.error) {
            failure = Some(format!(
                "connection {i} ({}) failed during the run: {e}",
                t.client_id(i)
            ));
        }
        results[i] = Some(r);
    }
    let results: Vec<ConnResult> = results.into_iter().flatten().collect();
    let publish_end = results.iter().map(|r| r.finished).max().unwrap_or(start);
    let sent: u64 = results.iter().map(|r| r.sent).sum();
    goal.set(sent, publish_end);
    let (tally, behind) = match reader_task {
        None => (None, None),
        Some(task) => match task.await.context("the reader panicked")? {
            Ok((t, behind)) => (Some(t), behind),
            Err(e) => {
                failure.get_or_insert_with(|| format!("reading back failed: {e:#}"));
                (None, None)
            }
        },
    };
    let after = procfs::sample(&setup.pids)?;
    if let Some(b) = behind.filter(|&b| b > 0) {
        eprintln!("roost-bench: the reader fell behind: {b} records were still unread when it stopped (lost is an upper bound; raise --max-drain)");
    }

    // The figures.
    // Connections are phase-shifted by up to one tick: the window is their mean window.
    let window = (results.iter().map(|r| r.window.as_secs_f64()).sum::<f64>()
        / results.len().max(1) as f64)
        .max(1e-9);
    let sent_in_window: u64 = results.iter().map(|r| r.sent_in_window).sum();
    let acked: u64 = results.iter().map(|r| r.acked).sum();
    let acked_in_window: u64 = results.iter().map(|r| r.acked_in_window).sum();
    let unexpected: u64 = results.iter().map(|r| r.unexpected_acks).sum();
    let errors = results.iter().filter(|r| r.error.is_some()).count();
    let mut puback = latency_histogram()?;
    for r in &results {
        puback.add(&r.puback).context("merging PUBACK histograms")?;
    }

    let mut rep = Report::with_header("publish", args.label.as_deref(), &t);
    rep.put("connections", n);
    rep.put("qos", args.qos);
    rep.put(
        "inflight",
        if args.qos == 1 {
            serde_json::Value::from(args.inflight)
        } else {
            serde_json::Value::Null
        },
    );
    rep.put("payload_bytes", args.payload);
    rep.num("rate_target_msgs_per_s", args.rate);
    rep.num("connect_s", connect_secs);
    rep.num("warmup_s", args.warmup);
    rep.num("window_s", window);
    rep.put("published", sent);
    rep.put("published_in_window", sent_in_window);
    rep.num("in_msgs_per_s", sent_in_window as f64 / window);
    if args.qos == 1 {
        rep.put("acked", acked);
        rep.put("unacked", sent - acked.min(sent));
        rep.num("acked_msgs_per_s", acked_in_window as f64 / window);
        rep.put("unexpected_acks", unexpected);
    }
    match &tally {
        Some(tally) => {
            let lost: u64 = results
                .iter()
                .zip(&tally.received)
                .map(|(r, got)| {
                    if args.qos == 1 {
                        r.acked_set.missing_from(got)
                    } else {
                        r.sent.saturating_sub(got.len())
                    }
                })
                .sum();
            let read_span = tally
                .last_at
                .map(|l| l.saturating_duration_since(measure_from).as_secs_f64())
                .unwrap_or(0.0);
            rep.put("read", tally.unique);
            rep.num(
                "out_msgs_per_s",
                if read_span > 0.0 {
                    tally.measured as f64 / read_span
                } else {
                    0.0
                },
            );
            rep.put("lost", lost);
            rep.num(
                "lost_pct",
                if sent > 0 {
                    lost as f64 * 100.0 / sent as f64
                } else {
                    0.0
                },
            );
            rep.put("duplicates", tally.duplicates);
            rep.put("stray", tally.stray);
            // Records left unread in roost's log at the deadline: the reader fell behind, and
            // "lost" may be messages it did not get to.
            rep.put(
                "reader_behind",
                behind.map_or(serde_json::Value::Null, serde_json::Value::from),
            );
            rep.latency("e2e", &tally.e2e);
        }
        None => {
            for k in [
                "read",
                "out_msgs_per_s",
                "lost",
                "lost_pct",
                "duplicates",
                "stray",
                "reader_behind",
            ] {
                rep.put(k, serde_json::Value::Null);
            }
        }
    }
    if args.qos == 1 {
        rep.latency("puback", &puback);
    }
    server_figures(&mut rep, &setup.pids, before, connected, after, n, sent);
    rep.put("connection_errors", errors);
    Ok(Outcome {
        report: rep,
        failure,
    })
}

/// CPU per million messages and RSS figures; nulls when no server pid was given.
pub fn server_figures(
    rep: &mut Report,
    pids: &[u32],
    before: procfs::Sample,
    connected: procfs::Sample,
    after: procfs::Sample,
    conns: usize,
    msgs: u64,
) {
    if pids.is_empty() {
        for k in [
            "server_cpu_s",
            "server_cpu_s_per_m_msgs",
            "server_rss_before_kib",
            "server_rss_connected_kib",
            "server_rss_after_kib",
            "rss_per_conn_bytes",
        ] {
            rep.put(k, serde_json::Value::Null);
        }
        return;
    }
    let cpu = after.cpu_secs - connected.cpu_secs;
    rep.num("server_cpu_s", cpu);
    rep.num(
        "server_cpu_s_per_m_msgs",
        if msgs > 0 {
            cpu * 1e6 / msgs as f64
        } else {
            f64::NAN
        },
    );
    rep.put("server_rss_before_kib", before.rss_kib);
    rep.put("server_rss_connected_kib", connected.rss_kib);
    rep.put("server_rss_after_kib", after.rss_kib);
    rep.num(
        "rss_per_conn_bytes",
        (connected.rss_kib as f64 - before.rss_kib as f64) * 1024.0 / conns as f64,
    );
}
