# diskvault with `backup --no-delta` (every new block stored whole, as before format version 2), to show in the
# same run what delta blocks cost and save. Otherwise as diskvault.sh.
diskvault_nodelta_defs() {
  DV=${DISKVAULT_BIN:-diskvault}
  denv() { echo "DISKVAULT_PASSWORD=\$BENCH_PASSWORD DISKVAULT_CACHE_DIR=$TCACHE"; }
  t_init()    { echo "$(denv) $DV -q -r $REPO init"; }
  t_backup()  {
    local c=""
    [ "$2" = vm1-day1 ] && [ -f "$IMG/$2.changed.json" ] && c="--changed-areas disk0=$IMG/$2.changed.json"
    echo "$(denv) $DV -q -r $REPO backup --no-delta --name $1 --tag $2 $c disk0=$STAGE/$1/disk.raw"
  }
  t_restore() { echo "$(denv) $DV -q -r $REPO restore latest --name vm1 --target $1"; }
  t_check()   { echo "$(denv) $DV -q -r $REPO check --read-data"; }
}
