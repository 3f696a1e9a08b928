//! Quotas and throttles (spec §8): which rates and sizes a hub allows, the IoT Hub tiers'
//! values as presets, and the token bucket every throttle is made of.
//!
//! What it is: data and arithmetic. A [`Quotas`] is a set of named [`Limit`]s, each either a
//! number or unlimited; control builds one from a preset and overrides and sends it to the
//! engines in the config epoch as `(name, value)` pairs. A [`Bucket`] meters one rate with
//! IoT Hub's traffic shaping: a request over the rate is delayed while the backlog it makes
//! stays under [`Limit::ThrottleBacklogMs`], and refused beyond that.
//!
//! What it is not: where the limits are enforced. The engine's shards (new connections,
//! device-to-cloud sends, devices' twin requests), the device session (per-device sends,
//! message size) and control's service API (registry operations, twin reads and updates,
//! method bytes, cloud-to-device sends, queries, jobs) each hold their buckets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One quota a hub can set. Rates are per second or per minute, as IoT Hub states them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// New device connections (CONNECTs started) per second, hub-wide.
    NewConnectionsPerSec,
    /// Device-to-cloud messages per second, hub-wide.
    D2cSendsPerSec,
    /// Device-to-cloud messages per second from one device or module. IoT Hub has no such
    /// throttle; a self-hosted hub may want one against a runaway device.
    DeviceD2cSendsPerSec,
    /// The largest device-to-cloud message body, in bytes (IoT Hub: 256 KB).
    D2cMaxBytes,
    /// Identity registry operations (create, get, update, delete, list) per minute.
    RegistryOpsPerMin,
    /// Cloud-to-device sends per minute.
    C2dSendsPerMin,
    /// Twin reads per second (device and service side).
    TwinReadsPerSec,
    /// Twin updates per second (device and service side).
    TwinUpdatesPerSec,
    /// Direct-method traffic in bytes per second (IoT Hub meters it in 4 KB units).
    MethodBytesPerSec,
    /// Queries per minute.
    QueriesPerMin,
    /// Jobs operations (create, update, list, delete) per minute.
    JobsOpsPerMin,
    /// The longest a request over a rate is delayed (traffic shaping) before it is refused:
    /// the MQTT connection is closed (`throttled`), a REST call gets 429 with 429001.
    ThrottleBacklogMs,
}

impl Limit {
    pub const ALL: [Limit; 12] = [
        Limit::NewConnectionsPerSec,
        Limit::D2cSendsPerSec,
        Limit::DeviceD2cSendsPerSec,
        Limit::D2cMaxBytes,
        Limit::RegistryOpsPerMin,
        Limit::C2dSendsPerMin,
        Limit::TwinReadsPerSec,
        Limit::TwinUpdatesPerSec,
        Limit::MethodBytesPerSec,
        Limit::QueriesPerMin,
        Limit::JobsOpsPerMin,
        Limit::ThrottleBacklogMs,
    ];

    /// The name in the config epoch, on the command line and in the docs.
    pub fn name(self) -> &'static str {
        match self {
            Limit::NewConnectionsPerSec => "new_connections_per_sec",
            Limit::D2cSendsPerSec => "d2c_sends_per_sec",
            Limit::DeviceD2cSendsPerSec => "device_d2c_sends_per_sec",
            Limit::D2cMaxBytes => "d2c_max_bytes",
            Limit::RegistryOpsPerMin => "registry_ops_per_min",
            Limit::C2dSendsPerMin => "c2d_sends_per_min",
            Limit::TwinReadsPerSec => "twin_reads_per_sec",
            Limit::TwinUpdatesPerSec => "twin_updates_per_sec",
            Limit::MethodBytesPerSec => "method_bytes_per_sec",
            Limit::QueriesPerMin => "queries_per_min",
            Limit::JobsOpsPerMin => "jobs_ops_per_min",
            Limit::ThrottleBacklogMs => "throttle_backlog_ms",
        }
    }

    pub fn from_name(name: &str) -> Option<Limit> {
        Limit::ALL.into_iter().find(|l| l.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }

    /// A rate's period; `None` for a size or a duration.
    pub fn period(self) -> Option<Duration> {
        match self {
            Limit::D2cMaxBytes | Limit::ThrottleBacklogMs => None,
            Limit::RegistryOpsPerMin
            | Limit::C2dSendsPerMin
            | Limit::QueriesPerMin
            | Limit::JobsOpsPerMin => Some(Duration::from_secs(60)),
            _ => Some(Duration::from_secs(1)),
        }
    }
}

