//! VMware's Virtual Disk Development Kit (`libvixDiskLib.so`), loaded at run time with `libloading` from the
//! directory the user names (never linked: it is proprietary and not always installed).
//!
//! The programming guide's rules are built in:
//! - `InitEx` once per process, before any thread that uses the library, with thread-safe log callbacks that
//!   go to `tracing` (the default callbacks are not thread-safe);
//! - one thread owns connect, open, close, disconnect, `QueryAllocatedBlocks`, `PrepareForAccess` and
//!   `EndAccess` (`Library::on_owner`); I/O on a handle happens on one thread at a time (`&mut`);
//! - `PrepareForAccess` is always paired with `EndAccess`, also when anything in between fails ([`Disk`]'s drop);
//! - reads are whole sectors; the tail of a disk that is not a multiple of the query chunk counts as allocated.
//!
//! Every VIX error becomes [`Error::Source`] naming the call, the numeric code and the library's own text.

pub mod ffi;

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crossbeam_channel::Sender;

use crate::error::{Error, Result};
use crate::source::Extent;

/// Library versions searched, newest first, as `<libdir>/lib64/libvixDiskLib.so.N` (as nbdkit's vddk plugin).
pub const SUPPORTED_MAJORS: [u32; 3] = [8, 7, 6];

/// The resolved entry points. Function pointers stay valid as long as `_lib` is loaded (for the process).
struct Fns {
    init_ex: ffi::InitEx,
    exit: ffi::Exit,
    allocate_connect_params: Option<ffi::AllocateConnectParams>,
    free_connect_params: Option<ffi::FreeConnectParams>,
    prepare_for_access: Option<ffi::PrepareForAccess>,
    end_access: Option<ffi::PrepareForAccess>,
    connect_ex: ffi::ConnectEx,
    disconnect: ffi::Disconnect,
    open: ffi::Open,
    close: ffi::Close,
    get_info: ffi::GetInfo,
    free_info: ffi::FreeInfo,
    get_transport_mode: Option<ffi::GetTransportMode>,
    read: ffi::Read,
    write: Option<ffi::Write>,
    flush: Option<ffi::Flush>,
    read_async: Option<ffi::ReadAsync>,
    wait: Option<ffi::Wait>,
    query_allocated_blocks: Option<ffi::QueryAllocatedBlocks>,
    create: Option<ffi::Create>,
    clone: Option<ffi::Clone>,
    free_block_list: Option<ffi::FreeBlockList>,
    get_error_text: ffi::GetErrorText,
    free_error_text: ffi::FreeErrorText,
}

type Job = Box<dyn FnOnce() + Send>;

/// The identity `PrepareForAccess` and `EndAccess` are called with: one process may end another's access.
const IDENTITY: &std::ffi::CStr = c"diskvault";

/// The largest virtual disk VMware supports is 62 TB; a library reporting more is not believed.
const MAX_CAPACITY: u64 = 64 << 40;

/// The loaded, initialized library (one per process).
pub struct Library {
    fns: Fns,
    path: PathBuf,
    major: u32,
    owner: Mutex<Sender<Job>>,
    _lib: libloading::Library,
}

static LIBRARY: OnceLock<std::result::Result<Arc<Library>, String>> = OnceLock::new();

/// A raw pointer handed between the owner thread and an I/O thread. The library allows a handle to be used
/// from any one thread at a time; [`Disk`] enforces the "one at a time".
#[derive(Clone, Copy)]
struct Ptr(*mut c_void);
// SAFETY: see above; the pointers are opaque library objects, never dereferenced here.
unsafe impl Send for Ptr {}

impl Library {
    /// Loads and initializes the library from `libdir` (once per process; later calls return the same one,
    /// or an error if they name another directory).
    pub fn load(libdir: &Path) -> Result<Arc<Library>> {
        let loaded = LIBRARY.get_or_init(|| Library::load_new(libdir).map(Arc::new).map_err(|e| e.to_string()));
        match loaded {
            Ok(lib) if lib.path.starts_with(libdir) => Ok(lib.clone()),
            Ok(lib) => Err(Error::invalid(format!(
                "the VDDK was loaded from {} already; one process uses one library",
                lib.path.display()
            ))),
            Err(e) => Err(Error::invalid(e.clone())),
        }
    }

