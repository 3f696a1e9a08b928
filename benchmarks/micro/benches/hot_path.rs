//! Micro-benchmarks of each step a telemetry message takes through a shard.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use roost_iothub::{props, sas};
use roost_model::{Message, Source, SystemProperties};
use roost_mqtt::{Packet, Publish, QoS, Str};

const TOPIC: &str = "devices/dev-0001/messages/events/%24.mid=mid-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high%20temp&n=1";

fn publish_frame(payload: usize) -> Bytes {
    let mut out = BytesMut::new();
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: Str::from(TOPIC),
        pkid: 7,
        payload: Bytes::from(vec![b'x'; payload]),
    })
    .encode(&mut out);
    out.freeze()
}

fn frame_decode(c: &mut Criterion) {
    let frame = publish_frame(100);
    let limits = roost_mqtt::Limits::default();
    let mut g = c.benchmark_group("mqtt");
    g.throughput(Throughput::Elements(1));
    g.bench_function("check+parse publish 100B", |b| {
        b.iter(|| {
            let len = roost_mqtt::check(black_box(&frame), &limits)
                .expect("valid")
                .expect("complete");
            black_box(roost_mqtt::parse(frame.slice(..len)).expect("parses"))
        })
    });
    g.finish();
}

fn bag_decode(c: &mut Criterion) {
    let bag = TOPIC
        .split_once("messages/events/")
        .expect("telemetry topic")
        .1;
    c.bench_function("props/decode_bag 5 props", |b| {
        b.iter(|| black_box(props::decode_bag(black_box(bag)).expect("valid")))
    });
}

fn sas_verify(c: &mut Criterion) {
    let key = [7u8; 32];
    let token = sas::sign(
        &sas::encode_resource("localhost/devices/dev-0001"),
        &key,
        4_000_000_000,
        None,
    );
    c.bench_function("sas/parse+verify", |b| {
        b.iter(|| {
            let t = sas::SasToken::parse(black_box(&token)).expect("parses");
            black_box(t.verify(&[&key], 1_800_000_000).expect("valid"))
        })
    });
}

fn message() -> Message {
    Message {
        source: Source::Telemetry,
        enqueued_ms: 1_800_000_000_000,
        system: SystemProperties {
            message_id: Some("mid-1".into()),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            connection_device_id: "dev-0001".into(),
            auth_generation_id: "638000000000000001".into(),
            auth_method: r#"{"scope":"device","type":"sas","issuer":"iothub"}"#.into(),
            ..Default::default()
        },
        app: vec![
            ("alert".into(), "high temp".into()),
            ("n".into(), "1".into()),
        ],
        body: vec![b'x'; 100],
    }
}

fn archive(c: &mut Criterion) {
    let msg = message();
    let mut buf = Some(rkyv::util::AlignedVec::new());
    c.bench_function("rkyv/archive message 100B into reused buffer", |b| {
        b.iter(|| {
            let out = msg
                .archive_into(buf.take().expect("buffer"))
                .expect("archives");
            black_box(out.len());
            buf = Some(out);
        })
    });
}

fn log_append(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("roost-microbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    let db = rocksdb::DB::open(&opts, &dir).expect("open db");
    let record = message()
        .archive_into(rkyv::util::AlignedVec::new())
        .expect("archives");
    let mut offset = 0u64;
    let mut g = c.benchmark_group("log");
    // What the first slice did (one put per record) against what the log does now (a group
    // commit's records as one value, `roost_storage::batch`).
    for (name, sync, batch, one_value) in [
        ("64 records, a put each, written", false, 64usize, false),
        ("64 records, one value, written", false, 64, true),
        ("64 records, one value, synced", true, 64, true),
        ("1024 records, one value, written", false, 1024, true),
    ] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(name, |b| {
            let mut records = Vec::new();
            b.iter_batched(
                || {
                    let mut wb = rocksdb::WriteBatch::default();
                    if one_value {
                        records.clear();
                        for _ in 0..batch {
                            roost_storage::batch::push(
                                &mut records,
                                roost_storage::batch::plain(record.as_slice()),
                            );
                        }
                        for (i, value) in roost_storage::batch::chunks(&records) {
                            wb.put((offset + i).to_be_bytes(), value);
                        }
                        offset += batch as u64;
                    } else {
                        for _ in 0..batch {
                            wb.put(offset.to_be_bytes(), record.as_slice());
                            offset += 1;
                        }
                    }
                    wb
                },
                |wb| {
                    let mut w = rocksdb::WriteOptions::default();
                    w.set_sync(sync);
                    db.write_opt(wb, &w).expect("write");
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(
    benches,
    frame_decode,
    bag_decode,
    sas_verify,
    archive,
    log_append
);
criterion_main!(benches);
