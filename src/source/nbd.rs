//! NBD exports as disk sources: `nbd://host:port/export`, `nbd+unix:///export?socket=PATH` (and `nbds…` with
//! TLS).
//!
//! Full backups skip what `base:allocation` reports as reading zeros. With a dirty bitmap
//! (`qemu:dirty-bitmap:NAME`), [`DiskSource::changed`] returns its dirty ranges and the backup reads only those
//! (the same path as VMware's changed areas). Once the backup says which blocks it will read
//! ([`DiskSource::will_read`]), reads are pipelined: several requests in flight per connection, and several
//! connections when the server allows multi-conn, delivered in order through a bounded window.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};

use super::{BlockRanges, DiskSource, Extent, PlannedReads};
use crate::error::{Error, Result};
use crate::nbd::client::{finish_read, Address, Connection, TlsOptions};
use crate::nbd::proto::{BASE_ALLOCATION, STATE_DIRTY, STATE_ZERO};
use crate::util::AlignedBuf;

#[derive(Clone)]
pub struct NbdOptions {
    /// Read the dirty ranges of this bitmap (`qemu:dirty-bitmap:NAME`) as the changes since the parent.
    pub dirty_bitmap: Option<String>,
    /// Connections used when the server allows multi-conn.
    pub connections: usize,
    /// Requests in flight per connection.
    pub depth: usize,
    pub tls: TlsOptions,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions { dirty_bitmap: None, connections: 4, depth: 4, tls: TlsOptions::default() }
    }
}

pub struct NbdSource {
    address: Address,
    options: NbdOptions,
    /// The connection used for metadata and unplanned reads; moved into the read-ahead when it starts.
    conn: Option<Connection>,
    capacity: u64,
    readahead: Option<Readahead>,
}

fn bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

impl NbdSource {
    pub fn open(url: &str, options: &NbdOptions) -> Result<NbdSource> {
        let address = Address::parse(url).map_err(|e| Error::source(url.to_string(), e))?;
        let mut contexts = vec![BASE_ALLOCATION.to_string()];
        if let Some(b) = &options.dirty_bitmap {
            contexts.push(bitmap_context(b));
        }
        let conn = Connection::connect(&address, &contexts, &options.tls)?;
        if let Some(b) = &options.dirty_bitmap {
            if !conn.has_context(&bitmap_context(b)) {
                return Err(Error::source(
                    address.to_string(),
                    format!(
                        "the server does not export dirty bitmap {b:?} (qemu-nbd needs --bitmap {b}; \
                         the bitmap must exist in the image)"
                    ),
                ));
            }
        }
        let capacity = conn.info().size;
        Ok(NbdSource { address, options: options.clone(), conn: Some(conn), capacity, readahead: None })
    }

    fn conn(&mut self) -> Result<&mut Connection> {
        if self.conn.is_none() {
            self.conn = Some(Connection::connect(&self.address, &[], &self.options.tls)?);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }
}

impl DiskSource for NbdSource {
    fn kind(&self) -> &'static str {
        "nbd"
    }

    fn describe(&self) -> String {
        self.address.to_string()
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if let Some(ra) = &mut self.readahead {
            if let Some(data) = ra.take(offset, buf.len())? {
                buf.copy_from_slice(&data);
                ra.recycle(data);
                return Ok(());
            }
        }
        self.conn()?.read_at(offset, buf)
    }

    fn read_block(&mut self, offset: u64, len: usize, buf: &mut AlignedBuf) -> Result<()> {
        if let Some(ra) = &mut self.readahead {
            if let Some(data) = ra.take(offset, len)? {
                // The block read ahead becomes the pipeline's buffer; the pipeline's goes to the next read.
                ra.recycle(std::mem::replace(buf, AlignedBuf::from_vec(data)).into_storage());
                return Ok(());
            }
        }
        buf.resize(len);
        self.conn()?.read_at(offset, buf)
    }

    fn allocated(&mut self) -> Result<Option<Vec<Extent>>> {
        let conn = self.conn()?;
        if !conn.has_context(BASE_ALLOCATION) {
            return Ok(None);
        }
        // Ranges that read as zeros (holes or known zeros) need not be read.
        conn.extents_where(BASE_ALLOCATION, |flags| flags & STATE_ZERO == 0).map(Some)
    }

    fn changed(&mut self) -> Result<Option<Vec<Extent>>> {
        let Some(bitmap) = self.options.dirty_bitmap.clone() else { return Ok(None) };
        let conn = self.conn()?;
        conn.extents_where(&bitmap_context(&bitmap), |flags| flags & STATE_DIRTY != 0).map(Some)
    }

    fn will_read(&mut self, blocks: &BlockRanges, block_size: u64) {
        let Some(first) = self.conn.take() else { return };
        let multi = first.info().can_multi_conn();
        let mut conns = vec![first];
        if multi {
            for _ in 1..self.options.connections {
                match Connection::connect(&self.address, &[], &self.options.tls) {
                    Ok(c) => conns.push(c),
                    Err(e) => {
                        tracing::info!(
                            "{}: extra connection refused ({e}); reading with {}",
                            self.address,
                            conns.len()
                        );
                        break;
                    }
                }
            }
        }
        tracing::debug!(
            "{}: reading with {} connection(s), {} requests each",
            self.address,
            conns.len(),
            self.options.depth
        );
        self.readahead =
            Some(Readahead::start(conns, blocks.ranges().to_vec(), block_size, self.capacity, self.options.depth));
    }
}

