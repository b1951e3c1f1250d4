//! The repository server: `repo serve` serves the storage of its repositories at
//! `/repo/NAME/…` to `repo` on other hosts (`https://backup-host:8087/repo/NAME`), under
//! storage tokens (`repo serve token create --repository NAME`) and the daemon's TLS.
//!
//! The server stores files; it never holds a key. Clients seal everything they send
//! (packs, manifests, key files) and authenticate everything they read back, so a server
//! that returns wrong bytes is caught by the client, and a thief of the server's disks
//! reads nothing.
//!
//! Routes (the client is `cairn_engine::store::remote`):
//!
//! | Method | Path | |
//! |---|---|---|
//! | GET, HEAD | `/repo/NAME/config` | the config (HEAD: its size) |
//! | PUT | `/repo/NAME/config` | a format upgrade (full tokens) |
//! | GET | `/repo/NAME/KIND/` | the names of the files of a kind, JSON |
//! | GET, HEAD | `/repo/NAME/KIND/FILE` | a file, or `Range: bytes=A-B` of it |
//! | PUT | `/repo/NAME/KIND/FILE` | writes a file |
//! | DELETE | `/repo/NAME/KIND/FILE` | removes it |
//! | POST | `/repo/NAME/KIND/FILE/quarantine` | moves it aside (full tokens) |
//! | POST | `/repo/NAME/cleanup?age=SECONDS` | removes incomplete files (full tokens) |
//! | POST | `/repo/NAME/data/PACK/blobs` | reports the blob ids a stored pack holds |
//! | POST | `/repo/NAME/known` | which of these blob ids are stored, and in which packs |
//!
//! The last two are known-chunk negotiation ([`crate::directory`]): ids go as 32 raw
//! bytes each (at most [`MAX_IDS`] a request), an answer as (blob, pack) pairs of 64
//! bytes. A client asks before it uploads and sends only what is not there; it trusts an
//! answer only once the named pack's trailer, which it authenticates, lists the blob.
//! A `read` token may ask but not report; any token asks about its own repository only.
//!
//! KIND is `keys`, `data`, `snapshots`, `locks` or `damage`. A pack (`data`) and a
//! manifest (`snapshots`) are named by the BLAKE3 hash of their bytes: the server checks
//! it, so nobody can plant other bytes under an existing name, and writing an existing
//! one again is a no-op.
//!
//! What a token may do depends on its mode ([`StorageMode`]):
//! - `full`: everything;
//! - `append-only` (a backed-up host): read; add packs, manifests and locks; remove its
//!   locks. Never remove or rewrite data, manifests, keys, the config or damage marks:
//!   `forget`, `prune` and `repair` are refused, so ransomware on the host cannot
//!   destroy its own backups;
//! - `read`: read, and take locks (restore, mount, check).
//!
//! A token opens one repository only, and none of the API. A quota bounds the bytes of
//! new files a token adds (`507 Insufficient Storage` past it).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use cairn_engine::store::{Backend, BackendOptions, FileKind, RepositoryUrl};

use crate::directory::{ids_of, Directories, ID_LEN};
use crate::site::Site;
use crate::state::{StorageMode, StorageTokenRow};

/// The largest file a client may send: a pack of the largest size a repository allows
/// (1 GiB) and its trailer.
pub const MAX_FILE: usize = (1 << 30) + (8 << 20);

/// The most ids one report or question carries (the client's `MAX_IDS_ASKED`).
pub const MAX_IDS: usize = 1 << 16;

/// The header carrying a file's modification time (ns since the epoch) in a HEAD answer.
pub const MODIFIED_HEADER: &str = "x-cairn-modified-ns";

#[derive(Clone)]
struct Storage {
    site: Arc<Site>,
    backends: Arc<Mutex<HashMap<String, Arc<dyn Backend>>>>,
    directories: Arc<Directories>,
}

/// The storage routes, to merge into the daemon's application.
pub fn routes<S>(site: Arc<Site>) -> Router<S> {
    let storage = Storage {
        directories: site.repos.directories().clone(),
        site,
        backends: Arc::default(),
    };
    Router::new()
        .route("/repo/{name}/config", get(get_config).put(put_config))
        .route("/repo/{name}/cleanup", post(cleanup))
        .route("/repo/{name}/{kind}/", get(list))
        .route(
            "/repo/{name}/{kind}/{file}",
            get(get_file).put(put_file).delete(delete_file),
        )
        .route("/repo/{name}/{kind}/{file}/quarantine", post(quarantine))
        .route("/repo/{name}/{kind}/{file}/blobs", post(report_blobs))
        .route("/repo/{name}/known", post(known))
        .layer(DefaultBodyLimit::max(MAX_FILE))
        .with_state(storage)
}

