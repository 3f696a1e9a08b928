//! Values and evaluation. A value is `Option<Cow<Value>>`: `None` is *undefined* (a path that
//! names nothing, a comparison between different types, arithmetic on a string), distinct from
//! JSON `null`. Conditions match only when they evaluate to `true`.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::Value;

use crate::parse::{number, BinOp, Expr, Segment};
use crate::Func;

type Val<'a> = Option<Cow<'a, Value>>;

/// What a query reads its paths from: a twin's JSON, or (for routing) a message's view.
pub trait Document {
    /// The value at `path`, or `None` when it names nothing.
    fn lookup(&self, path: &[Segment]) -> Option<Cow<'_, Value>>;
}

impl Document for Value {
    fn lookup(&self, path: &[Segment]) -> Option<Cow<'_, Value>> {
        let mut v = self;
        for seg in path {
            v = match (seg, v) {
                (Segment::Key(k), Value::Object(m)) => m.get(k)?,
                (Segment::Index(i), Value::Array(a)) => a.get(*i)?,
                _ => return None,
            };
        }
        Some(Cow::Borrowed(v))
    }
}

/// Whether `e` is `true` for `doc`.
pub fn is_true<D: Document + ?Sized>(e: &Expr, doc: &D) -> bool {
    matches!(eval(e, doc).as_deref(), Some(Value::Bool(true)))
}

/// The value of `e` for `doc` (`None`: undefined). Aggregates are the projection's business
/// and are undefined here.
pub fn eval<'a, D: Document + ?Sized>(e: &'a Expr, doc: &'a D) -> Val<'a> {
    match e {
        Expr::Lit(v) => Some(Cow::Borrowed(v)),
        Expr::Undefined => None,
        Expr::Path(p) => doc.lookup(p),
        Expr::List(items) => {
            let mut out = Vec::with_capacity(items.len());
            for i in items {
                // An undefined member leaves the array without it, as a projection does.
                if let Some(v) = eval(i, doc) {
                    out.push(v.into_owned());
                }
            }
            Some(Cow::Owned(Value::Array(out)))
        }
        Expr::Not(x) => match eval(x, doc).as_deref() {
            Some(Value::Bool(b)) => Some(Cow::Owned(Value::Bool(!b))),
            _ => None,
        },
        Expr::Neg(x) => num(&eval(x, doc)).map(|n| owned(number(-n))),
        Expr::Bin(BinOp::And, a, b) => {
            let l = boolean(&eval(a, doc));
            if l == Some(false) {
                return Some(owned(Value::Bool(false)));
            }
            match (l, boolean(&eval(b, doc))) {
                (_, Some(false)) => Some(owned(Value::Bool(false))),
                (Some(true), Some(true)) => Some(owned(Value::Bool(true))),
                _ => None,
            }
        }
        Expr::Bin(BinOp::Or, a, b) => {
            let l = boolean(&eval(a, doc));
            if l == Some(true) {
                return Some(owned(Value::Bool(true)));
            }
            match (l, boolean(&eval(b, doc))) {
                (_, Some(true)) => Some(owned(Value::Bool(true))),
                (Some(false), Some(false)) => Some(owned(Value::Bool(false))),
                _ => None,
            }
        }
        Expr::Bin(op, a, b) => binary(*op, &eval(a, doc), &eval(b, doc)),
        Expr::In {
            value,
            list,
            negated,
        } => {
            let v = eval(value, doc)?;
            let mut found = false;
            for item in list {
                if equal(&v, eval(item, doc).as_deref()) == Some(true) {
                    found = true;
                    break;
                }
            }
            Some(owned(Value::Bool(found != *negated)))
        }
        Expr::Call(f, args) => call(*f, args, doc),
    }
}

fn owned<'a>(v: Value) -> Cow<'a, Value> {
    Cow::Owned(v)
}

fn boolean(v: &Val<'_>) -> Option<bool> {
    v.as_deref().and_then(Value::as_bool)
}

fn num(v: &Val<'_>) -> Option<f64> {
    v.as_deref().and_then(Value::as_f64)
}

fn string<'v>(v: &'v Val<'_>) -> Option<&'v str> {
    v.as_deref().and_then(Value::as_str)
}

/// `=` between two values: defined only between primitives of the same type (null = null).
fn equal(a: &Value, b: Option<&Value>) -> Option<bool> {
    order(a, b?).map(|o| o == Ordering::Equal)
}

/// The order of two primitives of the same type; `None` (undefined) otherwise.
fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

