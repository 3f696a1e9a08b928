//! `msg` and `device`: what a Lua condition or plugin holds during its call.
//!
//! The handles are made once per VM and reused for every message: the message is moved into a
//! shared slot for the call and out again after, so a call allocates no userdata (DEPENDENCIES.md:
//! a userdata per call costs more than the rule). A handle kept past its call finds the slot empty
//! and gets an error, never another message. Reading `msg.props.level` crosses one string;
//! `msg:json()` decodes the body once per message for every plugin and condition (the decoded
//! JSON is shared with the compiled conditions through [`Slot::body`]).

use std::cell::{OnceCell, RefCell};
use std::rc::Rc;

use mlua::{AnyUserData, Lua, MetaMethod, Table, UserData, UserDataMethods, Value as Lua_};
use roost_model::Message;
use serde_json::Value;

use crate::condition::{body_json, source_name};
use crate::convert;

/// The message being routed and what has been decoded of it.
#[derive(Default)]
pub struct Slot {
    pub msg: Option<Message>,
    /// The sender's twin as the registry view carries it (`DeviceAuth::twin`).
    pub twin: String,
    /// The body as JSON (`None` inside: not JSON), decoded at most once.
    pub body: OnceCell<Option<Value>>,
    lua_json: Option<Table>,
    lua_twin: Option<Table>,
}

impl Slot {
    /// Puts `msg` in for routing; the caches start empty.
    pub fn enter(&mut self, msg: Message, twin: &str) {
        self.msg = Some(msg);
        self.twin.clear();
        self.twin.push_str(twin);
        self.body = OnceCell::new();
        self.lua_json = None;
        self.lua_twin = None;
    }

    /// Takes the message out; handles kept by a script see an empty slot from now on.
    pub fn leave(&mut self) -> Option<Message> {
        self.lua_json = None;
        self.lua_twin = None;
        self.msg.take()
    }
}

pub type Shared = Rc<RefCell<Slot>>;

const GONE: &str = "msg and device are valid only during the call they were passed to";

fn gone() -> mlua::Error {
    mlua::Error::RuntimeError(GONE.into())
}

/// `msg.props`.
struct PropsHandle(Shared);

/// The `device` handle.
pub struct DeviceHandle(Shared);

/// The handles of one VM.
pub struct Handles {
    pub slot: Shared,
    /// `msg`: an empty table. Its metatable's `__index` is a table holding `props` and the
    /// methods, so `msg.props` and `msg:json` are table reads with no call into Rust; that
    /// table's own `__index` reads the other fields from the message in the slot. Writes go
    /// through `__newindex`, which takes only the settable fields.
    pub msg: Table,
    pub device: AnyUserData,
}

impl Handles {
    pub fn new(lua: &Lua) -> mlua::Result<Handles> {
        let slot: Shared = Rc::default();
        let fields = lua.create_table()?;
        fields.raw_set("props", lua.create_userdata(PropsHandle(slot.clone()))?)?;
        fields.raw_set("json", json_method(lua, slot.clone())?)?;
        fields.raw_set("set_json", set_json_method(lua, slot.clone())?)?;
        fields.raw_set("set_body", set_body_method(lua, slot.clone())?)?;
        let dynamic = lua.create_table()?;
        dynamic.raw_set("__index", msg_index(lua, slot.clone())?)?;
        dynamic.raw_set("__metatable", "msg")?;
        fields.set_metatable(Some(dynamic))?;
        let meta = lua.create_table()?;
        meta.raw_set("__index", fields)?;
        meta.raw_set("__newindex", msg_newindex(lua, slot.clone())?)?;
        // getmetatable(msg) answers this, and setmetatable(msg, …) fails.
        meta.raw_set("__metatable", "msg")?;
        let msg = lua.create_table()?;
        msg.set_metatable(Some(meta))?;
        let device = lua.create_userdata(DeviceHandle(slot.clone()))?;
        Ok(Handles { slot, msg, device })
    }

    /// Empties `msg` if a script `rawset` something into it (which would shadow a field for
    /// the next message).
    pub fn reset(&self) -> mlua::Result<()> {
        if self.msg.is_empty() {
            return Ok(());
        }
        let keys: Vec<Lua_> = self
            .msg
            .pairs::<Lua_, Lua_>()
            .filter_map(|kv| kv.ok().map(|(k, _)| k))
            .collect();
        for k in keys {
            self.msg.raw_set(k, Lua_::Nil)?;
        }
        Ok(())
    }
}

