//! What a dispatcher reads out of the log for its endpoint: the records routed there, each in
//! the form its sink sends.

use std::sync::Arc;

use roost_storage::{log::visit_records, LogError, LogStore, RecordView};

/// How a sink wants a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// The consumer API's record object (webhook, file).
    Json,
    /// The body as sent, with the properties as headers (NATS, MQTT).
    Raw,
}

/// One record bound for an endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub partition: usize,
    pub offset: u64,
    /// The sending device (`iothub-connection-device-id`).
    pub device: String,
    pub module: Option<String>,
    /// [`Form::Json`]: the record object, with the endpoint's enrichments.
    pub json: String,
    /// [`Form::Raw`]: the body.
    pub body: Vec<u8>,
    /// [`Form::Raw`]: the system properties the hub sets, then the application properties,
    /// then the endpoint's enrichments.
    pub props: Vec<(String, String)>,
}

/// Reads up to `max` records of `partition` routed to `endpoint` from offset `from`, in
/// `form`; returns them and the offset to read next (past every record looked at, taken or not).
pub fn read(
    log: &Arc<dyn LogStore>,
    partition: usize,
    from: u64,
    endpoint: &str,
    form: Form,
    max: usize,
) -> Result<(Vec<Item>, u64), LogError> {
    let mut items = Vec::new();
    let next = visit_records(log.as_ref(), partition, from, &mut |offset, view| {
        if items.len() >= max {
            return Ok(false);
        }
        if let Some(index) = view.endpoint(endpoint) {
            items.push(item(partition, offset, view, index, form)?);
        }
        Ok(true)
    })?;
    Ok((items, next))
}

fn item(
    partition: usize,
    offset: u64,
    view: &RecordView<'_>,
    index: usize,
    form: Form,
) -> Result<Item, String> {
    let m = view.message();
    let mut item = Item {
        partition,
        offset,
        device: m.system.connection_device_id.to_string(),
        module: m.system.connection_module_id.as_deref().map(str::to_string),
        json: String::new(),
        body: Vec::new(),
        props: Vec::new(),
    };
    match form {
        Form::Json => {
            roost_storage::json::record_json(&mut item.json, partition, offset, view, Some(index))?
        }
        Form::Raw => {
            item.body = m.body.to_vec();
            let s = &m.system;
            let mut put = |k: &str, v: Option<&str>| {
                if let Some(v) = v {
                    item.props.push((k.to_string(), v.to_string()));
                }
            };
            put("iothub-connection-device-id", Some(&s.connection_device_id));
            put(
                "iothub-connection-module-id",
                s.connection_module_id.as_deref(),
            );
            put("iothub-message-source", Some(m.source.as_str()));
            put(
                "iothub-enqueuedtime",
                roost_iothub::time::try_iso_ms(m.enqueued_ms.to_native()).as_deref(),
            );
            put("message-id", s.message_id.as_deref());
            put("correlation-id", s.correlation_id.as_deref());
            put("content-type", s.content_type.as_deref());
            put("content-encoding", s.content_encoding.as_deref());
            put("dt-dataschema", s.data_schema.as_deref());
            for kv in m.app.iter() {
                put(kv.0.as_str(), Some(kv.1.as_str()));
            }
            for (k, v) in view.stamps(index) {
                put(k, Some(v));
            }
        }
    }
    Ok(item)
}
