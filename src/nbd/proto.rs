//! The NBD wire protocol (newstyle-fixed negotiation, simple and structured replies), as in the upstream
//! `proto.md`: constants, and pure encoders and parsers shared by the [client](super::client) and the
//! [server](super::server). Parsers take untrusted bytes and return `Err` with a reason, never panic; they
//! are fuzzed (`fuzz/fuzz_targets/nbd_messages.rs`).

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) | 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;

/// Info types in `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Error numbers on the wire (fixed by the protocol, not the host's errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// `base:allocation` status bits.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` status bit.
pub const STATE_DIRTY: u32 = 1;

pub const BASE_ALLOCATION: &str = "base:allocation";

/// The longest option payload either side accepts; larger ones are refused (names are at most 4096 bytes).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// The longest string (export name, context name) accepted.
pub const MAX_STRING_LEN: usize = 4096;

pub fn error_name(code: u32) -> &'static str {
    match code {
        EPERM => "EPERM (operation not permitted)",
        EIO => "EIO (input/output error)",
        ENOMEM => "ENOMEM (out of memory)",
        EINVAL => "EINVAL (invalid argument)",
        ENOSPC => "ENOSPC (no space left)",
        EOVERFLOW => "EOVERFLOW (request too large)",
        ENOTSUP => "ENOTSUP (not supported)",
        ESHUTDOWN => "ESHUTDOWN (server shutting down)",
        _ => "unknown error",
    }
}

pub fn option_reply_name(code: u32) -> String {
    match code {
        REP_ERR_UNSUP => "unsupported".into(),
        REP_ERR_POLICY => "refused by policy".into(),
        REP_ERR_INVALID => "invalid".into(),
        REP_ERR_TLS_REQD => "TLS required".into(),
        REP_ERR_UNKNOWN => "unknown export".into(),
        REP_ERR_TOO_BIG => "too big".into(),
        c if c & (1 << 31) != 0 => format!("error {}", c & !(1 << 31)),
        c => format!("reply type {c}"),
    }
}

/// A cursor over untrusted bytes.
pub struct Bytes<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Bytes<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Bytes { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err(format!("{} is truncated", self.what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    pub fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    pub fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    /// A string of `len` bytes (UTF-8, at most [`MAX_STRING_LEN`]).
    pub fn string(&mut self, len: usize) -> Result<String, String> {
        if len > MAX_STRING_LEN {
            return Err(format!("{}: a string of {len} bytes is longer than {MAX_STRING_LEN}", self.what));
        }
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| format!("{}: a string is not UTF-8", self.what))
    }

    /// A string preceded by its 32-bit length.
    pub fn string32(&mut self) -> Result<String, String> {
        let len = self.u32()? as usize;
        self.string(len)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn end(&self) -> Result<(), String> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(format!("{} has {} unexpected trailing bytes", self.what, self.buf.len()))
        }
    }
}

/// A transmission-phase request (28 bytes; a write's payload follows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub const REQUEST_LEN: usize = 28;

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request, String> {
        let mut r = Bytes::new(b, "request");
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(format!("request magic is {magic:#010x}, expected {REQUEST_MAGIC:#010x}"));
        }
        Ok(Request { flags: r.u16()?, command: r.u16()?, cookie: r.u64()?, offset: r.u64()?, length: r.u32()? })
    }
}

/// `NBD_OPT_GO` / `NBD_OPT_INFO` payload: export name and requested info types.
pub fn encode_go(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    put_string32(&mut d, name);
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

pub fn parse_go(data: &[u8]) -> Result<(String, Vec<u16>), String> {
    let mut r = Bytes::new(data, "NBD_OPT_GO payload");
    let name = r.string32()?;
    let n = r.u16()? as usize;
    let infos = (0..n).map(|_| r.u16()).collect::<Result<Vec<u16>, String>>()?;
    r.end()?;
    Ok((name, infos))
}

/// `NBD_OPT_{SET,LIST}_META_CONTEXT` payload: export name and context queries.
pub fn encode_meta_context(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    put_string32(&mut d, export);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        put_string32(&mut d, q);
    }
    d
}

pub fn parse_meta_context(data: &[u8]) -> Result<(String, Vec<String>), String> {
    let mut r = Bytes::new(data, "meta context payload");
    let export = r.string32()?;
    let n = r.u32()? as usize;
    // Each query takes at least 4 bytes: a count larger than the payload allows is a lie.
    if n > data.len() / 4 {
        return Err(format!("meta context payload claims {n} queries in {} bytes", data.len()));
    }
    let queries = (0..n).map(|_| r.string32()).collect::<Result<Vec<String>, String>>()?;
    r.end()?;
    Ok((export, queries))
}