/// A refusal or a failure, as the client reads it: a status and one line of text.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (
            self.0,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.1,
        )
            .into_response()
    }
}

impl From<io::Error> for Refusal {
    fn from(e: io::Error) -> Self {
        let status = match e.kind() {
            io::ErrorKind::NotFound => StatusCode::NOT_FOUND,
            io::ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
            io::ErrorKind::UnexpectedEof => StatusCode::RANGE_NOT_SATISFIABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, e.to_string())
    }
}

type Answer = Result<Response, Refusal>;

impl Storage {
    /// The token of the request, if it opens repository `name` for `need`.
    fn authorize(&self, headers: &HeaderMap, name: &str) -> Result<StorageTokenRow, Refusal> {
        let header = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let token = crate::auth::authenticate_storage(&self.site.state, header).map_err(|e| {
            Refusal(
                StatusCode::UNAUTHORIZED,
                format!("{e} (a storage token: repo serve token create --repository NAME)"),
            )
        })?;
        if token.repository != name {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                format!(
                    "token {:?} is for repository {:?}, not {name:?}",
                    token.name, token.repository
                ),
            ));
        }
        Ok(token)
    }

    /// The token and backend for an operation only a full token may do.
    fn full(
        &self,
        headers: &HeaderMap,
        name: &str,
        what: &str,
    ) -> Result<Arc<dyn Backend>, Refusal> {
        let token = self.authorize(headers, name)?;
        if token.mode != StorageMode::Full {
            return Err(refuse(&token, what));
        }
        self.backend(name)
    }

    /// The backend of repository `name` (opened once).
    fn backend(&self, name: &str) -> Result<Arc<dyn Backend>, Refusal> {
        let mut open = self.backends.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = open.get(name) {
            return Ok(b.clone());
        }
        let config = self.site.repos.config(name).ok_or_else(|| {
            Refusal(
                StatusCode::NOT_FOUND,
                format!("no repository {name:?} here"),
            )
        })?;
        let text = config.path.to_string_lossy();
        let url = RepositoryUrl::parse(&text)
            .map_err(|e| Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let options = BackendOptions {
            s3_credentials: cairn_engine::store::s3::S3Credentials::from_env(),
            ..BackendOptions::default()
        };
        let backend = cairn_engine::store::open(&url, &options)?;
        open.insert(name.to_owned(), backend.clone());
        Ok(backend)
    }
}

/// The kind of a path segment.
fn kind_of(segment: &str) -> Result<FileKind, Refusal> {
    match segment {
        "keys" => Ok(FileKind::Key),
        "data" => Ok(FileKind::Pack),
        "snapshots" => Ok(FileKind::Snapshot),
        "locks" => Ok(FileKind::Lock),
        "damage" => Ok(FileKind::Damage),
        other => Err(Refusal(
            StatusCode::NOT_FOUND,
            format!("no kind of file {other:?}: keys, data, snapshots, locks, damage"),
        )),
    }
}

/// Whether a token in `mode` may do `what` to files of `kind`.
fn allowed(mode: StorageMode, what: &Method, kind: FileKind) -> bool {
    if *what == Method::GET || *what == Method::HEAD {
        return true;
    }
    match mode {
        StorageMode::Full => true,
        StorageMode::AppendOnly => match kind {
            FileKind::Lock => true,
            FileKind::Pack | FileKind::Snapshot => *what == Method::PUT,
            _ => false,
        },
        StorageMode::Read => kind == FileKind::Lock,
    }
}

fn refuse(token: &StorageTokenRow, what: &str) -> Refusal {
    Refusal(
        StatusCode::FORBIDDEN,
        format!(
            "token {:?} is {} for repository {:?}: it may not {what}",
            token.name,
            token.mode.as_str(),
            token.repository
        ),
    )
}

/// Runs storage work on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Refusal> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

