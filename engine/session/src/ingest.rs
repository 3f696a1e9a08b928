//! Acknowledging ingested messages in order, once durable.
//!
//! A session appends each message to its shard's log and gets the id of the batch it went
//! into; the acknowledgement (an MQTT packet id, an AMQP delivery, an HTTP response) may only go
//! out once that batch is durable, and acknowledgements keep the order of the messages.

use std::collections::VecDeque;

/// Acknowledgements owed, by batch id, in arrival order. `A` is the adapter's token.
#[derive(Debug)]
pub struct Ingest<A> {
    owed: VecDeque<(u64, A)>,
}

impl<A> Default for Ingest<A> {
    fn default() -> Self {
        Self {
            owed: VecDeque::new(),
        }
    }
}

impl<A> Ingest<A> {
    /// Records that `ack` is owed once batch `batch` is durable.
    // hot path: one push into a reused queue.
    pub fn push(&mut self, batch: u64, ack: A) {
        self.owed.push_back((batch, ack));
    }

    /// The batch the oldest owed acknowledgement waits for.
    pub fn oldest_batch(&self) -> Option<u64> {
        self.owed.front().map(|(b, _)| *b)
    }

    /// Takes, in order, every acknowledgement whose batch `is_durable` says is durable; stops
    /// at the first that is not (a later batch is never acknowledged before an earlier one).
    pub fn durable<'a>(
        &'a mut self,
        mut is_durable: impl FnMut(u64) -> bool + 'a,
    ) -> impl Iterator<Item = A> + 'a {
        std::iter::from_fn(move || {
            let (batch, _) = self.owed.front()?;
            if !is_durable(*batch) {
                return None;
            }
            self.owed.pop_front().map(|(_, a)| a)
        })
    }

    /// The batch the newest owed acknowledgement waits for: an acknowledgement owed for
    /// something that is not a record (a twin request) is queued behind it, so acknowledgements
    /// keep the order of the packets.
    pub fn newest_batch(&self) -> Option<u64> {
        self.owed.back().map(|(b, _)| *b)
    }

    pub fn is_empty(&self) -> bool {
        self.owed.is_empty()
    }

    /// Frees the queue's memory when nothing is owed (a session going idle).
    pub fn release_idle_memory(&mut self) {
        if self.owed.is_empty() && self.owed.capacity() > 0 {
            self.owed = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_follow_durability_in_arrival_order() {
        let mut ingest = Ingest::default();
        ingest.push(1, 'a');
        ingest.push(1, 'b');
        ingest.push(2, 'c');
        ingest.push(3, 'd');
        assert_eq!(ingest.oldest_batch(), Some(1));
        let none: Vec<char> = ingest.durable(|b| b < 1).collect();
        assert!(none.is_empty());
        let first: Vec<char> = ingest.durable(|b| b <= 2).collect();
        assert_eq!(first, vec!['a', 'b', 'c']);
        // Batch 3 durable but batch 2 already gone: d follows.
        let rest: Vec<char> = ingest.durable(|b| b <= 3).collect();
        assert_eq!(rest, vec!['d']);
        assert!(ingest.is_empty());
        ingest.release_idle_memory();
        assert_eq!(ingest.owed.capacity(), 0);
    }
}
