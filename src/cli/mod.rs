//! The `diskvault` command line: argument parsing, password sources, and one function per command.
//! Conventions follow restic: `-r/--repo` or `DISKVAULT_REPOSITORY`, `DISKVAULT_PASSWORD`,
//! `--password-file`, `--password-command`, exit code 10 when there is no repository and 12 for a wrong password.

mod backup;
mod caches;
mod check;
mod copy;
mod diff;
mod files;
mod forget;
mod inspect;
mod key;
mod object_lock;
mod prune;
mod repair;
mod restore;
mod serve;
mod snapshots;
mod tag;
pub(crate) mod vm;

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::cache::{self, IndexCache};
use crate::error::{Error, Result};
use crate::progress::Mode;
use crate::repository::Repository;

#[derive(Parser, Debug)]
#[command(name = "diskvault", version, about = "Deduplicating, encrypted backups of virtual-machine disks")]
pub struct Cli {
    /// Repository location: a directory, `s3://BUCKET/PREFIX` (AWS) or `s3:https://HOST:PORT/BUCKET/PREFIX`.
    #[arg(short = 'r', long = "repo", env = "DISKVAULT_REPOSITORY", global = true, help_heading = "Global options")]
    repo: Option<String>,

    /// Read the repository password from this file (first line).
    #[arg(long, env = "DISKVAULT_PASSWORD_FILE", global = true, help_heading = "Global options")]
    password_file: Option<PathBuf>,

    /// Run this shell command and use its first output line as the password.
    #[arg(long, env = "DISKVAULT_PASSWORD_COMMAND", global = true, help_heading = "Global options")]
    password_command: Option<String>,

    /// Directory for the local index cache (default: $XDG_CACHE_HOME/diskvault or ~/.cache/diskvault).
    #[arg(long, env = "DISKVAULT_CACHE_DIR", global = true, help_heading = "Global options")]
    cache_dir: Option<PathBuf>,

    /// Remove the local caches of other repositories that went unused for 30 days, as `cache --cleanup` does
    /// (held ones are kept), instead of noting them.
    #[arg(long, global = true, help_heading = "Global options")]
    cleanup_cache: bool,

    /// No progress output.
    #[arg(short, long, global = true, help_heading = "Global options")]
    quiet: bool,

    /// When the command ends, write Prometheus metrics of the run to this file (for node_exporter's textfile
    /// collector: a `.prom` file in its directory), replacing it.
    #[arg(long, env = "DISKVAULT_METRICS_FILE", global = true, help_heading = "Global options")]
    metrics_file: Option<PathBuf>,

    /// More log output (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = "Global options")]
    verbose: u8,

    /// Limit what is sent to the repository (and to the destination of a copy) to this rate: KiB/s as a bare
    /// number (as restic), or with a unit, e.g. 20M (MiB/s).
    #[arg(long, env = "DISKVAULT_LIMIT_UPLOAD", global = true, help_heading = "Global options", value_name = "RATE", value_parser = crate::backend::throttle::parse_rate)]
    limit_upload: Option<u64>,

    /// Limit what is read from the repository (and from the source of a copy) to this rate, as --limit-upload.
    #[arg(long, env = "DISKVAULT_LIMIT_DOWNLOAD", global = true, help_heading = "Global options", value_name = "RATE", value_parser = crate::backend::throttle::parse_rate)]
    limit_download: Option<u64>,

    #[command(subcommand)]
    command: Command,
}

/// The snapshot filters of `snapshots`, `forget` and `copy` (restic's `--host` and `--tag`).
#[derive(clap::Args, Debug, Default)]
pub struct FilterArgs {
    /// Only snapshots of this source.
    #[arg(long)]
    name: Option<String>,
    /// Only snapshots made on this host (repeatable: on any of them).
    #[arg(long = "host", value_name = "HOST")]
    hosts: Vec<String>,
    /// Only snapshots with these tags (comma-separated: all of them; repeatable: any of the sets).
    #[arg(long = "tag", value_name = "TAG[,TAG…]")]
    tags: Vec<String>,
}

