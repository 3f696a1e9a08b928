//! Topics a device may publish to (spec §2.2). Anything else is a protocol violation and the
//! server disconnects the client, as IoT Hub does.
//!
//! Parsing borrows from the topic and checks only its shape: the device and module it names
//! must still be compared with the identity the connection authenticated as.

/// Why a publish topic is not one a device may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The topic is not a telemetry, twin or method-response topic.
    #[error("not an IoT Hub device topic")]
    NotIotHubTopic,
    /// A twin request or method response without a non-empty `$rid`, so it cannot be answered
    /// or matched.
    #[error("IoT Hub topic has no $rid")]
    MissingRid,
    /// A method response whose status is not an integer from 0 to 65535.
    #[error("method response status is not an integer")]
    BadStatus,
}

impl TopicError {
    /// A stable, bounded label for metrics.
    pub fn error_code(&self) -> &'static str {
        match self {
            TopicError::NotIotHubTopic => "not_iothub_topic",
            TopicError::MissingRid => "missing_rid",
            TopicError::BadStatus => "bad_status",
        }
    }
}

/// A topic a device published to, borrowing from the topic text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceTopic<'a> {
    /// `devices/{d}[/modules/{m}]/messages/events/{bag}`; `bag` is still URL-encoded (see
    /// [`crate::props::decode_bag`]) and may be empty.
    Telemetry {
        device: &'a str,
        module: Option<&'a str>,
        bag: &'a str,
    },
    /// `$iothub/twin/GET/?$rid={rid}`: the device asks for its twin.
    TwinGet { rid: &'a str },
    /// `$iothub/twin/PATCH/properties/reported/?$rid={rid}`: a reported-properties patch.
    ReportedPatch { rid: &'a str },
    /// `$iothub/methods/res/{status}/?$rid={rid}`: the answer to a direct method call.
    MethodResponse { status: u16, rid: &'a str },
}

/// Classifies a device's PUBLISH topic.
///
/// Telemetry tolerates a missing `/` after `events` (`devices/d/messages/events`) and a
/// trailing `/` after the bag, which Node adds when it sends output properties. `$rid` is
/// returned as written, to be echoed back unchanged.
pub fn parse_publish_topic(topic: &str) -> Result<DeviceTopic<'_>, TopicError> {
    if let Some(rest) = topic.strip_prefix("devices/") {
        return parse_telemetry(rest);
    }
    if let Some(rest) = topic.strip_prefix("$iothub/") {
        return parse_iothub(rest);
    }
    Err(TopicError::NotIotHubTopic)
}

fn parse_telemetry(rest: &str) -> Result<DeviceTopic<'_>, TopicError> {
    let (device, rest) = segment(rest)?;
    let (module, rest) = match rest.strip_prefix("modules/") {
        Some(rest) => {
            let (module, rest) = segment(rest)?;
            (Some(module), rest)
        }
        None => (None, rest),
    };
    let bag = match rest {
        "messages/events" => "",
        _ => rest
            .strip_prefix("messages/events/")
            .ok_or(TopicError::NotIotHubTopic)?,
    };
    let bag = bag.strip_suffix('/').unwrap_or(bag);
    Ok(DeviceTopic::Telemetry {
        device,
        module,
        bag,
    })
}

/// Splits off one non-empty `/`-terminated segment.
fn segment(s: &str) -> Result<(&str, &str), TopicError> {
    match s.split_once('/') {
        Some((segment, rest)) if !segment.is_empty() => Ok((segment, rest)),
        _ => Err(TopicError::NotIotHubTopic),
    }
}

fn parse_iothub(rest: &str) -> Result<DeviceTopic<'_>, TopicError> {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let path = path.strip_suffix('/').unwrap_or(path);
    match path {
        "twin/GET" => Ok(DeviceTopic::TwinGet { rid: rid(query)? }),
        "twin/PATCH/properties/reported" => Ok(DeviceTopic::ReportedPatch { rid: rid(query)? }),
        _ => {
            let status = path
                .strip_prefix("methods/res/")
                .ok_or(TopicError::NotIotHubTopic)?;
            let status = parse_status(status)?;
            Ok(DeviceTopic::MethodResponse {
                status,
                rid: rid(query)?,
            })
        }
    }
}

fn rid(query: &str) -> Result<&str, TopicError> {
    query
        .split('&')
        .find_map(|param| param.strip_prefix("$rid="))
        .filter(|rid| !rid.is_empty())
        .ok_or(TopicError::MissingRid)
}

fn parse_status(status: &str) -> Result<u16, TopicError> {
    // u16::from_str would also take a leading '+'.
    if status.is_empty() || !status.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TopicError::BadStatus);
    }
    status.parse().map_err(|_| TopicError::BadStatus)
}

