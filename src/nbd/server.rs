//! An NBD server: fixed-newstyle negotiation (`NBD_OPT_LIST`, `INFO`, `GO`, `EXPORT_NAME`, structured replies,
//! the `base:allocation` meta context) and a transmission phase that answers requests concurrently (a reader
//! per connection, a few workers, replies written whole under a lock, so they may complete out of order as
//! the protocol allows).
//!
//! What is served is behind [`Exports`] and [`Device`]; [`crate::serve`] implements them for snapshot disks.
//! Clients are untrusted: every request is checked before use, a bad one gets an NBD error reply, and a
//! client that breaks framing (bad magic, oversized payload) is disconnected. None of it can stop the server.

use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::proto::*;
use crate::error::{Error, Result};

/// Largest read or write request served (the limit advertised in `NBD_INFO_BLOCK_SIZE`).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Concurrent requests per connection.
const WORKERS_PER_CONNECTION: usize = 4;
/// Id of the one meta context served.
const BASE_ALLOCATION_ID: u32 = 1;

/// A disk served as an export.
pub trait Device: Send + Sync {
    fn size(&self) -> u64;
    fn writable(&self) -> bool;
    /// Fills `buf` from `offset` (within the size).
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes `data` at `offset` (only called when writable).
    fn write(&self, offset: u64, data: &[u8]) -> Result<()>;
    fn flush(&self) -> Result<()>;
    /// Whether the range `offset..offset+len` reads as zeros, as extents that together cover a prefix of it:
    /// `(length, zero)`.
    fn zero_extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>>;
    /// Hints that `offset..offset+len` will be read soon.
    fn prefetch(&self, _offset: u64, _len: u64) {}
}

/// The exports a server offers.
pub trait Exports: Send + Sync {
    /// Names and descriptions, for `NBD_OPT_LIST`.
    fn list(&self) -> Result<Vec<(String, String)>>;
    /// The export called `name`; `Ok(None)` if there is none.
    fn open(&self, name: &str) -> Result<Option<Arc<dyn Device>>>;
}

/// Byte streams a connection runs over (TCP or Unix socket).
pub trait Stream: Read + Write + Send + 'static {
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Stream>>;
    fn shutdown_both(&self);
}

impl Stream for std::net::TcpStream {
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Stream for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

/// Counts open connections; refuses more than a limit.
#[derive(Default)]
pub struct ConnectionCount(AtomicUsize);

/// How the server admits clients.
#[derive(Clone, Default)]
pub struct Admission {
    /// Clients must start TLS (`NBD_OPT_STARTTLS`) with this configuration before anything but
    /// `NBD_OPT_ABORT`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// A client that has not chosen an export this long after connecting is disconnected, so that idle or
    /// stalled clients cannot hold connection slots (qemu-nbd's `--handshake-limit`).
    pub handshake_limit: Option<Duration>,
}

/// Serves one client until it disconnects or breaks the protocol. `peer` names it in log lines.
pub fn serve_connection(stream: Box<dyn Stream>, exports: &dyn Exports, peer: &str, admission: &Admission) {
    let closer = stream.try_clone_stream().ok();
    let deadline = admission.handshake_limit.and_then(|limit| handshake_deadline(&*stream, limit, peer));
    let negotiated = negotiate(stream, exports, admission.tls.as_ref());
    drop(deadline);
    match negotiated {
        Ok(Some(session)) => {
            tracing::debug!("{peer}: serving export {:?}", session.name);
            if let Err(e) = transmission(session) {
                tracing::info!("{peer}: connection ended: {e}");
            }
        }
        Ok(None) => tracing::debug!("{peer}: closed during negotiation"),
        Err(e) => tracing::info!("{peer}: negotiation failed: {e}"),
    }
    if let Some(c) = closer {
        c.shutdown_both();
    }
}

/// Shuts `stream` down after `limit` unless the returned sender is dropped first. A timer thread rather than
/// socket timeouts: a client trickling a byte at a time would reset a per-read timeout forever.
fn handshake_deadline(stream: &dyn Stream, limit: Duration, peer: &str) -> Option<crossbeam_channel::Sender<()>> {
    let stream = stream.try_clone_stream().ok()?;
    let (done, wait) = crossbeam_channel::bounded::<()>(0);
    let peer = peer.to_string();
    let timer = move || {
        if wait.recv_timeout(limit) == Err(crossbeam_channel::RecvTimeoutError::Timeout) {
            tracing::warn!("{peer}: no export chosen within {} s of connecting: disconnected", limit.as_secs_f64());
            stream.shutdown_both();
        }
    };
    std::thread::Builder::new().name("nbd-handshake".into()).spawn(timer).ok()?;
    Some(done)
}

/// What negotiation settles: the export, and how to talk in the transmission phase.
struct Session {
    reader: BufReader<Box<dyn Stream>>,
    writer: Box<dyn Stream>,
    name: String,
    device: Arc<dyn Device>,
    structured: bool,
    base_allocation: bool,
}

fn proto_err(cause: impl std::fmt::Display) -> Error {
    Error::invalid(format!("NBD client: {cause}"))
}

fn io_err(e: std::io::Error) -> Error {
    proto_err(e)
}

fn read_exact(r: &mut impl Read, n: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    r.read_exact(&mut b).map_err(io_err)?;
    Ok(b)
}

fn option_reply(w: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> Result<()> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m).map_err(io_err)
}

