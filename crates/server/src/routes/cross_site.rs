//! Login and logout CSRF: a hostile page must not be able to sign a learner into someone else's
//! portal (by posting a link it holds) or out of their own. The browser's form posts on herald's
//! pages are refused when the browser says they come from another site: `Sec-Fetch-Site:
//! cross-site`, or, from browsers that do not send it, an `Origin` other than herald's public
//! one. Requests without either header (mail providers' one-click unsubscribe, scripts) are not
//! browsers acting for a learner and pass.

use crate::AppState;
use crate::html::{page, private_page};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

pub async fn refuse_cross_site_posts(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() == Method::POST
        && is_cross_site(request.headers(), &state.engine.public_url)
    {
        tracing::info!(path = %request.uri().path(), "cross-site form post refused");
        return private_page(
            StatusCode::FORBIDDEN,
            page(
                "Not allowed",
                "<h1>Not allowed</h1><p>This form can only be sent from herald's own pages. \
                 Open the link from your email again.</p>",
            ),
        );
    }
    next.run(request).await
}

fn is_cross_site(headers: &HeaderMap, public_url: &str) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return site.as_bytes().eq_ignore_ascii_case(b"cross-site");
    }
    match headers.get(axum::http::header::ORIGIN) {
        Some(origin) => !origin
            .to_str()
            .is_ok_and(|o| o.eq_ignore_ascii_case(origin_of(public_url))),
        None => false,
    }
}

/// `scheme://host[:port]` of a URL.
fn origin_of(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn the_browser_says_where_a_post_comes_from() {
        let public = "https://learn.school.example/herald";
        assert_eq!(origin_of(public), "https://learn.school.example");
        assert!(is_cross_site(
            &headers(&[("sec-fetch-site", "cross-site")]),
            public
        ));
        // Sec-Fetch-Site decides when present, even with an odd Origin.
        assert!(!is_cross_site(
            &headers(&[("sec-fetch-site", "same-origin"), ("origin", "null")]),
            public
        ));
        assert!(!is_cross_site(
            &headers(&[("sec-fetch-site", "same-site")]),
            public
        ));
        assert!(is_cross_site(
            &headers(&[("origin", "https://evil.example")]),
            public
        ));
        assert!(is_cross_site(&headers(&[("origin", "null")]), public));
        assert!(!is_cross_site(
            &headers(&[("origin", "https://LEARN.school.example")]),
            public
        ));
        assert!(!is_cross_site(&headers(&[]), public), "no browser, no CSRF");
    }
}
