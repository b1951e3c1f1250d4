//! [`RemoteBackend`]: a repository served by `repo serve` on another host
//! (`https://backup-host:8087/repo/NAME`), over the protocol of `cairn_server::storage`.
//!
//! The server stores what it is sent and never sees a key: everything read back is
//! authenticated here as it would be from a disk. A request that fails on the way (a
//! broken connection, a timeout, a 5xx, 429) is retried with backoff like an S3 request
//! ([`RETRIES`] times); a 4xx is the server's answer and fails at once with its text
//! (a refused token, an append-only token asked to delete, a full quota).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use super::{check_name, Backend, BlobDirectory, FileKind};
use crate::id::{BlobId, Id, PackId, ID_LEN};

/// How many times a failed request is tried again.
pub const RETRIES: u32 = 6;

/// The most ids one question to the server's blob directory carries (2 MiB).
pub const MAX_IDS_ASKED: usize = 1 << 16;

/// The header carrying a file's modification time in a HEAD answer.
const MODIFIED_HEADER: &str = "x-cairn-modified-ns";

/// How to reach a repository server.
#[derive(Clone, Default)]
pub struct RemoteOptions {
    /// The storage token (`repo serve token create --repository NAME`).
    pub token: Option<zeroize::Zeroizing<String>>,
    /// A PEM certificate to trust besides the system's (a server's own CA).
    pub ca_certificate: Option<Vec<u8>>,
}

impl std::fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RemoteOptions(token: {}, ca: {})",
            if self.token.is_some() { "***" } else { "none" },
            self.ca_certificate.is_some()
        )
    }
}

/// A repository on a repository server.
pub struct RemoteBackend {
    /// `https://host:port/repo/NAME`, without a trailing `/`.
    base: String,
    client: reqwest::Client,
    token: Option<zeroize::Zeroizing<String>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for RemoteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteBackend({})", self.base)
    }
}

/// One request, as a value that can be sent again.
struct Call {
    method: reqwest::Method,
    path: String,
    body: Option<Arc<Vec<u8>>>,
    range: Option<(u64, usize)>,
}

impl RemoteBackend {
    pub fn new(url: &str, options: &RemoteOptions) -> io::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600));
        if let Some(pem) = &options.ca_certificate {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            builder = builder.add_root_certificate(cert);
        }
        let client = builder.build().map_err(io::Error::other)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("remote")
            .enable_all()
            .build()?;
        Ok(Self {
            base: url.trim_end_matches('/').to_owned(),
            client,
            token: options.token.clone(),
            runtime: Some(runtime),
        })
    }

    fn path(kind: FileKind, name: &str) -> String {
        match kind {
            FileKind::Config => "config".to_owned(),
            _ => format!("{}/{name}", kind.dir()),
        }
    }

    /// Sends `call` (again after a failure on the way) and returns the answer's status,
    /// headers and body; a 4xx or 5xx becomes an error carrying the server's text.
    fn send(&self, call: Call) -> io::Result<(reqwest::header::HeaderMap, Vec<u8>)> {
        let client = self.client.clone();
        let url = format!("{}/{}", self.base, call.path);
        let token = self
            .token
            .as_ref()
            .map(|t| format!("Bearer {}", t.as_str()));
        let what = format!("{} {url}", call.method);
        let request = async move {
            let mut delay = Duration::from_millis(100);
            let mut attempt = 0;
            loop {
                attempt += 1;
                let mut req = client.request(call.method.clone(), &url);
                if let Some(t) = &token {
                    req = req.header(reqwest::header::AUTHORIZATION, t);
                }
                if let Some((offset, len)) = call.range {
                    let end = offset + len as u64 - 1;
                    req = req.header(reqwest::header::RANGE, format!("bytes={offset}-{end}"));
                }
                if let Some(body) = &call.body {
                    req = req.body(body.as_ref().clone());
                }
                let transient = match req.send().await {
                    Ok(resp) => {
                        let status = resp.status();
                        let headers = resp.headers().clone();
                        match resp.bytes().await {
                            Ok(body) if status.is_success() => return Ok((headers, body.to_vec())),
                            Ok(body)
                                if status.is_server_error()
                                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS =>
                            {
                                format!("{status}: {}", String::from_utf8_lossy(&body).trim())
                            }
                            Ok(body) => {
                                return Err(answer_error(status, &String::from_utf8_lossy(&body)))
                            }
                            Err(e) => e.to_string(),
                        }
                    }
                    Err(e) => {
                        let mut text = e.to_string();
                        let mut source = std::error::Error::source(&e);
                        while let Some(s) = source {
                            text.push_str(&format!(": {s}"));
                            source = s.source();
                        }
                        text
                    }
                };
                if attempt > RETRIES {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{transient} (tried {attempt} times)"),
                    ));
                }
                tracing::debug!("{transient}; trying again in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| io::Error::other("the remote backend is closed"))?;
        runtime.spawn(async move {
            let _ = tx.send(request.await);
        });
        rx.recv()
            .map_err(|_| io::Error::other("the request was dropped"))?
            .map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))
    }

    fn call(&self, method: reqwest::Method, path: String) -> Call {
        Call {
            method,
            path,
            body: None,
            range: None,
        }
    }

    fn put(&self, kind: FileKind, name: &str, data: Vec<u8>) -> io::Result<()> {
        let mut call = self.call(reqwest::Method::PUT, Self::path(kind, name));
        call.body = Some(Arc::new(data));
        self.send(call).map(|_| ())
    }
}