fn transmission_flags(device: &dyn Device) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_DF | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE;
    if device.writable() {
        f |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    } else {
        f |= FLAG_READ_ONLY;
    }
    f
}

/// The negotiation phase. `Ok(None)`: the client left (`NBD_OPT_ABORT` or an unknown `EXPORT_NAME`).
fn negotiate(
    stream: Box<dyn Stream>,
    exports: &dyn Exports,
    tls: Option<&Arc<rustls::ServerConfig>>,
) -> Result<Option<Session>> {
    let mut writer = stream.try_clone_stream().map_err(io_err)?;
    let mut reader = BufReader::new(stream);
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    writer.write_all(&greeting).map_err(io_err)?;
    let flags = u32::from_be_bytes(read_exact(&mut reader, 4)?.try_into().expect("4 bytes"));
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 || flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(proto_err(format!("unsupported client flags {flags:#x}")));
    }
    let no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // The export a SET_META_CONTEXT applied to, if base:allocation was selected.
    let mut meta_for: Option<String> = None;
    // TLS the client has yet to start: until then only STARTTLS and ABORT are answered.
    let mut tls_due = tls;
    loop {
        let head = read_exact(&mut reader, 16)?;
        let mut h = Bytes::new(&head, "option header");
        let (magic, option, len) = (h.u64(), h.u32(), h.u32());
        let (magic, option, len) = (magic.unwrap_or(0), option.unwrap_or(0), len.unwrap_or(0));
        if magic != IHAVEOPT {
            return Err(proto_err(format!("option magic {magic:#x}")));
        }
        if len > MAX_OPTION_LEN {
            // Skipping gigabytes for a hostile client is not worth it: the connection ends.
            return Err(proto_err(format!("option {option} with a payload of {len} bytes")));
        }
        let data = read_exact(&mut reader, len as usize)?;
        if tls_due.is_some() && option != OPT_STARTTLS && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                // This option has no error reply: the protocol's answer is to close.
                return Err(proto_err("asked for an export before starting TLS, which this server requires"));
            }
            option_reply(&mut writer, option, REP_ERR_TLS_REQD, b"this server requires TLS (NBD_OPT_STARTTLS)")?;
            continue;
        }
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(device) = exports.open(&name)? else {
                    return Ok(None); // the protocol's only answer: close
                };
                let mut m = Vec::with_capacity(134);
                m.extend_from_slice(&device.size().to_be_bytes());
                m.extend_from_slice(&transmission_flags(device.as_ref()).to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                writer.write_all(&m).map_err(io_err)?;
                let base_allocation = meta_for.as_deref() == Some(name.as_str());
                return Ok(Some(Session { reader, writer, name, device, structured, base_allocation }));
            }
            OPT_ABORT => {
                let _ = option_reply(&mut writer, option, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(&mut writer, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                match exports.list() {
                    Ok(list) => {
                        for (name, desc) in list {
                            let mut d = Vec::new();
                            put_string32(&mut d, &name);
                            d.extend_from_slice(desc.as_bytes());
                            option_reply(&mut writer, option, REP_SERVER, &d)?;
                        }
                        option_reply(&mut writer, option, REP_ACK, &[])?;
                    }
                    Err(e) => option_reply(&mut writer, option, REP_ERR_UNKNOWN, e.to_string().as_bytes())?,
                }
            }
            OPT_STARTTLS => match tls_due.take() {
                Some(config) if data.is_empty() => {
                    option_reply(&mut writer, option, REP_ACK, &[])?;
                    if !reader.buffer().is_empty() {
                        return Err(proto_err("data after NBD_OPT_STARTTLS, before the TLS handshake"));
                    }
                    let plain = super::tls::accept(reader.into_inner(), config.clone()).map_err(proto_err)?;
                    writer = plain.try_clone_stream().map_err(io_err)?;
                    reader = BufReader::new(plain);
                    // Anything negotiated before TLS does not count (the protocol says so).
                    structured = false;
                    meta_for = None;
                }
                Some(config) => {
                    tls_due = Some(config);
                    option_reply(&mut writer, option, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")?;
                }
                None if tls.is_some() => {
                    option_reply(&mut writer, option, REP_ERR_INVALID, b"TLS is already on")?;
                }
                None => option_reply(&mut writer, option, REP_ERR_POLICY, b"this server does not offer TLS")?,
            },
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(&mut writer, option, REP_ERR_INVALID, b"takes no data")?;
                } else {
                    structured = true;
                    option_reply(&mut writer, option, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let (export, queries) = match parse_meta_context(&data) {
                    Ok(v) => v,
                    Err(e) => {
                        option_reply(&mut writer, option, REP_ERR_INVALID, e.as_bytes())?;
                        continue;
                    }
                };
                if option == OPT_SET_META_CONTEXT && !structured {
                    option_reply(&mut writer, option, REP_ERR_INVALID, b"structured replies are needed first")?;
                    continue;
                }
                if exports.open(&export)?.is_none() {
                    option_reply(&mut writer, option, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let wanted = if option == OPT_LIST_META_CONTEXT && queries.is_empty() {
                    true
                } else {
                    queries.iter().any(|q| q == BASE_ALLOCATION || (option == OPT_LIST_META_CONTEXT && q == "base:"))
                };
                if wanted {
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    option_reply(&mut writer, option, REP_META_CONTEXT, &d)?;
                }
                if option == OPT_SET_META_CONTEXT {
                    meta_for = wanted.then_some(export);
                }
                option_reply(&mut writer, option, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let (name, infos) = match parse_go(&data) {
                    Ok(v) => v,
                    Err(e) => {
                        option_reply(&mut writer, option, REP_ERR_INVALID, e.as_bytes())?;
                        continue;
                    }
                };
                let device = match exports.open(&name) {
                    Ok(Some(d)) => d,
                    Ok(None) => {
                        let msg = format!("no export named {name:?} (NBD_OPT_LIST shows them)");
                        option_reply(&mut writer, option, REP_ERR_UNKNOWN, msg.as_bytes())?;
                        continue;
                    }
                    Err(e) => {
                        option_reply(&mut writer, option, REP_ERR_UNKNOWN, e.to_string().as_bytes())?;
                        continue;
                    }
                };
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&device.size().to_be_bytes());
                d.extend_from_slice(&transmission_flags(device.as_ref()).to_be_bytes());
                option_reply(&mut writer, option, REP_INFO, &d)?;
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [1u32, 4096, MAX_REQUEST] {
                    d.extend_from_slice(&v.to_be_bytes());
                }
                option_reply(&mut writer, option, REP_INFO, &d)?;
                if infos.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    option_reply(&mut writer, option, REP_INFO, &d)?;
                }
                option_reply(&mut writer, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    let base_allocation = meta_for.as_deref() == Some(name.as_str());
                    return Ok(Some(Session { reader, writer, name, device, structured, base_allocation }));
                }
            }
            _ => {
                option_reply(&mut writer, option, REP_ERR_UNSUP, b"option not supported")?;
            }
        }
    }
}

/// One request with its write payload.
struct Job {
    req: Request,
    payload: Vec<u8>,
}

/// Replies are written whole under this lock, so concurrent workers never interleave bytes.
struct Replies {
    out: Mutex<BufWriter<Box<dyn Stream>>>,
    structured: bool,
}

impl Replies {
    fn send(&self, parts: &[&[u8]]) -> Result<()> {
        let mut w = self.out.lock().unwrap_or_else(|p| p.into_inner());
        for p in parts {
            w.write_all(p).map_err(io_err)?;
        }
        w.flush().map_err(io_err)
    }

    fn simple(&self, cookie: u64, error: u32, data: &[u8]) -> Result<()> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&error.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        self.send(&[&h, data])
    }

    /// An error reply: a structured error chunk with the message when possible.
    fn error(&self, req: &Request, code: u32, msg: &str) -> Result<()> {
        if self.structured {
            let payload = encode_error_chunk(code, msg);
            let h = ChunkHeader {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_ERROR,
                cookie: req.cookie,
                length: payload.len() as u32,
            };
            self.send(&[&h.encode(), &payload])
        } else {
            self.simple(req.cookie, code, &[])
        }
    }

    fn chunk(&self, cookie: u64, kind: u16, done: bool, parts: &[&[u8]]) -> Result<()> {
        let length = parts.iter().map(|p| p.len()).sum::<usize>() as u32;
        let h = ChunkHeader { flags: if done { REPLY_FLAG_DONE } else { 0 }, kind, cookie, length };
        let head = h.encode();
        let mut all: Vec<&[u8]> = vec![&head];
        all.extend_from_slice(parts);
        self.send(&all)
    }
}

