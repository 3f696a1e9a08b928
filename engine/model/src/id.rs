//! Device and module identifiers, valid by construction.

use std::fmt;

/// Why a string is not a valid device or module id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Ids are 1 to 128 characters long.
    #[error("id must be 1 to 128 characters, got {0}")]
    Length(usize),
    /// Only ASCII letters, digits and `- . % _ * ? ! ( ) , : = @ $ '` may appear.
    #[error("id contains the character {0:?}, which IoT Hub does not allow")]
    Character(char),
}

const MAX_ID_LEN: usize = 128;

fn validate(s: &str) -> Result<(), IdError> {
    if s.is_empty() || s.len() > MAX_ID_LEN {
        return Err(IdError::Length(s.chars().count()));
    }
    match s.chars().find(|c| !allowed(*c)) {
        Some(c) => Err(IdError::Character(c)),
        None => Ok(()),
    }
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-.%_*?!(),:=@$'".contains(c)
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Parses an id; fails unless it follows IoT Hub's id rules.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                validate(s)?;
                Ok(Self(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A device id: 1–128 ASCII characters from IoT Hub's allowed set (spec §2.1).
    DeviceId
);
id_type!(
    /// A module id, with the same character rules as a device id.
    ModuleId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_punctuation() {
        assert!(DeviceId::parse("dev-1.a%b_c*d?e!f(g),h:i=j@k$l'm").is_ok());
    }

    #[test]
    fn rejects_space_slash_and_non_ascii() {
        assert_eq!(DeviceId::parse("a b"), Err(IdError::Character(' ')));
        assert_eq!(DeviceId::parse("a/b"), Err(IdError::Character('/')));
        assert_eq!(DeviceId::parse("dé"), Err(IdError::Character('é')));
    }

    #[test]
    fn rejects_empty_and_overlong() {
        assert_eq!(DeviceId::parse(""), Err(IdError::Length(0)));
        assert!(DeviceId::parse(&"a".repeat(128)).is_ok());
        assert_eq!(DeviceId::parse(&"a".repeat(129)), Err(IdError::Length(129)));
    }
}
