//! Twin queries (`POST /devices/query`, spec §4.3, §5): IoT Hub's query language run against
//! control's store, one page at a time.
//!
//! A row is the twin as the service API shows it (identity fields, tags, properties). Rows are
//! read in client-id order, so a page's continuation token is the last id it read and how many
//! items were sent so far (for `TOP`); aggregating queries read every row and page their groups
//! by offset. The one index is the primary key: a condition that confines `deviceId`
//! (`deviceId = 'a'`, `deviceId IN [..]`, under `AND`, on both sides of `OR`) reads just those
//! ids; every other condition scans. What it is not: the language itself (`roost-query`).

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use roost_query::{Groups, Query, Source};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::device::{Device, Module};
use crate::store::{Store, StoreError};
use crate::twins::{device_identity, module_identity, service_json};

/// Items a page holds when the request does not say (`x-ms-max-item-count`).
pub const DEFAULT_PAGE: usize = 100;
/// The most a page holds, whatever the request says.
pub const MAX_PAGE: usize = 1000;
/// Rows read from the store at a time.
const BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum QueryFailure {
    #[error("invalid query: {0}")]
    Invalid(#[from] roost_query::QueryError),
    #[error("invalid continuation token")]
    BadContinuation,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where the next page starts.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct Continuation {
    /// The last client id read (row queries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<String>,
    /// Items sent on earlier pages (row queries), or groups (aggregates).
    sent: u64,
}

impl Continuation {
    fn parse(token: &str) -> Result<Self, QueryFailure> {
        let bytes = URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| QueryFailure::BadContinuation)?;
        serde_json::from_slice(&bytes).map_err(|_| QueryFailure::BadContinuation)
    }

    fn token(&self) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// One page of a query's result.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<Value>,
    /// `twin` for whole twins, `raw` for projections and aggregates (`x-ms-item-type`).
    pub item_type: &'static str,
    /// The token of the next page; `None` on the last.
    pub continuation: Option<String>,
}

/// Rows of one collection, read in order.
trait Rows {
    /// Up to `n` rows after `after`, each with its client id.
    fn after(&self, after: Option<&str>, n: usize) -> Result<Vec<(String, Value)>, StoreError>;
    /// The rows of these device ids (sorted) after `after`.
    fn of(&self, ids: &[String], after: Option<&str>) -> Result<Vec<(String, Value)>, StoreError>;
}

pub struct Queries {
    pub store: Arc<Store>,
}

impl Queries {
    /// Runs `text` from `continuation` (a token from the previous page) for at most
    /// `max_items` items.
    pub fn run(
        &self,
        text: &str,
        continuation: Option<&str>,
        max_items: Option<usize>,
    ) -> Result<Page, QueryFailure> {
        let query = roost_query::query(text)?;
        let from = continuation
            .filter(|t| !t.trim().is_empty())
            .map(Continuation::parse)
            .transpose()?
            .unwrap_or_default();
        let page = max_items.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
        match query.from {
            Source::Devices => self.page(&query, &DeviceRows(&self.store), from, page),
            Source::Modules => self.page(&query, &ModuleRows(&self.store), from, page),
            Source::Jobs => {
                let mut page = self.page(&query, &JobRows(&self.store), from, page)?;
                page.item_type = "deviceJob";
                Ok(page)
            }
        }
    }

    fn page(
        &self,
        query: &Query,
        rows: &impl Rows,
        from: Continuation,
        page: usize,
    ) -> Result<Page, QueryFailure> {
        let item_type = match query.select {
            roost_query::Select::All => "twin",
            roost_query::Select::Items(_) => "raw",
        };
        let top = query.top.unwrap_or(u64::MAX);
        if query.aggregates() {
            let mut groups = Groups::new(query);
            scan(query, rows, None, |_, row| {
                groups.add(row);
                true
            })?;
            let all = groups.finish();
            let end = (all.len() as u64).min(top);
            let start = from.sent.min(end);
            let stop = (start + page as u64).min(end);
            let items = all[start as usize..stop as usize].to_vec();
            let continuation = (stop < end).then(|| {
                Continuation {
                    after: None,
                    sent: stop,
                }
                .token()
            });
            return Ok(Page {
                items,
                item_type,
                continuation,
            });
        }
        let want = (top.saturating_sub(from.sent)).min(page as u64) as usize;
        let mut items = Vec::new();
        let mut last = from.after.clone();
        let mut more = false;
        if want > 0 {
            scan(query, rows, from.after.as_deref(), |id, row| {
                if items.len() == want {
                    // A match beyond the page: there is a next page.
                    more = true;
                    return false;
                }
                items.push(query.project(row));
                last = Some(id.to_string());
                true
            })?;
        }
        let sent = from.sent + items.len() as u64;
        let continuation = (more && sent < top).then(|| Continuation { after: last, sent }.token());
        Ok(Page {
            items,
            item_type,
            continuation,
        })
    }
}

/// Calls `each` with every row after `after` that matches the query, in order, until it
/// returns false.
fn scan(
    query: &Query,
    rows: &impl Rows,
    after: Option<&str>,
    mut each: impl FnMut(&str, &Value) -> bool,
) -> Result<(), StoreError> {
    if let Some(ids) = query.device_ids() {
        for (id, row) in rows.of(&ids, after)? {
            if query.matches(&row) && !each(&id, &row) {
                return Ok(());
            }
        }
        return Ok(());
    }
    let mut cursor = after.map(str::to_string);
    loop {
        let batch = rows.after(cursor.as_deref(), BATCH)?;
        let done = batch.len() < BATCH;
        for (id, row) in &batch {
            if query.matches(row) && !each(id, row) {
                return Ok(());
            }
        }
        match batch.into_iter().last() {
            Some((id, _)) if !done => cursor = Some(id),
            _ => return Ok(()),
        }
    }
}

struct DeviceRows<'s>(&'s Store);