    fn load_new(libdir: &Path) -> Result<Library> {
        let lib64 = libdir.join("lib64");
        let mut tried = Vec::new();
        for major in SUPPORTED_MAJORS {
            let path = lib64.join(format!("libvixDiskLib.so.{major}"));
            if !path.exists() {
                tried.push(path.display().to_string());
                continue;
            }
            // SAFETY: loading a shared library runs its initializers; that is what using the VDDK means.
            let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| {
                Error::invalid(format!(
                    "cannot load the VDDK {}: {e} (its own libraries must be found: diskvault adds {} to \
                     LD_LIBRARY_PATH itself when --vddk-libdir is given)",
                    path.display(),
                    lib64.display()
                ))
            })?;
            let fns = resolve(&lib, &path)?;
            return Library::init(lib, fns, path, major);
        }
        let other = std::fs::read_dir(&lib64)
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("libvixDiskLib.so."))
            .collect::<Vec<_>>();
        let hint = if !other.is_empty() {
            format!("; found {} (diskvault supports VDDK 6, 7 and 8)", other.join(", "))
        } else if SUPPORTED_MAJORS.iter().any(|m| libdir.join(format!("libvixDiskLib.so.{m}")).exists()) {
            format!("; {} holds the library itself: give the directory above it", libdir.display())
        } else {
            String::new()
        };
        Err(Error::invalid(format!("no VDDK library: looked for {}{hint}", tried.join(", "))))
    }

    fn init(lib: libloading::Library, fns: Fns, path: PathBuf, major: u32) -> Result<Library> {
        let libdir = path.parent().and_then(Path::parent).unwrap_or(Path::new("/"));
        let libdir_c = CString::new(libdir.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::invalid("the VDDK directory contains a NUL byte"))?;
        // SAFETY: arguments as the ABI defines; the callbacks are thread-safe and live for the process.
        let err =
            unsafe { (fns.init_ex)(major, 0, log_info, log_warn, log_panic, libdir_c.as_ptr(), std::ptr::null()) };
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let library = Library { fns, path, major, owner: Mutex::new(tx), _lib: lib };
        if err != ffi::VIX_OK {
            return Err(library.error("VixDiskLib_InitEx", err, &format!("VDDK {major}")));
        }
        // The owner thread starts after InitEx, as the guide asks of every thread that calls the library.
        std::thread::Builder::new()
            .name("vddk-owner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .map_err(|e| Error::invalid(format!("cannot start the VDDK thread: {e}")))?;
        tracing::info!("VDDK {major} loaded from {}", library.path.display());
        Ok(library)
    }

    pub fn major(&self) -> u32 {
        self.major
    }

    /// Runs `f` on the thread that owns connect/open/close.
    fn on_owner<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.owner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .expect("the VDDK owner thread runs for the process");
        rx.recv().expect("the VDDK owner thread answers every job")
    }

    /// The library's text for a VIX error, as an error naming the call and what it was about.
    fn error(&self, call: &str, err: ffi::VixError, about: &str) -> Error {
        // SAFETY: GetErrorText returns a library-allocated C string (or NULL) freed with FreeErrorText.
        let text = unsafe {
            let p = (self.fns.get_error_text)(err, std::ptr::null());
            if p.is_null() {
                "no description".to_string()
            } else {
                let s = CStr::from_ptr(p).to_string_lossy().into_owned();
                (self.fns.free_error_text)(p);
                s
            }
        };
        Error::source(about.to_string(), format!("{call} failed: VIX error {}: {text}", err & 0xFFFF))
    }

    /// Calls `VixDiskLib_Exit` (once, when the process is done with the library).
    pub fn exit(&self) {
        let f = self.fns.exit;
        // SAFETY: no handle or connection is open any more when the caller exits the library.
        self.on_owner(move || unsafe { f() });
    }
}

fn resolve(lib: &libloading::Library, path: &Path) -> Result<Fns> {
    fn req<T: Copy>(lib: &libloading::Library, path: &Path, name: &str) -> Result<T> {
        // SAFETY: the symbol's type is the one the VDDK ABI defines for that name.
        unsafe { lib.get::<T>(name.as_bytes()) }
            .map(|s| *s)
            .map_err(|_| Error::invalid(format!("{} is not a usable VDDK: it has no {name}", path.display())))
    }
    fn opt<T: Copy>(lib: &libloading::Library, name: &str) -> Option<T> {
        // SAFETY: as above.
        unsafe { lib.get::<T>(name.as_bytes()) }.ok().map(|s| *s)
    }
    Ok(Fns {
        init_ex: req(lib, path, "VixDiskLib_InitEx")?,
        exit: req(lib, path, "VixDiskLib_Exit")?,
        allocate_connect_params: opt(lib, "VixDiskLib_AllocateConnectParams"),
        free_connect_params: opt(lib, "VixDiskLib_FreeConnectParams"),
        prepare_for_access: opt(lib, "VixDiskLib_PrepareForAccess"),
        end_access: opt(lib, "VixDiskLib_EndAccess"),
        connect_ex: req(lib, path, "VixDiskLib_ConnectEx")?,
        disconnect: req(lib, path, "VixDiskLib_Disconnect")?,
        open: req(lib, path, "VixDiskLib_Open")?,
        close: req(lib, path, "VixDiskLib_Close")?,
        get_info: req(lib, path, "VixDiskLib_GetInfo")?,
        free_info: req(lib, path, "VixDiskLib_FreeInfo")?,
        get_transport_mode: opt(lib, "VixDiskLib_GetTransportMode"),
        read: req(lib, path, "VixDiskLib_Read")?,
        write: opt(lib, "VixDiskLib_Write"),
        flush: opt(lib, "VixDiskLib_Flush"),
        read_async: opt(lib, "VixDiskLib_ReadAsync"),
        wait: opt(lib, "VixDiskLib_Wait"),
        query_allocated_blocks: opt(lib, "VixDiskLib_QueryAllocatedBlocks"),
        create: opt(lib, "VixDiskLib_Create"),
        clone: opt(lib, "VixDiskLib_Clone"),
        free_block_list: opt(lib, "VixDiskLib_FreeBlockList"),
        get_error_text: req(lib, path, "VixDiskLib_GetErrorText")?,
        free_error_text: req(lib, path, "VixDiskLib_FreeErrorText")?,
    })
}