impl FilterArgs {
    fn filter(&self) -> crate::repository::SnapshotFilter {
        crate::repository::SnapshotFilter {
            source: self.name.clone(),
            hosts: self.hosts.clone(),
            tag_sets: self
                .tags
                .iter()
                .map(|set| set.split(',').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect())
                .collect(),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new repository.
    Init(InitArgs),
    /// Back up disk images or block devices as one snapshot.
    Backup(Box<backup::BackupArgs>),
    /// Restore a disk of a snapshot to a file or block device.
    Restore(Box<restore::RestoreArgs>),
    /// Serve snapshot disks as NBD exports (instant access; optionally writable through an overlay).
    Serve(serve::ServeArgs),
    /// Verify the repository's structure, and with --read-data every byte.
    Check(check::CheckArgs),
    /// Copy snapshots from another repository into this one (offsite copies); already copied ones are skipped.
    Copy(copy::CopyArgs),
    /// List snapshots.
    Snapshots(snapshots::SnapshotsArgs),
    /// Which byte ranges of each disk differ between two snapshots (from the manifests; no data is read).
    Diff(diff::DiffArgs),
    /// List the volumes of a snapshot's disk, or the files of one (file-level restore; ext2/3/4, XFS, NTFS).
    Ls(files::LsArgs),
    /// Write a file inside a snapshot's disk, a directory as a tar archive, or a volume's raw bytes, to standard
    /// output.
    Dump(files::DumpArgs),
    /// Copy files and directories out of a snapshot's disk into a local directory.
    Extract(files::ExtractArgs),
    /// Find files by name in the guest file systems of snapshots (newest first): which backups still have
    /// a file, and where
    Find(files::FindArgs),
    /// Manage the passwords (key files) that open the repository.
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Remove snapshots: those a retention policy does not keep, or those named.
    Forget(forget::ForgetArgs),
    /// Delete data no snapshot references any more; safe while backups run.
    Prune(prune::PruneArgs),
    /// Keep what the snapshots need under S3 Object Lock retention (DISKVAULT_S3_OBJECT_LOCK days ahead); prune
    /// does this too.
    ObjectLock(object_lock::ObjectLockArgs),
    /// Add, remove or set the tags of snapshots (each is written again under a new id).
    Tag(tag::TagArgs),
    /// Protect a snapshot from forget.
    Protect(forget::ProtectArgs),
    /// Remove a snapshot's protection.
    Unprotect(forget::ProtectArgs),
    /// Sizes, deduplication and compression, per disk and per snapshot.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the repository's locks and their holders.
    Locks,
    /// List this host's local caches (one per repository: size, last use), and remove those no longer used.
    Cache(caches::CacheArgs),
    /// Repair the repository.
    #[command(subcommand)]
    Repair(repair::RepairCommand),
    /// VMware inventory and Changed Block Tracking.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Print a repository object as JSON (for debugging).
    Cat(inspect::CatArgs),
    /// Print a shell completion script: `diskvault completions bash > /etc/bash_completion.d/diskvault`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write manual pages, one per command, into a directory: `diskvault man /usr/local/share/man/man1`.
    Man {
        /// Directory to write `diskvault.1`, `diskvault-backup.1`, … into (created if missing).
        dir: std::path::PathBuf,
    },
}

impl Command {
    /// Whether the command only reads the repository and prints, and so may end quietly when a reader of its
    /// output (`snapshots | head`) goes away. Rust ignores SIGPIPE, so that `println!` then panics instead;
    /// these commands take the default back. The others keep ignoring it: they write to Unix sockets (NBD) or
    /// run the VDDK, where SIGPIPE would kill the process instead of failing one write.
    fn only_prints(&self) -> bool {
        matches!(
            self,
            Command::Snapshots(_)
                | Command::Diff(_)
                | Command::Ls(_)
                | Command::Find(_)
                | Command::Cat(_)
                | Command::Stats { .. }
                | Command::Locks
                | Command::Cache(_)
                | Command::Completions { .. }
        )
    }

    /// The subcommand's name, as metrics label it.
    fn name(&self) -> &'static str {
        match self {
            Command::Init(_) => "init",
            Command::Backup(_) => "backup",
            Command::Restore(_) => "restore",
            Command::Serve(_) => "serve",
            Command::Check(_) => "check",
            Command::Copy(_) => "copy",
            Command::Snapshots(_) => "snapshots",
            Command::Diff(_) => "diff",
            Command::Ls(_) => "ls",
            Command::Dump(_) => "dump",
            Command::Extract(_) => "extract",
            Command::Find(_) => "find",
            Command::Key(_) => "key",
            Command::Forget(_) => "forget",
            Command::Prune(_) => "prune",
            Command::ObjectLock(_) => "object-lock",
            Command::Tag(_) => "tag",
            Command::Protect(_) => "protect",
            Command::Unprotect(_) => "unprotect",
            Command::Stats { .. } => "stats",
            Command::Locks => "locks",
            Command::Cache(_) => "cache",
            Command::Repair(_) => "repair",
            Command::Vm(_) => "vm",
            Command::Cat(_) => "cat",
            Command::Completions { .. } => "completions",
            Command::Man { .. } => "man",
        }
    }
}

/// `diskvault man DIR`: a page per command and subcommand, from the same definitions as `--help`.
fn write_manual_pages(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::local(dir, e))?;
    clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), dir).map_err(|e| Error::local(dir, e))?;
    println!("manual pages written to {}", dir.display());
    Ok(())
}

