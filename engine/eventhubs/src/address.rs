//! Receiver addresses (spec §3.3): `amqps://{host}/{eh}/ConsumerGroups/{cg}/Partitions/{p}`
//! (pyamqp) or `{eh}/ConsumerGroups/{cg}/Partitions/{p}` (JS), segment names and the consumer
//! group matched case-insensitively.

/// A receiver's partition of a consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionAddress {
    /// Lowercase (`$default` for `$Default`): consumer group names are case-insensitive.
    pub consumer_group: String,
    pub partition: usize,
}

/// Why an address names no partition of this hub's endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address {0:?} is not {{entity}}/ConsumerGroups/{{group}}/Partitions/{{id}}")]
    Shape(String),
    #[error("entity {got:?} is not this hub's event hub {want:?}")]
    Entity { got: String, want: String },
    #[error("partition {0:?} is not a partition id")]
    Partition(String),
}

/// Parses a receiver's source address for the event hub `entity`.
pub fn parse(address: &str, entity: &str) -> Result<PartitionAddress, AddressError> {
    let path = match address.split_once("://") {
        // An absolute URL: drop the scheme and the host (and any port).
        Some((_, rest)) => rest.split_once('/').map_or("", |(_, p)| p),
        None => address,
    };
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let [eh, groups, group, partitions, partition] = parts[..] else {
        return Err(AddressError::Shape(address.chars().take(200).collect()));
    };
    if !groups.eq_ignore_ascii_case("ConsumerGroups")
        || !partitions.eq_ignore_ascii_case("Partitions")
        || group.is_empty()
    {
        return Err(AddressError::Shape(address.chars().take(200).collect()));
    }
    if !eh.eq_ignore_ascii_case(entity) {
        return Err(AddressError::Entity {
            got: eh.chars().take(100).collect(),
            want: entity.to_string(),
        });
    }
    let partition = partition
        .parse::<usize>()
        .map_err(|_| AddressError::Partition(partition.chars().take(40).collect()))?;
    Ok(PartitionAddress {
        consumer_group: group.to_ascii_lowercase(),
        partition,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_address_forms_and_any_case() {
        let want = PartitionAddress {
            consumer_group: "$default".into(),
            partition: 1,
        };
        assert_eq!(
            parse(
                "amqps://localhost:5671/myhub/ConsumerGroups/$Default/Partitions/1",
                "myhub"
            ),
            Ok(want.clone())
        );
        assert_eq!(
            parse("myhub/consumergroups/$default/partitions/1", "myhub"),
            Ok(want)
        );
        assert!(matches!(
            parse("other/ConsumerGroups/$Default/Partitions/1", "myhub"),
            Err(AddressError::Entity { .. })
        ));
        assert!(matches!(
            parse("myhub/ConsumerGroups/$Default/Partitions/x", "myhub"),
            Err(AddressError::Partition(_))
        ));
        assert!(matches!(
            parse("$cbs", "myhub"),
            Err(AddressError::Shape(_))
        ));
    }
}
