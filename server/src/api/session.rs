//! `/api/v1/session`: the dashboard's login, who is logged in, logout
//! ([`crate::login`] owns the rules). A login answers with the session cookie and the
//! CSRF token the page sends back with every change.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{blocking, ApiError, ApiResult, Ctx};
use crate::login::{self, LoginError, Principal};
use crate::state::AuditEntry;

/// What a login presents: an API token, or a user's name and password.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// An API token (`repo serve token create`).
    pub token: Option<String>,
    /// A user (`repo serve user add`), with `password`.
    pub user: Option<String>,
    pub password: Option<String>,
}

impl From<LoginError> for ApiError {
    fn from(e: LoginError) -> Self {
        match e {
            LoginError::State(_) | LoginError::Internal(_) => Self::internal(e.to_string()),
            LoginError::Expired => {
                Self::new(StatusCode::UNAUTHORIZED, "session_expired", e.to_string())
            }
            _ => Self::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
        }
    }
}

fn principal_json(p: &Principal) -> Value {
    json!({
        "name": p.name,
        "read_only": p.read_only,
        "csrf": p.csrf,
        "expires": p.expires,
    })
}

fn session_cookie(value: &str, max_age: i64, secure: bool) -> HeaderValue {
    let c = format!(
        "{}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        login::COOKIE,
        if secure { "; Secure" } else { "" }
    );
    HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Log in to the dashboard.
#[utoipa::path(
    post,
    path = "/session",
    tag = "daemon",
    security(()),
    request_body = LoginRequest,
    responses(
        (status = 201, description = "A session: its cookie in Set-Cookie (HttpOnly, SameSite=Strict), and in the body who it is, whether it is read-only, its CSRF token (send it as X-CSRF-Token with every change) and when it ends", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn login(
    State(ctx): State<Ctx>,
    body: Result<Json<LoginRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(req) = body?;
    let secure = ctx.site.config.tls.is_some();
    blocking(move || {
        let state = &ctx.site.state;
        let (who, result) = match (&req.token, &req.user, &req.password) {
            (Some(t), None, None) => ("token".to_owned(), login::login_token(state, t)),
            (None, Some(u), Some(p)) => (format!("user:{u}"), login::login_password(state, u, p)),
            _ => {
                return Err(ApiError::bad_request(
                    "send either {\"token\": …} or {\"user\": …, \"password\": …}",
                ))
            }
        };
        let status = if result.is_ok() { 201 } else { 401 };
        let entry = AuditEntry {
            at: chrono::Utc::now(),
            token: result.as_ref().map_or(who, |o| o.principal.name.clone()),
            method: "POST".into(),
            path: "/api/v1/session".into(),
            action: "session.create".into(),
            status,
        };
        state
            .audit(&entry)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        if result.is_err() {
            ctx.metrics.auth_failures.inc();
        }
        let opened = result?;
        let max_age = login::SESSION_HOURS * 3600;
        let mut r = (StatusCode::CREATED, Json(principal_json(&opened.principal))).into_response();
        r.headers_mut().insert(
            header::SET_COOKIE,
            session_cookie(&opened.cookie_value, max_age, secure),
        );
        Ok(r)
    })
    .await
}

/// Who this request acts as.
#[utoipa::path(
    get,
    path = "/session",
    tag = "daemon",
    responses(
        (status = 200, description = "The token or session the request presented: its name, whether it is read-only, and for a session its CSRF token and end", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn whoami(Extension(p): Extension<Principal>) -> Json<Value> {
    Json(principal_json(&p))
}

/// Log out: the session ends and its cookie is cleared.
#[utoipa::path(
    delete,
    path = "/session",
    tag = "daemon",
    responses(
        (status = 200, description = "The session has ended", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn logout(State(ctx): State<Ctx>, headers: HeaderMap) -> ApiResult<Response> {
    let cookie = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| login::cookie(c, login::COOKIE))
        .map(str::to_owned);
    let secure = ctx.site.config.tls.is_some();
    blocking(move || {
        if let Some(c) = cookie {
            login::logout(&ctx.site.state, &c)?;
        }
        let mut r = Json(json!({ "ended": true })).into_response();
        r.headers_mut()
            .insert(header::SET_COOKIE, session_cookie("", 0, secure));
        Ok(r)
    })
    .await
}
