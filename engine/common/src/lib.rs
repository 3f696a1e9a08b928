//! roost-common: what both hub processes (`roost engine`, `roost control`), the `roost` command
//! line and the load generator share.
//!
//! What it is: the small HTTP/1.1 server helpers behind the engine's ops port and control's
//! service API ([`httpd`]), a keep-alive HTTP client ([`client`]) and the SAS-signing service-API
//! client built on it ([`service`]), loading the hub's certificates into rustls configurations
//! ([`tls`]), `<data>/hub.json` ([`hubfile`]), reading control-link frames from a stream
//! ([`link`]) and waiting for SIGINT/SIGTERM ([`shutdown`]).
//!
//! What it is not: a data plane or a store. It links no glommio and no RocksDB (a check in
//! `make test` holds it to that), so control and `roost-bench` build without either.

pub mod client;
pub mod httpd;
pub mod hubfile;
pub mod link;
pub mod service;
pub mod shutdown;
pub mod tls;
