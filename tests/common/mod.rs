//! Test harness: runs the built `diskvault` binary against a repository, and makes deterministic disk images.
//!
//! The repository is a local directory, or with `DISKVAULT_TEST_BACKEND=s3` a prefix in a SeaweedFS S3
//! server that the harness starts for the test binary (see [`s3`]). Tests read, damage and delete stored
//! objects through the library's own [`Backend`], so the same test runs against both.
#![allow(dead_code)]

pub mod s3;
pub mod vddk;
pub mod vsphere;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use diskvault::backend::Backend;

pub const MIB: usize = 1 << 20;

/// Builds a test helper (a library, a program) at `out` from `src`, unless an earlier test process built it
/// from the same source already: into a private path first, then renamed into place, so that test processes
/// building it at the same time (nextest runs one per test) never load or run a file another is still writing.
pub fn build_into(out: &Path, src: &Path, build: impl FnOnce(&Path)) {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(built), Some(source)) = (modified(out), modified(src)) {
        if built >= source {
            return;
        }
    }
    let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
    build(&tmp);
    std::fs::rename(&tmp, out).unwrap();
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub password: String,
    /// `None`: a local directory; `Some(location)`: an S3 location.
    s3_location: Option<String>,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Runs `c` to the end and collects what it printed; a panic in diskvault fails the test.
    pub fn of(mut c: Command) -> Run {
        let out: Output = c.output().expect("run diskvault");
        let r = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert!(!r.stderr.contains("panicked"), "diskvault panicked on {c:?}:\n{}", r.stderr);
        r
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

impl Env {
    /// A fresh, empty repository location on the backend under test.
    pub fn new() -> Env {
        let s3_location = s3::selected().then(|| s3::server().new_location());
        Env { dir: tempfile::tempdir().unwrap(), password: "correct horse battery staple".into(), s3_location }
    }

    /// A fresh S3 repository location, whatever backend the suite tests.
    pub fn s3() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
            password: "correct horse battery staple".into(),
            s3_location: Some(s3::server().new_location()),
        }
    }

    /// The same repository with another local cache and host name: another backup proxy.
    pub fn other_host(&self) -> Env {
        assert!(self.is_s3(), "other_host shares S3 repositories only");
        Env {
            dir: tempfile::tempdir().unwrap(),
            password: self.password.clone(),
            s3_location: self.s3_location.clone(),
        }
    }

    /// Points this environment at another S3 endpoint (a proxy in front of the server).
    pub fn via_endpoint(&self, endpoint: &str) -> Env {
        let loc = self.s3_location.as_ref().expect("an S3 repository");
        let rest = loc.strip_prefix(&format!("s3:{}", s3::server().endpoint)).unwrap();
        Env {
            dir: tempfile::tempdir().unwrap(),
            password: self.password.clone(),
            s3_location: Some(format!("s3:{endpoint}{rest}")),
        }
    }

    /// A fresh local-directory repository location, whatever backend is under test (for tests of local
    /// file-system behaviour).
    pub fn local() -> Env {
        Env { dir: tempfile::tempdir().unwrap(), password: "correct horse battery staple".into(), s3_location: None }
    }

    pub fn is_s3(&self) -> bool {
        self.s3_location.is_some()
    }

    /// The repository location as the CLI takes it.
    pub fn location(&self) -> String {
        match &self.s3_location {
            Some(l) => l.clone(),
            None => self.repo().display().to_string(),
        }
    }

    /// The repository's storage, for reading and damaging objects directly.
    pub fn backend(&self) -> Arc<dyn Backend> {
        match &self.s3_location {
            Some(l) => s3::server().backend(l),
            None => diskvault::backend::open(&self.location()).unwrap(),
        }
    }

    /// The repository opened through the library (for tests that drive the engine in-process).
    pub fn open_repo(&self) -> diskvault::repository::Repository {
        diskvault::repository::Repository::open(self.backend(), self.password.as_bytes()).unwrap()
    }

    /// Every delta blob the repository's index files list, as (delta id, base id), sorted.
    pub fn delta_blobs(&self) -> Vec<(diskvault::format::BlobId, diskvault::format::BlobId)> {
        let repo = self.open_repo();
        let mut out = Vec::new();
        for id in repo.list_index_ids().unwrap() {
            for p in repo.load_index(&id).unwrap().packs {
                out.extend(p.entries.iter().filter_map(|en| en.base.map(|b| (en.id, b))));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Total bytes of all packs.
    pub fn pack_bytes(&self) -> u64 {
        self.backend().list("packs").unwrap().iter().map(|o| o.size).sum()
    }

    /// Stored object names below `dir` (`packs`, `index`…), sorted; temporary objects are not listed.
    pub fn objects(&self, dir: &str) -> Vec<String> {
        let mut v: Vec<String> = self.backend().list(dir).unwrap().into_iter().map(|o| o.name).collect();
        v.sort();
        v
    }

    pub fn object_size(&self, name: &str) -> u64 {
        self.backend().size(name).unwrap().unwrap_or_else(|| panic!("{name} does not exist"))
    }

    pub fn read_object(&self, name: &str) -> Vec<u8> {
        self.backend().get(name).unwrap()
    }

    pub fn write_object(&self, name: &str, data: &[u8]) {
        self.backend().put(name, data).unwrap()
    }

    pub fn delete_object(&self, name: &str) {
        self.backend().delete(name).unwrap()
    }

    /// Flips bits of one byte of a stored object.
    pub fn flip(&self, name: &str, at: usize) {
        let mut b = self.read_object(name);
        b[at] ^= 0x20;
        self.write_object(name, &b);
    }

    /// Total bytes of all stored objects.
    pub fn repo_bytes(&self) -> u64 {
        ["config", "keys", "packs", "index", "snapshots", "verified"]
            .iter()
            .map(|d| {
                if *d == "config" {
                    self.backend().size(d).unwrap().unwrap_or(0)
                } else {
                    self.backend().list(d).unwrap().iter().map(|o| o.size).sum()
                }
            })
            .sum()
    }

    /// A repository created with `init`.
    pub fn with_repo() -> Env {
        let e = Env::new();
        e.ok(&["init"]);
        e
    }

    pub fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }
    pub fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        self.command_with_progress(args, false)
    }

    /// [`Env::command`], with `--quiet` left out if `progress` (what it prints to a user then shows too).
    pub fn command_with_progress(&self, args: &[&str], progress: bool) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_diskvault"));
        for (k, _) in std::env::vars() {
            if k.starts_with("DISKVAULT_") {
                c.env_remove(k);
            }
        }
        if self.is_s3() {
            s3::server().add_credentials(&mut c);
        }
        c.env("DISKVAULT_REPOSITORY", self.location())
            .env("DISKVAULT_PASSWORD", &self.password)
            .env("DISKVAULT_CACHE_DIR", self.cache());
        if !progress {
            c.arg("--quiet");
        }
        c.args(args);
        c
    }

    /// `backup --json` of `path` as source `name`, its change list naming `areas` (byte ranges).
    pub fn backup_changed(&self, name: &str, path: &Path, areas: &[(u64, u64)]) -> Run {
        let changes = self.path("changes.json");
        write_changes(&changes, areas);
        let (changes, path) = (changes.to_str().unwrap(), path.to_str().unwrap());
        self.run(&["backup", "--json", "--name", name, "--changed-areas", changes, path])
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::of(self.command(args))
    }

    /// Starts the commands all at once and requires every one to succeed; returns their stdouts.
    pub fn run_at_once(commands: Vec<Command>) -> Vec<String> {
        let children: Vec<_> = commands
            .into_iter()
            .map(|mut c| c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap())
            .collect();
        children
            .into_iter()
            .map(|child| {
                let out = child.wait_with_output().unwrap();
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(out.status.success() && !stderr.contains("panicked"), "{stderr}");
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .collect()
    }

    /// Runs and requires success.
    pub fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert_eq!(r.code, 0, "diskvault {args:?} failed:\nstdout: {}\nstderr: {}", r.stdout, r.stderr);
        r
    }

    /// Runs and requires failure; returns the run for message checks.
    pub fn fails(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert_ne!(r.code, 0, "diskvault {args:?} should have failed:\nstdout: {}", r.stdout);
        assert!(r.stderr.contains("error: "), "no error message for {args:?}: {}", r.stderr);
        r
    }

    /// Backs up with `--json`; returns the parsed result.
    pub fn backup(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["backup", "--json"];
        a.extend_from_slice(args);
        self.ok(&a).json()
    }

    /// Restores a snapshot disk to a fresh file and returns its bytes.
    pub fn restore(&self, snapshot: &str, extra: &[&str]) -> Vec<u8> {
        let target = self.path(&format!("restore-{}", rand_u64()));
        let t = target.to_str().unwrap().to_string();
        let mut a = vec!["restore", snapshot, "--target", &t, "--verify"];
        a.extend_from_slice(extra);
        self.ok(&a);
        let bytes = std::fs::read(&target).unwrap();
        std::fs::remove_file(&target).unwrap();
        bytes
    }

    /// `serve` on a Unix socket, with `args` before the subcommand (global options); returns once it listens.
    pub fn serve_on_socket(&self, args: &[&str]) -> Running {
        let sock = self.path(&format!("serve-{}.sock", rand_u64()));
        let mut all = args.to_vec();
        all.extend_from_slice(&["serve", "--socket", sock.to_str().unwrap()]);
        let running = Running(self.command(&all).spawn().unwrap());
        let started = std::time::Instant::now();
        while !sock.exists() && started.elapsed() < std::time::Duration::from_secs(30) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(sock.exists(), "serve did not start listening");
        running
    }

    /// Every file below `sub` of a local repository, temporary ones included.
    pub fn local_files(&self, sub: &str) -> Vec<PathBuf> {
        assert!(!self.is_s3(), "local_files on an S3 repository");
        let mut v = Vec::new();
        collect(&self.repo().join(sub), &mut v);
        v.sort();
        v
    }
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                collect(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

/// Every file below `p`.
pub fn files_below(p: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    collect(p, &mut v);
    v
}

pub fn dir_size(p: &Path) -> u64 {
    files_below(p).iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum()
}

fn rand_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Deterministic pseudo-random bytes (xorshift64*), incompressible.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545F4914F6CDD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

/// Writes the changed-areas JSON for a list of (start, length) byte ranges.
pub fn write_changes(path: &Path, areas: &[(u64, u64)]) {
    let v: Vec<serde_json::Value> = areas.iter().map(|(s, l)| serde_json::json!({"start": s, "length": l})).collect();
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

/// Blocks touched by byte ranges (1 MiB blocks).
pub fn blocks_touched(areas: &[(u64, u64)]) -> u64 {
    let mut set = std::collections::BTreeSet::new();
    for &(s, l) in areas {
        for b in s / MIB as u64..=(s + l - 1) / MIB as u64 {
            set.insert(b);
        }
    }
    set.len() as u64
}

/// A child process killed and reaped when dropped, also when a test fails half-way: left running, it would
/// keep the test's output pipe open.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
