//! The grammar, by recursive descent with a depth limit (a query is user input: nesting must
//! not be able to overflow the stack):
//!
//! ```text
//! query   := SELECT [TOP n] ('*' | item {',' item}) FROM source [WHERE expr] [GROUP BY path {',' path}]
//! item    := expr [AS name]
//! source  := devices | devices.modules | devices.jobs
//! expr    := and {OR and}          and := not {AND not}          not := NOT not | cmp
//! cmp     := sum [(= | != | <> | < | > | <= | >=) sum | [NOT] IN list | NIN list]
//! sum     := term {(+ | -) term}   term := unary {(* | / | %) unary}   unary := - unary | primary
//! primary := literal | list | '(' expr ')' | name '(' [expr {',' expr}] ')' | path
//! path    := name {'.' name | '[' (string | integer) ']'}
//! ```

use serde_json::Value;

use crate::lex::{tokens, Tok, Token};
use crate::{Func, QueryError};

/// The longest query text taken (IoT Hub's own limit is not published; queries are short).
pub const MAX_QUERY_BYTES: usize = 8 * 1024;
/// How deep expressions may nest, counting each operator of a chain (`a OR b OR c` is three
/// deep): evaluation recurses over the tree, so its depth is what a query may cost the stack.
pub const MAX_DEPTH: usize = 256;

/// One step of a path: a member name or an array index.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

pub type Path = Vec<Segment>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    And,
    Or,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Lit(Value),
    /// `undefined`: the value of a path that names nothing.
    Undefined,
    Path(Path),
    List(Vec<Expr>),
    Not(Box<Expr>),
    Neg(Box<Expr>),
    Bin(BinOp, Box<Expr>, Box<Expr>),
    /// `x IN [..]` (`negated`: `NIN`, `NOT IN`).
    In {
        value: Box<Expr>,
        list: Vec<Expr>,
        negated: bool,
    },
    Call(Func, Vec<Expr>),
}

/// What a query reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Devices,
    Modules,
    Jobs,
}

/// One projected value and the name it is given in the result.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub expr: Expr,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Select {
    All,
    Items(Vec<Item>),
}

/// A parsed `SELECT`.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub top: Option<u64>,
    pub select: Select,
    pub from: Source,
    pub filter: Option<Expr>,
    pub group_by: Vec<Path>,
}

/// Parses a whole query.
pub fn query(src: &str) -> Result<Query, QueryError> {
    let mut p = Parser::new(src)?;
    let q = p.query()?;
    p.end()?;
    Ok(q)
}

/// The text of a whole query's `WHERE` condition (`None`: it has none), for a caller that
/// runs the condition in a query of its own (a job's `SELECT * FROM devices WHERE …`). A query
/// that aggregates, groups or has `TOP` is refused: a condition selects rows, nothing else.
pub fn where_text(src: &str) -> Result<Option<&str>, QueryError> {
    let q = query(src)?;
    if q.top.is_some() || !q.group_by.is_empty() || q.aggregates() {
        return Err(QueryError::new(
            0,
            "only SELECT … FROM devices WHERE … selects devices",
        ));
    }
    let toks = tokens(src)?;
    let at = toks
        .iter()
        .position(|t| matches!(&t.tok, Tok::Name(n) if n.eq_ignore_ascii_case("WHERE")));
    Ok(at.map(|i| toks.get(i + 1).map_or("", |t| src[t.at..].trim())))
}

/// Parses a condition alone: a `WHERE` clause without the keyword (a job's `queryCondition`,
/// a route's condition, a configuration's `targetCondition`).
pub fn condition(src: &str) -> Result<Expr, QueryError> {
    let mut p = Parser::new(src)?;
    let e = p.expr()?;
    p.end()?;
    if contains_aggregate(&e) {
        return Err(QueryError::new(0, "aggregates are allowed only in SELECT"));
    }
    Ok(e)
}

fn contains_aggregate(e: &Expr) -> bool {
    match e {
        Expr::Call(f, args) => f.is_aggregate() || args.iter().any(contains_aggregate),
        Expr::Not(x) | Expr::Neg(x) => contains_aggregate(x),
        Expr::Bin(_, a, b) => contains_aggregate(a) || contains_aggregate(b),
        Expr::In { value, list, .. } => {
            contains_aggregate(value) || list.iter().any(contains_aggregate)
        }
        Expr::List(l) => l.iter().any(contains_aggregate),
        Expr::Lit(_) | Expr::Undefined | Expr::Path(_) => false,
    }
}