#[derive(clap::Args, Debug)]
struct InitArgs {
    /// Target size of pack files in MiB.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=512))]
    pack_size: u32,
    /// zstd compression level (0 = off).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(0..=19))]
    compression: i32,
}

/// The disk of snapshot `id` called `name`, or its only disk.
fn choose_disk<'s>(
    id: &crate::format::ObjectId,
    snap: &'s crate::format::snapshot::Snapshot,
    name: Option<&str>,
) -> Result<&'s crate::format::snapshot::DiskManifest> {
    let names = || snap.disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ");
    match (name, snap.disks.as_slice()) {
        (Some(n), _) => snap
            .disk(n)
            .ok_or_else(|| Error::invalid(format!("snapshot {} has no disk {n:?} (disks: {})", id.short(), names()))),
        (None, [only]) => Ok(only),
        (None, _) => Err(Error::invalid(format!(
            "snapshot {} has several disks ({}); choose one with --disk",
            id.short(),
            names()
        ))),
    }
}

/// A time given on the command line (`2026-11-22`, `2026-11-22 04:38`, `2026-11-22 04:38:03`; UTC), as seconds
/// since the epoch.
fn parse_time(s: &str) -> std::result::Result<i64, String> {
    crate::util::parse_utc(s).ok_or_else(|| format!("{s:?} is not a time like 2026-11-22 04:38:03 (UTC)"))
}

/// Global options every command may need.
pub(crate) struct Globals {
    repo: Option<String>,
    password_file: Option<PathBuf>,
    password_command: Option<String>,
    cache_dir: Option<PathBuf>,
    /// `--cleanup-cache`.
    cleanup_cache: bool,
    pub progress: Mode,
    /// Bandwidth limits, shared by every repository the command opens (one budget per direction).
    limits: crate::backend::throttle::Limits,
}

impl Globals {
    pub fn location(&self) -> Result<&str> {
        self.repo
            .as_deref()
            .ok_or_else(|| Error::invalid("no repository given: use -r/--repo or set DISKVAULT_REPOSITORY"))
    }

    /// The repository password from the environment, a file, a command, or the terminal.
    pub fn password(&self, confirm: bool) -> Result<Vec<u8>> {
        password_from(
            "DISKVAULT_PASSWORD",
            self.password_file.as_deref(),
            self.password_command.as_deref(),
            "repository password",
            "set DISKVAULT_PASSWORD, or use --password-file or --password-command",
            confirm,
        )
    }

    pub fn open_repo(&self) -> Result<Repository> {
        Repository::open(self.open_backend(self.location()?)?, &self.password(false)?)
    }

    /// The storage at `location`, within the command's bandwidth limits.
    pub fn open_backend(&self, location: &str) -> Result<Arc<dyn crate::backend::Backend>> {
        crate::backend::open_limited(location, &self.limits)
    }

    pub fn cache_root(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(cache::default_cache_root)
    }

    /// The index cache, not yet brought up to date: backup and restore sync it once their session exists.
    pub fn open_cache_unsynced(&self, repo: &Repository) -> Result<Arc<IndexCache>> {
        caches::note_old_caches(self, repo);
        Ok(Arc::new(IndexCache::open_unsynced(repo, &self.cache_root())?))
    }

    pub fn open_cache(&self, repo: &Repository) -> Result<Arc<IndexCache>> {
        caches::note_old_caches(self, repo);
        let root = self.cache_root();
        let (c, stats) = IndexCache::open(repo, &root)?;
        if stats.changed() {
            tracing::info!("local index cache: {stats}");
        }
        Ok(Arc::new(c))
    }
}

