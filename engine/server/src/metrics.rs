//! Engine metrics (DESIGN.md §7): one prometheus registry per engine, and per-shard *local*
//! handles that count with plain arithmetic on the hot path and are flushed into the shared
//! series by the shard's housekeeping tick — so no atomic is touched per message.

use std::cell::RefCell;
use std::collections::HashMap;

use prometheus::local::{LocalHistogram, LocalIntCounter};
use prometheus::{
    exponential_buckets, CounterVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

/// The engine's metric families. Shared by every shard and the ops endpoint.
pub struct Metrics {
    pub registry: Registry,
    connections_current: IntGaugeVec,
    connections_accepted: IntCounterVec,
    connect_refused: IntCounterVec,
    authentications: IntCounterVec,
    disconnects: IntCounterVec,
    pub(crate) commands_dropped: IntCounterVec,
    throttle_delayed: IntCounterVec,
    twin_requests: IntCounterVec,
    hub_events: IntCounterVec,
    messages_in: IntCounterVec,
    bytes_in: IntCounterVec,
    log_appends: IntCounterVec,
    log_append_latency: HistogramVec,
    log_commits: IntCounterVec,
    log_write_failures: IntCounterVec,
    /// 1 while a shard's log partition refuses appends after a failed write, by `shard`.
    pub log_unavailable: IntGaugeVec,
    pub link_connected: IntGauge,
    /// Version of the config epoch in force (0: none yet).
    pub epoch_version: IntGauge,
    /// Epochs applied or rejected, by `result` (`applied` or the rejection code).
    pub epochs: IntCounterVec,
    /// Commands from control, by `kind` and `outcome`.
    pub commands: IntCounterVec,
    /// Ops-port connections refused or cut by a limit, by `reason`.
    pub ops_limited: IntCounterVec,
    pub registry_sequence: IntGauge,
    pub registry_devices: IntGauge,
    /// Records retention deleted from the events log, by `partition`.
    pub events_expired: IntCounterVec,
    /// Records a consumer group has yet to read, by `group` and `partition` (set at scrape).
    pub consumer_lag: IntGaugeVec,
    /// Routing, flushed from each shard's `roost_routing::Stats` (see `routing.rs`).
    pub routing: RoutingMetrics,
    /// A shard that could not load routing the link had put in force.
    pub routing_load_failures: IntCounter,
    /// 1 for the hash of the epoch in force.
    pub epoch_info: IntGaugeVec,
    /// The external endpoints' dispatchers (`roost_endpoint_*`).
    pub endpoints: roost_endpoints::EndpointMetrics,
    /// Port 443: WebSocket upgrades by result (the subprotocol, or why refused).
    pub ws_upgrades: IntCounterVec,
    /// Port 443: plain HTTP requests by route and status.
    pub https_requests: IntCounterVec,
    /// AMQP connections open (TLS done).
    pub amqp_connections: IntGauge,
    /// AMQP links accepted.
    pub amqp_links: IntCounterVec,
    /// AMQP service links' calls of control, by operation and result.
    pub amqp_service_calls: IntCounterVec,
    /// AMQP links, deliveries and connections refused, by reason.
    pub amqp_refused: IntCounterVec,
    /// `$cbs` put-tokens, by result (`ok` or why not).
    pub amqp_cbs: IntCounterVec,
    /// Events sent to Event Hubs receivers.
    pub amqp_events_sent: IntCounter,
    /// Records an Event Hubs receiver has yet to get, by consumer group and partition (the
    /// latest receiver's, as of its last pass).
    pub amqp_receiver_lag: IntGaugeVec,
    /// Passes where a receiver had records waiting but no credit.
    pub amqp_credit_stalls: IntCounter,
}

/// The routing families; labels are the shard and names from the epoch (at most 100 routes,
/// 64 endpoints and a plugin list), never a device or a topic.
pub struct RoutingMetrics {
    pub route_matches: IntCounterVec,
    pub condition_errors: IntCounterVec,
    pub fallback: IntCounterVec,
    pub unrouted: IntCounterVec,
    pub plugin_runs: IntCounterVec,
    pub plugin_errors: IntCounterVec,
    pub plugin_verdicts: IntCounterVec,
    pub plugin_seconds: CounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .expect("metric definitions are static and valid");
    registry
        .register(Box::new(c.clone()))
        .expect("each metric is registered once");
    c
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let connections_current = IntGaugeVec::new(
            Opts::new(
                "roost_connections_current",
                "Open device connections that authenticated, by protocol.",
            ),
            &["shard", "protocol"],
        )
        .expect("static metric");
        registry
            .register(Box::new(connections_current.clone()))
            .expect("registered once");
        let log_append_latency = HistogramVec::new(
            HistogramOpts::new(
                "roost_log_append_latency_seconds",
                "Time from a message's append to the events log until it is durable.",
            )
            .buckets(exponential_buckets(0.000_05, 2.0, 16).expect("static buckets")),
            &["shard"],
        )
        .expect("static metric");
        registry
            .register(Box::new(log_append_latency.clone()))
            .expect("registered once");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("static metric");
            registry
                .register(Box::new(g.clone()))
                .expect("registered once");
            g
        };
        let link_connected = gauge(
            "roost_link_connected",
            "1 while the control link is up, else 0.",
        );
        let epoch_version = gauge(
            "roost_link_epoch_version",
            "Version of the config epoch the engine runs (0 before the first).",
        );
        let registry_sequence = gauge(
            "roost_registry_sequence",
            "Registry sequence the engine's replica is complete up to.",
        );
        let registry_devices = gauge(
            "roost_registry_devices",
            "Devices in the engine's registry replica.",
        );
        let log_unavailable = IntGaugeVec::new(
            Opts::new(
                "roost_log_unavailable",
                "1 while the shard's events log partition refuses appends after a failed write (it retries every second); /readyz is 503 meanwhile.",
            ),
            &["shard"],
        )
        .expect("static metric");
        registry
            .register(Box::new(log_unavailable.clone()))
            .expect("registered once");
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "roost_events_consumer_lag",
                "Records of the events log a consumer group has not read yet (from its checkpoint, or the first retained offset if that is later).",
            ),
            &["group", "partition"],
        )
        .expect("static metric");
        registry
            .register(Box::new(consumer_lag.clone()))
            .expect("registered once");
        let plugin_seconds = CounterVec::new(
            Opts::new(
                "roost_routing_plugin_seconds_total",
                "Time spent in a plugin's on_message, by shard and plugin.",
            ),
            &["shard", "plugin"],
        )
        .expect("static metric");
        registry
            .register(Box::new(plugin_seconds.clone()))
            .expect("registered once");
        let routing_load_failures = IntCounter::new(
            "roost_routing_load_failures_total",
            "Times a shard could not load the routing the link had put in force (it kept what it had).",
        )
        .expect("static metric");
        registry
            .register(Box::new(routing_load_failures.clone()))
            .expect("registered once");
        let epoch_info = IntGaugeVec::new(
            Opts::new(
                "roost_link_epoch_info",
                "1 for the hash (hex) and version of the config epoch in force.",
            ),
            &["hash", "version"],
        )
        .expect("static metric");
        registry
            .register(Box::new(epoch_info.clone()))
            .expect("registered once");
        let routing = RoutingMetrics {
            route_matches: counter(&registry, "roost_routing_route_matches_total", "Messages a route matched, by shard and route.", &["shard", "route"]),
            condition_errors: counter(&registry, "roost_routing_condition_errors_total", "Lua conditions that failed (counted as no match), by shard and route.", &["shard", "route"]),
            fallback: counter(&registry, "roost_routing_fallback_total", "Telemetry that matched no route and took the fallback route, by shard.", &["shard"]),
            unrouted: counter(&registry, "roost_routing_unrouted_total", "Messages that matched no route and had no fallback (not stored), by shard.", &["shard"]),
            plugin_runs: counter(&registry, "roost_routing_plugin_runs_total", "Plugin on_message calls, by shard and plugin.", &["shard", "plugin"]),
            plugin_errors: counter(&registry, "roost_routing_plugin_errors_total", "Plugin calls that failed, by shard, plugin and code (runtime, budget, memory, type, stale_handle, verdict, syntax, other).", &["shard", "plugin", "code"]),
            plugin_verdicts: counter(&registry, "roost_routing_plugin_verdicts_total", "Messages a plugin dropped or rejected, by shard, plugin and verdict.", &["shard", "plugin", "verdict"]),
            plugin_seconds,
        };
        Self {
            routing,
            routing_load_failures,
            epoch_info,
            endpoints: roost_endpoints::EndpointMetrics::new(&registry),
            ws_upgrades: counter(&registry, "roost_websocket_upgrades_total", "WebSocket upgrades on port 443, by result: the protocol (mqtt-ws, amqp-ws) or why refused (not_get, wrong_path, not_upgrade, bad_version, bad_key, no_subprotocol, not_served).", &["result"]),
            https_requests: counter(&registry, "roost_https_requests_total", "HTTP requests on port 443 that are not WebSocket upgrades, by route and status (or a head error code).", &["route", "status"]),
            amqp_connections: {
                let g = IntGauge::new("roost_amqp_connections_current", "AMQP connections open (TLS done).")
                    .expect("static metric");
                registry.register(Box::new(g.clone())).expect("registered once");
                g
            },
            amqp_links: counter(&registry, "roost_amqp_links_total", "AMQP links accepted, by kind (cbs, management, eventhubs_receiver, c2d_sender, feedback_receiver, device_telemetry, device_c2d, device_methods, device_twin).", &["kind"]),
            amqp_service_calls: counter(&registry, "roost_amqp_service_calls_total", "What AMQP service links asked of control, by operation (c2d_send, feedback_receive, feedback_complete, feedback_abandon, file_notification_receive, file_notification_complete, file_notification_abandon) and result (ok, none, a refusal's status, control_away, timed_out, or a message error code).", &["op", "result"]),
            amqp_refused: counter(&registry, "roost_amqp_refused_total", "AMQP links, deliveries and connections refused, by reason (unauthorized, not_found, decode_error, framing_error, resource_limit, invalid_field, illegal_state, other, or a codec error code).", &["reason"]),
            amqp_cbs: counter(&registry, "roost_amqp_cbs_put_tokens_total", "$cbs put-token requests, by result (ok, expired, bad_signature, unknown_policy, no_policy, wrong_audience, bad_token, bad_request).", &["result"]),
            amqp_receiver_lag: {
                let g = IntGaugeVec::new(
                    Opts::new("roost_amqp_eventhubs_receiver_lag_records", "Records an Event Hubs receiver has yet to get, by consumer group and partition."),
                    &["group", "partition"],
                )
                .expect("static metric");
                registry.register(Box::new(g.clone())).expect("registered once");
                g
            },
            amqp_credit_stalls: {
                let c = IntCounter::new("roost_amqp_credit_stalls_total", "Passes where an Event Hubs receiver had records waiting but no credit.")
                    .expect("static metric");
                registry.register(Box::new(c.clone())).expect("registered once");
                c
            },
            amqp_events_sent: {
                let c = IntCounter::new("roost_amqp_eventhubs_events_sent_total", "Events sent to Event Hubs receivers.")
                    .expect("static metric");
                registry.register(Box::new(c.clone())).expect("registered once");
                c
            },
            events_expired: counter(
                &registry,
                "roost_events_expired_total",
                "Records deleted from the events log by retention (age or size), by partition.",
                &["partition"],
            ),
            consumer_lag,
            epochs: counter(
                &registry,
                "roost_link_epochs_total",
                "Config epochs applied or rejected, by result (applied, or the rejection code).",
                &["result"],
            ),
            commands: counter(
                &registry,
                "roost_link_commands_total",
                "Commands from control for a device session, by kind and outcome.",
                &["kind", "outcome"],
            ),
            ops_limited: counter(
                &registry,
                "roost_ops_http_limited_total",
                "Ops-port connections refused or cut by a limit, by reason (connection_limit, header_read_timeout).",
                &["reason"],
            ),
            connections_accepted: counter(
                &registry,
                "roost_connections_accepted_total",
                "Device connections that authenticated, by protocol.",
                &["shard", "protocol"],
            ),
            connect_refused: counter(
                &registry,
                "roost_connect_refused_total",
                "Device connections refused at authentication (an MQTT CONNECT, an AMQP device's put-token), by protocol and reason.",
                &["shard", "protocol", "reason"],
            ),
            authentications: counter(
                &registry,
                "roost_authentications_total",
                "Device credentials checked, by protocol, method (sas: a SAS token; x509: a client certificate) and outcome (accepted, or the refusal's reason).",
                &["shard", "protocol", "method", "outcome"],
            ),
            disconnects: counter(
                &registry,
                "roost_disconnects_total",
                "Device connections closed, by protocol and reason (a connection on port 443 counts as https until it upgrades).",
                &["shard", "protocol", "reason"],
            ),
            commands_dropped: counter(
                &registry,
                "roost_session_commands_dropped_total",
                "Commands from control a session could not send to its device, by kind (not subscribed, or refused by the protocol).",
                &["shard", "kind"],
            ),
            throttle_delayed: counter(
                &registry,
                "roost_throttle_delayed_total",
                "Requests over a rate quota that were delayed (IoT Hub's traffic shaping), by quota; one over the shaping backlog is refused instead (disconnects{reason=\"throttled\"}, \"connect_throttled\").",
                &["shard", "quota"],
            ),
            twin_requests: counter(
                &registry,
                "roost_twin_requests_total",
                "Twin requests from devices, by result: sent to control (get, patch_reported), or answered at once by the engine (throttled 429, too_many_in_flight 429, too_large 400).",
                &["shard", "result"],
            ),
            hub_events: counter(
                &registry,
                "roost_hub_events_total",
                "The hub's own events (twinChangeEvents, deviceLifecycleEvents, deviceConnectionStateEvents) appended to the events log for control, by source.",
                &["shard", "source"],
            ),
            messages_in: counter(
                &registry,
                "roost_messages_in_total",
                "Device-to-cloud messages accepted.",
                &["shard", "protocol"],
            ),
            bytes_in: counter(
                &registry,
                "roost_messages_in_bytes_total",
                "Payload bytes of device-to-cloud messages accepted.",
                &["shard", "protocol"],
            ),
            log_appends: counter(
                &registry,
                "roost_log_appends_total",
                "Records appended to the events log.",
                &["shard"],
            ),
            log_commits: counter(
                &registry,
                "roost_log_commits_total",
                "Group commits of the events log (one sync each).",
                &["shard"],
            ),
            log_write_failures: counter(
                &registry,
                "roost_log_write_failures_total",
                "Commits of the events log the store refused (a full disk, an I/O error): nothing in them was acknowledged.",
                &["shard"],
            ),
            log_unavailable,
            connections_current,
            log_append_latency,
            link_connected,
            epoch_version,
            registry_sequence,
            registry_devices,
            registry,
        }
    }

    /// Prometheus text exposition of every series.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }

    /// The local handles one shard counts with.
    pub fn shard(&self, shard: usize) -> ShardMetrics {
        let s = shard.to_string();
        let by = |t: Transport| {
            let p = t.label();
            ByTransport {
                connections_current: self.connections_current.with_label_values(&[&s, p]),
                connections_accepted: self
                    .connections_accepted
                    .with_label_values(&[&s, p])
                    .local(),
                messages_in: self.messages_in.with_label_values(&[&s, p]).local(),
                bytes_in: self.bytes_in.with_label_values(&[&s, p]).local(),
                refused: Reasons::new(self.connect_refused.clone(), vec![s.clone(), p.into()]),
                authentications: [AuthCredential::Sas, AuthCredential::X509].map(|c| {
                    Reasons::new(
                        self.authentications.clone(),
                        vec![s.clone(), p.into(), c.label().into()],
                    )
                }),
                disconnects: Reasons::new(self.disconnects.clone(), vec![s.clone(), p.into()]),
            }
        };
        ShardMetrics {
            transports: Transport::ALL.map(by),
            log_appends: self.log_appends.with_label_values(&[&s]).local(),
            log_commits: self.log_commits.with_label_values(&[&s]).local(),
            log_write_failures: self.log_write_failures.with_label_values(&[&s]).local(),
            log_unavailable: self.log_unavailable.with_label_values(&[&s]),
            log_append_latency: self.log_append_latency.with_label_values(&[&s]).local(),
            commands_dropped: Reasons::new(self.commands_dropped.clone(), vec![s.clone()]),
            throttle_delayed: Reasons::new(self.throttle_delayed.clone(), vec![s.clone()]),
            hub_events: Reasons::new(self.hub_events.clone(), vec![s.clone()]),
            twin_requests: Reasons::new(self.twin_requests.clone(), vec![s]),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The protocol a device connection speaks, as the `protocol` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Mqtt,
    /// MQTT over a WebSocket on port 443.
    MqttWs,
    Amqp,
    /// AMQP over a WebSocket on port 443.
    AmqpWs,
    /// The HTTPS device API on port 443 (and a connection there before it upgrades).
    Https,
}

impl Transport {
    pub const ALL: [Transport; 5] = [
        Transport::Mqtt,
        Transport::MqttWs,
        Transport::Amqp,
        Transport::AmqpWs,
        Transport::Https,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Transport::Mqtt => "mqtt",
            Transport::MqttWs => "mqtt-ws",
            Transport::Amqp => "amqp",
            Transport::AmqpWs => "amqp-ws",
            Transport::Https => "https",
        }
    }
}

