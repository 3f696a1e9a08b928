//! `roost routes check | apply | show | test`: the routing of DESIGN.md §5 from the command line.
//!
//! `check` and `test` run locally with the engines' own code (`roost-routing`); `apply` checks
//! the same way, then hands the file and the plugins it uses to control (`PUT /roost/routes`),
//! which checks again, stores it and pushes it to the engines as a new config epoch, and waits
//! for every linked engine to say it runs it or why it refused it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use hyper::Method;
use roost_common::hubfile;
use roost_common::service::ServiceClient;
use roost_routing::{Routing, Verdict};
use serde_json::{json, Map, Value};

#[derive(Subcommand)]
pub enum RoutesCmd {
    /// Check a routes.lua and the plugins it uses: syntax, keys, endpoints, conditions, plugin
    /// hooks and schemas. Prints a summary, or the error with its line (exit status 1).
    ///
    /// Example: roost routes check routes.lua --plugins plugins
    Check {
        #[arg(default_value = "routes.lua")]
        file: PathBuf,
        /// The folder of plugins (`<name>/handler.lua`, `<name>/schema.lua`); default: `plugins`
        /// beside the file.
        #[arg(long)]
        plugins: Option<PathBuf>,
    },
    /// Check, then apply a routes.lua: control checks it again, stores it and pushes it to
    /// every engine as a new config epoch. Waits for the engines' verdicts.
    ///
    /// Example: roost routes apply routes.lua
    Apply {
        #[arg(default_value = "routes.lua")]
        file: PathBuf,
        #[arg(long)]
        plugins: Option<PathBuf>,
        /// Seconds to wait for every engine to apply it.
        #[arg(long, default_value_t = 10)]
        wait: u64,
        #[arg(long, default_value = "./roost-data")]
        data_dir: PathBuf,
    },
    /// Print the routing in force at control and each engine's verdict on it.
    Show {
        #[arg(long, default_value = "./roost-data")]
        data_dir: PathBuf,
    },
    /// Route each case of CASES through FILE and print the routes it matched, its endpoints
    /// and the enrichments each endpoint gets (one JSON object per case).
    ///
    /// CASES is JSON (or Lua data): a list of `{name, message: {body, props, content_type,
    /// content_encoding, device_id, module_id, source}, tags, properties}`, as in a plugin's spec.lua.
    ///
    /// Example: roost routes test routes.lua --cases cases.json
    Test {
        file: PathBuf,
        #[arg(long)]
        cases: PathBuf,
        #[arg(long)]
        plugins: Option<PathBuf>,
        /// The hub name `$iothubname` stands for.
        #[arg(long, default_value = "roost")]
        hub_name: String,
    },
}

pub fn run(cmd: RoutesCmd) -> anyhow::Result<()> {
    match cmd {
        RoutesCmd::Check { file, plugins } => {
            let (src, files) = read(&file, plugins.as_deref())?;
            let routing = load(&file, &src, &files, "roost")?;
            println!("{}", serde_json::to_string_pretty(&summary(&routing))?);
            Ok(())
        }
        RoutesCmd::Apply {
            file,
            plugins,
            wait,
            data_dir,
        } => apply(
            &file,
            plugins.as_deref(),
            Duration::from_secs(wait),
            &data_dir,
        ),
        RoutesCmd::Show { data_dir } => {
            let v = call(&data_dir, Method::GET, None)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        RoutesCmd::Test {
            file,
            cases,
            plugins,
            hub_name,
        } => test(&file, &cases, plugins.as_deref(), &hub_name),
    }
}

/// The file's source and every plugin file found in the plugins folder, by `name/file`.
fn read(file: &Path, plugins: Option<&Path>) -> anyhow::Result<(String, Vec<(String, String)>)> {
    let src =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let dir = match plugins {
        Some(d) => d.to_path_buf(),
        None => file.parent().unwrap_or(Path::new(".")).join("plugins"),
    };
    let mut files = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            for f in ["handler.lua", "schema.lua"] {
                let path = e.path().join(f);
                if let Ok(text) = std::fs::read_to_string(&path) {
                    files.push((format!("{name}/{f}"), text));
                }
            }
        }
    } else if plugins.is_some() {
        bail!("cannot read the plugins folder {}", dir.display());
    }
    Ok((src, files))
}

