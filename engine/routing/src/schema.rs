//! A plugin's `schema.lua`: pure data describing its configuration, and the check of a
//! configuration against it (unknown keys refused, types checked, defaults filled).
//!
//! ```lua
//! return {
//!   fields = {
//!     paths = { type = "array", items = "string", required = true },
//!     mask  = { type = "string", default = "***" },
//!     mode  = { type = "string", one_of = { "mask", "remove" }, default = "mask" },
//!     limit = { type = "number", min = 0, max = 100 },
//!     rules = { type = "map", values = "table" },
//!   },
//! }
//! ```
//! Types: `string`, `number`, `integer`, `boolean`, `array` (of `items`), `map` (string keys to
//! `values`), `table` (any JSON object or array).

use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    String,
    Number,
    Integer,
    Boolean,
    Array,
    Map,
    Table,
}

impl Type {
    fn named(s: &str) -> Option<Type> {
        Some(match s {
            "string" => Type::String,
            "number" => Type::Number,
            "integer" => Type::Integer,
            "boolean" => Type::Boolean,
            "array" => Type::Array,
            "map" => Type::Map,
            "table" => Type::Table,
            _ => return None,
        })
    }

    fn holds(self, v: &Value) -> bool {
        match self {
            Type::String => v.is_string(),
            Type::Number => v.is_number(),
            Type::Integer => v.as_i64().is_some() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
            Type::Boolean => v.is_boolean(),
            // Lua cannot tell an empty list from an empty table: `{}` is either.
            Type::Array => v.is_array() || v.as_object().is_some_and(|m| m.is_empty()),
            Type::Map => v.is_object() || v.as_array().is_some_and(|a| a.is_empty()),
            Type::Table => v.is_object() || v.is_array(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Type::String => "string",
            Type::Number => "number",
            Type::Integer => "integer",
            Type::Boolean => "boolean",
            Type::Array => "array",
            Type::Map => "map",
            Type::Table => "table",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Field {
    name: String,
    ty: Type,
    /// For arrays, the type of the items; for maps, of the values.
    inner: Option<Type>,
    required: bool,
    default: Option<Value>,
    one_of: Vec<Value>,
    min: Option<f64>,
    max: Option<f64>,
}

/// A checked `schema.lua`.
#[derive(Debug, Clone, PartialEq)]
pub struct Schema {
    fields: Vec<Field>,
}

const FIELD_KEYS: [&str; 8] = [
    "type", "items", "values", "required", "default", "one_of", "min", "max",
];

impl Schema {
    /// The schema from the JSON form of the table `schema.lua` returned.
    pub fn from_json(v: &Value) -> Result<Schema, String> {
        let top = v.as_object().ok_or("schema.lua must return a table")?;
        if let Some(k) = top.keys().find(|k| *k != "fields") {
            return Err(format!("unknown key {k:?} in the schema (known: fields)"));
        }
        let mut fields = Vec::new();
        let Some(list) = top.get("fields") else {
            return Ok(Schema { fields });
        };
        let list = list
            .as_object()
            .ok_or("fields must map names to field tables")?;
        for (name, f) in list {
            let f = f
                .as_object()
                .ok_or_else(|| format!("field {name:?} must be a table"))?;
            if let Some(k) = f.keys().find(|k| !FIELD_KEYS.contains(&k.as_str())) {
                return Err(format!(
                    "field {name:?}: unknown key {k:?} (known: {})",
                    FIELD_KEYS.join(", ")
                ));
            }
            let ty_name = f
                .get("type")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("field {name:?} needs a type"))?;
            let ty = Type::named(ty_name).ok_or_else(|| {
                format!("field {name:?}: unknown type {ty_name:?} (string, number, integer, boolean, array, map, table)")
            })?;
            let inner_key = match ty {
                Type::Array => Some("items"),
                Type::Map => Some("values"),
                _ => None,
            };
            let inner = match inner_key.and_then(|k| f.get(k)) {
                None => None,
                Some(v) => {
                    let s = v.as_str().unwrap_or_default();
                    Some(
                        Type::named(s)
                            .ok_or_else(|| format!("field {name:?}: unknown item type {v}"))?,
                    )
                }
            };
            let number = |k: &str| -> Result<Option<f64>, String> {
                match f.get(k) {
                    None => Ok(None),
                    Some(v) => v
                        .as_f64()
                        .map(Some)
                        .ok_or_else(|| format!("field {name:?}: {k} must be a number")),
                }
            };
            let field = Field {
                name: name.clone(),
                ty,
                inner,
                required: f.get("required").and_then(Value::as_bool).unwrap_or(false),
                default: f.get("default").cloned(),
                one_of: match f.get("one_of") {
                    None => Vec::new(),
                    Some(Value::Array(a)) => a.clone(),
                    Some(_) => return Err(format!("field {name:?}: one_of must be a list")),
                },
                min: number("min")?,
                max: number("max")?,
            };
            if let Some(d) = &field.default {
                field
                    .check(d)
                    .map_err(|e| format!("field {name:?}: its default {e}"))?;
            }
            fields.push(field);
        }
        fields.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Schema { fields })
    }

    /// `config` checked against the schema, with defaults filled in.
    pub fn apply(&self, config: &Value) -> Result<Value, String> {
        let empty = Map::new();
        let given = match config {
            Value::Object(m) => m,
            Value::Array(a) if a.is_empty() => &empty,
            _ => return Err("config must be a table of named fields".into()),
        };
        if let Some(k) = given
            .keys()
            .find(|k| !self.fields.iter().any(|f| &f.name == *k))
        {
            let known: Vec<&str> = self.fields.iter().map(|f| f.name.as_str()).collect();
            return Err(format!(
                "unknown config key {k:?} (known: {})",
                known.join(", ")
            ));
        }
        let mut out = Map::new();
        for f in &self.fields {
            match given.get(&f.name).or(f.default.as_ref()) {
                Some(v) => {
                    f.check(v).map_err(|e| format!("config {}: {e}", f.name))?;
                    let v = match (f.ty, v) {
                        (Type::Array, Value::Object(_)) => Value::Array(Vec::new()),
                        (Type::Map, Value::Array(_)) => Value::Object(Map::new()),
                        _ => v.clone(),
                    };
                    out.insert(f.name.clone(), v);
                }
                None if f.required => return Err(format!("config {} is required", f.name)),
                None => {}
            }
        }
        Ok(Value::Object(out))
    }
}

impl Field {
    fn check(&self, v: &Value) -> Result<(), String> {
        if !self.ty.holds(v) {
            return Err(format!("must be of type {}, not {v}", self.ty.name()));
        }
        if !self.one_of.is_empty() && !self.one_of.contains(v) {
            let list: Vec<String> = self.one_of.iter().map(Value::to_string).collect();
            return Err(format!("must be one of {}, not {v}", list.join(", ")));
        }
        if let Some(n) = v.as_f64() {
            if self.min.is_some_and(|m| n < m) || self.max.is_some_and(|m| n > m) {
                return Err(format!(
                    "must be from {} to {}, not {n}",
                    self.min.map_or("-inf".into(), |m| m.to_string()),
                    self.max.map_or("inf".into(), |m| m.to_string())
                ));
            }
        }
        if let Some(inner) = self.inner {
            let items: Box<dyn Iterator<Item = &Value>> = match v {
                Value::Array(a) => Box::new(a.iter()),
                Value::Object(m) => Box::new(m.values()),
                _ => Box::new(std::iter::empty()),
            };
            for item in items {
                if !inner.holds(item) {
                    return Err(format!("holds {item}, which is not a {}", inner.name()));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema() -> Schema {
        Schema::from_json(&json!({"fields": {
            "paths": {"type": "array", "items": "string", "required": true},
            "mask": {"type": "string", "default": "***"},
            "mode": {"type": "string", "one_of": ["mask", "remove"], "default": "mask"},
            "limit": {"type": "number", "min": 0, "max": 100},
            "rules": {"type": "map", "values": "table"}
        }}))
        .expect("schema")
    }

    #[test]
    fn a_config_is_checked_and_defaults_filled() {
        let s = schema();
        assert_eq!(
            s.apply(&json!({"paths": ["a"]})),
            Ok(json!({"paths": ["a"], "mask": "***", "mode": "mask"}))
        );
        for (config, want) in [
            (json!({}), "config paths is required"),
            (
                json!({"paths": ["a"], "colour": 1}),
                "unknown config key \"colour\" (known: limit, mask, mode, paths, rules)",
            ),
            (
                json!({"paths": "a"}),
                "config paths: must be of type array, not \"a\"",
            ),
            (json!({"paths": {}, "rules": []}), "ok"),
            (
                json!({"paths": [1]}),
                "config paths: holds 1, which is not a string",
            ),
            (
                json!({"paths": [], "mode": "erase"}),
                "config mode: must be one of \"mask\", \"remove\", not \"erase\"",
            ),
            (
                json!({"paths": [], "limit": 101}),
                "config limit: must be from 0 to 100, not 101",
            ),
            (
                json!({"paths": [], "rules": {"x": 1}}),
                "config rules: holds 1, which is not a table",
            ),
            (json!("x"), "config must be a table of named fields"),
        ] {
            if want == "ok" {
                let v = s
                    .apply(&config)
                    .expect("an empty table is an empty list or map");
                assert_eq!((&v["paths"], &v["rules"]), (&json!([]), &json!({})));
                continue;
            }
            assert_eq!(s.apply(&config), Err(want.to_string()), "{config}");
        }
    }

    #[test]
    fn a_bad_schema_is_refused() {
        for (v, want) in [
            (json!({"fieldz": {}}), "unknown key \"fieldz\" in the schema (known: fields)"),
            (json!({"fields": {"a": {"type": "str"}}}), "field \"a\": unknown type \"str\" (string, number, integer, boolean, array, map, table)"),
            (json!({"fields": {"a": {"type": "string", "dflt": 1}}}), "field \"a\": unknown key \"dflt\" (known: type, items, values, required, default, one_of, min, max)"),
            (json!({"fields": {"a": {"type": "string", "default": 1}}}), "field \"a\": its default must be of type string, not 1"),
            (json!({"fields": {"a": {}}}), "field \"a\" needs a type"),
        ] {
            assert_eq!(Schema::from_json(&v), Err(want.to_string()), "{v}");
        }
    }
}