/// One shard's series of one protocol.
pub struct ByTransport {
    /// Changes only on connect and disconnect, so it is updated directly.
    pub connections_current: IntGauge,
    pub connections_accepted: LocalIntCounter,
    pub messages_in: LocalIntCounter,
    pub bytes_in: LocalIntCounter,
    /// Connections refused at authentication, by reason.
    pub refused: Reasons,
    /// Credentials checked, by [`AuthCredential`] then outcome.
    authentications: [Reasons; 2],
    /// Connections closed, by reason.
    pub disconnects: Reasons,
}

/// The credential a device presented, as `roost_authentications_total`'s `method` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthCredential {
    Sas,
    X509,
}

impl AuthCredential {
    pub fn label(self) -> &'static str {
        match self {
            AuthCredential::Sas => "sas",
            AuthCredential::X509 => "x509",
        }
    }
}

impl ByTransport {
    /// Counts one credential checked: `outcome` is `accepted` or the refusal's reason.
    pub fn authenticated(&self, credential: AuthCredential, outcome: &'static str) {
        self.authentications[credential as usize].inc(outcome);
    }

    fn flush(&self) {
        for a in &self.authentications {
            a.flush();
        }
        self.connections_accepted.flush();
        self.messages_in.flush();
        self.bytes_in.flush();
        self.refused.flush();
        self.disconnects.flush();
    }
}

