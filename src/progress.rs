//! Progress reporting shared by long operations: a bar with rate and ETA on a terminal, a line every few
//! seconds otherwise, nothing when quiet. The engine only bumps atomic counters; a reporter thread draws.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Bar on a terminal, periodic lines otherwise.
    Auto,
    Quiet,
}

/// Counters an operation updates as it goes.
#[derive(Default)]
pub struct Counters {
    /// Bytes to process in total (may grow while the operation plans).
    pub total: AtomicU64,
    /// Bytes processed so far.
    pub done: AtomicU64,
    /// Bytes newly written to the repository (after dedup, compression).
    pub stored: AtomicU64,
    /// New blocks sealed in the form the source repository of a copy stored them, not compressed again.
    pub sealed_as_stored: AtomicU64,
}

impl Counters {
    pub fn add_total(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_done(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_stored(&self, n: u64) {
        self.stored.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_sealed_as_stored(&self, n: u64) {
        self.sealed_as_stored.fetch_add(n, Ordering::Relaxed);
    }
}

/// Draws progress until dropped.
pub struct Reporter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reporter {
    pub fn start(label: &str, counters: Arc<Counters>, mode: Mode) -> Reporter {
        let stop = Arc::new(AtomicBool::new(false));
        if mode == Mode::Quiet {
            return Reporter { stop, thread: None };
        }
        let tty = std::io::stderr().is_terminal();
        let label = label.to_string();
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            if tty {
                draw_bar(&label, &counters, &stop2)
            } else {
                print_lines(&label, &counters, &stop2)
            }
        });
        Reporter { stop, thread: Some(thread) }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn draw_bar(label: &str, c: &Counters, stop: &AtomicBool) {
    let bar = indicatif::ProgressBar::new(c.total.load(Ordering::Relaxed));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    while !stop.load(Ordering::Relaxed) {
        bar.set_length(c.total.load(Ordering::Relaxed));
        bar.set_position(c.done.load(Ordering::Relaxed));
        bar.set_message(format!("stored {}", crate::util::human_bytes(c.stored.load(Ordering::Relaxed))));
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
}

fn print_lines(label: &str, c: &Counters, stop: &AtomicBool) {
    let start = Instant::now();
    let mut next = start + Duration::from_secs(10);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if Instant::now() < next {
            continue;
        }
        next += Duration::from_secs(10);
        let done = c.done.load(Ordering::Relaxed);
        let total = c.total.load(Ordering::Relaxed).max(1);
        let secs = start.elapsed().as_secs_f64().max(0.001);
        eprintln!(
            "{label}: {} of {} ({:.0}%), {}/s, stored {}",
            crate::util::human_bytes(done),
            crate::util::human_bytes(total),
            done as f64 * 100.0 / total as f64,
            crate::util::human_bytes((done as f64 / secs) as u64),
            crate::util::human_bytes(c.stored.load(Ordering::Relaxed)),
        );
    }
}
