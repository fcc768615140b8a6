# diskvault for ../shared/bench/bench-peers.sh (TOOL_DEFS_DIR=benches/peers TOOLS="limits restic borg diskvault").
# vm1-day1 is backed up incrementally from its CBT-style changed-areas file, as VMware would; the peers re-read
# the whole image.
diskvault_defs() {
  DV=${DISKVAULT_BIN:-diskvault}
  DV_BACKUP_FLAGS=""
  denv() { echo "DISKVAULT_PASSWORD=\$BENCH_PASSWORD DISKVAULT_CACHE_DIR=$TCACHE"; }
  t_init()    { echo "$(denv) $DV -q -r $REPO init"; }
  t_backup()  {
    local c=""
    [ "$2" = vm1-day1 ] && [ -f "$IMG/$2.changed.json" ] && c="--changed-areas disk0=$IMG/$2.changed.json"
    echo "$(denv) $DV -q -r $REPO backup $DV_BACKUP_FLAGS --name $1 --tag $2 $c disk0=$STAGE/$1/disk.raw"
  }
  t_restore() { echo "$(denv) $DV -q -r $REPO restore latest --name vm1 --target $1"; }
  t_check()   { if $DV check --help >/dev/null 2>&1; then echo "$(denv) $DV -q -r $REPO check --read-data"; else echo ""; fi; }
}