fn binary<'a>(op: BinOp, a: &Val<'_>, b: &Val<'_>) -> Val<'a> {
    let (x, y) = (a.as_deref()?, b.as_deref()?);
    let cmp = |want: fn(Ordering) -> bool| order(x, y).map(|o| owned(Value::Bool(want(o))));
    match op {
        BinOp::Eq => cmp(|o| o == Ordering::Equal),
        BinOp::Ne => cmp(|o| o != Ordering::Equal),
        BinOp::Lt => cmp(|o| o == Ordering::Less),
        BinOp::Gt => cmp(|o| o == Ordering::Greater),
        BinOp::Le => cmp(|o| o != Ordering::Greater),
        BinOp::Ge => cmp(|o| o != Ordering::Less),
        BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem => {
            let (x, y) = (x.as_f64()?, y.as_f64()?);
            let n = match op {
                BinOp::Add => x + y,
                BinOp::Sub => x - y,
                BinOp::Mul => x * y,
                BinOp::Div if y != 0.0 => x / y,
                BinOp::Rem if y != 0.0 => x % y,
                _ => return None,
            };
            n.is_finite().then(|| owned(number(n)))
        }
        BinOp::And | BinOp::Or => None, // evaluated lazily in `eval`
    }
}

fn call<'a, D: Document + ?Sized>(f: Func, args: &'a [Expr], doc: &'a D) -> Val<'a> {
    let arg = |i: usize| args.get(i).and_then(|e| eval(e, doc));
    let test = |t: fn(&Value) -> bool| Some(owned(Value::Bool(arg(0).is_some_and(|v| t(&v)))));
    let math = |m: fn(f64) -> f64| {
        let n = m(num(&arg(0))?);
        n.is_finite().then(|| owned(number(n)))
    };
    let boolean = |b: bool| Some(owned(Value::Bool(b)));
    match f {
        Func::IsDefined => boolean(arg(0).is_some()),
        Func::IsNull => test(Value::is_null),
        Func::IsBool => test(Value::is_boolean),
        Func::IsNumber => test(Value::is_number),
        Func::IsString => test(Value::is_string),
        Func::IsObject => test(Value::is_object),
        Func::IsArray => test(Value::is_array),
        Func::IsPrimitive => test(|v| !v.is_object() && !v.is_array()),
        Func::AsNumber => match arg(0)?.as_ref() {
            Value::Number(n) => Some(owned(Value::Number(n.clone()))),
            Value::String(s) => s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite())
                .map(|n| owned(number(n))),
            _ => None,
        },
        Func::Abs => math(f64::abs),
        Func::Exp => math(f64::exp),
        Func::Square => math(|n| n * n),
        Func::Ceiling => math(f64::ceil),
        Func::Floor => math(f64::floor),
        Func::Sqrt => math(f64::sqrt),
        Func::Sign => math(|n| {
            if n > 0.0 {
                1.0
            } else if n < 0.0 {
                -1.0
            } else {
                0.0
            }
        }),
        Func::Power => {
            let n = num(&arg(0))?.powf(num(&arg(1))?);
            n.is_finite().then(|| owned(number(n)))
        }
        Func::Concat => {
            let mut out = String::new();
            for i in 0..args.len() {
                out.push_str(string(&arg(i))?);
            }
            Some(owned(Value::String(out)))
        }
        Func::Length => Some(owned(number(string(&arg(0))?.chars().count() as f64))),
        Func::Lower => Some(owned(Value::String(string(&arg(0))?.to_lowercase()))),
        Func::Upper => Some(owned(Value::String(string(&arg(0))?.to_uppercase()))),
        Func::Substring => {
            // SUBSTRING(s, start[, length]): zero-based start, in characters, as Azure's
            // routing documentation describes it.
            let s = arg(0);
            let s = string(&s)?;
            let start = index(num(&arg(1))?)?;
            let len = match args.len() {
                3 => index(num(&arg(2))?)?,
                _ => usize::MAX,
            };
            Some(owned(Value::String(
                s.chars().skip(start).take(len).collect(),
            )))
        }
        Func::IndexOf => {
            let (s, sub) = (arg(0), arg(1));
            let (s, sub) = (string(&s)?, string(&sub)?);
            let at = s
                .find(sub)
                .map_or(-1.0, |byte| s[..byte].chars().count() as f64);
            Some(owned(number(at)))
        }
        Func::StartsWith | Func::EndsWith | Func::Contains => {
            let (s, sub) = (arg(0), arg(1));
            let (s, sub) = (string(&s)?, string(&sub)?);
            boolean(match f {
                Func::StartsWith => s.starts_with(sub),
                Func::EndsWith => s.ends_with(sub),
                _ => s.contains(sub),
            })
        }
        Func::Count | Func::Avg | Func::Sum | Func::Min | Func::Max => None,
    }
}

/// A non-negative whole number as an index; `None` for anything else.
fn index(n: f64) -> Option<usize> {
    (n >= 0.0 && n.fract() == 0.0).then_some(n.min(usize::MAX as f64) as usize)
}

