//! IoT Hub query text as a service sends it (`POST /devices/query`, a job's `queryCondition`,
//! a route's condition): any UTF-8. Parsing never panics or overflows the stack (nesting is
//! bounded); a query that parses is evaluated, projected and aggregated over a few twins
//! without panicking, and an error always points inside the text.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_query::{condition, query, Groups};
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let rows = [
        json!({"deviceId": "d1", "tags": {"site": "oslo", "n": 3, "list": [1, "a", null]}, "properties": {"reported": {"t": 21.5}}}),
        json!({"deviceId": "d2", "tags": {}, "status": "disabled"}),
        json!(null),
    ];
    match query(text) {
        Ok(q) => {
            let _ = q.device_ids();
            let mut groups = Groups::new(&q);
            for row in &rows {
                if q.matches(row) {
                    if q.aggregates() {
                        groups.add(row);
                    } else {
                        let _ = q.project(row);
                    }
                }
            }
            let _ = groups.finish();
        }
        Err(e) => assert!(e.at <= text.len(), "error offset {} past the text", e.at),
    }
    if let Ok(c) = condition(text) {
        for row in &rows {
            let _ = roost_query::eval(&c, row);
        }
    }
});
