//! The dispatcher over an in-memory log and a sink that fails when told to: it takes only its
//! endpoint's records, with that endpoint's enrichments, keeps a batch until it is delivered,
//! checkpoints after, starts a new endpoint at the log's end, and counts what retention took.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roost_endpoints::dispatcher::{start_at_end, Dispatcher};
use roost_endpoints::item::{Form, Item};
use roost_endpoints::sink::{Sink, SinkError};
use roost_endpoints::{group_of, EndpointMetrics, Pace, Stop};
use roost_model::{Message, Routed, Source, Stamp, SystemProperties};
use roost_storage::batch::{self, Record};
use roost_storage::{LogStore, MemStore};

fn routed(n: u64, endpoints: &[&str]) -> Vec<u8> {
    let r = Routed {
        message: Message {
            source: Source::Telemetry,
            enqueued_ms: 1_700_000_000_000 + n,
            system: SystemProperties {
                connection_device_id: format!("d{n}"),
                ..SystemProperties::default()
            },
            app: vec![("n".into(), n.to_string())],
            body: format!("{{\"n\":{n}}}").into_bytes(),
        },
        endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        // "site" for the record's second endpoint only.
        stamps: vec![Stamp {
            key: "site".into(),
            value: "north".into(),
            endpoints: 0b10,
        }],
    };
    r.archive_into(rkyv::util::AlignedVec::new())
        .expect("archive")
        .to_vec()
}

/// Appends records `range` to `partition`; even ones go to `events` and `hook`, odd ones to
/// `events` only.
fn append(log: &MemStore, partition: usize, range: std::ops::Range<u64>) {
    let mut b = Vec::new();
    for n in range.clone() {
        let eps: &[&str] = if n % 2 == 0 {
            &["events", "hook"]
        } else {
            &["events"]
        };
        let bytes = routed(n, eps);
        batch::push(
            &mut b,
            Record {
                routed: true,
                bytes: &bytes,
            },
        );
    }
    log.write_batch(partition, range.start, &b, true)
        .expect("write");
}

#[derive(Clone, Default)]
struct Shared {
    got: Arc<Mutex<Vec<Item>>>,
    /// Fail this many more attempts.
    fail: Arc<Mutex<u32>>,
    attempts: Arc<Mutex<u32>>,
}

struct FakeSink(Shared, Form);

impl Sink for FakeSink {
    fn form(&self) -> Form {
        self.1
    }
    fn batch(&self) -> usize {
        3
    }
    fn deliver(&mut self, items: &[Item]) -> Result<(), SinkError> {
        *self.0.attempts.lock().expect("lock") += 1;
        let mut fail = self.0.fail.lock().expect("lock");
        if *fail > 0 {
            *fail -= 1;
            return Err(SinkError::Connect("down".into()));
        }
        self.0.got.lock().expect("lock").extend_from_slice(items);
        Ok(())
    }
}

fn pace() -> Pace {
    Pace {
        idle: Duration::from_millis(2),
        backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn start(
    log: Arc<MemStore>,
    shared: Shared,
    form: Form,
) -> (Arc<Stop>, std::thread::JoinHandle<()>, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let metrics = EndpointMetrics::new(&registry);
    let stop = Arc::new(Stop::default());
    let d = Dispatcher {
        name: "hook".into(),
        log,
        sink: Box::new(FakeSink(shared, form)),
        series: metrics.series("hook", "webhook"),
        stop: stop.clone(),
        pace: pace(),
    };
    (stop, std::thread::spawn(move || d.run()), registry)
}

fn metric(registry: &prometheus::Registry, name: &str, code: Option<&str>) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().to_vec())
        .filter(|m| code.is_none_or(|c| m.get_label().iter().any(|l| l.value() == c)))
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .sum()
}

