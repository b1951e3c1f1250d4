//! Disk images as block sources: an NBD export (given, or a private `qemu-nbd` of an
//! image file) read through [`NbdClient`], with `base:allocation` telling which regions
//! hold data and, when asked, a `qemu:dirty-bitmap:NAME` context telling which changed.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_engine::backup::{BlockRegion, BlockSource};

use crate::nbd::{NbdClient, NbdError, STATE_HOLE, STATE_ZERO};
use crate::qemu::{self, QemuNbd};

/// How long the NBD peer may stay silent before a request fails.
pub const TIMEOUT: Duration = Duration::from_secs(60);
const ALLOCATION: &str = "base:allocation";

fn io_err(e: NbdError) -> io::Error {
    match e {
        NbdError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

/// An NBD export as a [`BlockSource`].
pub struct NbdSource {
    client: NbdClient,
    allocation: Option<u32>,
    bitmap: Option<u32>,
    /// Keeps a private qemu-nbd alive while we read.
    _server: Option<QemuNbd>,
}

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

/// An NBD export: `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT]/EXPORT`
/// (the URIs of the NBD URI specification that libvirt and qemu-nbd give).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub endpoint: Endpoint,
    pub export: String,
}

impl NbdUri {
    pub fn parse(uri: &str) -> Result<Self, String> {
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = rest
                .split_once('?')
                .ok_or_else(|| format!("{uri:?}: missing ?socket=PATH"))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| format!("{uri:?}: missing socket=PATH"))?;
            return Ok(Self {
                endpoint: Endpoint::Unix(socket.into()),
                export: path.trim_start_matches('/').to_owned(),
            });
        }
        if let Some(rest) = uri.strip_prefix("nbd://") {
            let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
            if authority.is_empty() {
                return Err(format!("{uri:?}: missing host"));
            }
            let has_port = !authority.ends_with(']')
                && authority
                    .rsplit_once(':')
                    .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
            let addr = if has_port {
                authority.to_owned()
            } else {
                format!("{authority}:10809")
            };
            return Ok(Self {
                endpoint: Endpoint::Tcp(addr),
                export: export.to_owned(),
            });
        }
        Err(format!(
            "{uri:?}: give nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT"
        ))
    }

    /// Where it is, for messages.
    #[must_use]
    pub fn describe(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(p) => format!("export {:?} at {}", self.export, p.display()),
            Endpoint::Tcp(a) => format!("export {:?} at {a}", self.export),
        }
    }
}

/// An image file (raw, qcow2, vmdk; with its backing files) as a [`BlockSource`]. Looking
/// at it costs one `qemu-img info`; the private, read-only `qemu-nbd` that serves its
/// blocks starts on the first block request, so a backup that finds the image unchanged
/// (same [`fingerprint`](Self::fingerprint)) never starts it.
pub struct ImageFile {
    path: PathBuf,
    info: qemu::ImageInfo,
    /// The image and its backing files, as qemu-img named them.
    chain: Vec<PathBuf>,
    fingerprint: String,
    source: Option<NbdSource>,
}

/// Keys of a snapshot's metadata that [`ImageFile::unchanged_since`] reads: the format,
/// the virtual size, the fingerprint and the files (one per line) of the image backed up.
pub const META_FORMAT: &str = "source_format";
pub const META_SIZE: &str = "virtual_size";
pub const META_FINGERPRINT: &str = "fingerprint";
pub const META_CHAIN: &str = "source_chain";

impl ImageFile {
    /// Detects the format, the virtual size and the fingerprint of the image at `path`.
    pub fn inspect(path: &Path) -> Result<Self, String> {
        let chain = qemu::image_chain(path).map_err(|e| e.to_string())?;
        let info = chain[0].1.clone();
        if !qemu::FORMATS.contains(&info.format.as_str()) {
            return Err(format!(
                "{}: unsupported image format {:?}",
                path.display(),
                info.format
            ));
        }
        let chain: Vec<PathBuf> = chain.into_iter().map(|(f, _)| f).collect();
        let fingerprint = fingerprint(chain.iter().map(PathBuf::as_path))?;
        Ok(Self {
            path: path.to_owned(),
            info,
            chain,
            fingerprint,
            source: None,
        })
    }

