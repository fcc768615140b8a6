# diskvault with `backup --no-delta` (every new block stored whole, as before format version 2), to show in the
# same run what delta blocks cost and save. Otherwise as diskvault.sh.
. "$TOOL_DEFS_DIR/diskvault.sh"
diskvault_nodelta_defs() {
  diskvault_defs
  DV_BACKUP_FLAGS=--no-delta
}
