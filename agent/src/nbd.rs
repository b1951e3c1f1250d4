//! A client of the NBD protocol (fixed newstyle handshake, `NBD_OPT_GO`, structured
//! replies, `NBD_CMD_READ`, `NBD_CMD_BLOCK_STATUS` with `base:allocation` and, when
//! asked, a `qemu:dirty-bitmap:NAME` context).
//!
//! Everything read from the peer is untrusted: every length is bounded before anything
//! is allocated, every reply is checked against the request it answers, and socket
//! timeouts turn a silent peer into an error. Nothing here panics on peer input.
//! One request is in flight at a time (the caller parallelises CPU work, not I/O).

// NBD is big-endian on the wire (our own formats are little-endian; see the workspace lints).
#![allow(clippy::big_endian_bytes)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_BIT: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;

const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// The largest payload accepted in one reply or option reply.
const MAX_PAYLOAD: u32 = 64 << 20;
/// The largest read asked in one request.
pub const MAX_READ: u32 = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD connection: {0}")]
    Io(#[from] io::Error),
    #[error("NBD server sent something invalid: {0}")]
    Protocol(String),
    #[error("NBD server refused: {0}")]
    Refused(String),
}

fn bad(msg: impl Into<String>) -> NbdError {
    NbdError::Protocol(msg.into())
}

pub type Result<T> = std::result::Result<T, NbdError>;

/// One run of `base:allocation` or dirty-bitmap status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

/// An open NBD export.
pub struct NbdClient {
    sock: UnixStream,
    size: u64,
    structured: bool,
    /// Negotiated metadata contexts: (id, name).
    contexts: Vec<(u32, String)>,
    next_cookie: u64,
}

fn read_exact<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn be16(r: &mut impl Read) -> io::Result<u16> {
    Ok(u16::from_be_bytes(read_exact(r)?))
}

fn be32(r: &mut impl Read) -> io::Result<u32> {
    Ok(u32::from_be_bytes(read_exact(r)?))
}

fn be64(r: &mut impl Read) -> io::Result<u64> {
    Ok(u64::from_be_bytes(read_exact(r)?))
}

