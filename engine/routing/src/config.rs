//! `routes.lua`: evaluated in the sandbox, read into [`RoutesConfig`], every key checked.
//!
//! The file returns one table (DESIGN.md §5): `endpoints`, `plugins`, `routes`, `fallback`,
//! `enrichments`. Anything else, an unknown key anywhere, a route naming an endpoint nobody
//! declared, a condition that does not compile: an error with the line it is on
//! ([`crate::locate`]). The built-in endpoint `events` always exists; declaring it is allowed.
//! A Lua condition stays a function of the VM that evaluated the file, so each shard loads the
//! file into its own VM; control checks with the same code.

use mlua::{Function, Table, Value as Lua_};
use serde_json::Value;

use crate::condition::Condition;
use crate::convert;
use crate::locate::Locator;

/// The name of the built-in endpoint, the `events` log.
pub const BUILTIN: &str = "events";
/// Most routes IoT Hub takes (paid tiers); roost keeps the bound.
pub const MAX_ROUTES: usize = 100;
/// Most endpoints, the built-in one included: a message's endpoint set is one `u64`.
pub const MAX_ENDPOINTS: usize = 64;
/// Most enrichments (IoT Hub: 10).
pub const MAX_ENRICHMENTS: usize = 10;

/// Where a route takes its messages from (wire spec §6, by `routes.lua`'s names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteSource {
    Telemetry,
    TwinChange,
    Lifecycle,
    ConnectionState,
    FileUpload,
    JobLifecycle,
}

impl RouteSource {
    pub const ALL: [(&'static str, RouteSource); 6] = [
        ("telemetry", RouteSource::Telemetry),
        ("twin_change", RouteSource::TwinChange),
        ("lifecycle", RouteSource::Lifecycle),
        ("connection_state", RouteSource::ConnectionState),
        ("file_upload", RouteSource::FileUpload),
        ("job_lifecycle", RouteSource::JobLifecycle),
    ];

    pub fn named(s: &str) -> Option<RouteSource> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, v)| *v)
    }

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, v)| *v == self)
            .map_or("telemetry", |(n, _)| n)
    }

    pub fn of(s: roost_model::Source) -> RouteSource {
        match s {
            roost_model::Source::Telemetry => RouteSource::Telemetry,
            roost_model::Source::TwinChangeEvents => RouteSource::TwinChange,
            roost_model::Source::DeviceLifecycleEvents => RouteSource::Lifecycle,
            roost_model::Source::DeviceConnectionStateEvents => RouteSource::ConnectionState,
            roost_model::Source::FileUploadNotifications => RouteSource::FileUpload,
        }
    }
}

/// An endpoint and what feeds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub name: String,
    pub kind: EndpointKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EndpointKind {
    /// The `events` log itself.
    Builtin,
    /// HTTP POST of a JSON array of messages.
    Webhook {
        url: String,
        /// Most messages in one POST.
        batch: usize,
        timeout_ms: u64,
        headers: Vec<(String, String)>,
    },
    /// Newline-delimited JSON files, rotated by size.
    File {
        path: String,
        max_bytes: u64,
        max_files: u32,
    },
    /// NATS JetStream publish, acknowledged by the stream.
    Nats { url: String, subject: String },
    /// Republish to an external MQTT broker.
    Mqtt {
        url: String,
        topic: String,
        qos: u8,
        client_id: Option<String>,
    },
}

impl EndpointKind {
    pub fn label(&self) -> &'static str {
        match self {
            EndpointKind::Builtin => "builtin",
            EndpointKind::Webhook { .. } => "webhook",
            EndpointKind::File { .. } => "file",
            EndpointKind::Nats { .. } => "nats",
            EndpointKind::Mqtt { .. } => "mqtt",
        }
    }
}

/// A route's condition.
#[derive(Debug, Clone)]
pub enum When {
    /// `true`: every message of the source, nothing evaluated.
    Always,
    /// `false`: none (a route kept but switched off by its condition).
    Never,
    Query(Condition),
    /// A Lua function `(msg, device)` of the VM that loaded the file.
    Lua(Function),
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub source: RouteSource,
    pub when: When,
    /// Indexes into [`RoutesConfig::endpoints`].
    pub endpoints: Vec<usize>,
    pub enabled: bool,
}

