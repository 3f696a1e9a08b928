//! One publishing connection: paced (or flat-out) batches of pre-encoded PUBLISH frames, and for
//! QoS 1 an inflight window of packet ids with the send time of each, so every PUBACK yields a
//! latency.
//!
//! A connection is a single task that alternates between writing what is due and reading what
//! arrived: writes never sit inside a `select!` (a cancelled `write_all` would tear a frame), and
//! reads are cancel-safe, so a pending read is simply dropped when it is time to write.

use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use roost_mqtt::{Packet, QoS};
use tokio::io::AsyncWriteExt;

use crate::client::FrameReader;
use crate::frame::PublishTemplate;
use crate::net::Stream;
use crate::pace;
use crate::readback::{latency_histogram, SeqSet};
use crate::{frame, unix_nanos};

/// Bytes of frames written per batch at most.
const BATCH_BYTES: usize = 64 * 1024;

/// What every connection of a run shares.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub qos: QoS,
    /// Packet ids in flight per connection (QoS 1).
    pub inflight: usize,
    /// Messages per second for this connection; 0 = as fast as the window allows.
    pub rate: f64,
    /// When the clock of the schedule starts (connection-specific phase added).
    pub start: Instant,
    /// Messages before this are warm-up: sent and read back, but not in the rates.
    pub measure_from: Instant,
    /// No message is sent at or after this.
    pub end: Option<Instant>,
    /// How long to wait for outstanding PUBACKs once publishing is over.
    pub drain: Duration,
}

/// What one connection did.
pub struct ConnResult {
    pub sent: u64,
    pub sent_in_window: u64,
    pub acked: u64,
    pub acked_in_window: u64,
    /// Sequence numbers the broker acknowledged (QoS 1).
    pub acked_set: SeqSet,
    /// PUBACK latency, µs, of messages sent in the window.
    pub puback: Histogram<u64>,
    /// PUBACKs for a packet id not in flight.
    pub unexpected_acks: u64,
    /// This connection's measured window: from the end of its warm-up to when it stopped
    /// publishing.
    pub window: Duration,
    /// When this connection stopped publishing.
    pub finished: Instant,
    pub error: Option<String>,
}

/// A QoS 1 packet id in flight: the message's seq and its send time (Unix ns).
#[derive(Clone, Copy)]
struct Slot {
    seq: u32,
    sent_ns: u64,
}