/// The telemetry topic for a device or module: `devices/{d}[/modules/{m}]/messages/events/{bag}`.
/// `bag` must already be encoded ([`crate::props::encode_bag`]).
pub fn telemetry_topic(device: &str, module: Option<&str>, bag: &str) -> String {
    match module {
        Some(module) => format!("devices/{device}/modules/{module}/messages/events/{bag}"),
        None => format!("devices/{device}/messages/events/{bag}"),
    }
}

/// A device-bound filter a device or module may subscribe to (spec §2.4–§2.6): what a
/// session delivers on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceFilter {
    /// `$iothub/twin/res/#`: answers to the client's twin requests.
    TwinResponses,
    /// `$iothub/methods/POST/#`: direct method requests.
    Methods,
    /// `$iothub/twin/PATCH/properties/desired/#`: desired-property patches.
    DesiredPatches,
    /// `devices/{own id}/messages/devicebound/#`: cloud-to-device messages (devices only).
    CloudToDevice,
    /// `devices/{own id}/modules/{own module}/inputs/#`: messages routed to a module's inputs.
    ModuleInputs,
}

impl DeviceFilter {
    pub const ALL: [DeviceFilter; 5] = [
        DeviceFilter::TwinResponses,
        DeviceFilter::Methods,
        DeviceFilter::DesiredPatches,
        DeviceFilter::CloudToDevice,
        DeviceFilter::ModuleInputs,
    ];

    /// Which filter `filter` is for the identity `device` (with `module` for a module client),
    /// or `None` if that identity may not subscribe to it: anything else is refused (SUBACK
    /// 0x80), as IoT Hub does, and so is another identity's cloud-to-device or inputs filter.
    pub fn classify(filter: &str, device: &str, module: Option<&str>) -> Option<DeviceFilter> {
        match filter {
            "$iothub/twin/res/#" => return Some(DeviceFilter::TwinResponses),
            "$iothub/methods/POST/#" => return Some(DeviceFilter::Methods),
            "$iothub/twin/PATCH/properties/desired/#" => return Some(DeviceFilter::DesiredPatches),
            _ => {}
        }
        let rest = filter.strip_prefix("devices/")?.strip_prefix(device)?;
        match module {
            None => (rest == "/messages/devicebound/#").then_some(DeviceFilter::CloudToDevice),
            Some(m) => {
                let rest = rest.strip_prefix("/modules/")?.strip_prefix(m)?;
                (rest == "/inputs/#").then_some(DeviceFilter::ModuleInputs)
            }
        }
    }