/// What an enrichment stamps.
#[derive(Debug, Clone, PartialEq)]
pub enum EnrichValue {
    Literal(String),
    /// `$iothubname`.
    HubName,
    /// `$twin.tags.a.b`, `$twin.properties.reported.a`: the path after `$twin` (its first
    /// part `tags` or `properties`, then `desired` or `reported`).
    Twin(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Enrichment {
    pub key: String,
    pub value: EnrichValue,
    pub endpoints: Vec<usize>,
}

/// What a plugin does when its step fails (an error, the budget, the memory limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// The message goes on as if the plugin had returned `nil` (its changes kept).
    Skip,
    Drop,
    Reject,
}

/// A plugin as `routes.lua` uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginUse {
    pub name: String,
    pub config: Value,
    pub on_error: OnError,
    pub sources: Vec<RouteSource>,
}

#[derive(Debug, Clone)]
pub struct RoutesConfig {
    /// `events` first, then the declared ones in name order.
    pub endpoints: Vec<Endpoint>,
    pub plugins: Vec<PluginUse>,
    /// The plugin whose `on_provision` allocates registrations of `custom` enrollments
    /// (`provisioning = { use = …, config = … }`).
    pub provisioning: Option<PluginUse>,
    pub routes: Vec<Route>,
    /// `None`: the fallback route is disabled.
    pub fallback: Option<Vec<usize>>,
    pub enrichments: Vec<Enrichment>,
}

impl RoutesConfig {
    pub fn endpoint(&self, name: &str) -> Option<usize> {
        self.endpoints.iter().position(|e| e.name == name)
    }
}