fn transmission(s: Session) -> Result<()> {
    let Session { mut reader, writer, name, device, structured, base_allocation } = s;
    let replies = Arc::new(Replies { out: Mutex::new(BufWriter::with_capacity(1 << 20, writer)), structured });
    let (tx, rx) = crossbeam_channel::bounded::<Job>(WORKERS_PER_CONNECTION * 2);
    let result = std::thread::scope(|scope| {
        for i in 0..WORKERS_PER_CONNECTION {
            let (rx, replies, device) = (rx.clone(), replies.clone(), device.clone());
            let name = &name;
            std::thread::Builder::new()
                .name(format!("nbd-serve-{i}"))
                .spawn_scoped(scope, move || {
                    let mut read_buf = Vec::new();
                    for job in rx {
                        if let Err(e) = handle(&job, device.as_ref(), &replies, base_allocation, &mut read_buf) {
                            tracing::debug!("{name}: reply failed: {e}");
                            break;
                        }
                    }
                })
                .map_err(|e| Error::invalid(format!("cannot start a worker thread: {e}")))?;
        }
        drop(rx);
        // Owned here, so returning closes the channel and the workers finish before the scope ends.
        let tx = tx;
        loop {
            let mut head = [0u8; REQUEST_LEN];
            match reader.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(io_err(e)),
            }
            let req = Request::parse(&head).map_err(proto_err)?;
            let mut payload = Vec::new();
            if req.command == CMD_WRITE {
                if req.length > MAX_REQUEST {
                    // The payload cannot be skipped safely; framing is lost.
                    return Err(proto_err(format!("write of {} bytes (limit {MAX_REQUEST})", req.length)));
                }
                payload = read_exact(&mut reader, req.length as usize)?;
            }
            if req.command == CMD_DISC {
                return Ok(());
            }
            if tx.send(Job { req, payload }).is_err() {
                return Err(proto_err("the workers stopped"));
            }
        }
    });
    result
}