/// IoT Hub's tiers (spec §8), whose throttles are the presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Free,
    S1,
    S2,
    S3,
}

impl Tier {
    pub fn from_name(name: &str) -> Option<Tier> {
        Some(match name.to_ascii_lowercase().as_str() {
            "free" | "f1" => Tier::Free,
            "s1" => Tier::S1,
            "s2" => Tier::S2,
            "s3" => Tier::S3,
            _ => return None,
        })
    }
}

/// The largest device-to-cloud body IoT Hub takes, in every tier.
pub const D2C_MAX_BYTES: u64 = 256 * 1024;
/// "No limit" in a config epoch's pairs.
pub const UNLIMITED: u64 = u64::MAX;
/// How long an over-rate request may wait by default before it is refused.
pub const DEFAULT_BACKLOG_MS: u64 = 5_000;

/// A hub's quotas: a value per [`Limit`], `None` for unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas([Option<u64>; Limit::ALL.len()]);

impl Default for Quotas {
    /// roost's own default: no rate quotas (the hub is sized by its hardware, not by units),
    /// IoT Hub's size limit and shaping backlog.
    fn default() -> Self {
        let mut q = Quotas([None; Limit::ALL.len()]);
        q.set(Limit::D2cMaxBytes, Some(D2C_MAX_BYTES));
        q.set(Limit::ThrottleBacklogMs, Some(DEFAULT_BACKLOG_MS));
        q
    }
}

/// Why a quota setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error("unknown limit {0:?} (known: {known})", known = Limit::ALL.map(Limit::name).join(", "))]
    UnknownLimit(String),
    #[error("unknown tier {0:?} (free, s1, s2, s3, or unlimited)")]
    UnknownTier(String),
    #[error("{0}: expected name=value with a whole number or \"unlimited\"")]
    BadSetting(String),
    #[error("{0} cannot be over {1}")]
    TooLarge(&'static str, u64),
    #[error("units must be between 1 and 200, not {0}")]
    BadUnits(u32),
}

impl Quotas {
    /// IoT Hub's throttles for `tier` with `units` units (spec §8's table; "max(100/s,
    /// 12/s/u)" is the larger of the two).
    pub fn preset(tier: Tier, units: u32) -> Result<Quotas, QuotaError> {
        if !(1..=200).contains(&units) {
            return Err(QuotaError::BadUnits(units));
        }
        let u = u64::from(units);
        let (conn, d2c, per_min, c2d, method, queries, twin_r, twin_u) = match tier {
            Tier::Free | Tier::S1 => (
                (12 * u).max(100),
                (12 * u).max(100),
                100 * u,
                100 * u,
                160 * 1024 * u,
                20 * u,
                100,
                50,
            ),
            Tier::S2 => (
                120 * u,
                120 * u,
                100 * u,
                100 * u,
                480 * 1024 * u,
                20 * u,
                (10 * u).max(100),
                (5 * u).max(50),
            ),
            Tier::S3 => (
                6000 * u,
                6000 * u,
                5000 * u,
                5000 * u,
                24 * 1024 * 1024 * u,
                1000 * u,
                500 * u,
                250 * u,
            ),
        };
        let mut q = Quotas::default();
        for (limit, value) in [
            (Limit::NewConnectionsPerSec, conn),
            (Limit::D2cSendsPerSec, d2c),
            (Limit::RegistryOpsPerMin, per_min),
            (Limit::C2dSendsPerMin, c2d),
            (Limit::MethodBytesPerSec, method),
            (Limit::QueriesPerMin, queries),
            (Limit::TwinReadsPerSec, twin_r),
            (Limit::TwinUpdatesPerSec, twin_u),
            (Limit::JobsOpsPerMin, per_min),
        ] {
            q.set(limit, Some(value));
        }
        Ok(q)
    }

    /// A preset by name (`s1`, `s2`, `s3`, `free`, or `unlimited` for [`Quotas::default`]).
    pub fn named_preset(name: &str, units: u32) -> Result<Quotas, QuotaError> {
        if name.eq_ignore_ascii_case("unlimited") {
            return Ok(Quotas::default());
        }
        let tier = Tier::from_name(name).ok_or_else(|| QuotaError::UnknownTier(name.into()))?;
        Quotas::preset(tier, units)
    }

    pub fn get(&self, limit: Limit) -> Option<u64> {
        self.0[limit.index()]
    }