async fn get_config(
    State(st): State<Storage>,
    Path(name): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Answer {
    st.authorize(&headers, &name)?;
    let backend = st.backend(&name)?;
    read(backend, FileKind::Config, "config".into(), method, &headers).await
}

async fn put_config(
    State(st): State<Storage>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let backend = st.full(&headers, &name, "write the config")?;
    blocking(move || Ok(backend.write(FileKind::Config, "config", &body)?)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list(
    State(st): State<Storage>,
    Path((name, kind)): Path<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    st.authorize(&headers, &name)?;
    let kind = kind_of(&kind)?;
    let backend = st.backend(&name)?;
    let names = blocking(move || Ok(backend.list(kind)?)).await?;
    Ok(axum::Json(names).into_response())
}

async fn get_file(
    State(st): State<Storage>,
    Path((name, kind, file)): Path<(String, String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Answer {
    st.authorize(&headers, &name)?;
    let kind = kind_of(&kind)?;
    let backend = st.backend(&name)?;
    read(backend, kind, file, method, &headers).await
}

/// A file, its range, or (HEAD) its size and time.
async fn read(
    backend: Arc<dyn Backend>,
    kind: FileKind,
    file: String,
    method: Method,
    headers: &HeaderMap,
) -> Answer {
    if method == Method::HEAD {
        let (size, modified) = blocking(move || {
            let size = backend.size(kind, &file)?;
            let modified = backend.modified(kind, &file)?;
            Ok((size, modified))
        })
        .await?;
        let ns = modified
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mut r = Response::new(Body::empty());
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        if let Ok(v) = HeaderValue::from_str(&ns.to_string()) {
            r.headers_mut().insert(MODIFIED_HEADER, v);
        }
        return Ok(r);
    }
    let range = match headers.get(header::RANGE) {
        Some(v) => Some(parse_range(v.to_str().unwrap_or(""))?),
        None => None,
    };
    let bytes = blocking(move || match range {
        Some((offset, len)) => Ok(backend.read_at(kind, &file, offset, len)?),
        None => Ok(backend.read(kind, &file)?),
    })
    .await?;
    let status = if range.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        bytes,
    )
        .into_response())
}

/// `bytes=A-B` (B inclusive) as (offset, length).
fn parse_range(text: &str) -> Result<(u64, usize), Refusal> {
    let bad = || {
        Refusal(
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!("range {text:?}: bytes=A-B wanted"),
        )
    };
    let (a, b) = text
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .ok_or_else(bad)?;
    let a: u64 = a.parse().map_err(|_| bad())?;
    let b: u64 = b.parse().map_err(|_| bad())?;
    if b < a || b - a >= MAX_FILE as u64 {
        return Err(bad());
    }
    Ok((a, (b - a + 1) as usize))
}

async fn put_file(
    State(st): State<Storage>,
    Path((name, kind, file)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let token = st.authorize(&headers, &name)?;
    let kind = kind_of(&kind)?;
    if !allowed(token.mode, &Method::PUT, kind) {
        return Err(refuse(&token, &format!("write {}", kind.dir())));
    }
    if matches!(kind, FileKind::Pack | FileKind::Snapshot)
        && blake3::hash(&body).to_hex().as_str() != file
    {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            format!(
                "{}/{file}: its name is not the hash of its bytes",
                kind.dir()
            ),
        ));
    }
    let backend = st.backend(&name)?;
    let state = st.site.state.clone();
    blocking(move || {
        // A content-addressed file that exists is these very bytes: nothing to do.
        let exists = backend.size(kind, &file).is_ok();
        if exists && matches!(kind, FileKind::Pack | FileKind::Snapshot) {
            return Ok(());
        }
        let charged = !matches!(kind, FileKind::Lock);
        if charged
            && !state
                .charge_storage(&token.name, body.len() as u64)
                .map_err(internal)?
        {
            return Err(Refusal(
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "token {:?} is at its quota: {} of {} bytes used",
                    token.name,
                    token.used,
                    token.quota.unwrap_or(0)
                ),
            ));
        }
        if let Err(e) = backend.write(kind, &file, &body) {
            if charged {
                let _ = state.refund_storage(&token.name, body.len() as u64);
            }
            return Err(e.into());
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn delete_file(
    State(st): State<Storage>,
    Path((name, kind, file)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Answer {
    let token = st.authorize(&headers, &name)?;
    let kind = kind_of(&kind)?;
    if !allowed(token.mode, &Method::DELETE, kind) {
        return Err(refuse(&token, &format!("remove {}", kind.dir())));
    }
    let backend = st.backend(&name)?;
    if kind != FileKind::Lock {
        tracing::info!(token = %token.name, repository = %name, "removing {}/{file}", kind.dir());
    }
    let directories = st.directories.clone();
    blocking(move || {
        backend.remove(kind, &file)?;
        if let (FileKind::Pack, Ok(pack)) = (kind, pack_id_of(&file)) {
            directories.forget_pack(&name, &pack).map_err(internal)?;
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A pack's name as its 32 bytes.
fn pack_id_of(file: &str) -> Result<[u8; ID_LEN], Refusal> {
    let mut id = [0; ID_LEN];
    hex::decode_to_slice(file, &mut id).map_err(|_| {
        Refusal(
            StatusCode::BAD_REQUEST,
            format!("{file:?} is not a pack's name"),
        )
    })?;
    Ok(id)
}

/// A body of whole ids, at most [`MAX_IDS`] of them.
fn ids_in(body: &[u8], what: &str) -> Result<Vec<[u8; ID_LEN]>, Refusal> {
    ids_of(body)
        .filter(|ids| ids.len() <= MAX_IDS)
        .ok_or_else(|| {
            Refusal(
                StatusCode::BAD_REQUEST,
                format!(
                    "{what}: {} bytes are not up to {MAX_IDS} ids of {ID_LEN} bytes",
                    body.len()
                ),
            )
        })
}

/// Records the blob ids a stored pack holds (the client that wrote it knows them; the
/// server cannot read them). A `read` token may not.
async fn report_blobs(
    State(st): State<Storage>,
    Path((name, kind, file)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let token = st.authorize(&headers, &name)?;
    if kind_of(&kind)? != FileKind::Pack {
        return Err(Refusal(
            StatusCode::NOT_FOUND,
            format!("{kind}/{file}: only packs (data) hold blobs"),
        ));
    }
    if token.mode == StorageMode::Read {
        return Err(refuse(&token, "report what a pack holds"));
    }
    let pack = pack_id_of(&file)?;
    let blobs = ids_in(&body, "a pack's blobs")?;
    let backend = st.backend(&name)?;
    let directories = st.directories.clone();
    blocking(move || {
        let size = backend.size(FileKind::Pack, &file)?;
        // Every stored blob carries at least its 16-byte tag: more ids than that are lies
        // meant to fill the directory.
        if blobs.len() as u64 > size / 16 {
            return Err(Refusal(
                StatusCode::BAD_REQUEST,
                format!(
                    "data/{file}: {} blobs cannot fit in a pack of {size} bytes",
                    blobs.len()
                ),
            ));
        }
        directories.record(&name, &pack, &blobs).map_err(internal)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Which of the asked blob ids the repository's directory knows, and in which packs
/// (those still stored; rows of packs removed behind the server's back are dropped).
async fn known(
    State(st): State<Storage>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    st.authorize(&headers, &name)?;
    let ids = ids_in(&body, "a question")?;
    let backend = st.backend(&name)?;
    let directories = st.directories.clone();
    let answer = blocking(move || {
        let found = directories.find_stored(&name, &ids, &*backend)?;
        let mut answer = Vec::with_capacity(found.len() * 2 * ID_LEN);
        for (blob, pack) in found {
            answer.extend_from_slice(&blob);
            answer.extend_from_slice(&pack);
        }
        Ok(answer)
    })
    .await?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        answer,
    )
        .into_response())
}

async fn quarantine(
    State(st): State<Storage>,
    Path((name, kind, file)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Answer {
    let kind = kind_of(&kind)?;
    let backend = st.full(&headers, &name, "quarantine files")?;
    blocking(move || Ok(backend.quarantine(kind, &file)?)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(serde::Deserialize)]
struct CleanupQuery {
    age: u64,
}

async fn cleanup(
    State(st): State<Storage>,
    Path(name): Path<String>,
    Query(q): Query<CleanupQuery>,
    headers: HeaderMap,
) -> Answer {
    let backend = st.full(&headers, &name, "remove incomplete files")?;
    let (count, bytes) =
        blocking(move || Ok(backend.remove_incomplete(std::time::Duration::from_secs(q.age))?))
            .await?;
    Ok(axum::Json(serde_json::json!({ "count": count, "bytes": bytes })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_allow_what_they_say() {
        use FileKind::*;
        let put = Method::PUT;
        let del = Method::DELETE;
        for kind in [Pack, Snapshot, Lock] {
            assert!(allowed(StorageMode::AppendOnly, &put, kind), "{kind:?}");
        }
        for kind in [Key, Damage, Config] {
            assert!(!allowed(StorageMode::AppendOnly, &put, kind), "{kind:?}");
        }
        for kind in [Pack, Snapshot, Key, Damage] {
            assert!(!allowed(StorageMode::AppendOnly, &del, kind), "{kind:?}");
            assert!(!allowed(StorageMode::Read, &del, kind), "{kind:?}");
            assert!(!allowed(StorageMode::Read, &put, kind), "{kind:?}");
            assert!(allowed(StorageMode::Full, &del, kind), "{kind:?}");
        }
        assert!(allowed(StorageMode::AppendOnly, &del, Lock));
        assert!(allowed(StorageMode::Read, &put, Lock));
        assert!(allowed(StorageMode::Read, &Method::GET, Pack));
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9").ok(), Some((0, 10)));
        assert_eq!(parse_range("bytes=100-100").ok(), Some((100, 1)));
        for bad in [
            "bytes=9-0",
            "0-9",
            "bytes=a-b",
            "bytes=0-",
            "bytes=0-99999999999",
        ] {
            assert!(parse_range(bad).is_err(), "{bad}");
        }
    }
}
