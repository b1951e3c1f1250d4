//! The web dashboard's files, embedded in the binary and served by `repo serve` at `/`
//! and `/ui/…`. The dashboard is a page of plain JavaScript modules (no framework, no
//! build step) that does everything through `/api/v1` with the session cookie: it can
//! do nothing the API cannot (docs/ARCHITECTURE.md, "The dashboard").
//!
//! Text lives in one catalogue per language (`assets/i18n/*.json`); a test checks that
//! both have the same keys and that every key the code uses exists.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// One embedded file: its name under `/ui/`, its type, its bytes.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

macro_rules! asset {
    ($name:literal, $type:literal) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_str!(concat!("../assets/", $name)),
        }
    };
}

const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("api.js", "text/javascript; charset=utf-8"),
    asset!("dom.js", "text/javascript; charset=utf-8"),
    asset!("i18n.js", "text/javascript; charset=utf-8"),
    asset!("pages.js", "text/javascript; charset=utf-8"),
    asset!("snapshots.js", "text/javascript; charset=utf-8"),
    asset!("health.js", "text/javascript; charset=utf-8"),
    asset!("jobform.js", "text/javascript; charset=utf-8"),
    asset!("recovery.js", "text/javascript; charset=utf-8"),
    asset!("chart.js", "text/javascript; charset=utf-8"),
    asset!("verifications.js", "text/javascript; charset=utf-8"),
    asset!("i18n/en.json", "application/json"),
    asset!("i18n/fr.json", "application/json"),
];

/// The languages the dashboard speaks, with their catalogues.
pub const LANGUAGES: &[&str] = &["en", "fr"];

/// Nothing from elsewhere: no CDN, no inline script, no framing.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn serve(name: &str) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.name == name) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let mut r = a.body.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

/// `/` (the page) and `/ui/{file}`.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { serve("index.html") }))
        .route(
            "/ui/{*file}",
            get(|Path(file): Path<String>| async move { serve(&file) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn catalogue(lang: &str) -> serde_json::Map<String, serde_json::Value> {
        let a = ASSETS
            .iter()
            .find(|a| a.name == format!("i18n/{lang}.json"))
            .unwrap();
        serde_json::from_str(a.body).unwrap()
    }

    /// Every `t("key")` of the code.
    fn used_keys() -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for a in ASSETS
            .iter()
            .filter(|a| a.name.ends_with(".js") || a.name.ends_with(".html"))
        {
            for quote in ['"', '\''] {
                for prefix in [format!("t({quote}"), format!("data-t={quote}")] {
                    let mut rest = a.body;
                    while let Some(i) = rest.find(&prefix) {
                        // `t(` alone, not the end of `get(`.
                        let call = rest[..i]
                            .chars()
                            .next_back()
                            .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '.'));
                        rest = &rest[i + prefix.len()..];
                        if let (true, Some(end)) = (call, rest.find(quote)) {
                            keys.insert(rest[..end].to_owned());
                        }
                    }
                }
            }
        }
        keys
    }

    #[test]
    fn every_language_has_every_key_the_code_uses_and_no_other() {
        let en: BTreeSet<String> = catalogue("en").keys().cloned().collect();
        let used = used_keys();
        assert!(used.len() > 40, "{} keys found in the code", used.len());
        for lang in LANGUAGES {
            let c = catalogue(lang);
            let keys: BTreeSet<String> = c.keys().cloned().collect();
            assert_eq!(
                keys.symmetric_difference(&en).collect::<Vec<_>>(),
                Vec::<&String>::new(),
                "{lang} and en differ"
            );
            let missing: Vec<_> = used.difference(&keys).collect();
            assert!(missing.is_empty(), "{lang} lacks {missing:?}");
            for (k, v) in &c {
                assert!(
                    v.as_str().is_some_and(|s| !s.trim().is_empty()),
                    "{lang}: {k} is empty"
                );
            }
        }
        // Keys the code builds: `status.<run status>`, `lang.<language>`, `log.<level>`,
        // `nav.<page>`, `kind.<entry type>`, `change.<diff change>`, `day.<weekday>`,
        // `keep.<rule>`, `sched.<kind>`, `form.db_<engine>`, `recover.runtime_<runtime>`,
        // `snapkind.<snapshot kind>`, `verify.status.<verification status>`.
        let built = [
            "status.",
            "lang.",
            "log.",
            "nav.",
            "kind.",
            "change.",
            "day.",
            "keep.",
            "sched.",
            "form.db_",
            "recover.runtime_",
            "snapkind.",
            "verify.status.",
        ];
        let unused: Vec<_> = en
            .difference(&used)
            .filter(|k| !built.iter().any(|b| k.starts_with(b)))
            .collect();
        assert!(unused.is_empty(), "keys nothing uses: {unused:?}");
    }

    #[test]
    fn files_are_served_with_their_type_and_nothing_else_is() {
        let r = serve("app.js");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        assert!(r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("default-src 'self'"));
        assert_eq!(serve("../Cargo.toml").status(), StatusCode::NOT_FOUND);
        assert_eq!(serve("nope.js").status(), StatusCode::NOT_FOUND);
    }
}
