//! roost-twin: device and module twins as IoT Hub keeps them (wire spec §2.4, §4.2).
//!
//! What it is: the twin document as data and pure functions — tags, and the desired and
//! reported sections, each with its `$version` and a `$metadata` tree that mirrors it
//! (`$lastUpdated` on every node, `$lastUpdatedVersion` on desired nodes); the recursive merge
//! of a patch (`null` deletes a member), replacement, the twin `version`, and IoT Hub's limits
//! on size, depth, keys, strings and numbers. Time is passed in (Unix milliseconds).
//!
//! What it is not: storage, REST or MQTT. Control stores twins and serves them; the engine
//! answers a device's twin requests from what control sends. Identity fields (status,
//! connection state, …) are the registry's and are added where the twin is served.

use roost_iothub::time::iso_ms;
use serde_json::{Map, Value};

/// Bytes the serialized tags may take.
pub const MAX_TAGS_BYTES: usize = 8 * 1024;
/// Bytes the serialized desired, or reported, properties may take (without `$metadata`).
pub const MAX_SECTION_BYTES: usize = 32 * 1024;
/// Levels of objects that may nest below the tags object.
pub const MAX_TAGS_DEPTH: usize = 10;
/// Levels of objects desired and reported properties may nest below their section.
pub const MAX_PROPERTIES_DEPTH: usize = 5;
/// Bytes of one key.
pub const MAX_KEY_BYTES: usize = 1024;
/// Bytes of one string value.
pub const MAX_STRING_BYTES: usize = 4 * 1024;
/// The largest integer magnitude a twin holds (2^52 − 1).
pub const MAX_INTEGER: i64 = 4_503_599_627_370_495;

/// Which part of a twin a document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Part {
    Tags,
    Desired,
    Reported,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Tags => "tags",
            Part::Desired => "desired",
            Part::Reported => "reported",
        }
    }

    fn max_bytes(self) -> usize {
        match self {
            Part::Tags => MAX_TAGS_BYTES,
            Part::Desired | Part::Reported => MAX_SECTION_BYTES,
        }
    }

    fn max_depth(self) -> usize {
        match self {
            Part::Tags => MAX_TAGS_DEPTH,
            Part::Desired | Part::Reported => MAX_PROPERTIES_DEPTH,
        }
    }
}