    pub fn set(&mut self, limit: Limit, value: Option<u64>) {
        self.0[limit.index()] = value;
    }

    /// Applies one `name=value` override (`value` a number or `unlimited`).
    pub fn apply_setting(&mut self, setting: &str) -> Result<(), QuotaError> {
        let bad = || QuotaError::BadSetting(setting.into());
        let (name, value) = setting.split_once('=').ok_or_else(bad)?;
        let limit =
            Limit::from_name(name.trim()).ok_or_else(|| QuotaError::UnknownLimit(name.into()))?;
        let value = match value.trim() {
            "unlimited" => None,
            v => Some(v.replace('_', "").parse::<u64>().map_err(|_| bad())?),
        };
        self.set_checked(limit, value)
    }

    /// Sets `limit`, refusing what no hub may set: a message size over IoT Hub's (the MQTT
    /// codec's frame limit is sized for it) or an unlimited one.
    fn set_checked(&mut self, limit: Limit, value: Option<u64>) -> Result<(), QuotaError> {
        if limit == Limit::D2cMaxBytes && value.is_none_or(|v| v > D2C_MAX_BYTES) {
            return Err(QuotaError::TooLarge(limit.name(), D2C_MAX_BYTES));
        }
        self.set(limit, value);
        Ok(())
    }

    /// The pairs a config epoch carries: every limit, [`UNLIMITED`] for none.
    pub fn to_named(&self) -> Vec<(String, u64)> {
        Limit::ALL
            .into_iter()
            .map(|l| (l.name().to_string(), self.get(l).unwrap_or(UNLIMITED)))
            .collect()
    }

    /// The quotas an epoch's pairs describe; a limit the epoch does not name keeps its
    /// default (an epoch from before quotas is the default). An unknown name is refused: an
    /// engine must not run with a limit it would silently ignore.
    pub fn from_named(pairs: &[(String, u64)]) -> Result<Quotas, QuotaError> {
        let mut q = Quotas::default();
        for (name, value) in pairs {
            let limit =
                Limit::from_name(name).ok_or_else(|| QuotaError::UnknownLimit(name.clone()))?;
            q.set_checked(limit, (*value != UNLIMITED).then_some(*value))?;
        }
        Ok(q)
    }

    /// The most a request may be delayed by shaping.
    pub fn backlog(&self) -> Duration {
        Duration::from_millis(self.get(Limit::ThrottleBacklogMs).unwrap_or(0))
    }

    /// A bucket for `limit`, its rate divided by `share` (a hub-wide rate split over the
    /// shards that meter it), holding one period of it (100 registry operations per minute
    /// may come at once, then one every 0.6 s); `None` when unlimited.
    pub fn bucket(&self, limit: Limit, share: usize, now: Instant) -> Option<Bucket> {
        let value = self.get(limit)?;
        let period = limit.period()?;
        let per_period = value as f64 / share.max(1) as f64;
        let per_sec = per_period / period.as_secs_f64();
        Some(Bucket::new(per_sec, per_period, self.backlog(), now))
    }
}

/// The quotas in force, shared by the thread that applies epochs and the shards that meter
/// them: each change bumps a version, so a shard rebuilds its buckets only when one happened.
#[derive(Debug, Default)]
pub struct QuotaCell {
    version: AtomicU64,
    quotas: Mutex<Quotas>,
}

impl QuotaCell {
    pub fn set(&self, quotas: Quotas) {
        let mut q = self.quotas.lock().unwrap_or_else(|p| p.into_inner());
        if *q != quotas {
            *q = quotas;
            self.version.fetch_add(1, Ordering::Release);
        }
    }

