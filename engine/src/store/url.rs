//! [`RepositoryUrl`]: where a repository is, as a user writes it.
//!
//! - `/path/to/repo` (or a relative path): a local directory ([`super::LocalBackend`]);
//! - `s3://bucket/prefix?endpoint=https://host:port&region=…`: an S3-compatible object
//!   store ([`super::s3`]); credentials come from the environment or a config file,
//!   never from the URL (a URL ends up in logs, `ps` and shell history);
//! - `https://server:8087/repo/NAME`: a repository served by `repo serve`.

use std::fmt;
use std::path::PathBuf;

/// Where a repository is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepositoryUrl {
    Local(PathBuf),
    S3(S3Location),
    Remote(String),
}

/// A repository in an S3 bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// The key prefix of the repository's objects, without leading or trailing `/`
    /// (empty: the bucket's root).
    pub prefix: String,
    /// The service's URL (`http://127.0.0.1:9000`); `None`: AWS, from the region.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Whether the store honours `If-None-Match: *` on a PUT (`conditional_create=false`
    /// in the URL for one that does not, like Garage): see [`super::s3`].
    pub conditional_create: bool,
}

/// Why a URL is not a repository's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("repository URL {url:?}: {reason}")]
pub struct UrlError {
    pub url: String,
    pub reason: String,
}

impl RepositoryUrl {
    /// Reads a repository URL or path.
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        let bad = |reason: &str| UrlError {
            url: redact(text),
            reason: reason.to_owned(),
        };
        if let Some(rest) = text.strip_prefix("s3://") {
            return S3Location::parse(rest).map(Self::S3).map_err(|r| bad(&r));
        }
        if text.starts_with("https://") || text.starts_with("http://") {
            if authority(text).contains('@') {
                return Err(bad("credentials do not belong in a URL: use a token file"));
            }
            return Ok(Self::Remote(text.to_owned()));
        }
        if let Some((scheme, _)) = text.split_once("://") {
            return Err(bad(&format!(
                "unknown scheme {scheme:?}: a path, s3://bucket/prefix or https://server/repo/NAME"
            )));
        }
        if text.is_empty() {
            return Err(bad("empty"));
        }
        Ok(Self::Local(PathBuf::from(text)))
    }

    /// The local directory, for a local repository.
    #[must_use]
    pub fn as_local(&self) -> Option<&std::path::Path> {
        match self {
            Self::Local(p) => Some(p),
            _ => None,
        }
    }
}

impl S3Location {
    fn parse(rest: &str) -> Result<Self, String> {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.contains('@') || bucket.contains(':') {
            return Err(
                "credentials do not belong in a URL: set AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, or s3_access_key_id/s3_secret_access_key in the \
                 config file"
                    .into(),
            );
        }
        if bucket.is_empty() {
            return Err("no bucket: s3://bucket/prefix".into());
        }
        let prefix = prefix.trim_matches('/').to_owned();
        if prefix.split('/').any(|p| p == "." || p == "..") {
            return Err("`.` and `..` are not allowed in the prefix".into());
        }
        let mut location = Self {
            bucket: bucket.to_owned(),
            prefix,
            endpoint: None,
            region: None,
            conditional_create: true,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "endpoint" => location.endpoint = Some(value.trim_end_matches('/').to_owned()),
                "region" => location.region = Some(value.to_owned()),
                "conditional_create" => {
                    location.conditional_create = match value {
                        "true" => true,
                        "false" => false,
                        _ => return Err("conditional_create is true or false".into()),
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown parameter {key:?} (known: endpoint, region, conditional_create)"
                    ))
                }
            }
        }
        Ok(location)
    }
}

impl fmt::Display for RepositoryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::S3(s) => write!(f, "{s}"),
            Self::Remote(u) => write!(f, "{u}"),
        }
    }
}

impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        let mut sep = '?';
        if let Some(e) = &self.endpoint {
            write!(f, "{sep}endpoint={e}")?;
            sep = '&';
        }
        if let Some(r) = &self.region {
            write!(f, "{sep}region={r}")?;
            sep = '&';
        }
        if !self.conditional_create {
            write!(f, "{sep}conditional_create=false")?;
        }
        Ok(())
    }
}

/// The `user:password@host` part of a URL, or the host.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// A URL fit for a message: whatever precedes an `@` in its authority is hidden.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    match rest[..host_end].rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}{}", &rest[host_end..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths() {
        assert_eq!(
            RepositoryUrl::parse("/srv/repo").unwrap(),
            RepositoryUrl::Local("/srv/repo".into())
        );
        assert_eq!(
            RepositoryUrl::parse("repo").unwrap(),
            RepositoryUrl::Local("repo".into())
        );
        let url = "s3://backups/site-a/repo?endpoint=http://127.0.0.1:9000&region=garage";
        let RepositoryUrl::S3(s3) = RepositoryUrl::parse(url).unwrap() else {
            panic!()
        };
        assert_eq!(s3.bucket, "backups");
        assert_eq!(s3.prefix, "site-a/repo");
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.region.as_deref(), Some("garage"));
        assert_eq!(s3.to_string(), url);
        let RepositoryUrl::S3(root) = RepositoryUrl::parse("s3://b").unwrap() else {
            panic!()
        };
        assert_eq!((root.bucket.as_str(), root.prefix.as_str()), ("b", ""));
        assert!(matches!(
            RepositoryUrl::parse("https://backup:8087/repo/main").unwrap(),
            RepositoryUrl::Remote(_)
        ));
    }

    #[test]
    fn bad_urls_say_why_and_never_echo_a_secret() {
        for (url, why) in [
            ("s3://", "no bucket"),
            ("s3://AKIA:secret@bucket/p", "credentials"),
            ("s3://b/../x", "not allowed"),
            ("s3://b/p?endpont=x", "unknown parameter"),
            ("ftp://host/x", "unknown scheme"),
            ("https://user:hunter2@backup/repo/a", "credentials"),
            ("", "empty"),
        ] {
            let err = RepositoryUrl::parse(url).unwrap_err().to_string();
            assert!(err.contains(why), "{url}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
}
