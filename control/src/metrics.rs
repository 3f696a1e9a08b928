//! Control-plane metrics (`/metrics` on the control ops port).

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry,
};

pub struct ControlMetrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    /// Service API requests over a rate quota, by `quota` and `outcome` (delayed, refused).
    pub throttled: IntCounterVec,
    /// HTTP connections refused or cut by a limit, by `server` (service, ops) and `reason`.
    pub http_limited: IntCounterVec,
    pub registry_sequence: IntGauge,
    pub links_current: IntGauge,
    pub link_frames_in: IntCounterVec,
    /// Twin operations, by `op`, `origin` (service, device) and `status`.
    pub twin_ops: IntCounterVec,
    /// Desired-property changes sent towards connected devices, by `outcome` (sent,
    /// not_connected).
    pub desired_pushes: IntCounterVec,
    /// Direct method calls, by `outcome`.
    pub method_calls: IntCounterVec,
    /// Time from a method call's arrival to the device's answer (answered calls only).
    pub method_latency: Histogram,
    /// Cloud-to-device messages, by `event`.
    pub c2d: IntCounterVec,
    /// Cloud-to-device messages waiting in every device's queue (set at scrape).
    pub c2d_pending: IntGauge,
    /// Query pages served, by `item_type` (twin, raw, deviceJob).
    pub queries: IntCounterVec,
    /// Jobs entering a status, by `status` (queued, scheduled, running, completed, failed,
    /// cancelled).
    pub jobs: IntCounterVec,
    /// The hub's own events made durable in an engine's log, by `source`.
    pub hub_events: IntCounterVec,
    /// Device registrations with the provisioning service, by `outcome` (assigned, failed, or
    /// the refusal's reason) and `allocation` (hashed, static, geoLatency, custom; none when
    /// refused).
    pub dps_registrations: IntCounterVec,
    /// Provisioning service API calls (enrollments), by `status`.
    pub dps_requests: IntCounterVec,
    /// File uploads, by `outcome` (started, completed, failed, refused_active_limit,
    /// missing_blob).
    pub file_uploads: IntCounterVec,
    /// Bytes of the uploads completed.
    pub file_upload_bytes: prometheus::IntCounter,
}