    /// Position in [`DeviceFilter::ALL`], for tables indexed by filter.
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn telemetry<'a>(device: &'a str, module: Option<&'a str>, bag: &'a str) -> DeviceTopic<'a> {
        DeviceTopic::Telemetry {
            device,
            module,
            bag,
        }
    }

    #[test]
    fn device_and_module_telemetry() {
        let cases = [
            ("devices/d1/messages/events/", telemetry("d1", None, "")),
            ("devices/d1/messages/events", telemetry("d1", None, "")),
            (
                "devices/d1/messages/events/a=1&b=2",
                telemetry("d1", None, "a=1&b=2"),
            ),
            // Node appends a '/' after the bag when it sends output properties.
            (
                "devices/d1/messages/events/a=1/",
                telemetry("d1", None, "a=1"),
            ),
            (
                "devices/d1/modules/m-1/messages/events/%24.on=out",
                telemetry("d1", Some("m-1"), "%24.on=out"),
            ),
            (
                "devices/d1/modules/m-1/messages/events",
                telemetry("d1", Some("m-1"), ""),
            ),
            // A device may be called "modules"; the device segment always comes first.
            (
                "devices/modules/messages/events/",
                telemetry("modules", None, ""),
            ),
        ];
        for (topic, expected) in cases {
            assert_eq!(parse_publish_topic(topic), Ok(expected), "{topic}");
        }
    }

    #[test]
    fn twin_and_method_topics() {
        let cases = [
            (
                "$iothub/twin/GET/?$rid=42",
                DeviceTopic::TwinGet { rid: "42" },
            ),
            (
                "$iothub/twin/GET?$rid=42",
                DeviceTopic::TwinGet { rid: "42" },
            ),
            (
                "$iothub/twin/PATCH/properties/reported/?$rid=9f1c-ab",
                DeviceTopic::ReportedPatch { rid: "9f1c-ab" },
            ),
            (
                "$iothub/twin/PATCH/properties/reported/?$version=3&$rid=7",
                DeviceTopic::ReportedPatch { rid: "7" },
            ),
            (
                "$iothub/methods/res/200/?$rid=1",
                DeviceTopic::MethodResponse {
                    status: 200,
                    rid: "1",
                },
            ),
            (
                "$iothub/methods/res/0/?$rid=1",
                DeviceTopic::MethodResponse {
                    status: 0,
                    rid: "1",
                },
            ),
        ];
        for (topic, expected) in cases {
            assert_eq!(parse_publish_topic(topic), Ok(expected), "{topic}");
        }
    }

    #[test]
    fn other_topics_are_rejected() {
        let cases = [
            ("", TopicError::NotIotHubTopic),
            ("devices/d1", TopicError::NotIotHubTopic),
            ("devices//messages/events/", TopicError::NotIotHubTopic),
            (
                "devices/d1/modules//messages/events/",
                TopicError::NotIotHubTopic,
            ),
            (
                "devices/d1/messages/devicebound/",
                TopicError::NotIotHubTopic,
            ),
            ("devices/d1/messages/eventsX", TopicError::NotIotHubTopic),
            (
                "devices/d1/modules/m/inputs/in1/",
                TopicError::NotIotHubTopic,
            ),
            ("Devices/d1/messages/events/", TopicError::NotIotHubTopic),
            ("telemetry/d1", TopicError::NotIotHubTopic),
            ("$iothub/twin/res/200/?$rid=1", TopicError::NotIotHubTopic),
            (
                "$iothub/twin/PATCH/properties/desired/?$rid=1",
                TopicError::NotIotHubTopic,
            ),
            ("$iothub/methods/POST/m/?$rid=1", TopicError::NotIotHubTopic),
            ("$iothub/twin/GET/", TopicError::MissingRid),
            ("$iothub/twin/GET/?$rid=", TopicError::MissingRid),
            ("$iothub/twin/GET/?rid=1", TopicError::MissingRid),
            ("$iothub/methods/res/ok/?$rid=1", TopicError::BadStatus),
            ("$iothub/methods/res/+200/?$rid=1", TopicError::BadStatus),
            ("$iothub/methods/res/70000/?$rid=1", TopicError::BadStatus),
            ("$iothub/methods/res/?$rid=1", TopicError::NotIotHubTopic),
            ("$iothub/methods/res/200/", TopicError::MissingRid),
        ];
        for (topic, expected) in cases {
            assert_eq!(parse_publish_topic(topic), Err(expected), "{topic}");
        }
    }

    #[test]
    fn telemetry_topic_parses_back() {
        let topic = telemetry_topic("d1", Some("m-1"), "%24.mid=1");
        assert_eq!(topic, "devices/d1/modules/m-1/messages/events/%24.mid=1");
        assert_eq!(
            parse_publish_topic(&topic),
            Ok(telemetry("d1", Some("m-1"), "%24.mid=1"))
        );
        let topic = telemetry_topic("d1", None, "");
        assert_eq!(parse_publish_topic(&topic), Ok(telemetry("d1", None, "")));
    }

    #[test]
    fn an_identity_may_subscribe_only_to_the_documented_filters_of_its_own() {
        use DeviceFilter::*;
        let device = |f| DeviceFilter::classify(f, "dev-1", None);
        let module = |f| DeviceFilter::classify(f, "dev-1", Some("m"));
        for (f, kind) in [
            ("$iothub/twin/res/#", TwinResponses),
            ("$iothub/methods/POST/#", Methods),
            ("$iothub/twin/PATCH/properties/desired/#", DesiredPatches),
            ("devices/dev-1/messages/devicebound/#", CloudToDevice),
        ] {
            assert_eq!(device(f), Some(kind), "{f}");
        }
        assert_eq!(
            module("devices/dev-1/modules/m/inputs/#"),
            Some(ModuleInputs)
        );
        assert_eq!(module("$iothub/methods/POST/#"), Some(Methods));
        for refused in [
            "#",
            "$iothub/#",
            "$iothub/twin/res/200",
            "devices/dev-1/messages/events/#",
            "devices/#",
            "other/topic",
            // Another device's, a prefix of the id, or a longer id.
            "devices/dev-2/messages/devicebound/#",
            "devices/dev-/messages/devicebound/#",
            "devices/dev-10/messages/devicebound/#",
            "devices/+/messages/devicebound/#",
            "devices/dev-1/messages/devicebound/x",
            // Module filters are a module's only.
            "devices/dev-1/modules/m/inputs/#",
        ] {
            assert_eq!(device(refused), None, "{refused}");
        }
        for refused in [
            "devices/dev-1/messages/devicebound/#",
            "devices/dev-1/modules/other/inputs/#",
            "devices/dev-1/modules/m2/inputs/#",
            "devices/dev-1/modules/+/inputs/#",
        ] {
            assert_eq!(module(refused), None, "{refused}");
        }
        for (i, kind) in DeviceFilter::ALL.iter().enumerate() {
            assert_eq!(kind.index(), i);
        }
    }
}
