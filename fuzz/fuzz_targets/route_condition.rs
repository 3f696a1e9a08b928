//! A route's condition in IoT Hub's routing syntax, and the message it is evaluated over: the
//! first line is the condition, the rest the body (JSON or not) of a telemetry message with
//! a few properties. Compiling never panics; a compiled condition is evaluated over the message
//! under several content types and encodings, with and without a twin (tags and properties), without panicking.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_model::{Message, Source, SystemProperties};
use roost_routing::condition::Subject;
use roost_routing::Condition;

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(head) else { return };
    let Ok(c) = Condition::compile(text) else { return };
    for (ct, enc) in [
        (Some("application/json"), Some("utf-8")),
        (Some("application/json; charset=utf-8"), Some("utf-16")),
        (Some("application/json"), Some("utf-32")),
        (Some("text/plain"), None),
    ] {
        let m = Message {
            source: Source::Telemetry,
            enqueued_ms: u64::from(body.len() as u32) << 20,
            system: SystemProperties {
                content_type: ct.map(Into::into),
                content_encoding: enc.map(Into::into),
                connection_device_id: "d1".into(),
                message_id: Some("m".into()),
                ..Default::default()
            },
            app: vec![("level".into(), "critical".into()), ("n".into(), "7".into())],
            body: body.to_vec(),
        };
        for tags in ["", r#"{"tags":{"site":"north","n":[1,{"a":null}]},"properties":{"desired":{"$version":2},"reported":{"x":"y","$version":3}}}"#, "{"] {
            let cache = std::cell::OnceCell::new();
            let _ = c.matches(&Subject::new(&m, tags, &cache));
        }
    }
});
