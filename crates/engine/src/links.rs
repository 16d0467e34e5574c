//! Magic-link tokens and session ids: 32 bytes from the OS CSPRNG, base64url (43 characters);
//! only their SHA-256 is ever stored or looked up. The raw value exists in memory just long
//! enough to be put into a message or a cookie, and is never logged.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_store::{ContactId, LinkKind, MessageId, NewLink, Store, StoreError, Timestamp};
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// A freshly generated secret and the hash under which it is stored.
pub struct Minted {
    /// The value for the URL or cookie. Deliberately not `Debug`.
    pub raw: String,
    pub hash: String,
}

/// 256 bits from the OS's CSPRNG.
pub fn generate() -> Minted {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    let raw = URL_SAFE_NO_PAD.encode(bytes);
    Minted {
        hash: hash(&raw),
        raw,
    }
}

/// Hex SHA-256 of a token or session id: the only form stored and looked up.
pub fn hash(raw: &str) -> String {
    let digest = Sha256::digest(raw.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a path segment can be a token at all (43 base64url characters); anything else is
/// refused before touching the database.
pub fn looks_like_token(s: &str) -> bool {
    s.len() == 43
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// How learner links are minted.
#[derive(Debug, Clone)]
pub struct LinkPolicy {
    pub public_url: String,
    pub learner_ttl: std::time::Duration,
    pub learner_uses: i64,
    /// A secret kept outside the database (the admin token) that the user link's token is also
    /// derived from, so that reading the database is not enough to sign in as staff.
    pub user_link_secret: Option<SecretString>,
}

impl LinkPolicy {
    pub fn url(&self, raw: &str) -> String {
        format!("{}/l/{raw}", self.public_url.trim_end_matches('/'))
    }

    fn learner_link(
        &self,
        hash: String,
        contact_id: &str,
        message_id: Option<MessageId>,
        now: Timestamp,
    ) -> NewLink {
        NewLink {
            token_hash: hash,
            kind: LinkKind::Learner,
            contact_id: Some(ContactId::from(contact_id)),
            message_id,
            max_uses: Some(self.learner_uses),
            expires: Some(now + self.learner_ttl),
        }
    }

    /// A fresh link for one message being sent (a retry of that message replaces the earlier
    /// one): the row to store and the URL to put into the message. Stored in batches by the
    /// deliverer (`Store::mint_message_links`), which also checks the contact's entitlement.
    pub fn for_message(
        &self,
        contact_id: &str,
        message_id: &MessageId,
        now: Timestamp,
    ) -> (NewLink, String) {
        let token = generate();
        (
            self.learner_link(token.hash, contact_id, Some(message_id.clone()), now),
            self.url(&token.raw),
        )
    }

    /// A new link for a contact that invalidates every older one (`links regenerate`, admin API).
    pub async fn regenerate_learner(
        &self,
        store: &Store,
        contact_id: &str,
        now: Timestamp,
    ) -> Result<String, StoreError> {
        let token = generate();
        store
            .regenerate_link(
                self.learner_link(token.hash, contact_id, None, now),
                None,
                now,
            )
            .await?;
        Ok(self.url(&token.raw))
    }

    /// A fresh link for a contact without revoking others ("Email me a new link").
    pub async fn mint_learner(
        &self,
        store: &Store,
        contact_id: &str,
        now: Timestamp,
    ) -> Result<String, StoreError> {
        let token = generate();
        store
            .mint_link(self.learner_link(token.hash, contact_id, None, now), now)
            .await?;
        Ok(self.url(&token.raw))
    }

    /// The site's user (staff) link. It must be retrievable (`herald links user`, the admin API
    /// show it again), so its token is derived, not stored: from a site key kept in the
    /// database, a generation number, and [`LinkPolicy::user_link_secret`] when set (then the
    /// database alone does not reveal it). Regenerating bumps the generation, revoking the old
    /// hash; only the hash is in `magic_links`, as for every link. When the derived token is no
    /// longer a live link (the secret changed), a new generation is started, so the URL shown
    /// always works.
    pub async fn user_link(
        &self,
        store: &Store,
        regenerate: bool,
        now: Timestamp,
    ) -> Result<String, StoreError> {
        let key = store
            .site_value("user_link_key".into(), generate().raw)
            .await?;
        let current: u64 = store
            .site_value("user_link_generation".into(), "0".into())
            .await?
            .parse()
            .unwrap_or(0);
        let secret = self
            .user_link_secret
            .as_ref()
            .map(|s| s.expose_secret().as_bytes());
        let live = current > 0
            && !regenerate
            && store
                .check_link(hash(&derive(&key, secret, current)), now)
                .await?
                .is_ok();
        let generation = if live { current } else { current + 1 };
        let raw = derive(&key, secret, generation);
        if generation != current {
            let link = NewLink {
                token_hash: hash(&raw),
                kind: LinkKind::User,
                contact_id: None,
                message_id: None,
                max_uses: None,
                expires: None,
            };
            // The new link and its generation together: a crash between them would leave a
            // generation whose link was never stored.
            store
                .regenerate_link(
                    link,
                    Some(("user_link_generation".into(), generation.to_string())),
                    now,
                )
                .await?;
        }
        Ok(self.url(&raw))
    }
}

/// The user link token of a generation, 43 base64url characters: HMAC-SHA256 keyed with the
/// secret over the site key and generation, or without a secret SHA-256 of them.
fn derive(key: &str, secret: Option<&[u8]>, generation: u64) -> String {
    let digest = match secret {
        Some(secret) => {
            let mut mac =
                Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
            mac.update(key.as_bytes());
            mac.update(b"/user-link/");
            mac.update(&generation.to_be_bytes());
            mac.finalize().into_bytes()
        }
        None => {
            let mut h = Sha256::new();
            h.update(key.as_bytes());
            h.update(b"/user-link/");
            h.update(generation.to_be_bytes());
            h.finalize()
        }
    };
    URL_SAFE_NO_PAD.encode(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_43_url_safe_chars_and_distinct() {
        let a = generate();
        let b = generate();
        assert!(looks_like_token(&a.raw), "{}", a.raw.len());
        assert_ne!(a.raw, b.raw);
        assert_eq!(a.hash, hash(&a.raw));
        assert_eq!(a.hash.len(), 64);
        assert!(!a.hash.contains(&a.raw));
    }

    #[test]
    fn derived_user_tokens_change_with_generation_and_secret() {
        assert_ne!(derive("k", None, 1), derive("k", None, 2));
        assert!(looks_like_token(&derive("k", None, 1)));
        let with = |secret: &[u8]| derive("k", Some(secret), 1);
        assert!(looks_like_token(&with(b"admin")));
        assert_eq!(with(b"admin"), with(b"admin"));
        assert_ne!(with(b"admin"), with(b"other"));
        assert_ne!(with(b"admin"), derive("k", None, 1));
    }

    #[test]
    fn rejects_non_tokens() {
        for s in ["", "abc", &"a".repeat(44), &format!("{}!", "a".repeat(42))] {
            assert!(!looks_like_token(s), "{s}");
        }
    }
}