/// A password from the environment variable `var`, else `file`, else `command`, else the terminal (asking for
/// `what`, twice with `confirm`; without a terminal the error names the other `sources`).
pub(crate) fn password_from(
    var: &str,
    file: Option<&std::path::Path>,
    command: Option<&str>,
    what: &str,
    sources: &str,
    confirm: bool,
) -> Result<Vec<u8>> {
    match password_given(var, file, command)? {
        Some(p) => Ok(p),
        None => prompt_password(what, sources, confirm),
    }
}

/// A password from the environment variable `var`, else `file`, else `command`; `None` if none is given.
pub(crate) fn password_given(
    var: &str,
    file: Option<&std::path::Path>,
    command: Option<&str>,
) -> Result<Option<Vec<u8>>> {
    if let Ok(p) = std::env::var(var) {
        return Ok(Some(p.into_bytes()));
    }
    if let Some(f) = file {
        return read_password_file(f).map(Some);
    }
    command.map(password_from_command).transpose()
}

pub(crate) fn read_password_file(f: &std::path::Path) -> Result<Vec<u8>> {
    let s = std::fs::read_to_string(f).map_err(|e| Error::local(f, format!("cannot read password file: {e}")))?;
    Ok(s.lines().next().unwrap_or("").as_bytes().to_vec())
}

fn password_from_command(cmd: &str) -> Result<Vec<u8>> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Error::invalid(format!("password command {cmd:?} could not run: {e}")))?;
    if !out.status.success() {
        return Err(Error::invalid(format!("password command {cmd:?} failed ({})", out.status)));
    }
    let s = String::from_utf8_lossy(&out.stdout);
    Ok(s.lines().next().unwrap_or("").as_bytes().to_vec())
}

/// Asks the terminal for `what`; without a terminal, the error says where else it can come from (`sources`).
pub(crate) fn prompt_password(what: &str, sources: &str, confirm: bool) -> Result<Vec<u8>> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Err(Error::invalid(format!("no {what} given: {sources}")));
    }
    let p = rpassword::prompt_password(format!("enter {what}: ")).map_err(|e| Error::invalid(e.to_string()))?;
    if confirm {
        let again =
            rpassword::prompt_password(format!("enter {what} again: ")).map_err(|e| Error::invalid(e.to_string()))?;
        if again != p {
            return Err(Error::invalid("the passwords do not match"));
        }
    }
    if p.is_empty() {
        return Err(Error::invalid("an empty password is not allowed"));
    }
    Ok(p.into_bytes())
}

fn init(g: &Globals, args: &InitArgs) -> Result<()> {
    let location = g.location()?;
    let backend = g.open_backend(location)?;
    let password = g.password(true)?;
    if password.is_empty() {
        return Err(Error::invalid("an empty password is not allowed"));
    }
    let opts = crate::repository::InitOptions {
        pack_target_size: args.pack_size << 20,
        zstd_level: args.compression,
        ..Default::default()
    };
    let repo = Repository::init(backend, &password, &opts)?;
    println!("created diskvault repository {} at {location}", &repo.config().id_hex()[..10]);
    println!("Keep the password safe: without it the data cannot be read. `diskvault key export` prints a recovery");
    println!("key to keep offline, which opens the repository should every password be lost.");
    Ok(())
}