/// Why a twin document or update was refused: REST answers 400 (400004 ArgumentInvalid), MQTT
/// status 400, each with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinError {
    #[error("{part} must be a JSON object")]
    NotAnObject { part: &'static str },
    #[error("{part} would take {bytes} bytes; at most {max} are allowed")]
    TooLarge {
        part: &'static str,
        bytes: usize,
        max: usize,
    },
    #[error("{part} nests objects {depth} levels deep; at most {max} are allowed")]
    TooDeep {
        part: &'static str,
        depth: usize,
        max: usize,
    },
    #[error("invalid key {key:?} in {part}: {why}")]
    BadKey {
        part: &'static str,
        key: String,
        why: &'static str,
    },
    #[error("a string in {part} is {bytes} bytes long; at most {max} are allowed")]
    StringTooLong {
        part: &'static str,
        bytes: usize,
        max: usize,
    },
    #[error("a number in {part} is out of range (integers within ±{MAX_INTEGER})")]
    NumberOutOfRange { part: &'static str },
    #[error("arrays are not allowed in {part}")]
    Array { part: &'static str },
}

/// Checks a key the way IoT Hub does: not empty, at most 1 KiB, no `.`, `$`, space or control
/// character. (`$version` and `$metadata` are the hub's, never a client's.)
fn check_key(part: Part, key: &str) -> Result<(), TwinError> {
    let bad = |why| TwinError::BadKey {
        part: part.name(),
        key: key.chars().take(64).collect(),
        why,
    };
    if key.is_empty() {
        return Err(bad("empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(bad("longer than 1 KiB"));
    }
    if key
        .chars()
        .any(|c| c == '.' || c == '$' || c == ' ' || c.is_control())
    {
        return Err(bad("contains '.', '$', a space or a control character"));
    }
    Ok(())
}

/// Checks every member of `doc` (keys, strings, numbers, depth) as `part`; `null` is allowed
/// (in a patch it deletes). `level` is how many objects `doc` is nested below its part's root
/// (0 for the root).
fn check_members(part: Part, doc: &Map<String, Value>, level: usize) -> Result<(), TwinError> {
    if level > part.max_depth() {
        return Err(TwinError::TooDeep {
            part: part.name(),
            depth: level,
            max: part.max_depth(),
        });
    }
    for (key, value) in doc {
        check_key(part, key)?;
        match value {
            Value::Object(inner) => check_members(part, inner, level + 1)?,
            Value::String(s) if s.len() > MAX_STRING_BYTES => {
                return Err(TwinError::StringTooLong {
                    part: part.name(),
                    bytes: s.len(),
                    max: MAX_STRING_BYTES,
                })
            }
            Value::Number(n) => {
                let in_range = match (n.as_i64(), n.as_u64(), n.as_f64()) {
                    (Some(i), _, _) => i.abs() <= MAX_INTEGER,
                    (None, Some(_), _) => false, // above i64::MAX
                    (None, None, Some(f)) => f.is_finite(),
                    _ => false,
                };
                if !in_range {
                    return Err(TwinError::NumberOutOfRange { part: part.name() });
                }
            }
            // IoT Hub's twins hold objects and primitives; arrays are refused.
            Value::Array(_) => return Err(TwinError::Array { part: part.name() }),
            _ => {}
        }
    }
    Ok(())
}

fn check_size(part: Part, doc: &Map<String, Value>) -> Result<(), TwinError> {
    let bytes = serde_json::to_vec(doc).map_or(usize::MAX, |v| v.len());
    if bytes > part.max_bytes() {
        return Err(TwinError::TooLarge {
            part: part.name(),
            bytes,
            max: part.max_bytes(),
        });
    }
    Ok(())
}

/// `value` as the object a twin part must be.
pub fn as_object(part: Part, value: &Value) -> Result<&Map<String, Value>, TwinError> {
    value
        .as_object()
        .ok_or(TwinError::NotAnObject { part: part.name() })
}

/// Merges `patch` into `doc`: objects recursively, `null` deletes, anything else replaces.
/// Returns whether anything changed. `meta` is `doc`'s `$metadata` node; each node that
/// changed gets `stamp` (and the nodes above it, which the caller stamps).
fn merge(
    doc: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    meta: &mut Map<String, Value>,
    stamp: &Map<String, Value>,
) -> bool {
    let mut changed = false;
    for (key, value) in patch {
        match value {
            Value::Null => {
                if doc.remove(key).is_some() {
                    meta.remove(key);
                    changed = true;
                }
            }
            Value::Object(inner) => {
                let created = !doc.get(key).is_some_and(Value::is_object);
                if created {
                    doc.insert(key.clone(), Value::Object(Map::new()));
                    meta.insert(key.clone(), Value::Object(stamp.clone()));
                }
                let node = meta
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(stamp.clone()));
                if !node.is_object() {
                    *node = Value::Object(stamp.clone());
                }
                let (Some(Value::Object(target)), Value::Object(node)) = (doc.get_mut(key), node)
                else {
                    continue; // both are objects: made so just above
                };
                if merge(target, inner, node, stamp) || created {
                    node.extend(stamp.clone());
                    changed = true;
                }
            }
            other => {
                if doc.get(key) != Some(other) {
                    doc.insert(key.clone(), other.clone());
                    meta.insert(key.clone(), Value::Object(stamp.clone()));
                    changed = true;
                }
            }
        }
    }
    changed
}

/// The `$metadata` tree of `doc`, every node stamped with `stamp` (a document written whole).
fn metadata_of(doc: &Map<String, Value>, stamp: &Map<String, Value>) -> Map<String, Value> {
    let mut meta = stamp.clone();
    for (key, value) in doc {
        let node = match value {
            Value::Object(inner) => metadata_of(inner, stamp),
            _ => stamp.clone(),
        };
        meta.insert(key.clone(), Value::Object(node));
    }
    meta
}

/// Desired or reported properties: the members, their `$version` and `$metadata`. Serialized
/// as stored (control's store), not as served: see [`Section::to_json`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Section {
    part: Part,
    members: Map<String, Value>,
    metadata: Map<String, Value>,
    version: u64,
}

impl Section {
    /// An empty section at version 1, as IoT Hub creates a twin.
    pub fn new(part: Part, now_ms: u64) -> Self {
        let mut s = Self {
            part,
            members: Map::new(),
            metadata: Map::new(),
            version: 1,
        };
        s.metadata = s.stamp(now_ms);
        s
    }

    /// The stamp a node changed at `now_ms` by the update to `self.version` carries.
    fn stamp(&self, now_ms: u64) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("$lastUpdated".into(), Value::String(iso_ms(now_ms)));
        if self.part == Part::Desired {
            m.insert("$lastUpdatedVersion".into(), Value::from(self.version));
        }
        m
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn members(&self) -> &Map<String, Value> {
        &self.members
    }

    /// Merges `patch` (a JSON object; `null` deletes): the version goes up by one when
    /// anything changed. Refused whole, leaving the section as it was, if the patch or the
    /// result breaks a limit.
    pub fn patch(&mut self, patch: &Value, now_ms: u64) -> Result<bool, TwinError> {
        let patch = as_object(self.part, patch)?;
        check_members(self.part, patch, 0)?;
        let mut next = self.clone();
        next.version += 1;
        let stamp = next.stamp(now_ms);
        if !merge(&mut next.members, patch, &mut next.metadata, &stamp) {
            return Ok(false);
        }
        check_size(self.part, &next.members)?;
        next.metadata.extend(stamp);
        *self = next;
        Ok(true)
    }

    /// Replaces every member with `doc`; the version goes up by one.
    pub fn replace(&mut self, doc: &Value, now_ms: u64) -> Result<(), TwinError> {
        let doc = as_object(self.part, doc)?;
        check_members(self.part, doc, 0)?;
        let mut members = doc.clone();
        members.retain(|_, v| !v.is_null());
        check_size(self.part, &members)?;
        self.version += 1;
        let stamp = self.stamp(now_ms);
        self.metadata = metadata_of(&members, &stamp);
        self.members = members;
        Ok(())
    }

    /// The section as a twin shows it: the members, `$metadata` and `$version`.
    pub fn to_json(&self, with_metadata: bool) -> Value {
        let mut out = self.members.clone();
        if with_metadata {
            out.insert("$metadata".into(), Value::Object(self.metadata.clone()));
        }
        out.insert("$version".into(), Value::from(self.version));
        Value::Object(out)
    }
}

/// A twin's own document: tags and properties, and the twin `version`, which counts every
/// change to either. Serialized as stored; [`Twin::service_view`] and [`Twin::device_view`]
/// are what clients see.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Twin {
    pub tags: Map<String, Value>,
    pub desired: Section,
    pub reported: Section,
    pub version: u64,
}

impl Twin {
    /// A new device's twin: no tags, empty sections at `$version` 1, twin version 1.
    pub fn new(now_ms: u64) -> Self {
        Self {
            tags: Map::new(),
            desired: Section::new(Part::Desired, now_ms),
            reported: Section::new(Part::Reported, now_ms),
            version: 1,
        }
    }

    /// A service's twin PATCH (`{"tags":{..},"properties":{"desired":{..}}}`): tags and desired
    /// merged; reported and read-only fields ignored. Returns the desired delta a connected
    /// device is sent (with its new `$version`), if desired changed.
    pub fn service_patch(&mut self, body: &Value, now_ms: u64) -> Result<Option<Value>, TwinError> {
        let mut next = self.clone();
        let mut changed = false;
        if let Some(tags) = body.get("tags").filter(|t| !t.is_null()) {
            let patch = as_object(Part::Tags, tags)?;
            check_members(Part::Tags, patch, 0)?;
            let mut ignored = Map::new();
            if merge(&mut next.tags, patch, &mut ignored, &Map::new()) {
                check_size(Part::Tags, &next.tags)?;
                changed = true;
            }
        }
        let mut delta = None;
        if let Some(desired) = body.pointer("/properties/desired").filter(|d| !d.is_null()) {
            if next.desired.patch(desired, now_ms)? {
                changed = true;
                let mut d = as_object(Part::Desired, desired)?.clone();
                d.insert("$version".into(), Value::from(next.desired.version));
                delta = Some(Value::Object(d));
            }
        }
        if changed {
            next.version += 1;
        }
        *self = next;
        Ok(delta)
    }

    /// A service's twin PUT: tags and desired replaced (absent ones become empty). Returns the
    /// whole desired document a connected device is sent.
    pub fn service_replace(&mut self, body: &Value, now_ms: u64) -> Result<Value, TwinError> {
        let empty = Value::Object(Map::new());
        let tags = body.get("tags").filter(|t| !t.is_null()).unwrap_or(&empty);
        let desired = body
            .pointer("/properties/desired")
            .filter(|d| !d.is_null())
            .unwrap_or(&empty);
        let tags_doc = as_object(Part::Tags, tags)?;
        check_members(Part::Tags, tags_doc, 0)?;
        let mut tags_doc = tags_doc.clone();
        tags_doc.retain(|_, v| !v.is_null());
        check_size(Part::Tags, &tags_doc)?;
        let mut next = self.clone();
        next.desired.replace(desired, now_ms)?;
        next.tags = tags_doc;
        next.version += 1;
        *self = next;
        Ok(self.desired.to_json(false))
    }

    /// A device's reported PATCH: merged; returns the new reported `$version` (the MQTT
    /// response's `$version`).
    pub fn device_patch_reported(&mut self, patch: &Value, now_ms: u64) -> Result<u64, TwinError> {
        if self.reported.patch(patch, now_ms)? {
            self.version += 1;
        }
        Ok(self.reported.version)
    }

    /// What a device's twin GET is answered with: desired and reported with their
    /// `$version`, no tags and no `$metadata` (spec §2.4).
    pub fn device_view(&self) -> Value {
        serde_json::json!({
            "desired": self.desired.to_json(false),
            "reported": self.reported.to_json(false),
        })
    }

    /// What routing reads of the twin (the registry's `DeviceAuth::twin`), as JSON text:
    /// `{"tags":{…},"properties":{"desired":{…},"reported":{…}}}` with each section's
    /// `$version` and no `$metadata`. Empty when the twin has no tags and no properties, so an
    /// untouched twin costs the engines' registry view nothing.
    pub fn routing_view(&self) -> String {
        if self.tags.is_empty()
            && self.desired.members().is_empty()
            && self.reported.members().is_empty()
        {
            return String::new();
        }
        serde_json::json!({
            "tags": Value::Object(self.tags.clone()),
            "properties": self.device_view(),
        })
        .to_string()
    }

    /// The twin's `tags` and `properties` as the service API shows them.
    pub fn service_view(&self) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("tags".into(), Value::Object(self.tags.clone()));
        out.insert(
            "properties".into(),
            serde_json::json!({
                "desired": self.desired.to_json(true),
                "reported": self.reported.to_json(true),
            }),
        );
        out.insert("version".into(), Value::from(self.version));
        out
    }
}

#[cfg(test)]
mod tests;
