//! DKIM signatures (`HERALD_DKIM_DOMAIN`, `HERALD_DKIM_SELECTOR`, `HERALD_DKIM_KEY`): every email
//! is signed with the school's RSA key, so receivers can tell it comes from the school's domain.
//! lettre signs; this module reads the key (PKCS#1 or PKCS#8 PEM) and chooses the headers.

use lettre::Message;
use lettre::message::dkim::{
    DkimCanonicalization, DkimCanonicalizationType, DkimConfig, DkimSigningAlgorithm,
    DkimSigningKey,
};
use lettre::message::header::HeaderName;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;

/// The headers signed: what a receiver shows or acts on. Gmail asks for `List-Unsubscribe` and
/// `List-Unsubscribe-Post` to be signed before it offers one-click unsubscribe. A listed header
/// a message lacks is signed as absent, as RFC 6376 allows. Not `Content-Type`: lettre writes a
/// multipart's `Content-Type` with the body, after signing, so signing it as absent would break
/// every signature (the test below verifies like a receiver and caught exactly that).
const SIGNED_HEADERS: [&str; 8] = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error(
        "HERALD_DKIM_KEY holds no RSA private key in PEM form (BEGIN RSA PRIVATE KEY or BEGIN PRIVATE KEY): {0}"
    )]
    BadKey(String),
    #[error("HERALD_DKIM_{0} is empty")]
    Empty(&'static str),
}

/// A signing configuration; cheap to share.
#[derive(Debug)]
pub struct Dkim {
    config: DkimConfig,
}

impl Dkim {
    pub fn new(domain: &str, selector: &str, pem: &str) -> Result<Self, DkimError> {
        if domain.trim().is_empty() {
            return Err(DkimError::Empty("DOMAIN"));
        }
        if selector.trim().is_empty() {
            return Err(DkimError::Empty("SELECTOR"));
        }
        let pkcs1 = if pem.contains("BEGIN RSA PRIVATE KEY") {
            pem.to_owned()
        } else {
            rsa::RsaPrivateKey::from_pkcs8_pem(pem)
                .and_then(|k| {
                    k.to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
                        .map(|p| p.to_string())
                        .map_err(rsa::pkcs8::Error::from)
                })
                .map_err(|e| DkimError::BadKey(e.to_string()))?
        };
        let key = DkimSigningKey::new(&pkcs1, DkimSigningAlgorithm::Rsa)
            .map_err(|e| DkimError::BadKey(e.to_string()))?;
        let headers = SIGNED_HEADERS
            .iter()
            .map(|h| HeaderName::new_from_ascii_str(h))
            .collect();
        let config = DkimConfig::new(
            selector.trim().to_owned(),
            domain.trim().to_owned(),
            key,
            headers,
            DkimCanonicalization {
                header: DkimCanonicalizationType::Relaxed,
                body: DkimCanonicalizationType::Relaxed,
            },
        );
        Ok(Self { config })
    }

    pub fn sign(&self, message: &mut Message) {
        message.sign(&self.config);
    }
}

#[cfg(test)]
mod tests {
    //! The signature is checked the way a receiver checks it, written out here from RFC 6376
    //! (relaxed canonicalization, rsa-sha256), with keys made by openssl.
    use super::*;
    use crate::email::{OutgoingEmail, build_message};
    use base64::Engine;
    use rsa::pkcs1v15::Pkcs1v15Sign;
    use rsa::sha2::{Digest, Sha256};

