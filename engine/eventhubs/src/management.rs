//! The `$management` node's READ operations (spec §3.2): the event hub's partitions, and
//! each partition's bounds.

use roost_amqp::{Message, Value};

/// What a READ asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// `com.microsoft:eventhub`.
    EventHub,
    /// `com.microsoft:partition`, with the partition id as sent.
    Partition(String),
}

/// A READ request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub message_id: Value,
    pub entity: String,
    pub read: Read,
    /// `security_token`, when the request carries one (pyamqp and JS do).
    pub token: Option<String>,
}

/// Why a request is not one this node answers: answered with `status-code` 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub &'static str);

pub fn read_request(m: &Message) -> Result<Request, RequestError> {
    let prop = |k: &str| m.application_property(k).and_then(Value::as_str);
    if prop("operation") != Some("READ") {
        return Err(RequestError("operation is not READ"));
    }
    let read = match prop("type") {
        Some("com.microsoft:eventhub") => Read::EventHub,
        Some("com.microsoft:partition") => Read::Partition(
            prop("partition")
                .ok_or(RequestError("a partition READ names no partition"))?
                .to_string(),
        ),
        _ => {
            return Err(RequestError(
                "type is not com.microsoft:eventhub or com.microsoft:partition",
            ))
        }
    };
    Ok(Request {
        message_id: m
            .properties
            .as_ref()
            .map_or(Value::Null, |p| p.message_id.clone()),
        entity: prop("name").unwrap_or_default().to_string(),
        read,
        token: prop("security_token").map(str::to_string),
    })
}

/// One partition's bounds: records `first..next`, the last enqueued at `last_enqueued_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionState {
    pub first: u64,
    pub next: u64,
    pub last_enqueued_ms: Option<i64>,
}

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(
        pairs
            .into_iter()
            .map(|(k, v)| (Value::string(k), v))
            .collect(),
    )
}

/// The event hub's description: name, creation time, and its partitions' ids as strings.
pub fn eventhub(entity: &str, created_ms: i64, partitions: usize) -> Value {
    map(vec![
        ("name", Value::string(entity)),
        ("created_at", Value::Timestamp(created_ms)),
        ("partition_count", Value::Int(partitions as i32)),
        (
            "partition_ids",
            Value::Array(
                (0..partitions)
                    .map(|p| Value::string(&p.to_string()))
                    .collect(),
            ),
        ),
    ])
}

/// A partition's description. An empty partition has last sequence number −1 and offset
/// "-1" (no record yet), begins at its next offset, and says so.
pub fn partition(entity: &str, id: usize, s: PartitionState) -> Value {
    let empty = s.first >= s.next;
    let last = if empty { -1 } else { s.next as i64 - 1 };
    map(vec![
        ("name", Value::string(entity)),
        ("partition", Value::string(&id.to_string())),
        (
            "begin_sequence_number",
            Value::Long(if empty { s.next as i64 } else { s.first as i64 }),
        ),
        ("last_enqueued_sequence_number", Value::Long(last)),
        ("last_enqueued_offset", Value::string(&last.to_string())),
        (
            "last_enqueued_time_utc",
            Value::Timestamp(s.last_enqueued_ms.unwrap_or(0)),
        ),
        ("is_partition_empty", Value::Bool(empty)),
    ])
}

#[cfg(test)]
mod tests {
    use roost_amqp::Properties;

    use super::*;

    fn get(v: &Value, k: &str) -> Value {
        let Value::Map(pairs) = v else { panic!() };
        pairs
            .iter()
            .find(|(key, _)| key.as_str() == Some(k))
            .map(|(_, v)| v.clone())
            .unwrap_or(Value::Null)
    }

    #[test]
    fn reads_are_answered_with_the_types_the_sdks_read() {
        let m = Message {
            properties: Some(Properties {
                message_id: Value::Uuid([2; 16]),
                ..Properties::default()
            }),
            application_properties: vec![
                (Value::string("operation"), Value::string("READ")),
                (
                    Value::string("type"),
                    Value::string("com.microsoft:partition"),
                ),
                (Value::string("partition"), Value::string("1")),
                (Value::string("name"), Value::string("myhub")),
            ],
            ..Message::default()
        };
        let r = read_request(&m).expect("read");
        assert_eq!(
            (r.read, r.entity.as_str(), r.token),
            (Read::Partition("1".into()), "myhub", None)
        );
        let hub = eventhub("myhub", 1_700_000_000_000, 2);
        assert_eq!(
            get(&hub, "partition_ids"),
            Value::Array(vec![Value::string("0"), Value::string("1")])
        );
        assert_eq!(get(&hub, "created_at"), Value::Timestamp(1_700_000_000_000));
        let p = partition(
            "myhub",
            1,
            PartitionState {
                first: 3,
                next: 10,
                last_enqueued_ms: Some(5),
            },
        );
        assert_eq!(
            get(&p, "last_enqueued_offset"),
            Value::string("9"),
            "a string"
        );
        assert_eq!(get(&p, "last_enqueued_sequence_number"), Value::Long(9));
        assert_eq!(get(&p, "begin_sequence_number"), Value::Long(3));
        assert_eq!(get(&p, "is_partition_empty"), Value::Bool(false));
        let empty = partition(
            "myhub",
            0,
            PartitionState {
                first: 0,
                next: 0,
                last_enqueued_ms: None,
            },
        );
        assert_eq!(
            (
                get(&empty, "is_partition_empty"),
                get(&empty, "last_enqueued_offset")
            ),
            (Value::Bool(true), Value::string("-1"))
        );
    }
}