/// A configuration error, placed in its file when the source says where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<u32>,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Reads the table `routes.lua` returned. `src` is its source, for placing errors.
pub fn read(file: &str, src: &str, root: Lua_) -> Result<RoutesConfig, ConfigError> {
    let r = Reader {
        file,
        at: Locator::new(src),
    };
    let Lua_::Table(root) = root else {
        return Err(r.err(
            None,
            format!("must return a table, not a {}", root.type_name()),
        ));
    };
    let top = r.fields(
        &root,
        1,
        "the returned table",
        &["endpoints", "plugins", "routes", "fallback", "enrichments", "provisioning"],
    )?;

    let mut endpoints = vec![Endpoint {
        name: BUILTIN.into(),
        kind: EndpointKind::Builtin,
    }];
    if let Some(t) = r.table_opt(&root, "endpoints", 1)? {
        let mut named: Vec<(String, Table)> = Vec::new();
        for pair in t.pairs::<Lua_, Lua_>() {
            let (k, v) = pair.map_err(|e| r.err(None, e.to_string()))?;
            let Lua_::String(k) = k else {
                return Err(r.err(
                    r.at.key("endpoints", 1),
                    "endpoints are named by strings".into(),
                ));
            };
            let name = k.to_string_lossy();
            let Lua_::Table(v) = v else {
                return Err(r.err(
                    r.at.key(&name, 1),
                    format!("endpoint {name:?} must be a table"),
                ));
            };
            named.push((name, v));
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in named {
            let line =
                r.at.key(&name, r.at.key("endpoints", 1).unwrap_or(1))
                    .unwrap_or(1);
            let kind = r.endpoint(&name, &t, line)?;
            if name == BUILTIN {
                if kind != EndpointKind::Builtin {
                    return Err(r.err(
                        Some(line),
                        format!("{BUILTIN} is the built-in endpoint; its kind is \"builtin\""),
                    ));
                }
                continue;
            }
            if kind == EndpointKind::Builtin {
                return Err(r.err(
                    Some(line),
                    format!("only {BUILTIN:?} is built in; endpoint {name:?} needs another kind"),
                ));
            }
            if !valid_name(&name) {
                return Err(r.err(
                    Some(line),
                    format!("endpoint name {name:?}: letters, digits, '-' and '_', at most 64"),
                ));
            }
            endpoints.push(Endpoint { name, kind });
        }
    }
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(r.err(
            r.at.key("endpoints", 1),
            format!("at most {MAX_ENDPOINTS} endpoints"),
        ));
    }
    let index = |name: &str| endpoints.iter().position(|e| e.name == name);

    let mut plugins = Vec::new();
    let (from, list) = r.tables(&root, "plugins", usize::MAX)?;
    for p in list {
        let name = r.string(&p, "use", from)?;
        let line = r.at.string(&name, from).unwrap_or(from);
        let f = r.fields(
            &p,
            line,
            &format!("plugin {name:?}"),
            &["use", "config", "on_error", "sources"],
        )?;
        let config = match r.get(&p, "config", line)? {
            Lua_::Nil => Value::Object(Default::default()),
            v => convert::to_json(&v).map_err(|e| {
                r.err(
                    r.at.key("config", line),
                    format!("plugin {name:?} config: {e}"),
                )
            })?,
        };
        let on_error = match r.string_opt(&p, "on_error", line)?.as_deref() {
            None | Some("skip") => OnError::Skip,
            Some("drop") => OnError::Drop,
            Some("reject") => OnError::Reject,
            Some(other) => {
                return Err(r.err(
                    r.at.key("on_error", line),
                    format!("on_error is \"skip\", \"drop\" or \"reject\", not {other:?}"),
                ))
            }
        };
        let sources = match r.get(&p, "sources", line)? {
            Lua_::Nil => vec![RouteSource::Telemetry],
            Lua_::Table(s) => {
                let mut out = Vec::new();
                for v in r.sequence(&s, "sources", line)? {
                    out.push(r.source(&v, line)?);
                }
                out
            }
            other => {
                return Err(r.err(
                    r.at.key("sources", line),
                    format!("sources must be a list, not a {}", other.type_name()),
                ))
            }
        };
        f.done()?;
        plugins.push(PluginUse {
            name,
            config,
            on_error,
            sources,
        });
    }

    let provisioning = match r.table_opt(&root, "provisioning", 1)? {
        None => None,
        Some(p) => {
            let line = r.at.key("provisioning", 1).unwrap_or(1);
            let name = r.string(&p, "use", line)?;
            let f = r.fields(&p, line, "provisioning", &["use", "config"])?;
            let config = match r.get(&p, "config", line)? {
                Lua_::Nil => Value::Object(Default::default()),
                v => convert::to_json(&v).map_err(|e| {
                    r.err(
                        r.at.key("config", line),
                        format!("provisioning plugin {name:?} config: {e}"),
                    )
                })?,
            };
            f.done()?;
            Some(PluginUse {
                name,
                config,
                on_error: OnError::Skip,
                sources: Vec::new(),
            })
        }
    };

    let mut routes: Vec<Route> = Vec::new();
    let (from, list) = r.tables(&root, "routes", MAX_ROUTES)?;
    let mut anchor = from;
    for rt in list {
        let name = r.string(&rt, "name", anchor)?;
        let line = r.at.string(&name, anchor).unwrap_or(anchor);
        anchor = line;
        let what = format!("route {name:?}");
        if routes.iter().any(|x| x.name == name) {
            return Err(r.err(Some(line), format!("two routes are named {name:?}")));
        }
        if !valid_name(&name) {
            return Err(r.err(
                Some(line),
                format!("route name {name:?}: letters, digits, '-' and '_', at most 64"),
            ));
        }
        let f = r.fields(
            &rt,
            line,
            &what,
            &["name", "source", "condition", "endpoints", "enabled"],
        )?;
        let source = match r.get(&rt, "source", line)? {
            Lua_::Nil => RouteSource::Telemetry,
            v => r.source(&v, line)?,
        };
        let when = match r.get(&rt, "condition", line)? {
            Lua_::Nil | Lua_::Boolean(true) => When::Always,
            Lua_::Boolean(false) => When::Never,
            Lua_::String(s) => {
                let text = s.to_string_lossy();
                match text.trim() {
                    t if t.eq_ignore_ascii_case("true") => When::Always,
                    t if t.eq_ignore_ascii_case("false") => When::Never,
                    _ => When::Query(Condition::compile(&text).map_err(|e| {
                        r.err(
                            r.at.key("condition", line).or(Some(line)),
                            format!("{what}: {e}"),
                        )
                    })?),
                }
            }
            Lua_::Function(f) => {
                let info = f.info();
                if info.num_params != 2 && !info.is_vararg {
                    return Err(r.err(
                        info.line_defined.map(|l| l as u32).or(Some(line)),
                        format!(
                            "{what}: a condition function takes (msg, device), not {} parameters",
                            info.num_params
                        ),
                    ));
                }
                When::Lua(f)
            }
            other => {
                return Err(r.err(
                    r.at.key("condition", line),
                    format!(
                        "{what}: a condition is a string, true or a function, not a {}",
                        other.type_name()
                    ),
                ))
            }
        };
        let endpoints = r.endpoint_names(&rt, line, &what, &index)?;
        let enabled = r.enabled(&rt, line, &what)?;
        f.done()?;
        routes.push(Route {
            name,
            source,
            when,
            endpoints,
            enabled,
        });
    }

    let fallback = match root
        .raw_get::<Lua_>("fallback")
        .map_err(|e| r.err(None, e.to_string()))?
    {
        Lua_::Nil => Some(vec![0]),
        Lua_::Boolean(false) => None,
        Lua_::Table(t) => {
            let line = r.at.key("fallback", 1).unwrap_or(1);
            let f = r.fields(&t, line, "fallback", &["endpoints", "enabled"])?;
            let enabled = r.enabled(&t, line, "fallback")?;
            let endpoints = match r.get(&t, "endpoints", line)? {
                Lua_::Nil => vec![0],
                _ => r.endpoint_names(&t, line, "fallback", &index)?,
            };
            f.done()?;
            enabled.then_some(endpoints)
        }
        other => {
            return Err(r.err(
                r.at.key("fallback", 1),
                format!("fallback is a table or false, not a {}", other.type_name()),
            ))
        }
    };

    let mut enrichments = Vec::new();
    let (from, list) = r.tables(&root, "enrichments", MAX_ENRICHMENTS)?;
    let mut anchor = from;
    for e in list {
        let key = r.string(&e, "key", anchor)?;
        let line = r.at.string(&key, anchor).unwrap_or(anchor);
        anchor = line;
        let what = format!("enrichment {key:?}");
        let f = r.fields(&e, line, &what, &["key", "value", "endpoints"])?;
        let text = r.string(&e, "value", line)?;
        let value = enrich_value(&text)
            .map_err(|m| r.err(r.at.key("value", line), format!("{what}: {m}")))?;
        let endpoints = r.endpoint_names(&e, line, &what, &index)?;
        f.done()?;
        enrichments.push(Enrichment {
            key,
            value,
            endpoints,
        });
    }
    top.done()?;
    Ok(RoutesConfig {
        endpoints,
        plugins,
        provisioning,
        routes,
        fallback,
        enrichments,
    })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An enrichment's value: `$iothubname`, `$twin.tags.…`, `$twin.properties.desired|reported.…`,
/// or a literal.
fn enrich_value(text: &str) -> Result<EnrichValue, String> {
    if text.eq_ignore_ascii_case("$iothubname") {
        return Ok(EnrichValue::HubName);
    }
    let Some(rest) = text.strip_prefix('$') else {
        return Ok(EnrichValue::Literal(text.to_string()));
    };
    let mut parts = rest.split('.');
    match (parts.next(), parts.next()) {
        (Some(t), Some(s)) if t.eq_ignore_ascii_case("twin") && s == "tags" => {
            let path: Vec<String> = parts.map(str::to_string).collect();
            if path.is_empty() || path.iter().any(String::is_empty) {
                return Err(format!("{text:?} must name a tag, as in $twin.tags.site"));
            }
            Ok(EnrichValue::Twin(
                std::iter::once("tags".to_string()).chain(path).collect(),
            ))
        }
        (Some(t), Some("properties")) if t.eq_ignore_ascii_case("twin") => {
            let part = parts.next().unwrap_or_default();
            let path: Vec<String> = parts.map(str::to_string).collect();
            if !matches!(part, "desired" | "reported")
                || path.is_empty()
                || path.iter().any(String::is_empty)
            {
                return Err(format!(
                    "{text:?} must name a property, as in $twin.properties.reported.firmware"
                ));
            }
            Ok(EnrichValue::Twin(
                ["properties", part]
                    .into_iter()
                    .map(str::to_string)
                    .chain(path)
                    .collect(),
            ))
        }
        _ => Err(format!(
            "{text:?}: a value starting with $ is $iothubname, $twin.tags.… or $twin.properties.…"
        )),
    }
}

/// Reads tables for [`read`], placing errors with the locator.
struct Reader<'a> {
    file: &'a str,
    at: Locator,
}