fn print_stats(g: &Globals, json: bool) -> Result<()> {
    use crate::util::{format_utc, human_bytes};
    let repo = g.open_repo()?;
    let cache = g.open_cache(&repo)?;
    let s = crate::stats::compute(&repo, &cache)?;
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    if json {
        let v = serde_json::json!({
            "snapshots": s.snapshots,
            "logical_bytes": s.all.logical,
            "data_bytes": s.all.data,
            "blobs": s.blobs,
            "blob_plaintext_bytes": s.blobs_raw,
            "stored_bytes": s.blobs_stored,
            "dedup_ratio": ratio(s.all.data, s.blobs_raw),
            "compression_ratio": ratio(s.blobs_raw, s.blobs_stored),
            "disks": s.per_disk.iter().map(|((src, d), t)| serde_json::json!({"source": src, "disk": d, "logical_bytes": t.logical, "data_bytes": t.data})).collect::<Vec<_>>(),
            "snapshot_unique_bytes": s.unique.iter().map(|(id, src, t, u)| serde_json::json!({"id": id.hex(), "source": src, "time": format_utc(*t), "unique_stored_bytes": u})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON of plain values"));
        return Ok(());
    }
    println!("{}", crate::util::count(s.snapshots, "snapshot"));
    println!("logical size    {:>12}  (all disks of all snapshots)", human_bytes(s.all.logical));
    println!("non-zero data   {:>12}", human_bytes(s.all.data));
    println!("distinct blobs  {:>12}  ({} blobs)", human_bytes(s.blobs_raw), s.blobs);
    println!("stored          {:>12}", human_bytes(s.blobs_stored));
    println!(
        "dedup {:.2}x, compression {:.2}x, logical/stored {:.2}x",
        ratio(s.all.data, s.blobs_raw),
        ratio(s.blobs_raw, s.blobs_stored),
        ratio(s.all.logical, s.blobs_stored)
    );
    println!("per disk:");
    for ((src, d), t) in &s.per_disk {
        println!("  {src} / {d}: logical {}, data {}", human_bytes(t.logical), human_bytes(t.data));
    }
    println!("stored only by each snapshot:");
    for (id, src, t, u) in &s.unique {
        println!("  {}  {}  {:<20} {}", id.short(), format_utc(*t), src, human_bytes(*u));
    }
    Ok(())
}

fn list_locks(g: &Globals) -> Result<()> {
    let repo = g.open_repo()?;
    let locks = crate::lock::list(&repo)?;
    for l in &locks {
        println!("{}", l.describe());
    }
    println!("{} locks", locks.len());
    Ok(())
}

/// Entry point of the binary; returns the process exit code.
pub fn main() -> i32 {
    crate::util::limit_allocator_arenas();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DISKVAULT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("diskvault={level}")));
    // Colours only on a terminal: warnings of a backup run by cron or systemd land in mail and journals.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();

    if cli.command.only_prints() {
        // SAFETY: at start-up, before any thread exists; SIG_DFL is a valid disposition for SIGPIPE.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let started = std::time::Instant::now();
    let g = Globals {
        repo: cli.repo,
        password_file: cli.password_file,
        password_command: cli.password_command,
        cache_dir: cli.cache_dir,
        cleanup_cache: cli.cleanup_cache,
        progress: if cli.quiet { Mode::Quiet } else { Mode::Auto },
        limits: crate::backend::throttle::Limits::new(cli.limit_upload, cli.limit_download),
    };
    let result = match &cli.command {
        Command::Init(a) => init(&g, a),
        Command::Backup(a) => backup::run(&g, a),
        Command::Restore(a) => restore::run(&g, a),
        Command::Serve(a) => serve::run(&g, a),
        Command::Snapshots(a) => snapshots::run(&g, a),
        Command::Diff(a) => diff::run(&g, a),
        Command::Ls(a) => files::ls(&g, a),
        Command::Dump(a) => files::dump(&g, a),
        Command::Extract(a) => files::extract_files(&g, a),
        Command::Find(a) => files::find(&g, a),
        Command::Check(a) => check::run(&g, a),
        Command::Copy(a) => copy::run(&g, a),
        Command::Key(k) => key::run(&g, k),
        Command::Cat(a) => inspect::run(&g, a),
        Command::Repair(r) => repair::run(&g, r),
        Command::Locks => list_locks(&g),
        Command::Cache(a) => caches::run(&g, a),
        Command::Vm(c) => vm::run(c),
        Command::Stats { json } => print_stats(&g, *json),
        Command::Forget(a) => forget::run(&g, a),
        Command::Prune(a) => prune::run(&g, a),
        Command::ObjectLock(a) => object_lock::run(&g, a),
        Command::Tag(a) => tag::run(&g, a),
        Command::Protect(a) => forget::protect(&g, a, true),
        Command::Unprotect(a) => forget::protect(&g, a, false),
        Command::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            clap_complete::generate(*shell, &mut <Cli as clap::CommandFactory>::command(), "diskvault", &mut out);
            std::io::Write::flush(&mut out).map_err(|e| Error::local("standard output", e))
        }
        Command::Man { dir } => write_manual_pages(dir),
    };
    // Every VDDK disk is closed by now; the library wants its Exit.
    crate::vddk::shutdown();
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    };
    if let Some(path) = &cli.metrics_file {
        let outcome = crate::metrics::Outcome {
            command: cli.command.name(),
            repository: g.repo.as_deref().unwrap_or(""),
            duration: started.elapsed(),
            exit_code: code,
        };
        if let Err(e) = crate::metrics::write_file(path, &outcome) {
            // The run's own result stands; a monitoring gap is reported, not turned into a failed backup.
            eprintln!("warning: cannot write the metrics file {}: {e}", path.display());
        }
    }
    code
}
