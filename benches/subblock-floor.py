#!/usr/bin/env python3
"""What deduplication inside 1 MiB blocks could save on the benchmark workload (a design question, not a tool).

usage: benches/subblock-floor.py IMGDIR          (IMGDIR: ../shared/bench's images, e.g. ~/.cache/diskvault-bench/4g)

diskvault stores whole 1 MiB blocks: a block that differs from every stored block in one 4 KiB page is stored
whole (compressed). Engines with content-defined chunks (restic, rustic, borg) also find the pages a new block
shares with stored data when the data moved by whole file-system blocks. For each backup step (vm1-day0, vm1-day1,
vm2-day0) this prints, for the blocks new to the repository:
  whole_mib    zstd-3 of the whole new blocks, each on its own (what diskvault stores, less pack/AEAD overhead);
  novel_mib    zstd-3 of only their 4 KiB pages never seen before (in any earlier block), per block: the floor of
               a scheme that stores a new block as references to known pages plus its novel pages;
  dup_pages    pages of new blocks that were already stored.
Needs the python `zstandard` module (pip install zstandard).
"""
import hashlib
import json
import os
import sys

import zstandard

BLOCK, PAGE = 1 << 20, 4096
img = sys.argv[1]
cctx = zstandard.ZstdCompressor(level=3)
zero_block, zero_page = bytes(BLOCK), bytes(PAGE)
blocks, pages = set(), set()
totals = {"whole": 0, "novel": 0}
for name in ("vm1-day0", "vm1-day1", "vm2-day0"):
    st = {"new_blocks": 0, "whole": 0, "novel": 0, "novel_pages": 0, "dup_pages": 0}
    with open(os.path.join(img, name + ".raw"), "rb") as f:
        while b := f.read(BLOCK):
            if b == zero_block[: len(b)]:
                continue
            h = hashlib.blake2b(b, digest_size=16).digest()
            if h in blocks:
                continue
            blocks.add(h)
            st["new_blocks"] += 1
            st["whole"] += len(cctx.compress(b))
            novel = []
            for i in range(0, len(b), PAGE):
                p = b[i : i + PAGE]
                if p == zero_page[: len(p)]:
                    continue
                ph = hashlib.blake2b(p, digest_size=16).digest()
                if ph in pages:
                    st["dup_pages"] += 1
                else:
                    pages.add(ph)
                    novel.append(p)
            st["novel_pages"] += len(novel)
            if novel:
                st["novel"] += len(cctx.compress(b"".join(novel)))
    totals["whole"] += st["whole"]
    totals["novel"] += st["novel"]
    print(json.dumps({"step": name, "new_blocks": st["new_blocks"], "whole_mib": round(st["whole"] / 2**20, 1),
                      "novel_mib": round(st["novel"] / 2**20, 1), "novel_pages": st["novel_pages"],
                      "dup_pages": st["dup_pages"]}), flush=True)
print(json.dumps({"total_whole_mib": round(totals["whole"] / 2**20, 1),
                  "total_novel_mib": round(totals["novel"] / 2**20, 1)}))
