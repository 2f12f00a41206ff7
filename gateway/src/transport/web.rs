//! The web client (`gateway/web/`): plain HTML, CSS and JavaScript compiled
//! into the binary, so running the product needs no build step and no files
//! beside it. Served at `/` by the standalone gateway, and by a clustered one
//! when its config says `webClient: true`.

use hyper::StatusCode;
use hyper::header::{CACHE_CONTROL, HeaderValue};

use super::{HttpResponse, respond};

const INDEX: &str = include_str!("../../web/index.html");
const SCRIPT: &str = include_str!("../../web/app.js");
const STYLE: &str = include_str!("../../web/style.css");
const ICON: &str = include_str!("../../web/icon.svg");

/// Only this origin's script and style, sockets to any gateway (a drain's
/// `reconnect` may name another), no framing by other sites.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self' ws: wss:; \
                      img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The file at `path`, if it is one of the client's.
pub fn asset(path: &str) -> Option<HttpResponse> {
    let (content_type, body) = match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", INDEX),
        "/web/app.js" => ("text/javascript; charset=utf-8", SCRIPT),
        "/web/style.css" => ("text/css; charset=utf-8", STYLE),
        "/web/icon.svg" | "/favicon.ico" => ("image/svg+xml", ICON),
        _ => return None,
    };
    let mut response = respond(StatusCode::OK, content_type, body);
    let headers = response.headers_mut();
    headers.insert("content-security-policy", HeaderValue::from_static(POLICY));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    // Small, and replaced with the binary: always asked again, never stale.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_the_files_served_here() {
        for referenced in ["/web/app.js", "/web/style.css", "/web/icon.svg"] {
            assert!(INDEX.contains(&format!("\"{referenced}\"")), "index.html references {referenced}");
            assert!(asset(referenced).is_some(), "{referenced} is served");
        }
        let page = asset("/").expect("index");
        assert_eq!(page.status(), StatusCode::OK);
        assert!(page.headers()["content-security-policy"].to_str().expect("ascii").contains("script-src 'self'"));
        assert!(asset("/web/other.js").is_none());
        assert!(!INDEX.contains("<script>") && !INDEX.contains("style="), "no inline code: the policy forbids it");
    }
}