impl ControlMetrics {
    /// [`httpd::Limits`] whose limits hit are counted under `server`.
    pub fn http_limits(&self, server: &'static str) -> roost_common::httpd::Limits {
        let counter = self.http_limited.clone();
        roost_common::httpd::Limits {
            on_limit: std::sync::Arc::new(move |reason| {
                counter.with_label_values(&[server, reason]).inc()
            }),
            ..roost_common::httpd::Limits::new()
        }
    }

    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "roost_control_http_requests_total",
                "Service API requests, by HTTP status.",
            ),
            &["status"],
        )
        .expect("static metric");
        let http_limited = IntCounterVec::new(
            Opts::new(
                "roost_control_http_limited_total",
                "HTTP connections refused or cut by a limit, by server and reason (connection_limit, tls_handshake_timeout, header_read_timeout).",
            ),
            &["server", "reason"],
        )
        .expect("static metric");
        let throttled = IntCounterVec::new(
            Opts::new(
                "roost_control_throttled_total",
                "Service API requests over a rate quota, by quota and outcome (delayed: held by traffic shaping; refused: answered 429 with 429001).",
            ),
            &["quota", "outcome"],
        )
        .expect("static metric");
        let link_frames_in = IntCounterVec::new(
            Opts::new(
                "roost_control_link_frames_in_total",
                "Frames received from engines, by kind.",
            ),
            &["kind"],
        )
        .expect("static metric");
        let twin_ops = IntCounterVec::new(
            Opts::new(
                "roost_control_twin_ops_total",
                "Twin operations, by op (get, patch, replace, patch_reported), origin (service: the REST API; device: over the control link) and status (the HTTP or MQTT twin status answered).",
            ),
            &["op", "origin", "status"],
        )
        .expect("static metric");
        let desired_pushes = IntCounterVec::new(
            Opts::new(
                "roost_control_desired_pushes_total",
                "Desired-property changes sent to a device's engine, by outcome (sent; not_connected: no engine reported the device connected, so it gets the change with its next twin GET).",
            ),
            &["outcome"],
        )
        .expect("static metric");
        let method_calls = IntCounterVec::new(
            Opts::new(
                "roost_control_method_calls_total",
                "Direct method calls, by outcome: answered (200 with the device's status), not_online (404103: not connected or not subscribed within connectTimeoutInSeconds), timeout (504101: no answer within responseTimeoutInSeconds), not_found (404001/404010), bad_request (400), too_many (429), server_error.",
            ),
            &["outcome"],
        )
        .expect("static metric");
        let method_latency = Histogram::with_opts(
            HistogramOpts::new(
                "roost_control_method_latency_seconds",
                "Time from a direct method call's arrival to the device's answer.",
            )
            .buckets(exponential_buckets(0.001, 2.0, 19).expect("static buckets")),
        )
        .expect("static metric");
        let c2d = IntCounterVec::new(
            Opts::new(
                "roost_control_c2d_messages_total",
                "Cloud-to-device messages, by event: queued, delivered (sent to the device's engine), redelivered (again, after a connection ended without acknowledging it), completed (the device acknowledged it), expired, queue_full (refused with 403004).",
            ),
            &["event"],
        )
        .expect("static metric");
        let c2d_pending = IntGauge::new(
            "roost_control_c2d_pending",
            "Cloud-to-device messages waiting in every device's queue.",
        )
        .expect("static metric");
        let queries = IntCounterVec::new(
            Opts::new(
                "roost_control_query_pages_total",
                "Query result pages served (POST /devices/query), by item type (twin, raw, deviceJob).",
            ),
            &["item_type"],
        )
        .expect("static metric");
        let jobs = IntCounterVec::new(
            Opts::new(
                "roost_control_jobs_total",
                "Jobs entering a status, by status (queued, scheduled, running, completed, failed, cancelled).",
            ),
            &["status"],
        )
        .expect("static metric");
        let hub_events = IntCounterVec::new(
            Opts::new(
                "roost_control_hub_events_total",
                "The hub's own events (twinChangeEvents, deviceLifecycleEvents, deviceConnectionStateEvents) an engine made durable in the events log, by source.",
            ),
            &["source"],
        )
        .expect("static metric");
        let dps_registrations = IntCounterVec::new(
            Opts::new(
                "roost_dps_registrations_total",
                "Device registrations with the provisioning service, by outcome (assigned, failed, or the refusal's reason) and allocation (hashed, static, geoLatency, custom; none when refused).",
            ),
            &["outcome", "allocation"],
        )
        .expect("static metric");
        let dps_requests = IntCounterVec::new(
            Opts::new(
                "roost_dps_requests_total",
                "Provisioning service HTTPS requests (device registrations and the enrollments API), by kind (device, service) and status.",
            ),
            &["kind", "status"],
        )
        .expect("static metric");
        let file_uploads = IntCounterVec::new(
            Opts::new(
                "roost_file_uploads_total",
                "File uploads, by outcome (started, completed, failed, refused_active_limit, missing_blob).",
            ),
            &["outcome"],
        )
        .expect("static metric");
        let file_upload_bytes = prometheus::IntCounter::new(
            "roost_file_upload_bytes_total",
            "Bytes of the file uploads completed.",
        )
        .expect("static metric");
        let registry_sequence = IntGauge::new(
            "roost_control_registry_sequence",
            "Sequence of the last registry change.",
        )
        .expect("static metric");
        let links_current = IntGauge::new(
            "roost_control_links_current",
            "Engines connected over the control link.",
        )
        .expect("static metric");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_limited.clone()),
            Box::new(throttled.clone()),
            Box::new(link_frames_in.clone()),
            Box::new(registry_sequence.clone()),
            Box::new(links_current.clone()),
            Box::new(twin_ops.clone()),
            Box::new(desired_pushes.clone()),
            Box::new(method_calls.clone()),
            Box::new(method_latency.clone()),
            Box::new(c2d.clone()),
            Box::new(c2d_pending.clone()),
            Box::new(queries.clone()),
            Box::new(jobs.clone()),
            Box::new(hub_events.clone()),
            Box::new(dps_registrations.clone()),
            Box::new(dps_requests.clone()),
            Box::new(file_uploads.clone()),
            Box::new(file_upload_bytes.clone()),
        ] {
            registry
                .register(m)
                .expect("each metric is registered once");
        }
        Self {
            registry,
            requests,
            throttled,
            http_limited,
            registry_sequence,
            links_current,
            link_frames_in,
            twin_ops,
            desired_pushes,
            method_calls,
            method_latency,
            c2d,
            c2d_pending,
            queries,
            jobs,
            hub_events,
            dps_registrations,
            dps_requests,
            file_uploads,
            file_upload_bytes,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self::new()
    }
}