/// Checks a request's range against the export.
fn range_error(req: &Request, size: u64, max: u32) -> Option<(u32, String)> {
    if req.length > max {
        return Some((EOVERFLOW, format!("request of {} bytes exceeds the limit of {max}", req.length)));
    }
    match req.offset.checked_add(req.length as u64) {
        Some(end) if end <= size => None,
        _ => Some((EINVAL, format!("range {}+{} lies beyond the export's {size} bytes", req.offset, req.length))),
    }
}

/// Reads up to this size reuse their worker's buffer; larger ones (up to [`MAX_REQUEST`]) get their own, so
/// that a client cannot make every worker hold the maximum.
const KEPT_READ_BUFFER: usize = 4 << 20;

/// Answers one request. `read_buf` is the worker's buffer for reads: a fresh one per read cost its page faults
/// every time (a quarter of serve's CPU under `qemu-img convert`, which reads 2 MiB at a time).
fn handle(
    job: &Job,
    device: &dyn Device,
    replies: &Replies,
    base_allocation: bool,
    read_buf: &mut Vec<u8>,
) -> Result<()> {
    let req = &job.req;
    let size = device.size();
    match req.command {
        CMD_READ => {
            if let Some((code, msg)) = range_error(req, size, MAX_REQUEST) {
                return replies.error(req, code, &msg);
            }
            let len = req.length as usize;
            let mut own = Vec::new();
            let buf = if len <= KEPT_READ_BUFFER {
                if read_buf.len() < len {
                    read_buf.resize(len, 0);
                }
                &mut read_buf[..len]
            } else {
                own.resize(len, 0);
                &mut own[..]
            };
            if let Err(e) = device.read(req.offset, buf) {
                tracing::warn!("read of {} bytes at {}: {e}", req.length, req.offset);
                return replies.error(req, EIO, &e.to_string());
            }
            if !replies.structured {
                return replies.simple(req.cookie, 0, buf);
            }
            if buf.is_empty() {
                return replies.chunk(req.cookie, REPLY_TYPE_NONE, true, &[]);
            }
            let offset = req.offset.to_be_bytes();
            replies.chunk(req.cookie, REPLY_TYPE_OFFSET_DATA, true, &[&offset, buf])
        }
        CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM => {
            if !device.writable() {
                return replies.error(req, EPERM, "the export is read-only");
            }
            if let Some((code, msg)) =
                range_error(req, size, if req.command == CMD_WRITE { MAX_REQUEST } else { u32::MAX })
            {
                return replies.error(req, code, &msg);
            }
            let result = match req.command {
                CMD_WRITE => device.write(req.offset, &job.payload),
                // Trimmed ranges read as zeros afterwards, as after WRITE_ZEROES: simpler and allowed.
                _ => write_zeroes(device, req.offset, req.length as u64),
            };
            let result = result.and_then(|()| if req.flags & CMD_FLAG_FUA != 0 { device.flush() } else { Ok(()) });
            match result {
                Ok(()) => replies.simple(req.cookie, 0, &[]),
                Err(e) => replies.error(req, EIO, &e.to_string()),
            }
        }
        CMD_FLUSH => match device.flush() {
            Ok(()) => replies.simple(req.cookie, 0, &[]),
            Err(e) => replies.error(req, EIO, &e.to_string()),
        },
        CMD_CACHE => {
            if let Some((code, msg)) = range_error(req, size, u32::MAX) {
                return replies.error(req, code, &msg);
            }
            device.prefetch(req.offset, req.length as u64);
            replies.simple(req.cookie, 0, &[])
        }
        CMD_BLOCK_STATUS => {
            if !replies.structured || !base_allocation {
                return replies.error(req, EINVAL, "no meta context was negotiated");
            }
            if let Some((code, msg)) = range_error(req, size, u32::MAX) {
                return replies.error(req, code, &msg);
            }
            if req.length == 0 {
                return replies.error(req, EINVAL, "block status of 0 bytes");
            }
            let extents = match device.zero_extents(req.offset, req.length as u64) {
                Ok(e) => e,
                Err(e) => return replies.error(req, EIO, &e.to_string()),
            };
            // With REQ_ONE (qemu always sets it) the one extent is still the whole run of equal state, not
            // just the device's first piece of it: answering a block at a time made qemu ask 4096 times for a
            // 4 GiB disk.
            let one = req.flags & CMD_FLAG_REQ_ONE != 0;
            let mut out: Vec<StatusExtent> = Vec::new();
            for (len, zero) in extents {
                let flags = if zero { STATE_HOLE | STATE_ZERO } else { 0 };
                match out.last_mut() {
                    Some(l) if l.flags == flags && l.length as u64 + len <= u32::MAX as u64 => l.length += len as u32,
                    Some(_) if one => break,
                    _ => out.push(StatusExtent { length: len.min(u32::MAX as u64) as u32, flags }),
                }
            }
            if out.is_empty() {
                return replies.error(req, EIO, "no allocation information");
            }
            let payload = encode_block_status(BASE_ALLOCATION_ID, &out);
            replies.chunk(req.cookie, REPLY_TYPE_BLOCK_STATUS, true, &[&payload])
        }
        other => replies.error(req, EINVAL, &format!("unknown command {other}")),
    }
}

fn write_zeroes(device: &dyn Device, offset: u64, len: u64) -> Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        device.write(offset + done, &zeros[..n])?;
        done += n as u64;
    }
    Ok(())
}

impl ConnectionCount {
    /// Takes a slot if fewer than `limit` are taken; the slot is released when the guard drops.
    pub fn enter(self: &Arc<Self>, limit: usize) -> Option<ConnectionSlot> {
        let n = self.0.fetch_add(1, Ordering::SeqCst);
        if n >= limit {
            self.0.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(ConnectionSlot(self.clone()))
    }
}

pub struct ConnectionSlot(Arc<ConnectionCount>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Ordering::SeqCst);
    }
}
