//! Idle mode: open N connections, hold them without traffic, measure the server's RSS per
//! connection, check every connection still answers a PINGREQ, disconnect.

use std::time::Duration;

use anyhow::Context;
use roost_mqtt::Packet;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

use crate::report::Report;
use crate::{frame, open_measured, procfs, Args, Opened, Outcome, Setup};

/// How long a held connection has to answer the final PINGREQ.
const PING_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(args: &Args, setup: Setup) -> anyhow::Result<Outcome> {
    let t = setup.target.clone();
    let n = args.connections;
    let Opened {
        conns,
        before,
        connected,
        connect_secs,
    } = open_measured(args, &setup).await?;
    eprintln!(
        "roost-bench: {n} connections open in {connect_secs:.1} s; holding {} s",
        args.hold
    );

    // Nothing polls the sockets while they are held: the generator's own memory stays flat and
    // the server sees pure idle connections.
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let held = procfs::sample(&setup.pids)?;

    let mut set = JoinSet::new();
    for (i, (mut stream, mut frames)) in conns.into_iter().enumerate() {
        set.spawn(async move {
            let alive = tokio::time::timeout(PING_TIMEOUT, async {
                stream.write_all(&frame::pingreq()).await?;
                loop {
                    match frames.next(&mut stream).await? {
                        Some(Packet::PingResp) => return anyhow::Ok(true),
                        Some(_) => continue,
                        None => return Ok(false),
                    }
                }
            })
            .await;
            let alive = matches!(alive, Ok(Ok(true)));
            if alive {
                let _ = stream.write_all(&frame::disconnect()).await;
                let _ = stream.shutdown().await;
            }
            (i, alive)
        });
    }
    let mut alive = 0usize;
    let mut first_dead = None;
    while let Some(done) = set.join_next().await {
        let (i, ok) = done.context("a connection task panicked")?;
        if ok {
            alive += 1;
        } else if first_dead.is_none_or(|d| i < d) {
            first_dead = Some(i);
        }
    }
    let after = procfs::sample(&setup.pids)?;

    let mut rep = Report::with_header("idle", args.label.as_deref(), &t);
    rep.put("connections", n);
    rep.num("connect_s", connect_secs);
    rep.num("connects_per_s", n as f64 / connect_secs.max(1e-9));
    rep.num("hold_s", args.hold);
    rep.put("alive_after_hold", alive);
    if setup.pids.is_empty() {
        for k in [
            "server_rss_before_kib",
            "server_rss_connected_kib",
            "server_rss_held_kib",
            "server_rss_after_kib",
            "rss_per_conn_bytes",
            "rss_per_conn_held_bytes",
            "server_cpu_s",
        ] {
            rep.put(k, serde_json::Value::Null);
        }
    } else {
        rep.put("server_rss_before_kib", before.rss_kib);
        rep.put("server_rss_connected_kib", connected.rss_kib);
        rep.put("server_rss_held_kib", held.rss_kib);
        rep.put("server_rss_after_kib", after.rss_kib);
        let per_conn = |rss: u64| (rss as f64 - before.rss_kib as f64) * 1024.0 / n as f64;
        rep.num("rss_per_conn_bytes", per_conn(connected.rss_kib));
        // At the end of the hold: the steady state of an idle fleet.
        rep.num("rss_per_conn_held_bytes", per_conn(held.rss_kib));
        rep.num("server_cpu_s", after.cpu_secs - before.cpu_secs);
    }
    let failure = first_dead.map(|i| {
        format!(
            "{} of {n} connections did not survive the hold (first: {})",
            n - alive,
            t.client_id(i)
        )
    });
    Ok(Outcome {
        report: rep,
        failure,
    })
}