#[test]
fn only_its_records_in_order_retried_until_delivered_then_checkpointed() {
    let log = Arc::new(MemStore::new(2));
    append(&log, 0, 0..10);
    append(&log, 1, 0..4);
    let shared = Shared::default();
    *shared.fail.lock().expect("lock") = 3;
    let (stop, thread, registry) = start(log.clone(), shared.clone(), Form::Json);
    wait_for("seven records", || {
        shared.got.lock().expect("lock").len() == 7
    });
    wait_for("the checkpoints", || {
        log.checkpoint(&group_of("hook"), 0) == Ok(Some(10))
            && log.checkpoint(&group_of("hook"), 1) == Ok(Some(4))
    });
    let got = shared.got.lock().expect("lock").clone();
    let p0: Vec<u64> = got
        .iter()
        .filter(|i| i.partition == 0)
        .map(|i| i.offset)
        .collect();
    let p1: Vec<u64> = got
        .iter()
        .filter(|i| i.partition == 1)
        .map(|i| i.offset)
        .collect();
    assert_eq!(
        p0,
        vec![0, 2, 4, 6, 8],
        "the even records, in order, each once"
    );
    assert_eq!(p1, vec![0, 2]);
    let v: serde_json::Value = serde_json::from_str(&got[0].json).expect("record JSON");
    assert_eq!(
        v["properties"]["site"], "north",
        "the endpoint's enrichment: {v}"
    );
    assert_eq!(v["body"], "{\"n\":0}");
    assert!(
        *shared.attempts.lock().expect("lock") >= 3 + 3,
        "failed tries were retried"
    );
    assert_eq!(
        metric(&registry, "roost_endpoint_failures_total", Some("connect")),
        3.0
    );
    assert_eq!(
        metric(&registry, "roost_endpoint_deliveries_total", None),
        7.0
    );

    // More records arrive: delivered from the checkpoint; the lag drains to zero.
    append(&log, 0, 10..14);
    wait_for("two more", || shared.got.lock().expect("lock").len() == 9);
    wait_for("no lag", || {
        metric(&registry, "roost_endpoint_lag_records", None) == 0.0
    });
    stop.stop();
    thread.join().expect("dispatcher ends");
}

#[test]
fn a_restarted_dispatcher_resumes_at_its_checkpoint_and_raw_items_carry_properties() {
    let log = Arc::new(MemStore::new(1));
    append(&log, 0, 0..6);
    log.commit_checkpoint(&group_of("hook"), &[(0, 3)])
        .expect("checkpoint");
    let shared = Shared::default();
    let (stop, thread, _r) = start(log.clone(), shared.clone(), Form::Raw);
    wait_for("record 4", || shared.got.lock().expect("lock").len() == 1);
    stop.stop();
    thread.join().expect("dispatcher ends");
    let got = shared.got.lock().expect("lock").clone();
    assert_eq!(got[0].offset, 4, "nothing before the checkpoint again");
    assert_eq!(got[0].body, b"{\"n\":4}");
    assert_eq!(got[0].device, "d4");
    let has = |k: &str, v: &str| got[0].props.iter().any(|(a, b)| a == k && b == v);
    assert!(
        has("iothub-connection-device-id", "d4"),
        "{:?}",
        got[0].props
    );
    assert!(has("n", "4") && has("site", "north") && has("iothub-message-source", "Telemetry"));
}

#[test]
fn a_new_endpoint_starts_at_the_end_and_an_old_checkpoint_stays() {
    let log = MemStore::new(2);
    append(&log, 0, 0..5);
    start_at_end(&log, "new").expect("start");
    assert_eq!(log.checkpoint(&group_of("new"), 0), Ok(Some(5)));
    assert_eq!(log.checkpoint(&group_of("new"), 1), Ok(Some(0)));
    append(&log, 0, 5..7);
    start_at_end(&log, "new").expect("again");
    assert_eq!(log.checkpoint(&group_of("new"), 0), Ok(Some(5)), "kept");
}

#[test]
fn records_retention_deleted_first_are_counted_and_skipped() {
    let log = Arc::new(MemStore::new(1));
    append(&log, 0, 0..4);
    append(&log, 0, 4..8);
    log.truncate_before(0, 4).expect("truncate");
    let shared = Shared::default();
    let (stop, thread, registry) = start(log.clone(), shared.clone(), Form::Json);
    wait_for("4 and 6", || shared.got.lock().expect("lock").len() == 2);
    wait_for("expired counted", || {
        metric(&registry, "roost_endpoint_expired_total", None) == 4.0
    });
    stop.stop();
    thread.join().expect("dispatcher ends");
    let offsets: Vec<u64> = shared
        .got
        .lock()
        .expect("lock")
        .iter()
        .map(|i| i.offset)
        .collect();
    assert_eq!(offsets, vec![4, 6]);
}