/// The order MIN and MAX use: numbers, then strings; other values are skipped.
pub(crate) fn extreme_order(a: &Value, b: &Value) -> Option<Ordering> {
    order(a, b)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::condition;

    fn val(src: &str, doc: &Value) -> Option<Value> {
        let e = condition(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        eval(&e, doc).map(Cow::into_owned)
    }

    fn twin() -> Value {
        json!({
            "deviceId": "d1", "status": "enabled",
            "tags": {"location": {"region": "US", "plant": 43}, "floor-2": true, "none": null},
            "properties": {"reported": {"connectivity": "wifi", "temp": 21.5, "list": [1, 2]}}
        })
    }

    #[test]
    fn three_valued_logic() {
        let t = twin();
        assert_eq!(val("tags.location.region = 'US'", &t), Some(json!(true)));
        assert_eq!(val("tags.missing = 'US'", &t), None);
        assert_eq!(
            val("tags.missing != 'US'", &t),
            None,
            "undefined is not 'not equal'"
        );
        assert_eq!(
            val("tags.location.plant = '43'", &t),
            None,
            "number and string do not compare"
        );
        assert_eq!(val("tags.none = null", &t), Some(json!(true)));
        assert_eq!(val("false AND tags.missing = 1", &t), Some(json!(false)));
        assert_eq!(val("true AND tags.missing = 1", &t), None);
        assert_eq!(val("true OR tags.missing = 1", &t), Some(json!(true)));
        assert_eq!(val("NOT (tags.missing = 1)", &t), None);
        assert_eq!(val("NOT (status = 'disabled')", &t), Some(json!(true)));
        assert_eq!(
            val("tags.location = tags.location", &t),
            None,
            "objects do not compare"
        );
        for (src, want) in [
            (
                "properties.reported.connectivity IN ['wired', 'wifi']",
                true,
            ),
            (
                "properties.reported.connectivity NIN ['wired', 'wifi']",
                false,
            ),
            ("properties.reported.connectivity NOT IN ['wired']", true),
            ("tags['floor-2']", true),
            ("properties.reported.list[1] = 2", true),
            ("'abc' < 'abd' AND 2 >= 2 AND 3 <> 4 AND false < true", true),
        ] {
            assert_eq!(val(src, &t), Some(json!(want)), "{src}");
        }
        assert_eq!(val("tags.missing IN [1]", &t), None);
        assert!(is_true(
            &condition("status = 'enabled'").expect("valid"),
            &t
        ));
        assert!(
            !is_true(&condition("tags.location.plant").expect("valid"), &t),
            "43 is not true"
        );
    }

    #[test]
    fn arithmetic_and_functions() {
        let t = twin();
        for (src, want) in [
            ("1 + 2 * 3 - 4 / 2", json!(5)),
            ("7 % 4", json!(3)),
            ("properties.reported.temp * 2", json!(43)),
            ("-tags.location.plant", json!(-43)),
            ("0x10 + .5", json!(16.5)),
            ("ABS(-2.5)", json!(2.5)),
            ("POWER(2, 10)", json!(1024)),
            ("SQUARE(3) + SQRT(16) + CEILING(1.2) + FLOOR(1.8) + SIGN(-7)", json!(15)),
            ("CONCAT(deviceId, '-', status)", json!("d1-enabled")),
            ("LENGTH('héllo')", json!(5)),
            ("UPPER(tags.location.region) = 'US' AND LOWER('Ab') = 'ab'", json!(true)),
            ("SUBSTRING('abcdef', 2)", json!("cdef")),
            ("SUBSTRING('abcdef', 1, 3)", json!("bcd")),
            ("INDEX_OF('abcabc', 'ca')", json!(2)),
            ("INDEX_OF('abc', 'z')", json!(-1)),
            ("STARTS_WITH(deviceId, 'd') AND ENDS_WITH(deviceId, '1') AND CONTAINS('xyz', 'y')", json!(true)),
            ("startswith(deviceId, 'x')", json!(false)),
            ("AS_NUMBER('12.5') + 1", json!(13.5)),
            ("IS_DEFINED(tags.none) AND IS_NULL(tags.none) AND NOT IS_DEFINED(tags.nope)", json!(true)),
            ("IS_STRING(deviceId) AND IS_NUMBER(1) AND IS_BOOL(true) AND IS_OBJECT(tags) AND IS_ARRAY(properties.reported.list)", json!(true)),
            ("IS_PRIMITIVE(tags) OR IS_PRIMITIVE(properties.reported.list)", json!(false)),
            ("EXP(0)", json!(1)),
        ] {
            assert_eq!(val(src, &t), Some(want.clone()), "{src}");
        }
        for src in [
            "1 / 0",
            "'a' + 1",
            "AS_NUMBER('x')",
            "LENGTH(3)",
            "SQRT(-1)",
            "CONCAT('a', 1)",
            "SUBSTRING('a', -1)",
            "tags.location.plant % 0",
        ] {
            assert_eq!(val(src, &t), None, "{src}");
        }
    }
}
