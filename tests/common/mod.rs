//! Test harness: runs the built `diskvault` binary against a repository in a temporary directory, and makes
//! deterministic disk images.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const MIB: usize = 1 << 20;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub password: String,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

impl Env {
    pub fn new() -> Env {
        Env { dir: tempfile::tempdir().unwrap(), password: "correct horse battery staple".into() }
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
        let mut c = Command::new(env!("CARGO_BIN_EXE_diskvault"));
        for (k, _) in std::env::vars() {
            if k.starts_with("DISKVAULT_") {
                c.env_remove(k);
            }
        }
        c.env("DISKVAULT_REPOSITORY", self.repo())
            .env("DISKVAULT_PASSWORD", &self.password)
            .env("DISKVAULT_CACHE_DIR", self.cache())
            .arg("--quiet")
            .args(args);
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let out: Output = self.command(args).output().expect("run diskvault");
        let r = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert!(!r.stderr.contains("panicked"), "diskvault panicked on {args:?}:\n{}", r.stderr);
        r
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

    pub fn repo_bytes(&self) -> u64 {
        dir_size(&self.repo())
    }

    /// Stored objects below `sub`: files, without the `.tmp-` files of unfinished writes.
    pub fn objects(&self, sub: &str) -> Vec<PathBuf> {
        self.files(sub).into_iter().filter(|p| !p.file_name().unwrap().to_str().unwrap().starts_with(".tmp-")).collect()
    }

    /// Every file below `sub`, temporary ones included.
    pub fn files(&self, sub: &str) -> Vec<PathBuf> {
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

pub fn dir_size(p: &Path) -> u64 {
    let mut v = Vec::new();
    collect(p, &mut v);
    v.iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum()
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
