//! Loading epochs and routing messages through them: the DESIGN.md §5 example, every kind of
//! configuration error with its line, fallback, enrichments, plugins and their failures.

use roost_model::{Message, Source, SystemProperties};

use super::*;
use crate::sandbox::Limits;

const EXAMPLE: &str = r#"-- DESIGN.md §5
return {
  endpoints = {
    events  = { kind = "builtin" },
    alerts  = { kind = "webhook", url = "http://127.0.0.1:9000/alerts" },
    archive = { kind = "file", path = "data/archive" },
  },
  routes = {
    { name = "hot", source = "telemetry",
      condition = "$body.temperature > 30 AND $twin.tags.building = '43'",
      endpoints = { "alerts" } },
    { name = "custom", source = "telemetry",
      condition = function(msg, device) return msg.props.level == "critical" end,
      endpoints = { "alerts", "archive" } },
    { name = "twin-audit", source = "twin_change", condition = true, endpoints = { "archive" } },
    { name = "off", condition = true, endpoints = { "archive" }, enabled = false },
  },
  fallback = { endpoints = { "events" } },
  enrichments = {
    { key = "site", value = "$twin.tags.site", endpoints = { "alerts" } },
    { key = "hub", value = "$iothubname", endpoints = { "alerts", "archive" } },
    { key = "env", value = "prod", endpoints = { "events" } },
  },
}
"#;

const TAGS: &str = r#"{"tags":{"building":"43","site":"north"},"properties":{"desired":{"$version":1},"reported":{"fw":"1.2","$version":4}}}"#;

fn load_with(routes: &str, plugins: &[(String, String)]) -> Result<Routing, ConfigError> {
    Routing::load(
        Sources {
            routes_file: "routes.lua",
            routes,
            plugins,
        },
        Settings {
            limits: Limits {
                memory: 8 << 20,
                instructions: 200_000,
            },
            hub_name: "roost-test".into(),
        },
    )
}

fn load(routes: &str) -> Routing {
    load_with(routes, &[]).unwrap_or_else(|e| panic!("{e}"))
}

fn message(body: &str, props: &[(&str, &str)]) -> Message {
    Message {
        source: Source::Telemetry,
        enqueued_ms: 1_700_000_000_000,
        system: SystemProperties {
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            connection_device_id: "dev-1".into(),
            ..Default::default()
        },
        app: props
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: body.as_bytes().to_vec(),
    }
}

fn names(r: &Routing, mask: u64) -> Vec<&str> {
    r.endpoint_names(mask).collect()
}

