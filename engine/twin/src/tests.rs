use serde_json::json;

use super::*;

const T0: u64 = 1_700_000_000_000;
const T1: u64 = T0 + 1_500;

#[test]
fn a_new_twin_has_empty_sections_at_version_one() {
    let t = Twin::new(T0);
    assert_eq!(
        t.device_view(),
        json!({"desired": {"$version": 1}, "reported": {"$version": 1}})
    );
    assert_eq!(t.version, 1);
    let view = Value::Object(t.service_view());
    assert_eq!(
        view.pointer("/properties/desired/$metadata"),
        Some(&json!({"$lastUpdated": iso_ms(T0), "$lastUpdatedVersion": 1}))
    );
    assert_eq!(
        view.pointer("/properties/reported/$metadata"),
        Some(&json!({"$lastUpdated": iso_ms(T0)}))
    );
}

#[test]
fn a_reported_patch_merges_recursively_and_null_deletes() {
    let mut t = Twin::new(T0);
    let v = t
        .device_patch_reported(
            &json!({"fw": "1.0", "net": {"ip": "10.0.0.2", "rssi": -60}}),
            T0,
        )
        .unwrap();
    assert_eq!(v, 2);
    let v = t
        .device_patch_reported(
            &json!({"net": {"rssi": -70, "ip": null}, "fw": null, "up": true}),
            T1,
        )
        .unwrap();
    assert_eq!(v, 3);
    assert_eq!(
        t.device_view()["reported"],
        json!({"net": {"rssi": -70}, "up": true, "$version": 3})
    );
    assert_eq!(t.version, 3, "each change counts in the twin version");
    // The same patch again changes nothing: no new version.
    let again = t
        .device_patch_reported(&json!({"up": true}), T1 + 1)
        .unwrap();
    assert_eq!(again, 3);
    assert_eq!(t.version, 3);
}

#[test]
fn metadata_mirrors_the_tree_and_stamps_what_changed() {
    let mut t = Twin::new(T0);
    t.service_patch(
        &json!({"properties": {"desired": {"a": {"b": 1, "c": 2}, "d": 3}}}),
        T0,
    )
    .unwrap();
    t.service_patch(&json!({"properties": {"desired": {"a": {"c": 5}}}}), T1)
        .unwrap();
    let desired = t.desired.to_json(true);
    let meta = &desired["$metadata"];
    let at = |ms, v| json!({"$lastUpdated": iso_ms(ms), "$lastUpdatedVersion": v});
    assert_eq!(meta["d"], at(T0, 2));
    assert_eq!(meta["a"]["b"], at(T0, 2));
    assert_eq!(meta["a"]["c"], at(T1, 3));
    // The changed leaf's parents and the section root carry the latest change.
    assert_eq!(meta["a"]["$lastUpdated"], json!(iso_ms(T1)));
    assert_eq!(meta["a"]["$lastUpdatedVersion"], json!(3));
    assert_eq!(meta["$lastUpdated"], json!(iso_ms(T1)));
    assert_eq!(desired["$version"], json!(3));
    // A deleted member leaves the metadata too.
    t.service_patch(&json!({"properties": {"desired": {"a": null}}}), T1)
        .unwrap();
    assert!(t.desired.to_json(true)["$metadata"].get("a").is_none());
}

#[test]
fn a_service_patch_sends_the_delta_and_a_replace_the_whole_document() {
    let mut t = Twin::new(T0);
    let delta = t
        .service_patch(
            &json!({"etag": "*", "tags": {"site": "oslo"}, "properties": {"desired": {"rate": 5}, "reported": {"x": 1}}}),
            T0,
        )
        .unwrap();
    assert_eq!(delta, Some(json!({"rate": 5, "$version": 2})));
    assert_eq!(t.tags, json!({"site": "oslo"}).as_object().unwrap().clone());
    assert_eq!(
        t.reported.members().len(),
        0,
        "reported is not writable by a service"
    );
    assert_eq!(t.version, 2);
    // Tags alone change the twin version, not desired's.
    assert_eq!(
        t.service_patch(&json!({"tags": {"floor": 3}}), T1).unwrap(),
        None
    );
    assert_eq!((t.version, t.desired.version()), (3, 2));

    let whole = t
        .service_replace(&json!({"properties": {"desired": {"mode": "eco"}}}), T1)
        .unwrap();
    assert_eq!(whole, json!({"mode": "eco", "$version": 3}));
    assert!(t.tags.is_empty(), "PUT replaces tags too");
    assert_eq!(t.version, 4);
}

#[test]
fn limits_refuse_the_update_whole() {
    let mut t = Twin::new(T0);
    t.device_patch_reported(&json!({"keep": 1}), T0).unwrap();
    let before = t.clone();
    let big = "x".repeat(4000);
    let mut patch = Map::new();
    for i in 0..9 {
        patch.insert(format!("k{i}"), Value::String(big.clone()));
    }
    let err = t
        .device_patch_reported(&Value::Object(patch), T1)
        .unwrap_err();
    assert!(
        matches!(
            err,
            TwinError::TooLarge {
                part: "reported",
                max: 32768,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(t, before, "a refused patch changes nothing");

    let deep = json!({"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}});
    let err = t.device_patch_reported(&deep, T1).unwrap_err();
    assert!(
        matches!(
            err,
            TwinError::TooDeep {
                depth: 6,
                max: 5,
                ..
            }
        ),
        "{err}"
    );
    t.device_patch_reported(&json!({"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}), T1)
        .expect("5 levels below the root are allowed");

    for (key, why) in [
        ("a.b", "'.'"),
        ("$x", "'$'"),
        ("a b", "space"),
        ("", "empty"),
    ] {
        let err = t.device_patch_reported(&json!({ key: 1 }), T1).unwrap_err();
        assert!(
            matches!(err, TwinError::BadKey { .. }),
            "{key:?} ({why}): {err}"
        );
    }
    let long = "s".repeat(MAX_STRING_BYTES + 1);
    assert!(matches!(
        t.device_patch_reported(&json!({ "s": long }), T1),
        Err(TwinError::StringTooLong { .. })
    ));
    assert!(matches!(
        t.device_patch_reported(&json!({ "n": MAX_INTEGER + 1 }), T1),
        Err(TwinError::NumberOutOfRange { .. })
    ));
    t.device_patch_reported(&json!({ "n": -MAX_INTEGER, "f": 1.5 }), T1)
        .expect("in range");
    assert!(matches!(
        t.device_patch_reported(&json!({ "list": [1, 2] }), T1),
        Err(TwinError::Array { .. })
    ));
    assert!(matches!(
        t.device_patch_reported(&json!("not an object"), T1),
        Err(TwinError::NotAnObject { .. })
    ));

    let mut tags = Map::new();
    for i in 0..3 {
        tags.insert(format!("t{i}"), Value::String(big.clone()));
    }
    let err = t.service_patch(&json!({ "tags": tags }), T1).unwrap_err();
    assert!(
        matches!(
            err,
            TwinError::TooLarge {
                part: "tags",
                max: 8192,
                ..
            }
        ),
        "{err}"
    );
    let deep_tags = json!({"tags": {"1": {"2": {"3": {"4": {"5": {"6": {"7": {"8": {"9": {"10": {"11": {"12": 1}}}}}}}}}}}}});
    assert!(matches!(
        t.service_patch(&deep_tags, T1),
        Err(TwinError::TooDeep {
            part: "tags",
            max: 10,
            ..
        })
    ));
}
