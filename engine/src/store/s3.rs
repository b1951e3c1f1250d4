//! [`S3Backend`]: a repository in an S3-compatible object store (AWS, Garage, MinIO,
//! Ceph RGW, s3s), through the `object_store` crate.
//!
//! Objects are named as the files of a local repository (`config`, `keys/…`,
//! `data/xx/…`, `snapshots/…`, `locks/…`, `damage/…`) under the URL's prefix: a
//! repository copied between a disk and a bucket with any sync tool opens on both.
//!
//! How the [`Backend`] contract is kept on a store without rename or append:
//! - a `write` is one PUT, atomic by S3's semantics; S3 has been strongly consistent
//!   (read-after-write, list-after-write) since 2020, Garage by its quorums;
//! - a file written in pieces ([`Backend::create`], the trait's default) waits in memory
//!   and is uploaded under its final name at commit: one PUT up to [`MULTIPART_ABOVE`] (a pack of the default
//!   16 MiB is one request: object stores bill per request, and against restic on the
//!   same server a multipart pack cost 4 requests to its 1), a multipart upload of
//!   [`PART_SIZE`] parts, four in flight, above. A writer killed before the end leaves no
//!   object (an unfinished multipart upload is invisible, and aborted on drop; a bucket
//!   lifecycle rule `AbortIncompleteMultipartUpload` cleans the ones of a killed process);
//! - retries: throttling (429, 503 SlowDown), other 5xx and broken connections are retried
//!   with exponential backoff (100 ms doubling to 15 s, at most [`MAX_RETRIES`] times and
//!   [`RETRY_TIMEOUT`] in all); a 4xx other than 429 is an answer, not a fault, and
//!   fails at once (a missing object is `NotFound`, a refused credential `PermissionDenied`);
//! - `config` is created with `If-None-Match: *` when the store honours it, so two
//!   `init`s racing on one prefix cannot both win. Locks need no conditional write: each
//!   process writes a lock object of its own name and then lists the others
//!   ([`crate::lock`]), which list-after-write consistency makes safe. A store without
//!   conditional writes (Garage) gets a check-then-write `init`: safe against everything
//!   but two `init`s in the same second on the same prefix.
//!
//! Credentials come from the caller ([`S3Credentials`]: the environment or a config file),
//! never from the URL, and are never logged.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};

use super::url::S3Location;
use super::{check_name, Backend, FileKind};

/// Parts of a multipart upload.
pub const PART_SIZE: usize = 16 << 20;
/// A file up to this size is one PUT; a larger one a multipart upload.
pub const MULTIPART_ABOVE: usize = 64 << 20;
/// How many times a failed request is retried (throttling, 5xx, a broken connection).
pub const MAX_RETRIES: usize = 10;
/// How long a request may be retried in all.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(120);

/// Access keys for an S3 service. `Debug` shows the key id only.
#[derive(Clone, Default)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: zeroize::Zeroizing<String>,
    pub session_token: Option<zeroize::Zeroizing<String>>,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Credentials({}, ***)", self.access_key_id)
    }
}

impl S3Credentials {
    /// From `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`.
    #[must_use]
    pub fn from_env() -> Option<Self> {
        let id = std::env::var("AWS_ACCESS_KEY_ID").ok()?;
        let secret = std::env::var("AWS_SECRET_ACCESS_KEY").ok()?;
        Some(Self {
            access_key_id: id,
            secret_access_key: secret.into(),
            session_token: std::env::var("AWS_SESSION_TOKEN").ok().map(Into::into),
        })
    }
}

/// Requests sent, by kind: object stores bill per request.
#[derive(Debug, Default)]
pub struct RequestCounts {
    pub get: AtomicU64,
    pub put: AtomicU64,
    pub list: AtomicU64,
    pub head: AtomicU64,
    pub delete: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

/// A repository under a prefix of an S3 bucket.
pub struct S3Backend {
    store: Arc<AmazonS3>,
    location: S3Location,
    /// Runs the store's requests; callers are plain threads (see [`Self::run`]). `None`
    /// only while dropped.
    runtime: Option<tokio::runtime::Runtime>,
    conditional_create: bool,
    requests: Arc<RequestCounts>,
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Backend({})", self.location)
    }
}

