//! API tokens: made by `repo serve token create`, shown once, stored as a hash.
//!
//! A token is `cairn_` and 32 random bytes in hex. The state database keeps its BLAKE3
//! hash only: a 256-bit random secret needs no slow hash (no dictionary to try), and a
//! stolen database gives no token. A request presents it as `Authorization: Bearer …`.

use chrono::Utc;

use crate::state::{State, StateError, StorageMode, StorageTokenRow, TokenRow};

const PREFIX: &str = "cairn_";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send Authorization: Bearer <token> (create one with repo serve token create --name NAME)")]
    Missing,
    #[error("the Authorization header is not `Bearer <token>`")]
    Malformed,
    #[error("unknown token")]
    Unknown,
    #[error("a token named {0:?} exists already")]
    Exists(String),
    #[error("token name {0:?}: use 1-64 letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error(transparent)]
    State(#[from] StateError),
}

/// The stored form of a token.
#[must_use]
pub fn hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// Makes a token named `name`; returns the secret, which is never stored.
pub fn create(state: &State, name: &str, read_only: bool) -> Result<String, AuthError> {
    let token = new_secret(name)?;
    let taken = state.storage_tokens()?.iter().any(|t| t.name == name);
    if taken || !state.add_token(name, &hash(&token), read_only, Utc::now())? {
        return Err(AuthError::Exists(name.to_owned()));
    }
    Ok(token)
}

/// Makes a token for the storage of one repository (`crate::storage`): it opens nothing
/// of the API, and no other repository.
pub fn create_storage(
    state: &State,
    name: &str,
    repository: &str,
    mode: StorageMode,
    quota: Option<u64>,
) -> Result<String, AuthError> {
    let token = new_secret(name)?;
    if !state.add_storage_token(name, &hash(&token), repository, mode, quota, Utc::now())? {
        return Err(AuthError::Exists(name.to_owned()));
    }
    Ok(token)
}

/// A new secret for a token named `name` (which must be a good name).
fn new_secret(name: &str) -> Result<String, AuthError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(AuthError::BadName(name.to_owned()));
    }
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret)
        .map_err(|e| StateError::Corrupt(format!("no randomness for a token: {e}")))?;
    Ok(format!("{PREFIX}{}", hex::encode(secret)))
}

/// The storage token an `Authorization` header value presents.
pub fn authenticate_storage(
    state: &State,
    header: Option<&str>,
) -> Result<StorageTokenRow, AuthError> {
    let token = bearer(header)?;
    state
        .use_storage_token(&hash(token), Utc::now())?
        .ok_or(AuthError::Unknown)
}

/// The token of a `Bearer <token>` header value, if it has a token's shape.
fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let value = header.ok_or(AuthError::Missing)?;
    let token = value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Malformed)?;
    if !token.starts_with(PREFIX) || token.len() != PREFIX.len() + 64 {
        return Err(AuthError::Unknown);
    }
    Ok(token)
}

/// The token an `Authorization` header value presents.
pub fn authenticate(state: &State, header: Option<&str>) -> Result<TokenRow, AuthError> {
    let token = bearer(header)?;
    state
        .use_token(&hash(token), Utc::now())?
        .ok_or(AuthError::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_shown_once_stored_hashed_and_read_back_by_its_secret() {
        let d = tempfile::tempdir().unwrap();
        let s = State::open(d.path()).unwrap();
        let t = create(&s, "ci", true).unwrap();
        assert!(t.starts_with("cairn_") && t.len() == 70);
        let raw = std::fs::read(s.path()).unwrap();
        assert!(
            !raw.windows(t.len()).any(|w| w == t.as_bytes()),
            "the secret is stored"
        );
        let row = authenticate(&s, Some(&format!("Bearer {t}"))).unwrap();
        assert_eq!(row.name, "ci");
        assert!(row.read_only);
        assert!(matches!(create(&s, "ci", false), Err(AuthError::Exists(_))));
        assert!(matches!(
            create(&s, "a b", false),
            Err(AuthError::BadName(_))
        ));
        assert!(matches!(authenticate(&s, None), Err(AuthError::Missing)));
        assert!(matches!(
            authenticate(&s, Some(&t)),
            Err(AuthError::Malformed)
        ));
        let mut wrong = t.clone();
        wrong.pop();
        wrong.push(if t.ends_with('0') { '1' } else { '0' });
        assert!(matches!(
            authenticate(&s, Some(&format!("Bearer {wrong}"))),
            Err(AuthError::Unknown)
        ));
        assert!(s.remove_token("ci").unwrap());
        assert!(matches!(
            authenticate(&s, Some(&format!("Bearer {t}"))),
            Err(AuthError::Unknown)
        ));
    }
}
