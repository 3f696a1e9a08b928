//! roost-query: IoT Hub's query language (wire spec §5), parsed once and evaluated many times.
//!
//! What it is: the lexer and parser of `SELECT … FROM devices | devices.modules | devices.jobs
//! [WHERE …] [GROUP BY …]` and of bare conditions (a job's `queryCondition`, a configuration's
//! `targetCondition`, a route's condition), an evaluator over any [`Document`] with IoT Hub's
//! (Cosmos DB's) three-valued logic — a path that names nothing is *undefined*, comparisons
//! between different types are undefined, and anything but `true` does not match — and the
//! projection and aggregation of a query's rows.
//!
//! What it is not: storage or paging. Control runs twin queries against its store and pages
//! the rows; the engine's router evaluates routing conditions over messages by giving them a
//! [`Document`] view. The one design decision: the AST is plain data and evaluation borrows
//! from the document, so a condition costs no allocation unless it builds a new value
//! (arithmetic, string functions).
//!
//! Layout: `lex` (tokens), `parse` (grammar, AST, shape rules), `eval` (values, operators,
//! functions), `select` (matching, projection, `GROUP BY`, index hints).

mod eval;
mod lex;
mod parse;
mod select;

pub use eval::{eval, is_true, Document};
pub use parse::{
    condition, number, query, where_text, BinOp, Expr, Item, Path, Query, Segment, Select, Source,
    MAX_DEPTH, MAX_QUERY_BYTES,
};
pub use select::Groups;

/// An invalid query: where it went wrong (a byte offset in the text) and why. The text is what
/// the service API answers an invalid query with (status 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at offset {at})")]
pub struct QueryError {
    pub at: usize,
    pub message: String,
}

impl QueryError {
    pub fn new(at: usize, message: impl Into<String>) -> Self {
        QueryError {
            at,
            message: message.into(),
        }
    }
}

macro_rules! funcs {
    ($($variant:ident $name:literal $min:literal $max:expr,)*) => {
        /// The functions of the language: the twin queries' `IS_DEFINED`, the routing
        /// conditions' math, type and string functions (accepted in twin queries too), and the
        /// aggregates, which only a projection may use.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Func { $($variant,)* }

        impl Func {
            /// The function called `name`, case-insensitively (`STARTSWITH` is `STARTS_WITH`).
            pub fn named(name: &str) -> Option<Func> {
                let upper = name.to_ascii_uppercase();
                match upper.as_str() {
                    $($name => Some(Func::$variant),)*
                    "STARTSWITH" => Some(Func::StartsWith),
                    "ENDSWITH" => Some(Func::EndsWith),
                    _ => None,
                }
            }

            pub fn name(self) -> &'static str {
                match self { $(Func::$variant => $name,)* }
            }

            /// The fewest and most arguments it takes.
            pub fn arity(self) -> (usize, usize) {
                match self { $(Func::$variant => ($min, $max),)* }
            }
        }
    };
}

funcs! {
    IsDefined "IS_DEFINED" 1 1,
    IsNull "IS_NULL" 1 1,
    IsBool "IS_BOOL" 1 1,
    IsNumber "IS_NUMBER" 1 1,
    IsString "IS_STRING" 1 1,
    IsObject "IS_OBJECT" 1 1,
    IsArray "IS_ARRAY" 1 1,
    IsPrimitive "IS_PRIMITIVE" 1 1,
    AsNumber "AS_NUMBER" 1 1,
    Abs "ABS" 1 1,
    Exp "EXP" 1 1,
    Power "POWER" 2 2,
    Square "SQUARE" 1 1,
    Ceiling "CEILING" 1 1,
    Floor "FLOOR" 1 1,
    Sign "SIGN" 1 1,
    Sqrt "SQRT" 1 1,
    Concat "CONCAT" 2 usize::MAX,
    Length "LENGTH" 1 1,
    Lower "LOWER" 1 1,
    Upper "UPPER" 1 1,
    Substring "SUBSTRING" 2 3,
    IndexOf "INDEX_OF" 2 2,
    StartsWith "STARTS_WITH" 2 2,
    EndsWith "ENDS_WITH" 2 2,
    Contains "CONTAINS" 2 2,
    Count "COUNT" 0 0,
    Avg "AVG" 1 1,
    Sum "SUM" 1 1,
    Min "MIN" 1 1,
    Max "MAX" 1 1,
}

impl Func {
    pub fn is_aggregate(self) -> bool {
        matches!(
            self,
            Func::Count | Func::Avg | Func::Sum | Func::Min | Func::Max
        )
    }
}
