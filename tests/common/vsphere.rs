//! The vSphere simulator (tests/vcsim/main.go: govmomi's vcsim with CBT), built once per test binary from
//! Debian's Go and govmomi packages (scripts/setup.sh), started per test on 127.0.0.1 with TLS.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let out = tmp.join("vcsim-cbt");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vcsim/main.go");
        super::build_into(&out, &src, |to| {
            let built = Command::new("go")
                .args(["build", "-o"])
                .arg(to)
                .arg(&src)
                .env("GO111MODULE", "off")
                .env("GOPATH", "/usr/share/gocode")
                .env("GOCACHE", tmp.join("gocache"))
                .output()
                .expect("go (golang-go) is not installed: run scripts/setup.sh");
            assert!(built.status.success(), "building vcsim failed: {}", String::from_utf8_lossy(&built.stderr));
        });
        out
    })
}

/// A running simulator; stopped (and its datastore removed) on drop.
pub struct Vcsim {
    child: Child,
    pub url: String,
    pub user: String,
    pub password: String,
    pub sha1: String,
    pub sha256: String,
    pub ca_pem: String,
    /// Datastore name -> local directory.
    pub datastores: serde_json::Map<String, serde_json::Value>,
}

impl Vcsim {
    pub fn start() -> Vcsim {
        Vcsim::start_with(&[])
    }

    /// With settings of tests/vcsim/main.go (`VCSIM_DISKS`, `VCSIM_INDEPENDENT_DISKS`…) beyond the defaults.
    pub fn start_with(settings: &[(&str, &str)]) -> Vcsim {
        let mut child = Command::new(binary())
            .env("VCSIM_DISK_MB", "64")
            .env("VCSIM_DISKS", "2")
            .envs(settings.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("vcsim said {line:?} ({e})"));
        let s = |k: &str| v[k].as_str().unwrap().to_string();
        Vcsim {
            url: s("url"),
            user: s("username"),
            password: s("password"),
            sha1: s("sha1"),
            sha256: s("sha256"),
            ca_pem: s("ca_pem"),
            datastores: v["datastores"].as_object().unwrap().clone(),
            child,
        }
    }

    /// The local file behind `[datastore] vm/disk.vmdk` (the guest's disk, which tests write into).
    pub fn flat_file(&self, datastore_path: &str) -> PathBuf {
        let (ds, rel) = datastore_path.trim_start_matches('[').split_once(']').unwrap();
        let dir = self.datastores[ds].as_str().unwrap();
        PathBuf::from(dir).join(format!("{}-flat.vmdk", rel.trim().trim_end_matches(".vmdk")))
    }

    /// Environment for diskvault commands talking to this simulator.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DISKVAULT_VSPHERE_URL".into(), self.url.clone()),
            ("DISKVAULT_VSPHERE_USER".into(), self.user.clone()),
            ("DISKVAULT_VSPHERE_PASSWORD".into(), self.password.clone()),
            ("DISKVAULT_VSPHERE_THUMBPRINT".into(), self.sha256.clone()),
        ]
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        // SIGTERM lets it remove its datastore directories.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
