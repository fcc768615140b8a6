//! Small helpers shared by several modules: UTC times, SIGINT/SIGTERM handling, certificate files for TLS, and
//! [`AlignedBuf`], the page-aligned buffer that O_DIRECT reads and writes (source blocks, restored blocks) go
//! through.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// (seconds, nanoseconds) since the Unix epoch.
pub fn now_time() -> (i64, u32) {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

pub fn username() -> String {
    std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into())
}

/// Replaces the local file `path` with `data` through the temporary file `tmp` (same directory), so a reader
/// or a crash sees the old file or the new one, never a part. `durable`: synced, and the rename too.
pub fn replace_file(path: &std::path::Path, tmp: &std::path::Path, data: &[u8], durable: bool) -> std::io::Result<()> {
    let written = std::fs::File::create(tmp).and_then(|mut f| {
        std::io::Write::write_all(&mut f, data)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(tmp, path)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    written?;
    if durable {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `1 snapshot`, `2 snapshots`: a count and its noun, for people (nouns whose plural takes an `s`).
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `1.50 GiB`-style sizes for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Local time is not needed: snapshots print in UTC, as `2026-11-22 04:38:03`.
pub fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Parses `YYYY-MM-DD[ HH:MM[:SS]]` (UTC) into Unix seconds.
pub fn parse_utc(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date, time) = s.split_once([' ', 'T']).unwrap_or((s, "00:00:00"));
    let d: Vec<i64> = date.split('-').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let t: Vec<i64> = time.trim_end_matches('Z').split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let [y, m, day] = d[..] else { return None };
    let (hh, mm, ss) = match t[..] {
        [h, m] => (h, m, 0),
        [h, m, s] => (h, m, s),
        _ => return None,
    };
    if !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || !(0..24).contains(&hh)
        || !(0..60).contains(&mm)
        || !(0..61).contains(&ss)
    {
        return None;
    }
    Some(days_from_civil(y, m as u32, day as u32) * 86400 + hh * 3600 + mm * 60 + ss)
}

/// Howard Hinnant's civil-to-days algorithm.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Howard Hinnant's days-to-civil algorithm: (year, month, day) of a day number since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Decodes `%XX` escapes (URIs of NBD exports and VDDK disks).
pub fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad percent escape in {s:?}"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 after decoding"))
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The crypto behind every TLS connection (rustls with ring, the assembly AES-GCM also uses).
pub fn tls_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (at least one). The error names the file.
pub fn read_pem_certs(path: &std::path::Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

/// The certificates of a CA file, as trust anchors. The error names the file.
pub fn load_ca_file(path: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_pem_certs(path)? {
        roots.add(c).map_err(|e| format!("CA file {}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// Whether SIGINT or SIGTERM arrived since [`catch_interrupts`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Blocks SIGINT and SIGTERM in the calling thread (and the threads it starts later), so that one thread can
/// take them with `sigwait` on the returned set.
pub fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: plain signal-mask calls on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Turns SIGINT/SIGTERM into a flag that long operations poll ([`interrupted`]), so that they stop through
/// their normal error path and clean up (a VM snapshot removed, VDDK access ended, session marker deleted).
/// A second signal ends the process at once. Call before starting threads: they inherit the signal mask.
pub fn catch_interrupts() {
    let set = block_termination_signals();
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialized, `sig` is a valid out pointer.
        unsafe { libc::sigwait(&set, &mut sig) };
        if INTERRUPTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("interrupted: stopping and cleaning up (again to quit at once)");
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch for interrupts: {e}");
    }
}

/// The cores this process may use (2 if the system cannot tell): the default number of worker threads.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Alignment of [`AlignedBuf`] data: a page, what O_DIRECT reads and writes of 512- and 4096-byte sectors need.
pub const BUF_ALIGN: usize = 4096;

/// Bytes at a page-aligned address, so that they can be read or written with O_DIRECT as they are: source blocks
/// (backup), blob plaintexts (restore), pack ranges (restore, check). Reused, it is not zeroed again.
#[derive(Default)]
pub struct AlignedBuf {
    /// `buf[start..]` is the content; `buf[..start]` pads the start to [`BUF_ALIGN`].
    buf: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let mut b = AlignedBuf::default();
        b.resize(len);
        b
    }

    /// A buffer holding `v`, as it is (not aligned: [`AlignedBuf::resize`] realigns it, moving it, if a reader
    /// needs that).
    pub(crate) fn from_vec(v: Vec<u8>) -> AlignedBuf {
        AlignedBuf { buf: v, start: 0 }
    }

    /// The storage, for another buffer's use: its content (alignment padding included) is of no interest.
    pub(crate) fn into_storage(self) -> Vec<u8> {
        self.buf
    }

    /// Makes the block `len` bytes long for a read to fill: what it held before stays (a reused buffer is not
    /// zeroed again), only growth is zero-filled. (An `extend_from_slice` past the capacity moved the vector: the
    /// start is then realigned.)
    pub fn resize(&mut self, len: usize) {
        if self.buf.capacity() < len + BUF_ALIGN
            || !self.buf.as_ptr().wrapping_add(self.start).addr().is_multiple_of(BUF_ALIGN)
        {
            self.clear(len);
        }
        self.buf.resize(self.start + len, 0);
    }

    /// Empties the block, making room for `len` bytes at an aligned start.
    pub(crate) fn clear(&mut self, len: usize) {
        if self.buf.capacity() < len + BUF_ALIGN {
            self.buf = Vec::with_capacity(len + BUF_ALIGN);
        }
        self.start = self.buf.as_ptr().align_offset(BUF_ALIGN);
        self.buf.clear();
        self.buf.resize(self.start, 0);
    }

    pub(crate) fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// A zstd output buffer over the block's spare room.
    pub(crate) fn writer(&mut self) -> AlignedBufWriter<'_> {
        AlignedBufWriter(self)
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..]
    }
}

/// Spare buffers ([`AlignedBuf`]s, pack buffers) for reuse by threads that fill buffer after buffer: a fresh
/// megabyte costs a page fault and a page clearing per 4 KiB when first written, a reused one nothing. Bounded: a
/// buffer given back to a full pool is freed. Clones share the pool.
pub struct BufferPool<T = AlignedBuf> {
    tx: crossbeam_channel::Sender<T>,
    rx: crossbeam_channel::Receiver<T>,
}

impl<T> Clone for BufferPool<T> {
    fn clone(&self) -> Self {
        BufferPool { tx: self.tx.clone(), rx: self.rx.clone() }
    }
}

impl<T: Default> BufferPool<T> {
    /// A pool keeping up to `capacity` spare buffers.
    pub fn new(capacity: usize) -> BufferPool<T> {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        BufferPool { tx, rx }
    }

    /// A spare buffer (its old content is of no interest), or a new empty one.
    pub fn take(&self) -> T {
        self.rx.try_recv().unwrap_or_default()
    }

    /// Gives `buf` back for reuse.
    pub fn give(&self, buf: T) {
        let _ = self.tx.try_send(buf);
    }

    /// Gives `buf` back if no one else holds it.
    pub fn give_shared(&self, buf: std::sync::Arc<T>) {
        if let Ok(b) = std::sync::Arc::try_unwrap(buf) {
            self.give(b);
        }
    }
}

/// zstd writes an [`AlignedBuf`]'s content straight after its alignment padding.
pub(crate) struct AlignedBufWriter<'a>(&'a mut AlignedBuf);

// SAFETY: the pointer and capacity describe the vector's allocation past `start`, where `filled_until` is only
// called after zstd initialised `n` bytes there (the trait's contract).
unsafe impl zstd::zstd_safe::WriteBuf for AlignedBufWriter<'_> {
    fn as_slice(&self) -> &[u8] {
        &self.0.buf[self.0.start..]
    }
    fn capacity(&self) -> usize {
        self.0.buf.capacity() - self.0.start
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: `start` is within the allocation (it is at most the vector's length).
        unsafe { self.0.buf.as_mut_ptr().add(self.0.start) }
    }
    unsafe fn filled_until(&mut self, n: usize) {
        // SAFETY: the caller initialised `n` bytes from `as_mut_ptr`, within the capacity.
        unsafe { self.0.buf.set_len(self.0.start + n) }
    }
}

/// Parses a duration in seconds: `30d`, `12h`, `2w`, `6m` (30-day months), `1y` (365 days), `45min`, `90s`,
/// or combinations like `1y6m` and `1h30min`.
pub fn parse_duration(s: &str) -> std::result::Result<i64, String> {
    let bad = || format!("{s:?}: expected a duration like 30d, 12h, 2w, 6m, 1y, 45min or 90s");
    let mut total = 0i64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: i64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "s" => 1,
            "min" => 60,
            "h" => 3600,
            "d" => 86400,
            "w" => 7 * 86400,
            "m" => 30 * 86400,
            "y" => 365 * 86400,
            u => return Err(format!("{s:?}: unknown unit {u:?} (use s, min, h, d, w, m for months, y)")),
        };
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
        rest = &rest[unit_len..];
    }
    if total == 0 {
        return Err(bad());
    }
    Ok(total)
}