/// Runs connection `conn` until its schedule ends and its acknowledgements are in (or the drain
/// time is over), then sends DISCONNECT.
pub async fn run(
    mut stream: Stream,
    mut reader: FrameReader,
    template: PublishTemplate,
    quota: Option<u64>,
    phase: Duration,
    s: Schedule,
) -> anyhow::Result<ConnResult> {
    let qos1 = s.qos != QoS::AtMostOnce;
    let window = if qos1 {
        s.inflight.clamp(1, usize::from(u16::MAX))
    } else {
        0
    };
    let mut slots: Vec<Option<Slot>> = vec![None; window];
    let mut in_flight = 0usize;
    let batch_max = (BATCH_BYTES / template.len()).clamp(1, 4096) as u64;
    let tick = pace::tick_for(s.rate);
    // The whole schedule shifts by the phase, so every connection gets the full duration.
    let start = s.start + phase;
    let measure_from = s.measure_from + phase;
    let end = s.end.map(|e| e + phase);
    let quota = quota.unwrap_or(u64::MAX);
    let measure_from_ns = instant_to_unix_ns(s.measure_from);
    let mut r = ConnResult {
        sent: 0,
        sent_in_window: 0,
        acked: 0,
        acked_in_window: 0,
        acked_set: SeqSet::default(),
        puback: latency_histogram()?,
        unexpected_acks: 0,
        window: Duration::ZERO,
        finished: s.start,
        error: None,
    };
    let mut buf = Vec::new();

    tokio::time::sleep_until(start.into()).await;
    let mut next_tick = start;
    loop {
        let now = Instant::now();
        if r.sent >= quota || end.is_some_and(|e| now >= e) || r.sent >= u64::from(u32::MAX) {
            break;
        }
        let owed = if s.rate > 0.0 {
            pace::due(s.rate, now - start)
                .min(quota)
                .saturating_sub(r.sent)
        } else {
            quota - r.sent
        };
        let mut n = owed.min(batch_max);
        if qos1 {
            n = free_ids(&slots, r.sent, n);
        }
        if n > 0 {
            buf.clear();
            let sent_ns = unix_nanos();
            for k in 0..n {
                let seq = r.sent + k;
                let pkid = if qos1 {
                    let idx = (seq % window as u64) as usize;
                    slots[idx] = Some(Slot {
                        seq: seq as u32,
                        sent_ns,
                    });
                    idx as u16 + 1
                } else {
                    0
                };
                template.put(&mut buf, pkid, seq as u32, sent_ns);
            }
            if let Err(e) = write(&mut stream, &buf).await {
                r.error = Some(format!("write failed: {e}"));
                break;
            }
            r.sent += n;
            in_flight += if qos1 { n as usize } else { 0 };
            if now >= measure_from {
                r.sent_in_window += n;
            }
            // Absorb acknowledgements that are already here, without waiting.
            if qos1 {
                tokio::select! {
                    biased;
                    got = reader.fill(&mut stream) => {
                        if !handle_read(got, &mut reader, &mut slots, &mut in_flight, &mut r, measure_from_ns)? {
                            break;
                        }
                    }
                    _ = std::future::ready(()) => {}
                }
            }
            continue;
        }
        // Nothing may go out now: wait for the next tick or, with a full window, for acks.
        while next_tick <= now {
            next_tick += tick;
        }
        let wake = if s.rate > 0.0 {
            next_tick
        } else {
            end.unwrap_or(now + Duration::from_secs(1))
        };
        let wake = end.map_or(wake, |e| wake.min(e));
        tokio::select! {
            got = reader.fill(&mut stream) => {
                if !handle_read(got, &mut reader, &mut slots, &mut in_flight, &mut r, measure_from_ns)? {
                    break;
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    r.finished = Instant::now();
    r.window = r.finished.saturating_duration_since(measure_from);

    // Wait for the acknowledgements still owed.
    let deadline = r.finished + s.drain;
    while r.error.is_none() && in_flight > 0 {
        tokio::select! {
            got = reader.fill(&mut stream) => {
                if !handle_read(got, &mut reader, &mut slots, &mut in_flight, &mut r, measure_from_ns)? {
                    break;
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => break,
        }
    }
    if r.error.is_none() {
        let _ = write(&mut stream, &frame::disconnect()).await;
        let _ = stream.shutdown().await;
    }
    Ok(r)
}

/// How many of the next `want` messages (from seq `sent`) can go out now: packet id =
/// seq % window + 1, so their slots must be free, in order, and one batch must not wrap around
/// the window onto its own ids.
fn free_ids(slots: &[Option<Slot>], sent: u64, want: u64) -> u64 {
    let window = slots.len() as u64;
    let want = want.min(window);
    (0..want)
        .take_while(|k| slots[((sent + k) % window) as usize].is_none())
        .count() as u64
}

/// A read of `n` bytes: 0 means the broker closed the connection.
fn still_open(n: usize) -> anyhow::Result<()> {
    if n == 0 {
        bail!("the broker closed the connection");
    }
    Ok(())
}

async fn write(stream: &mut Stream, buf: &[u8]) -> std::io::Result<()> {
    stream.write_all(buf).await?;
    stream.flush().await
}

/// Takes in what a read brought: a failed or closed read is recorded in `r` and ends the
/// connection (`false`); otherwise the PUBACKs now buffered free their slots.
fn handle_read(
    got: anyhow::Result<usize>,
    reader: &mut FrameReader,
    slots: &mut [Option<Slot>],
    in_flight: &mut usize,
    r: &mut ConnResult,
    measure_from_ns: u64,
) -> anyhow::Result<bool> {
    if let Err(e) = got.and_then(still_open) {
        r.error = Some(e.to_string());
        return Ok(false);
    }
    let now_ns = unix_nanos();
    while let Some(p) = reader.buffered()? {
        let Packet::PubAck(pkid) = p else { continue };
        let slot = (pkid as usize)
            .checked_sub(1)
            .and_then(|i| slots.get_mut(i))
            .and_then(Option::take);
        let Some(slot) = slot else {
            r.unexpected_acks += 1;
            continue;
        };
        *in_flight -= 1;
        r.acked += 1;
        r.acked_set.insert(slot.seq);
        if slot.sent_ns >= measure_from_ns {
            r.acked_in_window += 1;
            let _ = r.puback.record(now_ns.saturating_sub(slot.sent_ns) / 1000);
        }
    }
    Ok(true)
}

/// The Unix time (ns) of a monotonic instant, via the offset between the two clocks now.
pub fn instant_to_unix_ns(at: Instant) -> u64 {
    let now = Instant::now();
    let unix = unix_nanos();
    if at >= now {
        unix + (at - now).as_nanos() as u64
    } else {
        unix.saturating_sub((now - at).as_nanos() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy() -> Option<Slot> {
        Some(Slot { seq: 0, sent_ns: 0 })
    }

    #[test]
    fn batch_never_wraps_onto_its_own_packet_ids() {
        // Regression: a 500-message batch over a 200-id window reused ids it had just taken.
        let slots = vec![None; 200];
        assert_eq!(free_ids(&slots, 0, 500), 200);
        assert_eq!(free_ids(&slots, 1234, 500), 200);
    }

    #[test]
    fn free_ids_stop_at_the_first_busy_slot() {
        let mut slots = vec![None; 8];
        slots[5] = busy();
        assert_eq!(free_ids(&slots, 2, 8), 3); // seqs 2, 3, 4
        assert_eq!(free_ids(&slots, 5, 8), 0);
        assert_eq!(free_ids(&slots, 6, 8), 7); // 6, 7, 0, 1, 2, 3, 4 (wraps, stops at 5)
        assert_eq!(free_ids(&slots, 6, 2), 2);
    }

    #[test]
    fn unix_time_of_an_instant_follows_the_wall_clock() {
        let now = Instant::now();
        let later = instant_to_unix_ns(now + Duration::from_secs(2));
        let earlier = instant_to_unix_ns(now);
        let diff = later - earlier;
        assert!((1_990_000_000..2_010_000_000).contains(&diff), "{diff}");
    }
}
