//! The Network Block Device protocol: [`client`] reads NBD exports (a backup source with allocation and
//! dirty-bitmap queries), [`server`] serves snapshot disks as read-only (or overlay-writable) exports.
//! [`proto`] holds the wire format both share, [`tls`] their TLS (`NBD_OPT_STARTTLS`).

pub mod client;
pub mod proto;
pub mod server;
pub mod tls;
