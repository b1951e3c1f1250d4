//! Logging in to the dashboard: users with passwords (`repo serve user add`), and the
//! browser sessions a login opens.
//!
//! A login presents an API token or a user's password and gets a session: a random
//! 32-byte id sent back as the `cairn_session` cookie (HttpOnly, SameSite=Strict, Path=/,
//! Secure under TLS) and a CSRF token the page keeps and sends as `X-CSRF-Token` with
//! every change. The state database keeps the BLAKE3 hash of the session id only, as it
//! does for tokens. A session has the rights of what opened it (a read-only token or
//! user opens a read-only session) and ends after [`SESSION_HOURS`], at logout, or when
//! the user or token that opened it is removed (`State::remove_token` ends a token's).
//!
//! Passwords are stored as argon2id hashes (`argon2id$m,t,p$salt$hash`, hex), checked
//! in constant time.

use argon2::{Algorithm, Argon2, Params, Version};
use chrono::{DateTime, Duration, Utc};

use crate::auth;
use crate::state::{SessionRow, State, StateError, UserRow};

/// How long a session lasts after its login.
pub const SESSION_HOURS: i64 = 12;

/// The session cookie's name.
pub const COOKIE: &str = "cairn_session";

/// The header a session's changes carry its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// argon2id cost of a stored password (OWASP's second recommendation: 19 MiB, 2 passes).
const MEMORY_KIB: u32 = 19 * 1024;
const PASSES: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// Deliberately says nothing about which of name or password was wrong.
    #[error("wrong user name or password")]
    WrongPassword,
    #[error("unknown token")]
    UnknownToken,
    #[error("your session has ended: log in again")]
    Expired,
    #[error("user name {0:?}: use 1-64 letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("a user named {0:?} exists already")]
    Exists(String),
    #[error("no user named {0:?}")]
    NoUser(String),
    #[error("a password needs at least 8 characters")]
    ShortPassword,
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    State(#[from] StateError),
}

/// Who a request acts as: a token, or a session a token or a user opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// What the audit log records: the token's name, or `user:NAME`.
    pub name: String,
    pub read_only: bool,
    /// A session's CSRF token (`None` for a request with a bearer token).
    pub csrf: Option<String>,
    pub expires: Option<DateTime<Utc>>,
}

fn random_hex() -> Result<String, LoginError> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b)
        .map_err(|e| LoginError::Internal(format!("no randomness: {e}")))?;
    Ok(hex::encode(b))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn derive(password: &[u8], salt: &[u8], m: u32, t: u32, p: u32) -> Result<[u8; 32], LoginError> {
    let params =
        Params::new(m, t, p, Some(32)).map_err(|e| LoginError::Internal(format!("argon2: {e}")))?;
    let mut out = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(password, salt, &mut out)
        .map_err(|e| LoginError::Internal(format!("argon2: {e}")))?;
    Ok(out)
}

/// The stored form of `password`.
pub fn hash_password(password: &str) -> Result<String, LoginError> {
    if password.chars().count() < 8 {
        return Err(LoginError::ShortPassword);
    }
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt)
        .map_err(|e| LoginError::Internal(format!("no randomness: {e}")))?;
    let h = derive(password.as_bytes(), &salt, MEMORY_KIB, PASSES, 1)?;
    Ok(format!(
        "argon2id${MEMORY_KIB},{PASSES},1${}${}",
        hex::encode(salt),
        hex::encode(h)
    ))
}

/// Whether `password` is the one `stored` was made from.
fn password_matches(stored: &str, password: &str) -> bool {
    let parts: Vec<&str> = stored.split('$').collect();
    let [alg, cost, salt, want] = parts.as_slice() else {
        return false;
    };
    let cost: Vec<u32> = cost.split(',').filter_map(|c| c.parse().ok()).collect();
    let (Ok(salt), Ok(want), [m, t, p]) = (hex::decode(salt), hex::decode(want), cost.as_slice())
    else {
        return false;
    };
    if *alg != "argon2id" {
        return false;
    }
    derive(password.as_bytes(), &salt, *m, *t, *p).is_ok_and(|got| constant_time_eq(&got, &want))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Adds user `name` with `password`.
pub fn add_user(
    state: &State,
    name: &str,
    password: &str,
    read_only: bool,
) -> Result<(), LoginError> {
    if !valid_name(name) {
        return Err(LoginError::BadName(name.to_owned()));
    }
    let hash = hash_password(password)?;
    if !state.add_user(name, &hash, read_only, Utc::now())? {
        return Err(LoginError::Exists(name.to_owned()));
    }
    Ok(())
}

/// Removes user `name` and ends every session they opened.
pub fn remove_user(state: &State, name: &str) -> Result<(), LoginError> {
    if !state.remove_user(name)? {
        return Err(LoginError::NoUser(name.to_owned()));
    }
    state.end_sessions_of(&format!("user:{name}"))?;
    Ok(())
}

/// A new session and its cookie value.
pub struct Opened {
    pub cookie_value: String,
    pub principal: Principal,
}

fn open(
    state: &State,
    name: String,
    read_only: bool,
    now: DateTime<Utc>,
) -> Result<Opened, LoginError> {
    let id = random_hex()?;
    let csrf = random_hex()?;
    // To the millisecond, as the state database keeps it.
    let end = now + Duration::hours(SESSION_HOURS);
    let expires = DateTime::from_timestamp_millis(end.timestamp_millis()).unwrap_or(end);
    state.add_session(&SessionRow {
        hash: auth::hash(&id),
        principal: name.clone(),
        read_only,
        csrf: csrf.clone(),
        created: now,
        expires,
    })?;
    Ok(Opened {
        cookie_value: id,
        principal: Principal {
            name,
            read_only,
            csrf: Some(csrf),
            expires: Some(expires),
        },
    })
}

/// Opens a session with user `name`'s password.
pub fn login_password(state: &State, name: &str, password: &str) -> Result<Opened, LoginError> {
    let user: Option<UserRow> = state.user(name)?;
    // A missing user costs the same derivation as a wrong password.
    let stored = user.as_ref().map_or(
        "argon2id$19456,2,1$00000000000000000000000000000000$00",
        |u| u.hash.as_str(),
    );
    let ok = password_matches(stored, password);
    match user {
        Some(u) if ok => open(state, format!("user:{}", u.name), u.read_only, Utc::now()),
        _ => Err(LoginError::WrongPassword),
    }
}

/// Opens a session with an API token.
pub fn login_token(state: &State, token: &str) -> Result<Opened, LoginError> {
    let row = auth::authenticate(state, Some(&format!("Bearer {}", token.trim())))
        .map_err(|_| LoginError::UnknownToken)?;
    open(state, row.name, row.read_only, Utc::now())
}

/// The session a cookie value names, if it is still open.
pub fn session(
    state: &State,
    cookie_value: &str,
    now: DateTime<Utc>,
) -> Result<Principal, LoginError> {
    let row = state
        .session(&auth::hash(cookie_value))?
        .ok_or(LoginError::Expired)?;
    if row.expires <= now {
        state.end_session(&row.hash)?;
        return Err(LoginError::Expired);
    }
    Ok(Principal {
        name: row.principal,
        read_only: row.read_only,
        csrf: Some(row.csrf),
        expires: Some(row.expires),
    })
}

/// Ends the session a cookie value names (logging out).
pub fn logout(state: &State, cookie_value: &str) -> Result<(), LoginError> {
    state.end_session(&auth::hash(cookie_value))?;
    Ok(())
}

/// The value of cookie `name` in a `Cookie` header.
#[must_use]
pub fn cookie<'h>(header: &'h str, name: &str) -> Option<&'h str> {
    header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// Whether a change carries the session's CSRF token.