/// A server's refusal as an I/O error of the kind the engine tells apart.
fn answer_error(status: reqwest::StatusCode, text: &str) -> io::Error {
    let kind = match status.as_u16() {
        404 => io::ErrorKind::NotFound,
        401 | 403 => io::ErrorKind::PermissionDenied,
        400 => io::ErrorKind::InvalidInput,
        416 => io::ErrorKind::UnexpectedEof,
        409 => io::ErrorKind::AlreadyExists,
        _ => io::ErrorKind::Other,
    };
    let text = text.trim();
    let hint = if status.as_u16() == 401 {
        " (the token comes from REPO_TOKEN, REPO_TOKEN_FILE or token_file in the config file)"
    } else {
        ""
    };
    io::Error::new(kind, format!("{status}: {text}{hint}"))
}

impl Backend for RemoteBackend {
    fn location(&self) -> String {
        self.base.clone()
    }

    /// Requests cost a round trip (and money): a restore reads up to 8 MiB at once.
    fn read_size_hint(&self) -> u64 {
        8 << 20
    }

    fn read(&self, kind: FileKind, name: &str) -> io::Result<Vec<u8>> {
        check_name(name)?;
        Ok(self
            .send(self.call(reqwest::Method::GET, Self::path(kind, name)))?
            .1)
    }

