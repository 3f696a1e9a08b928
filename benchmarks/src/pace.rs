//! Open-loop pacing arithmetic: how a total rate and a total count are split over connections,
//! and how many messages a connection owes at a given moment.
//!
//! Open loop means the schedule does not wait for the server: a connection that fell behind
//! sends everything it owes at its next tick. Each connection wakes once per tick (not once per
//! message), and the ticks of different connections are phase-shifted so they do not all fire
//! at once.

use std::time::Duration;

/// Shortest tick: tokio's timer does not resolve below a millisecond.
pub const MIN_TICK: Duration = Duration::from_millis(1);
/// Longest tick, so a slow connection's messages are never held back more than this.
pub const MAX_TICK: Duration = Duration::from_millis(100);

/// A connection's share of a total rate (messages per second).
pub fn per_conn_rate(total: f64, conns: usize) -> f64 {
    if conns == 0 {
        return 0.0;
    }
    total / conns as f64
}

/// Connection `i`'s share of `total` messages over `conns` connections: the remainder goes to
/// the first connections, so the shares add up to `total` exactly.
pub fn quota(total: u64, conns: usize, i: usize) -> u64 {
    if conns == 0 {
        return 0;
    }
    let n = conns as u64;
    total / n + u64::from((i as u64) < total % n)
}

/// The tick for a connection sending `rate` messages per second: about one message per tick,
/// within [`MIN_TICK`, `MAX_TICK`].
pub fn tick_for(rate: f64) -> Duration {
    if rate <= 0.0 || !rate.is_finite() {
        return MAX_TICK;
    }
    Duration::from_secs_f64((1.0 / rate).clamp(MIN_TICK.as_secs_f64(), MAX_TICK.as_secs_f64()))
}

/// Messages due `elapsed` after the start at `rate` per second: the first is due at once.
pub fn due(rate: f64, elapsed: Duration) -> u64 {
    if rate <= 0.0 || !rate.is_finite() {
        return 0;
    }
    (elapsed.as_secs_f64() * rate).floor() as u64 + 1
}

/// Start offset of connection `i` of `conns` within one tick, spreading their wake-ups.
pub fn phase(i: usize, conns: usize, tick: Duration) -> Duration {
    if conns == 0 {
        return Duration::ZERO;
    }
    tick.mul_f64((i % conns) as f64 / conns as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_add_up_to_the_total() {
        for (total, conns) in [
            (0u64, 3usize),
            (10, 3),
            (1_000_000, 7),
            (5, 10),
            (20_000, 1000),
        ] {
            let sum: u64 = (0..conns).map(|i| quota(total, conns, i)).sum();
            assert_eq!(sum, total, "total {total} over {conns}");
            let max = (0..conns)
                .map(|i| quota(total, conns, i))
                .max()
                .unwrap_or(0);
            let min = (0..conns)
                .map(|i| quota(total, conns, i))
                .min()
                .unwrap_or(0);
            assert!(max - min <= 1, "shares differ by at most one");
        }
        assert_eq!(quota(10, 0, 0), 0);
    }

    #[test]
    fn rate_split_over_connections() {
        assert_eq!(per_conn_rate(20_000.0, 1000), 20.0);
        assert_eq!(per_conn_rate(5.0, 0), 0.0);
    }

    #[test]
    fn tick_carries_about_one_message_within_bounds() {
        assert_eq!(tick_for(20.0), Duration::from_millis(50));
        assert_eq!(tick_for(100_000.0), MIN_TICK);
        assert_eq!(tick_for(0.5), MAX_TICK);
        assert_eq!(tick_for(0.0), MAX_TICK);
        assert_eq!(tick_for(f64::NAN), MAX_TICK);
    }

    #[test]
    fn due_counts_the_first_message_at_time_zero() {
        assert_eq!(due(20.0, Duration::ZERO), 1);
        assert_eq!(due(20.0, Duration::from_millis(49)), 1);
        assert_eq!(due(20.0, Duration::from_millis(50)), 2);
        assert_eq!(due(20.0, Duration::from_secs(10)), 201);
        assert_eq!(due(1000.0, Duration::from_millis(1500)), 1501);
        assert_eq!(due(0.0, Duration::from_secs(5)), 0);
    }

    #[test]
    fn over_a_run_the_schedule_delivers_the_rate() {
        // 1000 connections at 20/s for 20 s: 400 000 messages, within one per connection.
        let rate = per_conn_rate(20_000.0, 1000);
        let total: u64 = (0..1000)
            .map(|_| due(rate, Duration::from_secs(20)) - 1)
            .sum();
        assert_eq!(total, 400_000);
    }

    #[test]
    fn phases_spread_within_one_tick() {
        let tick = Duration::from_millis(50);
        assert_eq!(phase(0, 4, tick), Duration::ZERO);
        assert_eq!(phase(2, 4, tick), Duration::from_millis(25));
        assert!(phase(3, 4, tick) < tick);
        assert_eq!(phase(1, 0, tick), Duration::ZERO);
    }
}