#[test]
fn the_design_example_routes_each_message_to_its_endpoints() {
    let mut r = load(EXAMPLE);
    assert_eq!(
        r.config()
            .endpoints
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        ["events", "alerts", "archive"]
    );

    let o = r.route(&mut message(r#"{"temperature": 35}"#, &[]), TAGS);
    assert_eq!(o.verdict, Verdict::Route);
    assert_eq!(names(&r, o.endpoints), ["alerts"]);
    assert_eq!(
        o.stamps,
        [
            Stamp {
                endpoints: 0b010,
                key: "site".into(),
                value: "north".into()
            },
            Stamp {
                endpoints: 0b010,
                key: "hub".into(),
                value: "roost-test".into()
            },
        ]
    );

    let o = r.route(
        &mut message(r#"{"temperature": 35}"#, &[("level", "critical")]),
        TAGS,
    );
    assert_eq!(
        names(&r, o.endpoints),
        ["alerts", "archive"],
        "every matching route, once each"
    );
    assert_eq!(o.stamps[1].endpoints, 0b110);

    let o = r.route(
        &mut message(r#"{"temperature": 35}"#, &[]),
        r#"{"building":"44"}"#,
    );
    assert_eq!(names(&r, o.endpoints), ["events"], "no match: the fallback");
    assert_eq!(
        o.stamps,
        [Stamp {
            endpoints: 0b001,
            key: "env".into(),
            value: "prod".into()
        }]
    );

    let mut twin = message("{}", &[]);
    twin.source = Source::TwinChangeEvents;
    let o = r.route(&mut twin, TAGS);
    assert_eq!(names(&r, o.endpoints), ["archive"]);

    let mut lifecycle = message("{}", &[]);
    lifecycle.source = Source::DeviceLifecycleEvents;
    let o = r.route(&mut lifecycle, TAGS);
    assert_eq!(o.endpoints, 0, "the fallback takes telemetry only");

    let s = r.stats();
    assert_eq!(s.matches, [2, 1, 1, 0]);
    assert_eq!((s.fallback, s.unrouted), (1, 1));
}

#[test]
fn a_missing_twin_tag_is_stamped_with_its_placeholder() {
    let mut r = load(EXAMPLE);
    let o = r.route(
        &mut message(r#"{"temperature": 35}"#, &[("level", "critical")]),
        "",
    );
    assert_eq!(o.stamps[0].value, "$twin.tags.site");
}

#[test]
fn twin_properties_reach_enrichments_and_plugins() {
    let h = r#"return { on_message = function(msg, device, conf, state)
      msg.props.seen = tostring(device.properties.reported.fw) .. "|" .. tostring(device.tags.site)
        .. "|" .. tostring(device.properties.desired["$version"])
    end }"#;
    let mut r = load_with(
        r#"return { plugins = { { use = "h" } },
          routes = { { name = "fw", condition = "$twin.properties.reported.fw = '1.2'", endpoints = { "events" } } },
          fallback = false,
          enrichments = { { key = "fw", value = "$twin.properties.reported.fw", endpoints = { "events" } },
                          { key = "mode", value = "$twin.properties.desired.mode", endpoints = { "events" } } } }"#,
        &plugin("h", h, "return {}"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(r.reads_twin());
    let mut m = message("{}", &[]);
    let o = r.route(&mut m, TAGS);
    assert_eq!(names(&r, o.endpoints), ["events"]);
    let stamps: Vec<(&str, &str)> = o
        .stamps
        .iter()
        .map(|s| (s.key.as_str(), s.value.as_str()))
        .collect();
    assert_eq!(
        stamps,
        [("fw", "1.2"), ("mode", "$twin.properties.desired.mode")]
    );
    assert!(
        m.app.contains(&("seen".into(), "1.2|north|1".into())),
        "{:?} {:?}",
        m.app,
        r.stats().plugins
    );
    // A device with nothing in its twin view: empty tables, no error.
    let mut bare = message("{}", &[]);
    let o = r.route(&mut bare, "");
    assert_eq!(
        o.endpoints, 0,
        "the condition is undefined without the property"
    );
    assert!(
        bare.app.contains(&("seen".into(), "nil|nil|nil".into())),
        "{:?}",
        bare.app
    );
}

#[test]
fn without_a_fallback_an_unmatched_message_goes_nowhere_and_is_counted() {
    let mut r = load(
        r#"return { routes = { { name = "a", condition = "level = 'x'", endpoints = { "events" } } },
                    fallback = { enabled = false } }"#,
    );
    let o = r.route(&mut message("{}", &[]), "");
    assert_eq!((o.verdict, o.endpoints), (Verdict::Route, 0));
    assert_eq!(r.stats().unrouted, 1);
    let o = r.route(&mut message("{}", &[("Level", "x")]), "");
    assert_eq!(
        names(&r, o.endpoints),
        ["events"],
        "application properties by any case"
    );
}

#[test]
fn the_default_routes_lua_sends_everything_to_events() {
    let mut r = load(include_str!("../../../routes.lua"));
    let o = r.route(&mut message("x", &[]), "");
    assert_eq!(names(&r, o.endpoints), ["events"]);
    for source in [
        Source::TwinChangeEvents,
        Source::DeviceLifecycleEvents,
        Source::DeviceConnectionStateEvents,
        Source::FileUploadNotifications,
    ] {
        let mut m = message("{}", &[]);
        m.source = source;
        let o = r.route(&mut m, "");
        assert_eq!(names(&r, o.endpoints), ["events"], "{source:?}");
    }
    assert_eq!(
        r.stats().fallback,
        1,
        "only the telemetry took the fallback"
    );
    assert!(!r.reads_twin(), "nothing there reads the twin");
}

fn error(src: &str) -> String {
    match load_with(src, &[]) {
        Ok(_) => panic!("loaded: {src}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn configuration_errors_name_their_line() {
    for (src, want) in [
        (
            "return {\n  endpoints = {},\n  colour = 1,\n}",
            "routes.lua:3: unknown key \"colour\" in the returned table (known: endpoints, enrichments, fallback, plugins, provisioning, routes)",
        ),
        (
            "return {\n  routes = {\n    { name = \"a\",\n      endpoints = { \"events\" },\n      sorce = \"telemetry\" },\n  },\n}",
            "routes.lua:5: unknown key \"sorce\" in route \"a\" (known: condition, enabled, endpoints, name, source)",
        ),
        (
            "return {\n  routes = {\n    { name = \"a\", endpoints = { \"events\" } },\n    { name = \"b\",\n      endpoints = { \"nowhere\" } },\n  },\n}",
            "routes.lua:5: route \"b\": unknown endpoint \"nowhere\"",
        ),
        (
            "return {\n  endpoints = {\n    x = { kind = \"kafka\" },\n  },\n}",
            "routes.lua:3: endpoint \"x\": unknown kind \"kafka\" (kinds: builtin, webhook, file, nats, mqtt)",
        ),
        (
            "return {\n  endpoints = {\n    x = { kind = \"webhook\", url = \"http://h/\", retries = 3 },\n  },\n}",
            "routes.lua:3: unknown key \"retries\" in endpoint \"x\" (known: batch, headers, kind, timeout_ms, url)",
        ),
        (
            "return {\n  routes = {\n    { name = \"a\", endpoints = { \"events\" },\n      condition = \"$body > 1\" },\n  },\n}",
            "routes.lua:4: route \"a\": invalid condition \"$body > 1\": $body alone cannot be used; name a part of it, as in $body.temperature",
        ),
        (
            "return {\n  routes = {\n    { name = \"a\", endpoints = { \"events\" },\n      condition = \"level = \" },\n  },\n}",
            "routes.lua:4: route \"a\": invalid condition \"level = \": expected a value, a property path or '(', found the end of the query (at offset 8)",
        ),
        ("return {\n  routes = {\n  ,\n}", "routes.lua:3: unexpected symbol near ','"),
        ("local x = nil\nreturn x.y", "routes.lua:2: attempt to index a nil value (local 'x')"),
        ("while true do end", "routes.lua: instruction budget exceeded"),
        (
            "return {\n  routes = {\n    { name = \"a\", endpoints = { \"events\" },\n      condition = function(msg) return true end },\n  },\n}",
            "routes.lua:4: route \"a\": a condition function takes (msg, device), not 1 parameters",
        ),
        (
            "return { routes = { { name = \"a\", endpoints = { \"events\" } }, { name = \"a\", endpoints = { \"events\" } } } }",
            "routes.lua:1: two routes are named \"a\"",
        ),
        (
            "return { endpoints = { events = { kind = \"file\", path = \"x\" } } }",
            "routes.lua:1: events is the built-in endpoint; its kind is \"builtin\"",
        ),
        ("return 5", "routes.lua: must return a table, not a integer"),
        (
            "return {\n  routes = {\n    { name = \"a\", source = \"telemetri\", endpoints = { \"events\" } },\n  },\n}",
            "routes.lua:3: unknown source \"telemetri\" (sources: telemetry, twin_change, lifecycle, connection_state, file_upload, job_lifecycle)",
        ),
        (
            "return {\n  enrichments = {\n    { key = \"k\", value = \"$twin.tag.x\", endpoints = { \"events\" } },\n  },\n}",
            "routes.lua:3: enrichment \"k\": \"$twin.tag.x\": a value starting with $ is $iothubname, $twin.tags.… or $twin.properties.…",
        ),
        (
            "return {\n  enrichments = {\n    { key = \"k\", value = \"$twin.properties.x\", endpoints = { \"events\" } },\n  },\n}",
            "routes.lua:3: enrichment \"k\": \"$twin.properties.x\" must name a property, as in $twin.properties.reported.firmware",
        ),
        (
            "return { plugins = { { use = \"nope\" } } }",
            "routes.lua: plugin \"nope\": plugins/nope/handler.lua not found",
        ),
    ] {
        assert_eq!(error(src), want, "{src}");
    }
}

fn plugin(name: &str, handler: &str, schema: &str) -> Vec<(String, String)> {
    vec![
        (format!("{name}/handler.lua"), handler.to_string()),
        (format!("{name}/schema.lua"), schema.to_string()),
    ]
}

fn plugin_error(handler: &str, schema: &str, config: &str) -> String {
    let src = format!("return {{ plugins = {{ {{ use = \"p\", config = {config} }} }} }}");
    match load_with(&src, &plugin("p", handler, schema)) {
        Ok(_) => panic!("loaded: {handler}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn plugins_are_checked_when_they_load() {
    const OK: &str = "return { on_message = function(msg, device, conf, state) end }";
    const SCHEMA: &str = "return { fields = { n = { type = \"integer\", default = 1 } } }";
    for (handler, schema, config, want) in [
        ("return { on_mesage = function(a, b, c, d) end }", SCHEMA, "{}", "plugins/p/handler.lua: unknown hook \"on_mesage\" (hooks: init, on_message, on_provision)"),
        ("return {\n  on_message = function(msg, device) end }", SCHEMA, "{}", "plugins/p/handler.lua:2: on_message takes 4 parameters, not 2"),
        ("return { init = function(conf) end }", SCHEMA, "{}", "plugins/p/handler.lua: on_message is missing"),
        ("return 1", SCHEMA, "{}", "plugins/p/handler.lua: must return a table of hooks, not a integer"),
        (OK, "return { fields = { n = { type = \"integer\", default = function() end } } }", "{}", "plugins/p/schema.lua: schema.lua is data only: a function has no JSON form"),
        (OK, "return { fields = string.rep('x', 3) }", "{}", "plugins/p/schema.lua:1: attempt to index a nil value (global 'string')"),
        (OK, SCHEMA, "{ m = 1 }", "routes.lua: plugin \"p\": unknown config key \"m\" (known: n)"),
        (OK, SCHEMA, "{ n = 'x' }", "routes.lua: plugin \"p\": config n: must be of type integer, not \"x\""),
        ("return { init = function(conf) error('no good') end, on_message = function(a, b, c, d) end }", SCHEMA, "{}", "plugins/p/handler.lua:1: no good"),
    ] {
        assert_eq!(plugin_error(handler, schema, config), want, "{handler}");
    }
}

const FAILING: &str = r#"
return {
  init = function(conf) return { calls = 0 } end,
  on_message = function(msg, device, conf, state)
    state.calls = state.calls + 1
    if msg.props.mode == "loop" then while true do end end
    if msg.props.mode == "error" then error("bad message") end
    if msg.props.mode == "memory" then state.big = string.rep("x", 1 << 26) end
    if msg.props.mode == "verdict" then return 42 end
    if msg.props.mode == "drop" then return "drop" end
    if msg.props.mode == "reject" then return hub.reject(403, "not allowed") end
    msg.props.calls = state.calls
  end,
}
"#;

fn failing(on_error: &str) -> Routing {
    let src = format!("return {{ plugins = {{ {{ use = \"f\", on_error = \"{on_error}\" }} }} }}");
    load_with(&src, &plugin("f", FAILING, "return {}")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_failing_plugin_costs_its_message_the_plugin_step_and_is_counted() {
    let mut r = failing("skip");
    for mode in ["loop", "error", "memory", "verdict"] {
        let mut m = message("{}", &[("mode", mode)]);
        let o = r.route(&mut m, "");
        assert_eq!(
            o.verdict,
            Verdict::Route,
            "{mode}: skipped, the message goes on"
        );
        assert_eq!(names(&r, o.endpoints), ["events"], "{mode}");
        assert_eq!(
            m.app,
            [("mode".to_string(), mode.to_string())],
            "{mode}: the message is back"
        );
    }
    let mut m = message("{}", &[]);
    r.route(&mut m, "");
    assert_eq!(
        m.app,
        [("calls".to_string(), "5".to_string())],
        "the VM and the plugin's state go on"
    );
    let st = &r.stats().plugins[0];
    assert_eq!(st.runs, 5);
    let count =
        |code: &str| st.errors[PLUGIN_ERRORS.iter().position(|c| *c == code).expect("code")];
    assert_eq!(
        (
            count("budget"),
            count("runtime"),
            count("memory"),
            count("verdict")
        ),
        (1, 1, 1, 1)
    );

    let mut r = failing("drop");
    assert_eq!(
        r.route(&mut message("{}", &[("mode", "error")]), "")
            .verdict,
        Verdict::Drop(0)
    );
    let mut r = failing("reject");
    assert_eq!(
        r.route(&mut message("{}", &[("mode", "loop")]), "").verdict,
        Verdict::Reject {
            plugin: 0,
            code: "plugin_error".into(),
            why: "plugin f failed (budget)".into()
        }
    );
    assert_eq!(
        r.route(&mut message("{}", &[("mode", "drop")]), "").verdict,
        Verdict::Drop(0)
    );
    assert_eq!(
        r.route(&mut message("{}", &[("mode", "reject")]), "")
            .verdict,
        Verdict::Reject {
            plugin: 0,
            code: "403".into(),
            why: "not allowed".into()
        }
    );
    assert_eq!(
        (r.stats().plugins[0].drops, r.stats().plugins[0].rejects),
        (1, 1)
    );
}

#[test]
fn the_body_is_decoded_once_for_every_plugin_and_condition() {
    // The first plugin changes the decoded table in place without writing it back; the second
    // sees the change, so both hold the same decode. The third writes a new body, and the
    // compiled condition after it reads that one.
    let first =
        "return { on_message = function(msg, device, conf, state) msg:json().seen = 1 end }";
    let second = "return { on_message = function(msg, device, conf, state)\n  local b = msg:json()\n  msg.props.seen = b.seen\nend }";
    let third = "return { on_message = function(msg, device, conf, state)\n  local b = msg:json()\n  b.t = b.t * 10\n  msg:set_json(b)\nend }";
    let mut files = plugin("first", first, "return {}");
    files.extend(plugin("second", second, "return {}"));
    files.extend(plugin("third", third, "return {}"));
    let mut r = load_with(
        r#"return {
          plugins = { { use = "first" }, { use = "second" }, { use = "third" } },
          routes = { { name = "big", condition = "$body.t > 100 AND seen = '1'", endpoints = { "events" } } },
          fallback = false,
        }"#,
        &files,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut m = message(r#"{"t": 20}"#, &[]);
    let o = r.route(&mut m, "");
    assert_eq!(names(&r, o.endpoints), ["events"]);
    let body: serde_json::Value = serde_json::from_slice(&m.body).expect("json");
    assert_eq!(body, serde_json::json!({"t": 200, "seen": 1}));
    assert_eq!(m.app, [("seen".to_string(), "1".to_string())]);
}

#[test]
fn handles_read_the_fields_and_refuse_what_cannot_be_set() {
    let h = r#"return { on_message = function(msg, device, conf, state)
      msg.props.summary = table.concat({ msg.source, msg.device_id, tostring(msg.module_id),
        msg.content_type, msg.body, device.id, device.tags.site, hub.name }, "|")
      if msg.props.try then msg.device_id = "other" end
    end }"#;
    let mut r = load_with(
        r#"return { plugins = { { use = "h", on_error = "drop" } } }"#,
        &plugin("h", h, "return {}"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut m = message("{}", &[]);
    r.route(&mut m, TAGS);
    assert_eq!(
        m.app,
        [(
            "summary".to_string(),
            "telemetry|dev-1|nil|application/json|{}|dev-1|north|roost-test".to_string()
        )]
    );
    let o = r.route(&mut message("{}", &[("try", "1")]), TAGS);
    assert_eq!(o.verdict, Verdict::Drop(0), "msg.device_id cannot be set");
}

#[test]
fn a_script_that_overwrites_msg_fields_cannot_break_the_next_message() {
    let h = r#"return { on_message = function(msg, device, conf, state)
      msg.props.seen = tostring(getmetatable(msg)) .. "|" .. tostring(pcall == nil)
      msg.props.level = msg.props.level
      rawset(msg, "props", {})
      rawset(msg, "json", 5)
    end }"#;
    let mut r = load_with(
        r#"return { plugins = { { use = "h", on_error = "drop" } },
          routes = { { name = "lvl", condition = function(msg, device) return msg.props.level == "x" and msg:json() ~= nil end,
                       endpoints = { "events" } } } }"#,
        &plugin("h", h, "return {}"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..2 {
        let mut m = message("{}", &[("level", "x")]);
        let o = r.route(&mut m, TAGS);
        assert_eq!(
            o.verdict,
            Verdict::Route,
            "each message sees msg.props and msg:json"
        );
        assert_eq!(names(&r, o.endpoints), ["events"]);
        assert!(
            m.app
                .contains(&("seen".to_string(), "msg|true".to_string())),
            "{:?}",
            m.app
        );
    }
}

#[test]
fn a_lua_condition_that_fails_does_not_match_and_is_counted() {
    let mut r = load(
        r#"return { routes = {
          { name = "bad", condition = function(msg, device) return msg.props.x.y end, endpoints = { "events" } },
          { name = "loop", condition = function(msg, device) while true do end end, endpoints = { "events" } },
        } }"#,
    );
    let o = r.route(&mut message("{}", &[]), "");
    assert_eq!(names(&r, o.endpoints), ["events"], "the fallback");
    assert_eq!(r.stats().condition_errors, [1, 1]);
    assert_eq!(r.stats().fallback, 1);
}

/// `provisioning = { use = …, config = … }`: the plugin's `on_provision(request, conf, state)`
/// allocates a registration (a table), refuses it (`nil`), or fails (counted by its label).
#[test]
fn the_provisioning_hook_allocates_refuses_or_fails() {
    let handler = r#"
        return {
          init = function(conf) return { seen = 0 } end,
          on_provision = function(request, conf, state)
            state.seen = state.seen + 1
            if request.payload and request.payload.spin then while true do end end
            if request.registrationId == "blocked" then return nil end
            return {
              deviceId = conf.prefix .. request.registrationId,
              initialTwin = { tags = { floor = request.payload and request.payload.floor or 0 } },
              payload = { seen = state.seen },
            }
          end,
        }"#;
    let schema = r#"return { fields = { prefix = { type = "string", default = "dev-" } } }"#;
    let plugins = plugin("alloc", handler, schema);
    let routes = r#"return { provisioning = { use = "alloc", config = { prefix = "p-" } } }"#;
    let mut r = load_with(routes, &plugins).expect("loads");
    assert!(r.config().plugins.is_empty(), "not a message plugin");
    let got = r
        .provision(&serde_json::json!({"registrationId": "r1", "payload": {"floor": 3}}))
        .expect("runs")
        .expect("allocated");
    assert_eq!(got["deviceId"], "p-r1");
    assert_eq!(got["initialTwin"]["tags"]["floor"], 3);
    assert_eq!(got["payload"]["seen"], 1);
    let again = r.provision(&serde_json::json!({"registrationId": "r2"})).expect("runs").expect("allocated");
    assert_eq!(again["payload"]["seen"], 2, "state lives between calls of one load");
    assert_eq!(r.provision(&serde_json::json!({"registrationId": "blocked"})), Ok(None));
    match r.provision(&serde_json::json!({"registrationId": "r3", "payload": {"spin": true}})) {
        Err(crate::table::ProvisionError::Failed { code, .. }) => assert_eq!(code, "budget"),
        other => panic!("an endless hook was not stopped: {other:?}"),
    }
    // Without the hook the plugin cannot be the provisioning plugin; without the key there is
    // no hook to call.
    let no_hook = plugin("alloc", "return { on_message = function(m, d, c, s) end }", schema);
    let e = load_with(routes, &no_hook).err().expect("refused");
    assert!(e.to_string().contains("on_provision is missing"), "{e}");
    let mut plain = load_with("return {}", &[]).expect("loads");
    assert_eq!(
        plain.provision(&serde_json::json!({})),
        Err(crate::table::ProvisionError::NotConfigured)
    );
}
