//! Block devices as source and restore target, through loop devices (needs root and util-linux's losetup,
//! as on the project's machines and CI).

mod common;

use std::process::Command;

use common::*;

/// A loop device over a file; detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &std::path::Path) -> Loop {
        let out = Command::new("losetup").args(["--find", "--show"]).arg(file).output().expect("losetup runs");
        assert!(
            out.status.success(),
            "losetup failed (root and loop devices needed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Where the next data (not a hole) of `file` at or after `offset` begins.
fn next_data(file: &std::path::Path, offset: u64) -> u64 {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(file).unwrap();
    // SAFETY: a plain system call on an open descriptor.
    let at = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    assert!(at >= 0, "lseek(SEEK_DATA): {}", std::io::Error::last_os_error());
    at as u64
}

#[test]
fn backup_from_and_restore_to_block_devices() {
    let e = Env::local();
    e.ok(&["init"]);
    // Source device: random data, a zero block, a repeated block.
    let mut img = random_bytes(31, 3 * MIB);
    img.extend(vec![0u8; MIB]);
    img.extend(random_bytes(32, MIB));
    img.extend(random_bytes(32, MIB));
    let src_file = e.path("src.img");
    write(&src_file, &img);
    let src = Loop::attach(&src_file);
    let r = e.backup(&["--name", "dev", &format!("disk0={}", src.0)]);
    assert_eq!(r["disks"][0]["capacity"], img.len() as u64, "a block device's size is read from the device");
    assert_eq!(r["disks"][0]["zero_blocks"], 1);
    assert_eq!(r["disks"][0]["new_blocks"], 4);

    // Target device, larger than the disk and full of garbage: every byte of the disk must be written,
    // zeros included, and nothing beyond it touched.
    let dst_file = e.path("dst.img");
    write(&dst_file, &vec![0xAAu8; img.len() + MIB]);
    let dst = Loop::attach(&dst_file);
    e.ok(&["restore", "latest", "--target", &dst.0, "--verify"]);
    drop(dst);
    let out = std::fs::read(&dst_file).unwrap();
    assert!(out[..img.len()] == img[..], "the device does not hold the disk");
    assert!(out[img.len()..].iter().all(|&b| b == 0xAA), "bytes beyond the disk were changed");
    // The zero block was zeroed by the device, which unmapped it (a thin volume stays thin), not written: the
    // loop device punched a hole where it lies in its backing file.
    assert_eq!(next_data(&dst_file, 3 * MIB as u64), 4 * MIB as u64, "the zero block was written, not unmapped");

    // A device smaller than the disk is refused before anything is written.
    let small_file = e.path("small.img");
    write(&small_file, &vec![0x55u8; 2 * MIB]);
    let small = Loop::attach(&small_file);
    let r = e.fails(&["restore", "latest", "--target", &small.0]);
    assert!(r.stderr.contains("the block device has"), "{}", r.stderr);
    drop(small);
    assert!(std::fs::read(&small_file).unwrap().iter().all(|&b| b == 0x55));
}