    /// The image at `path` as a parent backup of it recorded it (`meta`: its snapshot's
    /// metadata), when the files it recorded still carry the same fingerprint: then the
    /// content is the parent's and not even `qemu-img` needs to run. `None`: inspect it.
    pub fn unchanged_since(
        path: &Path,
        meta: &std::collections::BTreeMap<String, String>,
    ) -> Option<Self> {
        let chain: Vec<PathBuf> = meta.get(META_CHAIN)?.lines().map(PathBuf::from).collect();
        if chain.first().map(PathBuf::as_path) != Some(path) {
            return None;
        }
        let recorded = meta.get(META_FINGERPRINT)?;
        let now = fingerprint(chain.iter().map(PathBuf::as_path)).ok()?;
        if &now != recorded {
            return None;
        }
        let info = qemu::ImageInfo {
            format: meta.get(META_FORMAT)?.clone(),
            virtual_size: meta.get(META_SIZE)?.parse().ok()?,
            format_specific: None,
        };
        Some(Self {
            path: path.to_owned(),
            info,
            chain,
            fingerprint: now,
            source: None,
        })
    }

    /// What a snapshot of this image records of it, for [`Self::unchanged_since`].
    pub fn meta(&self) -> std::collections::BTreeMap<String, String> {
        let chain: Vec<String> = self
            .chain
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        std::collections::BTreeMap::from([
            (META_FORMAT.to_owned(), self.info.format.clone()),
            (META_CHAIN.to_owned(), chain.join("\n")),
        ])
    }

    /// The format `qemu-img` detected.
    pub fn format(&self) -> &str {
        &self.info.format
    }

    /// What identifies the content without reading it: device, inode, size, mtime and
    /// ctime of the file and of every backing file. Any write changes it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn source(&mut self) -> io::Result<&mut NbdSource> {
        if self.source.is_none() {
            let src = NbdSource::open_image(&self.path, &self.info).map_err(io::Error::other)?;
            self.source = Some(src);
        }
        Ok(self.source.as_mut().expect("opened above"))
    }
}

impl BlockSource for ImageFile {
    fn size(&self) -> u64 {
        self.info.virtual_size
    }

    fn map(&mut self, offset: u64, len: u64) -> io::Result<Vec<BlockRegion>> {
        self.source()?.map(offset, len)
    }

    fn changed(&mut self, offset: u64, len: u64) -> io::Result<Option<Vec<BlockRegion>>> {
        self.source()?.changed(offset, len)
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.source()?.read(offset, buf)
    }
}

fn fingerprint<'a>(chain: impl Iterator<Item = &'a Path>) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let mut parts = Vec::new();
    for f in chain {
        let md = std::fs::metadata(f).map_err(|e| format!("{}: {e}", f.display()))?;
        parts.push(format!(
            "{}:{}:{}:{}.{}:{}.{}",
            md.dev(),
            md.ino(),
            md.len(),
            md.mtime(),
            md.mtime_nsec(),
            md.ctime(),
            md.ctime_nsec()
        ));
    }
    Ok(parts.join(";"))
}

impl NbdSource {
    /// Opens an export; with `bitmap`, also its `qemu:dirty-bitmap:BITMAP` context.
    pub fn open(uri: &NbdUri, bitmap: Option<&str>) -> Result<Self, NbdError> {
        Self::open_with(uri, bitmap, None)
    }

    fn open_with(
        uri: &NbdUri,
        bitmap: Option<&str>,
        server: Option<QemuNbd>,
    ) -> Result<Self, NbdError> {
        let bitmap_ctx = bitmap.map(|b| format!("qemu:dirty-bitmap:{b}"));
        let mut contexts = vec![ALLOCATION];
        if let Some(b) = &bitmap_ctx {
            contexts.push(b);
        }
        let client = match &uri.endpoint {
            Endpoint::Unix(p) => NbdClient::connect_unix(p, &uri.export, &contexts, TIMEOUT)?,
            Endpoint::Tcp(a) => NbdClient::connect_tcp(a, &uri.export, &contexts, TIMEOUT)?,
        };
        let allocation = client.context_id(ALLOCATION);
        let bitmap = match &bitmap_ctx {
            Some(name) => Some(client.context_id(name).ok_or_else(|| {
                NbdError::Refused(format!(
                    "the export has no dirty bitmap {:?}",
                    bitmap.unwrap_or_default()
                ))
            })?),
            None => None,
        };
        Ok(Self {
            client,
            allocation,
            bitmap,
            _server: server,
        })
    }