    /// The version of the quotas in force: it changes whenever they do.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn get(&self) -> Quotas {
        *self.quotas.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a [`Bucket`] says of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admit {
    /// Within the rate.
    Now,
    /// Over it: go ahead after this delay (traffic shaping); the cost is already charged.
    After(Duration),
    /// Over it by more than the backlog allows; nothing was charged.
    Refused,
}

/// A token bucket with a debt: it holds up to `burst` tokens, and a request over them borrows
/// against the future, to be served once the borrowed tokens have accrued — as long as that
/// is within the backlog.
#[derive(Debug, Clone)]
pub struct Bucket {
    per_sec: f64,
    burst: f64,
    backlog: Duration,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket for `per_sec` holding `burst` (at least one request, so a share of a
    /// rate under one per period still lets one through).
    pub fn new(per_sec: f64, burst: f64, backlog: Duration, now: Instant) -> Self {
        let burst = burst.max(1.0);
        Self {
            per_sec: per_sec.max(f64::MIN_POSITIVE),
            burst,
            backlog,
            tokens: burst,
            last: now,
        }
    }

    pub fn per_sec(&self) -> f64 {
        self.per_sec
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
    }

    /// Charges `cost` (1 for a message, its size for a byte rate).
    pub fn take(&mut self, now: Instant, cost: f64) -> Admit {
        self.refill(now);
        let after = self.tokens - cost;
        if after >= 0.0 {
            self.tokens = after;
            return Admit::Now;
        }
        // A rate of 0 (or one so small the wait overflows a Duration) can never serve it.
        let wait = match Duration::try_from_secs_f64(-after / self.per_sec) {
            Ok(wait) if wait <= self.backlog => wait,
            _ => return Admit::Refused,
        };
        self.tokens = after;
        Admit::After(wait)
    }

    /// Charges `cost` only if it is within the rate now: no shaping (for a connection, whose
    /// wait would be spent holding a socket before authentication).
    pub fn take_now(&mut self, now: Instant, cost: f64) -> bool {
        self.refill(now);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_follow_the_iot_hub_table() {
        let s1 = Quotas::preset(Tier::S1, 1).unwrap();
        assert_eq!(s1.get(Limit::D2cSendsPerSec), Some(100)); // max(100/s, 12/s/u)
        assert_eq!(s1.get(Limit::RegistryOpsPerMin), Some(100));
        assert_eq!(s1.get(Limit::TwinUpdatesPerSec), Some(50));
        let s1x10 = Quotas::preset(Tier::S1, 10).unwrap();
        assert_eq!(s1x10.get(Limit::NewConnectionsPerSec), Some(120));
        assert_eq!(s1x10.get(Limit::RegistryOpsPerMin), Some(1000));
        let s2x20 = Quotas::preset(Tier::S2, 20).unwrap();
        assert_eq!(s2x20.get(Limit::TwinReadsPerSec), Some(200)); // max(100/s, 10/s/u)
        assert_eq!(s2x20.get(Limit::D2cSendsPerSec), Some(2400));
        let s3 = Quotas::preset(Tier::S3, 2).unwrap();
        assert_eq!(s3.get(Limit::D2cSendsPerSec), Some(12_000));
        assert_eq!(s3.get(Limit::QueriesPerMin), Some(2000));
        assert_eq!(s3.get(Limit::MethodBytesPerSec), Some(48 * 1024 * 1024));
        for q in [s1, s1x10, s2x20, s3] {
            assert_eq!(q.get(Limit::D2cMaxBytes), Some(256 * 1024));
            assert_eq!(q.get(Limit::DeviceD2cSendsPerSec), None);
        }
        assert_eq!(Quotas::preset(Tier::S1, 0), Err(QuotaError::BadUnits(0)));
    }

    #[test]
    fn the_default_has_no_rate_quota() {
        let q = Quotas::named_preset("unlimited", 1).unwrap();
        assert_eq!(q, Quotas::default());
        for l in Limit::ALL {
            if l.period().is_some() {
                assert_eq!(q.get(l), None, "{}", l.name());
                assert!(q.bucket(l, 2, Instant::now()).is_none());
            }
        }
    }

    #[test]
    fn settings_override_and_round_trip_through_the_epoch_pairs() {
        let mut q = Quotas::named_preset("S3", 1).unwrap();
        q.apply_setting("device_d2c_sends_per_sec=10").unwrap();
        q.apply_setting("d2c_sends_per_sec = unlimited").unwrap();
        q.apply_setting("d2c_max_bytes=65_536").unwrap();
        assert_eq!(q.get(Limit::DeviceD2cSendsPerSec), Some(10));
        assert_eq!(q.get(Limit::D2cSendsPerSec), None);
        assert_eq!(q.get(Limit::D2cMaxBytes), Some(65_536));
        assert_eq!(Quotas::from_named(&q.to_named()).unwrap(), q);
        assert!(matches!(
            q.apply_setting("d2c_per_fortnight=1"),
            Err(QuotaError::UnknownLimit(_))
        ));
        assert!(matches!(
            q.apply_setting("d2c_max_bytes"),
            Err(QuotaError::BadSetting(_))
        ));
        assert!(matches!(
            q.apply_setting("d2c_max_bytes=-1"),
            Err(QuotaError::BadSetting(_))
        ));
        assert!(Quotas::from_named(&[("nope".into(), 1)]).is_err());
        assert_eq!(Quotas::from_named(&[]).unwrap(), Quotas::default());
        assert!(matches!(
            q.apply_setting("d2c_max_bytes=300000"),
            Err(QuotaError::TooLarge(..))
        ));
        assert!(Quotas::from_named(&[("d2c_max_bytes".into(), UNLIMITED)]).is_err());
        assert!(matches!(
            Quotas::named_preset("s9", 1),
            Err(QuotaError::UnknownTier(_))
        ));
    }

    #[test]
    fn a_bucket_shapes_within_the_backlog_and_refuses_beyond_it() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, 10.0, Duration::from_millis(500), t0);
        // One second of burst goes through at once.
        for _ in 0..10 {
            assert_eq!(b.take(t0, 1.0), Admit::Now);
        }
        // Then each request waits for its token: 100 ms, 200 ms, ... up to the backlog.
        let waits: Vec<Admit> = (0..6).map(|_| b.take(t0, 1.0)).collect();
        for (i, w) in waits[..5].iter().enumerate() {
            let Admit::After(d) = *w else { panic!("{w:?}") };
            let want = 0.1 * (i + 1) as f64;
            assert!((d.as_secs_f64() - want).abs() < 1e-6, "{d:?} vs {want}");
        }
        assert_eq!(waits[5], Admit::Refused);
        // A refused request charged nothing: after 0.5 s the debt is paid.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take(t1, 1.0), Admit::After(Duration::from_millis(100)));
        // After a long quiet the bucket is full again, but no fuller than the burst.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..10 {
            assert_eq!(b.take(t2, 1.0), Admit::Now);
        }
        assert!(matches!(b.take(t2, 1.0), Admit::After(_)));
    }

