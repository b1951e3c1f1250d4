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
use std::net::TcpStream;
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

/// The connection to the server: a Unix socket or TCP.
pub enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.flush(),
            Self::Tcp(s) => s.flush(),
        }
    }
}

impl From<UnixStream> for Conn {
    fn from(s: UnixStream) -> Self {
        Self::Unix(s)
    }
}

/// An open NBD export.
pub struct NbdClient {
    sock: Conn,
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

    /// Connects over TCP (`host:port`) and opens `export`, as [`Self::connect_unix`].
    pub fn connect_tcp(
        addr: &str,
        export: &str,
        contexts: &[&str],
        timeout: Duration,
    ) -> Result<Self> {
        use std::net::ToSocketAddrs;
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address"));
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(sock) => {
                    sock.set_read_timeout(Some(timeout))?;
                    sock.set_write_timeout(Some(timeout))?;
                    sock.set_nodelay(true)?;
                    return Self::handshake(Conn::Tcp(sock), export, contexts);
                }
                Err(e) => last = e,
            }
        }
        Err(last.into())
    }

    /// Runs the handshake over an already connected socket.
    pub fn handshake(sock: impl Into<Conn>, export: &str, contexts: &[&str]) -> Result<Self> {
        let mut sock: Conn = sock.into();
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
        let mut first = true;
        loop {
            let (flags, ty, payload) = self.structured_chunk(cookie, first)?;
            first = false;
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

    /// Reads one structured reply chunk; every chunk but the first (whose magic the
    /// caller has read) starts with the magic.
    fn structured_chunk(&mut self, cookie: u64, first: bool) -> Result<(u16, u16, Vec<u8>)> {
        if !first && be32(&mut self.sock)? != STRUCTURED_REPLY_MAGIC {
            return Err(bad("bad structured reply magic"));
        }
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
        let mut first = true;
        loop {
            let (flags, ty, payload) = self.structured_chunk(cookie, first)?;
            first = false;
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

#[cfg(test)]
mod tests {
    //! A scripted fake server on a socket pair: well-behaved up to the point a test
    //! makes it misbehave.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;
    use std::thread;

    const SIZE: u64 = 1 << 20;

    fn opt_reply(s: &mut UnixStream, opt: u32, ty: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&ty.to_be_bytes());
        m.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        m.extend_from_slice(data);
        s.write_all(&m).unwrap();
    }

    /// Serves a correct handshake (structured replies, base:allocation as context 1).
    fn handshake(s: &mut UnixStream) {
        s.write_all(&NBDMAGIC.to_be_bytes()).unwrap();
        s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
        s.write_all(&3u16.to_be_bytes()).unwrap();
        be32(s).unwrap();
        loop {
            assert_eq!(be64(s).unwrap(), IHAVEOPT);
            let opt = be32(s).unwrap();
            let len = be32(s).unwrap();
            read_vec(s, len).unwrap();
            match opt {
                OPT_STRUCTURED_REPLY => opt_reply(s, opt, REP_ACK, &[]),
                OPT_SET_META_CONTEXT => {
                    let mut d = 1u32.to_be_bytes().to_vec();
                    d.extend_from_slice(b"base:allocation");
                    opt_reply(s, opt, REP_META_CONTEXT, &d);
                    opt_reply(s, opt, REP_ACK, &[]);
                }
                OPT_GO => {
                    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                    d.extend_from_slice(&SIZE.to_be_bytes());
                    d.extend_from_slice(&1u16.to_be_bytes());
                    opt_reply(s, opt, REP_INFO, &d);
                    opt_reply(s, opt, REP_ACK, &[]);
                    return;
                }
                _ => opt_reply(s, opt, REP_ERR_BIT | 1, &[]),
            }
        }
    }

    /// Reads one request; returns (cookie, offset, length).
    fn request(s: &mut UnixStream) -> (u64, u64, u32) {
        let m: [u8; 28] = read_exact(s).unwrap();
        let cookie = u64::from_be_bytes(m[8..16].try_into().unwrap());
        let off = u64::from_be_bytes(m[16..24].try_into().unwrap());
        let len = u32::from_be_bytes(m[24..28].try_into().unwrap());
        (cookie, off, len)
    }

    fn chunk(flags: u16, ty: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut m = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&ty.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    /// Runs `server` on one end and returns what connecting from the other end gives.
    fn against(server: impl FnOnce(UnixStream) + Send + 'static) -> Result<NbdClient> {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let t = thread::spawn(move || server(b));
        let r = NbdClient::handshake(a, "", &["base:allocation"]);
        let _ = t.join();
        r
    }

    #[test]
    fn a_good_server_reads_and_reports_allocation() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = thread::spawn(move || {
            handshake(&mut b);
            let (c, off, len) = request(&mut b);
            let mut p = off.to_be_bytes().to_vec();
            p.extend(vec![7u8; len as usize / 2]);
            let mut hole = (off + u64::from(len / 2)).to_be_bytes().to_vec();
            hole.extend_from_slice(&(len / 2).to_be_bytes());
            b.write_all(&chunk(0, REPLY_TYPE_OFFSET_DATA, c, &p))
                .unwrap();
            b.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, c, &hole))
                .unwrap();
            let (c, _, _) = request(&mut b);
            let mut st = 1u32.to_be_bytes().to_vec();
            for (l, f) in [(4096u32, 0u32), (8192, STATE_HOLE | STATE_ZERO)] {
                st.extend_from_slice(&l.to_be_bytes());
                st.extend_from_slice(&f.to_be_bytes());
            }
            b.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, c, &st))
                .unwrap();
        });
        let mut c = NbdClient::handshake(a, "", &["base:allocation"]).unwrap();
        assert_eq!(c.size(), SIZE);
        let mut buf = vec![1u8; 8192];
        c.read(4096, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 7) && buf[4096..].iter().all(|&x| x == 0));
        let st = c
            .block_status(c.context_id("base:allocation").unwrap(), 0, 65536)
            .unwrap();
        assert_eq!(
            st,
            vec![
                Extent {
                    offset: 0,
                    length: 4096,
                    flags: 0
                },
                Extent {
                    offset: 4096,
                    length: 8192,
                    flags: 3
                },
            ]
        );
        t.join().unwrap();
    }

    #[test]
    fn a_bad_greeting_is_refused() {
        let r = against(|mut s| {
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        });
        assert!(
            matches!(r, Err(NbdError::Protocol(_)) | Err(NbdError::Io(_))),
            "{:?}",
            r.err()
        );
    }

    #[test]
    fn a_truncated_greeting_is_an_error() {
        let r = against(|mut s| {
            s.write_all(&NBDMAGIC.to_be_bytes()[..5]).unwrap();
        });
        assert!(
            matches!(r, Err(NbdError::Io(ref e)) if e.kind() == io::ErrorKind::UnexpectedEof),
            "{:?}",
            r.err()
        );
    }

    #[test]
    fn a_silent_server_times_out() {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(1500));
            drop(b);
        });
        let started = std::time::Instant::now();
        let r = NbdClient::handshake(a, "", &[]);
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "did not time out"
        );
        assert!(matches!(r, Err(NbdError::Io(_))), "{:?}", r.err());
        t.join().unwrap();
    }

    #[test]
    fn a_huge_option_reply_is_refused_without_allocating_it() {
        let r = against(|mut s| {
            s.write_all(&NBDMAGIC.to_be_bytes()).unwrap();
            s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
            s.write_all(&3u16.to_be_bytes()).unwrap();
            let mut m = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
            m.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
            m.extend_from_slice(&REP_ACK.to_be_bytes());
            m.extend_from_slice(&u32::MAX.to_be_bytes());
            s.write_all(&m).unwrap();
            thread::sleep(Duration::from_millis(50));
        });
        assert!(matches!(r, Err(NbdError::Protocol(_))), "{:?}", r.err());
    }

    fn after_handshake(
        reply: impl FnOnce(&mut UnixStream, u64, u64, u32) + Send + 'static,
    ) -> Result<Vec<u8>> {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let t = thread::spawn(move || {
            handshake(&mut b);
            let (c, off, len) = request(&mut b);
            reply(&mut b, c, off, len);
            thread::sleep(Duration::from_millis(50));
        });
        let mut c = NbdClient::handshake(a, "", &[]).unwrap();
        let mut buf = vec![0u8; 4096];
        let r = c.read(0, &mut buf).map(|()| buf);
        let _ = t.join();
        r
    }

    #[test]
    fn replies_that_do_not_fit_the_request_are_refused() {
        // Data beyond the request.
        let r = after_handshake(|s, c, off, len| {
            let mut p = off.to_be_bytes().to_vec();
            p.extend(vec![1u8; len as usize + 1]);
            s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, c, &p))
                .unwrap();
        });
        assert!(matches!(r, Err(NbdError::Protocol(_))), "{:?}", r.err());
        // The answer to another request.
        let r = after_handshake(|s, c, off, len| {
            let mut p = off.to_be_bytes().to_vec();
            p.extend(vec![1u8; len as usize]);
            s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, c + 1, &p))
                .unwrap();
        });
        assert!(matches!(r, Err(NbdError::Protocol(_))), "{:?}", r.err());
        // Half an answer, then done.
        let r = after_handshake(|s, c, off, len| {
            let mut p = off.to_be_bytes().to_vec();
            p.extend(vec![1u8; len as usize / 2]);
            s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, c, &p))
                .unwrap();
        });
        assert!(matches!(r, Err(NbdError::Protocol(_))), "{:?}", r.err());
        // A server error.
        let r = after_handshake(|s, c, _, _| {
            let mut p = 5u32.to_be_bytes().to_vec();
            p.extend_from_slice(&4u16.to_be_bytes());
            p.extend_from_slice(b"oops");
            s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR_BIT | 1, c, &p))
                .unwrap();
        });
        assert!(
            matches!(r, Err(NbdError::Refused(ref m)) if m.contains("oops")),
            "{:?}",
            r.err()
        );
        // A reply that stops halfway through.
        let r = after_handshake(|s, c, _, _| {
            let m = chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, c, &[0u8; 100]);
            s.write_all(&m[..30]).unwrap();
        });
        assert!(matches!(r, Err(NbdError::Io(_))), "{:?}", r.err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn arbitrary_replies_never_panic(garbage in proptest::collection::vec(any::<u8>(), 0..300), keep in 0usize..40) {
            // A valid reply header (cookie and all) followed by garbage, or garbage alone.
            // Whatever the bytes, the client returns (no panic) and within its timeout
            // (no hang): 300 ms of silence plus the fake server's 50 ms.
            let started = std::time::Instant::now();
            let r = after_handshake(move |s, c, _, _| {
                let head = chunk(0, REPLY_TYPE_OFFSET_DATA, c, &[]);
                let mut m = head[..keep.min(head.len())].to_vec();
                m.extend_from_slice(&garbage);
                let _ = s.write_all(&m);
            });
            prop_assert!(started.elapsed() < Duration::from_secs(3), "took {:?}: {:?}", started.elapsed(), r.err());
        }
    }
}