/// A shard's counters. Not `Send`: it lives and is flushed on its shard.
pub struct ShardMetrics {
    /// Connections, messages in, refusals and disconnects, by protocol ([`Self::of`]).
    transports: [ByTransport; 5],
    pub log_appends: LocalIntCounter,
    pub log_commits: LocalIntCounter,
    pub log_write_failures: LocalIntCounter,
    /// Set by the committer as the partition becomes unavailable and available again.
    pub log_unavailable: IntGauge,
    pub log_append_latency: LocalHistogram,
    pub commands_dropped: Reasons,
    /// Requests delayed by a rate quota, by the quota's name.
    pub throttle_delayed: Reasons,
    /// Device twin requests, by result.
    pub twin_requests: Reasons,
    /// The hub's own events appended, by source.
    pub hub_events: Reasons,
}

impl ShardMetrics {
    /// The series of connections speaking `transport`.
    pub fn of(&self, transport: Transport) -> &ByTransport {
        &self.transports[transport as usize]
    }

    /// Moves the shard's local counts into the shared series.
    pub fn flush(&self) {
        for t in &self.transports {
            t.flush();
        }
        self.log_appends.flush();
        self.log_commits.flush();
        self.log_write_failures.flush();
        self.log_append_latency.flush();
        self.commands_dropped.flush();
        self.throttle_delayed.flush();
        self.twin_requests.flush();
        self.hub_events.flush();
    }
}