impl S3Backend {
    /// A backend on `location` with `credentials` (`None`: anonymous requests, for a
    /// public bucket). Whether the store honours `If-None-Match: *` (AWS, MinIO, s3s do;
    /// Garage does not) is the location's `conditional_create`.
    pub fn new(location: &S3Location, credentials: Option<&S3Credentials>) -> io::Result<Self> {
        let conditional_create = location.conditional_create;
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&location.bucket)
            .with_region(location.region.as_deref().unwrap_or("us-east-1"))
            .with_retry(RetryConfig {
                max_retries: MAX_RETRIES,
                retry_timeout: RETRY_TIMEOUT,
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_timeout(Duration::from_secs(300))
                    .with_allow_http(
                        location
                            .endpoint
                            .as_deref()
                            .is_some_and(|e| e.starts_with("http://")),
                    ),
            )
            .with_conditional_put(if conditional_create {
                S3ConditionalPut::ETagMatch
            } else {
                S3ConditionalPut::Disabled
            });
        if let Some(endpoint) = &location.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        }
        match credentials {
            Some(c) => {
                builder = builder
                    .with_access_key_id(&c.access_key_id)
                    .with_secret_access_key(c.secret_access_key.as_str());
                if let Some(t) = &c.session_token {
                    builder = builder.with_token(t.as_str());
                }
            }
            None => builder = builder.with_skip_signature(true),
        }
        let store = builder
            .build()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3")
            .enable_all()
            .build()?;
        Ok(Self {
            store: Arc::new(store),
            location: location.clone(),
            runtime: Some(runtime),
            conditional_create,
            requests: Arc::default(),
        })
    }

    /// The requests sent so far.
    #[must_use]
    pub fn requests(&self) -> &RequestCounts {
        &self.requests
    }

    /// Runs a request on the backend's runtime and waits for it. The caller may be any
    /// thread, a tokio worker included (the server calls the engine from
    /// `spawn_blocking` threads and, through the mount, from FUSE threads).
    fn run<T: Send + 'static>(
        &self,
        request: impl std::future::Future<Output = object_store::Result<T>> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| io::Error::other("the S3 backend is closed"))?;
        runtime.spawn(async move {
            let _ = tx.send(request.await);
        });
        rx.recv()
            .map_err(|_| io::Error::other("the S3 request was dropped"))?
            .map_err(io_error)
    }

    fn key(&self, kind: FileKind, name: &str) -> ObjectPath {
        let mut key = self.location.prefix.clone();
        let mut push = |part: &str| {
            if !key.is_empty() {
                key.push('/');
            }
            key.push_str(part);
        };
        match kind {
            FileKind::Config => push("config"),
            FileKind::Pack => {
                push("data");
                push(name.get(..2).unwrap_or("00"));
                push(name);
            }
            _ => {
                push(kind.dir());
                push(name);
            }
        }
        ObjectPath::from(key)
    }

    fn dir_key(&self, dir: &str) -> ObjectPath {
        if self.location.prefix.is_empty() {
            ObjectPath::from(dir)
        } else {
            ObjectPath::from(format!("{}/{dir}", self.location.prefix))
        }
    }

    fn put(&self, key: ObjectPath, data: Vec<u8>, mode: PutMode) -> io::Result<()> {
        let store = self.store.clone();
        self.count(&self.requests.put, data.len(), 0);
        let options = PutOptions {
            mode,
            ..PutOptions::default()
        };
        self.run(async move {
            store
                .put_opts(&key, PutPayload::from(data), options)
                .await
                .map(|_| ())
        })
    }

    fn upload_in_parts(&self, key: ObjectPath, data: Vec<u8>) -> io::Result<()> {
        let store = self.store.clone();
        let parts = data.len().div_ceil(PART_SIZE) as u64;
        // create, the parts, complete
        self.requests.put.fetch_add(parts + 2, Ordering::Relaxed);
        self.requests
            .bytes_up
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.run(async move {
            let upload = store.put_multipart(&key).await?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            for part in data.chunks(PART_SIZE) {
                writer.wait_for_capacity(4).await?;
                writer.write(part);
            }
            writer.finish().await.map(|_| ())
        })
    }

    fn count(&self, counter: &AtomicU64, up: usize, down: usize) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.requests
            .bytes_up
            .fetch_add(up as u64, Ordering::Relaxed);
        self.requests
            .bytes_down
            .fetch_add(down as u64, Ordering::Relaxed);
    }

    /// Every object under `dir` of the repository, as names relative to it.
    fn list_under(&self, dir: &str) -> io::Result<Vec<(String, object_store::ObjectMeta)>> {
        let store = self.store.clone();
        let prefix = self.dir_key(dir);
        let base = format!("{prefix}/");
        let listed: Vec<object_store::ObjectMeta> = self.run(async move {
            let mut out = Vec::new();
            let mut stream = store.list(Some(&prefix));
            while let Some(meta) = stream.next().await {
                out.push(meta?);
            }
            Ok(out)
        })?;
        // A listing page holds 1,000 keys.
        self.requests
            .list
            .fetch_add(1 + listed.len() as u64 / 1000, Ordering::Relaxed);
        Ok(listed
            .into_iter()
            .filter_map(|m| {
                let rel = m.location.as_ref().strip_prefix(&base)?.to_owned();
                Some((rel, m))
            })
            .collect())
    }
}

