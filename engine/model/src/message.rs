//! The telemetry record: what the engine appends to the `events` log, once per message.

use rkyv::{Archive, Deserialize, Serialize};

/// Where a routed message came from (spec §6 routing sources).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum Source {
    Telemetry,
    TwinChangeEvents,
    DeviceLifecycleEvents,
    DeviceConnectionStateEvents,
    /// A device's file upload completed (roost's `file_upload` routing source). Last: the
    /// variants before it keep their archived values.
    FileUploadNotifications,
}

/// Every value of `iothub-message-source` the log holds.
pub const SOURCES: [&str; 5] = [
    "Telemetry",
    "twinChangeEvents",
    "deviceLifecycleEvents",
    "deviceConnectionStateEvents",
    "fileUploadNotifications",
];

impl Source {
    /// The value of `iothub-message-source` for this source.
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Telemetry => "Telemetry",
            Source::TwinChangeEvents => "twinChangeEvents",
            Source::DeviceLifecycleEvents => "deviceLifecycleEvents",
            Source::DeviceConnectionStateEvents => "deviceConnectionStateEvents",
            Source::FileUploadNotifications => "fileUploadNotifications",
        }
    }
}

impl ArchivedSource {
    pub fn as_str(&self) -> &'static str {
        match self {
            ArchivedSource::Telemetry => "Telemetry",
            ArchivedSource::TwinChangeEvents => "twinChangeEvents",
            ArchivedSource::DeviceLifecycleEvents => "deviceLifecycleEvents",
            ArchivedSource::DeviceConnectionStateEvents => "deviceConnectionStateEvents",
            ArchivedSource::FileUploadNotifications => "fileUploadNotifications",
        }
    }
}

/// System properties: those the device set in its property bag (`$.mid` …) and those the hub
/// stamps on arrival (`iothub-connection-device-id` …). Names follow spec §2.5.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct SystemProperties {
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// `$.exp`, as the device wrote it (ISO-8601).
    pub expiry: Option<String>,
    pub output_name: Option<String>,
    pub interface_id: Option<String>,
    pub creation_time: Option<String>,
    pub subject: Option<String>,
    pub connection_device_id: String,
    pub connection_module_id: Option<String>,
    pub auth_generation_id: String,
    /// `iothub-connection-auth-method` as JSON text.
    pub auth_method: String,
    /// `dt-dataschema`: the model id the device announced in its username.
    pub data_schema: Option<String>,
}

/// One message as stored: system properties, application properties (a short list of pairs,
/// which archives and scans faster than a map for the handful of properties a message carries)
/// and the body.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Message {
    pub source: Source,
    /// When the hub accepted the message, in milliseconds since the Unix epoch.
    pub enqueued_ms: u64,
    pub system: SystemProperties,
    pub app: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Message {
    /// Archives the message into `out` (cleared first), ready to be appended to the log.
    pub fn archive_into(
        &self,
        out: rkyv::util::AlignedVec,
    ) -> Result<rkyv::util::AlignedVec, rkyv::rancor::Error> {
        let mut out = out;
        out.clear();
        rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(self, out)
    }

    /// Validates a stored record and returns a view of it without copying.
    pub fn view(bytes: &[u8]) -> Result<&ArchivedMessage, rkyv::rancor::Error> {
        rkyv::access::<ArchivedMessage, rkyv::rancor::Error>(bytes)
    }
}

/// A message as the log stores it since routing: the message, the endpoints its routes matched
/// (by name, as the epoch that routed it named them) and what the enrichments added for them.
/// Each message is stored once, whatever its endpoints (DESIGN.md §2).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Routed {
    pub message: Message,
    pub endpoints: Vec<String>,
    pub stamps: Vec<Stamp>,
}

/// An application property an enrichment adds for some of a message's endpoints.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Stamp {
    pub key: String,
    pub value: String,
    /// Bit `i`: `endpoints[i]` of the record.
    pub endpoints: u64,
}