/// Counters labelled by a reason from a bounded set of static error codes, after fixed labels
/// (the shard, and for some the protocol).
pub struct Reasons {
    family: IntCounterVec,
    fixed: Vec<String>,
    by_reason: RefCell<HashMap<&'static str, LocalIntCounter>>,
}

impl Reasons {
    fn new(family: IntCounterVec, fixed: Vec<String>) -> Self {
        Self {
            family,
            fixed,
            by_reason: RefCell::new(HashMap::new()),
        }
    }

    pub fn inc(&self, reason: &'static str) {
        let mut map = self.by_reason.borrow_mut();
        map.entry(reason)
            .or_insert_with(|| {
                let mut labels: Vec<&str> = self.fixed.iter().map(String::as_str).collect();
                labels.push(reason);
                self.family.with_label_values(&labels).local()
            })
            .inc();
    }

    fn flush(&self) {
        for c in self.by_reason.borrow().values() {
            c.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_counts_appear_after_a_flush() {
        let m = Metrics::new();
        let s = m.shard(1);
        s.of(Transport::Mqtt).messages_in.inc_by(3);
        s.of(Transport::AmqpWs).refused.inc("unknown_device");
        s.of(Transport::AmqpWs).refused.inc("unknown_device");
        assert!(!m
            .encode()
            .contains("roost_messages_in_total{protocol=\"mqtt\",shard=\"1\"} 3"));
        s.flush();
        let text = m.encode();
        assert!(
            text.contains("roost_messages_in_total{protocol=\"mqtt\",shard=\"1\"} 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "roost_connect_refused_total{protocol=\"amqp-ws\",reason=\"unknown_device\",shard=\"1\"} 2"
            ),
            "{text}"
        );
    }
}
