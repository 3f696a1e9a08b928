//! roost-routing: where each message goes, decided by an epoch's `routes.lua`.
//!
//! What it is: the reading and checking of `routes.lua` (endpoints, plugins, routes, fallback,
//! enrichments), IoT Hub's routing conditions compiled in Rust (`$body`, `$twin.tags`, system
//! and application properties over `roost-query`'s evaluator), the sandboxed Lua host (one VM
//! per shard: memory limit, instruction budget, handles valid only during a call) and the
//! plugins it runs (`plugins/<name>/handler.lua` with a data-only `schema.lua`). The same code
//! checks an epoch in `roost routes check`, at control before it is pushed, and in the engine
//! before it is applied.
//!
//! What it is not: I/O. It reads no files (the caller hands it the sources, as an epoch carries
//! them), writes no log and delivers to no endpoint; the engine stores each message once with
//! the endpoint set [`Routing::route`] answers, and its dispatchers feed the endpoints. No
//! glommio, tokio or RocksDB.
//!
//! The one design decision: declarative conditions never enter Lua, and Lua sees a message only
//! through two handles made once per VM — the message moves into their slot for the call — so
//! an epoch without Lua costs a few comparisons per message, and one with Lua costs the crossing
//! of what a script reads, not a copy of the message.
//!
//! Layout: `locate` (lines in `routes.lua`), `sandbox` (the VM and its limits), `convert` (Lua ⇄
//! JSON), `condition` (compiled conditions), `config` (reading `routes.lua`), `schema` (plugin
//! schemas), `handles` (`msg`, `device`), `table` (loading an epoch and routing a message),
//! `spec` (running plugins' `spec.lua` cases).

pub mod condition;
pub mod config;
pub mod convert;
pub mod handles;
pub mod locate;
pub mod sandbox;
pub mod schema;
pub mod spec;
pub mod table;

pub use condition::{Condition, ConditionError};
pub use config::{ConfigError, EndpointKind, RouteSource, RoutesConfig};
pub use sandbox::Limits;
pub use table::{Outcome, ProvisionError, Routing, Settings, Sources, Stamp, Stats, Verdict};
