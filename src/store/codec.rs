//! Versioned binary encoding of stored values: one version byte, then bincode 2 (serde).
//!
//! Every value a backend stores goes through here, so a value written by a newer harvest is
//! refused by name ([`StoreError::NewerVersion`]) and a damaged one is reported with its key
//! ([`StoreError::Corrupt`]) instead of being misread.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{SCHEMA_VERSION, StoreError, StoreResult};

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` with the current schema version in front.
pub fn encode<T: Serialize>(value: &T) -> StoreResult<Vec<u8>> {
    let mut out = Vec::with_capacity(128);
    out.push(SCHEMA_VERSION as u8);
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .map_err(|source| StoreError::Encode { source })?;
    Ok(out)
}

/// Decodes a value written by [`encode`]; `key` names it in errors.
pub fn decode<T: DeserializeOwned>(key: &dyn Fn() -> String, bytes: &[u8]) -> StoreResult<T> {
    let Some((&version, body)) = bytes.split_first() else {
        return Err(StoreError::Corrupt {
            key: key(),
            reason: "empty value".into(),
        });
    };
    if u32::from(version) > SCHEMA_VERSION {
        return Err(StoreError::NewerVersion {
            what: key(),
            found: version.into(),
            supported: SCHEMA_VERSION,
        });
    }
    if version == 0 {
        return Err(StoreError::Corrupt {
            key: key(),
            reason: "schema version 0".into(),
        });
    }
    let (value, used) =
        bincode::serde::decode_from_slice(body, config()).map_err(|e| StoreError::Corrupt {
            key: key(),
            reason: e.to_string(),
        })?;
    if used != body.len() {
        return Err(StoreError::Corrupt {
            key: key(),
            reason: format!("{} trailing bytes", body.len() - used),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::*;

    #[test]
    fn round_trip_and_version_checks() {
        let ctx = ClientContext::builder()
            .client_id("c")
            .metadata("tier", "gold")
            .build();
        let bytes = encode(&ctx).unwrap();
        let back: ClientContext = decode(&|| "k".into(), &bytes).unwrap();
        assert_eq!(back, ctx);

        let mut newer = bytes.clone();
        newer[0] = SCHEMA_VERSION as u8 + 1;
        let err = decode::<ClientContext>(&|| "sessions/x".into(), &newer).unwrap_err();
        assert!(matches!(err, StoreError::NewerVersion { .. }), "{err}");
        assert!(err.to_string().contains("sessions/x"));

        let err = decode::<ClientContext>(&|| "k2".into(), &bytes[..3]).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(decode::<ClientContext>(&|| "k3".into(), &[]).is_err());
    }
}