fn opt_str(lua: &Lua, s: Option<&str>) -> mlua::Result<Lua_> {
    match s {
        Some(s) => Ok(Lua_::String(lua.create_string(s)?)),
        None => Ok(Lua_::Nil),
    }
}

/// The text of a value a script assigns to a property.
fn text_of(v: &Lua_) -> mlua::Result<Option<String>> {
    Ok(match v {
        Lua_::Nil => None,
        Lua_::String(s) => Some(s.to_str()?.to_string()),
        Lua_::Integer(i) => Some(i.to_string()),
        Lua_::Number(n) => Some(n.to_string()),
        Lua_::Boolean(b) => Some(b.to_string()),
        other => {
            return Err(mlua::Error::RuntimeError(format!(
                "a property is a string, number or boolean, not a {}",
                other.type_name()
            )))
        }
    })
}

/// `msg:json()`: the body as a Lua value, decoded once per message (shared with the compiled
/// conditions); `nil` and why when it is not JSON.
fn json_method(lua: &Lua, slot: Shared) -> mlua::Result<mlua::Function> {
    lua.create_function(move |lua, _this: Lua_| {
        let mut slot = slot.borrow_mut();
        if let Some(t) = &slot.lua_json {
            return Ok((Lua_::Table(t.clone()), Lua_::Nil));
        }
        let slot = &mut *slot;
        let msg = slot.msg.as_ref().ok_or_else(gone)?;
        let Some(v) = slot.body.get_or_init(|| body_json(msg)) else {
            let why = lua.create_string(
                "the body is not JSON (content type application/json, encoding UTF-8, -16 or -32)",
            )?;
            return Ok((Lua_::Nil, Lua_::String(why)));
        };
        let t = match convert::to_lua(lua, v)? {
            Lua_::Table(t) => t,
            other => return Ok((other, Lua_::Nil)),
        };
        slot.lua_json = Some(t.clone());
        Ok((Lua_::Table(t), Lua_::Nil))
    })
}

/// `msg:set_json(v)`: the body becomes `v` as JSON (UTF-8, application/json).
fn set_json_method(lua: &Lua, slot: Shared) -> mlua::Result<mlua::Function> {
    lua.create_function(move |_, (_this, v): (Lua_, Lua_)| {
        let json = convert::to_json(&v)
            .map_err(|e| mlua::Error::RuntimeError(format!("set_json: {e}")))?;
        let mut slot = slot.borrow_mut();
        let msg = slot.msg.as_mut().ok_or_else(gone)?;
        msg.body =
            serde_json::to_vec(&json).map_err(|e| mlua::Error::RuntimeError(e.to_string()))?;
        msg.system.content_type = Some("application/json".into());
        msg.system.content_encoding = Some("utf-8".into());
        slot.body = OnceCell::from(Some(json));
        slot.lua_json = match v {
            Lua_::Table(t) => Some(t),
            _ => None,
        };
        Ok(())
    })
}

/// `msg:set_body(bytes)`.
fn set_body_method(lua: &Lua, slot: Shared) -> mlua::Result<mlua::Function> {
    lua.create_function(move |_, (_this, body): (Lua_, mlua::LuaString)| {
        let mut slot = slot.borrow_mut();
        let msg = slot.msg.as_mut().ok_or_else(gone)?;
        msg.body = body.as_bytes().to_vec();
        slot.body = OnceCell::new();
        slot.lua_json = None;
        Ok(())
    })
}

/// `msg.<field>` other than the raw ones.
fn msg_index(lua: &Lua, slot: Shared) -> mlua::Result<mlua::Function> {
    lua.create_function(move |lua, (_this, key): (Lua_, mlua::LuaString)| {
        let slot = slot.borrow();
        let msg = slot.msg.as_ref().ok_or_else(gone)?;
        let s = &msg.system;
        match &*key.to_str()? {
            "body" => Ok(Lua_::String(lua.create_string(&msg.body)?)),
            "source" => opt_str(lua, Some(source_name(msg.source))),
            "device_id" => opt_str(lua, Some(&s.connection_device_id)),
            "module_id" => opt_str(lua, s.connection_module_id.as_deref()),
            "content_type" => opt_str(lua, s.content_type.as_deref()),
            "content_encoding" => opt_str(lua, s.content_encoding.as_deref()),
            "message_id" => opt_str(lua, s.message_id.as_deref()),
            "correlation_id" => opt_str(lua, s.correlation_id.as_deref()),
            "user_id" => opt_str(lua, s.user_id.as_deref()),
            "enqueued_ms" => Ok(Lua_::Integer(msg.enqueued_ms as i64)),
            _ => Ok(Lua_::Nil),
        }
    })
}