    fn openssl_key(args: &[&str]) -> String {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl makes the test keys (apt-get install openssl)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn email() -> OutgoingEmail {
        OutgoingEmail {
            from: "Ada <ada@school.example.com>".into(),
            to: "ann@example.com".into(),
            subject: "Welcome  to\tRust".into(),
            text: Some("Hi Ann,  \nyour courses:   here\n\n\n".into()),
            html: Some("<p>Hi Ann</p>".into()),
            message_id: "<m1@herald.test>".into(),
            headers: vec![
                ("List-Unsubscribe".into(), "<https://h.test/u/x>".into()),
                (
                    "List-Unsubscribe-Post".into(),
                    "List-Unsubscribe=One-Click".into(),
                ),
            ],
        }
    }

    /// RFC 6376 3.4.4: trailing whitespace of lines removed, runs of whitespace made one space,
    /// empty lines at the end removed, one CRLF at the end.
    fn relaxed_body(body: &str) -> String {
        let mut lines: Vec<String> = body
            .split("\r\n")
            .map(|l| {
                let collapsed: Vec<&str> = l.split([' ', '\t']).filter(|w| !w.is_empty()).collect();
                let lead = if l.starts_with([' ', '\t']) && !collapsed.is_empty() {
                    " "
                } else {
                    ""
                };
                format!("{lead}{}", collapsed.join(" "))
            })
            .collect();
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        if lines.is_empty() {
            return String::new();
        }
        lines.join("\r\n") + "\r\n"
    }

    /// RFC 6376 3.4.2: name lowercased, value unfolded, whitespace runs made one space, trimmed.
    fn relaxed_header(name: &str, value: &str) -> String {
        let unfolded = value.replace("\r\n", "");
        let words: Vec<&str> = unfolded
            .split([' ', '\t'])
            .filter(|w| !w.is_empty())
            .collect();
        format!("{}:{}", name.to_ascii_lowercase(), words.join(" "))
    }

    fn tag<'a>(signature: &'a str, name: &str) -> &'a str {
        signature
            .split(';')
            .map(str::trim)
            .find_map(|t| t.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {signature}"))
    }

    fn verify(pem_private: &str) {
        let dkim = Dkim::new("school.example.com", "herald2026", pem_private).unwrap();
        let mut message = build_message(&email()).unwrap();
        dkim.sign(&mut message);
        let raw = String::from_utf8(message.formatted()).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        // Header fields, unfolded.
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in head.split("\r\n") {
            if line.starts_with([' ', '\t']) {
                fields.last_mut().unwrap().1.push_str(line);
            } else {
                let (n, v) = line.split_once(':').unwrap();
                fields.push((n.to_owned(), v.to_owned()));
            }
        }
        let (_, signature) = fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("DKIM-Signature"))
            .expect("a DKIM-Signature header");
        let signature = signature.replace(['\r', '\n'], "");
        assert_eq!(tag(&signature, "d"), "school.example.com");
        assert_eq!(tag(&signature, "s"), "herald2026");
        assert_eq!(tag(&signature, "a"), "rsa-sha256");
        assert_eq!(tag(&signature, "c"), "relaxed/relaxed");
        let signed = tag(&signature, "h");
        assert!(signed.contains("list-unsubscribe-post"), "{signed}");

        let body_hash = base64::engine::general_purpose::STANDARD
            .encode(Sha256::digest(relaxed_body(body).as_bytes()));
        assert_eq!(tag(&signature, "bh").replace([' ', '\t'], ""), body_hash);

        let mut data = String::new();
        for name in signed.split(':') {
            if let Some((n, v)) = fields
                .iter()
                .rev()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
            {
                data += &relaxed_header(n, v);
                data += "\r\n";
            }
        }
        let b = tag(&signature, "b");
        let without_b = signature.replacen(&format!("b={b}"), "b=", 1);
        data += &relaxed_header("DKIM-Signature", &without_b);
        let key = if pem_private.contains("BEGIN RSA PRIVATE KEY") {
            use rsa::pkcs1::DecodeRsaPrivateKey;
            rsa::RsaPrivateKey::from_pkcs1_pem(pem_private).unwrap()
        } else {
            rsa::RsaPrivateKey::from_pkcs8_pem(pem_private).unwrap()
        };
        let sig = base64::engine::general_purpose::STANDARD
            .decode(b.replace([' ', '\t'], ""))
            .unwrap();
        key.to_public_key()
            .verify(
                Pkcs1v15Sign::new::<Sha256>(),
                &Sha256::digest(data.as_bytes()),
                &sig,
            )
            .expect("the signature verifies over the signed headers");
    }

    #[test]
    fn signatures_verify_with_pkcs1_and_pkcs8_keys() {
        verify(&openssl_key(&["genrsa", "-traditional", "2048"]));
        verify(&openssl_key(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ]));
    }

    #[test]
    fn a_bad_key_or_an_empty_name_is_refused_with_the_variable() {
        let e = Dkim::new("school.example.com", "s1", "not a key").unwrap_err();
        assert!(e.to_string().contains("HERALD_DKIM_KEY"), "{e}");
        let pem = openssl_key(&["genrsa", "-traditional", "2048"]);
        let e = Dkim::new(" ", "s1", &pem).unwrap_err();
        assert!(e.to_string().contains("HERALD_DKIM_DOMAIN"), "{e}");
    }
}
