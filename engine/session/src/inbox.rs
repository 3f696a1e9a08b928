//! The session's outbound inbox: commands from control waiting for the protocol adapter to
//! send them. Bounded, so a device that does not read cannot make the engine hold more.

use std::collections::VecDeque;

use roost_model::link::DeviceCommand;

/// The inbox is at its capacity; the command was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the session's inbox is full ({0} commands)")]
pub struct InboxFull(pub usize);

#[derive(Debug)]
pub struct Inbox {
    items: VecDeque<DeviceCommand>,
    capacity: usize,
}

impl Inbox {
    /// IoT Hub queues at most 50 cloud-to-device messages per device; twin and method traffic
    /// shares the same bound here.
    pub const DEFAULT_CAPACITY: usize = 64;

    pub fn new(capacity: usize) -> Self {
        Self {
            items: VecDeque::new(),
            capacity,
        }
    }

    pub fn push(&mut self, command: DeviceCommand) -> Result<(), InboxFull> {
        if self.items.len() >= self.capacity {
            return Err(InboxFull(self.capacity));
        }
        self.items.push_back(command);
        Ok(())
    }

    /// The oldest command, if any.
    pub fn pop(&mut self) -> Option<DeviceCommand> {
        let item = self.items.pop_front();
        if self.items.is_empty() && self.items.capacity() > 0 {
            // An idle session holds no queue memory.
            self.items = VecDeque::new();
        }
        item
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

impl Default for Inbox {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(n: u64) -> DeviceCommand {
        DeviceCommand::DesiredPatch {
            version: n,
            body: vec![],
        }
    }

    #[test]
    fn keeps_order_refuses_past_capacity_and_frees_memory_when_drained() {
        let mut inbox = Inbox::new(2);
        inbox.push(cmd(1)).expect("room");
        inbox.push(cmd(2)).expect("room");
        assert_eq!(inbox.push(cmd(3)), Err(InboxFull(2)));
        assert_eq!(inbox.pop(), Some(cmd(1)));
        inbox.push(cmd(3)).expect("room again");
        assert_eq!(inbox.pop(), Some(cmd(2)));
        assert_eq!(inbox.pop(), Some(cmd(3)));
        assert_eq!(inbox.pop(), None);
        assert_eq!(inbox.items.capacity(), 0);
    }
}
