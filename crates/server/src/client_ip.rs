//! The address of the client a request is for, for per-client rate limits. Behind a proxy every
//! request comes from the proxy, so the limits would be shared by all learners; the proxy's
//! `X-Forwarded-For` (or `Forwarded: for=`) names the client. Those headers are believed only
//! from the configured trusted proxies (anyone else could write them), read from the right: the
//! first address that is not a trusted proxy is the client.

use axum::http::HeaderMap;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let peer = peer.ip();
    if !is_trusted(&peer) {
        return peer;
    }
    let mut chain = forwarded_for(headers);
    // Nearest hop last: walk back past our own proxies.
    while let Some(ip) = chain.pop() {
        if !is_trusted(&ip) || chain.is_empty() {
            return ip;
        }
    }
    peer
}

/// The addresses the proxies recorded, farthest first: every `X-Forwarded-For`, else every
/// `Forwarded` header's `for=`. An entry that is not an address (`unknown`, an obfuscated name)
/// ends the list there, as nothing before it can be attributed.
fn forwarded_for(headers: &HeaderMap) -> Vec<IpAddr> {
    let xff: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    let entries: Vec<String> = if !xff.is_empty() {
        xff.iter().map(|e| e.trim().to_owned()).collect()
    } else {
        headers
            .get_all("forwarded")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (key, value) = pair.trim().split_once('=')?;
                    key.eq_ignore_ascii_case("for")
                        .then(|| value.trim().trim_matches('"').to_owned())
                })
            })
            .collect()
    };
    let mut out = Vec::new();
    for entry in entries {
        match parse_node(&entry) {
            Some(ip) => out.push(ip),
            None => out.clear(),
        }
    }
    out
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]:5678`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse() {
        return Some(ip);
    }
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    node.rsplit_once(':')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_proxies() {
        let proxy: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = headers(&[("x-forwarded-for", "198.51.100.7, 203.0.113.9")]);
        // The nearest untrusted hop is the client; the leftmost entry could be forged by it.
        assert_eq!(client_ip(proxy, &xff, &trusted), ip("203.0.113.9"));
        // Not from a trusted proxy: the header is anyone's to write.
        let stranger: SocketAddr = "192.0.2.1:1".parse().unwrap();
        assert_eq!(client_ip(stranger, &xff, &trusted), ip("192.0.2.1"));
        assert_eq!(client_ip(proxy, &xff, &[]), ip("10.0.0.2"));
        // Our own proxies in the chain are skipped.
        let chained = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "10.1.1.1"),
        ]);
        assert_eq!(client_ip(proxy, &chained, &trusted), ip("203.0.113.9"));
        // RFC 7239 with ports and IPv6.
        let fwd = headers(&[(
            "forwarded",
            "for=\"[2001:db8::7]:4711\";proto=https, for=10.3.3.3",
        )]);
        assert_eq!(client_ip(proxy, &fwd, &trusted), ip("2001:db8::7"));
        // Nothing usable: the proxy itself.
        let junk = headers(&[("x-forwarded-for", "unknown")]);
        assert_eq!(client_ip(proxy, &junk, &trusted), ip("10.0.0.2"));
        assert_eq!(
            client_ip(proxy, &HeaderMap::new(), &trusted),
            ip("10.0.0.2")
        );
    }
}
