//! The NBD server against arbitrary client bytes (negotiation and transmission), over an in-memory stream and
//! an in-memory disk; and the protocol's pure parsers on the same bytes. Clients are untrusted input: no input
//! may panic, hang or make the server allocate beyond its limits.
#![no_main]
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use diskvault::nbd::proto;
use diskvault::nbd::server::{serve_connection, Admission, Device, Exports, Stream};
use libfuzzer_sys::fuzz_target;

/// Reads come from the fuzz input; writes are discarded.
#[derive(Clone)]
struct Input(Arc<Mutex<std::io::Cursor<Vec<u8>>>>);

impl Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().read(buf)
    }
}
impl Write for Input {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl Stream for Input {
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.clone()))
    }
    fn shutdown_both(&self) {}
}

struct Disk(Mutex<Vec<u8>>);

impl Device for Disk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn writable(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> diskvault::Result<()> {
        let d = self.0.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> diskvault::Result<()> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> diskvault::Result<()> {
        Ok(())
    }
    fn zero_extents(&self, offset: u64, len: u64) -> diskvault::Result<Vec<(u64, bool)>> {
        let d = self.0.lock().unwrap();
        let end = (offset + len) as usize;
        let mut out = Vec::new();
        let mut pos = offset as usize;
        while pos < end {
            let next = ((pos / 4096 + 1) * 4096).min(end);
            out.push(((next - pos) as u64, d[pos..next].iter().all(|&b| b == 0)));
            pos = next;
        }
        Ok(out)
    }
}

struct OneExport(Arc<Disk>);

impl Exports for OneExport {
    fn list(&self) -> diskvault::Result<Vec<(String, String)>> {
        Ok(vec![("disk".into(), "a fuzzed disk".into())])
    }
    fn open(&self, name: &str) -> diskvault::Result<Option<Arc<dyn Device>>> {
        Ok((name == "disk").then(|| self.0.clone() as Arc<dyn Device>))
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = proto::parse_go(data);
    let _ = proto::parse_meta_context(data);
    let _ = proto::parse_block_status(data);
    let _ = proto::parse_error_chunk(data);
    if let Ok(head) = <&[u8; proto::REQUEST_LEN]>::try_from(data.get(..proto::REQUEST_LEN).unwrap_or(&[])) {
        let _ = proto::Request::parse(head);
    }
    let disk = Arc::new(Disk(Mutex::new(vec![0u8; 256 << 10])));
    let stream = Input(Arc::new(Mutex::new(std::io::Cursor::new(data.to_vec()))));
    serve_connection(Box::new(stream), &OneExport(disk), "fuzz", &Admission::default());
});
