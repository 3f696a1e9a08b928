//! Authorization, generated (issue 7): identities (devices, modules; registered, unknown,
//! disabled) × tokens (own key, another device's, a random key, expired, inside the clock
//! skew, every wrong scope, with and without a policy name, as Python and C encode them) ×
//! operations (CONNECT, PUBLISH, SUBSCRIBE), each decided by roost's code and by an oracle
//! written here from the wire spec alone. Any difference is a false accept or a false refusal.

use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use roost_iothub::sas;
use roost_iothub::topic::DeviceFilter;
use roost_model::link::DeviceAuth;
use roost_registry::Projection;
use roost_session::auth::{authenticate_sas, mqtt_credentials, Identity};
use roost_session::telemetry::publish_bag;

const HOST: &str = "hub.example.net";
const NOW: u64 = 1_900_000_000;
const CASES: u32 = 12_000;

/// Registered devices: (id, enabled, primary key, secondary key).
const DEVICES: [(&str, bool, u8, u8); 3] = [
    ("dev-1", true, 11, 12),
    ("dev-2", true, 21, 22),
    ("dev-off", false, 31, 32),
];
/// Ids a client may claim: the registered ones, an unknown one, and near misses.
const CLAIMED: [&str; 6] = ["dev-1", "dev-2", "dev-off", "ghost", "dev-10", "Dev-1"];
const MODULES: [Option<&str>; 3] = [None, Some("m1"), Some("m2")];

