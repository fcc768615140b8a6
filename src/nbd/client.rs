//! An NBD client: newstyle-fixed negotiation (`NBD_OPT_GO`), structured replies, meta contexts
//! (`base:allocation`, `qemu:dirty-bitmap:NAME`), optional TLS (`NBD_OPT_STARTTLS`), and pipelined reads
//! (several requests in flight, replies matched by cookie).
//!
//! Everything the server sends is checked: a reply that does not fit its request is a protocol error naming
//! the server, never a panic and never silently wrong data.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use super::proto::*;
use crate::error::{Error, Result};

/// Where an export is: parsed from an NBD URI (`nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`,
/// and `nbds://`, `nbds+unix://` for TLS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub endpoint: Endpoint,
    pub export: String,
    pub tls: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

pub const DEFAULT_PORT: u16 = 10809;

impl Address {
    pub fn parse(url: &str) -> std::result::Result<Address, String> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("{url:?} is not an NBD URI (nbd://…)"))?;
        let (unix, tls) = match scheme {
            "nbd" => (false, false),
            "nbds" => (false, true),
            "nbd+unix" => (true, false),
            "nbds+unix" => (true, true),
            _ => return Err(format!("unknown NBD URI scheme {scheme:?} (nbd, nbds, nbd+unix, nbds+unix)")),
        };
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        let export = crate::util::percent_decode(path)?;
        if unix {
            if !authority.is_empty() {
                return Err(format!("{url:?}: an nbd+unix URI has no host (nbd+unix:///export?socket=PATH)"));
            }
            let socket = query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| format!("{url:?}: an nbd+unix URI needs ?socket=PATH"))?;
            return Ok(Address { endpoint: Endpoint::Unix(crate::util::percent_decode(socket)?.into()), export, tls });
        }
        if authority.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| format!("{url:?}: unclosed [ in the host"))?;
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let port = match port {
            Some(p) => p.parse().map_err(|_| format!("{url:?}: port {p:?} is not a number"))?,
            None => DEFAULT_PORT,
        };
        Ok(Address { endpoint: Endpoint::Tcp { host, port }, export, tls })
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = if self.tls { "s" } else { "" };
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "nbd{s}://[{host}]:{port}/{}", self.export),
            Endpoint::Tcp { host, port } => write!(f, "nbd{s}://{host}:{port}/{}", self.export),
            Endpoint::Unix(p) => write!(f, "nbd{s}+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

/// TLS settings for `nbds://` addresses.
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// PEM file with the CA certificate(s) that sign the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the host of the address, or `localhost`).
    pub server_name: Option<String>,
    /// A client certificate (PEM chain) and its key, for servers that admit only clients they know.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

trait Transport: Read + Write + Send {}
impl<T: Read + Write + Send> Transport for T {}

/// What `NBD_OPT_GO` told about the export.
#[derive(Clone, Copy, Debug)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// Largest request the server accepts (`NBD_INFO_BLOCK_SIZE`, or 32 MiB by convention).
    pub max_request: u32,
}

impl ExportInfo {
    pub fn can_multi_conn(&self) -> bool {
        self.flags & FLAG_CAN_MULTI_CONN != 0
    }
}

/// A request in flight.
pub enum Pending {
    /// `pieces`: the ranges of `buf` (start, length) the reply has filled so far.
    Read {
        offset: u64,
        buf: Vec<u8>,
        pieces: Vec<(u64, u64)>,
        error: Option<String>,
    },
    Status {
        context: u32,
        extents: Vec<StatusExtent>,
        error: Option<String>,
    },
}

/// One negotiated connection in the transmission phase.
pub struct Connection {
    stream: BufReader<Box<dyn Transport>>,
    address: String,
    info: ExportInfo,
    structured: bool,
    /// Negotiated meta contexts: id -> name.
    contexts: HashMap<u32, String>,
    next_cookie: u64,
}

/// The longest payload accepted in a reply chunk other than read data.
const MAX_CHUNK_PAYLOAD: u32 = 16 << 20;

