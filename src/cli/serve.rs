//! `diskvault serve`: snapshot disks as NBD exports until interrupted.

use std::path::PathBuf;
use std::sync::Arc;

use super::Globals;
use crate::error::{Error, Result};
use crate::nbd::server::{serve_connection, Admission, ConnectionCount, Exports, Stream};
use crate::serve::{RepositoryExports, ServeOptions};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// TCP address to listen on (`HOST:PORT`; port 0 picks a free one). Default 127.0.0.1:10809 unless
    /// --socket is given.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Unix socket to listen on (created; removed at exit).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Serve only these snapshots (id or prefix, or `latest`; repeatable).
    #[arg(long = "snapshot", value_name = "ID")]
    snapshots: Vec<String>,
    /// Serve only snapshots of this source.
    #[arg(long)]
    name: Option<String>,
    /// Accept writes: each export gets a local copy-on-write overlay (the repository is never written;
    /// the overlay is discarded when serve exits, unless --keep-overlays).
    #[arg(long)]
    writable: bool,
    /// Directory for the overlay files of --writable.
    #[arg(long, value_name = "DIR")]
    overlay_dir: Option<PathBuf>,
    /// Keep the overlays of --writable in --overlay-dir, and continue them when serve serves the same disks
    /// again (writes a client flushed survive a restart or a crash of serve). Delete the files to discard.
    #[arg(long, requires_all = ["writable", "overlay_dir"])]
    keep_overlays: bool,
    /// Memory for decrypted blocks, shared by all exports.
    #[arg(long, default_value = "256M", value_parser = super::prune::parse_size)]
    cache_size: u64,
    /// Blocks (1 MiB each) a sequential reader gets fetched ahead of it at most, in the background, in windows
    /// growing from 8 blocks (1: none).
    #[arg(long, default_value_t = crate::serve::DEFAULT_READAHEAD_BLOCKS, value_parser = clap::value_parser!(u64).range(1..=256))]
    readahead: u64,
    /// Most clients connected at once.
    #[arg(long, default_value_t = 64)]
    max_clients: usize,
    /// Disconnect a client that has not chosen an export this many seconds after connecting (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    handshake_limit: u64,
    /// Require TLS, with this certificate (PEM, the server's first, then its chain). Clients connect with
    /// `nbds://` or qemu's `tls-creds`.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// With TLS, admit only clients whose certificate this CA signed (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

/// What every client connection is served with.
struct Clients {
    exports: RepositoryExports,
    count: Arc<ConnectionCount>,
    max: usize,
    admission: Admission,
}