fn registry() -> Projection {
    Projection::new(
        1,
        DEVICES.map(|(id, enabled, p, s)| DeviceAuth {
            device_id: id.into(),
            enabled,
            primary_key: vec![p; 32],
            secondary_key: vec![s; 32],
            generation_id: format!("gen-{id}"),
            twin: String::new(),
            x509: Default::default(),
        }),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// `{host}/devices/{claimed}[/modules/{m}]`: exactly the claimed identity.
    Exact,
    /// The same with a trailing `/`.
    ExactSlash,
    /// The host in capitals (host names compare case-insensitively).
    UpperHost,
    /// The host only: a hub-scoped token.
    HostOnly,
    /// `{host}/devices`.
    DevicesOnly,
    /// The device of a claimed module (or, for a device, one of its modules).
    Parent,
    /// Another registered device.
    OtherDevice,
    /// Another hub.
    OtherHub,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Primary,
    Secondary,
    OtherDevices,
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Future,
    InsideSkew,
    Expired,
}

#[derive(Debug, Clone)]
struct Connect {
    claimed: &'static str,
    module: Option<&'static str>,
    client_id_matches: bool,
    scope: Scope,
    key: Key,
    expiry: Expiry,
    policy_name: bool,
    c_encoding: bool,
}

fn scope_strategy() -> impl Strategy<Value = Scope> {
    prop_oneof![
        Just(Scope::Exact),
        Just(Scope::ExactSlash),
        Just(Scope::UpperHost),
        Just(Scope::HostOnly),
        Just(Scope::DevicesOnly),
        Just(Scope::Parent),
        Just(Scope::OtherDevice),
        Just(Scope::OtherHub),
    ]
}

/// Half the cases a CONNECT that should succeed with one field (or none) replaced by a random
/// one, so accepting paths are tried as often as refusing ones; half wholly random.
fn connect_strategy() -> impl Strategy<Value = Connect> {
    let valid = (
        prop::sample::select(vec!["dev-1", "dev-2"]),
        prop_oneof![
            Just(Scope::Exact),
            Just(Scope::ExactSlash),
            Just(Scope::UpperHost)
        ],
        prop_oneof![Just(Key::Primary), Just(Key::Secondary)],
        prop_oneof![Just(Expiry::Future), Just(Expiry::InsideSkew)],
        any::<bool>(),
    )
        .prop_map(|(claimed, scope, key, expiry, c_encoding)| Connect {
            claimed,
            module: None,
            client_id_matches: true,
            scope,
            key,
            expiry,
            policy_name: false,
            c_encoding,
        });
    let mutated = (valid, random_connect(), 0u8..9).prop_map(|(mut c, r, field)| {
        match field {
            0 => c.claimed = r.claimed,
            1 => c.module = r.module,
            2 => c.client_id_matches = r.client_id_matches,
            3 => c.scope = r.scope,
            4 => c.key = r.key,
            5 => c.expiry = r.expiry,
            6 => c.policy_name = r.policy_name,
            7 => c.c_encoding = r.c_encoding,
            _ => {}
        }
        c
    });
    prop_oneof![mutated, random_connect()]
}

fn random_connect() -> impl Strategy<Value = Connect> {
    (
        prop::sample::select(CLAIMED.to_vec()),
        prop::sample::select(MODULES.to_vec()),
        prop::bool::weighted(0.9),
        scope_strategy(),
        prop_oneof![
            Just(Key::Primary),
            Just(Key::Secondary),
            Just(Key::OtherDevices),
            Just(Key::Random)
        ],
        prop_oneof![
            Just(Expiry::Future),
            Just(Expiry::InsideSkew),
            Just(Expiry::Expired)
        ],
        prop::bool::weighted(0.15),
        any::<bool>(),
    )
        .prop_map(
            |(claimed, module, client_id_matches, scope, key, expiry, policy_name, c_encoding)| {
                Connect {
                    claimed,
                    module,
                    client_id_matches,
                    scope,
                    key,
                    expiry,
                    policy_name,
                    c_encoding,
                }
            },
        )
}

fn keys_of(id: &str) -> Option<(u8, u8)> {
    DEVICES
        .iter()
        .find(|d| d.0 == id)
        .map(|&(_, _, p, s)| (p, s))
}

/// The token and the MQTT fields a client sends for `c`.
fn client_sends(c: &Connect) -> (String, String, String) {
    let identity_path = match c.module {
        Some(m) => format!("devices/{}/modules/{m}", c.claimed),
        None => format!("devices/{}", c.claimed),
    };
    let other = if c.claimed == "dev-1" {
        "dev-2"
    } else {
        "dev-1"
    };
    let resource = match c.scope {
        Scope::Exact => format!("{HOST}/{identity_path}"),
        Scope::ExactSlash => format!("{HOST}/{identity_path}/"),
        Scope::UpperHost => format!("{}/{identity_path}", HOST.to_uppercase()),
        Scope::HostOnly => HOST.to_string(),
        Scope::DevicesOnly => format!("{HOST}/devices"),
        Scope::Parent => match c.module {
            Some(_) => format!("{HOST}/devices/{}", c.claimed),
            None => format!("{HOST}/devices/{}/modules/m1", c.claimed),
        },
        Scope::OtherDevice => format!("{HOST}/devices/{other}"),
        Scope::OtherHub => format!("other.example.net/{identity_path}"),
    };
    let own = keys_of(c.claimed).unwrap_or((99, 98));
    let key = match c.key {
        Key::Primary => vec![own.0; 32],
        Key::Secondary => vec![own.1; 32],
        Key::OtherDevices => vec![keys_of(other).map_or(97, |k| k.0); 32],
        Key::Random => vec![0x5a; 32],
    };
    let expiry = match c.expiry {
        Expiry::Future => NOW + 3600,
        Expiry::InsideSkew => NOW - 60,
        Expiry::Expired => NOW - 3600,
    };
    let written = if c.c_encoding {
        resource
    } else {
        sas::encode_resource(&resource)
    };
    let token = sas::sign(
        &written,
        &key,
        expiry,
        c.policy_name.then_some("iothubowner"),
    );
    let client_id = match (c.client_id_matches, c.module) {
        (true, Some(m)) => format!("{}/{m}", c.claimed),
        (true, None) => c.claimed.to_string(),
        (false, _) => "someone-else".to_string(),
    };
    let username = match c.module {
        Some(m) => format!("{HOST}/{}/{m}/?api-version=2021-04-12", c.claimed),
        None => format!("{HOST}/{}/?api-version=2021-04-12", c.claimed),
    };
    (client_id, username, token)
}

/// The oracle, from the spec: a device (modules are not registered) that is registered and
/// enabled, with its own client id, a token without a policy name whose resource is exactly
/// its own, signed with one of its two keys, not expired beyond the skew.
fn may_connect(c: &Connect) -> bool {
    let registered_enabled = DEVICES.iter().any(|d| d.0 == c.claimed && d.1);
    c.module.is_none()
        && registered_enabled
        && c.client_id_matches
        && matches!(c.scope, Scope::Exact | Scope::ExactSlash | Scope::UpperHost)
        && matches!(c.key, Key::Primary | Key::Secondary)
        && c.expiry != Expiry::Expired
        && !c.policy_name
}

#[derive(Debug, Clone)]
struct Use {
    device: &'static str,
    module: Option<&'static str>,
    /// Index into the topics or filters built for the identity.
    pick: usize,
    /// PUBLISH (true) or SUBSCRIBE (false).
    publish: bool,
}

fn identity(device: &str, module: Option<&str>) -> Identity {
    Identity {
        device_id: device.into(),
        module_id: module.map(str::to_string),
        generation_id: "g".into(),
        model_id: None,
        token_expiry: NOW + 3600,
        method: roost_session::auth::AuthMethod::Sas,
        ca: None,
    }
}

/// Topics a client of (`d`, `m`) might publish to, each with whether the oracle allows it.
fn topics(d: &str, m: Option<&str>) -> Vec<(String, bool)> {
    let own = match m {
        Some(m) => format!("devices/{d}/modules/{m}/messages/events/"),
        None => format!("devices/{d}/messages/events/"),
    };
    vec![
        (own.clone(), true),
        (format!("{own}a=1&%24.ct=application%2Fjson"), true),
        (own.trim_end_matches('/').to_string(), true),
        (format!("devices/{d}/messages/events/"), m.is_none()),
        (
            format!("devices/{d}/modules/m1/messages/events/"),
            m == Some("m1"),
        ),
        (
            "devices/dev-2/messages/events/".into(),
            d == "dev-2" && m.is_none(),
        ),
        (format!("devices/{d}x/messages/events/"), false),
        (format!("devices/{d}/messages/devicebound/"), false),
        ("$iothub/twin/GET/?$rid=1".into(), false),
        ("devices/+/messages/events/".into(), false),
        ("foo/bar".into(), false),
    ]
}

/// Filters a client of (`d`, `m`) might subscribe to, each with whether the oracle allows it.
fn filters(d: &str, m: Option<&str>) -> Vec<(String, bool)> {
    vec![
        ("$iothub/twin/res/#".into(), true),
        ("$iothub/methods/POST/#".into(), true),
        ("$iothub/twin/PATCH/properties/desired/#".into(), true),
        (format!("devices/{d}/messages/devicebound/#"), m.is_none()),
        (
            "devices/dev-2/messages/devicebound/#".into(),
            d == "dev-2" && m.is_none(),
        ),
        (format!("devices/{d}/modules/m1/inputs/#"), m == Some("m1")),
        (format!("devices/{d}/modules/m2/inputs/#"), m == Some("m2")),
        ("devices/+/messages/devicebound/#".into(), false),
        ("#".into(), false),
        ("$iothub/#".into(), false),
        (format!("devices/{d}/messages/events/#"), false),
        (format!("devices/{d}/messages/devicebound/x"), false),
    ]
}

#[test]
fn every_operation_is_decided_as_the_spec_says() {
    let registry = registry();
    let (connects, uses, accepts) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        connect_strategy(),
        (
            prop::sample::select(CLAIMED.to_vec()),
            prop::sample::select(MODULES.to_vec()),
            0usize..12,
            any::<bool>(),
        )
            .prop_map(|(device, module, pick, publish)| Use {
                device,
                module,
                pick,
                publish,
            }),
    );
    runner
        .run(&strategy, |(c, u)| {
            // CONNECT
            let (client_id, username, token) = client_sends(&c);
            let decided = mqtt_credentials(&client_id, Some(&username), Some(token.as_bytes()))
                .and_then(|claim| authenticate_sas(&claim, &registry, HOST, NOW));
            connects.fetch_add(1, Ordering::Relaxed);
            if decided.is_ok() {
                accepts.fetch_add(1, Ordering::Relaxed);
            }
            prop_assert_eq!(
                decided.is_ok(),
                may_connect(&c),
                "CONNECT {:?}: {:?}",
                c,
                decided.err()
            );
            // PUBLISH or SUBSCRIBE by an authenticated identity
            let id = identity(u.device, u.module);
            let options = if u.publish {
                topics(u.device, u.module)
            } else {
                filters(u.device, u.module)
            };
            let (what, allowed) = &options[u.pick % options.len()];
            let decided = if u.publish {
                publish_bag(&id, what).is_ok()
            } else {
                DeviceFilter::classify(what, u.device, u.module).is_some()
            };
            uses.fetch_add(1, Ordering::Relaxed);
            prop_assert_eq!(
                decided,
                *allowed,
                "{} {} by {:?}",
                if u.publish { "PUBLISH" } else { "SUBSCRIBE" },
                what,
                u
            );
            Ok(())
        })
        .expect("no false accept and no false refusal");
    let (connects, uses) = (connects.into_inner(), uses.into_inner());
    println!(
        "authorization: {} cases ({connects} CONNECTs, {} accepted; {uses} PUBLISH/SUBSCRIBE): 0 false accepts, 0 false refusals",
        connects + uses,
        accepts.into_inner(),
    );
    assert!(connects + uses >= 20_000);
}
