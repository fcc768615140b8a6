//! The NBD client against arbitrary server bytes: negotiation (greeting, options, meta contexts, `NBD_OPT_GO`
//! info), then reads and block status with simple and structured replies. A server is untrusted input: no
//! answer may panic, hang, or fill a read with bytes it did not send.
#![no_main]
use std::io::{Read, Write};

use diskvault::nbd::client::Connection;
use libfuzzer_sys::fuzz_target;

/// Reads come from the fuzz input; the client's requests are discarded.
struct Server(std::io::Cursor<Vec<u8>>);

impl Read for Server {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}
impl Write for Server {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let contexts = ["base:allocation".to_string(), "qemu:dirty-bitmap:b0".to_string()];
    let server = Server(std::io::Cursor::new(data.to_vec()));
    let Ok(mut c) = Connection::over_stream(server, "fuzz", "disk", &contexts) else { return };
    let size = c.info().size;
    let mut buf = vec![0u8; size.min(4096) as usize];
    let _ = c.read_at(0, &mut buf);
    for context in &contexts {
        if c.has_context(context) {
            if let Ok(extents) = c.extents_where(context, |flags| flags & 1 == 0) {
                let mut end = 0;
                for e in extents {
                    assert!(e.start >= end && e.length > 0 && e.start + e.length <= size, "{e:?} of {size}");
                    end = e.start + e.length;
                }
            }
        }
    }
    c.disconnect();
});