type Delivery = (u64, u64, Result<Vec<u8>>);

/// Reads the planned blocks ahead on one thread per connection, at most `window` blocks beyond the consumer.
struct Readahead {
    results: Receiver<Delivery>,
    /// Buffers of consumed blocks, for the connections' next reads (a fresh one per read cost its zeroing).
    recycled: Sender<Vec<u8>>,
    /// One token per block the threads may read ahead; returned as blocks are consumed.
    tokens: Sender<()>,
    arrived: BTreeMap<u64, (u64, Result<Vec<u8>>)>,
    next_seq: u64,
}

impl Readahead {
    fn start(conns: Vec<Connection>, ranges: Vec<Range<u64>>, block_size: u64, capacity: u64, depth: usize) -> Self {
        let window = conns.len() * depth.max(1) * 2;
        let plan = Arc::new(Mutex::new(PlannedReads::new(ranges, block_size, capacity)));
        let (token_tx, token_rx) = crossbeam_channel::bounded(window);
        for _ in 0..window {
            token_tx.send(()).expect("fresh channel has room");
        }
        let (result_tx, result_rx) = crossbeam_channel::unbounded();
        let (recycled_tx, recycled_rx) = crossbeam_channel::bounded(window);
        for (i, conn) in conns.into_iter().enumerate() {
            let (plan, tokens, results, buffers) =
                (plan.clone(), token_rx.clone(), result_tx.clone(), recycled_rx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-read-{i}"))
                .spawn(move || connection_reader(conn, plan, tokens, results, buffers, depth.max(1)));
            if let Err(e) = spawned {
                tracing::warn!("cannot start an NBD reader thread: {e}");
            }
        }
        Readahead { results: result_rx, recycled: recycled_tx, tokens: token_tx, arrived: BTreeMap::new(), next_seq: 0 }
    }

    /// A buffer for the connections to read into again.
    fn recycle(&self, buf: Vec<u8>) {
        let _ = self.recycled.try_send(buf);
    }

    /// The next planned block if it is the one at `offset`; `None` if the reads left the plan.
    fn take(&mut self, offset: u64, len: usize) -> Result<Option<Vec<u8>>> {
        let seq = self.next_seq;
        while !self.arrived.contains_key(&seq) {
            match self.results.recv() {
                Ok((s, off, r)) => {
                    self.arrived.insert(s, (off, r));
                }
                Err(_) => return Ok(None), // every reader ended: the plan is done
            }
        }
        let (at, result) = self.arrived.remove(&seq).expect("present");
        self.next_seq += 1;
        let _ = self.tokens.try_send(());
        let data = result?;
        if at != offset || data.len() != len {
            tracing::debug!("read at {offset} is not the planned read at {at}; reading directly");
            return Ok(None);
        }
        Ok(Some(data))
    }
}

/// One connection's thread: takes planned reads, keeps up to `depth` in flight, delivers the replies.
fn connection_reader(
    mut conn: Connection,
    plan: Arc<Mutex<PlannedReads>>,
    tokens: Receiver<()>,
    results: Sender<Delivery>,
    buffers: Receiver<Vec<u8>>,
    depth: usize,
) {
    let mut pending = HashMap::new();
    // cookie -> (seq, offset)
    let mut in_flight: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut exhausted = false;
    loop {
        while !exhausted && in_flight.len() < depth {
            let token = if in_flight.is_empty() { tokens.recv().ok() } else { tokens.try_recv().ok() };
            if token.is_none() {
                if in_flight.is_empty() {
                    return; // the consumer is gone
                }
                break;
            }
            let Some((seq, offset, len)) = plan.lock().unwrap_or_else(|p| p.into_inner()).next() else {
                exhausted = true;
                break;
            };
            match conn.send_read_into(offset, len, buffers.try_recv().unwrap_or_default(), &mut pending) {
                Ok(cookie) => {
                    in_flight.insert(cookie, (seq, offset));
                }
                Err(e) => {
                    let _ = results.send((seq, offset, Err(e)));
                    fail_all(&conn, &mut in_flight, &results);
                    return;
                }
            }
        }
        if in_flight.is_empty() {
            conn.disconnect();
            return;
        }
        match conn.receive(&mut pending) {
            Ok(Some(cookie)) => {
                let p = pending.remove(&cookie).expect("completed request is pending");
                if let Some((seq, offset)) = in_flight.remove(&cookie) {
                    if results.send((seq, offset, finish_read(conn.address(), p))).is_err() {
                        return;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                let msg = e.to_string();
                for (_, (seq, offset)) in in_flight.drain() {
                    let _ = results.send((seq, offset, Err(Error::source(conn.address().to_string(), msg.clone()))));
                }
                return;
            }
        }
    }
}

fn fail_all(conn: &Connection, in_flight: &mut HashMap<u64, (u64, u64)>, results: &Sender<Delivery>) {
    for (_, (seq, offset)) in in_flight.drain() {
        let _ = results.send((seq, offset, Err(Error::source(conn.address().to_string(), "the connection failed"))));
    }
}