struct Parser<'s> {
    src: &'s str,
    toks: Vec<Token>,
    pos: usize,
    depth: usize,
}

impl<'s> Parser<'s> {
    fn new(src: &'s str) -> Result<Self, QueryError> {
        if src.len() > MAX_QUERY_BYTES {
            return Err(QueryError::new(
                0,
                format!("the query is longer than {MAX_QUERY_BYTES} bytes"),
            ));
        }
        Ok(Parser {
            src,
            toks: tokens(src)?,
            pos: 0,
            depth: 0,
        })
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.tok)
    }

    fn peek_at(&self, n: usize) -> Option<&Tok> {
        self.toks.get(self.pos + n).map(|t| &t.tok)
    }

    /// The offset of the next token, or the end of the text.
    fn at(&self) -> usize {
        self.toks.get(self.pos).map_or(self.src.len(), |t| t.at)
    }

    fn error<T>(&self, what: impl Into<String>) -> Result<T, QueryError> {
        let found = match self.toks.get(self.pos) {
            None => "the end of the query".to_string(),
            Some(t) => {
                let end = self.toks.get(self.pos + 1).map_or(self.src.len(), |n| n.at);
                format!("'{}'", self.src[t.at..end].trim())
            }
        };
        Err(QueryError::new(
            self.at(),
            format!("expected {}, found {found}", what.into()),
        ))
    }

    fn eat(&mut self, tok: &Tok) -> bool {
        if self.peek() == Some(tok) {
            self.pos += 1;
            return true;
        }
        false
    }

    fn expect(&mut self, tok: Tok, what: &str) -> Result<(), QueryError> {
        if self.eat(&tok) {
            return Ok(());
        }
        self.error(what)
    }

    fn is_keyword(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Name(n)) if n.eq_ignore_ascii_case(kw))
    }

    fn eat_keyword(&mut self, kw: &str) -> bool {
        if self.is_keyword(kw) {
            self.pos += 1;
            return true;
        }
        false
    }

    fn keyword(&mut self, kw: &str) -> Result<(), QueryError> {
        if self.eat_keyword(kw) {
            return Ok(());
        }
        self.error(kw)
    }

    fn end(&self) -> Result<(), QueryError> {
        if self.pos < self.toks.len() {
            return self.error("the end of the query");
        }
        Ok(())
    }

    fn query(&mut self) -> Result<Query, QueryError> {
        self.keyword("SELECT")?;
        let top = if self.eat_keyword("TOP") {
            match self.peek() {
                Some(Tok::Num(n)) if n.fract() == 0.0 && *n >= 0.0 => {
                    let n = *n as u64;
                    self.pos += 1;
                    Some(n)
                }
                _ => return self.error("a whole number after TOP"),
            }
        } else {
            None
        };
        let select = if self.eat(&Tok::Star) {
            Select::All
        } else {
            let mut items = Vec::new();
            loop {
                let expr = self.expr()?;
                let name = if self.eat_keyword("AS") {
                    self.name("a name after AS")?
                } else {
                    match &expr {
                        Expr::Path(p) => match p.last() {
                            Some(Segment::Key(k)) => k.clone(),
                            _ => format!("${}", items.len() + 1),
                        },
                        _ => format!("${}", items.len() + 1),
                    }
                };
                items.push(Item { expr, name });
                if !self.eat(&Tok::Comma) {
                    break;
                }
            }
            Select::Items(items)
        };
        self.keyword("FROM")?;
        let from = self.source()?;
        let filter = if self.eat_keyword("WHERE") {
            let e = self.expr()?;
            if contains_aggregate(&e) {
                return Err(QueryError::new(0, "aggregates are allowed only in SELECT"));
            }
            Some(e)
        } else {
            None
        };
        let mut group_by = Vec::new();
        if self.eat_keyword("GROUP") {
            self.keyword("BY")?;
            loop {
                match self.primary()? {
                    Expr::Path(p) => group_by.push(p),
                    _ => return Err(QueryError::new(self.at(), "GROUP BY takes property paths")),
                }
                if !self.eat(&Tok::Comma) {
                    break;
                }
            }
        }
        let mut q = Query {
            top,
            select,
            from,
            filter,
            group_by,
        };
        q.strip_source_prefix();
        check_shape(&q)?;
        Ok(q)
    }

    fn source(&mut self) -> Result<Source, QueryError> {
        let at = self.at();
        let mut name = self.name("devices, devices.modules or devices.jobs")?;
        while self.eat(&Tok::Dot) {
            name.push('.');
            name.push_str(&self.name("a name")?);
        }
        match name.to_ascii_lowercase().as_str() {
            "devices" => Ok(Source::Devices),
            "devices.modules" => Ok(Source::Modules),
            "devices.jobs" => Ok(Source::Jobs),
            _ => Err(QueryError::new(
                at,
                format!(
                    "cannot query '{name}': FROM takes devices, devices.modules or devices.jobs"
                ),
            )),
        }
    }

    fn name(&mut self, what: &str) -> Result<String, QueryError> {
        if let Some(Tok::Name(n)) = self.peek() {
            let n = n.clone();
            self.pos += 1;
            return Ok(n);
        }
        self.error(what)
    }

    pub fn expr(&mut self) -> Result<Expr, QueryError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(QueryError::new(
                self.at(),
                format!("expressions nest deeper than {MAX_DEPTH}"),
            ));
        }
        let e = self.or();
        self.depth -= 1;
        e
    }

    /// One more level of the tree being built: a chain's operators count as nesting.
    fn deeper(&mut self) -> Result<(), QueryError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(QueryError::new(
                self.at(),
                format!("expressions nest deeper than {MAX_DEPTH}"),
            ));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Expr, QueryError> {
        let start = self.depth;
        let mut left = self.and()?;
        while self.eat_keyword("OR") {
            self.deeper()?;
            left = Expr::Bin(BinOp::Or, Box::new(left), Box::new(self.and()?));
        }
        self.depth = start;
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, QueryError> {
        let start = self.depth;
        let mut left = self.not()?;
        while self.eat_keyword("AND") {
            self.deeper()?;
            left = Expr::Bin(BinOp::And, Box::new(left), Box::new(self.not()?));
        }
        self.depth = start;
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, QueryError> {
        if self.eat_keyword("NOT") {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(QueryError::new(self.at(), "NOT nests too deep"));
            }
            let e = self.not();
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(e?)));
        }
        self.cmp()
    }

    fn cmp(&mut self) -> Result<Expr, QueryError> {
        let left = self.sum()?;
        let op = match self.peek() {
            Some(Tok::Eq) => BinOp::Eq,
            Some(Tok::Ne) => BinOp::Ne,
            Some(Tok::Lt) => BinOp::Lt,
            Some(Tok::Gt) => BinOp::Gt,
            Some(Tok::Le) => BinOp::Le,
            Some(Tok::Ge) => BinOp::Ge,
            _ => {
                let negated = if self.is_keyword("NOT")
                    && matches!(self.peek_at(1), Some(Tok::Name(n)) if n.eq_ignore_ascii_case("IN"))
                {
                    self.pos += 2;
                    true
                } else if self.eat_keyword("NIN") {
                    true
                } else if self.eat_keyword("IN") {
                    false
                } else {
                    return Ok(left);
                };
                let list = match self.primary()? {
                    Expr::List(l) => l,
                    _ => return self.error("a list [..] after IN"),
                };
                return Ok(Expr::In {
                    value: Box::new(left),
                    list,
                    negated,
                });
            }
        };
        self.pos += 1;
        Ok(Expr::Bin(op, Box::new(left), Box::new(self.sum()?)))
    }

    fn sum(&mut self) -> Result<Expr, QueryError> {
        let start = self.depth;
        let mut left = self.term()?;
        loop {
            let op = match self.peek() {
                Some(Tok::Plus) => BinOp::Add,
                Some(Tok::Minus) => BinOp::Sub,
                _ => break,
            };
            self.pos += 1;
            self.deeper()?;
            left = Expr::Bin(op, Box::new(left), Box::new(self.term()?));
        }
        self.depth = start;
        Ok(left)
    }

    fn term(&mut self) -> Result<Expr, QueryError> {
        let start = self.depth;
        let mut left = self.unary()?;
        loop {
            let op = match self.peek() {
                Some(Tok::Star) => BinOp::Mul,
                Some(Tok::Slash) => BinOp::Div,
                Some(Tok::Percent) => BinOp::Rem,
                _ => break,
            };
            self.pos += 1;
            self.deeper()?;
            left = Expr::Bin(op, Box::new(left), Box::new(self.unary()?));
        }
        self.depth = start;
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, QueryError> {
        if self.eat(&Tok::Minus) {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(QueryError::new(self.at(), "'-' nests too deep"));
            }
            let e = self.unary();
            self.depth -= 1;
            return Ok(match e? {
                Expr::Lit(Value::Number(n)) => Expr::Lit(number(-n.as_f64().unwrap_or(0.0))),
                e => Expr::Neg(Box::new(e)),
            });
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, QueryError> {
        let at = self.at();
        match self.peek().cloned() {
            Some(Tok::Num(n)) => {
                self.pos += 1;
                Ok(Expr::Lit(number(n)))
            }
            Some(Tok::Str(s)) => {
                self.pos += 1;
                Ok(Expr::Lit(Value::String(s)))
            }
            Some(Tok::LParen) => {
                self.pos += 1;
                let e = self.expr()?;
                self.expect(Tok::RParen, "')'")?;
                Ok(e)
            }
            Some(Tok::LBracket) => {
                self.pos += 1;
                let mut items = Vec::new();
                if !self.eat(&Tok::RBracket) {
                    loop {
                        items.push(self.expr()?);
                        if self.eat(&Tok::RBracket) {
                            break;
                        }
                        self.expect(Tok::Comma, "',' or ']'")?;
                    }
                }
                Ok(Expr::List(items))
            }
            Some(Tok::Name(name)) => {
                self.pos += 1;
                if self.peek() == Some(&Tok::LParen) {
                    return self.call(&name, at);
                }
                match name.to_ascii_lowercase().as_str() {
                    "true" => return Ok(Expr::Lit(Value::Bool(true))),
                    "false" => return Ok(Expr::Lit(Value::Bool(false))),
                    "null" => return Ok(Expr::Lit(Value::Null)),
                    "undefined" => return Ok(Expr::Undefined),
                    _ => {}
                }
                let mut path = vec![Segment::Key(name)];
                loop {
                    if self.eat(&Tok::Dot) {
                        path.push(Segment::Key(self.name("a property name after '.'")?));
                    } else if self.eat(&Tok::LBracket) {
                        match self.peek().cloned() {
                            Some(Tok::Str(s)) => path.push(Segment::Key(s)),
                            Some(Tok::Num(n)) if n.fract() == 0.0 && n >= 0.0 => {
                                path.push(Segment::Index(n as usize))
                            }
                            _ => return self.error("a quoted name or an index in [..]"),
                        }
                        self.pos += 1;
                        self.expect(Tok::RBracket, "']'")?;
                    } else {
                        return Ok(Expr::Path(path));
                    }
                }
            }
            _ => self.error("a value, a property path or '('"),
        }
    }

    fn call(&mut self, name: &str, at: usize) -> Result<Expr, QueryError> {
        let func = Func::named(name)
            .ok_or_else(|| QueryError::new(at, format!("unknown function {name}")))?;
        self.expect(Tok::LParen, "'('")?;
        let mut args = Vec::new();
        if !self.eat(&Tok::RParen) {
            loop {
                args.push(self.expr()?);
                if self.eat(&Tok::RParen) {
                    break;
                }
                self.expect(Tok::Comma, "',' or ')'")?;
            }
        }
        let (min, max) = func.arity();
        if args.len() < min || args.len() > max {
            let takes = match (min, max) {
                (a, b) if a == b => format!("{a}"),
                (a, usize::MAX) => format!("at least {a}"),
                (a, b) => format!("{a} to {b}"),
            };
            return Err(QueryError::new(
                at,
                format!(
                    "{} takes {takes} argument{}, not {}",
                    func.name(),
                    if max == 1 { "" } else { "s" },
                    args.len()
                ),
            ));
        }
        if func.is_aggregate() && args.iter().any(contains_aggregate) {
            return Err(QueryError::new(at, "aggregates do not nest"));
        }
        Ok(Expr::Call(func, args))
    }
}

impl Query {
    /// Paths may name the collection first, as IoT Hub's examples do
    /// (`WHERE devices.jobs.deviceId = 'a'`, `FROM devices.modules WHERE devices.deviceId = 'a'`):
    /// the prefix is dropped, since no row has a member called `devices`.
    fn strip_source_prefix(&mut self) {
        let full: &[&str] = match self.from {
            Source::Devices => &["devices"],
            Source::Modules => &["devices", "modules"],
            Source::Jobs => &["devices", "jobs"],
        };
        let strip = |p: &mut Path| {
            let names = |prefix: &[&str]| {
                p.len() > prefix.len()
                    && prefix.iter().zip(p.iter()).all(|(want, seg)| {
                        matches!(seg, Segment::Key(k) if k.eq_ignore_ascii_case(want))
                    })
            };
            let n = if names(full) {
                full.len()
            } else if names(&full[..1]) {
                1
            } else {
                0
            };
            p.drain(..n);
        };
        if let Select::Items(items) = &mut self.select {
            for i in items {
                walk_paths(&mut i.expr, &strip);
            }
        }
        if let Some(f) = &mut self.filter {
            walk_paths(f, &strip);
        }
        for p in &mut self.group_by {
            strip(p);
        }
    }
}

fn walk_paths(e: &mut Expr, f: &impl Fn(&mut Path)) {
    match e {
        Expr::Path(p) => f(p),
        Expr::Not(x) | Expr::Neg(x) => walk_paths(x, f),
        Expr::Bin(_, a, b) => {
            walk_paths(a, f);
            walk_paths(b, f);
        }
        Expr::In { value, list, .. } => {
            walk_paths(value, f);
            list.iter_mut().for_each(|i| walk_paths(i, f));
        }
        Expr::List(l) | Expr::Call(_, l) => l.iter_mut().for_each(|i| walk_paths(i, f)),
        Expr::Lit(_) | Expr::Undefined => {}
    }
}

/// The rules a query's parts obey together: aggregates and grouping, and what `devices.jobs`
/// allows.
fn check_shape(q: &Query) -> Result<(), QueryError> {
    if q.from == Source::Jobs && (q.select != Select::All || !q.group_by.is_empty()) {
        return Err(QueryError::new(0, "devices.jobs allows only SELECT *"));
    }
    let Select::Items(items) = &q.select else {
        if !q.group_by.is_empty() {
            return Err(QueryError::new(
                0,
                "GROUP BY needs a projection, not SELECT *",
            ));
        }
        return Ok(());
    };
    let aggregated = items.iter().any(|i| contains_aggregate(&i.expr));
    if !aggregated && q.group_by.is_empty() {
        return Ok(());
    }
    for item in items {
        let ok = match &item.expr {
            Expr::Call(f, _) if f.is_aggregate() => true,
            Expr::Path(p) => q.group_by.contains(p),
            _ => false,
        };
        if !ok {
            return Err(QueryError::new(
                0,
                format!(
                    "'{}' must be an aggregate or a GROUP BY path when the query aggregates",
                    item.name
                ),
            ));
        }
    }
    Ok(())
}

/// A JSON number for `n`: an integer when it is one (so `1` shows as `1`, not `1.0`).
pub fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        return Value::from(n as i64);
    }
    serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(src: &str) -> String {
        match query(src) {
            Err(e) => e.to_string(),
            Ok(q) => panic!("{src} parsed as {q:?}"),
        }
    }

    #[test]
    fn parses_the_documented_queries() {
        for src in [
            "SELECT * FROM devices",
            "SELECT * FROM devices WHERE tags.location.region = 'US'",
            "SELECT * FROM devices WHERE tags.location.region = 'US' AND properties.reported.telemetryConfig.sendFrequencyInSecs >= 60",
            "SELECT * FROM devices WHERE properties.reported.connectivity IN ['wired', 'wifi']",
            "SELECT * FROM devices WHERE is_defined(properties.reported.connectivity)",
            "select * from devices where deviceId = \"myDeviceId\"",
            "SELECT COUNT() AS numberOfDevices FROM devices",
            "SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS numberOfDevices FROM devices GROUP BY properties.reported.telemetryConfig.status",
            "SELECT * FROM devices.modules WHERE properties.reported.status = 'scanning' AND deviceId IN ['device1', 'device2']",
            "SELECT * FROM devices.jobs WHERE devices.jobs.deviceId = 'myDeviceId'",
            "SELECT TOP 10 deviceId, tags['floor-2'].x FROM devices WHERE NOT (a.b NIN [1, 0x1F, -2.5e1]) OR x <> null",
        ] {
            query(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        }
    }

    #[test]
    fn precedence_and_names() {
        let q =
            query("SELECT a + b * 2 AS s, tags.x, LENGTH(deviceId) FROM devices").expect("valid");
        let Select::Items(items) = &q.select else {
            panic!()
        };
        let names: Vec<_> = items.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["s", "x", "$3"]);
        let Expr::Bin(BinOp::Add, _, rhs) = &items[0].expr else {
            panic!("{:?}", items[0])
        };
        assert!(matches!(**rhs, Expr::Bin(BinOp::Mul, _, _)));
        let c = condition("a = 1 OR b = 2 AND c = 3").expect("valid");
        let Expr::Bin(BinOp::Or, _, rhs) = c else {
            panic!()
        };
        assert!(matches!(*rhs, Expr::Bin(BinOp::And, _, _)));
        // The collection's name in front of a path is dropped.
        let q =
            query("SELECT * FROM devices.jobs WHERE devices.jobs.deviceId = 'd'").expect("valid");
        assert_eq!(q.filter, condition("deviceId = 'd'").ok());
        let q = query("select * from devices.modules where devices.deviceId = 'd'").expect("valid");
        assert_eq!(q.filter, condition("deviceId = 'd'").ok());
        assert_eq!(q.top, None);
        assert_eq!(
            query("SELECT TOP 3 * FROM devices").expect("valid").top,
            Some(3)
        );
    }

    #[test]
    fn the_condition_of_a_whole_query() {
        assert_eq!(
            where_text("SELECT * FROM devices\nWHERE\ttags.a = 'x y'").expect("valid"),
            Some("tags.a = 'x y'")
        );
        assert_eq!(where_text("select * from devices").expect("valid"), None);
        assert_eq!(
            where_text("SELECT * FROM devices WHERE tags.w = 'where'").expect("valid"),
            Some("tags.w = 'where'")
        );
        assert!(where_text("SELECT TOP 3 * FROM devices WHERE a = 1").is_err());
        assert!(
            where_text("SELECT tags.a AS a, COUNT() AS n FROM devices GROUP BY tags.a").is_err()
        );
    }

    #[test]
    fn invalid_queries_say_where_and_why() {
        assert_eq!(
            err("SELECT *"),
            "expected FROM, found the end of the query (at offset 8)"
        );
        assert_eq!(err("SELECT * FROM twins"), "cannot query 'twins': FROM takes devices, devices.modules or devices.jobs (at offset 14)");
        assert_eq!(
            err("SELECT * FROM devices WHERE"),
            "expected a value, a property path or '(', found the end of the query (at offset 27)"
        );
        assert_eq!(
            err("SELECT * FROM devices WHERE a = 'x"),
            "unterminated string (at offset 32)"
        );
        assert_eq!(
            err("SELECT * FROM devices WHERE FOO(a)"),
            "unknown function FOO (at offset 28)"
        );
        assert_eq!(
            err("SELECT * FROM devices WHERE is_defined(a, b)"),
            "IS_DEFINED takes 1 argument, not 2 (at offset 28)"
        );
        assert_eq!(
            err("SELECT * FROM devices WHERE a IN 3"),
            "expected a list [..] after IN, found the end of the query (at offset 34)"
        );
        assert_eq!(
            err("SELECT * FROM devices WHERE COUNT() > 1"),
            "aggregates are allowed only in SELECT (at offset 0)"
        );
        assert_eq!(err("SELECT deviceId, COUNT() FROM devices"), "'deviceId' must be an aggregate or a GROUP BY path when the query aggregates (at offset 0)");
        assert_eq!(
            err("SELECT deviceId FROM devices.jobs"),
            "devices.jobs allows only SELECT * (at offset 0)"
        );
        assert_eq!(
            err("SELECT * FROM devices WHERE a = 1 b"),
            "expected the end of the query, found 'b' (at offset 34)"
        );
        assert_eq!(
            err("SELECT * FROM devices WHERE a # 1"),
            "unexpected character '#' (at offset 30)"
        );
        assert_eq!(
            err("SELECT TOP x * FROM devices"),
            "expected a whole number after TOP, found 'x' (at offset 11)"
        );
    }

    #[test]
    fn nesting_and_length_are_bounded() {
        let deep = format!("{}1{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(condition(&deep).is_err());
        let nots = format!("{}true", "NOT ".repeat(2_000));
        assert!(condition(&nots)
            .expect_err("invalid")
            .message
            .contains("nest"));
        let negs = format!("{}1", "-".repeat(5_000));
        assert!(condition(&negs).is_err());
        // Chains are nesting too: the tree of `1+1+…` is as deep as it is long.
        for op in ["+", "*", " OR ", " AND "] {
            let chain = vec!["1"; 1_000].join(op);
            let e = condition(&chain).expect_err("too deep");
            assert!(e.message.contains("nest deeper"), "{op}: {e}");
        }
        let ids: Vec<String> = (0..200).map(|i| format!("deviceId = 'd{i}'")).collect();
        condition(&ids.join(" OR ")).expect("a 200-term OR is fine");
        let long = format!("a = '{}'", "x".repeat(MAX_QUERY_BYTES));
        assert!(condition(&long)
            .expect_err("invalid")
            .message
            .contains("longer"));
    }
}
