//! The Device Provisioning Service's device-side formats (wire spec §7), as the SDKs write
//! them: the MQTT username and request topics, the answer topics, and AMQP's SASL PLAIN
//! credentials and link addresses. Parsing only; control's `dps` module serves them.

const RESPONSES: &str = "$dps/registrations/res/";

/// `{idScope}/registrations/{registrationId}/api-version=…`: the scope and registration id.
pub fn parse_username(username: &str) -> Option<(&str, &str)> {
    let mut parts = username.splitn(4, '/');
    let scope = parts.next().filter(|s| !s.is_empty())?;
    if parts.next()? != "registrations" {
        return None;
    }
    let registration = parts.next().filter(|s| !s.is_empty())?;
    parts.next()?.starts_with("api-version=").then_some((scope, registration))
}

/// A request topic: (`register` or `status`, `$rid`, `operationId`).
pub fn parse_request(topic: &str) -> Option<(&'static str, String, Option<String>)> {
    let (kind, query) = if let Some(q) = topic.strip_prefix("$dps/registrations/PUT/iotdps-register/?") {
        ("register", q)
    } else if let Some(q) = topic.strip_prefix("$dps/registrations/GET/iotdps-get-operationstatus/?") {
        ("status", q)
    } else {
        return None;
    };
    let mut rid = None;
    let mut operation = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = crate::encoding::percent_decode(v);
        match k {
            "$rid" => rid = Some(v),
            "operationId" => operation = Some(v),
            _ => {}
        }
    }
    Some((kind, rid?, operation))
}

/// The answer topic for `rid` with `status`.
pub fn response_topic(status: u16, rid: &str, retry_after: Option<u32>) -> String {
    // `$` only in `$rid`: the Python SDK splits the topic on it.
    let rid: String = rid.chars().filter(|c| *c != '$' && *c != '&').collect();
    match retry_after {
        Some(s) => format!("{RESPONSES}{status}/?$rid={rid}&retry-after={s}"),
        None => format!("{RESPONSES}{status}/?$rid={rid}"),
    }
}

/// `\0{username}\0{password}` (authzid empty), PLAIN's initial response: the scope and
/// registration from the username, and the token.
pub fn parse_plain(response: &[u8]) -> Option<(String, String, String)> {
    let mut parts = response.split(|b| *b == 0);
    let _authzid = parts.next()?;
    let user = std::str::from_utf8(parts.next()?).ok()?;
    let password = std::str::from_utf8(parts.next()?).ok()?;
    if parts.next().is_some() {
        return None;
    }
    let (scope, registration) = parse_address(user)?;
    Some((scope, registration, password.to_string()))
}

/// `{idScope}/registrations/{registrationId}`.
pub fn parse_address(address: &str) -> Option<(String, String)> {
    let mut parts = address.trim_start_matches('/').split('/');
    let scope = parts.next().filter(|s| !s.is_empty())?;
    if parts.next()? != "registrations" {
        return None;
    }
    let registration = parts.next().filter(|s| !s.is_empty())?;
    parts.next().is_none().then(|| (scope.to_string(), registration.to_string()))
}


#[cfg(test)]
mod tests {
    use super::*;


    #[test]
    fn usernames_and_topics_as_the_sdks_send_them() {
        let py = "0ne00AB/registrations/dev-1/api-version=2019-03-31&ClientVersion=azure-iot-device-provisioning-py%2F2.14.0";
        assert_eq!(parse_username(py), Some(("0ne00AB", "dev-1")));
        assert_eq!(parse_username("0ne00AB/registrations/dev-1/?api-version=x"), None);
        assert_eq!(parse_username("0ne00AB/devices/dev-1/api-version=x"), None);
        assert_eq!(
            parse_request("$dps/registrations/PUT/iotdps-register/?$rid=a1b2"),
            Some(("register", "a1b2".into(), None))
        );
        assert_eq!(
            parse_request("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=7&operationId=5.ab%2Bc"),
            Some(("status", "7".into(), Some("5.ab+c".into())))
        );
        assert_eq!(parse_request("$dps/registrations/PUT/iotdps-register/?x=1"), None);
        assert_eq!(parse_request("devices/x/messages/events/"), None);
        assert_eq!(response_topic(202, "r1", Some(1)), "$dps/registrations/res/202/?$rid=r1&retry-after=1");
        assert_eq!(response_topic(401, "r$&1", None), "$dps/registrations/res/401/?$rid=r1");
    }


    #[test]
    fn plain_and_addresses_as_the_node_transport_sends_them() {
        let r = parse_plain(b"\x000ne00AB/registrations/dev-1\x00SharedAccessSignature sr=x&sig=y&se=1");
        assert_eq!(
            r,
            Some(("0ne00AB".into(), "dev-1".into(), "SharedAccessSignature sr=x&sig=y&se=1".into()))
        );
        assert_eq!(parse_plain(b"user\x00pass"), None);
        assert_eq!(parse_address("0ne00AB/registrations/dev-1"), Some(("0ne00AB".into(), "dev-1".into())));
        assert_eq!(parse_address("0ne00AB/registrations/dev-1/x"), None);
        assert_eq!(parse_address("$cbs"), None);
    }
}