#[must_use]
pub fn csrf_ok(principal: &Principal, presented: Option<&str>) -> bool {
    match (&principal.csrf, presented) {
        (None, _) => true,
        (Some(want), Some(got)) => constant_time_eq(want.as_bytes(), got.as_bytes()),
        (Some(_), None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_logs_in_with_the_right_password_only_and_the_session_ends() {
        let d = tempfile::tempdir().unwrap();
        let s = State::open(d.path()).unwrap();
        assert!(matches!(
            add_user(&s, "alice", "short", false),
            Err(LoginError::ShortPassword)
        ));
        assert!(matches!(
            add_user(&s, "a b", "long enough", false),
            Err(LoginError::BadName(_))
        ));
        add_user(&s, "alice", "correct horse", false).unwrap();
        assert!(matches!(
            add_user(&s, "alice", "correct horse", false),
            Err(LoginError::Exists(_))
        ));
        let raw = std::fs::read(s.path()).unwrap();
        assert!(!raw.windows(13).any(|w| w == b"correct horse"));
        assert!(matches!(
            login_password(&s, "alice", "wrong horse"),
            Err(LoginError::WrongPassword)
        ));
        assert!(matches!(
            login_password(&s, "bob", "correct horse"),
            Err(LoginError::WrongPassword)
        ));
        let o = login_password(&s, "alice", "correct horse").unwrap();
        assert_eq!(o.principal.name, "user:alice");
        let p = session(&s, &o.cookie_value, Utc::now()).unwrap();
        assert_eq!(p, o.principal);
        assert!(csrf_ok(&p, p.csrf.as_deref()));
        assert!(!csrf_ok(&p, None));
        assert!(!csrf_ok(&p, Some("0000")));
        // Expired, then gone.
        let later = Utc::now() + Duration::hours(SESSION_HOURS + 1);
        assert!(matches!(
            session(&s, &o.cookie_value, later),
            Err(LoginError::Expired)
        ));
        assert!(matches!(
            session(&s, &o.cookie_value, Utc::now()),
            Err(LoginError::Expired)
        ));
        // Removing the user ends their sessions.
        let o = login_password(&s, "alice", "correct horse").unwrap();
        remove_user(&s, "alice").unwrap();
        assert!(session(&s, &o.cookie_value, Utc::now()).is_err());
    }

    #[test]
    fn a_token_session_has_the_token_s_rights_and_ends_with_it() {
        let d = tempfile::tempdir().unwrap();
        let s = State::open(d.path()).unwrap();
        let t = auth::create(&s, "viewer", true).unwrap();
        assert!(matches!(
            login_token(&s, "cairn_nope"),
            Err(LoginError::UnknownToken)
        ));
        let o = login_token(&s, &t).unwrap();
        assert!(o.principal.read_only);
        assert!(session(&s, &o.cookie_value, Utc::now()).is_ok());
        logout(&s, &o.cookie_value).unwrap();
        assert!(session(&s, &o.cookie_value, Utc::now()).is_err());
        let o = login_token(&s, &t).unwrap();
        assert!(s.remove_token("viewer").unwrap());
        assert!(session(&s, &o.cookie_value, Utc::now()).is_err());
    }

    #[test]
    fn cookies_are_found_by_name() {
        assert_eq!(cookie("a=1; cairn_session=xyz; b=2", COOKIE), Some("xyz"));
        assert_eq!(cookie("cairn_sessionx=1", COOKIE), None);
        assert_eq!(cookie("", COOKIE), None);
    }
}