pub fn put_string32(d: &mut Vec<u8>, s: &str) {
    d.extend_from_slice(&(s.len() as u32).to_be_bytes());
    d.extend_from_slice(s.as_bytes());
}

/// The header of a structured reply chunk (after its magic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub length: u32,
}

pub const CHUNK_HEADER_LEN: usize = 16;

impl ChunkHeader {
    pub fn parse(b: &[u8; CHUNK_HEADER_LEN]) -> ChunkHeader {
        let mut r = Bytes::new(b, "reply chunk");
        // Fixed-size input: these reads cannot fail.
        let flags = r.u16().unwrap_or(0);
        let kind = r.u16().unwrap_or(0);
        let cookie = r.u64().unwrap_or(0);
        let length = r.u32().unwrap_or(0);
        ChunkHeader { flags, kind, cookie, length }
    }

    pub fn encode(&self) -> [u8; 4 + CHUNK_HEADER_LEN] {
        let mut b = [0u8; 4 + CHUNK_HEADER_LEN];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// One extent of a block-status reply: a length and the context's status bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusExtent {
    pub length: u32,
    pub flags: u32,
}

/// A `NBD_REPLY_TYPE_BLOCK_STATUS` payload: the context id and its extents.
pub fn parse_block_status(payload: &[u8]) -> Result<(u32, Vec<StatusExtent>), String> {
    let mut r = Bytes::new(payload, "block status reply");
    let context = r.u32()?;
    if r.is_empty() || !(payload.len() - 4).is_multiple_of(8) {
        return Err(format!("block status reply of {} bytes is not a list of 8-byte extents", payload.len()));
    }
    let mut extents = Vec::with_capacity((payload.len() - 4) / 8);
    while !r.is_empty() {
        extents.push(StatusExtent { length: r.u32()?, flags: r.u32()? });
    }
    Ok((context, extents))
}

pub fn encode_block_status(context: u32, extents: &[StatusExtent]) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + 8 * extents.len());
    d.extend_from_slice(&context.to_be_bytes());
    for e in extents {
        d.extend_from_slice(&e.length.to_be_bytes());
        d.extend_from_slice(&e.flags.to_be_bytes());
    }
    d
}

/// An error chunk's payload: the error number and message (and the offset for `ERROR_OFFSET`).
pub fn parse_error_chunk(payload: &[u8]) -> Result<(u32, String), String> {
    let mut r = Bytes::new(payload, "error reply");
    let code = r.u32()?;
    let len = r.u16()? as usize;
    let msg = r.take(len)?;
    Ok((code, String::from_utf8_lossy(msg).into_owned()))
}

pub fn encode_error_chunk(code: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let mut d = Vec::with_capacity(6 + msg.len());
    d.extend_from_slice(&code.to_be_bytes());
    d.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    d.extend_from_slice(msg);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = Request { flags: CMD_FLAG_DF, command: CMD_READ, cookie: 7, offset: 1 << 40, length: 65536 };
        let b = r.encode();
        assert_eq!(Request::parse(&b).unwrap(), r);
        let mut bad = b;
        bad[0] ^= 1;
        assert!(Request::parse(&bad).unwrap_err().contains("magic"));
    }

    #[test]
    fn option_payloads_round_trip_and_reject_lies() {
        let go = encode_go("abc/disk0", &[INFO_BLOCK_SIZE]);
        assert_eq!(parse_go(&go).unwrap(), ("abc/disk0".to_string(), vec![INFO_BLOCK_SIZE]));
        assert!(parse_go(&go[..go.len() - 1]).is_err());
        let mc = encode_meta_context("x", &[BASE_ALLOCATION, "qemu:dirty-bitmap:b"]);
        let (e, q) = parse_meta_context(&mc).unwrap();
        assert_eq!((e.as_str(), q.len()), ("x", 2));
        let mut lie = encode_meta_context("", &[]);
        lie[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_context(&lie).is_err());
        let mut long = Vec::new();
        long.extend_from_slice(&(u32::MAX).to_be_bytes());
        assert!(parse_go(&long).is_err());
    }

    #[test]
    fn block_status_round_trip() {
        let ex = [StatusExtent { length: 4096, flags: STATE_HOLE | STATE_ZERO }, StatusExtent { length: 8, flags: 0 }];
        let d = encode_block_status(3, &ex);
        assert_eq!(parse_block_status(&d).unwrap(), (3, ex.to_vec()));
        assert!(parse_block_status(&d[..7]).is_err());
        assert!(parse_block_status(&d[..4]).is_err());
    }
}