    fn read_at(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        check_name(name)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut call = self.call(reqwest::Method::GET, Self::path(kind, name));
        call.range = Some((offset, len));
        let bytes = self.send(call)?.1;
        if bytes.len() != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name}: {} bytes at {offset}, {len} wanted", bytes.len()),
            ));
        }
        Ok(bytes)
    }

    fn size(&self, kind: FileKind, name: &str) -> io::Result<u64> {
        check_name(name)?;
        let (headers, _) = self.send(self.call(reqwest::Method::HEAD, Self::path(kind, name)))?;
        headers
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .ok_or_else(|| io::Error::other("the server gave no size"))
    }

    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> io::Result<()> {
        check_name(name)?;
        self.put(kind, name, data.to_vec())
    }

    fn list(&self, kind: FileKind) -> io::Result<Vec<String>> {
        if kind == FileKind::Config {
            return match self.size(kind, "config") {
                Ok(_) => Ok(vec!["config".to_owned()]),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(e),
            };
        }
        let body = self
            .send(self.call(reqwest::Method::GET, format!("{}/", kind.dir())))?
            .1;
        let mut names: Vec<String> = serde_json::from_slice(&body).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the server's listing of {}: {e}", kind.dir()),
            )
        })?;
        // A hostile server's names go no further than a bad name can.
        names.retain(|n| check_name(n).is_ok());
        names.sort();
        Ok(names)
    }

    fn remove(&self, kind: FileKind, name: &str) -> io::Result<()> {
        check_name(name)?;
        match self.send(self.call(reqwest::Method::DELETE, Self::path(kind, name))) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other.map(|_| ()),
        }
    }

    fn quarantine(&self, kind: FileKind, name: &str) -> io::Result<()> {
        check_name(name)?;
        let path = format!("{}/quarantine", Self::path(kind, name));
        self.send(self.call(reqwest::Method::POST, path))
            .map(|_| ())
    }

    fn modified(&self, kind: FileKind, name: &str) -> io::Result<std::time::SystemTime> {
        check_name(name)?;
        let (headers, _) = self.send(self.call(reqwest::Method::HEAD, Self::path(kind, name)))?;
        let ns: u64 = headers
            .get(MODIFIED_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .ok_or_else(|| io::Error::other("the server gave no modification time"))?;
        Ok(std::time::UNIX_EPOCH + Duration::from_nanos(ns))
    }

    fn remove_incomplete(&self, age: Duration) -> io::Result<(u64, u64)> {
        let path = format!("cleanup?age={}", age.as_secs());
        let body = match self.send(self.call(reqwest::Method::POST, path)) {
            Ok((_, body)) => body,
            // Not this token's business (append-only): the server cleans up itself.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Ok((0, 0)),
            Err(e) => return Err(e),
        };
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        Ok((
            v["count"].as_u64().unwrap_or(0),
            v["bytes"].as_u64().unwrap_or(0),
        ))
    }

    fn directory(&self) -> Option<&dyn BlobDirectory> {
        Some(self)
    }
}

/// Blob ids as the directory's requests carry them: 32 raw bytes each.
fn ids_body(ids: &[BlobId]) -> Vec<u8> {
    ids.iter().flat_map(|b| *b.as_bytes()).collect()
}

/// The server's blob directory (`cairn_server::storage`): ids travel as 32 raw bytes
/// each; an answer is (blob, pack) pairs of 64 bytes.
impl BlobDirectory for RemoteBackend {
    fn report(&self, pack: &PackId, blobs: &[BlobId]) -> io::Result<()> {
        for part in blobs.chunks(MAX_IDS_ASKED) {
            let mut call = self.call(
                reqwest::Method::POST,
                format!("{}/{}/blobs", FileKind::Pack.dir(), pack.to_hex()),
            );
            call.body = Some(Arc::new(ids_body(part)));
            self.send(call)?;
        }
        Ok(())
    }

    fn locate(&self, ids: &[BlobId]) -> io::Result<Vec<(BlobId, PackId)>> {
        let mut found = Vec::new();
        for part in ids.chunks(MAX_IDS_ASKED) {
            let mut call = self.call(reqwest::Method::POST, "known".to_owned());
            call.body = Some(Arc::new(ids_body(part)));
            let body = self.send(call)?.1;
            if body.len() % (2 * ID_LEN) != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the server's blob directory answered {} bytes, not pairs of ids",
                        body.len()
                    ),
                ));
            }
            found.extend(body.chunks_exact(2 * ID_LEN).filter_map(|pair| {
                let blob = Id::from_slice(&pair[..ID_LEN])?;
                let pack = Id::from_slice(&pair[ID_LEN..])?;
                Some((BlobId(blob), PackId(pack)))
            }));
        }
        Ok(found)
    }
}

impl Drop for RemoteBackend {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