    /// Exports an image file of `format` through a private, read-only qemu-nbd and opens
    /// it; with `bitmap`, also the image's persistent dirty bitmap of that name (the
    /// blocks written since it was created).
    pub fn of_image(path: &Path, format: &str, bitmap: Option<&str>) -> Result<Self, String> {
        let mut server = QemuNbd::start(path, format, bitmap).map_err(|e| e.to_string())?;
        let uri = NbdUri {
            endpoint: Endpoint::Unix(server.socket().to_owned()),
            export: String::new(),
        };
        let bitmap_ctx = bitmap.map(|b| format!("qemu:dirty-bitmap:{b}"));
        let mut contexts = vec![ALLOCATION];
        if let Some(b) = &bitmap_ctx {
            contexts.push(b);
        }
        let client = match &uri.endpoint {
            Endpoint::Unix(p) => NbdClient::connect_unix(p, "", &contexts, TIMEOUT),
            Endpoint::Tcp(a) => NbdClient::connect_tcp(a, "", &contexts, TIMEOUT),
        };
        let client = client.map_err(|e| format!("{e} ({})", server.diagnose()))?;
        let allocation = client.context_id(ALLOCATION);
        let bitmap = match &bitmap_ctx {
            Some(name) => Some(
                client
                    .context_id(name)
                    .ok_or_else(|| format!("qemu-nbd does not export {name}"))?,
            ),
            None => None,
        };
        Ok(Self {
            client,
            allocation,
            bitmap,
            _server: Some(server),
        })
    }

    /// Exports an image file through a private, read-only qemu-nbd and opens it.
    fn open_image(path: &Path, info: &qemu::ImageInfo) -> Result<Self, String> {
        let mut server = QemuNbd::start(path, &info.format, None).map_err(|e| e.to_string())?;
        let client = match NbdClient::connect_unix(server.socket(), "", &[ALLOCATION], TIMEOUT) {
            Ok(c) => c,
            Err(e) => return Err(format!("{e} ({})", server.diagnose())),
        };
        let allocation = client.context_id(ALLOCATION);
        let src = Self {
            client,
            allocation,
            bitmap: None,
            _server: Some(server),
        };
        if src.client.size() != info.virtual_size {
            return Err(format!(
                "qemu-nbd exports {} bytes, qemu-img says {}",
                src.client.size(),
                info.virtual_size
            ));
        }
        Ok(src)
    }

    fn status(
        &mut self,
        ctx: u32,
        offset: u64,
        len: u64,
        data: impl Fn(u32) -> bool,
    ) -> io::Result<Vec<BlockRegion>> {
        let len = u32::try_from(len.min(1 << 30)).unwrap_or(1 << 30);
        let ext = self.client.block_status(ctx, offset, len).map_err(io_err)?;
        Ok(ext
            .into_iter()
            .map(|e| BlockRegion {
                offset: e.offset,
                length: e.length,
                data: data(e.flags),
            })
            .collect())
    }
}

impl BlockSource for NbdSource {
    fn size(&self) -> u64 {
        self.client.size()
    }

    fn map(&mut self, offset: u64, len: u64) -> io::Result<Vec<BlockRegion>> {
        match self.allocation {
            // Zero-reading regions (holes, or allocated zeros) need not be read.
            Some(ctx) => self.status(ctx, offset, len, |f| f & (STATE_HOLE | STATE_ZERO) == 0),
            None => Ok(vec![BlockRegion {
                offset,
                length: len,
                data: true,
            }]),
        }
    }

    fn changed(&mut self, offset: u64, len: u64) -> io::Result<Option<Vec<BlockRegion>>> {
        match self.bitmap {
            Some(ctx) => self.status(ctx, offset, len, |f| f & 1 != 0).map(Some),
            None => Ok(None),
        }
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(crate::nbd::MAX_READ as usize);
            self.client
                .read(offset + done as u64, &mut buf[done..done + n])
                .map_err(io_err)?;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            NbdUri::parse("nbd+unix:///disk0?socket=/run/x.sock").unwrap(),
            NbdUri {
                endpoint: Endpoint::Unix("/run/x.sock".into()),
                export: "disk0".into()
            }
        );
        assert_eq!(NbdUri::parse("nbd+unix:///?socket=/s").unwrap().export, "");
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:10900/vda").unwrap(),
            NbdUri {
                endpoint: Endpoint::Tcp("127.0.0.1:10900".into()),
                export: "vda".into()
            }
        );
        assert_eq!(
            NbdUri::parse("nbd://backup-host").unwrap().endpoint,
            Endpoint::Tcp("backup-host:10809".into())
        );
        assert!(NbdUri::parse("nbd+unix:///x").is_err());
        assert!(NbdUri::parse("http://x/").is_err());
        assert!(NbdUri::parse("nbd:///x").is_err());
    }
}