extern "C" {
    fn vsnprintf(buf: *mut c_char, size: usize, fmt: *const c_char, ap: *mut c_void) -> std::ffi::c_int;
}

/// Formats a `printf` format and `va_list` from the library.
///
/// # Safety
/// `fmt` and `args` must be what the library passed to a log callback. On x86_64 a `va_list` parameter is a
/// pointer to the argument area, which is what `vsnprintf` takes.
unsafe fn format_log(fmt: *const c_char, args: *mut c_void) -> String {
    if fmt.is_null() {
        return String::new();
    }
    if cfg!(target_arch = "x86_64") {
        let mut buf = vec![0u8; 2048];
        let n = vsnprintf(buf.as_mut_ptr().cast(), buf.len(), fmt, args);
        let n = (n.max(0) as usize).min(buf.len() - 1);
        String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
    } else {
        CStr::from_ptr(fmt).to_string_lossy().trim_end().to_string()
    }
}

unsafe extern "C" fn log_info(fmt: *const c_char, args: *mut c_void) {
    tracing::debug!(target: "diskvault::vddk", "{}", format_log(fmt, args));
}

unsafe extern "C" fn log_warn(fmt: *const c_char, args: *mut c_void) {
    tracing::warn!(target: "diskvault::vddk", "VDDK: {}", format_log(fmt, args));
}

unsafe extern "C" fn log_panic(fmt: *const c_char, args: *mut c_void) {
    tracing::error!(target: "diskvault::vddk", "VDDK panic: {}", format_log(fmt, args));
}

/// How to authenticate to vCenter/ESXi.
#[derive(Clone, Debug)]
pub enum Credentials {
    Password {
        user: String,
        password: String,
    },
    /// An existing vSphere API session (`vmware_soap_session` cookie): no second login.
    Session {
        cookie: String,
        user: String,
    },
    /// A hosted disk on this machine (a local connection: no server, no VM).
    Local,
}

/// Which disk of which VM, through which server; or a hosted disk on this machine ([`DiskTarget::hosted`]).
#[derive(Clone, Debug)]
pub struct DiskTarget {
    pub server: String,
    pub port: Option<u32>,
    /// SHA-1 thumbprint of the server's certificate (`AA:BB:…`), as the VDDK verifies it.
    pub thumbprint: Option<String>,
    pub credentials: Credentials,
    /// `vm-57`
    pub moref: String,
    /// The snapshot to read (`snapshot-12`); without one, the live disk (only for powered-off VMs).
    pub snapshot: Option<String>,
    /// `[datastore] vm/disk.vmdk`, as the snapshot's device backing names it.
    pub path: String,
    /// `nbdssl:nbd`…; `None` lets the library choose.
    pub transports: Option<String>,
}

impl DiskTarget {
    /// A hosted (local) VMDK file, reached through a local connection.
    pub fn hosted(path: &Path) -> DiskTarget {
        DiskTarget {
            server: String::new(),
            port: None,
            thumbprint: None,
            credentials: Credentials::Local,
            moref: String::new(),
            snapshot: None,
            path: path.to_string_lossy().into_owned(),
            transports: None,
        }
    }

    fn is_local(&self) -> bool {
        matches!(self.credentials, Credentials::Local)
    }

    fn describe(&self) -> String {
        if self.is_local() {
            return format!("VMDK {}", self.path);
        }
        let snapshot = self.snapshot.as_ref().map(|s| format!(", {s}")).unwrap_or_default();
        format!("vddk://{}/{} ({}{snapshot})", self.server, self.path, self.moref)
    }
}

/// Owns the C strings the connect parameters point into.
struct Params {
    raw: *mut ffi::ConnectParams,
    allocated_by_library: bool,
    _strings: Vec<CString>,
}

// SAFETY: the parameters are plain data owned by one Disk; they move between the owner and I/O threads only
// through `Library::on_owner` calls that the Disk serializes.
unsafe impl Send for Params {}

