//! Where a receiver starts (spec §3.3): the selector filter of its source —
//! `amqp.annotation.x-opt-offset > '-1'` and the like — under either descriptor (the symbol
//! `apache.org:selector-filter:string`, or JS's ulong `0x0000468C00000004`).

use roost_amqp::Value;

/// The JS SDK's numeric descriptor for the selector filter.
pub const SELECTOR_CODE: u64 = 0x0000_468C_0000_0004;
pub const SELECTOR_NAME: &str = "apache.org:selector-filter:string";

/// A starting position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// From the first record retained (no filter, or `x-opt-offset > '-1'`).
    Earliest,
    /// Only records appended after the receiver attached (`'@latest'`).
    Latest,
    /// From this offset (equal to the sequence number here); `inclusive` or after it.
    Offset { offset: i64, inclusive: bool },
    /// From the first record enqueued at or after (or strictly after) this time, in ms.
    EnqueuedTime { ms: i64, inclusive: bool },
}

/// Why a filter cannot be followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter {0:?} is not one this endpoint reads")]
pub struct FilterError(pub String);

/// The start a source's filter set asks for (`Value::Null`: none, from the start).
pub fn start(filter_set: &Value) -> Result<Start, FilterError> {
    let Value::Map(pairs) = filter_set else {
        return match filter_set {
            Value::Null => Ok(Start::Earliest),
            _ => Err(FilterError("a filter set that is not a map".into())),
        };
    };
    for (_, v) in pairs {
        let Value::Described(d) = v else { continue };
        let is_selector = match &d.0 {
            Value::Symbol(s) => s.as_str() == SELECTOR_NAME,
            other => other.as_u64() == Some(SELECTOR_CODE),
        };
        if !is_selector {
            continue;
        }
        let Some(expr) = d.1.as_str() else {
            return Err(FilterError("a selector that is not a string".into()));
        };
        return selector(expr);
    }
    Ok(Start::Earliest)
}

/// Parses `amqp.annotation.{x-opt-offset|x-opt-sequence-number|x-opt-enqueued-time} {>|>=} '{v}'`.
pub fn selector(expr: &str) -> Result<Start, FilterError> {
    let bad = || FilterError(expr.chars().take(200).collect());
    let mut words = expr.split_whitespace();
    let (Some(name), Some(op), Some(value), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(bad());
    };
    let inclusive = match op {
        ">" => false,
        ">=" => true,
        _ => return Err(bad()),
    };
    let value = value
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .ok_or_else(bad)?;
    let name = name.to_ascii_lowercase();
    match name.strip_prefix("amqp.annotation.").ok_or_else(bad)? {
        "x-opt-offset" if value == "@latest" => Ok(Start::Latest),
        "x-opt-offset" | "x-opt-sequence-number" => {
            let offset: i64 = value.parse().map_err(|_| bad())?;
            if offset == -1 && !inclusive {
                return Ok(Start::Earliest);
            }
            Ok(Start::Offset { offset, inclusive })
        }
        "x-opt-enqueued-time" => Ok(Start::EnqueuedTime {
            ms: value.parse().map_err(|_| bad())?,
            inclusive,
        }),
        _ => Err(bad()),
    }
}

impl Start {
    /// The first offset to deliver in a partition holding records `first..next`; an
    /// enqueued-time start needs `by_time(ms, inclusive)`, the first offset enqueued at (or
    /// after) that time.
    pub fn first_offset(
        self,
        first: u64,
        next: u64,
        by_time: impl FnOnce(i64, bool) -> u64,
    ) -> u64 {
        match self {
            Start::Earliest => first,
            Start::Latest => next,
            Start::Offset { offset, inclusive } => {
                let from = if inclusive {
                    offset
                } else {
                    offset.saturating_add(1)
                };
                (from.max(0) as u64).clamp(first, next)
            }
            Start::EnqueuedTime { ms, inclusive } => by_time(ms, inclusive).clamp(first, next),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(descriptor: Value, expr: &str) -> Value {
        Value::Map(vec![(
            Value::symbol(SELECTOR_NAME),
            Value::Described(Box::new((descriptor, Value::string(expr)))),
        )])
    }

    #[test]
    fn the_sdks_selectors() {
        let py = |e: &str| start(&set(Value::symbol(SELECTOR_NAME), e));
        assert_eq!(
            py("amqp.annotation.x-opt-offset > '-1'"),
            Ok(Start::Earliest)
        );
        assert_eq!(
            py("amqp.annotation.x-opt-offset > '@latest'"),
            Ok(Start::Latest)
        );
        assert_eq!(
            py("amqp.annotation.x-opt-offset >= '12'"),
            Ok(Start::Offset {
                offset: 12,
                inclusive: true
            })
        );
        assert_eq!(
            py("amqp.annotation.x-opt-offset > '12'"),
            Ok(Start::Offset {
                offset: 12,
                inclusive: false
            })
        );
        assert_eq!(
            py("amqp.annotation.x-opt-sequence-number > '7'"),
            Ok(Start::Offset {
                offset: 7,
                inclusive: false
            })
        );
        assert_eq!(
            py("amqp.annotation.x-opt-enqueued-time >= '1767225600000'"),
            Ok(Start::EnqueuedTime {
                ms: 1_767_225_600_000,
                inclusive: true
            })
        );
        let js = start(&set(
            Value::Ulong(SELECTOR_CODE),
            "amqp.annotation.x-opt-offset >= '3'",
        ));
        assert_eq!(
            js,
            Ok(Start::Offset {
                offset: 3,
                inclusive: true
            })
        );
        assert_eq!(start(&Value::Null), Ok(Start::Earliest));
        assert!(py("amqp.annotation.x-opt-offset = '1'").is_err());
        assert!(py("amqp.annotation.x-opt-partition-key > 'a'").is_err());
        assert!(py("amqp.annotation.x-opt-offset > 12").is_err());
    }

    #[test]
    fn starts_land_inside_the_partition() {
        let never = |_, _| unreachable!();
        assert_eq!(Start::Earliest.first_offset(5, 9, never), 5);
        assert_eq!(Start::Latest.first_offset(5, 9, never), 9);
        assert_eq!(
            Start::Offset {
                offset: 6,
                inclusive: false
            }
            .first_offset(5, 9, never),
            7
        );
        assert_eq!(
            Start::Offset {
                offset: 6,
                inclusive: true
            }
            .first_offset(5, 9, never),
            6
        );
        assert_eq!(
            Start::Offset {
                offset: 2,
                inclusive: true
            }
            .first_offset(5, 9, never),
            5,
            "retention passed it"
        );
        assert_eq!(
            Start::Offset {
                offset: 90,
                inclusive: true
            }
            .first_offset(5, 9, never),
            9
        );
        assert_eq!(
            Start::EnqueuedTime {
                ms: 1,
                inclusive: true
            }
            .first_offset(5, 9, |_, _| 7),
            7
        );
    }
}
