# diskvault with a repository made by `init --compression 1` (zstd level 1 instead of the default 3): the backup
# window against stored bytes, measured in the same run. Otherwise as diskvault.sh.
. "$TOOL_DEFS_DIR/diskvault.sh"
diskvault_zstd1_defs() {
  diskvault_defs
  t_init() { echo "$(denv) $DV -q -r $REPO init --compression 1"; }
}
