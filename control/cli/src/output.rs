//! How the service commands print what the hub answers: JSON as the hub sent it (`-o json`,
//! the default, for scripts and `jq`), or a table for people (`-o table`): a list of objects is
//! one row per object, one object is one row per property, nested objects flattened to dotted
//! paths. Tables leave out what no one reads in a table (`$metadata`, keys, thumbprints).

use clap::ValueEnum;
use serde_json::{Map, Value};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Json,
    Table,
}

/// Members a table does not show: long, internal or secret.
const HIDDEN: [&str; 7] = [
    "$metadata",
    "authentication",
    "x509Thumbprint",
    "capabilities",
    "deviceEtag",
    "statusUpdateTime",
    "etag",
];
/// The widest a cell is printed.
const CELL: usize = 48;

pub fn print(v: &Value, out: Output) {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => print!("{}", table(v)),
    }
}

/// `v` as a text table.
pub fn table(v: &Value) -> String {
    match v {
        Value::Array(rows) if rows.iter().all(Value::is_object) => {
            let flat: Vec<Vec<(String, String)>> = rows.iter().map(flatten).collect();
            let mut columns: Vec<String> = Vec::new();
            for row in &flat {
                for (k, _) in row {
                    if !columns.contains(k) {
                        columns.push(k.clone());
                    }
                }
            }
            let cells: Vec<Vec<String>> = flat
                .iter()
                .map(|row| {
                    columns
                        .iter()
                        .map(|c| {
                            row.iter()
                                .find(|(k, _)| k == c)
                                .map(|(_, v)| v.clone())
                                .unwrap_or_default()
                        })
                        .collect()
                })
                .collect();
            render(&columns, &cells)
        }
        Value::Object(_) => {
            let rows: Vec<Vec<String>> = flatten(v).into_iter().map(|(k, v)| vec![k, v]).collect();
            render(&["property".to_string(), "value".to_string()], &rows)
        }
        other => format!("{}\n", cell(other)),
    }
}

fn flatten(v: &Value) -> Vec<(String, String)> {
    fn walk(prefix: &str, m: &Map<String, Value>, out: &mut Vec<(String, String)>) {
        for (k, v) in m {
            if HIDDEN.contains(&k.as_str()) {
                continue;
            }
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Object(inner) if !inner.is_empty() => walk(&path, inner, out),
                _ => out.push((path, cell(v))),
            }
        }
    }
    let mut out = Vec::new();
    match v {
        Value::Object(m) => walk("", m, &mut out),
        other => out.push((String::new(), cell(other))),
    }
    out
}

fn cell(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.chars().count() <= CELL {
        return s;
    }
    let mut cut: String = s.chars().take(CELL - 1).collect();
    cut.push('…');
    cut
}

fn render(columns: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(columns);
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn lists_are_rows_objects_are_properties_and_secrets_are_left_out() {
        let rows = json!([
            {"deviceId": "a", "tags": {"site": "oslo"}, "authentication": {"symmetricKey": {"primaryKey": "secret"}}},
            {"deviceId": "bb", "version": 3}
        ]);
        assert_eq!(
            table(&rows),
            "deviceId  tags.site  version\na         oslo\nbb                   3\n"
        );
        let one = json!({"status": 200, "payload": {"ok": true, "$metadata": {"x": 1}}});
        assert_eq!(
            table(&one),
            "property    value\npayload.ok  true\nstatus      200\n"
        );
        assert!(!table(&rows).contains("secret"));
        assert_eq!(table(&json!("x".repeat(60))).chars().count(), CELL + 1);
    }
}