pub fn run(g: &Globals, args: &ServeArgs) -> Result<()> {
    if args.listen.is_some() && args.socket.is_some() {
        return Err(Error::invalid("give --listen or --socket, not both"));
    }
    // SIGINT/SIGTERM are taken by sigwait below; blocked before any thread starts, so every thread inherits it.
    let signals = crate::util::block_termination_signals();
    return_freed_blobs_to_the_system();
    let repo = g.open_repo()?;
    super::caches::note_old_caches(g, &repo);
    let cache = crate::cache::IndexCache::open_unsynced(&repo, &g.cache_root())?;
    // A session for as long as blobs may be read: a prune running meanwhile keeps the packs we might need.
    let session = crate::lock::start_session(&repo, "serve")?;
    cache.sync(&repo)?;
    // Backups on this host keep writing the shared cache while serve runs.
    let cache = std::sync::Arc::new(cache.into_reader(&repo)?);
    let mut snapshots = Vec::new();
    for s in &args.snapshots {
        snapshots.push(repo.find_snapshot(s, args.name.as_deref())?.0);
    }
    let opts = ServeOptions {
        writable: args.writable,
        overlay_dir: args.overlay_dir.clone().unwrap_or_else(std::env::temp_dir),
        keep_overlays: args.keep_overlays,
        cache_bytes: args.cache_size,
        readahead_blocks: args.readahead,
        snapshots,
        source: args.name.clone(),
        session_lost: Some(session.lost_flag()),
        keep_stored_forms: false,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(crate::nbd::tls::server_config(cert, key, args.tls_client_ca.as_deref()).map_err(Error::invalid)?)
        }
        _ => None,
    };
    let exports = RepositoryExports::new(repo, cache, opts);
    for (path, snapshot) in exports.orphaned_overlays()? {
        tracing::warn!(
            "{}: a kept overlay of snapshot {}, which is no longer in the repository: nothing serves its writes \
             any more; delete it and its .map once they are not needed",
            path.display(),
            snapshot.short()
        );
    }
    let names = exports.list()?;
    let handshake_limit = (args.handshake_limit > 0).then(|| std::time::Duration::from_secs(args.handshake_limit));
    let admission = Admission { tls, handshake_limit };
    let clients = Arc::new(Clients { exports, count: Arc::default(), max: args.max_clients.max(1), admission });

    let (address, socket_path) = if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
        let listener = std::os::unix::net::UnixListener::bind(path)
            .map_err(|e| Error::local(path, format!("cannot listen: {e}")))?;
        let scheme = if clients.admission.tls.is_some() { "nbds+unix" } else { "nbd+unix" };
        let clients = clients.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => spawn_client(Box::new(s), "unix client".into(), &clients),
                    Err(e) => tracing::warn!("accept: {e}"),
                }
            }
        });
        (format!("{scheme}:///EXPORT?socket={}", path.display()), Some(path.clone()))
    } else {
        let addr = args.listen.clone().unwrap_or_else(|| "127.0.0.1:10809".into());
        let listener =
            std::net::TcpListener::bind(&addr).map_err(|e| Error::invalid(format!("cannot listen on {addr}: {e}")))?;
        let local = listener.local_addr().map_err(|e| Error::invalid(e.to_string()))?;
        if clients.admission.tls.is_none() && !local.ip().is_loopback() {
            tracing::warn!(
                "serving decrypted disks without TLS to anyone who can reach {local}: see --tls-cert and --tls-client-ca"
            );
        }
        let scheme = if clients.admission.tls.is_some() { "nbds" } else { "nbd" };
        let clients = clients.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "client".into());
                        spawn_client(Box::new(s), peer, &clients);
                    }
                    Err(e) => tracing::warn!("accept: {e}"),
                }
            }
        });
        (format!("{scheme}://{local}/EXPORT"), None)
    };
    println!(
        "serving {} at {address}{}",
        crate::util::count(names.len(), "export"),
        if args.writable { " (writable overlays)" } else { " (read-only)" }
    );
    for (name, desc) in &names {
        println!("  {name}  {desc}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let signal = wait_for_signal(&signals);
    tracing::info!("signal {signal}: stopping");
    // Kept overlays record what they hold; an error here is the exit status.
    let flushed = clients.exports.flush_all();
    if let Some(p) = socket_path {
        let _ = std::fs::remove_file(p);
    }
    drop(session);
    flushed
}

fn spawn_client(stream: Box<dyn Stream>, peer: String, clients: &Arc<Clients>) {
    let Some(slot) = clients.count.enter(clients.max) else {
        tracing::warn!("{peer}: refused, {} clients are connected already", clients.max);
        stream.shutdown_both();
        return;
    };
    let c = clients.clone();
    let spawned = std::thread::Builder::new().name("nbd-client".into()).spawn(move || {
        serve_connection(stream, &c.exports, &peer, &c.admission);
        drop(slot);
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start a client thread: {e}");
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialized, `sig` is a valid out pointer.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// `serve` runs for days with a blob cache that churns: glibc's allocator raises its mmap threshold after the
/// first 1 MiB buffers are freed and then keeps freed blobs in its arenas, so the process held about twice
/// the cache size (measured 490-510 MB with the 256 MiB default). A fixed threshold below the block size
/// gives every blob its own mapping, returned to the system when the cache drops it (measured 306 MB).
fn return_freed_blobs_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before the serving threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 * 1024);
    }
}
