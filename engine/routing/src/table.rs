//! [`Routing`]: one epoch's routes, plugins and enrichments, loaded into one VM, and the routing
//! of one message through them.
//!
//! A shard builds one per epoch (control builds one to check an epoch before pushing it; so does
//! `roost routes check`): every check runs at load, so a `Routing` that exists can route. For
//! each message, [`Routing::route`] runs the source's plugins in order, then every enabled route
//! of the source, and answers the set of endpoints matched (the fallback's when none matched,
//! for telemetry) and the enrichments each of them gets. The message is moved into the VM's slot
//! for the duration, so the Lua handles can reach it without a userdata per call.

use std::cell::OnceCell;
use std::time::Instant;

use mlua::{Function, Lua, Table, UserData, Value as Lua_};
use roost_model::Message;
use serde_json::Value;

use crate::condition::Subject;
use crate::config::{
    self, ConfigError, EnrichValue, OnError, PluginUse, RouteSource, RoutesConfig, When,
};
use crate::convert;
use crate::handles::Handles;
use crate::sandbox::{error_code, error_text, Limits, Vm};
use crate::schema::Schema;

/// The hooks a plugin module may define, with the parameters each takes.
pub const HOOKS: [(&str, u8); 3] = [("init", 1), ("on_message", 4), ("on_provision", 3)];

/// The labels a plugin failure is counted under.
pub const PLUGIN_ERRORS: [&str; 8] = [
    "runtime",
    "budget",
    "memory",
    "type",
    "stale_handle",
    "verdict",
    "syntax",
    "other",
];

/// What to do with a message once its plugins have run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Store it for the endpoints in the outcome (none: dropped as unrouted, counted).
    Route,
    /// A plugin dropped it (plugin index).
    Drop(usize),
    /// A plugin refused it: the protocol tells the sender where it can.
    Reject {
        plugin: usize,
        code: String,
        why: String,
    },
}

/// An application property an enrichment adds for some of the message's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub endpoints: u64,
    pub key: String,
    pub value: String,
}

/// Where one message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// Bit `i`: endpoint `i` of the configuration.
    pub endpoints: u64,
    /// Bit `i`: route `i` matched.
    pub routes: u128,
    pub stamps: Vec<Stamp>,
}

/// Counters of one `Routing` (one shard), read by the engine's metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Per route, in configuration order.
    pub matches: Vec<u64>,
    /// Lua conditions that failed (counted as no match), per route.
    pub condition_errors: Vec<u64>,
    pub fallback: u64,
    /// Messages that matched nothing and had no fallback.
    pub unrouted: u64,
    pub plugins: Vec<PluginStats>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginStats {
    pub runs: u64,
    pub drops: u64,
    pub rejects: u64,
    /// Per [`PLUGIN_ERRORS`] label.
    pub errors: [u64; PLUGIN_ERRORS.len()],
    pub nanos: u64,
}

/// A plugin as loaded for one use in `routes.lua`, with the hook that use calls
/// (`on_message` for the message pipeline, `on_provision` for provisioning).
struct Plugin {
    usage: PluginUse,
    hook: Function,
    conf: Table,
    state: Lua_,
}

/// Why the provisioning hook gave no allocation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProvisionError {
    #[error("routes.lua names no provisioning plugin")]
    NotConfigured,
    /// The hook failed: a [`PLUGIN_ERRORS`] label and what Lua said.
    #[error("the provisioning plugin failed ({code}): {message}")]
    Failed { code: &'static str, message: String },
}

/// The sources of an epoch: `routes.lua` and the plugins' files by path
/// (`"name/handler.lua"`, `"name/schema.lua"`), as the epoch carries them.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    pub routes_file: &'a str,
    pub routes: &'a str,
    pub plugins: &'a [(String, String)],
}

/// What a load may use, and the hub's name for `$iothubname`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Limits,
    pub hub_name: String,
}

/// A loaded epoch.
pub struct Routing {
    vm: Vm,
    handles: Handles,
    config: RoutesConfig,
    plugins: Vec<Plugin>,
    /// The provisioning plugin, if `routes.lua` names one.
    provisioner: Option<Plugin>,
    /// Whether any Lua runs per message (plugins or Lua conditions).
    lua: bool,
    hub_name: String,
    stats: Stats,
}

