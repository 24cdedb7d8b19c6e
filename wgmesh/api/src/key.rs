//! The public half of a node's WireGuard key. Private keys never appear in this crate.

use std::{fmt, str::FromStr};

use base64::{Engine as _, engine::general_purpose::STANDARD};

/// Length of a Curve25519 key in bytes.
pub const KEY_LEN: usize = 32;

/// A WireGuard (Curve25519) public key. `Display` and `FromStr` use standard base64, as `wg` does.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; KEY_LEN]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not valid base64")]
    Base64,
    #[error("key has {0} bytes, a WireGuard key has 32")]
    Length(usize),
    #[error("key is all zeros")]
    Zero,
}

impl PublicKey {
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Lower-case hex, as the WireGuard cross-platform UAPI wants it.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses the UAPI hex form.
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let s = s.trim();
        if s.len() != KEY_LEN * 2 || !s.is_ascii() {
            return Err(KeyError::Length(s.len() / 2));
        }
        let mut out = [0u8; KEY_LEN];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| KeyError::Base64)?;
        }
        Self::checked(out)
    }

    /// A short, stable fingerprint for tables and logs: the first 8 base64 characters.
    pub fn fingerprint(&self) -> String {
        self.to_string().chars().take(8).collect()
    }

    fn checked(bytes: [u8; KEY_LEN]) -> Result<Self, KeyError> {
        if bytes == [0; KEY_LEN] {
            return Err(KeyError::Zero);
        }
        Ok(Self(bytes))
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let raw = STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?;
        let bytes: [u8; KEY_LEN] = raw
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Length(raw.len()))?;
        Self::checked(bytes)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_hex_round_trip() {
        let k: PublicKey = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
            .parse()
            .unwrap();
        assert_eq!(
            k.to_string(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
        assert_eq!(PublicKey::from_hex(&k.to_hex()).unwrap(), k);
        assert_eq!(k.fingerprint(), "HIgo9xNz");
    }

    #[test]
    fn malformed_keys_are_rejected_with_a_reason() {
        assert_eq!("not base64!".parse::<PublicKey>(), Err(KeyError::Base64));
        assert_eq!("AAAA".parse::<PublicKey>(), Err(KeyError::Length(3)));
        let zero = STANDARD.encode([0u8; 32]);
        assert_eq!(zero.parse::<PublicKey>(), Err(KeyError::Zero));
        assert!(PublicKey::from_hex("abc").is_err());
    }
}
