//! The endpoint families (DESIGN.md §7), labelled by endpoint name and kind: names come from
//! the epoch, at most 64 of them.

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct EndpointMetrics {
    deliveries: IntCounterVec,
    failures: IntCounterVec,
    lag: IntGaugeVec,
    expired: IntCounterVec,
    seconds: HistogramVec,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    // Names are fixed and registered once per registry: a clash is a bug in this file.
    registry
        .register(Box::new(c.clone()))
        .expect("endpoint metric registered once");
    c
}

impl EndpointMetrics {
    pub fn new(registry: &Registry) -> Self {
        let opts = |name: &str, help: &str| Opts::new(name, help);
        let labels = &["endpoint", "kind"];
        EndpointMetrics {
            deliveries: register(
                registry,
                IntCounterVec::new(
                    opts("roost_endpoint_deliveries_total", "Records an external endpoint's destination acknowledged."),
                    labels,
                )
                .expect("valid metric"),
            ),
            failures: register(
                registry,
                IntCounterVec::new(
                    opts("roost_endpoint_failures_total", "Failed delivery attempts (each retried), by code: connect, refused, timeout, io, db, corrupt."),
                    &["endpoint", "kind", "code"],
                )
                .expect("valid metric"),
            ),
            lag: register(
                registry,
                IntGaugeVec::new(
                    opts("roost_endpoint_lag_records", "Log records an endpoint's dispatcher has yet to look at, over all partitions."),
                    labels,
                )
                .expect("valid metric"),
            ),
            expired: register(
                registry,
                IntCounterVec::new(
                    opts("roost_endpoint_expired_total", "Log records retention deleted before an endpoint's dispatcher took them."),
                    labels,
                )
                .expect("valid metric"),
            ),
            seconds: register(
                registry,
                HistogramVec::new(
                    HistogramOpts::new("roost_endpoint_delivery_seconds", "Time to deliver one batch that was acknowledged.")
                        .buckets(exponential_buckets(0.000_1, 4.0, 10).expect("valid buckets")),
                    labels,
                )
                .expect("valid metric"),
            ),
        }
    }

    /// The series of one endpoint.
    pub fn series(&self, endpoint: &str, kind: &'static str) -> EndpointSeries {
        let l = [endpoint, kind];
        EndpointSeries {
            deliveries: self.deliveries.with_label_values(&l),
            lag: self.lag.with_label_values(&l),
            expired: self.expired.with_label_values(&l),
            seconds: self.seconds.with_label_values(&l),
            failures: self.failures.clone(),
            endpoint: endpoint.to_string(),
            kind,
        }
    }

    /// Drops an endpoint's series once it is gone from the epoch.
    pub fn forget(&self, endpoint: &str, kind: &'static str) {
        let l = [endpoint, kind];
        let _ = self.deliveries.remove_label_values(&l);
        let _ = self.lag.remove_label_values(&l);
        let _ = self.expired.remove_label_values(&l);
        let _ = self.seconds.remove_label_values(&l);
        for code in [
            "connect",
            "refused",
            "timeout",
            "io",
            "db",
            "corrupt",
            "gap",
            "no_partition",
        ] {
            let _ = self.failures.remove_label_values(&[endpoint, kind, code]);
        }
    }
}

pub struct EndpointSeries {
    pub deliveries: IntCounter,
    pub lag: IntGauge,
    pub expired: IntCounter,
    pub seconds: Histogram,
    failures: IntCounterVec,
    endpoint: String,
    kind: &'static str,
}

impl EndpointSeries {
    pub fn failures(&self, code: &str) -> IntCounter {
        self.failures
            .with_label_values(&[self.endpoint.as_str(), self.kind, code])
    }
}