/// `hub.reject(code, why)`'s value.
struct Rejection {
    code: String,
    why: String,
}

impl UserData for Rejection {}

fn plugin_file<'a>(sources: &'a Sources<'_>, name: &str, file: &str) -> Option<&'a str> {
    let path = format!("{name}/{file}");
    sources
        .plugins
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, s)| s.as_str())
}

/// A Lua error as a configuration error in `file`, with the line Lua put in its message.
fn lua_error(file: &str, e: &mlua::Error) -> ConfigError {
    let text = error_text(e);
    let (line, message) = split_line(file, &text);
    ConfigError {
        file: file.to_string(),
        line,
        message,
    }
}

/// `"routes.lua:12: message"` → `(Some(12), "message")`.
fn split_line(file: &str, text: &str) -> (Option<u32>, String) {
    if let Some(rest) = text.strip_prefix(file).and_then(|r| r.strip_prefix(':')) {
        if let Some((n, msg)) = rest.split_once(':') {
            if let Ok(n) = n.parse() {
                return (Some(n), msg.trim().to_string());
            }
        }
    }
    (None, text.to_string())
}

impl Routing {
    /// Loads an epoch: evaluates `routes.lua`, checks it, loads each plugin it uses (schema,
    /// config, hooks and their arity) and runs each plugin's `init(conf)`.
    pub fn load(sources: Sources<'_>, settings: Settings) -> Result<Routing, ConfigError> {
        let file = sources.routes_file;
        let vm = Vm::new(settings.limits).map_err(|e| lua_error(file, &e))?;
        let lua = &vm.lua;
        let handles = Handles::new(lua).map_err(|e| lua_error(file, &e))?;
        install_hub(lua, &settings.hub_name).map_err(|e| lua_error(file, &e))?;

        vm.arm();
        let root: Lua_ = lua
            .load(sources.routes)
            .set_name(format!("@{file}"))
            .eval()
            .map_err(|e| lua_error(file, &e))?;
        let config = config::read(file, sources.routes, root)?;

        let mut plugins = Vec::new();
        for usage in &config.plugins {
            plugins.push(load_plugin(&vm, &sources, usage, "on_message")?);
        }
        let provisioner = match &config.provisioning {
            Some(usage) => Some(load_plugin(&vm, &sources, usage, "on_provision")?),
            None => None,
        };
        let lua_conditions = config.routes.iter().any(|r| matches!(r.when, When::Lua(_)));
        let stats = Stats {
            matches: vec![0; config.routes.len()],
            condition_errors: vec![0; config.routes.len()],
            plugins: vec![PluginStats::default(); plugins.len()],
            ..Stats::default()
        };
        Ok(Routing {
            lua: lua_conditions || !plugins.is_empty(),
            vm,
            handles,
            config,
            plugins,
            provisioner,
            hub_name: settings.hub_name,
            stats,
        })
    }

    /// [`Routing::load`] of `routes` (named `file` in errors) and `plugins` with the default
    /// limits: how the engine, control and the command line load an epoch.
    pub fn load_with_defaults(
        file: &str,
        routes: &str,
        plugins: &[(String, String)],
        hub_name: &str,
    ) -> Result<Routing, ConfigError> {
        Routing::load(
            Sources {
                routes_file: file,
                routes,
                plugins,
            },
            Settings {
                limits: Limits::default(),
                hub_name: hub_name.to_string(),
            },
        )
    }

