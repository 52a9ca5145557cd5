#!/usr/bin/env python3
"""PyTorch peer of `KvCheck bench` for the paging ops (append, gather, scatter, copy_pages) on the GPU.

Times PyTorch's own indexing ops on exactly the shapes of KvCheck's GPU paging rows, in the same process as a
measurement of torch's device-to-device copy bandwidth, and writes rows in KvCheck's results-JSON row format
(the backend is "torch-index"):

    python3 bench/peers/paging_torch.py --out peer-paging_torch.json [--quick] [--op paging.gather]

Shape strings (identical to KvCheck's, tools/KvCheck/Benchmarks/BenchCase.cs, ShapeText):
    paging.gather / paging.scatter:  B=<sequences> N=<tokens per sequence> <geometry>
    paging.append:                   T=<tokens> decode|prefill <geometry>
    paging.copy_pages:               pairs=<page pairs> <geometry>
    geometry:                        Hkv=<kv heads> D=<head dim> page=<page size> NHD|HND fp16
K and V both move. Pools are [pages, page, Hkv, D] (NHD) or [pages, Hkv, page, D] (HND).

Index patterns (as KvCheck's PagingBenchCases):
    append decode:  T distinct random pages of an 8192-page pool, each token at a random offset of its page;
    append prefill: ceil(T / page) distinct random pages of an 8192-page pool, filled in order;
    gather/scatter: every sequence holds exactly N tokens (MaxTokens = N); the pool has B*N/page pages and the block
                    table [B, N/page] is a random permutation of them;
    copy_pages:     a 16384-page pool; 2*pairs distinct random pages, the first half sources, the second destinations.

Torch equivalents:
    append   NHD: pool.view(-1, Hkv, D).index_copy_(0, slots, k)     HND: pool[slots // page, :, slots % page, :] = k
    gather   NHD: torch.index_select(pool, 0, table, out=out.view(B*N/page, page, Hkv, D))
             HND: the same index_select into a temporary, then out.view(...).copy_(tmp.transpose(1, 2)) (two passes)
    scatter  NHD: pool.index_copy_(0, table, x.view(B*N/page, page, Hkv, D))   HND: the same with .transpose(1, 2)
    copy     pool[dst] = pool[src]
Bytes (what the op must move, not what torch moves): append 2*T rows, gather/scatter 2*B*N rows, copy_pages
2*pairs pages, each for K and V; a row is Hkv*D*2 bytes.

Timing (as KvCheck's GpuTimer, CUDA events with primer copies; launch-bound rows are marked), the copy-bandwidth
measurement and the buffer sets: bench/peers/peerlib/timing.py (shared with the other peers; its docstring documents
the method).
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peerlib.timing import GOAL_BYTES, MIB, GpuTimer, buffer_sets, load_torch  # noqa: E402 - after the path setup

GOAL_PERCENT = 90.0
HEADS, HEAD_DIM, PAGE = 8, 128, 16
TOKEN_BYTES = HEADS * HEAD_DIM * 2
PAGE_BYTES = PAGE * TOKEN_BYTES


def geometry(layout):
    return f"Hkv={HEADS} D={HEAD_DIM} page={PAGE} {layout} fp16"


def cases():
    """(op, shape, bytes moved, builder) for every KvCheck GPU paging row, in KvCheck's order."""
    rows = []
    for tokens, decode in ((256, True), (4096, False)):
        for layout in ("NHD", "HND"):
            rows.append(("paging.append", f"T={tokens} {'decode' if decode else 'prefill'} {geometry(layout)}",
                         2 * tokens * TOKEN_BYTES * 2, ("append", layout, tokens, decode, 8192)))
    for b, n, layout in ((8, 4096, "NHD"), (8, 4096, "HND"), (32, 8192, "NHD"), (32, 8192, "HND")):
        rows.append(("paging.gather", f"B={b} N={n} {geometry(layout)}", 2 * b * n * TOKEN_BYTES * 2, ("gather", layout, b, n)))
    for b, n, layout in ((8, 4096, "NHD"), (32, 8192, "NHD"), (32, 8192, "HND")):
        rows.append(("paging.scatter", f"B={b} N={n} {geometry(layout)}", 2 * b * n * TOKEN_BYTES * 2, ("scatter", layout, b, n)))
    for pairs in (1024, 4096):
        rows.append(("paging.copy_pages", f"pairs={pairs} {geometry('NHD')}", 2 * pairs * PAGE_BYTES * 2, ("copy", "NHD", pairs, 16384)))
    return rows