/// Runs `f` with a rayon pool of `threads` threads named `name-N`, and joins them before returning. A dropped
/// rayon pool ends its threads in the background, and a thread that looked up the RocksDB index cache runs
/// RocksDB's thread-local destructors as it ends, which lock mutexes that the process's exit destroys: ended
/// that way, the process could abort ("pthread lock: Invalid argument") or crash after its work was done.
pub fn with_thread_pool<R>(
    threads: usize,
    name: &'static str,
    f: impl FnOnce(&rayon::ThreadPool) -> R,
) -> crate::error::Result<R> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .build_scoped(|thread| thread.run(), f)
        .map_err(|e| crate::error::Error::invalid(format!("thread pool: {e}")))
}

/// Storage requests in flight at once where many small ones are made (index files, snapshots, manifest segments,
/// pack headers, deletions, retention): each mostly waits for its round trip, so many more than cores. On S3 with
/// a 20 ms round trip (benches/lagproxy.py) and 60 snapshots on 2 cores, `check` took 12.7 s reading one segment
/// at a time, 6.1 s reading each distinct segment once two at a time, 1.5-1.7 s with this many; `prune` 10.4 s
/// reading its index files one at a time, 2.3 s.
pub const REQUESTS_IN_FLIGHT: usize = 16;

/// One glibc malloc arena for all threads. glibc gives each thread its own arena (up to 8 per core), and each
/// keeps what its thread freed apart from the others, so commands that decode many large objects on many
/// threads held far more than they used:
/// - building the index cache of 3 million blobs (any command's first use of a large repository on a host):
///   a 4 MiB backup into the synthetic repository peaked at 273 MB, with one arena at 182 MB, in 7.8-7.9 s both;
/// - `copy`: each snapshot is copied by a new set of pipeline threads; the benchmark's three snapshots in one
///   run peaked at 358-380 MiB, each alone at 200-227 MiB; with one arena 209-214 MiB (two: 200-266);
/// - `prune`: index files and segments decoded on 16 request threads (see `benches/results/prune-scale.txt`).
///
/// The lock is not contended: the pipelines allocate a few buffers per 1 MiB block. On the 4 GiB benchmark's
/// images, full backup (2.27-2.60 s), CBT incremental (0.45-0.51 s) and restore (1.61-1.72 s) took the same
/// time with one arena as with glibc's default, run alternately. The command line sets it for every command;
/// the library leaves the process's allocator alone.
///
/// Call it before any thread starts.
pub fn limit_allocator_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Runs `f`, parallel iterators over storage requests, on [`REQUESTS_IN_FLIGHT`] threads rather than on rayon's
/// global pool of one thread per core.
pub fn with_request_threads<R: Send>(f: impl FnOnce() -> R + Send) -> crate::error::Result<R> {
    with_thread_pool(REQUESTS_IN_FLIGHT, "requests", |pool| pool.install(f))
}

