//! What a parsed query does with rows: which match, what each becomes, how rows aggregate, and
//! which device ids a condition is confined to (the one index control has: the primary key).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::eval::{eval, extreme_order, is_true, Document};
use crate::parse::{number, BinOp, Expr, Item, Query, Segment, Select};
use crate::Func;

impl Query {
    /// Whether a row passes the `WHERE` clause.
    pub fn matches<D: Document + ?Sized>(&self, row: &D) -> bool {
        self.filter.as_ref().is_none_or(|f| is_true(f, row))
    }

    /// Whether the result is groups (`GROUP BY`, or aggregates over all rows) rather than one
    /// item per matching row.
    pub fn aggregates(&self) -> bool {
        !self.group_by.is_empty()
            || matches!(&self.select, Select::Items(items)
                if items.iter().any(|i| matches!(i.expr, Expr::Call(f, _) if f.is_aggregate())))
    }

    /// What a matching row becomes: the row itself for `SELECT *`, else an object of the
    /// projected values (an undefined one is left out).
    pub fn project(&self, row: &Value) -> Value {
        let Select::Items(items) = &self.select else {
            return row.clone();
        };
        let mut out = Map::new();
        for Item { expr, name } in items {
            if let Some(v) = eval(expr, row) {
                out.insert(name.clone(), v.into_owned());
            }
        }
        Value::Object(out)
    }

    /// The device ids outside of which no row can match, when the condition says so
    /// (`deviceId = 'a'`, `deviceId IN ['a', 'b']`, either under `AND`, both sides of `OR`);
    /// `None` when any device may match and the rows must be scanned.
    pub fn device_ids(&self) -> Option<Vec<String>> {
        let mut ids = hint(self.filter.as_ref()?)?;
        ids.sort();
        ids.dedup();
        Some(ids)
    }
}

fn is_device_id(e: &Expr) -> bool {
    matches!(e, Expr::Path(p) if p.len() == 1 && p[0] == Segment::Key("deviceId".into()))
}

