//! The test-only VDDK (tests/vddk/fake_vixDiskLib.c), built with gcc once per test process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `<dir>/lib64/libvixDiskLib.so.8`: the directory to give as `--vddk-libdir`.
pub fn fake_vddk() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake-vddk");
        std::fs::create_dir_all(dir.join("lib64")).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vddk/fake_vixDiskLib.c");
        super::build_into(&dir.join("lib64/libvixDiskLib.so.8"), &src, |out| {
            let built = Command::new("gcc")
                .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
                .arg(out)
                .arg(&src)
                .arg("-lpthread")
                .output()
                .expect("gcc");
            assert!(
                built.status.success(),
                "building the test VDDK failed: {}",
                String::from_utf8_lossy(&built.stderr)
            );
        });
        dir
    })
}
