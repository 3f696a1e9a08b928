//! Routing cost per message (issue 9): no routes (the default routes.lua), ten declarative
//! routes, one Lua condition, three plugins; and the archive of the routed record beside the
//! bare message's, which is what routing adds to the store path.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use roost_model::{Message, Routed, Source, SystemProperties};
use roost_routing::Routing;

fn message() -> Message {
    Message {
        source: Source::Telemetry,
        enqueued_ms: 1_700_000_000_000,
        system: SystemProperties {
            message_id: Some("mid-1".into()),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            connection_device_id: "dev-0001".into(),
            auth_generation_id: "638000".into(),
            auth_method: r#"{"scope":"device","type":"sas","issuer":"iothub"}"#.into(),
            ..Default::default()
        },
        app: vec![
            ("level".into(), "info".into()),
            ("alert".into(), "none".into()),
            ("n".into(), "1".into()),
        ],
        body: br#"{"temperature": 21.5, "humidity": 40, "password": "x", "site": "north"}"#
            .to_vec(),
    }
}

const TAGS: &str = r#"{"tags":{"building":"43","site":"north"}}"#;

fn load(routes: &str, plugins: &[(String, String)]) -> Routing {
    Routing::load_with_defaults("routes.lua", routes, plugins, "bench")
        .unwrap_or_else(|e| panic!("{e}"))
}

fn shipped(name: &str) -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../plugins")
        .join(name);
    ["handler.lua", "schema.lua"]
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(dir.join(f)).expect("plugin file");
            (format!("{name}/{f}"), text)
        })
        .collect()
}

/// Ten routes on application and system properties, none of which matches the benchmark's
/// message, so all ten are evaluated and the fallback taken.
const TEN: &str = r#"return { routes = {
  { name = "r1", condition = "level = 'critical'", endpoints = { "events" } },
  { name = "r2", condition = "alert = 'high' AND level = 'warning'", endpoints = { "events" } },
  { name = "r3", condition = "$contentType = 'text/plain'", endpoints = { "events" } },
  { name = "r4", condition = "$connectionDeviceId = 'dev-9999'", endpoints = { "events" } },
  { name = "r5", condition = "n = '42'", endpoints = { "events" } },
  { name = "r6", condition = "level IN ['error', 'fatal']", endpoints = { "events" } },
  { name = "r7", condition = "STARTS_WITH($messageId, 'x-')", endpoints = { "events" } },
  { name = "r8", condition = "IS_DEFINED(missing)", endpoints = { "events" } },
  { name = "r9", condition = "$contentEncoding = 'utf-16'", endpoints = { "events" } },
  { name = "r10", condition = "alert != 'none'", endpoints = { "events" } },
} }"#;

fn route(c: &mut Criterion) {
    let mut g = c.benchmark_group("routing");
    g.throughput(Throughput::Elements(1));
    let default = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../routes.lua"))
        .expect("routes.lua");
    let cases: Vec<(&str, Routing)> = vec![
        ("default routes.lua", load(&default, &[])),
        (
            "one declarative condition",
            load(
                r#"return { routes = { { name = "a", condition = "level = 'critical'", endpoints = { "events" } } } }"#,
                &[],
            ),
        ),
        (
            "one $body condition",
            load(
                r#"return { routes = { { name = "a", condition = "$body.temperature > 30", endpoints = { "events" } } } }"#,
                &[],
            ),
        ),
        ("10 declarative routes", load(TEN, &[])),
        (
            "one Lua condition",
            load(
                r#"return { routes = { { name = "a", condition = function(msg, device) return msg.props.level == "critical" end, endpoints = { "events" } } } }"#,
                &[],
            ),
        ),
        ("three plugins", {
            let mut files = shipped("redact");
            files.extend(shipped("twin_tags"));
            files.extend(shipped("units"));
            load(
                r#"return { plugins = {
                  { use = "redact", config = { paths = { "password" } } },
                  { use = "twin_tags", config = { tags = { building = "building" } } },
                  { use = "units", config = { conversions = { { path = "temperature", from = "degC", to = "degF" } } } },
                } }"#,
                &files,
            )
        }),
    ];
    for (name, mut routing) in cases {
        let template = message();
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || template.clone(),
                |m| black_box(routing.route(m, TAGS)),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn archive(c: &mut Criterion) {
    let mut g = c.benchmark_group("record");
    g.throughput(Throughput::Elements(1));
    let m = message();
    let mut buf = rkyv::util::AlignedVec::new();
    g.bench_function("archive bare message", |b| {
        b.iter(|| {
            buf = m.archive_into(std::mem::take(&mut buf)).expect("archive");
            black_box(buf.len())
        })
    });
    let routed = Routed {
        message: m.clone(),
        endpoints: vec!["events".into()],
        stamps: Vec::new(),
    };
    g.bench_function("archive routed record", |b| {
        b.iter(|| {
            buf = routed
                .archive_into(std::mem::take(&mut buf))
                .expect("archive");
            black_box(buf.len())
        })
    });
    g.finish();
}

criterion_group!(benches, route, archive);
criterion_main!(benches);
