//! Erasing a contact, and keeping their opt-out without keeping them: an erased contact's
//! opted-out addresses are kept only as keyed hashes (HMAC-SHA256 with a site secret), and an
//! event that brings the same address back opts its contact out again (see the dispatch).

use crate::Channel;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The key of the address hashes; never logged.
#[derive(Clone)]
pub struct AddressKey(Vec<u8>);

impl std::fmt::Debug for AddressKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AddressKey(<redacted>)")
    }
}

impl AddressKey {
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        Self(key.into())
    }

    /// The hash of an address on a channel: email compared without case, both trimmed.
    pub fn hash(&self, channel: Channel, address: &str) -> String {
        let address = match channel {
            Channel::Email => address.trim().to_lowercase(),
            Channel::Sms => address.trim().to_owned(),
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"suppressed-address/");
        mac.update(channel.as_str().as_bytes());
        mac.update(b"/");
        mac.update(address.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// (contact, channel, hash) of each address the contacts of a batch carry.
    pub(crate) fn hashes_of<'a>(
        &self,
        contacts: impl IntoIterator<Item = (&'a str, Option<&'a str>, Option<&'a str>)>,
    ) -> Vec<(&'a str, Channel, String)> {
        let mut out = Vec::new();
        for (id, email, phone) in contacts {
            for (channel, address) in [(Channel::Email, email), (Channel::Sms, phone)] {
                if let Some(a) = address.filter(|a| !a.trim().is_empty()) {
                    out.push((id, channel, self.hash(channel, a)));
                }
            }
        }
        out
    }
}

/// What an erasure removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Erased {
    pub events: u64,
    pub runs: u64,
    pub messages: u64,
    /// Opted-out addresses kept as hashes.
    pub suppressed_addresses: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_hashes_ignore_case_and_keys_differ() {
        let k = AddressKey::new(b"site secret".to_vec());
        assert_eq!(
            k.hash(Channel::Email, " Ann@Example.com"),
            k.hash(Channel::Email, "ann@example.com")
        );
        assert_ne!(
            k.hash(Channel::Email, "ann@example.com"),
            k.hash(Channel::Sms, "ann@example.com")
        );
        assert_ne!(
            k.hash(Channel::Email, "ann@example.com"),
            AddressKey::new(b"other".to_vec()).hash(Channel::Email, "ann@example.com")
        );
        assert_eq!(k.hash(Channel::Sms, "+15551230000").len(), 64);
    }
}