    #[test]
    fn a_rate_of_zero_refuses_past_its_one_request_and_a_huge_one_never_waits() {
        let t0 = Instant::now();
        let mut q = Quotas::default();
        q.apply_setting("d2c_sends_per_sec=0").unwrap();
        let mut b = q.bucket(Limit::D2cSendsPerSec, 2, t0).unwrap();
        assert_eq!(b.take(t0, 1.0), Admit::Now);
        // The wait would overflow a Duration: refused, not a panic.
        assert_eq!(b.take(t0, 1.0), Admit::Refused);
        assert_eq!(b.take(t0 + Duration::from_secs(3600), 1.0), Admit::Refused);
        assert!(!b.take_now(t0, 1.0));
        q.apply_setting(&format!("d2c_sends_per_sec={}", u64::MAX - 1))
            .unwrap();
        let mut b = q.bucket(Limit::D2cSendsPerSec, 2, t0).unwrap();
        for _ in 0..1000 {
            assert_eq!(b.take(t0, 1.0), Admit::Now);
        }
        // A cost larger than any burst (a byte rate's huge message) waits or is refused.
        let mut b = Bucket::new(1.0, 1.0, Duration::from_secs(5), t0);
        assert_eq!(b.take(t0, 1e300), Admit::Refused);
    }

    #[test]
    fn a_bucket_split_over_shards_meters_the_hub_rate() {
        let q = Quotas::preset(Tier::S1, 1).unwrap();
        let t0 = Instant::now();
        let b = q.bucket(Limit::D2cSendsPerSec, 4, t0).unwrap();
        assert!((b.per_sec() - 25.0).abs() < 1e-9);
        let mut r = q.bucket(Limit::RegistryOpsPerMin, 1, t0).unwrap();
        assert!((r.per_sec() - 100.0 / 60.0).abs() < 1e-9);
        // A minute's worth at once, then one every 0.6 s.
        for _ in 0..100 {
            assert_eq!(r.take(t0, 1.0), Admit::Now);
        }
        let Admit::After(d) = r.take(t0, 1.0) else {
            panic!("the 101st waits")
        };
        assert!((d.as_secs_f64() - 0.6).abs() < 1e-6, "{d:?}");
        // At a steady 2× the rate for 10 s, a bucket admits the rate (plus its burst).
        let mut b = Bucket::new(100.0, 100.0, Duration::ZERO, t0);
        let admitted = (0..2000)
            .filter(|i| b.take_now(t0 + Duration::from_millis(5 * i), 1.0))
            .count();
        assert!((1095..=1105).contains(&admitted), "{admitted}");
    }
}