/// `msg.<field> = v`: the settable system properties; anything else is an error.
fn msg_newindex(lua: &Lua, slot: Shared) -> mlua::Result<mlua::Function> {
    lua.create_function(move |_, (_this, key, v): (Lua_, mlua::LuaString, Lua_)| {
        let mut slot = slot.borrow_mut();
        let msg = slot.msg.as_mut().ok_or_else(gone)?;
        let v = text_of(&v)?;
        let s = &mut msg.system;
        match &*key.to_str()? {
            "content_type" => s.content_type = v,
            "content_encoding" => s.content_encoding = v,
            "message_id" => s.message_id = v,
            "correlation_id" => s.correlation_id = v,
            other => {
                return Err(mlua::Error::RuntimeError(format!(
                    "msg.{other} cannot be set (settable: content_type, content_encoding, message_id, correlation_id; properties in msg.props; the body with msg:set_body or msg:set_json)"
                )))
            }
        }
        slot.body = OnceCell::new();
        slot.lua_json = None;
        Ok(())
    })
}

impl UserData for PropsHandle {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_meta_method(MetaMethod::Index, |lua, this, key: mlua::LuaString| {
            let slot = this.0.borrow();
            let msg = slot.msg.as_ref().ok_or_else(gone)?;
            let key = key.as_bytes();
            match msg.app.iter().find(|(k, _)| k.as_bytes() == &key[..]) {
                Some((_, v)) => Ok(Lua_::String(lua.create_string(v)?)),
                None => Ok(Lua_::Nil),
            }
        });
        m.add_meta_method(
            MetaMethod::NewIndex,
            |_, this, (key, v): (mlua::LuaString, Lua_)| {
                let mut slot = this.0.borrow_mut();
                let msg = slot.msg.as_mut().ok_or_else(gone)?;
                let key = key.to_str()?.to_string();
                let at = msg.app.iter().position(|(k, _)| *k == key);
                match (text_of(&v)?, at) {
                    (Some(v), Some(i)) => msg.app[i].1 = v,
                    (Some(v), None) => msg.app.push((key, v)),
                    (None, Some(i)) => {
                        msg.app.remove(i);
                    }
                    (None, None) => {}
                }
                Ok(())
            },
        );
        // `pairs(msg.props)`: a snapshot of the properties as a table.
        m.add_meta_method(MetaMethod::Pairs, |lua, this, ()| {
            let slot = this.0.borrow();
            let msg = slot.msg.as_ref().ok_or_else(gone)?;
            let t = lua.create_table_with_capacity(0, msg.app.len())?;
            for (k, v) in &msg.app {
                t.raw_set(k.as_str(), v.as_str())?;
            }
            let next: mlua::Function = lua.globals().get("next")?;
            Ok((next, t, Lua_::Nil))
        });
    }
}

impl UserData for DeviceHandle {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_meta_method(MetaMethod::Index, |lua, this, key: mlua::LuaString| {
            let mut slot = this.0.borrow_mut();
            let slot = &mut *slot;
            let msg = slot.msg.as_ref().ok_or_else(gone)?;
            match &*key.to_str()? {
                "id" => opt_str(lua, Some(&msg.system.connection_device_id)),
                "module" => opt_str(lua, msg.system.connection_module_id.as_deref()),
                part @ ("tags" | "properties") => {
                    let twin = match &slot.lua_twin {
                        Some(t) => t.clone(),
                        None => {
                            let twin: Value = serde_json::from_str(&slot.twin)
                                .unwrap_or(Value::Object(Default::default()));
                            let t = match convert::to_lua(lua, &twin)? {
                                Lua_::Table(t) => t,
                                _ => lua.create_table()?,
                            };
                            // Always tables, so `device.properties.reported.x` is nil, not
                            // an error, for a device with nothing in its twin.
                            let table = |parent: &Table, k: &str| -> mlua::Result<Table> {
                                match parent.raw_get::<Lua_>(k)? {
                                    Lua_::Table(t) => Ok(t),
                                    _ => {
                                        let fresh = lua.create_table()?;
                                        parent.raw_set(k, fresh.clone())?;
                                        Ok(fresh)
                                    }
                                }
                            };
                            table(&t, "tags")?;
                            let properties = table(&t, "properties")?;
                            table(&properties, "desired")?;
                            table(&properties, "reported")?;
                            slot.lua_twin = Some(t.clone());
                            t
                        }
                    };
                    twin.raw_get::<Lua_>(part)
                }
                _ => Ok(Lua_::Nil),
            }
        });
    }
}
