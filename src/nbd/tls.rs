//! TLS for NBD (`NBD_OPT_STARTTLS`): the client's and the server's configurations (certificate files are read
//! by [`crate::util`]'s helpers), and the server's side of a connection.
//!
//! The server answers requests from several threads: one reads the socket while workers write replies (see
//! [`super::server`]). A rustls connection is one object for both directions, so a TLS connection is handed to
//! the server as one end of a Unix socket pair, and two threads carry the bytes between the other end and the
//! network, each holding the rustls connection only while it encrypts or decrypts (never while it waits).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::util::{load_ca_file, read_pem_certs, tls_provider};

use super::server::Stream;

/// A client configuration that trusts the CAs in `ca_file`, presenting `client_cert` (certificate chain and
/// key files) if given.
pub fn client_config(ca_file: &Path, client_cert: Option<(&Path, &Path)>) -> Result<Arc<rustls::ClientConfig>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(tls_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(load_ca_file(ca_file)?);
    let config = match client_cert {
        Some((cert, key)) => {
            let (chain, key_der) = read_identity(cert, key)?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| identity_err(cert, key, e))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The client's side of a TLS connection, as a stream.
///
/// In TLS 1.3 a server judges the client's certificate after the client has finished its part of the
/// handshake, so a refusal (an alert, then the server closes) can arrive while the client's next write finds
/// the connection gone (rustls sends what it owes before each read, too). A read or write that fails therefore
/// looks for an alert the server left behind and reports that instead of a bare "broken pipe".
pub struct ClientStream<S: Read + Write>(rustls::StreamOwned<rustls::ClientConnection, S>);

impl<S: Read + Write> ClientStream<S> {
    /// Runs the handshake to its end on `sock`; its failure (an untrusted server, a name the certificate does
    /// not carry, a refused client certificate) is the error.
    pub fn connect(mut conn: rustls::ClientConnection, mut sock: S) -> std::io::Result<Self> {
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        Ok(ClientStream(rustls::StreamOwned::new(conn, sock)))
    }

    fn explain(&mut self, e: std::io::Error) -> std::io::Error {
        while let Ok(n) = self.0.conn.read_tls(&mut self.0.sock) {
            if n == 0 {
                break;
            }
            if let Err(tls) = self.0.conn.process_new_packets() {
                return std::io::Error::new(std::io::ErrorKind::ConnectionAborted, tls);
            }
        }
        e
    }
}

impl<S: Read + Write> Read for ClientStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf).map_err(|e| self.explain(e))
    }
}

impl<S: Read + Write> Write for ClientStream<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).map_err(|e| self.explain(e))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().map_err(|e| self.explain(e))
    }
}

/// A certificate chain and its private key, from PEM files.
fn read_identity(cert: &Path, key: &Path) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain = read_pem_certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("key file {}: {e}", key.display()))?;
    Ok((chain, key_der))
}

fn identity_err(cert: &Path, key: &Path, e: rustls::Error) -> String {
    format!("certificate {} with key {}: {e}", cert.display(), key.display())
}

/// A server configuration: its certificate chain and key, and, if given, the CA whose certificates clients
/// must present (without it any client that reaches the server may connect).
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let (chain, key) = read_identity(cert_file, key_file)?;
    let builder = rustls::ServerConfig::builder_with_provider(tls_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(load_ca_file(ca)?),
                tls_provider(),
            )
            .build()
            .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| identity_err(cert_file, key_file, e))?;
    Ok(Arc::new(config))
}

/// The rustls connection and the network socket's writing side: whoever writes TLS records holds both, so
/// records leave in the order rustls made them.
struct Shared {
    conn: rustls::ServerConnection,
    net: Box<dyn Stream>,
}

impl Shared {
    /// Encrypts and sends `data`. rustls takes only so much plaintext before its records are written out, so
    /// it goes in as rustls takes it, each part sent before the next.
    fn send(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let taken = self.conn.writer().write(data)?;
            self.flush_tls()?;
            if taken == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            data = &data[taken..];
        }
        Ok(())
    }

    fn flush_tls(&mut self) -> std::io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.net)?;
        }
        self.net.flush()
    }
}

/// Moves the plaintext rustls has decrypted into `out`. Returns whether the client closed the connection.
fn take_plaintext(conn: &mut rustls::ServerConnection, out: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 << 10];
    loop {
        match conn.reader().read(&mut chunk) {
            Ok(0) => return true, // close_notify
            Ok(k) => out.extend_from_slice(&chunk[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true, // closed without close_notify
        }
    }
}

fn lock(s: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the server's side of a TLS handshake on `net` and returns the plaintext stream of the connection.
/// The handshake's failure (an untrusted client certificate, a client speaking something else) is the error.
pub fn accept(net: Box<dyn Stream>, config: Arc<rustls::ServerConfig>) -> Result<Box<dyn Stream>, String> {
    let mut conn = rustls::ServerConnection::new(config).map_err(|e| format!("TLS: {e}"))?;
    let mut net = net;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut net) {
            // Tell the client why, where rustls has an alert for it.
            let _ = conn.write_tls(&mut net);
            return Err(format!("TLS handshake: {e}"));
        }
    }
    let (app, inner) = UnixStream::pair().map_err(|e| format!("socket pair: {e}"))?;
    let mut net_reader = net.try_clone_stream().map_err(|e| format!("TLS: {e}"))?;
    let mut app_reader = inner.try_clone().map_err(|e| format!("socket pair: {e}"))?;
    let mut app_writer = inner;
    let shared = Arc::new(Mutex::new(Shared { conn, net }));

    // Network -> server: decrypt what arrives, hand the plaintext on.
    let s = shared.clone();
    std::thread::Builder::new()
        .name("nbd-tls-in".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            let mut plain = Vec::new();
            // What came with the end of the handshake (a client's first option may).
            let mut closed = take_plaintext(&mut lock(&s).conn, &mut plain);
            loop {
                if !plain.is_empty() && app_writer.write_all(&plain).is_err() {
                    break;
                }
                plain.clear();
                if closed {
                    break;
                }
                let n = match net_reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut sh = lock(&s);
                let mut rest = &buf[..n];
                while !rest.is_empty() && !closed {
                    closed = !matches!(sh.conn.read_tls(&mut rest), Ok(k) if k > 0);
                    if let Err(e) = sh.conn.process_new_packets() {
                        tracing::info!("NBD TLS connection: {e}");
                        closed = true;
                    }
                    // Record by record: rustls holds at most 16 KiB of decrypted data unread.
                    closed |= take_plaintext(&mut sh.conn, &mut plain);
                }
                // Alerts and key updates owed to the client.
                let _ = sh.flush_tls();
            }
            // The server sees the end of its input; the client sees ours once the server is done.
            let _ = app_writer.shutdown(std::net::Shutdown::Write);
        })
        .map_err(|e| format!("thread: {e}"))?;

    // Server -> network: encrypt the server's replies.
    std::thread::Builder::new()
        .name("nbd-tls-out".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match app_reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if lock(&shared).send(&buf[..n]).is_err() {
                    break;
                }
            }
            let mut sh = lock(&shared);
            sh.conn.send_close_notify();
            let _ = sh.flush_tls();
            sh.net.shutdown_both();
            let _ = app_reader.shutdown(std::net::Shutdown::Both);
        })
        .map_err(|e| format!("thread: {e}"))?;
    Ok(Box::new(app))
}
