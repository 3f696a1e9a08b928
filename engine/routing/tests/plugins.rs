//! Every plugin shipped in `plugins/` loads, and every case of its `spec.lua` passes, run by the
//! same host an epoch uses (a real Lua VM with its limits).

use std::path::Path;

fn plugin_files(dir: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    for name in ["handler.lua", "schema.lua", "spec.lua"] {
        let path = dir.join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        files.push((name.to_string(), text));
    }
    files
}

#[test]
fn every_shipped_plugin_passes_its_spec_cases() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("plugins/")
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .collect();
    dirs.sort_by_key(|e| e.file_name());
    let mut failures = Vec::new();
    let mut total = 0;
    for d in &dirs {
        let name = d.file_name().to_string_lossy().into_owned();
        let results = roost_routing::spec::run(&name, &plugin_files(&d.path()))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            results.len() >= 3,
            "{name}: a plugin ships with at least three cases"
        );
        for r in results {
            total += 1;
            if let Some(f) = r.failure {
                failures.push(format!("{name}: {}: {f}", r.name));
            }
        }
    }
    println!(
        "plugin specs: {} plugins, {total} cases, {} failed",
        dirs.len(),
        failures.len()
    );
    assert!(
        dirs.len() >= 4,
        "json_schema, units, redact and twin_tags at least"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_spec_case_that_is_wrong_fails() {
    // The harness itself: a case whose expectation the plugin does not meet is reported.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/redact");
    let mut files = plugin_files(&root);
    files[2].1 = r#"return { { name = "wrong", config = { props = { "token" } },
        message = { props = { token = "s3cret" } }, expect = { props = { token = "s3cret" } } } }"#
        .into();
    let results = roost_routing::spec::run("redact", &files).expect("runs");
    assert_eq!(results.len(), 1);
    let failure = results[0].failure.as_deref().expect("fails");
    assert!(failure.contains("props"), "{failure}");
}
