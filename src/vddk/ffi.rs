//! The VDDK C ABI (VDDK 6.x-8.x, x86_64 LP64): the structs diskvault passes or reads, and the signatures of
//! the functions it calls. Layouts follow VMware's `vixDiskLib.h` as documented in ../shared/VMWARE.md §3;
//! the size assertions below pin them.

use std::ffi::{c_char, c_int, c_void};

pub type VixError = u64;
pub type Bool = c_char;
pub type Connection = *mut c_void;
pub type Handle = *mut c_void;

pub const VIX_OK: VixError = 0;
pub const VIX_ASYNC: u64 = 25000;
pub const SECTOR_SIZE: u64 = 512;
pub const OPEN_READ_ONLY: u32 = 4;
/// `VIXDISKLIB_DISK_MONOLITHIC_SPARSE`: a growable hosted disk in one file (what `Create` makes).
pub const DISK_MONOLITHIC_SPARSE: c_int = 1;
/// `VIXDISKLIB_DISK_VMFS_THIN`: a thin-provisioned managed disk on a datastore (what `Clone` makes there).
pub const DISK_VMFS_THIN: c_int = 7;
/// `VIXDISKLIB_ADAPTER_SCSI_LSILOGIC`.
pub const ADAPTER_SCSI_LSILOGIC: c_int = 3;
/// `VIXDISKLIB_HWVERSION_ESX4X`: readable by every ESXi diskvault can talk to.
pub const HWVERSION_ESX4X: u16 = 7;
pub const CRED_UID: c_int = 1;
pub const CRED_SESSIONID: c_int = 2;
/// Smallest chunk QueryAllocatedBlocks accepts (sectors), and the most chunks per call.
pub const MIN_CHUNK_SECTORS: u64 = 128;
pub const MAX_CHUNKS_PER_QUERY: u64 = 512 * 1024;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UidCreds {
    pub user_name: *mut c_char,
    pub password: *mut c_char,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SessionIdCreds {
    pub cookie: *mut c_char,
    pub user_name: *mut c_char,
    pub key: *mut c_char,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub union Creds {
    pub uid: UidCreds,
    pub session_id: SessionIdCreds,
    pub ticket_id: *mut c_void,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct VStorageObjSpec {
    pub id: *mut c_char,
    pub datastore_mo_ref: *mut c_char,
    pub ss_id: *mut c_char,
}

#[repr(C)]
pub struct ConnectParams {
    pub vmx_spec: *mut c_char,
    pub server_name: *mut c_char,
    pub thumb_print: *mut c_char,
    pub private_use: std::ffi::c_long,
    pub cred_type: c_int,
    pub creds: Creds,
    pub port: u32,
    pub nfc_host_port: u32,
    pub vim_api_ver: *mut c_char,
    pub reserved: [c_char; 8],
    pub state: *mut c_void,
    pub spec: VStorageObjSpec,
    pub spec_type: c_int,
}

#[repr(C)]
pub struct Geometry {
    pub cylinders: u32,
    pub heads: u32,
    pub sectors: u32,
}

/// `VixDiskLibInfo`; the last two fields exist from VDDK 7.0 on and are not read.
#[repr(C)]
pub struct Info {
    pub bios_geo: Geometry,
    pub phys_geo: Geometry,
    pub capacity: u64,
    pub adapter_type: c_int,
    pub num_links: c_int,
    pub parent_file_name_hint: *mut c_char,
    pub uuid: *mut c_char,
}

/// `VixDiskLibCreateParams` (32 bytes; the sector sizes exist from VDDK 7.0 on and are ignored before).
#[repr(C)]
pub struct CreateParams {
    pub disk_type: c_int,
    pub adapter_type: c_int,
    pub hw_version: u16,
    pub capacity: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Block {
    pub offset: u64,
    pub length: u64,
}

#[repr(C)]
pub struct BlockList {
    pub num_blocks: u32,
    pub blocks: [Block; 1],
}

pub type LogFunc = unsafe extern "C" fn(fmt: *const c_char, args: *mut c_void);

pub type InitEx = unsafe extern "C" fn(
    major: u32,
    minor: u32,
    log: LogFunc,
    warn: LogFunc,
    panic: LogFunc,
    lib_dir: *const c_char,
    config_file: *const c_char,
) -> VixError;
pub type Exit = unsafe extern "C" fn();
pub type AllocateConnectParams = unsafe extern "C" fn() -> *mut ConnectParams;
pub type FreeConnectParams = unsafe extern "C" fn(*mut ConnectParams);
pub type PrepareForAccess = unsafe extern "C" fn(*const ConnectParams, identity: *const c_char) -> VixError;
pub type ConnectEx = unsafe extern "C" fn(
    *const ConnectParams,
    read_only: Bool,
    snapshot_ref: *const c_char,
    transport_modes: *const c_char,
    out: *mut Connection,
) -> VixError;
pub type Disconnect = unsafe extern "C" fn(Connection) -> VixError;
pub type Open = unsafe extern "C" fn(Connection, path: *const c_char, flags: u32, out: *mut Handle) -> VixError;
pub type Close = unsafe extern "C" fn(Handle) -> VixError;
pub type GetInfo = unsafe extern "C" fn(Handle, out: *mut *mut Info) -> VixError;
pub type FreeInfo = unsafe extern "C" fn(*mut Info);
pub type GetTransportMode = unsafe extern "C" fn(Handle) -> *const c_char;
pub type Read = unsafe extern "C" fn(Handle, start: u64, count: u64, buf: *mut u8) -> VixError;
pub type Write = unsafe extern "C" fn(Handle, start: u64, count: u64, buf: *const u8) -> VixError;
pub type Flush = unsafe extern "C" fn(Handle) -> VixError;
pub type CompletionCb = unsafe extern "C" fn(data: *mut c_void, result: VixError);
pub type ReadAsync =
    unsafe extern "C" fn(Handle, start: u64, count: u64, buf: *mut u8, cb: CompletionCb, data: *mut c_void) -> VixError;
pub type Wait = unsafe extern "C" fn(Handle) -> VixError;
pub type ProgressFunc = unsafe extern "C" fn(data: *mut c_void, percent: c_int) -> Bool;
pub type Create = unsafe extern "C" fn(
    Connection,
    path: *const c_char,
    params: *const CreateParams,
    progress: Option<ProgressFunc>,
    data: *mut c_void,
) -> VixError;
pub type Clone = unsafe extern "C" fn(
    dst: Connection,
    dst_path: *const c_char,
    src: Connection,
    src_path: *const c_char,
    params: *const CreateParams,
    progress: Option<ProgressFunc>,
    data: *mut c_void,
    overwrite: Bool,
) -> VixError;
pub type QueryAllocatedBlocks =
    unsafe extern "C" fn(Handle, start: u64, count: u64, chunk: u64, out: *mut *mut BlockList) -> VixError;
pub type FreeBlockList = unsafe extern "C" fn(*mut BlockList) -> VixError;
pub type GetErrorText = unsafe extern "C" fn(VixError, locale: *const c_char) -> *mut c_char;
pub type FreeErrorText = unsafe extern "C" fn(*mut c_char);

const _: () = assert!(std::mem::size_of::<ConnectParams>() == 128);
const _: () = assert!(std::mem::offset_of!(ConnectParams, cred_type) == 32);
const _: () = assert!(std::mem::offset_of!(ConnectParams, creds) == 40);
const _: () = assert!(std::mem::offset_of!(ConnectParams, port) == 64);
const _: () = assert!(std::mem::offset_of!(ConnectParams, spec) == 96);
const _: () = assert!(std::mem::offset_of!(ConnectParams, spec_type) == 120);
const _: () = assert!(std::mem::offset_of!(Info, capacity) == 24);
const _: () = assert!(std::mem::offset_of!(Info, uuid) == 48);
const _: () = assert!(std::mem::offset_of!(BlockList, blocks) == 8);
const _: () = assert!(std::mem::size_of::<CreateParams>() == 32);
const _: () = assert!(std::mem::offset_of!(CreateParams, capacity) == 16);
