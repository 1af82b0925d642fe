//! Typed identifiers with checked parsing and transparent serde.
//!
//! An ID that reaches a service from the network is parsed once, at the
//! edge, into one of these types; everything behind the edge can rely on its
//! shape (no path separators, bounded length, ASCII only).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct IdError {
    pub kind: &'static str,
    pub value: String,
    pub reason: &'static str,
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                let check: fn(&str) -> Result<(), &'static str> = $check;
                check(s).map_err(|reason| IdError {
                    kind: $kind,
                    value: s.chars().take(80).collect(),
                    reason,
                })?;
                Ok(Self(s.to_owned()))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// Identifiers Kiln mints itself: `prefix-` followed by 32 hex digits.
fn generated(s: &str) -> Result<(), &'static str> {
    simple(s, 64)
}

/// Lower-case letters, digits, `-` and `_`; 1..=max characters.
fn simple(s: &str, max: usize) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.len() > max {
        return Err("too long");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err("only lower-case letters, digits, '-' and '_' are allowed");
    }
    Ok(())
}

/// FC's rule for function names: letters, digits, `_` and `-`, starting with
/// a letter or `_`, 1 to 64 characters.
fn function_name(s: &str) -> Result<(), &'static str> {
    let first = s.bytes().next().ok_or("must not be empty")?;
    if s.len() > 64 {
        return Err("must be at most 64 characters");
    }
    if !(first.is_ascii_alphabetic() || first == b'_') {
        return Err("must start with a letter or '_'");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err("only letters, digits, '-' and '_' are allowed");
    }
    Ok(())
}

/// Account IDs are numeric in FC; Kiln accepts digits only, up to 32.
fn account_id(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 32 {
        return Err("must be 1 to 32 digits");
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must be digits only");
    }
    Ok(())
}

/// Request ids are minted by Kiln (UUIDs) but may be echoed from clients in
/// logs; accept the usual request-id alphabet.
fn request_id(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 128 {
        return Err("must be 1 to 128 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err("only letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

typed_id!(
    /// An FC account (tenant): the unit of isolation, quota and billing.
    AccountId, "account id", account_id
);
typed_id!(
    /// A function's name, unique within its account.
    FunctionName, "function name", function_name
);
typed_id!(
    /// One sandbox running one revision of one function.
    InstanceId, "instance id", generated
);
typed_id!(
    /// A compute node (one agent).
    NodeId, "node id", |s| simple(s, 64)
);
typed_id!(
    /// One concurrency slot on one instance, held for one invocation.
    LeaseId, "lease id", generated
);
typed_id!(
    /// The id of one API request, returned in `x-fc-request-id`.
    RequestId, "request id", request_id
);

/// A random (version 4) UUID from the thread-local CSPRNG: ids are minted
/// per request, and `Uuid::new_v4` would cost a `getrandom` syscall each.
fn random_uuid() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

fn random_hex() -> String {
    random_uuid().simple().to_string()
}

impl InstanceId {
    pub fn generate() -> Self {
        Self(format!("i-{}", random_hex()))
    }
}

impl LeaseId {
    pub fn generate() -> Self {
        Self(format!("l-{}", random_hex()))
    }
}

impl NodeId {
    pub fn generate() -> Self {
        Self(format!("n-{}", &random_hex()[..16]))
    }
}

impl RequestId {
    /// FC's request ids are UUIDs with dashes.
    pub fn generate() -> Self {
        Self(random_uuid().hyphenated().to_string())
    }

    /// A time-ordered (version 7) UUID with dashes: ids minted later sort
    /// later, so a store indexing request ids (the async queue's task ids)
    /// appends to its index instead of writing a random page per insert.
    pub fn generate_ordered() -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let uuid = uuid::Builder::from_unix_timestamp_millis(ms, &rand::random()).into_uuid();
        Self(uuid.hyphenated().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_follow_fc_rules() {
        assert!("hello".parse::<FunctionName>().is_ok());
        assert!("_a-b_9".parse::<FunctionName>().is_ok());
        assert!("9abc".parse::<FunctionName>().is_err());
        assert!("".parse::<FunctionName>().is_err());
        assert!("a/b".parse::<FunctionName>().is_err());
        assert!("a..".parse::<FunctionName>().is_err());
        assert!("a".repeat(65).parse::<FunctionName>().is_err());
        assert!("a".repeat(64).parse::<FunctionName>().is_ok());
    }

    #[test]
    fn generated_ids_parse_back() {
        let id = InstanceId::generate();
        assert_eq!(id.as_str().parse::<InstanceId>().unwrap(), id);
        let lease = LeaseId::generate();
        assert_eq!(lease.as_str().parse::<LeaseId>().unwrap(), lease);
        let req = RequestId::generate();
        assert_eq!(req.as_str().parse::<RequestId>().unwrap(), req);
        let uuid = uuid::Uuid::parse_str(req.as_str()).unwrap();
        assert_eq!(uuid.get_version(), Some(uuid::Version::Random));
        assert_ne!(RequestId::generate(), req);
    }

    #[test]
    fn ordered_request_ids_are_v7_uuids_that_sort_by_time() {
        let a = RequestId::generate_ordered();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = RequestId::generate_ordered();
        assert!(a.as_str() < b.as_str(), "{a} {b}");
        assert_eq!(b.as_str().parse::<RequestId>().unwrap(), b);
        let uuid = uuid::Uuid::parse_str(b.as_str()).unwrap();
        assert_eq!(uuid.get_version(), Some(uuid::Version::SortRand));
        assert_ne!(RequestId::generate_ordered(), RequestId::generate_ordered());
    }

    #[test]
    fn serde_is_transparent_and_checked() {
        let id: AccountId = serde_json::from_str("\"1234\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"1234\"");
        assert!(serde_json::from_str::<AccountId>("\"12a\"").is_err());
        assert!(serde_json::from_str::<InstanceId>("\"../etc\"").is_err());
    }
}
