//! Shared access policies (spec §1.3): named keys with rights, used by service clients.

use serde::{Deserialize, Serialize};

/// A right a policy grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Right {
    RegistryRead,
    RegistryWrite,
    ServiceConnect,
    DeviceConnect,
}

/// One policy, as stored (keys base64, as users see them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub rights: Vec<Right>,
}

impl Policy {
    pub fn allows(&self, right: Right) -> bool {
        self.rights.contains(&right)
    }
}

/// The five policies every IoT Hub starts with, with fresh keys.
pub fn defaults() -> Vec<Policy> {
    use Right::*;
    let make = |name: &str, rights: Vec<Right>| Policy {
        name: name.to_string(),
        primary_key: roost_iothub::sas::generate_key(),
        secondary_key: roost_iothub::sas::generate_key(),
        rights,
    };
    vec![
        make(
            "iothubowner",
            vec![RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect],
        ),
        make("service", vec![ServiceConnect]),
        make("device", vec![DeviceConnect]),
        make("registryRead", vec![RegistryRead]),
        make("registryReadWrite", vec![RegistryRead, RegistryWrite]),
    ]
}
