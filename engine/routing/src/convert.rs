//! Lua values ⇄ JSON, for configuration tables, plugin configs and message bodies.
//!
//! A Lua table is a JSON array when it is a sequence `1..n` with nothing else in it, or when it
//! carries the VM's array marker (a metatable set on every array decoded from JSON, so an empty
//! array stays an array through `msg:json()` and `msg:set_json()`); otherwise an object, whose
//! keys must be strings. Depth is bounded both ways.

use mlua::{Lua, Table, Value as Lua_};
use serde_json::{Map, Number, Value};

/// Deepest nesting converted, either way (IoT Hub's twin documents stop at 10; a body may nest
/// more, but not without end).
pub const MAX_DEPTH: usize = 64;

/// The registry name of the metatable that marks a table as a JSON array.
const ARRAY_MT: &str = "roost.array";
/// The field that metatable holds, which is how a table is recognised as marked.
const ARRAY_FIELD: &str = "__roost_array";

/// The metatable marking arrays, created once per VM.
pub fn array_marker(lua: &Lua) -> mlua::Result<Table> {
    if let Ok(t) = lua.named_registry_value::<Table>(ARRAY_MT) {
        return Ok(t);
    }
    let t = lua.create_table()?;
    t.raw_set(ARRAY_FIELD, true)?;
    lua.set_named_registry_value(ARRAY_MT, &t)?;
    Ok(t)
}

/// JSON to a Lua value. `null` becomes `nil` (a Lua table cannot hold it: the key is absent).
pub fn to_lua(lua: &Lua, v: &Value) -> mlua::Result<Lua_> {
    to_lua_at(lua, v, 0)
}

fn to_lua_at(lua: &Lua, v: &Value, depth: usize) -> mlua::Result<Lua_> {
    if depth > MAX_DEPTH {
        return Err(mlua::Error::RuntimeError("JSON nested too deeply".into()));
    }
    Ok(match v {
        Value::Null => Lua_::Nil,
        Value::Bool(b) => Lua_::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Lua_::Integer(i),
            None => Lua_::Number(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Lua_::String(lua.create_string(s)?),
        Value::Array(items) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, to_lua_at(lua, item, depth + 1)?)?;
            }
            t.set_metatable(Some(array_marker(lua)?))?;
            Lua_::Table(t)
        }
        Value::Object(m) => {
            let t = lua.create_table_with_capacity(0, m.len())?;
            for (k, item) in m {
                t.raw_set(k.as_str(), to_lua_at(lua, item, depth + 1)?)?;
            }
            Lua_::Table(t)
        }
    })
}

/// Why a Lua value has no JSON form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToJsonError {
    #[error("a {0} has no JSON form")]
    Type(&'static str),
    #[error("a table key must be a string, not a {0}")]
    Key(&'static str),
    #[error("a number must be finite")]
    NotFinite,
    #[error("nested more than {MAX_DEPTH} deep (or a table that holds itself)")]
    TooDeep,
}

/// A Lua value as JSON.
pub fn to_json(v: &Lua_) -> Result<Value, ToJsonError> {
    to_json_at(v, 0)
}

fn to_json_at(v: &Lua_, depth: usize) -> Result<Value, ToJsonError> {
    if depth > MAX_DEPTH {
        return Err(ToJsonError::TooDeep);
    }
    Ok(match v {
        Lua_::Nil => Value::Null,
        Lua_::Boolean(b) => Value::Bool(*b),
        Lua_::Integer(i) => Value::Number((*i).into()),
        // A whole float is written as an integer (100.0 -> 100), as JavaScript writes it.
        Lua_::Number(n) if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 => {
            Value::Number((*n as i64).into())
        }
        Lua_::Number(n) => Value::Number(Number::from_f64(*n).ok_or(ToJsonError::NotFinite)?),
        Lua_::String(s) => Value::String(s.to_string_lossy()),
        Lua_::Table(t) => {
            let marked = t
                .metatable()
                .is_some_and(|mt| mt.raw_get::<bool>(ARRAY_FIELD).unwrap_or(false));
            let n = t.raw_len();
            let mut pairs = 0usize;
            let mut sequence = true;
            for pair in t.pairs::<Lua_, Lua_>() {
                let (k, _) = pair.map_err(|_| ToJsonError::Type("table"))?;
                pairs += 1;
                match k {
                    Lua_::Integer(i) if i >= 1 && (i as usize) <= n => {}
                    _ => sequence = false,
                }
            }
            if sequence && (marked || (pairs == n && n > 0)) {
                let mut out = Vec::with_capacity(n);
                for i in 1..=n {
                    let item: Lua_ = t.raw_get(i).map_err(|_| ToJsonError::Type("table"))?;
                    out.push(to_json_at(&item, depth + 1)?);
                }
                Value::Array(out)
            } else {
                let mut out = Map::new();
                for pair in t.pairs::<Lua_, Lua_>() {
                    let (k, item) = pair.map_err(|_| ToJsonError::Type("table"))?;
                    let key = match &k {
                        Lua_::String(s) => s.to_string_lossy(),
                        other => return Err(ToJsonError::Key(other.type_name())),
                    };
                    out.insert(key, to_json_at(&item, depth + 1)?);
                }
                Value::Object(out)
            }
        }
        other => return Err(ToJsonError::Type(other.type_name())),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_round_trips_through_lua_with_empty_arrays_kept() {
        let lua = Lua::new();
        for v in [
            json!({"a": [1, 2.5, "x", true], "b": {"c": []}, "d": {}}),
            json!([]),
            json!([[], [[1]]]),
            json!("s"),
            json!(-3),
        ] {
            let l = to_lua(&lua, &v).expect("to lua");
            assert_eq!(to_json(&l).expect("to json"), v);
        }
        let t: Lua_ = lua.load("return {1, 2}").eval().expect("table");
        assert_eq!(to_json(&t), Ok(json!([1, 2])), "a sequence is an array");
        let t: Lua_ = lua.load("return {1, 2, x = 1}").eval().expect("table");
        assert_eq!(
            to_json(&t),
            Err(ToJsonError::Key("integer")),
            "a mixed table is neither"
        );
    }

    #[test]
    fn what_json_cannot_hold_is_an_error() {
        let lua = Lua::new();
        for (src, want) in [
            ("return function() end", ToJsonError::Type("function")),
            ("return {[true] = 1}", ToJsonError::Key("boolean")),
            ("return 0/0", ToJsonError::NotFinite),
            ("local t = {} t.t = t return t", ToJsonError::TooDeep),
        ] {
            let v: Lua_ = lua.load(src).eval().expect("evaluates");
            assert_eq!(to_json(&v), Err(want), "{src}");
        }
        let deep = (0..100).fold(json!(1), |v, _| json!([v]));
        assert!(to_lua(&lua, &deep).is_err());
    }
}