/// The keys of one table that may be there; [`Fields::done`] refuses the others.
struct Fields<'r> {
    r: &'r Reader<'r>,
    unknown: Option<(String, Option<u32>)>,
    what: String,
}

impl Fields<'_> {
    fn done(self) -> Result<(), ConfigError> {
        match self.unknown {
            None => Ok(()),
            Some((key, line)) => Err(self
                .r
                .err(line, format!("unknown key {key:?} in {}", self.what))),
        }
    }
}

impl<'a> Reader<'a> {
    fn err(&self, line: Option<u32>, message: String) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            line,
            message,
        }
    }

    /// Notes the first key of `t` not in `known` (reported by [`Fields::done`] after the known
    /// ones are read, so an error in a known key is reported first).
    fn fields(
        &'a self,
        t: &Table,
        line: u32,
        what: &str,
        known: &[&str],
    ) -> Result<Fields<'a>, ConfigError> {
        let mut unknown = None;
        for pair in t.pairs::<Lua_, Lua_>() {
            let (k, _) = pair.map_err(|e| self.err(Some(line), e.to_string()))?;
            let key = match &k {
                Lua_::String(s) => s.to_string_lossy(),
                Lua_::Integer(i) => format!("[{i}]"),
                other => format!("a {} key", other.type_name()),
            };
            if !known.contains(&key.as_str()) {
                let at = self.at.key(&key, line).or(Some(line));
                unknown = Some((key, at));
                break;
            }
        }
        let mut known: Vec<&str> = known.to_vec();
        known.sort_unstable();
        Ok(Fields {
            r: self,
            unknown,
            what: format!("{what} (known: {})", known.join(", ")),
        })
    }

    /// The `enabled` flag of a route or the fallback (absent: true).
    fn enabled(&self, t: &Table, line: u32, what: &str) -> Result<bool, ConfigError> {
        match self.get(t, "enabled", line)? {
            Lua_::Nil => Ok(true),
            Lua_::Boolean(b) => Ok(b),
            other => Err(self.err(
                self.at.key("enabled", line),
                format!(
                    "{what}: enabled is true or false, not a {}",
                    other.type_name()
                ),
            )),
        }
    }

    /// `t[key]`, a Lua error placed at `line`.
    fn get(&self, t: &Table, key: &str, line: u32) -> Result<Lua_, ConfigError> {
        t.raw_get::<Lua_>(key)
            .map_err(|e| self.err(Some(line), e.to_string()))
    }

    /// The top-level list `key` of tables (absent: empty), at most `max` of them, and the line
    /// it starts on.
    fn tables(
        &self,
        root: &Table,
        key: &str,
        max: usize,
    ) -> Result<(u32, Vec<Table>), ConfigError> {
        let from = self.at.key(key, 1).unwrap_or(1);
        let Some(t) = self.table_opt(root, key, 1)? else {
            return Ok((from, Vec::new()));
        };
        let list = self.sequence(&t, key, from)?;
        if list.len() > max {
            return Err(self.err(Some(from), format!("at most {max} {key}")));
        }
        list.into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Lua_::Table(t) => Ok(t),
                _ => Err(self.err(Some(from), format!("{key}[{}] must be a table", i + 1))),
            })
            .collect::<Result<_, _>>()
            .map(|l| (from, l))
    }

    fn table_opt(&self, t: &Table, key: &str, line: u32) -> Result<Option<Table>, ConfigError> {
        match self.get(t, key, line)? {
            Lua_::Nil => Ok(None),
            Lua_::Table(t) => Ok(Some(t)),
            other => Err(self.err(
                self.at.key(key, line),
                format!("{key} must be a table, not a {}", other.type_name()),
            )),
        }
    }

    /// The items of a list `1..n`; any other key is an error.
    fn sequence(&self, t: &Table, what: &str, line: u32) -> Result<Vec<Lua_>, ConfigError> {
        let n = t.raw_len();
        let mut count = 0;
        for pair in t.pairs::<Lua_, Lua_>() {
            let (k, _) = pair.map_err(|e| self.err(Some(line), e.to_string()))?;
            match k {
                Lua_::Integer(i) if i >= 1 && (i as usize) <= n => count += 1,
                Lua_::String(s) => {
                    let key = s.to_string_lossy();
                    return Err(self.err(
                        self.at.key(&key, line).or(Some(line)),
                        format!("{what} is a list; unknown key {key:?}"),
                    ));
                }
                _ => return Err(self.err(Some(line), format!("{what} must be a list"))),
            }
        }
        if count != n {
            return Err(self.err(Some(line), format!("{what} must be a list without holes")));
        }
        (1..=n)
            .map(|i| {
                t.raw_get::<Lua_>(i)
                    .map_err(|e| self.err(Some(line), e.to_string()))
            })
            .collect()
    }

    fn string_opt(&self, t: &Table, key: &str, line: u32) -> Result<Option<String>, ConfigError> {
        match self.get(t, key, line)? {
            Lua_::Nil => Ok(None),
            Lua_::String(s) => Ok(Some(s.to_string_lossy())),
            other => Err(self.err(
                self.at.key(key, line).or(Some(line)),
                format!("{key} must be a string, not a {}", other.type_name()),
            )),
        }
    }

    fn string(&self, t: &Table, key: &str, line: u32) -> Result<String, ConfigError> {
        self.string_opt(t, key, line)?
            .ok_or_else(|| self.err(Some(line), format!("{key} is missing")))
    }

    fn uint(
        &self,
        t: &Table,
        key: &str,
        line: u32,
        default: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        match self.get(t, key, line)? {
            Lua_::Nil => Ok(default),
            Lua_::Integer(i) if i >= 1 && (i as u64) <= max => Ok(i as u64),
            other => Err(self.err(
                self.at.key(key, line).or(Some(line)),
                format!(
                    "{key} must be a whole number from 1 to {max}, not {}",
                    describe(&other)
                ),
            )),
        }
    }

    fn source(&self, v: &Lua_, line: u32) -> Result<RouteSource, ConfigError> {
        let name = match v {
            Lua_::String(s) => s.to_string_lossy(),
            other => {
                return Err(self.err(
                    self.at.key("source", line).or(Some(line)),
                    format!("a source is a string, not a {}", other.type_name()),
                ))
            }
        };
        RouteSource::named(&name).ok_or_else(|| {
            let names: Vec<&str> = RouteSource::ALL.iter().map(|(n, _)| *n).collect();
            self.err(
                self.at.string(&name, line).or(Some(line)),
                format!("unknown source {name:?} (sources: {})", names.join(", ")),
            )
        })
    }

    fn endpoint_names(
        &self,
        t: &Table,
        line: u32,
        what: &str,
        index: &dyn Fn(&str) -> Option<usize>,
    ) -> Result<Vec<usize>, ConfigError> {
        let list = match self.get(t, "endpoints", line)? {
            Lua_::Table(l) => self.sequence(&l, "endpoints", line)?,
            Lua_::Nil => return Err(self.err(Some(line), format!("{what}: endpoints is missing"))),
            other => {
                return Err(self.err(
                    self.at.key("endpoints", line),
                    format!(
                        "{what}: endpoints must be a list, not a {}",
                        other.type_name()
                    ),
                ))
            }
        };
        if list.is_empty() {
            return Err(self.err(
                self.at.key("endpoints", line).or(Some(line)),
                format!("{what}: endpoints is empty"),
            ));
        }
        let mut out = Vec::new();
        for v in list {
            let Lua_::String(s) = v else {
                return Err(self.err(
                    self.at.key("endpoints", line),
                    format!("{what}: endpoints are names"),
                ));
            };
            let name = s.to_string_lossy();
            let i = index(&name).ok_or_else(|| {
                self.err(
                    self.at.string(&name, line).or(Some(line)),
                    format!("{what}: unknown endpoint {name:?}"),
                )
            })?;
            if !out.contains(&i) {
                out.push(i);
            }
        }
        Ok(out)
    }

    fn endpoint(&self, name: &str, t: &Table, line: u32) -> Result<EndpointKind, ConfigError> {
        let what = format!("endpoint {name:?}");
        let kind = self.string(t, "kind", line)?;
        let (kind, known): (EndpointKind, &[&str]) = match kind.as_str() {
            "builtin" => (EndpointKind::Builtin, &["kind"]),
            "webhook" => {
                let url = self.url(t, line, &["http://", "https://"])?;
                let mut headers = Vec::new();
                if let Some(h) = self.table_opt(t, "headers", line)? {
                    for pair in h.pairs::<Lua_, Lua_>() {
                        let (k, v) = pair.map_err(|e| self.err(Some(line), e.to_string()))?;
                        match (k, v) {
                            (Lua_::String(k), Lua_::String(v)) => {
                                headers.push((k.to_string_lossy(), v.to_string_lossy()))
                            }
                            _ => {
                                return Err(self.err(
                                    self.at.key("headers", line),
                                    format!("{what}: headers map names to strings"),
                                ))
                            }
                        }
                    }
                    headers.sort();
                }
                (
                    EndpointKind::Webhook {
                        url,
                        batch: self.uint(t, "batch", line, 100, 10_000)? as usize,
                        timeout_ms: self.uint(t, "timeout_ms", line, 10_000, 600_000)?,
                        headers,
                    },
                    &["kind", "url", "batch", "timeout_ms", "headers"],
                )
            }
            "file" => (
                EndpointKind::File {
                    path: self.string(t, "path", line)?,
                    max_bytes: self.uint(t, "max_bytes", line, 64 << 20, 1 << 40)?,
                    max_files: self.uint(t, "max_files", line, 10, 100_000)? as u32,
                },
                &["kind", "path", "max_bytes", "max_files"],
            ),
            "nats" => (
                EndpointKind::Nats {
                    url: self.url(t, line, &["nats://"])?,
                    subject: self.string(t, "subject", line)?,
                },
                &["kind", "url", "subject"],
            ),
            "mqtt" => {
                let qos = match self.get(t, "qos", line)? {
                    Lua_::Nil => 1,
                    Lua_::Integer(q @ 0..=1) => q as u8,
                    other => {
                        return Err(self.err(
                            self.at.key("qos", line),
                            format!("{what}: qos is 0 or 1, not {}", describe(&other)),
                        ))
                    }
                };
                (
                    EndpointKind::Mqtt {
                        url: self.url(t, line, &["mqtt://"])?,
                        topic: self.string(t, "topic", line)?,
                        qos,
                        client_id: self.string_opt(t, "client_id", line)?,
                    },
                    &["kind", "url", "topic", "qos", "client_id"],
                )
            }
            other => {
                return Err(self.err(
                    self.at.string(other, line).or(Some(line)),
                    format!(
                    "{what}: unknown kind {other:?} (kinds: builtin, webhook, file, nats, mqtt)"
                ),
                ))
            }
        };
        self.fields(t, line, &what, known)?.done()?;
        Ok(kind)
    }

    fn url(&self, t: &Table, line: u32, schemes: &[&str]) -> Result<String, ConfigError> {
        let url = self.string(t, "url", line)?;
        if !schemes.iter().any(|s| url.starts_with(s)) || url.len() > 2048 {
            return Err(self.err(
                self.at.key("url", line).or(Some(line)),
                format!("url {url:?} must start with {}", schemes.join(" or ")),
            ));
        }
        Ok(url)
    }
}

fn describe(v: &Lua_) -> String {
    match v {
        Lua_::Integer(i) => i.to_string(),
        Lua_::Number(n) => n.to_string(),
        other => format!("a {}", other.type_name()),
    }
}