impl Params {
    fn new(lib: &Library, t: &DiskTarget) -> Result<Params> {
        let mut strings = Vec::new();
        let mut cstr = |s: &str| -> Result<*mut c_char> {
            let c = CString::new(s).map_err(|_| Error::invalid(format!("{s:?} contains a NUL byte")))?;
            let p = c.as_ptr() as *mut c_char;
            strings.push(c);
            Ok(p)
        };
        // SAFETY: AllocateConnectParams returns zeroed parameters (or calloc'ed ones for VDDK < 6.7).
        let (raw, allocated_by_library) = match lib.fns.allocate_connect_params {
            Some(f) => (unsafe { f() }, true),
            None => (Box::into_raw(Box::new(unsafe { std::mem::zeroed::<ffi::ConnectParams>() })), false),
        };
        if raw.is_null() {
            return Err(Error::invalid("VixDiskLib_AllocateConnectParams returned nothing"));
        }
        // Owned from here on: dropped (and freed) also if a parameter below is refused.
        let mut p = Params { raw, allocated_by_library, _strings: Vec::new() };
        // SAFETY: raw points to a valid ConnectParams we own; the strings outlive it (kept in `_strings`).
        unsafe {
            let r = &mut *raw;
            if t.is_local() {
                // A local connection: every field stays empty.
                p._strings = strings;
                return Ok(p);
            }
            r.vmx_spec = cstr(&format!("moref={}", t.moref))?;
            r.server_name = cstr(&t.server)?;
            r.thumb_print = match &t.thumbprint {
                Some(tp) => cstr(tp)?,
                None => std::ptr::null_mut(),
            };
            r.port = t.port.unwrap_or(0);
            match &t.credentials {
                Credentials::Password { user, password } => {
                    r.cred_type = ffi::CRED_UID;
                    r.creds.uid = ffi::UidCreds { user_name: cstr(user)?, password: cstr(password)? };
                }
                Credentials::Session { cookie, user } => {
                    r.cred_type = ffi::CRED_SESSIONID;
                    r.creds.session_id =
                        ffi::SessionIdCreds { cookie: cstr(cookie)?, user_name: cstr(user)?, key: cstr("diskvault")? };
                }
                Credentials::Local => unreachable!("returned above"),
            }
        }
        p._strings = strings;
        Ok(p)
    }
}

impl Drop for Params {
    fn drop(&mut self) {
        if self.raw.is_null() {
            return;
        }
        if self.allocated_by_library {
            if let Some(f) = LIBRARY.get().and_then(|l| l.as_ref().ok()).and_then(|l| l.fns.free_connect_params) {
                // SAFETY: allocated by AllocateConnectParams; our strings are detached first.
                unsafe {
                    let r = &mut *self.raw;
                    r.vmx_spec = std::ptr::null_mut();
                    r.server_name = std::ptr::null_mut();
                    r.thumb_print = std::ptr::null_mut();
                    r.creds.session_id = ffi::SessionIdCreds {
                        cookie: std::ptr::null_mut(),
                        user_name: std::ptr::null_mut(),
                        key: std::ptr::null_mut(),
                    };
                    f(self.raw);
                }
            }
        } else {
            // SAFETY: created by Box::into_raw above.
            drop(unsafe { Box::from_raw(self.raw) });
        }
    }
}

/// An open, read-only disk: connection, handle, and the access preparation that must be ended.
pub struct Disk {
    lib: Arc<Library>,
    params: Option<Params>,
    prepared: bool,
    connection: Ptr,
    handle: Ptr,
    capacity: u64,
    transport: String,
    about: String,
}

// SAFETY: a Disk is used by one thread at a time (`&mut self` for I/O); open/close run on the owner thread.
unsafe impl Send for Disk {}

impl Disk {
    /// `PrepareForAccess` → `ConnectEx` → `Open` (read-only) → `GetInfo`, on the owner thread. On failure,
    /// everything done so far is undone (`EndAccess` included).
    pub fn open(lib: Arc<Library>, target: &DiskTarget) -> Result<Disk> {
        Disk::open_mode(lib, target, false)
    }

    /// Opens the disk for reading and writing (restore into VMware). The guide asks for an explicit
    /// transport for writes (`nbdssl` unless the target says otherwise).
    pub fn open_writable(lib: Arc<Library>, target: &DiskTarget) -> Result<Disk> {
        if lib.fns.write.is_none() {
            return Err(Error::invalid("this VDDK has no VixDiskLib_Write"));
        }
        let mut t = target.clone();
        if !t.is_local() {
            t.transports.get_or_insert_with(|| "nbdssl".to_string());
        }
        Disk::open_mode(lib, &t, true)
    }