/// An `object_store` error as an I/O error of the kind the engine tells apart.
fn io_error(e: object_store::Error) -> io::Error {
    use object_store::Error as E;
    let kind = match &e {
        E::NotFound { .. } => io::ErrorKind::NotFound,
        E::AlreadyExists { .. } | E::Precondition { .. } => io::ErrorKind::AlreadyExists,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => io::ErrorKind::PermissionDenied,
        E::NotSupported { .. } | E::NotImplemented { .. } => io::ErrorKind::Unsupported,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, summary(&e.to_string()))
}

/// The part of an `object_store` message a user needs: the request, the HTTP status and
/// the service's error code (`SignatureDoesNotMatch`), without the XML around it and
/// without the repetitions of its nested causes.
fn summary(message: &str) -> String {
    let request = message
        .find("Error performing ")
        .map(|at| &message[at + "Error performing ".len()..])
        .and_then(|rest| rest.split(" in ").next());
    let status = message
        .find("status code: ")
        .map(|at| &message[at + "status code: ".len()..])
        .and_then(|rest| rest.split(':').next());
    let code = message
        .find("<Code>")
        .and_then(|at| message[at + 6..].split("</Code>").next());
    match (request, status) {
        (Some(request), Some(status)) => {
            let mut text = format!("{request}: {status}");
            if let Some(code) = code {
                text.push_str(&format!(" ({code})"));
            }
            if status.starts_with("403") {
                text.push_str(": check the S3 access key and secret");
            }
            text
        }
        (Some(request), None) => {
            // A request that never got an answer: connection refused, timeout.
            let cause = message.rsplit(": ").next().unwrap_or(message);
            format!("{request}: {cause}")
        }
        _ => message.to_owned(),
    }
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        self.location.to_string()
    }

    /// Requests cost a round trip (and money): a restore reads up to 8 MiB at once.
    fn read_size_hint(&self) -> u64 {
        8 << 20
    }

    fn read(&self, kind: FileKind, name: &str) -> io::Result<Vec<u8>> {
        check_name(name)?;
        let store = self.store.clone();
        let key = self.key(kind, name);
        let bytes = self.run(async move { store.get(&key).await?.bytes().await })?;
        self.count(&self.requests.get, 0, bytes.len());
        Ok(bytes.to_vec())
    }

    fn read_at(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        check_name(name)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let store = self.store.clone();
        let key = self.key(kind, name);
        let range = offset..offset + len as u64;
        let bytes = self.run(async move { store.get_range(&key, range).await })?;
        self.count(&self.requests.get, 0, bytes.len());
        if bytes.len() != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name}: {} bytes at {offset}, {len} wanted", bytes.len()),
            ));
        }
        Ok(bytes.to_vec())
    }

    fn size(&self, kind: FileKind, name: &str) -> io::Result<u64> {
        check_name(name)?;
        let store = self.store.clone();
        let key = self.key(kind, name);
        self.count(&self.requests.head, 0, 0);
        Ok(self.run(async move { store.head(&key).await })?.size)
    }

    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> io::Result<()> {
        check_name(name)?;
        let key = self.key(kind, name);
        if data.len() > MULTIPART_ABOVE {
            return self.upload_in_parts(key, data.to_vec());
        }
        if kind != FileKind::Config {
            return self.put(key, data.to_vec(), PutMode::Overwrite);
        }
        // Created once, then replaced only by a format upgrade of an open repository.
        let exists = match self.size(kind, name) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        let mode = if !exists && self.conditional_create {
            PutMode::Create
        } else {
            PutMode::Overwrite
        };
        self.put(key, data.to_vec(), mode)
    }

    fn list(&self, kind: FileKind) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = match kind {
            FileKind::Config => match self.size(kind, "config") {
                Ok(_) => vec!["config".to_owned()],
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e),
            },
            FileKind::Pack => self
                .list_under("data")?
                .into_iter()
                .filter_map(|(rel, _)| {
                    let (shard, name) = rel.split_once('/')?;
                    (shard.len() == 2 && !name.contains('/') && !name.starts_with('.'))
                        .then(|| name.to_owned())
                })
                .collect(),
            _ => self
                .list_under(kind.dir())?
                .into_iter()
                .filter(|(rel, _)| !rel.contains('/') && !rel.starts_with('.'))
                .map(|(rel, _)| rel)
                .collect(),
        };
        names.sort();
        Ok(names)
    }

    fn remove(&self, kind: FileKind, name: &str) -> io::Result<()> {
        check_name(name)?;
        let store = self.store.clone();
        let key = self.key(kind, name);
        self.count(&self.requests.delete, 0, 0);
        match self.run(async move { store.delete(&key).await }) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn quarantine(&self, kind: FileKind, name: &str) -> io::Result<()> {
        check_name(name)?;
        let store = self.store.clone();
        let from = self.key(kind, name);
        let to = ObjectPath::from(format!("{}/{name}", self.dir_key("quarantine")));
        self.count(&self.requests.put, 0, 0);
        self.run(async move { store.copy(&from, &to).await })?;
        self.remove(kind, name)
    }

    fn modified(&self, kind: FileKind, name: &str) -> io::Result<std::time::SystemTime> {
        check_name(name)?;
        let store = self.store.clone();
        let key = self.key(kind, name);
        self.count(&self.requests.head, 0, 0);
        let meta = self.run(async move { store.head(&key).await })?;
        Ok(meta.last_modified.into())
    }

    /// Nothing to do: an object exists only once complete. Multipart uploads of a killed
    /// writer are not listed through this API: a bucket lifecycle rule removes them.
    fn remove_incomplete(&self, _age: Duration) -> io::Result<(u64, u64)> {
        Ok((0, 0))
    }
}

impl Drop for S3Backend {
    fn drop(&mut self) {
        let r = &self.requests;
        tracing::debug!(
            target: "cairn_engine::store::s3::requests",
            get = r.get.load(Ordering::Relaxed),
            put = r.put.load(Ordering::Relaxed),
            list = r.list.load(Ordering::Relaxed),
            head = r.head.load(Ordering::Relaxed),
            delete = r.delete.load(Ordering::Relaxed),
            bytes_up = r.bytes_up.load(Ordering::Relaxed),
            bytes_down = r.bytes_down.load(Ordering::Relaxed),
            "S3 requests sent to {}",
            self.location
        );
        // Dropping a runtime blocks, which a tokio worker thread must not do.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