impl Routed {
    /// Archives the record into `out` (cleared first).
    pub fn archive_into(
        &self,
        out: rkyv::util::AlignedVec,
    ) -> Result<rkyv::util::AlignedVec, rkyv::rancor::Error> {
        let mut out = out;
        out.clear();
        rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(self, out)
    }

    /// Validates a stored record and returns a view of it without copying.
    pub fn view(bytes: &[u8]) -> Result<&ArchivedRouted, rkyv::rancor::Error> {
        rkyv::access::<ArchivedRouted, rkyv::rancor::Error>(bytes)
    }
}

impl ArchivedRouted {
    /// The index of endpoint `name` among the record's, if it goes there.
    pub fn endpoint(&self, name: &str) -> Option<usize> {
        self.endpoints.iter().position(|e| e.as_str() == name)
    }

    /// The enrichments for the record's endpoint `index`: (key, value).
    pub fn stamps_for(&self, index: usize) -> impl Iterator<Item = (&str, &str)> {
        self.stamps
            .iter()
            .filter(move |s| index < 64 && s.endpoints.to_native() & (1 << index) != 0)
            .map(|s| (s.key.as_str(), s.value.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        Message {
            source: Source::Telemetry,
            enqueued_ms: 1_700_000_000_123,
            system: SystemProperties {
                message_id: Some("mid-1".into()),
                content_type: Some("application/json".into()),
                connection_device_id: "dev-1".into(),
                auth_generation_id: "638000".into(),
                auth_method: r#"{"scope":"device","type":"sas","issuer":"iothub"}"#.into(),
                ..Default::default()
            },
            app: vec![("alert".into(), "high temp".into())],
            body: b"{\"t\":21.5}".to_vec(),
        }
    }

    #[test]
    fn archive_then_view_keeps_every_field() {
        let msg = sample();
        let bytes = msg
            .archive_into(rkyv::util::AlignedVec::new())
            .expect("archive");
        let view = Message::view(&bytes).expect("view");
        assert_eq!(view.system.message_id.as_deref(), Some("mid-1"));
        assert_eq!(view.system.connection_device_id.as_str(), "dev-1");
        assert_eq!(view.app[0].1.as_str(), "high temp");
        assert_eq!(view.body.as_slice(), msg.body.as_slice());
        assert_eq!(view.enqueued_ms.to_native(), 1_700_000_000_123);
        let back: Message =
            rkyv::deserialize::<Message, rkyv::rancor::Error>(view).expect("deserialize");
        assert_eq!(back, msg);
    }

    #[test]
    fn a_routed_record_names_its_endpoints_and_their_stamps() {
        let r = Routed {
            message: sample(),
            endpoints: vec!["events".into(), "alerts".into()],
            stamps: vec![
                Stamp {
                    key: "site".into(),
                    value: "north".into(),
                    endpoints: 0b10,
                },
                Stamp {
                    key: "hub".into(),
                    value: "h".into(),
                    endpoints: 0b11,
                },
            ],
        };
        let bytes = r
            .archive_into(rkyv::util::AlignedVec::new())
            .expect("archive");
        let view = Routed::view(&bytes).expect("view");
        assert_eq!(view.message.system.connection_device_id.as_str(), "dev-1");
        assert_eq!(
            (view.endpoint("alerts"), view.endpoint("archive")),
            (Some(1), None)
        );
        assert_eq!(view.stamps_for(0).collect::<Vec<_>>(), [("hub", "h")]);
        assert_eq!(
            view.stamps_for(1).collect::<Vec<_>>(),
            [("site", "north"), ("hub", "h")]
        );
    }

    #[test]
    fn a_truncated_record_is_an_error_not_a_panic() {
        let bytes = sample()
            .archive_into(rkyv::util::AlignedVec::new())
            .expect("archive");
        for cut in 0..bytes.len() {
            let mut v = rkyv::util::AlignedVec::<16>::new();
            v.extend_from_slice(&bytes[..cut]);
            let _ = Message::view(&v);
        }
    }
}
