//! # diskvault
//!
//! Backs up virtual-machine disks into a content-addressed, deduplicating, encrypted repository and restores
//! them bit-exact. The library is usable on its own; `src/main.rs` is a thin wrapper around [`cli`].
//!
//! ## Code map
//!
//! | module | owns |
//! |---|---|
//! | [`format`](mod@format) | every stored object's bytes: config, key files, packs, index files, snapshots, checkpoints, and the recovery key's text (the contract in `format-spec/`) |
//! | [`crypto`] | the keyring (one secret per key epoch, `key rotate`), key derivation, keyed BLAKE3 block ids, AES-256-GCM sealing |
//! | [`backend`] | where objects live: the [`backend::Backend`] trait, the local-directory and S3 backends, bandwidth limits ([`backend::throttle`]) |
//! | [`repository`] | an open repository: unlocks keys, reads/writes objects and blobs, resolves snapshots |
//! | [`cache`] | the local RocksDB dedup index, a rebuildable cache of `index/` (every copy of a blob, and what each index file listed, so that it catches up with a prune file by file); one process of a host writes it, others read it below a private cache and hand it their page features; a host's cache directories, their last use and cleanup (`dirs`) |
//! | [`source`] | what is backed up: the [`source::DiskSource`] trait, raw files/block devices, NBD, VDDK, another repository's snapshots, change lists |
//! | [`backup`] | the backup pipeline: read → hash/dedup/compress/encrypt → pack → upload → index → manifest |
//! | [`delta`] | new blocks stored as zstd deltas against a similar stored block: page features, base choice (the frames themselves: `format::delta_frame`) |
//! | [`restore`] | restore of a snapshot disk to a file or block device, with verification |
//! | [`serve`] | snapshot disks as NBD exports: block reads with a blob cache and read-ahead for sequential readers, write overlays |
//! | [`guestfs`] | file-level restore (`ls`, `find`, `dump`, `extract`, `diff --files`): partition tables, LVM logical volumes, ext2/3/4, XFS and NTFS read in user space from [`serve`]'s disks, files copied out with their holes, permissions and times, or as a tar stream |
//! | [`diff`] | which blocks of a disk differ between two snapshots, from the manifests alone |
//! | [`copy`] | snapshots of another repository stored in this one: read through [`serve`]'s disks, stored by [`backup`], blocks sealed in the form the source stored them where both compress alike |
//! | [`check`] | repository integrity: structure, and every byte with `--read-data`; the pack headers this host found in agreement with the index (`headers`); what a restore of snapshots reads and how recently each was verified (`needed`); `backup --verify` through the index cache (`new_data`) |
//! | [`damage`] | the blob copies found damaged or lost (`damaged/` records, written by `check`, restores, `serve`): backups store them again, readers take intact copies, prune never keeps one in use |
//! | [`forget`] | retention policies: which snapshots to keep and why; protection |
//! | [`tag`] | changing the tags of stored snapshots (each written again under a new id) |
//! | [`nbd`] | the NBD protocol: a client (NBD exports as sources) and `serve` (snapshots as NBD exports), both with TLS |
//! | [`vmware`] | backup of a VMware VM: snapshot, changeIds, changed areas or allocated blocks, VDDK reads, snapshot removal, continuing an interrupted backup from its checkpoint; restore into VMware: onto a VM's disks (quick rollback with CBT), as a new VM where the recorded configuration or a placement says, the boot check (`--verify-boot`) |
//! | [`vsphere`] | the vSphere SOAP client: login with pinned or CA-verified TLS, inventory (VMs, folders, networks, inventory paths), CBT, snapshots, changed areas, creating and removing VMs, power, guest status; vSphere tags through the vAPI REST endpoint |
//! | [`vddk`] | VMware's VDDK loaded with libloading: connect, open, read, allocated blocks, under the guide's thread rules |
//! | [`lock`] | the exclusive lock, copy locks and session markers, with storage-clock expiry (at once for a holder gone from this host) |
//! | [`object_lock`] | S3 Object Lock retention kept ahead for everything the snapshots need (generations of extensions) |
//! | [`prune`] | mark, sweep, repack and two-phase deletion next to running backups, in bounded memory |
//! | [`repair`] | rebuilding the index from pack headers; adopting packs of interrupted backups; taking damaged packs out |
//! | [`stats`] | logical vs stored size, dedup and compression ratios, what each snapshot adds |
//! | [`progress`] | progress bars and periodic progress lines |
//! | [`metrics`] | Prometheus metrics of a run for node_exporter's textfile collector (`--metrics-file`) |
//! | [`idset`] | millions of blob ids in memory without a hash map: distinct ids gathered from streams with repeats, sorted lists searched through head buckets (`check`, `stats`, `snapshots --verified`) |
//! | [`util`] | small shared helpers: time formats, Ctrl-C handling, page-aligned buffers for O_DIRECT I/O, buffer pools, the threads for many small storage requests at once |
//! | [`cli`] | the `diskvault` command line |
//!
//! ## Data flow
//!
//! **Backup**: a [`source::DiskSource`] is read in 1 MiB blocks (only allocated blocks for a full backup, only
//! changed blocks for an incremental). Each block gets a keyed BLAKE3 id; blocks whose id the local index
//! ([`cache::IndexCache`]) already knows are not stored again. New blocks are zstd-compressed (as a delta against a
//! similar stored block where that pays, [`delta`]), encrypted and appended to a data pack. Finished packs are
//! stored, then listed in an index file. The block ids of each disk are grouped into segments (4096 ids, themselves
//! stored as blobs in metadata packs), and a snapshot object listing the segments is written last: the commit
//! point. A VMware backup also saves checkpoints (the segments so far), from which an interrupted one is continued
//! ([`vmware`], [`backup::ResumeBase`]).
//!
//! **Restore**: snapshot → segments → block ids → index lookups → ranged pack reads → decrypt, decompress
//! (a delta blob with its base, read first) → re-check id → write at the block's offset (zero blocks stay holes).
//!
//! **File-level restore**: snapshot disk ([`serve`]) → partition table (and LVM metadata) → volume → ext4 or XFS (the journal or log replayed in memory), or NTFS
//! → directory and inode lookups → the file's extents, read through the blob cache ([`guestfs`]).
//!
//! **Check** (`--read-data`): every pack read whole → its hash against its name → header against the index →
//! every blob authenticated, decompressed, id re-checked (a delta blob when the pass opens its base, [`check`]).
//!
//! **Prune**: snapshots → segments → marks in a scratch RocksDB → index files streamed pack by pack (keep,
//! repack, drop) → new index files → a deletion record; dropped packs are deleted once the sessions that
//! might use them have ended ([`prune`]).

pub mod backend;
pub mod backup;
pub mod cache;
pub mod check;
pub mod cli;
pub mod copy;
pub mod crypto;
pub mod damage;
pub mod delta;
pub mod diff;
pub mod error;
pub mod forget;
pub mod format;
pub mod guestfs;
pub mod idset;
pub mod lock;
pub mod metrics;
pub mod nbd;
pub mod object_lock;
pub mod progress;
pub mod prune;
pub mod repair;
pub mod repository;
pub mod restore;
pub mod serve;
pub mod source;
pub mod stats;
pub mod tag;
pub mod util;
pub mod vddk;
pub mod vmware;
pub mod vsphere;

pub use error::{Error, Result};
