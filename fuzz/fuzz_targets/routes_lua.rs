//! A `routes.lua` as an operator writes it (any bytes): loading it runs it in the sandbox with
//! a small memory limit and instruction budget, and checks every key. Loading never panics and
//! never escapes its budget; a file that loads routes a message and an event without panicking.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_model::{Message, Source, SystemProperties};
use roost_routing::{Limits, Routing, Settings, Sources};

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else { return };
    let plugins = [
        ("p/handler.lua".to_string(), "return { on_message = function(m, d, c, s) m.props.seen = '1' end }".to_string()),
        ("p/schema.lua".to_string(), "return { fields = { n = { type = 'integer', default = 1 } } }".to_string()),
    ];
    let loaded = Routing::load(
        Sources { routes_file: "routes.lua", routes: src, plugins: &plugins },
        Settings { limits: Limits { memory: 4 << 20, instructions: 50_000 }, hub_name: "fuzz".into() },
    );
    let Ok(mut routing) = loaded else { return };
    for source in [Source::Telemetry, Source::TwinChangeEvents] {
        let mut m = Message {
            source,
            enqueued_ms: 1,
            system: SystemProperties {
                content_type: Some("application/json".into()),
                content_encoding: Some("utf-8".into()),
                connection_device_id: "d1".into(),
                ..Default::default()
            },
            app: vec![("level".into(), "critical".into())],
            body: br#"{"temperature": 35, "a": [1, 2]}"#.to_vec(),
        };
        let o = routing.route(&mut m, r#"{"site":"north"}"#);
        let _ = routing.endpoint_names(o.endpoints).count();
    }
});
