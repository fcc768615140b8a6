# rustic with a fixed 1 MiB chunker (the comparison point for a fixed-block engine), otherwise as the
# shared runner's rustic: restic repository format, zstd, AES-256-CTR + Poly1305. Installed by
# ../shared/bench/install-peers.sh into $DATA/tools/bin (benches/compare.sh puts that on PATH).
rustic_fixed1m_defs() {
  renv() { echo "RUSTIC_PASSWORD=\$BENCH_PASSWORD"; }
  t_init()    { echo "$(renv) rustic -r $REPO --cache-dir $TCACHE init --set-chunker fixed_size --set-chunk-size 1MiB"; }
  t_backup()  { echo "$(renv) rustic -r $REPO --cache-dir $TCACHE backup --host $1 --tag $2 $STAGE/$1/disk.raw"; }
  t_restore() { echo "$(renv) rustic -r $REPO --cache-dir $TCACHE restore latest:$STAGE/vm1/disk.raw $1 --filter-host vm1"; }
  t_check()   { echo "$(renv) rustic -r $REPO --cache-dir $TCACHE check --read-data"; }
}