    fn open_mode(lib: Arc<Library>, target: &DiskTarget, writable: bool) -> Result<Disk> {
        let about = target.describe();
        let params = Params::new(&lib, target)?;
        let mut disk = Disk {
            lib: lib.clone(),
            params: Some(params),
            prepared: false,
            connection: Ptr(std::ptr::null_mut()),
            handle: Ptr(std::ptr::null_mut()),
            capacity: 0,
            transport: String::new(),
            about,
        };
        let raw = Ptr(disk.params.as_ref().expect("set above").raw.cast());
        // PrepareForAccess protects a VM from relocation; a hosted disk has none.
        let prepare = if target.is_local() { None } else { lib.fns.prepare_for_access };
        let fns = (prepare, lib.fns.connect_ex, lib.fns.open, lib.fns.get_info, lib.fns.free_info);
        let (snapshot, transports, path) = (
            target.snapshot.as_deref().map(CString::new).transpose(),
            target.transports.as_deref().map(CString::new).transpose(),
            CString::new(target.path.as_str()),
        );
        let (Ok(snapshot), Ok(transports), Ok(path)) = (snapshot, transports, path) else {
            return Err(Error::invalid("a VDDK parameter contains a NUL byte"));
        };
        let opened = lib.on_owner(move || {
            let raw = raw;
            let params = raw.0 as *const ffi::ConnectParams;
            let mut out = OpenSteps {
                prepared: false,
                connection: Ptr(std::ptr::null_mut()),
                handle: Ptr(std::ptr::null_mut()),
                capacity: 0,
                error: None,
            };
            // SAFETY: every pointer is valid for the call; out-parameters are written by the library.
            unsafe {
                if let Some(prepare) = fns.0 {
                    let e = prepare(params, IDENTITY.as_ptr());
                    if e != ffi::VIX_OK {
                        out.error = Some(("VixDiskLib_PrepareForAccess", e));
                        return out;
                    }
                    out.prepared = true;
                }
                let mut conn: ffi::Connection = std::ptr::null_mut();
                let e = (fns.1)(
                    params,
                    if writable { 0 } else { 1 },
                    snapshot.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                    transports.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                    &mut conn,
                );
                if e != ffi::VIX_OK {
                    out.error = Some(("VixDiskLib_ConnectEx", e));
                    return out;
                }
                out.connection = Ptr(conn);
                let mut handle: ffi::Handle = std::ptr::null_mut();
                let flags = if writable { 0 } else { ffi::OPEN_READ_ONLY };
                let e = (fns.2)(conn, path.as_ptr(), flags, &mut handle);
                if e != ffi::VIX_OK {
                    out.error = Some(("VixDiskLib_Open", e));
                    return out;
                }
                out.handle = Ptr(handle);
                let mut info: *mut ffi::Info = std::ptr::null_mut();
                let e = (fns.3)(handle, &mut info);
                if e != ffi::VIX_OK || info.is_null() {
                    out.error = Some(("VixDiskLib_GetInfo", e));
                    return out;
                }
                out.capacity = (*info).capacity.saturating_mul(ffi::SECTOR_SIZE);
                (fns.4)(info);
            }
            out
        });
        disk.prepared = opened.prepared;
        disk.connection = opened.connection;
        disk.handle = opened.handle;
        disk.capacity = opened.capacity;
        let err = match opened.error {
            Some((call, e)) => Some(lib.error(call, e, &disk.about)),
            None if disk.capacity > MAX_CAPACITY => Some(Error::source(
                disk.about.clone(),
                format!("VixDiskLib_GetInfo reports {} bytes, more than any VMware disk (62 TB)", disk.capacity),
            )),
            None => None,
        };
        if let Some(err) = err {
            drop(disk); // closes what was opened, ends the access
            return Err(err);
        }
        disk.transport = match lib.fns.get_transport_mode {
            // SAFETY: returns a static string owned by the library.
            Some(f) => unsafe {
                let p = f(disk.handle.0);
                if p.is_null() {
                    "unknown".into()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            },
            None => "unknown".into(),
        };
        tracing::info!("{}: opened with transport {}", disk.about, disk.transport);
        Ok(disk)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The transport mode the library chose (`nbdssl`, `hotadd`, `san`…).
    pub fn transport(&self) -> &str {
        &self.transport
    }

    pub fn describe(&self) -> &str {
        &self.about
    }

    /// Reads whole sectors at a sector-aligned offset, on the calling thread.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let ss = ffi::SECTOR_SIZE;
        if !offset.is_multiple_of(ss) || !(buf.len() as u64).is_multiple_of(ss) {
            return Err(Error::invalid(format!(
                "{}: a VDDK read must be whole sectors (offset {offset}, {} bytes)",
                self.about,
                buf.len()
            )));
        }
        // SAFETY: the handle is open, buf holds count sectors, and `&mut self` keeps other I/O off the handle.
        let e = unsafe { (self.lib.fns.read)(self.handle.0, offset / ss, buf.len() as u64 / ss, buf.as_mut_ptr()) };
        if e != ffi::VIX_OK {
            let err = self.lib.error("VixDiskLib_Read", e, &self.about);
            return Err(Error::source(
                self.about.clone(),
                format!("read of {} bytes at offset {offset}: {err}", buf.len()),
            ));
        }
        Ok(())
    }

    /// Reads several ranges with `ReadAsync` (all queued, then one `Wait`), where the library has it; else one
    /// `Read` after another. Offsets and lengths are whole sectors.
    pub fn read_many(&mut self, reads: &mut [(u64, Vec<u8>)]) -> Result<()> {
        let ss = ffi::SECTOR_SIZE;
        let (Some(read_async), Some(wait)) = (self.lib.fns.read_async, self.lib.fns.wait) else {
            for (offset, buf) in reads.iter_mut() {
                self.read_at(*offset, buf)?;
            }
            return Ok(());
        };
        if reads.iter().any(|(o, b)| !o.is_multiple_of(ss) || !(b.len() as u64).is_multiple_of(ss)) {
            return Err(Error::invalid(format!("{}: a VDDK read must be whole sectors", self.about)));
        }
        use std::sync::atomic::Ordering::SeqCst;
        const PENDING: u64 = u64::MAX;
        let results: Vec<std::sync::atomic::AtomicU64> =
            reads.iter().map(|_| std::sync::atomic::AtomicU64::new(PENDING)).collect();
        let mut queue_error = None;
        for (i, (offset, buf)) in reads.iter_mut().enumerate() {
            let slot = &results[i] as *const std::sync::atomic::AtomicU64 as *mut c_void;
            // SAFETY: the buffer and the result slot outlive the Wait below, which completes every queued read.
            let e = unsafe {
                read_async(self.handle.0, *offset / ss, buf.len() as u64 / ss, buf.as_mut_ptr(), read_done, slot)
            };
            if e == ffi::VIX_OK {
                // Completed synchronously: the callback may not follow.
                let _ = results[i].compare_exchange(PENDING, ffi::VIX_OK, SeqCst, SeqCst);
            } else if e != ffi::VIX_ASYNC {
                queue_error = Some((i, e));
                break;
            }
        }
        // SAFETY: the handle is open; Wait returns when every queued read has completed.
        let waited = unsafe { wait(self.handle.0) };
        if let Some((i, e)) = queue_error {
            let err = self.lib.error("VixDiskLib_ReadAsync", e, &self.about);
            return Err(Error::source(self.about.clone(), format!("read at offset {}: {err}", reads[i].0)));
        }
        if waited != ffi::VIX_OK {
            return Err(self.lib.error("VixDiskLib_Wait", waited, &self.about));
        }
        for (i, r) in results.iter().enumerate() {
            let e = r.load(SeqCst);
            if e == PENDING {
                return Err(Error::source(self.about.clone(), "VixDiskLib_Wait returned before a read completed"));
            }
            if e != ffi::VIX_OK {
                let err = self.lib.error("VixDiskLib_ReadAsync", e, &self.about);
                return Err(Error::source(
                    self.about.clone(),
                    format!("read of {} bytes at offset {}: {err}", reads[i].1.len(), reads[i].0),
                ));
            }
        }
        Ok(())
    }

    /// Writes whole sectors at a sector-aligned offset (a disk opened with [`Disk::open_writable`]).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let ss = ffi::SECTOR_SIZE;
        let write = self.lib.fns.write.ok_or_else(|| Error::invalid("this VDDK has no VixDiskLib_Write"))?;
        if !offset.is_multiple_of(ss) || !(data.len() as u64).is_multiple_of(ss) {
            return Err(Error::invalid(format!("{}: a VDDK write must be whole sectors", self.about)));
        }
        // SAFETY: as for reads; the data outlives the call.
        let e = unsafe { write(self.handle.0, offset / ss, data.len() as u64 / ss, data.as_ptr()) };
        if e != ffi::VIX_OK {
            let err = self.lib.error("VixDiskLib_Write", e, &self.about);
            return Err(Error::source(
                self.about.clone(),
                format!("write of {} bytes at offset {offset}: {err}", data.len()),
            ));
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        if let Some(f) = self.lib.fns.flush {
            // SAFETY: the handle is open.
            let e = unsafe { f(self.handle.0) };
            if e != ffi::VIX_OK {
                return Err(self.lib.error("VixDiskLib_Flush", e, &self.about));
            }
        }
        Ok(())
    }

    /// The allocated byte ranges (`QueryAllocatedBlocks`, on the owner thread), or `None` if the library
    /// cannot tell (VDDK before 6.7).
    pub fn allocated(&mut self, chunk_bytes: u64) -> Result<Option<Vec<Extent>>> {
        let (Some(query), Some(free)) = (self.lib.fns.query_allocated_blocks, self.lib.fns.free_block_list) else {
            return Ok(None);
        };
        let ss = ffi::SECTOR_SIZE;
        let chunk = (chunk_bytes / ss).max(ffi::MIN_CHUNK_SECTORS);
        let sectors = self.capacity / ss;
        let whole = sectors / chunk * chunk;
        let handle = self.handle;
        let result = self.lib.on_owner(move || {
            let handle = handle;
            // (offset, length) in sectors, as the library answered.
            let mut out: Vec<(u64, u64)> = Vec::new();
            let mut start = 0u64;
            while start < whole {
                let n = (whole - start).min(ffi::MAX_CHUNKS_PER_QUERY * chunk);
                let mut list: *mut ffi::BlockList = std::ptr::null_mut();
                // SAFETY: start and n are chunk multiples within the disk; the list is freed below.
                let e = unsafe { query(handle.0, start, n, chunk, &mut list) };
                if e != ffi::VIX_OK {
                    return Err((e, start));
                }
                if !list.is_null() {
                    // SAFETY: the library wrote num_blocks entries starting at `blocks`.
                    unsafe {
                        let count = (*list).num_blocks as usize;
                        let blocks = std::slice::from_raw_parts((*list).blocks.as_ptr(), count);
                        out.extend(blocks.iter().map(|b| (b.offset, b.length)));
                        free(list);
                    }
                }
                start += n;
            }
            Ok(out)
        });
        let mut sectors = result.map_err(|(e, at)| {
            self.lib.error("VixDiskLib_QueryAllocatedBlocks", e, &format!("{} at sector {at}", self.about))
        })?;
        // Sorted and merged here, with checked arithmetic: the library's numbers are not trusted to be sane.
        sectors.sort_unstable();
        let mut extents: Vec<Extent> = Vec::new();
        for (offset, length) in sectors {
            let (Some(start), Some(length)) = (offset.checked_mul(ss), length.checked_mul(ss)) else {
                return Err(Error::source(
                    self.about.clone(),
                    format!("QueryAllocatedBlocks answered sector {offset} (+{length}), beyond any disk"),
                ));
            };
            let end = start.saturating_add(length);
            match extents.last_mut() {
                Some(l) if l.end() >= start => l.length = l.length.max(end - l.start),
                _ => extents.push(Extent { start, length }),
            }
        }
        // The guide: a tail shorter than a chunk may go unchecked; count it as allocated.
        if whole * ss < self.capacity {
            extents.push(Extent { start: whole * ss, length: self.capacity - whole * ss });
        }
        crate::source::changes::validate(&extents, self.capacity).map_err(|e| {
            Error::source(self.about.clone(), format!("QueryAllocatedBlocks answered ranges outside the disk: {e}"))
        })?;
        Ok(Some(extents))
    }
}

/// `EndAccess` for a disk of `target`'s VM on behalf of a backup that died between its `PrepareForAccess` and
/// `EndAccess`: the guide's remedy, so that the VM can be relocated (vMotion) again.
pub fn end_abandoned_access(lib: &Arc<Library>, target: &DiskTarget) -> Result<()> {
    let end = lib.fns.end_access.ok_or_else(|| Error::invalid("this VDDK has no VixDiskLib_EndAccess"))?;
    let params = Params::new(lib, target)?;
    let raw = Ptr(params.raw.cast());
    let e = lib.on_owner(move || {
        let raw = raw;
        // SAFETY: the parameters outlive the call.
        unsafe { end(raw.0 as *const ffi::ConnectParams, IDENTITY.as_ptr()) }
    });
    drop(params);
    if e != ffi::VIX_OK {
        return Err(lib.error("VixDiskLib_EndAccess", e, &target.describe()));
    }
    Ok(())
}

/// Creates a new, empty hosted VMDK (monolithicSparse, LSI Logic, hardware version 7) of `capacity` bytes at
/// `path` with `VixDiskLib_Create` on a local connection. The guide: Create makes hosted disks only; a managed
/// disk on a datastore is a hosted one cloned there ([`clone_to_datastore`]).
pub fn create_hosted(lib: &Arc<Library>, path: &Path, capacity: u64) -> Result<()> {
    let about = format!("VMDK {}", path.display());
    let create = lib.fns.create.ok_or_else(|| Error::invalid("this VDDK has no VixDiskLib_Create"))?;
    let local = Params::new(lib, &DiskTarget::hosted(path))?;
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::invalid(format!("{} contains a NUL byte", path.display())))?;
    let params = create_params(ffi::DISK_MONOLITHIC_SPARSE, capacity);
    let (connect, disconnect, raw) = (lib.fns.connect_ex, lib.fns.disconnect, Ptr(local.raw.cast()));
    let result = lib.on_owner(move || {
        let raw = raw;
        let mut conn: ffi::Connection = std::ptr::null_mut();
        // SAFETY: the parameters, path and create parameters outlive the calls; the connection is closed here.
        unsafe {
            let e = connect(raw.0 as *const ffi::ConnectParams, 0, std::ptr::null(), std::ptr::null(), &mut conn);
            if e != ffi::VIX_OK {
                return Err(("VixDiskLib_ConnectEx", e));
            }
            let e = create(conn, c_path.as_ptr(), &params, None, std::ptr::null_mut());
            disconnect(conn);
            if e != ffi::VIX_OK {
                return Err(("VixDiskLib_Create", e));
            }
        }
        Ok(())
    });
    drop(local);
    result.map_err(|(call, e)| lib.error(call, e, &about))
}