impl DeviceRows<'_> {
    fn row(&self, d: &Device) -> Result<(String, Value), StoreError> {
        let twin = self.0.twin_or_empty(&d.device_id)?;
        Ok((d.device_id.clone(), service_json(device_identity(d), &twin)))
    }
}

impl Rows for DeviceRows<'_> {
    fn after(&self, after: Option<&str>, n: usize) -> Result<Vec<(String, Value)>, StoreError> {
        self.0
            .devices_after(after, n)?
            .iter()
            .map(|d| self.row(d))
            .collect()
    }

    fn of(&self, ids: &[String], after: Option<&str>) -> Result<Vec<(String, Value)>, StoreError> {
        let mut out = Vec::new();
        for id in ids
            .iter()
            .filter(|id| after.is_none_or(|a| id.as_str() > a))
        {
            if let Some(d) = self.0.device(id)? {
                out.push(self.row(&d)?);
            }
        }
        Ok(out)
    }
}

struct ModuleRows<'s>(&'s Store);

impl ModuleRows<'_> {
    fn rows(&self, modules: Vec<Module>) -> Result<Vec<(String, Value)>, StoreError> {
        let mut out = Vec::with_capacity(modules.len());
        let mut device: Option<Device> = None;
        for m in modules {
            if device.as_ref().is_none_or(|d| d.device_id != m.device_id) {
                device = self.0.device(&m.device_id)?;
            }
            let Some(d) = &device else { continue };
            let id = m.client_id();
            let twin = self.0.twin_or_empty(&id)?;
            out.push((id, service_json(module_identity(d, &m), &twin)));
        }
        Ok(out)
    }
}

impl Rows for ModuleRows<'_> {
    fn after(&self, after: Option<&str>, n: usize) -> Result<Vec<(String, Value)>, StoreError> {
        self.rows(self.0.modules_after(after, n)?)
    }

    fn of(&self, ids: &[String], after: Option<&str>) -> Result<Vec<(String, Value)>, StoreError> {
        let mut modules = Vec::new();
        for id in ids {
            modules.extend(self.0.modules_of(id)?);
        }
        // In client-id order, the order a page's token counts in (`a-1/y` sorts before `a/x`).
        modules.sort_by_key(|m| m.client_id());
        modules.retain(|m| after.is_none_or(|a| m.client_id().as_str() > a));
        self.rows(modules)
    }
}

/// What each job did on each device (`devices.jobs`), keyed `device\0job`.
struct JobRows<'s>(&'s Store);

impl Rows for JobRows<'_> {
    fn after(&self, after: Option<&str>, n: usize) -> Result<Vec<(String, Value)>, StoreError> {
        self.0.device_jobs_after(after, n)
    }

    fn of(&self, ids: &[String], after: Option<&str>) -> Result<Vec<(String, Value)>, StoreError> {
        let mut out = Vec::new();
        for id in ids {
            out.extend(
                self.0
                    .device_jobs_of(id)?
                    .into_iter()
                    .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a)),
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_tokens_round_trip_and_reject_garbage() {
        let c = Continuation {
            after: Some("dev-7".into()),
            sent: 12,
        };
        assert_eq!(Continuation::parse(&c.token()).unwrap(), c);
        assert!(matches!(
            Continuation::parse("not a token!"),
            Err(QueryFailure::BadContinuation)
        ));
        assert!(matches!(
            Continuation::parse(&URL_SAFE_NO_PAD.encode(b"[1]")),
            Err(QueryFailure::BadContinuation)
        ));
    }
}
