//! Unsubscribe links: `{public_url}/u/{token}` where the token names the contact and carries an
//! HMAC over it with a site key, so it cannot be forged for another contact and needs no
//! per-message storage.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Bytes of the MAC kept in the token: 128 bits is beyond guessing and keeps URLs short.
const MAC_LEN: usize = 16;

#[derive(Clone)]
pub struct UnsubscribeKey {
    /// Site secret from the database (`site.unsubscribe_key`); never logged.
    key: Vec<u8>,
}

impl std::fmt::Debug for UnsubscribeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnsubscribeKey(<redacted>)")
    }
}

impl UnsubscribeKey {
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        Self { key: key.into() }
    }

    fn mac(&self, contact_id: &str) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(b"unsubscribe/");
        mac.update(contact_id.as_bytes());
        mac.finalize().into_bytes()[..MAC_LEN].to_vec()
    }

    pub fn token(&self, contact_id: &str) -> String {
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(contact_id),
            URL_SAFE_NO_PAD.encode(self.mac(contact_id))
        )
    }

    pub fn url(&self, public_url: &str, contact_id: &str) -> String {
        format!(
            "{}/u/{}",
            public_url.trim_end_matches('/'),
            self.token(contact_id)
        )
    }

    /// The contact a token was made for, if it is genuine.
    pub fn verify(&self, token: &str) -> Option<String> {
        let (who, mac) = token.split_once('.')?;
        let contact = String::from_utf8(URL_SAFE_NO_PAD.decode(who).ok()?).ok()?;
        let given = URL_SAFE_NO_PAD.decode(mac).ok()?;
        bool::from(given.ct_eq(&self.mac(&contact))).then_some(contact)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_forgeries() {
        let key = UnsubscribeKey::new(b"site key".to_vec());
        let token = key.token("c_123");
        assert_eq!(key.verify(&token).as_deref(), Some("c_123"));
        let other = key.token("c_456");
        let forged = format!(
            "{}.{}",
            token.split('.').next().unwrap(),
            other.split('.').nth(1).unwrap()
        );
        assert_eq!(key.verify(&forged), None);
        assert_eq!(UnsubscribeKey::new(b"other".to_vec()).verify(&token), None);
        assert_eq!(key.verify("garbage"), None);
    }
}
