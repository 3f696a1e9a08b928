//! The consumer groups of the Event Hubs-compatible endpoint (roost's own REST call; IoT Hub
//! creates them through ARM): `$Default` always, the others stored here and carried to the
//! engines in the config epoch, so a receiver on a group nobody created is refused.
//!
//! `GET /roost/consumergroups` lists them; `PUT /roost/consumergroups/{name}` creates one
//! (201, or 200 when it exists); `DELETE /roost/consumergroups/{name}` removes one (204; 404
//! when there is none; `$Default` cannot go).

use crate::store::{Store, StoreError};

/// The group every event hub has.
pub const DEFAULT: &str = "$Default";
/// At most this many groups besides `$Default` (IoT Hub's standard tiers allow 20).
pub const MAX_GROUPS: usize = 20;

/// Why a call is refused.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("{0}")]
    Invalid(String),
    #[error("no consumer group {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Event Hubs' rule: 1 to 50 letters, digits, periods, hyphens and underscores, starting and
/// ending with a letter or digit.
pub fn validate(name: &str) -> Result<(), GroupError> {
    let ok = (1..=50).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    match ok {
        true => Ok(()),
        false => Err(GroupError::Invalid(format!(
            "consumer group {name:?}: 1 to 50 letters, digits, '.', '-' and '_', starting and ending with a letter or digit"
        ))),
    }
}

/// The groups created besides `$Default`, in creation order.
pub fn stored(store: &Store) -> Result<Vec<String>, StoreError> {
    match store.consumer_groups()? {
        None => Ok(Vec::new()),
        Some(raw) => serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt(e.to_string())),
    }
}

fn save(store: &Store, groups: &[String]) -> Result<(), StoreError> {
    let json = serde_json::to_vec(groups).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    store.put_consumer_groups(&json)
}

/// Creates `name`; false when it exists already (names compare case-insensitively).
pub fn create(store: &Store, name: &str) -> Result<bool, GroupError> {
    if name.eq_ignore_ascii_case(DEFAULT) {
        return Ok(false);
    }
    validate(name)?;
    let mut groups = stored(store)?;
    if groups.iter().any(|g| g.eq_ignore_ascii_case(name)) {
        return Ok(false);
    }
    if groups.len() >= MAX_GROUPS {
        return Err(GroupError::Invalid(format!(
            "at most {MAX_GROUPS} consumer groups besides $Default"
        )));
    }
    groups.push(name.to_string());
    save(store, &groups)?;
    Ok(true)
}

/// Deletes `name`.
pub fn delete(store: &Store, name: &str) -> Result<(), GroupError> {
    if name.eq_ignore_ascii_case(DEFAULT) {
        return Err(GroupError::Invalid("$Default cannot be deleted".into()));
    }
    let mut groups = stored(store)?;
    let before = groups.len();
    groups.retain(|g| !g.eq_ignore_ascii_case(name));
    if groups.len() == before {
        return Err(GroupError::NotFound(name.chars().take(64).collect()));
    }
    save(store, &groups)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_event_hubs_rules() {
        for ok in ["analytics", "a", "team-1.reader_2", &"x".repeat(50)] {
            assert!(validate(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "a b", "a/b", "$x", &"x".repeat(51)] {
            assert!(validate(bad).is_err(), "{bad}");
        }
    }
}
