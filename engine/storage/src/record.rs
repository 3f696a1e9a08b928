//! A stored record as readers see it, whichever form it was written in.

use roost_model::{ArchivedMessage, ArchivedRouted, Message, Routed};

use crate::batch::Record;

/// The name of the built-in endpoint, which a record written before routing went to alone.
pub const BUILTIN: &str = "events";

/// A record: the message, and the endpoints its routes matched with their enrichments.
#[derive(Debug, Clone, Copy)]
pub enum RecordView<'a> {
    /// Written before routing: the message went to the built-in endpoint only.
    Bare(&'a ArchivedMessage),
    Routed(&'a ArchivedRouted),
}

impl<'a> RecordView<'a> {
    /// Validates `bytes` (copied out of the batch into aligned memory) as the record kind
    /// `record` says.
    pub fn open(record: Record<'_>, aligned: &'a [u8]) -> Result<Self, rkyv::rancor::Error> {
        Ok(match record.routed {
            true => RecordView::Routed(Routed::view(aligned)?),
            false => RecordView::Bare(Message::view(aligned)?),
        })
    }

    pub fn message(&self) -> &'a ArchivedMessage {
        match self {
            RecordView::Bare(m) => m,
            RecordView::Routed(r) => &r.message,
        }
    }

    /// The record's index of endpoint `name`, if the record went there.
    pub fn endpoint(&self, name: &str) -> Option<usize> {
        match self {
            RecordView::Bare(_) => (name == BUILTIN).then_some(0),
            RecordView::Routed(r) => r.endpoint(name),
        }
    }

    /// What the enrichments added for the record's endpoint `index`: (key, value).
    pub fn stamps(&self, index: usize) -> impl Iterator<Item = (&'a str, &'a str)> {
        let routed = match self {
            RecordView::Bare(_) => None,
            RecordView::Routed(r) => Some(*r),
        };
        routed.into_iter().flat_map(move |r| r.stamps_for(index))
    }
}
