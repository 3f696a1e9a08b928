//! The examples of docs/routing.md marked `<!-- tested -->` load as they appear there: routes
//! files with the shipped plugins, plugin handlers with a schema and a message through them.

use std::path::Path;

use roost_routing::{Routing, Verdict};

fn tested_blocks() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let doc = std::fs::read_to_string(root.join("docs/routing.md")).expect("docs/routing.md");
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "<!-- tested -->" {
            continue;
        }
        assert_eq!(
            lines.next().map(str::trim),
            Some("```lua"),
            "a tested example is a lua block"
        );
        let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        out.push(block.join("\n"));
    }
    out
}

fn shipped_plugins() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins");
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir)
        .expect("plugins/")
        .filter_map(Result::ok)
    {
        let name = e.file_name().to_string_lossy().into_owned();
        for f in ["handler.lua", "schema.lua"] {
            if let Ok(text) = std::fs::read_to_string(e.path().join(f)) {
                files.push((format!("{name}/{f}"), text));
            }
        }
    }
    files
}

fn load(routes: &str, plugins: &[(String, String)]) -> Routing {
    Routing::load_with_defaults("routes.lua", routes, plugins, "docs")
        .unwrap_or_else(|e| panic!("{e}\n{routes}"))
}

#[test]
fn every_tested_example_of_the_routing_reference_loads() {
    let blocks = tested_blocks();
    assert!(blocks.len() >= 3, "the reference has its tested examples");
    let mut plugins = shipped_plugins();
    for block in &blocks {
        if let Some(name) = block
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("-- plugins/"))
            .and_then(|l| l.split_once('/'))
            .map(|(n, _)| n.to_string())
        {
            // A handler: give it the schema its text uses and route one message through it.
            plugins.push((format!("{name}/handler.lua"), block.clone()));
            plugins.push((
                format!("{name}/schema.lua"),
                "return { fields = { limit = { type = \"number\", default = 30 } } }".into(),
            ));
            let mut r = load(
                &format!("return {{ plugins = {{ {{ use = \"{name}\" }} }} }}"),
                &plugins,
            );
            let mut m =
                roost_routing::spec::message(&serde_json::json!({"body": {"temperature": 35}}))
                    .expect("message");
            let o = r.route(&mut m, r#"{"tags":{"site":"north"}}"#);
            assert_eq!(o.verdict, Verdict::Route);
            assert!(
                m.app.contains(&("hot".to_string(), "true".to_string())),
                "{:?}",
                m.app
            );
            let body: serde_json::Value = serde_json::from_slice(&m.body).expect("json");
            assert_eq!(body["site"], "north");
            let mut bad =
                roost_routing::spec::message(&serde_json::json!({"body": {"temperature": "x"}}))
                    .expect("message");
            assert!(matches!(
                r.route(&mut bad, "").verdict,
                Verdict::Reject { .. }
            ));
        } else {
            load(block, &plugins);
        }
    }
}