/// Fetches `items` on [`REQUESTS_IN_FLIGHT`] threads, a chunk of that many at a time, and hands each result to
/// `each` on this thread, in order: for long runs of storage requests whose results are taken one by one (no
/// more than a chunk of them is held at once). Stops at the first error `each` returns.
pub fn fetch_in_order<T: Sync, R: Send>(
    items: &[T],
    fetch: impl Fn(&T) -> R + Sync + Send,
    each: impl FnMut(&T, R) -> crate::error::Result<()>,
) -> crate::error::Result<()> {
    fetch_batches_in_order(items.chunks(REQUESTS_IN_FLIGHT), fetch, each)
}

/// [`fetch_in_order`] in the batches given (each fetched at once, on up to [`REQUESTS_IN_FLIGHT`] threads): for
/// objects of very different sizes, batches bounded in bytes as well ([`crate::repository::index_load_batches`]).
pub fn fetch_batches_in_order<'a, T: Sync + 'a, R: Send>(
    batches: impl IntoIterator<Item = &'a [T]>,
    fetch: impl Fn(&T) -> R + Sync + Send,
    mut each: impl FnMut(&T, R) -> crate::error::Result<()>,
) -> crate::error::Result<()> {
    use rayon::prelude::*;
    with_thread_pool(REQUESTS_IN_FLIGHT, "requests", |pool| {
        for chunk in batches {
            let fetched: Vec<R> = pool.install(|| chunk.par_iter().map(&fetch).collect());
            for (item, r) in chunk.iter().zip(fetched) {
                each(item, r)?;
            }
        }
        Ok(())
    })?
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        assert_eq!(super::parse_duration("1y6m").unwrap(), 365 * 86400 + 180 * 86400);
        assert_eq!(super::parse_duration("12h").unwrap(), 43200);
        assert!(super::parse_duration("5").is_err());
        assert!(super::parse_duration("3x").is_err());
        assert_eq!(super::parse_duration("1h30min").unwrap(), 5400);
        assert_eq!(super::parse_duration("90s").unwrap(), 90);
        for bad in ["", "h", "0d", "5 d", "1.5h", "99999999999999999999y"] {
            assert!(super::parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn utc_format() {
        assert_eq!(super::format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::format_utc(1_795_322_283), "2026-11-22 04:38:03");
        assert_eq!(super::parse_utc("2026-11-22 04:38:03"), Some(1_795_322_283));
        assert_eq!(super::parse_utc("1970-01-01"), Some(0));
        assert_eq!(super::parse_utc("2024-02-29T12:00"), Some(1_709_208_000));
        assert_eq!(super::parse_utc("2026-13-01"), None);
    }

    /// A buffer given back is the next one taken, allocation and all; one still shared elsewhere is not taken
    /// back, and a full pool frees what it has no room for.
    #[test]
    fn buffer_pool_hands_back_what_it_was_given() {
        use super::{AlignedBuf, BufferPool};
        use std::sync::Arc;
        let pool = BufferPool::<AlignedBuf>::new(1);
        assert!(pool.take().is_empty());
        let mut b = pool.take();
        b.resize(1 << 20);
        let at = b.as_ptr();
        pool.give(b);
        let mut other = AlignedBuf::default();
        other.resize(4096);
        pool.give(other);
        let again = pool.take();
        assert_eq!(again.as_ptr(), at, "the first buffer given back, not a new one nor the one the full pool refused");
        assert!(pool.take().is_empty(), "the pool kept one buffer");
        let shared = Arc::new(again);
        let holder = shared.clone();
        pool.give_shared(shared);
        assert!(pool.take().is_empty(), "a buffer someone else still reads is not reused");
        pool.give_shared(holder);
        assert_eq!(pool.take().as_ptr(), at);
    }
}