fn hint(e: &Expr) -> Option<Vec<String>> {
    match e {
        Expr::Bin(BinOp::Eq, a, b) => match (&**a, &**b) {
            (p, Expr::Lit(Value::String(s))) | (Expr::Lit(Value::String(s)), p)
                if is_device_id(p) =>
            {
                Some(vec![s.clone()])
            }
            _ => None,
        },
        Expr::In {
            value,
            list,
            negated: false,
        } if is_device_id(value) => list
            .iter()
            .map(|i| match i {
                Expr::Lit(Value::String(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        Expr::Bin(BinOp::And, a, b) => hint(a).or_else(|| hint(b)),
        Expr::Bin(BinOp::Or, a, b) => {
            let mut l = hint(a)?;
            l.extend(hint(b)?);
            Some(l)
        }
        _ => None,
    }
}

/// One aggregate's running state.
#[derive(Debug, Clone)]
enum Acc {
    Key,
    Count(u64),
    Sum(f64),
    Avg(f64, u64),
    Min(Option<Value>),
    Max(Option<Value>),
}

/// The groups of an aggregating query, fed row by row and finished into result items (ordered
/// by their `GROUP BY` values, so pages are stable).
pub struct Groups<'q> {
    query: &'q Query,
    groups: BTreeMap<String, (Vec<Option<Value>>, Vec<Acc>)>,
}

impl<'q> Groups<'q> {
    pub fn new(query: &'q Query) -> Self {
        let mut groups = BTreeMap::new();
        if query.group_by.is_empty() {
            // Aggregates over no rows still give one item (`COUNT()` is 0).
            groups.insert(String::new(), (Vec::new(), Self::fresh(query)));
        }
        Groups { query, groups }
    }

    fn items(query: &Query) -> &[Item] {
        match &query.select {
            Select::Items(items) => items,
            Select::All => &[],
        }
    }

    fn fresh(query: &Query) -> Vec<Acc> {
        Self::items(query)
            .iter()
            .map(|i| match i.expr {
                Expr::Call(Func::Count, _) => Acc::Count(0),
                Expr::Call(Func::Sum, _) => Acc::Sum(0.0),
                Expr::Call(Func::Avg, _) => Acc::Avg(0.0, 0),
                Expr::Call(Func::Min, _) => Acc::Min(None),
                Expr::Call(Func::Max, _) => Acc::Max(None),
                _ => Acc::Key,
            })
            .collect()
    }

    /// Adds a row that matched the query.
    pub fn add(&mut self, row: &Value) {
        let key: Vec<Option<Value>> = self
            .query
            .group_by
            .iter()
            .map(|p| row.lookup(p).map(|v| v.into_owned()))
            .collect();
        // Undefined (`u`) apart from JSON null (`v null`): they are different groups.
        let mut name = String::new();
        for k in &key {
            match k {
                None => name.push('u'),
                Some(v) => {
                    name.push('v');
                    name.push_str(&v.to_string());
                }
            }
            name.push('\u{0}');
        }
        let query = self.query;
        let (_, accs) = self
            .groups
            .entry(name)
            .or_insert_with(|| (key, Self::fresh(query)));
        for (acc, item) in accs.iter_mut().zip(Self::items(query)) {
            let arg = match &item.expr {
                Expr::Call(_, args) => args.first().and_then(|a| eval(a, row)),
                _ => None,
            };
            match acc {
                Acc::Key => {}
                Acc::Count(n) => *n += 1,
                Acc::Sum(s) => *s += arg.and_then(|v| v.as_f64()).unwrap_or(0.0),
                Acc::Avg(s, n) => {
                    if let Some(x) = arg.and_then(|v| v.as_f64()) {
                        *s += x;
                        *n += 1;
                    }
                }
                Acc::Min(m) | Acc::Max(m) => {
                    let want = if matches!(acc_kind(item), Func::Min) {
                        std::cmp::Ordering::Less
                    } else {
                        std::cmp::Ordering::Greater
                    };
                    if let Some(v) = arg.filter(|v| v.is_number() || v.is_string()) {
                        let better = m
                            .as_ref()
                            .is_none_or(|cur| extreme_order(&v, cur) == Some(want));
                        if better {
                            *m = Some(v.into_owned());
                        }
                    }
                }
            }
        }
    }

    /// The result items, one per group.
    pub fn finish(self) -> Vec<Value> {
        let items = Self::items(self.query);
        self.groups
            .into_values()
            .map(|(key, accs)| {
                let mut out = Map::new();
                for (acc, item) in accs.into_iter().zip(items) {
                    let v = match acc {
                        Acc::Key => {
                            let at = self.query.group_by.iter().position(|p| match &item.expr {
                                Expr::Path(q) => q == p,
                                _ => false,
                            });
                            at.and_then(|i| key.get(i).cloned().flatten())
                        }
                        Acc::Count(n) => Some(Value::from(n)),
                        Acc::Sum(s) => Some(number(s)),
                        Acc::Avg(s, n) => (n > 0).then(|| number(s / n as f64)),
                        Acc::Min(m) | Acc::Max(m) => m,
                    };
                    if let Some(v) = v {
                        out.insert(item.name.clone(), v);
                    }
                }
                Value::Object(out)
            })
            .collect()
    }
}

fn acc_kind(item: &Item) -> Func {
    match item.expr {
        Expr::Call(f, _) => f,
        _ => Func::Count,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::query;

    fn rows() -> Vec<Value> {
        vec![
            json!({"deviceId": "a", "tags": {"s": "ok", "n": 1}}),
            json!({"deviceId": "b", "tags": {"s": "ok", "n": 5}}),
            json!({"deviceId": "c", "tags": {"s": "bad", "n": 3}}),
            json!({"deviceId": "d", "tags": {}}),
        ]
    }

    fn run(src: &str) -> Vec<Value> {
        let q = query(src).expect("valid");
        let rows = rows();
        let matching = rows.iter().filter(|r| q.matches(*r));
        if q.aggregates() {
            let mut g = Groups::new(&q);
            matching.for_each(|r| g.add(r));
            g.finish()
        } else {
            matching.map(|r| q.project(r)).collect()
        }
    }

    #[test]
    fn projections_and_aggregates() {
        assert_eq!(run("SELECT * FROM devices WHERE tags.n > 2").len(), 2);
        assert_eq!(
            run("SELECT deviceId, tags.n AS n FROM devices WHERE deviceId IN ['a', 'd']"),
            [json!({"deviceId": "a", "n": 1}), json!({"deviceId": "d"})]
        );
        assert_eq!(
            run("SELECT tags.s AS s, COUNT() AS n FROM devices GROUP BY tags.s"),
            [
                json!({"n": 1}),
                json!({"n": 1, "s": "bad"}),
                json!({"n": 2, "s": "ok"})
            ]
        );
        assert_eq!(
            run("SELECT COUNT() AS n, SUM(tags.n) AS sum, AVG(tags.n) AS avg, MIN(tags.n) AS lo, MAX(deviceId) AS hi FROM devices"),
            [json!({"n": 4, "sum": 9, "avg": 3, "lo": 1, "hi": "d"})]
        );
        assert_eq!(
            run("SELECT COUNT() AS n, AVG(tags.n) AS avg FROM devices WHERE deviceId = 'zz'"),
            [json!({"n": 0})]
        );
    }

    #[test]
    fn device_id_hints() {
        let ids = |src: &str| query(src).expect("valid").device_ids();
        assert_eq!(
            ids("SELECT * FROM devices WHERE deviceId = 'a'"),
            Some(vec!["a".into()])
        );
        assert_eq!(
            ids("SELECT * FROM devices WHERE tags.x = 1 AND deviceId IN ['b', 'a', 'b']"),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            ids("SELECT * FROM devices WHERE deviceId = 'a' OR 'c' = deviceId"),
            Some(vec!["a".into(), "c".into()])
        );
        assert_eq!(
            ids("SELECT * FROM devices WHERE deviceId = 'a' OR tags.x = 1"),
            None
        );
        assert_eq!(ids("SELECT * FROM devices WHERE deviceId NIN ['a']"), None);
        assert_eq!(ids("SELECT * FROM devices"), None);
    }
}
