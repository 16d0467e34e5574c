//! Minimal HTML helpers for herald's server-rendered pages.

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#x27;"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes plain text and turns its http(s) URLs into links.
pub fn linkify(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest
        .find("http://")
        .into_iter()
        .chain(rest.find("https://"))
        .min()
    {
        out.push_str(&escape(&rest[..start]));
        let url_len = rest[start..]
            .find(|c: char| c.is_whitespace() || c == '<' || c == '>' || c == '"')
            .unwrap_or(rest.len() - start);
        let url = &rest[start..start + url_len];
        out.push_str(&format!("<a href=\"{0}\">{0}</a>", escape(url)));
        rest = &rest[start + url_len..];
    }
    out.push_str(&escape(rest));
    out
}

/// An HTML answer that must not be cached, framed, or leak its URL (which may hold a token) as a
/// referrer.
pub fn private_page(status: axum::http::StatusCode, html: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut response = (status, axum::response::Html(html)).into_response();
    no_store(&mut response);
    response
}

/// Marks a response as private: not cached, not framed, no referrer.
pub fn no_store(response: &mut axum::response::Response) {
    use axum::http::{HeaderValue, header};
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
}

/// A complete page: phone-friendly, no scripts, no third-party resources.
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>body{{font-family:system-ui,sans-serif;max-width:46rem;margin:0 auto;padding:1rem;line-height:1.5}}\
         table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #ddd;padding:.4rem;text-align:left;vertical-align:top}}\
         pre{{white-space:pre-wrap;word-break:break-word}}button{{font-size:1.1rem;padding:.6rem 1.2rem}}</style></head>\
         <body>{body}</body></html>",
        escape(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_links() {
        assert_eq!(
            escape("<a href='x'>&</a>"),
            "&lt;a href=&#x27;x&#x27;&gt;&amp;&lt;/a&gt;"
        );
        assert_eq!(
            linkify("Go: https://h.test/l/abc?x=1&y=2 now <b>"),
            "Go: <a href=\"https://h.test/l/abc?x=1&amp;y=2\">https://h.test/l/abc?x=1&amp;y=2</a> now &lt;b&gt;"
        );
    }
}