fn load(
    file: &Path,
    src: &str,
    plugins: &[(String, String)],
    hub_name: &str,
) -> anyhow::Result<Routing> {
    let name = file.file_name().map_or_else(
        || "routes.lua".to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    Routing::load_with_defaults(&name, src, plugins, hub_name).map_err(|e| anyhow::anyhow!("{e}"))
}

/// What a loaded routing holds, for `check`.
fn summary(r: &Routing) -> Value {
    let c = r.config();
    let names = |idx: &[usize]| -> Vec<&str> {
        idx.iter().map(|&i| c.endpoints[i].name.as_str()).collect()
    };
    json!({
        "endpoints": c.endpoints.iter().map(|e| json!({"name": e.name, "kind": e.kind.label()})).collect::<Vec<_>>(),
        "plugins": c.plugins.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        "routes": c.routes.iter().map(|rt| json!({
            "name": rt.name,
            "source": rt.source.name(),
            "condition": match &rt.when {
                roost_routing::config::When::Always => "true".to_string(),
                roost_routing::config::When::Never => "false".to_string(),
                roost_routing::config::When::Query(q) => q.text().to_string(),
                roost_routing::config::When::Lua(_) => "(lua function)".to_string(),
            },
            "endpoints": names(&rt.endpoints),
            "enabled": rt.enabled,
        })).collect::<Vec<_>>(),
        "fallback": c.fallback.as_deref().map(names),
        "enrichments": c.enrichments.iter().map(|e| json!({"key": e.key, "endpoints": names(&e.endpoints)})).collect::<Vec<_>>(),
    })
}

fn call(data_dir: &Path, method: Method, body: Option<Vec<u8>>) -> anyhow::Result<Value> {
    call_at(data_dir, method, "/roost/routes", body)
}

/// One call of roost's own service API (`/roost/…`); a refusal is an error with control's
/// answer. An empty answer reads as `null`.
pub(crate) fn call_at(
    data_dir: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<Value> {
    let mut svc = ServiceClient::new(hubfile::read(data_dir)?)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let resp = svc.call(method, path, body, &[]).await?;
        if !(200..300).contains(&resp.status) {
            bail!(
                "control refused it ({}): {}",
                resp.status,
                String::from_utf8_lossy(&resp.body)
            );
        }
        match resp.body.is_empty() {
            true => Ok(Value::Null),
            false => Ok(serde_json::from_slice(&resp.body)?),
        }
    })
}

fn apply(
    file: &Path,
    plugins: Option<&Path>,
    wait: Duration,
    data_dir: &Path,
) -> anyhow::Result<()> {
    let (src, files) = read(file, plugins)?;
    let routing = load(file, &src, &files, "roost")?;
    // Only the plugins the file uses travel in the epoch.
    let used: Map<String, Value> = files
        .into_iter()
        .filter(|(path, _)| {
            let config = routing.config();
            config
                .plugins
                .iter()
                .chain(config.provisioning.iter())
                .any(|p| path.split_once('/').is_some_and(|(n, _)| n == p.name))
        })
        .map(|(p, s)| (p, Value::String(s)))
        .collect();
    let body = serde_json::to_vec(&json!({"routes": src, "plugins": used}))?;
    let applied = call(data_dir, Method::PUT, Some(body))?;
    let hash = applied["hash"].as_str().unwrap_or_default().to_string();
    eprintln!(
        "control stored version {} (epoch {hash}); waiting for the engines",
        applied["version"]
    );
    let deadline = Instant::now() + wait;
    loop {
        let status = call(data_dir, Method::GET, None)?;
        let engines = status["engines"].as_array().cloned().unwrap_or_default();
        let rejected: Vec<String> = engines
            .iter()
            .filter_map(|e| {
                e["rejected"]
                    .as_str()
                    .map(|r| format!("{}: {r}", e["node"].as_str().unwrap_or("?")))
            })
            .collect();
        if !rejected.is_empty() {
            bail!("an engine refused the epoch: {}", rejected.join("; "));
        }
        let done = !engines.is_empty()
            && engines
                .iter()
                .all(|e| e["epochHash"].as_str() == Some(&hash));
        if done {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({"version": applied["version"], "hash": hash, "engines": engines})
                )?
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "not every engine runs epoch {hash} after {wait:?}: {}",
                Value::Array(engines)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn test(file: &Path, cases: &Path, plugins: Option<&Path>, hub_name: &str) -> anyhow::Result<()> {
    let (src, files) = read(file, plugins)?;
    let mut routing = load(file, &src, &files, hub_name)?;
    let text = std::fs::read_to_string(cases)
        .with_context(|| format!("cannot read {}", cases.display()))?;
    let list: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(_) => roost_routing::spec::data(&cases.display().to_string(), &text)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    let Value::Array(list) = list else {
        bail!("{}: a list of cases", cases.display());
    };
    for (i, case) in list.iter().enumerate() {
        let name = case["name"]
            .as_str()
            .map_or_else(|| format!("case {}", i + 1), str::to_string);
        let mut msg = roost_routing::spec::message(case.get("message").unwrap_or(&Value::Null))
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let o = routing.route(&mut msg, &roost_routing::spec::twin(case));
        let verdict = match &o.verdict {
            Verdict::Route if o.endpoints == 0 => json!("unrouted"),
            Verdict::Route => json!("route"),
            Verdict::Drop(p) => json!({"drop": routing.config().plugins[*p].name}),
            Verdict::Reject { plugin, code, why } => {
                json!({"reject": {"plugin": routing.config().plugins[*plugin].name, "code": code, "why": why}})
            }
        };
        let mut enrichments = Map::new();
        for (i, e) in routing.config().endpoints.iter().enumerate() {
            let stamps: Map<String, Value> = o
                .stamps
                .iter()
                .filter(|s| s.endpoints & (1 << i) != 0)
                .map(|s| (s.key.clone(), Value::String(s.value.clone())))
                .collect();
            if !stamps.is_empty() {
                enrichments.insert(e.name.clone(), Value::Object(stamps));
            }
        }
        let line = json!({
            "case": name,
            "verdict": verdict,
            "routes": routing.route_names(o.routes).collect::<Vec<_>>(),
            "endpoints": routing.endpoint_names(o.endpoints).collect::<Vec<_>>(),
            "enrichments": enrichments,
        });
        println!("{line}");
    }
    Ok(())
}