    pub fn config(&self) -> &RoutesConfig {
        &self.config
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Runs the provisioning plugin's `on_provision(request, conf, state)` under the VM's
    /// limits: `request` is the registration (a JSON object, as a Lua table). The hook answers
    /// a table — the allocation (`Some`) — or `nil`: the registration is refused (`None`).
    pub fn provision(&mut self, request: &Value) -> Result<Option<Value>, ProvisionError> {
        let Some(p) = &self.provisioner else {
            return Err(ProvisionError::NotConfigured);
        };
        let failed = |e: &mlua::Error| ProvisionError::Failed {
            code: error_code(e),
            message: error_text(e),
        };
        self.vm.arm();
        let request = convert::to_lua(&self.vm.lua, request).map_err(|e| failed(&e))?;
        self.vm.arm();
        match p.hook.call::<Lua_>((request, &p.conf, &p.state)) {
            Ok(Lua_::Nil) => Ok(None),
            Ok(v @ Lua_::Table(_)) => convert::to_json(&v).map(Some).map_err(|e| {
                ProvisionError::Failed {
                    code: "verdict",
                    message: format!("on_provision answered what is not data: {e}"),
                }
            }),
            Ok(other) => Err(ProvisionError::Failed {
                code: "verdict",
                message: format!("on_provision answers a table or nil, not a {}", other.type_name()),
            }),
            Err(e) => Err(failed(&e)),
        }
    }

    /// The names of the endpoints in `mask`.
    pub fn endpoint_names(&self, mask: u64) -> impl Iterator<Item = &str> {
        self.config
            .endpoints
            .iter()
            .enumerate()
            .filter(move |(i, _)| mask & (1 << i) != 0)
            .map(|(_, e)| e.name.as_str())
    }

    /// Whether routing reads the sender's twin: a `$twin` condition or enrichment, or any Lua
    /// (a plugin or condition may read `device.tags` or `device.properties`). Otherwise the
    /// caller may pass no twin.
    pub fn reads_twin(&self) -> bool {
        self.lua
            || self
                .config
                .routes
                .iter()
                .any(|r| matches!(&r.when, When::Query(c) if c.reads_twin()))
            || self
                .config
                .enrichments
                .iter()
                .any(|e| matches!(e.value, EnrichValue::Twin(_)))
    }

    /// The names of the routes in `bits` (an [`Outcome::routes`]).
    pub fn route_names(&self, bits: u128) -> impl Iterator<Item = &str> {
        self.config
            .routes
            .iter()
            .enumerate()
            .filter(move |(i, _)| bits & (1 << i) != 0)
            .map(|(_, r)| r.name.as_str())
    }

    /// Memory the VM holds now, in bytes.
    pub fn lua_memory(&self) -> usize {
        self.vm.lua.used_memory()
    }

    /// Routes `msg`, which plugins may change in place. `twin` is what routing sees of the
    /// sender's twin, from the registry view (`DeviceAuth::twin`; empty: nothing).
    pub fn route(&mut self, msg: &mut Message, twin: &str) -> Outcome {
        let source = RouteSource::of(msg.source);
        if !self.lua {
            // hot path: no Lua in this epoch; the message is read where it is.
            let body = OnceCell::new();
            let (mask, routes) = self.match_routes(source, Some(&Subject::new(msg, twin, &body)));
            return self.finish(mask, routes, source, twin);
        }
        let placeholder = Message {
            source: msg.source,
            enqueued_ms: 0,
            system: Default::default(),
            app: Vec::new(),
            body: Vec::new(),
        };
        let owned = std::mem::replace(msg, placeholder);
        // What a script rawset into `msg` goes (writes cannot fail short of the VM's memory
        // limit, and then the scripts fail on their own).
        let _ = self.handles.reset();
        self.handles.slot.borrow_mut().enter(owned, twin);
        let outcome = match self.run_plugins(source) {
            Verdict::Route => {
                let (mask, routes) = self.match_routes(source, None);
                self.finish(mask, routes, source, twin)
            }
            verdict => Outcome {
                verdict,
                endpoints: 0,
                routes: 0,
                stamps: Vec::new(),
            },
        };
        if let Some(back) = self.handles.slot.borrow_mut().leave() {
            *msg = back;
        }
        outcome
    }

    /// The endpoints of the enabled routes of `source` that match. Compiled conditions read
    /// `direct` when given, else the message in the slot (where Lua can reach it).
    fn match_routes(&mut self, source: RouteSource, direct: Option<&Subject<'_>>) -> (u64, u128) {
        let mut mask = 0u64;
        let mut routes = 0u128;
        for (i, r) in self.config.routes.iter().enumerate() {
            if !r.enabled || r.source != source {
                continue;
            }
            let hit = match &r.when {
                When::Always => true,
                When::Never => false,
                When::Query(c) => match direct {
                    Some(s) => c.matches(s),
                    None => {
                        let slot = self.handles.slot.borrow();
                        slot.msg
                            .as_ref()
                            .is_some_and(|m| c.matches(&Subject::new(m, &slot.twin, &slot.body)))
                    }
                },
                When::Lua(f) => {
                    self.vm.arm();
                    match f.call::<Lua_>((&self.handles.msg, &self.handles.device)) {
                        Ok(v) => !matches!(v, Lua_::Nil | Lua_::Boolean(false)),
                        Err(_) => {
                            self.stats.condition_errors[i] += 1;
                            false
                        }
                    }
                }
            };
            if hit {
                self.stats.matches[i] += 1;
                routes |= 1 << i;
                for &e in &r.endpoints {
                    mask |= 1 << e;
                }
            }
        }
        (mask, routes)
    }

    /// The fallback when nothing matched (telemetry only, as IoT Hub), then the enrichments.
    fn finish(&mut self, mut mask: u64, routes: u128, source: RouteSource, twin: &str) -> Outcome {
        if mask == 0 {
            match (&self.config.fallback, source) {
                (Some(f), RouteSource::Telemetry) => {
                    self.stats.fallback += 1;
                    for &e in f {
                        mask |= 1 << e;
                    }
                }
                _ => self.stats.unrouted += 1,
            }
        }
        let mut stamps = Vec::new();
        // The twin is parsed once for every `$twin` enrichment of the message.
        let parsed: OnceCell<Option<Value>> = OnceCell::new();
        for en in &self.config.enrichments {
            let endpoints = en.endpoints.iter().fold(0u64, |m, &e| m | 1 << e) & mask;
            if endpoints == 0 {
                continue;
            }
            let value = match &en.value {
                EnrichValue::Literal(s) => s.clone(),
                EnrichValue::HubName => self.hub_name.clone(),
                EnrichValue::Twin(path) => twin_value(
                    parsed
                        .get_or_init(|| serde_json::from_str(twin).ok())
                        .as_ref(),
                    path,
                ),
            };
            stamps.push(Stamp {
                endpoints,
                key: en.key.clone(),
                value,
            });
        }
        Outcome {
            verdict: Verdict::Route,
            endpoints: mask,
            routes,
            stamps,
        }
    }

    /// Runs the plugins of `source` in order over the message in the slot.
    fn run_plugins(&mut self, source: RouteSource) -> Verdict {
        for (i, p) in self.plugins.iter().enumerate() {
            if !p.usage.sources.contains(&source) {
                continue;
            }
            let st = &mut self.stats.plugins[i];
            st.runs += 1;
            self.vm.arm();
            let started = Instant::now();
            let result = p.hook.call::<Lua_>((
                &self.handles.msg,
                &self.handles.device,
                &p.conf,
                &p.state,
            ));
            st.nanos += started.elapsed().as_nanos() as u64;
            let failed = match result {
                Ok(Lua_::Nil) => None,
                Ok(Lua_::String(s)) if s.as_bytes().as_ref() == b"drop" => {
                    st.drops += 1;
                    return Verdict::Drop(i);
                }
                Ok(Lua_::UserData(ud)) if ud.is::<Rejection>() => {
                    st.rejects += 1;
                    let (code, why) = ud
                        .borrow::<Rejection>()
                        .map(|r| (r.code.clone(), r.why.clone()))
                        .unwrap_or_default();
                    return Verdict::Reject {
                        plugin: i,
                        code,
                        why,
                    };
                }
                Ok(_) => Some("verdict"),
                Err(e) => Some(error_code(&e)),
            };
            if let Some(code) = failed {
                let at = PLUGIN_ERRORS
                    .iter()
                    .position(|c| *c == code)
                    .unwrap_or(PLUGIN_ERRORS.len() - 1);
                st.errors[at] += 1;
                match p.usage.on_error {
                    OnError::Skip => {}
                    OnError::Drop => return Verdict::Drop(i),
                    OnError::Reject => {
                        return Verdict::Reject {
                            plugin: i,
                            code: "plugin_error".into(),
                            why: format!("plugin {} failed ({code})", p.usage.name),
                        }
                    }
                }
            }
        }
        Verdict::Route
    }
}

/// The value of `$twin.tags.a.b` or `$twin.properties.reported.a` for an enrichment: a string
/// as it is, another value as JSON, and, as IoT Hub does, the placeholder's own text when the
/// twin has no such value.
fn twin_value(twin: Option<&Value>, path: &[String]) -> String {
    let found = path
        .iter()
        .try_fold(twin, |v, k| Some(v?.get(k.as_str())))
        .flatten();
    match found {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => format!("$twin.{}", path.join(".")),
        Some(other) => other.to_string(),
    }
}

/// Helpers in Lua, for plugins: `hub.path_get(t, "a.b.1")` and `hub.path_set(t, "a.b", v)` walk a
/// decoded body by a dotted path (a number indexes an array, from 1); `path_set` makes the
/// missing tables on its way and does nothing where a part is not a table.
const HUB_PRELUDE: &str = r#"
local function parts(path)
  local out = {}
  for p in string.gmatch(path, "[^.]+") do out[#out + 1] = math.tointeger(tonumber(p)) or p end
  return out
end
function hub.path_get(t, path)
  for _, k in ipairs(parts(path)) do
    if type(t) ~= "table" then return nil end
    t = t[k]
  end
  return t
end
function hub.path_set(t, path, v)
  local ks = parts(path)
  for i = 1, #ks - 1 do
    if type(t) ~= "table" then return end
    if t[ks[i]] == nil then t[ks[i]] = {} end
    t = t[ks[i]]
  end
  if type(t) == "table" and #ks > 0 then t[ks[#ks]] = v end
end
"#;

/// The `hub` table scripts see: `hub.reject(code, why)`, `hub.name` and the path helpers.
fn install_hub(lua: &Lua, hub_name: &str) -> mlua::Result<()> {
    let hub = lua.create_table()?;
    hub.set(
        "reject",
        lua.create_function(|lua, (code, why): (Lua_, Option<String>)| {
            let code = match code {
                Lua_::Integer(i) => i.to_string(),
                Lua_::String(s) => s.to_str()?.to_string(),
                other => {
                    return Err(mlua::Error::RuntimeError(format!(
                        "hub.reject(code, why): code is a number or a string, not a {}",
                        other.type_name()
                    )))
                }
            };
            if code.is_empty() || code.len() > 64 {
                return Err(mlua::Error::RuntimeError(
                    "hub.reject: code is 1 to 64 characters".into(),
                ));
            }
            let mut why = why.unwrap_or_default();
            why.truncate(why.floor_char_boundary(1024));
            lua.create_userdata(Rejection { code, why })
        })?,
    )?;
    hub.set("name", hub_name)?;
    lua.globals().set("hub", hub.clone())?;
    lua.load(HUB_PRELUDE).set_name("=hub").exec()?;
    Ok(())
}

/// Loads one use of a plugin: its schema, the checked config, the handler and its hooks, and
/// runs `init(conf)`.
fn load_plugin(
    vm: &Vm,
    sources: &Sources<'_>,
    usage: &PluginUse,
    required: &str,
) -> Result<Plugin, ConfigError> {
    let lua = &vm.lua;
    let name = &usage.name;
    let handler_file = format!("plugins/{name}/handler.lua");
    let schema_file = format!("plugins/{name}/schema.lua");
    let err = |file: &str, line: Option<u32>, message: String| ConfigError {
        file: file.to_string(),
        line,
        message,
    };
    let handler = plugin_file(sources, name, "handler.lua").ok_or_else(|| {
        err(
            sources.routes_file,
            None,
            format!("plugin {name:?}: {handler_file} not found"),
        )
    })?;
    let schema_src = plugin_file(sources, name, "schema.lua").ok_or_else(|| {
        err(
            sources.routes_file,
            None,
            format!("plugin {name:?}: {schema_file} not found"),
        )
    })?;

    // The schema is data: evaluated with nothing in scope, so it can call nothing.
    vm.arm();
    let empty = lua
        .create_table()
        .map_err(|e| lua_error(&schema_file, &e))?;
    let schema_value: Lua_ = lua
        .load(schema_src)
        .set_name(format!("@{schema_file}"))
        .set_environment(empty)
        .eval()
        .map_err(|e| lua_error(&schema_file, &e))?;
    let schema_json = convert::to_json(&schema_value)
        .map_err(|e| err(&schema_file, None, format!("schema.lua is data only: {e}")))?;
    let schema = Schema::from_json(&schema_json).map_err(|m| err(&schema_file, None, m))?;
    let conf = schema
        .apply(&usage.config)
        .map_err(|m| err(sources.routes_file, None, format!("plugin {name:?}: {m}")))?;

    // The handler gets globals of its own (reads fall through to the shared ones).
    let env = lua
        .create_table()
        .map_err(|e| lua_error(&handler_file, &e))?;
    let meta = lua
        .create_table()
        .map_err(|e| lua_error(&handler_file, &e))?;
    meta.set("__index", lua.globals())
        .map_err(|e| lua_error(&handler_file, &e))?;
    env.set_metatable(Some(meta))
        .map_err(|e| lua_error(&handler_file, &e))?;
    vm.arm();
    let module: Lua_ = lua
        .load(handler)
        .set_name(format!("@{handler_file}"))
        .set_environment(env)
        .eval()
        .map_err(|e| lua_error(&handler_file, &e))?;
    let Lua_::Table(module) = module else {
        return Err(err(
            &handler_file,
            None,
            format!("must return a table of hooks, not a {}", module.type_name()),
        ));
    };
    let mut hooks: Vec<(String, Function)> = Vec::new();
    for pair in module.pairs::<Lua_, Lua_>() {
        let (k, v) = pair.map_err(|e| lua_error(&handler_file, &e))?;
        let key = match &k {
            Lua_::String(s) => s.to_string_lossy(),
            other => {
                return Err(err(
                    &handler_file,
                    None,
                    format!("hooks are named by strings, not a {}", other.type_name()),
                ))
            }
        };
        let Some((_, arity)) = HOOKS.iter().find(|(h, _)| *h == key) else {
            let known: Vec<&str> = HOOKS.iter().map(|(h, _)| *h).collect();
            return Err(err(
                &handler_file,
                None,
                format!("unknown hook {key:?} (hooks: {})", known.join(", ")),
            ));
        };
        let Lua_::Function(f) = v else {
            return Err(err(
                &handler_file,
                None,
                format!("{key} must be a function"),
            ));
        };
        let info = f.info();
        if info.num_params != *arity && !info.is_vararg {
            return Err(err(
                &handler_file,
                info.line_defined.map(|l| l as u32),
                format!("{key} takes {arity} parameters, not {}", info.num_params),
            ));
        }
        hooks.push((key, f));
    }
    let hook = |n: &str| hooks.iter().find(|(h, _)| h == n).map(|(_, f)| f.clone());
    let called = hook(required)
        .ok_or_else(|| err(&handler_file, None, format!("{required} is missing")))?;
    let conf = match convert::to_lua(lua, &conf).map_err(|e| lua_error(&handler_file, &e))? {
        Lua_::Table(t) => t,
        _ => lua
            .create_table()
            .map_err(|e| lua_error(&handler_file, &e))?,
    };
    let state = match hook("init") {
        None => Lua_::Table(
            lua.create_table()
                .map_err(|e| lua_error(&handler_file, &e))?,
        ),
        Some(init) => {
            vm.arm();
            match init
                .call::<Lua_>(&conf)
                .map_err(|e| lua_error(&handler_file, &e))?
            {
                Lua_::Nil => Lua_::Table(
                    lua.create_table()
                        .map_err(|e| lua_error(&handler_file, &e))?,
                ),
                v => v,
            }
        }
    };
    Ok(Plugin {
        usage: usage.clone(),
        hook: called,
        conf,
        state,
    })
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