impl Connection {
    /// Connects, negotiates structured replies and the `contexts` asked for (those the server does not
    /// know are absent from [`Connection::has_context`]), and enters the transmission phase.
    pub fn connect(addr: &Address, contexts: &[String], tls: &TlsOptions) -> Result<Connection> {
        let name = addr.to_string();
        let err = |cause: String| Error::source(name.clone(), cause);
        let stream: Box<dyn Transport> = match &addr.endpoint {
            Endpoint::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))
                    .map_err(|e| err(format!("cannot connect to {host}:{port}: {e}")))?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Endpoint::Unix(path) => Box::new(
                UnixStream::connect(path)
                    .map_err(|e| err(format!("cannot connect to socket {}: {e}", path.display())))?,
            ),
        };
        Self::negotiate(stream, name, &addr.export, contexts, addr.tls.then_some((addr, tls)))
    }

    /// [`Connection::connect`] over a stream the caller opened, without TLS (what the fuzz target drives with
    /// arbitrary server bytes).
    pub fn over_stream(
        stream: impl Read + Write + Send + 'static,
        name: &str,
        export: &str,
        contexts: &[String],
    ) -> Result<Connection> {
        Self::negotiate(Box::new(stream), name.to_string(), export, contexts, None)
    }

    fn negotiate(
        stream: Box<dyn Transport>,
        name: String,
        export: &str,
        contexts: &[String],
        tls: Option<(&Address, &TlsOptions)>,
    ) -> Result<Connection> {
        let mut n = Negotiation { stream: BufReader::with_capacity(1 << 20, stream), name: name.clone() };
        n.greeting()?;
        if let Some((addr, tls)) = tls {
            n.start_tls(addr, tls)?;
        }
        let structured = n.structured_replies()?;
        let mut ctx = HashMap::new();
        if structured && !contexts.is_empty() {
            ctx = n.set_meta_contexts(export, contexts)?;
        }
        let info = n.go(export)?;
        Ok(Connection { stream: n.stream, address: name, info, structured, contexts: ctx, next_cookie: 1 })
    }

    /// The exports a server lists (`NBD_OPT_LIST`): names and descriptions.
    pub fn list(addr: &Address, tls: &TlsOptions) -> Result<Vec<(String, String)>> {
        let name = addr.to_string();
        let stream: Box<dyn Transport> = match &addr.endpoint {
            Endpoint::Tcp { host, port } => Box::new(
                TcpStream::connect((host.as_str(), *port)).map_err(|e| Error::source(name.clone(), e.to_string()))?,
            ),
            Endpoint::Unix(p) => {
                Box::new(UnixStream::connect(p).map_err(|e| Error::source(name.clone(), e.to_string()))?)
            }
        };
        let mut n = Negotiation { stream: BufReader::new(stream), name };
        n.greeting()?;
        if addr.tls {
            n.start_tls(addr, tls)?;
        }
        let out = n.list()?;
        n.send_option(OPT_ABORT, &[])?;
        Ok(out)
    }

    pub fn info(&self) -> ExportInfo {
        self.info
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn has_context(&self, name: &str) -> bool {
        self.contexts.values().any(|c| c == name)
    }

    fn protocol(&self, cause: impl std::fmt::Display) -> Error {
        Error::source(self.address.clone(), format!("NBD protocol error: {cause}"))
    }

    /// Sends a request; returns its cookie.
    fn send(&mut self, command: u16, flags: u16, offset: u64, length: u32) -> Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let req = Request { flags, command, cookie, offset, length };
        self.stream
            .get_mut()
            .write_all(&req.encode())
            .map_err(|e| Error::source(self.address.clone(), format!("sending a request: {e}")))?;
        Ok(cookie)
    }

    /// Sends a read of `len` bytes at `offset` and registers it in `pending`.
    pub fn send_read(&mut self, offset: u64, len: u32, pending: &mut HashMap<u64, Pending>) -> Result<u64> {
        self.send_read_into(offset, len, Vec::new(), pending)
    }

    /// [`Connection::send_read`] into `buf`, a buffer that may hold an earlier read: the reply must fill every
    /// byte of it (checked when it completes), so it is not zeroed first.
    pub fn send_read_into(
        &mut self,
        offset: u64,
        len: u32,
        mut buf: Vec<u8>,
        pending: &mut HashMap<u64, Pending>,
    ) -> Result<u64> {
        if len > self.info.max_request {
            return Err(Error::invalid(format!("read of {len} bytes exceeds the server's limit")));
        }
        let cookie = self.send(CMD_READ, 0, offset, len)?;
        buf.resize(len as usize, 0);
        pending.insert(cookie, Pending::Read { offset, buf, pieces: Vec::new(), error: None });
        Ok(cookie)
    }

    /// Reads one reply (or reply chunk) and applies it to its request in `pending`. Returns the cookie of a
    /// request that is now complete.
    pub fn receive(&mut self, pending: &mut HashMap<u64, Pending>) -> Result<Option<u64>> {
        let magic = read_u32(&mut self.stream).map_err(|e| self.io(e))?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.stream.read_exact(&mut h).map_err(|e| self.io(e))?;
                let error = u32::from_be_bytes(h[0..4].try_into().expect("4 bytes"));
                let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8 bytes"));
                let p = pending
                    .get_mut(&cookie)
                    .ok_or_else(|| self.protocol(format!("reply to unknown cookie {cookie}")))?;
                match p {
                    Pending::Read { buf, pieces, error: err, .. } => {
                        if error != 0 {
                            *err = Some(error_name(error).to_string());
                        } else {
                            self.stream.read_exact(buf).map_err(|e| Error::source(self.address.clone(), e))?;
                            pieces.push((0, buf.len() as u64));
                        }
                    }
                    Pending::Status { error: err, .. } => {
                        *err = Some(if error != 0 {
                            error_name(error).to_string()
                        } else {
                            "a simple reply to a block status request".to_string()
                        });
                    }
                }
                Ok(Some(cookie))
            }
            STRUCTURED_REPLY_MAGIC if self.structured => {
                let mut h = [0u8; CHUNK_HEADER_LEN];
                self.stream.read_exact(&mut h).map_err(|e| self.io(e))?;
                let h = ChunkHeader::parse(&h);
                self.receive_chunk(h, pending)
            }
            _ => Err(self.protocol(format!("unexpected reply magic {magic:#010x}"))),
        }
    }

    fn receive_chunk(&mut self, h: ChunkHeader, pending: &mut HashMap<u64, Pending>) -> Result<Option<u64>> {
        let address = self.address.clone();
        let protocol = |c: String| Error::source(address.clone(), format!("NBD protocol error: {c}"));
        let Some(p) = pending.get_mut(&h.cookie) else {
            return Err(protocol(format!("reply chunk for unknown cookie {}", h.cookie)));
        };
        match (h.kind, p) {
            (REPLY_TYPE_OFFSET_DATA, Pending::Read { offset, buf, pieces, .. }) => {
                if h.length < 8 || (h.length - 8) as usize > buf.len() {
                    return Err(protocol(format!("data chunk of {} bytes for a read of {}", h.length, buf.len())));
                }
                let at = read_u64(&mut self.stream).map_err(|e| Error::source(address.clone(), e))?;
                let len = (h.length - 8) as u64;
                let rel = within(at, len, *offset, buf.len()).ok_or_else(|| {
                    protocol(format!("data chunk at {at}+{len} lies outside the read {}+{}", offset, buf.len()))
                })?;
                self.stream
                    .read_exact(&mut buf[rel as usize..(rel + len) as usize])
                    .map_err(|e| Error::source(address.clone(), e))?;
                pieces.push((rel, len));
            }
            (REPLY_TYPE_OFFSET_HOLE, Pending::Read { offset, buf, pieces, .. }) => {
                let payload = self.payload(h.length, 12)?;
                let mut r = Bytes::new(&payload, "hole chunk");
                let (at, len) = (r.u64().map_err(&protocol)?, r.u32().map_err(&protocol)? as u64);
                let rel = within(at, len, *offset, buf.len()).ok_or_else(|| {
                    protocol(format!("hole chunk at {at}+{len} lies outside the read {}+{}", offset, buf.len()))
                })?;
                buf[rel as usize..(rel + len) as usize].fill(0);
                pieces.push((rel, len));
            }
            (REPLY_TYPE_BLOCK_STATUS, Pending::Status { context, extents, .. }) => {
                let payload = self.payload(h.length, MAX_CHUNK_PAYLOAD)?;
                let (id, ex) = parse_block_status(&payload).map_err(&protocol)?;
                if id == *context {
                    extents.extend(ex);
                }
            }
            (REPLY_TYPE_NONE, _) => {
                if h.length != 0 || h.flags & REPLY_FLAG_DONE == 0 {
                    return Err(protocol("a NONE chunk must be empty and final".into()));
                }
            }
            (k, p) if k & (1 << 15) != 0 => {
                let payload = self.payload(h.length, MAX_CHUNK_PAYLOAD)?;
                let (code, msg) = parse_error_chunk(&payload).map_err(&protocol)?;
                let text =
                    if msg.is_empty() { error_name(code).to_string() } else { format!("{msg} ({})", error_name(code)) };
                match p {
                    Pending::Read { error, .. } | Pending::Status { error, .. } => {
                        error.get_or_insert(text);
                    }
                }
            }
            (k, _) => return Err(protocol(format!("unexpected reply chunk type {k} for this request"))),
        }
        if h.flags & REPLY_FLAG_DONE == 0 {
            return Ok(None);
        }
        if let Some(Pending::Read { buf, pieces, error: None, .. }) = pending.get_mut(&h.cookie) {
            filled_exactly(pieces, buf.len() as u64).map_err(protocol)?;
        }
        Ok(Some(h.cookie))
    }

    /// Reads a chunk payload of at most `max` bytes.
    fn payload(&mut self, len: u32, max: u32) -> Result<Vec<u8>> {
        if len > max {
            return Err(self.protocol(format!("reply chunk of {len} bytes (at most {max} expected)")));
        }
        let mut p = vec![0u8; len as usize];
        self.stream.read_exact(&mut p).map_err(|e| self.io(e))?;
        Ok(p)
    }

    fn io(&self, e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::source(self.address.clone(), "the server closed the connection")
        } else {
            Error::source(self.address.clone(), e)
        }
    }

    /// Waits for request `cookie` to complete, then removes it from `pending`.
    fn wait(&mut self, cookie: u64, pending: &mut HashMap<u64, Pending>) -> Result<Pending> {
        loop {
            if self.receive(pending)? == Some(cookie) {
                return Ok(pending.remove(&cookie).expect("completed request is pending"));
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset` (split into requests the server accepts).
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut pending = HashMap::new();
        let mut done = 0usize;
        while done < buf.len() {
            let len = (buf.len() - done).min(self.info.max_request as usize);
            let at = offset + done as u64;
            let cookie = self.send_read(at, len as u32, &mut pending)?;
            let reply = self.wait(cookie, &mut pending)?;
            let data = finish_read(&self.address, reply)?;
            buf[done..done + len].copy_from_slice(&data);
            done += len;
        }
        Ok(())
    }

    /// The extents of meta context `context` from `offset` on, up to `len` bytes (the server may answer fewer).
    pub fn block_status(&mut self, context: &str, offset: u64, len: u32) -> Result<Vec<StatusExtent>> {
        let id = *self
            .contexts
            .iter()
            .find(|(_, n)| n.as_str() == context)
            .ok_or_else(|| Error::source(self.address.clone(), format!("meta context {context} was not negotiated")))?
            .0;
        let cookie = self.send(CMD_BLOCK_STATUS, 0, offset, len)?;
        let mut pending = HashMap::from([(cookie, Pending::Status { context: id, extents: Vec::new(), error: None })]);
        match self.wait(cookie, &mut pending)? {
            Pending::Status { error: Some(e), .. } => {
                Err(Error::source(self.address.clone(), format!("block status of {context} at {offset} failed: {e}")))
            }
            Pending::Status { extents, .. } if extents.is_empty() => {
                Err(self.protocol(format!("block status reply at {offset} has no extents for {context}")))
            }
            Pending::Status { extents, .. } => Ok(extents),
            Pending::Read { .. } => unreachable!("the cookie belongs to a status request"),
        }
    }

    /// The byte ranges of the whole export whose `context` status satisfies `want`.
    pub fn extents_where(&mut self, context: &str, want: impl Fn(u32) -> bool) -> Result<Vec<crate::source::Extent>> {
        let size = self.info.size;
        let mut out: Vec<crate::source::Extent> = Vec::new();
        let mut offset = 0u64;
        while offset < size {
            let len = (size - offset).min(1 << 31) as u32;
            let extents = self.block_status(context, offset, len)?;
            let start = offset;
            for e in extents {
                if e.length == 0 {
                    return Err(self.protocol("a block status extent of length 0"));
                }
                let end = offset.saturating_add(e.length as u64).min(size);
                if want(e.flags) {
                    match out.last_mut() {
                        Some(last) if last.end() == offset => last.length += end - offset,
                        _ => out.push(crate::source::Extent { start: offset, length: end - offset }),
                    }
                }
                offset = end;
                if offset >= start + len as u64 || offset >= size {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Ends the transmission phase politely.
    pub fn disconnect(mut self) {
        let _ = self.send(CMD_DISC, 0, 0, 0);
        let _ = self.stream.get_mut().flush();
    }
}

/// Where a reply's `len` bytes at disk offset `at` start in the buffer of a read at `read_offset` of `read_len`
/// bytes, if they lie inside it (a server's numbers may be anything: no arithmetic on them may overflow).
fn within(at: u64, len: u64, read_offset: u64, read_len: usize) -> Option<u64> {
    let rel = at.checked_sub(read_offset)?;
    rel.checked_add(len).filter(|end| *end <= read_len as u64).map(|_| rel)
}

/// Whether the `pieces` (start, length) a reply filled cover a read of `len` bytes exactly once each: the
/// buffer may hold an earlier read, which a gap or an overlap would leak into this one.
fn filled_exactly(pieces: &mut [(u64, u64)], len: u64) -> std::result::Result<(), String> {
    pieces.sort_unstable();
    let mut next = 0;
    for &(start, n) in pieces.iter() {
        if start != next {
            return Err(format!(
                "a read of {len} bytes was answered with chunks that overlap or leave a gap at {next}"
            ));
        }
        next += n;
    }
    if next != len {
        return Err(format!("a read of {len} bytes was answered with {next}"));
    }
    Ok(())
}

/// The data of a completed read, or its error.
pub fn finish_read(address: &str, p: Pending) -> Result<Vec<u8>> {
    match p {
        Pending::Read { error: Some(e), offset, buf, .. } => Err(Error::source(
            address.to_string(),
            format!("read of {} bytes at offset {offset} failed: {e}", buf.len()),
        )),
        Pending::Read { buf, .. } => Ok(buf),
        Pending::Status { .. } => Err(Error::invalid("not a read request")),
    }
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// The negotiation phase.
struct Negotiation {
    stream: BufReader<Box<dyn Transport>>,
    name: String,
}

impl Negotiation {
    fn err(&self, cause: impl std::fmt::Display) -> Error {
        Error::source(self.name.clone(), cause.to_string())
    }

    fn io(&self, e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            self.err("the server closed the connection during negotiation")
        } else {
            self.err(e)
        }
    }

    /// Reads the server's greeting and sends the client flags. Returns whether zero padding is off.
    fn greeting(&mut self) -> Result<bool> {
        let magic = read_u64(&mut self.stream).map_err(|e| self.io(e))?;
        if magic != NBDMAGIC {
            return Err(self.err("not an NBD server (no NBDMAGIC greeting)"));
        }
        let second = read_u64(&mut self.stream).map_err(|e| self.io(e))?;
        if second != IHAVEOPT {
            return Err(self.err("the server speaks only the old-style NBD handshake, which is not supported"));
        }
        let mut f = [0u8; 2];
        self.stream.read_exact(&mut f).map_err(|e| self.io(e))?;
        let flags = u16::from_be_bytes(f);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.err("the server does not support fixed-newstyle negotiation"));
        }
        let no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let client = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        self.stream.get_mut().write_all(&client.to_be_bytes()).map_err(|e| self.io(e))?;
        if !no_zeroes {
            return Err(self.err("the server requires zero padding after options (NBD_FLAG_NO_ZEROES unset)"));
        }
        Ok(no_zeroes)
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.stream.get_mut().write_all(&m).map_err(|e| self.io(e))
    }

    /// One option reply: (type, payload).
    fn reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.stream.read_exact(&mut h).map_err(|e| self.io(e))?;
        let mut r = Bytes::new(&h, "option reply");
        let (magic, opt, kind, len) = (r.u64(), r.u32(), r.u32(), r.u32());
        let (magic, opt, kind, len) = (magic.unwrap_or(0), opt.unwrap_or(0), kind.unwrap_or(0), len.unwrap_or(0));
        if magic != OPTION_REPLY_MAGIC {
            return Err(self.err(format!("NBD protocol error: option reply magic {magic:#x}")));
        }
        if opt != option {
            return Err(self.err(format!("NBD protocol error: reply to option {opt}, expected {option}")));
        }
        if len > MAX_OPTION_LEN {
            return Err(self.err(format!("NBD protocol error: option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data).map_err(|e| self.io(e))?;
        Ok((kind, data))
    }

    fn reply_error(&self, what: &str, kind: u32, data: &[u8]) -> Error {
        let msg = String::from_utf8_lossy(data);
        let msg = if msg.is_empty() { String::new() } else { format!(": {msg}") };
        self.err(format!("{what} refused by the server ({}){msg}", option_reply_name(kind)))
    }

    fn start_tls(&mut self, addr: &Address, tls: &TlsOptions) -> Result<()> {
        self.send_option(OPT_STARTTLS, &[])?;
        let (kind, data) = self.reply(OPT_STARTTLS)?;
        if kind != REP_ACK {
            return Err(self.reply_error("TLS (NBD_OPT_STARTTLS)", kind, &data));
        }
        let host = match &addr.endpoint {
            Endpoint::Tcp { host, .. } => host.clone(),
            Endpoint::Unix(_) => "localhost".to_string(),
        };
        let server_name = tls.server_name.clone().unwrap_or(host);
        let config = tls_config(tls).map_err(|e| self.err(e))?;
        let name = rustls::pki_types::ServerName::try_from(server_name.clone())
            .map_err(|e| self.err(format!("TLS server name {server_name:?}: {e}")))?;
        let conn = rustls::ClientConnection::new(config, name).map_err(|e| self.err(format!("TLS: {e}")))?;
        let plain = std::mem::replace(self.stream.get_mut(), Box::new(std::io::Cursor::new(Vec::new())));
        if !self.stream.buffer().is_empty() {
            return Err(self.err("NBD protocol error: data after the STARTTLS reply"));
        }
        // Complete the handshake now, so certificate errors are reported as such.
        let tls_stream =
            super::tls::ClientStream::connect(conn, plain).map_err(|e| self.err(format!("TLS handshake: {e}")))?;
        self.stream = BufReader::with_capacity(1 << 20, Box::new(tls_stream));
        Ok(())
    }

    fn structured_replies(&mut self) -> Result<bool> {
        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (kind, _) = self.reply(OPT_STRUCTURED_REPLY)?;
        Ok(kind == REP_ACK)
    }

    fn set_meta_contexts(&mut self, export: &str, contexts: &[String]) -> Result<HashMap<u32, String>> {
        let queries: Vec<&str> = contexts.iter().map(String::as_str).collect();
        self.send_option(OPT_SET_META_CONTEXT, &encode_meta_context(export, &queries))?;
        let mut out = HashMap::new();
        loop {
            let (kind, data) = self.reply(OPT_SET_META_CONTEXT)?;
            match kind {
                REP_META_CONTEXT => {
                    let mut r = Bytes::new(&data, "meta context reply");
                    let id = r.u32().map_err(|e| self.err(e))?;
                    let name = String::from_utf8_lossy(r.rest()).into_owned();
                    out.insert(id, name);
                }
                REP_ACK => return Ok(out),
                // Servers without meta contexts: no block status, not an error.
                REP_ERR_UNSUP => return Ok(out),
                REP_ERR_UNKNOWN => return Err(self.err(format!("the server has no export named {export:?}"))),
                _ => return Err(self.reply_error("meta contexts", kind, &data)),
            }
        }
    }

    fn go(&mut self, export: &str) -> Result<ExportInfo> {
        self.send_option(OPT_GO, &encode_go(export, &[INFO_BLOCK_SIZE]))?;
        let mut info: Option<ExportInfo> = None;
        let mut max_request = 32 << 20;
        loop {
            let (kind, data) = self.reply(OPT_GO)?;
            match kind {
                REP_INFO => {
                    let mut r = Bytes::new(&data, "NBD_REP_INFO");
                    match r.u16().map_err(|e| self.err(e))? {
                        INFO_EXPORT => {
                            let size = r.u64().map_err(|e| self.err(e))?;
                            let flags = r.u16().map_err(|e| self.err(e))?;
                            info = Some(ExportInfo { size, flags, max_request: 0 });
                        }
                        INFO_BLOCK_SIZE => {
                            let _min = r.u32().map_err(|e| self.err(e))?;
                            let _preferred = r.u32().map_err(|e| self.err(e))?;
                            let max = r.u32().map_err(|e| self.err(e))?;
                            max_request = max.clamp(512, 32 << 20);
                        }
                        _ => {}
                    }
                }
                REP_ACK => {
                    let mut info = info.ok_or_else(|| self.err("NBD protocol error: no export information"))?;
                    info.max_request = max_request;
                    return Ok(info);
                }
                REP_ERR_UNKNOWN => return Err(self.err(format!("the server has no export named {export:?}"))),
                REP_ERR_TLS_REQD => {
                    return Err(self.err("the server requires TLS: use an nbds:// or nbds+unix:// address"))
                }
                _ => return Err(self.reply_error(&format!("export {export:?}"), kind, &data)),
            }
        }
    }

    fn list(&mut self) -> Result<Vec<(String, String)>> {
        self.send_option(OPT_LIST, &[])?;
        let mut out = Vec::new();
        loop {
            let (kind, data) = self.reply(OPT_LIST)?;
            match kind {
                REP_SERVER => {
                    let mut r = Bytes::new(&data, "NBD_REP_SERVER");
                    let name = r.string32().map_err(|e| self.err(e))?;
                    let desc = String::from_utf8_lossy(r.rest()).into_owned();
                    out.push((name, desc));
                }
                REP_ACK => return Ok(out),
                _ => return Err(self.reply_error("listing exports", kind, &data)),
            }
        }
    }
}

fn tls_config(tls: &TlsOptions) -> std::result::Result<Arc<rustls::ClientConfig>, String> {
    let ca =
        tls.ca_file.as_ref().ok_or("an nbds:// address needs --nbd-tls-ca FILE (the CA that signed the server)")?;
    super::tls::client_config(ca, tls.client_cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_must_lie_inside_its_read_whatever_its_numbers() {
        assert_eq!(within(4096, 512, 4096, 1024), Some(0));
        assert_eq!(within(4096 + 512, 512, 4096, 1024), Some(512));
        assert_eq!(within(4096 + 513, 512, 4096, 1024), None);
        assert_eq!(within(4095, 1, 4096, 1024), None);
        // Sums that overflow u64 (they wrapped to a small end before, and the slice index panicked).
        assert_eq!(within(u64::MAX, 16, 0, 1024), None);
        assert_eq!(within(4096 + 8, u64::MAX - 4, 4096, 1024), None);
    }

    #[test]
    fn a_read_must_be_filled_exactly_once() {
        // In any order, data and holes, empty chunks allowed.
        assert!(filled_exactly(&mut [(4096, 4096), (0, 4096)], 8192).is_ok());
        assert!(filled_exactly(&mut [(0, 8192), (8192, 0)], 8192).is_ok());
        // A gap (the buffer's earlier content would be returned), an overlap with the same total, too little
        // or too much.
        assert!(filled_exactly(&mut [(0, 4096), (6000, 2192)], 8192).unwrap_err().contains("gap at 4096"));
        assert!(filled_exactly(&mut [(0, 4096), (2048, 4096)], 8192).is_err());
        assert!(filled_exactly(&mut [(0, 4096), (0, 4096)], 8192).is_err());
        assert!(filled_exactly(&mut [(0, 4096)], 8192).is_err());
        assert!(filled_exactly(&mut [(0, 8192), (8192, 1)], 8192).is_err());
    }

    #[test]
    fn uris() {
        let a = Address::parse("nbd://127.0.0.1:10900/disk%201").unwrap();
        assert_eq!(a.endpoint, Endpoint::Tcp { host: "127.0.0.1".into(), port: 10900 });
        assert_eq!(a.export, "disk 1");
        let b = Address::parse("nbd+unix:///ab/c?socket=/tmp/s.sock").unwrap();
        assert_eq!(b.endpoint, Endpoint::Unix("/tmp/s.sock".into()));
        assert_eq!(b.export, "ab/c");
        let c = Address::parse("nbds://[::1]").unwrap();
        assert_eq!(c.endpoint, Endpoint::Tcp { host: "::1".into(), port: DEFAULT_PORT });
        assert!(c.tls && c.export.is_empty());
        assert!(Address::parse("nbd+unix:///x").is_err());
        assert!(Address::parse("http://x/").is_err());
        assert!(Address::parse("nbd://h:port/").is_err());
        assert_eq!(Address::parse(&b.to_string()).unwrap(), b);
    }
}