/// Copies the hosted VMDK `hosted` onto a datastore as the thin managed disk `target.path`
/// (`[datastore] dir/name.vmdk`), with `VixDiskLib_Clone` over `target`'s connection (for its VM). Refuses to
/// replace an existing disk.
pub fn clone_to_datastore(lib: &Arc<Library>, hosted: &Path, target: &DiskTarget, capacity: u64) -> Result<()> {
    let about = target.describe();
    let clone = lib.fns.clone.ok_or_else(|| Error::invalid("this VDDK has no VixDiskLib_Clone"))?;
    let mut remote_target = target.clone();
    remote_target.transports.get_or_insert_with(|| "nbdssl".to_string());
    let remote = Params::new(lib, &remote_target)?;
    let local = Params::new(lib, &DiskTarget::hosted(hosted))?;
    let (Ok(src), Ok(dst), Ok(modes)) = (
        CString::new(hosted.as_os_str().as_encoded_bytes()),
        CString::new(target.path.as_str()),
        CString::new(remote_target.transports.clone().unwrap_or_default()),
    ) else {
        return Err(Error::invalid("a VDDK parameter contains a NUL byte"));
    };
    let params = create_params(ffi::DISK_VMFS_THIN, capacity);
    let (connect, disconnect) = (lib.fns.connect_ex, lib.fns.disconnect);
    let (remote_raw, local_raw) = (Ptr(remote.raw.cast()), Ptr(local.raw.cast()));
    let result = lib.on_owner(move || {
        let (remote_raw, local_raw) = (remote_raw, local_raw);
        let (mut dst_conn, mut src_conn): (ffi::Connection, ffi::Connection) =
            (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: every pointer outlives the calls; both connections are closed before returning.
        unsafe {
            let e =
                connect(remote_raw.0 as *const ffi::ConnectParams, 0, std::ptr::null(), modes.as_ptr(), &mut dst_conn);
            if e != ffi::VIX_OK {
                return Err(("VixDiskLib_ConnectEx", e));
            }
            let e =
                connect(local_raw.0 as *const ffi::ConnectParams, 1, std::ptr::null(), std::ptr::null(), &mut src_conn);
            if e != ffi::VIX_OK {
                disconnect(dst_conn);
                return Err(("VixDiskLib_ConnectEx (local)", e));
            }
            let e = clone(dst_conn, dst.as_ptr(), src_conn, src.as_ptr(), &params, None, std::ptr::null_mut(), 0);
            disconnect(src_conn);
            disconnect(dst_conn);
            if e != ffi::VIX_OK {
                return Err(("VixDiskLib_Clone", e));
            }
        }
        Ok(())
    });
    drop((remote, local));
    result.map_err(|(call, e)| lib.error(call, e, &about))
}

fn create_params(disk_type: std::ffi::c_int, capacity: u64) -> ffi::CreateParams {
    ffi::CreateParams {
        disk_type,
        adapter_type: ffi::ADAPTER_SCSI_LSILOGIC,
        hw_version: ffi::HWVERSION_ESX4X,
        capacity: capacity.div_ceil(ffi::SECTOR_SIZE),
        logical_sector_size: ffi::SECTOR_SIZE as u32,
        physical_sector_size: ffi::SECTOR_SIZE as u32,
    }
}

/// Completion callback of `ReadAsync`: stores the result in the caller's slot.
unsafe extern "C" fn read_done(data: *mut c_void, result: ffi::VixError) {
    // SAFETY: `data` is the AtomicU64 slot `read_many` passed, alive until its Wait returns.
    let slot = unsafe { &*(data as *const std::sync::atomic::AtomicU64) };
    slot.store(result, std::sync::atomic::Ordering::SeqCst);
}

/// What the owner thread did while opening.
struct OpenSteps {
    prepared: bool,
    connection: Ptr,
    handle: Ptr,
    capacity: u64,
    error: Option<(&'static str, ffi::VixError)>,
}

impl Drop for Disk {
    fn drop(&mut self) {
        let fns = (self.lib.fns.close, self.lib.fns.disconnect, self.lib.fns.end_access);
        let (handle, connection, prepared) = (self.handle, self.connection, self.prepared);
        let raw = Ptr(self.params.as_ref().map_or(std::ptr::null_mut(), |p| p.raw.cast()));
        let errors = self.lib.on_owner(move || {
            let (handle, connection, raw) = (handle, connection, raw);
            let mut errors = Vec::new();
            // SAFETY: each object is closed once, in reverse order of opening.
            unsafe {
                if !handle.0.is_null() {
                    let e = (fns.0)(handle.0);
                    if e != ffi::VIX_OK {
                        errors.push(("VixDiskLib_Close", e));
                    }
                }
                if !connection.0.is_null() {
                    let e = (fns.1)(connection.0);
                    if e != ffi::VIX_OK {
                        errors.push(("VixDiskLib_Disconnect", e));
                    }
                }
                if prepared {
                    if let Some(end) = fns.2 {
                        let e = end(raw.0 as *const ffi::ConnectParams, IDENTITY.as_ptr());
                        if e != ffi::VIX_OK {
                            errors.push(("VixDiskLib_EndAccess", e));
                        }
                    }
                }
            }
            errors
        });
        for (call, e) in errors {
            tracing::warn!("{}", self.lib.error(call, e, &self.about));
        }
        self.params.take();
    }
}

/// Calls `VixDiskLib_Exit` if the library was loaded (at the end of a command, after every disk is closed).
pub fn shutdown() {
    if let Some(Ok(lib)) = LIBRARY.get() {
        lib.exit();
    }
}

/// The real VDDK needs its own `lib64` on the dynamic loader's path. If it is missing, re-executes this
/// process with it added (the loader reads the variable only at start). Returns only if no re-exec is needed.
pub fn ensure_loader_path(libdir: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let lib64 = libdir.join("lib64");
    let current = std::env::var_os("LD_LIBRARY_PATH").unwrap_or_default();
    if std::env::split_paths(&current).any(|p| p == lib64) {
        return Ok(());
    }
    if std::env::var_os("DISKVAULT_VDDK_REEXEC").is_some() {
        return Err(Error::invalid(format!("could not put {} on LD_LIBRARY_PATH", lib64.display())));
    }
    let mut paths = vec![lib64.clone()];
    paths.extend(std::env::split_paths(&current));
    let joined = std::env::join_paths(paths).map_err(|e| Error::invalid(e.to_string()))?;
    let exe = std::env::current_exe().map_err(|e| Error::invalid(format!("cannot find this program: {e}")))?;
    tracing::debug!("re-executing with LD_LIBRARY_PATH={}", joined.to_string_lossy());
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", joined)
        .env("DISKVAULT_VDDK_REEXEC", "1")
        .exec();
    Err(Error::invalid(format!("cannot re-execute with {} on LD_LIBRARY_PATH: {err}", lib64.display())))
}
