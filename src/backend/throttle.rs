//! Bandwidth limits (`--limit-upload`, `--limit-download`): one token bucket per direction, shared by every
//! request of the process. Data is paid for in pieces of at most [`PIECE`] bytes as it goes to or comes from
//! the storage (the S3 backend streams uploads piece by piece; the local one writes and reads them), so the
//! rate is even at the scale of a piece rather than bursting an object at a time.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The unit of pacing.
pub const PIECE: usize = 64 << 10;

/// A token bucket of `bytes_per_sec`, holding at most an eighth of a second's worth (and at least a piece):
/// an idle period does not turn into a burst.
#[derive(Debug)]
pub struct Throttle {
    bytes_per_sec: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Throttle {
    pub fn new(bytes_per_sec: u64) -> Throttle {
        let rate = bytes_per_sec.max(1) as f64;
        let burst = (rate / 8.0).max(PIECE as f64);
        Throttle { bytes_per_sec: rate, burst, state: Mutex::new((burst, Instant::now())) }
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec as u64
    }

    /// Takes `n` bytes from the bucket; returns how long the caller must wait before it moves more (the
    /// bucket goes into debt, so concurrent callers queue up behind each other in order).
    pub fn reserve(&self, n: usize) -> Duration {
        self.reserve_at(n, Instant::now())
    }

    /// [`Throttle::reserve`] at the time `now` (not before the last call's).
    fn reserve_at(&self, n: usize, now: Instant) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (available, last) = *s;
        let available =
            (available + now.saturating_duration_since(last).as_secs_f64() * self.bytes_per_sec).min(self.burst);
        let left = available - n as f64;
        *s = (left, now);
        if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-left / self.bytes_per_sec)
        }
    }

    /// [`Throttle::reserve`], then the wait, on this thread.
    pub fn pace(&self, n: usize) {
        let wait = self.reserve(n);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// The limits of one storage location; none by default.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    pub upload: Option<Arc<Throttle>>,
    pub download: Option<Arc<Throttle>>,
}

impl Limits {
    /// Limits in bytes per second.
    pub fn new(upload: Option<u64>, download: Option<u64>) -> Limits {
        Limits {
            upload: upload.map(|r| Arc::new(Throttle::new(r))),
            download: download.map(|r| Arc::new(Throttle::new(r))),
        }
    }
}

/// Parses a rate: a number of KiB/s as restic takes it (`4096`), or bytes per second with a binary suffix
/// (`500K`, `20M`, `1G`; `/s` and a trailing `iB` or `B` allowed).
pub fn parse_rate(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (digits, unit) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => t.split_at(i),
        None => (t, "K"),
    };
    let shift = match unit.to_ascii_uppercase().as_str() {
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("{s:?}: the unit must be K, M or G (bytes per second), or none for KiB/s")),
    };
    let n: f64 = digits.trim().parse().map_err(|_| format!("{s:?}: not a number"))?;
    let rate = n * (1u64 << shift) as f64;
    if !(1024.0..1e15).contains(&rate) {
        return Err(format!("{s:?}: a rate from 1 KiB/s on"));
    }
    Ok(rate as u64)
}

/// A reader or writer that moves at most a piece per call and pays for it: reads after receiving it,
/// writes before sending it. Without a throttle it passes calls through.
pub struct Paced<'a, T> {
    inner: T,
    throttle: Option<&'a Throttle>,
}

impl<'a, T> Paced<'a, T> {
    pub fn new(inner: T, throttle: Option<&'a Throttle>) -> Self {
        Paced { inner, throttle }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: Read> Read for Paced<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(t) = self.throttle else { return self.inner.read(buf) };
        let n = buf.len().min(PIECE);
        let got = self.inner.read(&mut buf[..n])?;
        t.pace(got);
        Ok(got)
    }
}

impl<T: Write> Write for Paced<'_, T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(t) = self.throttle else { return self.inner.write(buf) };
        let n = buf.len().min(PIECE);
        t.pace(n);
        self.inner.write(&buf[..n])
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_as_restic_and_with_units() {
        assert_eq!(parse_rate("4096"), Ok(4 << 20));
        assert_eq!(parse_rate("500K"), Ok(500 << 10));
        assert_eq!(parse_rate("20M"), Ok(20 << 20));
        assert_eq!(parse_rate("20MiB/s"), Ok(20 << 20));
        assert_eq!(parse_rate("1.5G"), Ok(3 << 29));
        assert_eq!(parse_rate("2 m"), Ok(2 << 20));
        for bad in ["", "fast", "10X", "0", "0.5", "-3M"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_bucket_goes_into_debt_and_refills_at_its_rate() {
        let t = Throttle::new(1 << 20);
        let t0 = t.state.lock().unwrap().1;
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let close = |d: Duration, ms: f64| (d.as_secs_f64() * 1000.0 - ms).abs() < 0.01;
        // The burst (a piece or an eighth of a second, here 128 KiB) is free; beyond it, the debt is waited out.
        assert_eq!(t.reserve_at(128 << 10, at(0)), Duration::ZERO);
        let wait = t.reserve_at(512 << 10, at(0));
        assert!(close(wait, 500.0), "{wait:?}");
        // The next caller queues behind the debt: 64 KiB more is 62.5 ms more.
        assert!(close(t.reserve_at(PIECE, at(0)), 562.5));
        // Time pays it back at the rate: 562.5 ms later the bucket is even, and an idle second refills only
        // the burst, not a second's worth.
        assert_eq!(t.reserve_at(0, at(563)), Duration::ZERO);
        assert_eq!(t.reserve_at(128 << 10, at(1563)), Duration::ZERO);
        assert!(close(t.reserve_at(128 << 10, at(1563)), 125.0));
    }
}