class Peer(GpuTimer):
    """The paging ops' builders; event(), measure_copy() and time() come from peerlib.timing.GpuTimer."""

    def __init__(self, torch, quick):
        self.quick = quick
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed(1234)
        super().__init__(torch)

    # ------------------------------------------------------------------ helpers
    def randperm(self, n):
        return self.torch.randperm(n, generator=self.gen).to(self.dev)

    def randn(self, *shape):
        return self.torch.randn(*shape, dtype=self.torch.float16, device=self.dev)

    def pool(self, pages, layout):
        return self.randn(pages, PAGE, HEADS, HEAD_DIM) if layout == "NHD" else self.randn(pages, HEADS, PAGE, HEAD_DIM)

    # ------------------------------------------------------------------ op builders: return (call(set), sets)
    def build(self, spec, moved):
        kind = spec[0]
        sets = buffer_sets(moved, self.l2)
        torch = self.torch
        if kind == "append":
            _, layout, tokens, decode, pool_pages = spec
            kp, vp = self.pool(pool_pages, layout), self.pool(pool_pages, layout)
            data = []
            for _ in range(sets):
                pages = self.randperm(pool_pages)
                if decode:
                    offsets = torch.randint(0, PAGE, (tokens,), generator=self.gen).to(self.dev)
                    slots = pages[:tokens] * PAGE + offsets
                else:
                    t = torch.arange(tokens, device=self.dev)
                    slots = pages[t // PAGE] * PAGE + t % PAGE
                data.append((self.randn(tokens, HEADS, HEAD_DIM), self.randn(tokens, HEADS, HEAD_DIM),
                             slots.long(), (slots // PAGE).long(), (slots % PAGE).long()))
            if layout == "NHD":
                kflat, vflat = kp.view(-1, HEADS, HEAD_DIM), vp.view(-1, HEADS, HEAD_DIM)

                def call(i):
                    k, v, slots, _, _ = data[i]
                    kflat.index_copy_(0, slots, k)
                    vflat.index_copy_(0, slots, v)
            else:
                def call(i):
                    k, v, _, pg, off = data[i]
                    kp[pg, :, off, :] = k
                    vp[pg, :, off, :] = v
            return call, sets, (kp, vp, data)
        if kind in ("gather", "scatter"):
            _, layout, b, n = spec
            pages = b * n // PAGE
            data = []
            for _ in range(sets):
                kp, vp = self.pool(pages, layout), self.pool(pages, layout)
                k, v = self.randn(b, n, HEADS, HEAD_DIM), self.randn(b, n, HEADS, HEAD_DIM)
                data.append((kp, vp, k, v, self.randperm(pages).long()))
            if kind == "gather" and layout == "NHD":
                def call(i):
                    kp, vp, k, v, table = data[i]
                    torch.index_select(kp, 0, table, out=k.view(pages, PAGE, HEADS, HEAD_DIM))
                    torch.index_select(vp, 0, table, out=v.view(pages, PAGE, HEADS, HEAD_DIM))
            elif kind == "gather":
                def call(i):
                    kp, vp, k, v, table = data[i]
                    k.view(pages, PAGE, HEADS, HEAD_DIM).copy_(torch.index_select(kp, 0, table).transpose(1, 2))
                    v.view(pages, PAGE, HEADS, HEAD_DIM).copy_(torch.index_select(vp, 0, table).transpose(1, 2))
            elif layout == "NHD":
                def call(i):
                    kp, vp, k, v, table = data[i]
                    kp.index_copy_(0, table, k.view(pages, PAGE, HEADS, HEAD_DIM))
                    vp.index_copy_(0, table, v.view(pages, PAGE, HEADS, HEAD_DIM))
            else:
                def call(i):
                    kp, vp, k, v, table = data[i]
                    kp.index_copy_(0, table, k.view(pages, PAGE, HEADS, HEAD_DIM).transpose(1, 2))
                    vp.index_copy_(0, table, v.view(pages, PAGE, HEADS, HEAD_DIM).transpose(1, 2))
            return call, sets, data
        if kind == "copy":
            _, layout, pairs, pool_pages = spec
            kp, vp = self.pool(pool_pages, layout), self.pool(pool_pages, layout)
            data = []
            for _ in range(sets):
                perm = self.randperm(pool_pages).long()
                data.append((perm[:pairs].contiguous(), perm[pairs:2 * pairs].contiguous()))

            def call(i):
                src, dst = data[i]
                kp[dst] = kp[src]
                vp[dst] = vp[src]
            return call, sets, (kp, vp, data)
        raise ValueError(kind)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results JSON (KvCheck row format) to this file")
    parser.add_argument("--quick", action="store_true", help="fewer samples (smoke run)")
    parser.add_argument("--op", help="only ops whose name starts with this (e.g. paging.gather)")
    parser.add_argument("--list", action="store_true",
                        help="print every row (backend, op, shape, bytes) and exit; diff with `KvCheck bench --list`")
    args = parser.parse_args()
    if args.list:
        for op, shape, moved, _ in cases():
            print(f"cuda\t{op}\t{shape}\t{moved}")
        return 0

    torch = load_torch("paging_torch")
    if torch is None:
        return 2

    peer = Peer(torch, args.quick)
    runs = 10 if args.quick else 20
    copy_gbs, copy_bytes = peer.measure_copy(runs)
    print(f"device: {peer.name}, torch {torch.__version__} (CUDA {torch.version.cuda}), L2 {peer.l2 / MIB:.1f} MiB")
    print(f"copy bandwidth: {copy_gbs:.1f} GB/s (dst.copy_(src), {copy_bytes / MIB:.0f} MiB, median of {runs})")

    wanted = 10 if args.quick else 30
    rows = []
    for op, shape, moved, spec in cases():
        if args.op and not op.startswith(args.op):
            continue
        note = None
        try:
            call, sets, keep = peer.build(spec, moved)
            torch.cuda.synchronize()
            seconds, samples, k, note = peer.time(call, sets, wanted)
            del keep, call
        except torch.cuda.OutOfMemoryError as e:  # noqa: PERF203 - one row failing must not stop the others
            seconds, samples, k, sets, note = float("nan"), 0, 0, 0, f"error: out of memory ({str(e).splitlines()[0]})"
        torch.cuda.empty_cache()
        gbps = moved / seconds / 1e9
        pct = 100.0 * gbps / copy_gbs
        goal = None
        if moved >= GOAL_BYTES and not math.isnan(pct):
            goal = "met" if pct >= GOAL_PERCENT else "missed"
        row = {
            "op": op, "shape": shape, "backend": "torch-index",
            "us": round(seconds * 1e6, 2), "gbps": round(gbps, 2),
            "pctOfBandwidth": math.floor(pct * 100) / 100 if not math.isnan(pct) else pct,
            "bytes": moved, "samples": samples, "opsPerSample": k, "bufferSets": sets,
            "bandwidthGBs": round(copy_gbs, 2),
        }
        if goal:
            row["goal"] = goal
        if note:
            row["note"] = note
        rows.append(row)
        pct_text = f"{math.floor(pct * 10) / 10:.1f}" if not math.isnan(pct) else "nan"
        print(f"  torch-index {op} {shape}: {seconds * 1e6:.1f} us, {gbps:.1f} GB/s, {pct_text} %"
              + (f" - {note}" if note else ""), flush=True)

    if args.out:
        report = {
            "device": peer.name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "bandwidthGBs": round(copy_gbs, 2),
            "bandwidthKind": f"dst.copy_(src), {copy_bytes // MIB} MiB buffers, median of {runs}",
            "quick": args.quick, "rows": rows,
        }
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"wrote {args.out}")
    return 0 if all("error" not in (r.get("note") or "") for r in rows) else 3


if __name__ == "__main__":
    sys.exit(main())