fn read_vec(r: &mut impl Read, len: u32) -> Result<Vec<u8>> {
    if len > MAX_PAYLOAD {
        return Err(bad(format!(
            "payload of {len} bytes is beyond the {MAX_PAYLOAD} limit"
        )));
    }
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

impl NbdClient {
    /// Connects to a Unix socket and opens `export` (often ""), negotiating structured
    /// replies and the metadata contexts in `contexts` (e.g. `base:allocation`).
    pub fn connect_unix(
        path: &Path,
        export: &str,
        contexts: &[&str],
        timeout: Duration,
    ) -> Result<Self> {
        let sock = UnixStream::connect(path)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        Self::handshake(sock, export, contexts)
    }

    /// Runs the handshake over an already connected socket.
    pub fn handshake(mut sock: UnixStream, export: &str, contexts: &[&str]) -> Result<Self> {
        if be64(&mut sock)? != NBDMAGIC || be64(&mut sock)? != IHAVEOPT {
            return Err(bad("not an NBD newstyle server (bad greeting)"));
        }
        let flags = be16(&mut sock)?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad("server lacks fixed newstyle negotiation"));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
        sock.write_all(&client_flags.to_be_bytes())?;
        let mut c = Self {
            sock,
            size: 0,
            structured: false,
            contexts: Vec::new(),
            next_cookie: 1,
        };

        c.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (ty, data) = c.option_reply(OPT_STRUCTURED_REPLY)?;
        match ty {
            REP_ACK => c.structured = true,
            t if t & REP_ERR_BIT != 0 => {} // fine: simple replies only
            t => {
                return Err(bad(format!(
                    "unexpected reply {t} to STRUCTURED_REPLY ({} bytes)",
                    data.len()
                )))
            }
        }
        if c.structured && !contexts.is_empty() {
            let mut d = Vec::new();
            d.extend_from_slice(
                &u32::try_from(export.len())
                    .map_err(|_| bad("export name too long"))?
                    .to_be_bytes(),
            );
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&u32::try_from(contexts.len()).unwrap_or(0).to_be_bytes());
            for q in contexts {
                d.extend_from_slice(&u32::try_from(q.len()).unwrap_or(0).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            c.send_option(OPT_SET_META_CONTEXT, &d)?;
            loop {
                let (ty, data) = c.option_reply(OPT_SET_META_CONTEXT)?;
                match ty {
                    REP_ACK => break,
                    REP_META_CONTEXT => {
                        if data.len() < 4 {
                            return Err(bad("short META_CONTEXT reply"));
                        }
                        let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                        let name = String::from_utf8_lossy(&data[4..]).into_owned();
                        c.contexts.push((id, name));
                    }
                    t if t & REP_ERR_BIT != 0 => {
                        return Err(NbdError::Refused(format!(
                            "metadata contexts {contexts:?}: error {:#x}",
                            t
                        )))
                    }
                    t => return Err(bad(format!("unexpected reply {t} to SET_META_CONTEXT"))),
                }
            }
        }
        let mut d = Vec::new();
        d.extend_from_slice(
            &u32::try_from(export.len())
                .map_err(|_| bad("export name too long"))?
                .to_be_bytes(),
        );
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        c.send_option(OPT_GO, &d)?;
        let mut have_size = false;
        loop {
            let (ty, data) = c.option_reply(OPT_GO)?;
            match ty {
                REP_ACK => break,
                REP_INFO => {
                    if data.len() >= 2 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT {
                        if data.len() != 12 {
                            return Err(bad("INFO_EXPORT of the wrong length"));
                        }
                        let mut s = [0u8; 8];
                        s.copy_from_slice(&data[2..10]);
                        c.size = u64::from_be_bytes(s);
                        have_size = true;
                    }
                }
                t if t & REP_ERR_BIT != 0 => {
                    let msg = String::from_utf8_lossy(&data).into_owned();
                    return Err(NbdError::Refused(format!(
                        "export {export:?}: {msg} (error {t:#x})"
                    )));
                }
                t => return Err(bad(format!("unexpected reply {t} to GO"))),
            }
        }
        if !have_size {
            return Err(bad("server did not send the export size"));
        }
        Ok(c)
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) -> Result<()> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(
            &u32::try_from(data.len())
                .map_err(|_| bad("option too long"))?
                .to_be_bytes(),
        );
        m.extend_from_slice(data);
        self.sock.write_all(&m)?;
        Ok(())
    }

    fn option_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>)> {
        if be64(&mut self.sock)? != OPT_REPLY_MAGIC {
            return Err(bad("bad option reply magic"));
        }
        if be32(&mut self.sock)? != opt {
            return Err(bad("option reply for another option"));
        }
        let ty = be32(&mut self.sock)?;
        let len = be32(&mut self.sock)?;
        if len > 1 << 20 {
            return Err(bad(format!("option reply of {len} bytes")));
        }
        Ok((ty, read_vec(&mut self.sock, len)?))
    }

    /// The export's size in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The id the server gave a negotiated metadata context.
    #[must_use]
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
    }

    fn request(&mut self, ty: u16, flags: u16, offset: u64, len: u32) -> Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut m = [0u8; 28];
        m[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m[4..6].copy_from_slice(&flags.to_be_bytes());
        m[6..8].copy_from_slice(&ty.to_be_bytes());
        m[8..16].copy_from_slice(&cookie.to_be_bytes());
        m[16..24].copy_from_slice(&offset.to_be_bytes());
        m[24..28].copy_from_slice(&len.to_be_bytes());
        self.sock.write_all(&m)?;
        Ok(cookie)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(NbdError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "request beyond the export",
            )));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` (at most [`MAX_READ`]).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = u32::try_from(buf.len())
            .ok()
            .filter(|&l| l <= MAX_READ)
            .ok_or_else(|| bad("read too large"))?;
        self.check_range(offset, u64::from(len))?;
        let cookie = self.request(CMD_READ, 0, offset, len)?;
        let magic = be32(&mut self.sock)?;
        if magic == SIMPLE_REPLY_MAGIC {
            let err = be32(&mut self.sock)?;
            if be64(&mut self.sock)? != cookie {
                return Err(bad("reply to another request"));
            }
            if err != 0 {
                return Err(NbdError::Refused(format!("read at {offset}: error {err}")));
            }
            self.sock.read_exact(buf)?;
            return Ok(());
        }
        if magic != STRUCTURED_REPLY_MAGIC || !self.structured {
            return Err(bad(format!("bad reply magic {magic:#x}")));
        }
        // Chunks may come in any order; every byte must be covered exactly once.
        let mut covered = 0u64;
        loop {
            let (flags, ty, payload) = self.structured_chunk(cookie)?;
            match ty {
                REPLY_TYPE_OFFSET_DATA => {
                    if payload.len() < 8 {
                        return Err(bad("short OFFSET_DATA"));
                    }
                    let at =
                        u64::from_be_bytes(payload[..8].try_into().map_err(|_| bad("offset"))?);
                    let data = &payload[8..];
                    let start = at
                        .checked_sub(offset)
                        .ok_or_else(|| bad("data before the request"))?;
                    let end = start
                        .checked_add(data.len() as u64)
                        .filter(|&e| e <= u64::from(len))
                        .ok_or_else(|| bad("data beyond the request"))?;
                    buf[start as usize..end as usize].copy_from_slice(data);
                    covered += data.len() as u64;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    if payload.len() != 12 {
                        return Err(bad("OFFSET_HOLE of the wrong length"));
                    }
                    let at =
                        u64::from_be_bytes(payload[..8].try_into().map_err(|_| bad("offset"))?);
                    let hole = u64::from(u32::from_be_bytes(
                        payload[8..12].try_into().map_err(|_| bad("len"))?,
                    ));
                    let start = at
                        .checked_sub(offset)
                        .ok_or_else(|| bad("hole before the request"))?;
                    let end = start
                        .checked_add(hole)
                        .filter(|&e| e <= u64::from(len))
                        .ok_or_else(|| bad("hole beyond the request"))?;
                    buf[start as usize..end as usize].fill(0);
                    covered += hole;
                }
                REPLY_TYPE_NONE => {}
                t if t & REPLY_TYPE_ERROR_BIT != 0 => {
                    return Err(Self::reply_error(&payload, offset))
                }
                t => return Err(bad(format!("unexpected reply chunk type {t} to READ"))),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if covered != u64::from(len) {
            return Err(bad(format!(
                "read at {offset}: {covered} of {len} bytes answered"
            )));
        }
        Ok(())
    }

    fn reply_error(payload: &[u8], offset: u64) -> NbdError {
        let code = payload
            .get(..4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        let msg = payload
            .get(6..)
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .unwrap_or_default();
        NbdError::Refused(format!("request at {offset}: error {code} {msg}"))
    }

    fn structured_chunk(&mut self, cookie: u64) -> Result<(u16, u16, Vec<u8>)> {
        let flags = be16(&mut self.sock)?;
        let ty = be16(&mut self.sock)?;
        if be64(&mut self.sock)? != cookie {
            return Err(bad("reply to another request"));
        }
        let len = be32(&mut self.sock)?;
        let payload = read_vec(&mut self.sock, len)?;
        Ok((flags, ty, payload))
    }

    /// Status of `[offset, offset+len)` in the context `ctx` (one reply's worth: the
    /// extents may cover less than asked; call again from where they end).
    pub fn block_status(&mut self, ctx: u32, offset: u64, len: u32) -> Result<Vec<Extent>> {
        if !self.structured {
            return Err(NbdError::Refused(
                "server without structured replies has no block status".into(),
            ));
        }
        self.check_range(offset, u64::from(len))?;
        let cookie = self.request(CMD_BLOCK_STATUS, 0, offset, len)?;
        if be32(&mut self.sock)? != STRUCTURED_REPLY_MAGIC {
            return Err(bad("BLOCK_STATUS answered without a structured reply"));
        }
        let mut out = Vec::new();
        loop {
            let (flags, ty, payload) = self.structured_chunk(cookie)?;
            match ty {
                REPLY_TYPE_BLOCK_STATUS => {
                    if payload.len() < 4 || (payload.len() - 4) % 8 != 0 {
                        return Err(bad("BLOCK_STATUS payload of a bad length"));
                    }
                    let id = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    if id == ctx {
                        let mut at = offset;
                        for d in payload[4..].chunks_exact(8) {
                            let l = u64::from(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
                            let f = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
                            if l == 0 {
                                return Err(bad("BLOCK_STATUS extent of length 0"));
                            }
                            let l = l.min(self.size - at);
                            out.push(Extent {
                                offset: at,
                                length: l,
                                flags: f,
                            });
                            at += l;
                            if at >= self.size {
                                break;
                            }
                        }
                    }
                }
                REPLY_TYPE_NONE => {}
                t if t & REPLY_TYPE_ERROR_BIT != 0 => {
                    return Err(Self::reply_error(&payload, offset))
                }
                t => {
                    return Err(bad(format!(
                        "unexpected reply chunk type {t} to BLOCK_STATUS"
                    )))
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if out.is_empty() {
            return Err(bad(format!("BLOCK_STATUS at {offset} described nothing")));
        }
        Ok(out)
    }

    /// Says goodbye (best effort).
    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0);
    }
}
