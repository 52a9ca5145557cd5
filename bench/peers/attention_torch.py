#!/usr/bin/env python3
"""PyTorch peer of `KvCheck bench` for decode attention (attention.decode) on the GPU.

Times PyTorch's own decode-attention paths (SDPA with each backend pinned, and compiled FlexAttention) on the decode
shapes below, in the same process as a measurement of torch's device-to-device copy bandwidth, and writes rows in
KvCheck's results-JSON row format (the backend field names the peer):

    python3 bench/peers/attention_torch.py --out peer-attention_torch.json [--quick] [--op attention.decode]
    python3 bench/peers/attention_torch.py --list [--quick]      # the case list, no torch needed

Shape strings (KvCheck builds the same for its own attention.decode rows):
    B=<sequences> N=<tokens per sequence> Hq=<query heads> Hkv=<kv heads> D=<head dim> contiguous bf16 q=1
Models (Hq, Hkv, D): (32, 8, 128) Llama-3-8B; (64, 8, 128); (64, 1, 256) MFA / Step-3; (32, 32, 128) MHA.
B in {1, 8, 64}, N in {1024, 8192, 32768, 131072}; a case is kept only when its KV bytes 2*B*N*Hkv*D*2 <= 8 GiB.
--quick: B in {1, 8}, N in {8192, 32768} only. Every sequence holds exactly N tokens (no mask, no padding).
Bytes counted per call: the KV bytes plus q and o (2*B*Hq*D*2).

Tensors: q (B, Hq, 1, D), k and v (B, Hkv, N, D), all contiguous bf16 (keys and values of one head adjacent, i.e. the
HND order, which is what SDPA and FlexAttention take without a copy). Query head h reads KV head h // (Hq / Hkv).

Backends (the row's "backend"):
    sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math:
        with sdpa_kernel([SDPBackend.X]): F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        (no is_causal: SDPA's causal mask is top-left aligned, with one query it would keep only key 0);
        sdpa-math only when the KV bytes are <= 1 GiB (it materialises the scores and, for GQA, repeated K and V).
    flex-decoding:
        torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=bm, enable_gqa=True), the block mask built
        once per case with create_block_mask(noop_mask, B, None, 1, N) (head dim 1, as FlexDecoding needs for GQA).
        Inductor picks its split-KV FlexDecoding template only when q_len < 128, B and Hq are static, the block mask
        has one head and Hq/Hkv is a power of two; the script watches that decision (it wraps Inductor's
        _use_flex_decoding) and says in the row's "note" when the generic flex kernel was used instead, when the choice
        could not be observed, when Dynamo broke the graph, or when flex ran unfused.
A backend that raises (no kernel for the shape, compile failure, out of memory) gets a row with "error": "<message>"
(SDPA's reasons for rejecting a backend included) and no time. Before timing, each backend's output on sequence 0 is
compared with a float32 reference; a difference over 5 % of max |reference| is reported in the note.

Timing (as KvCheck's GpuTimer, CUDA events with primer copies; launch-bound rows are marked), the copy-bandwidth
measurement and the buffer sets: bench/peers/peerlib/timing.py (shared with bench/peers/paging_torch.py; its docstring
documents the method).

The SDPA rows of every case run first, then the flex rows (each new shape costs a compile). The JSON file is rewritten
after every row ("complete": false until the end), so a run cut short still leaves its rows.
"""

import argparse
import gc
import importlib
import math
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peerlib.rows import Results, describe_error, error_row, first_line, timed_row  # noqa: E402 - after the path setup
from peerlib.timing import MIB, GpuTimer, buffer_sets, load_torch  # noqa: E402

GIB = 1 << 30
GOAL_PERCENT = 90.0
OP = "attention.decode"
MODELS = ((32, 8, 128, "Llama-3-8B"), (64, 8, 128, "Hq=64 GQA"), (64, 1, 256, "MFA/Step-3"), (32, 32, 128, "MHA"))
BATCHES, QUICK_BATCHES = (1, 8, 64), (1, 8)
TOKENS, QUICK_TOKENS = (1024, 8192, 32768, 131072), (8192, 32768)
KV_LIMIT = 8 * GIB          # cases above this many KV bytes are not run
MATH_KV_LIMIT = 1 * GIB     # sdpa-math only up to this many KV bytes
CHECK_PERCENT = 5.0         # output check: max |o - ref| over max |ref|, in percent
SDPA_BACKENDS = (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-efficient", "EFFICIENT_ATTENTION"),
                 ("sdpa-cudnn", "CUDNN_ATTENTION"), ("sdpa-math", "MATH"))
FLEX = "flex-decoding"
BACKENDS = tuple(name for name, _ in SDPA_BACKENDS) + (FLEX,)


class Case:
    def __init__(self, b, n, hq, hkv, d, model):
        self.b, self.n, self.hq, self.hkv, self.d, self.model = b, n, hq, hkv, d, model
        self.op = OP
        self.shape = f"B={b} N={n} Hq={hq} Hkv={hkv} D={d} contiguous bf16 q=1"
        self.kv_bytes = 2 * b * n * hkv * d * 2
        self.moved = self.kv_bytes + 2 * b * hq * d * 2

    def backends(self):
        """The peer backends this case is timed on, in row order."""
        return tuple(name for name in BACKENDS if name != "sdpa-math" or self.kv_bytes <= MATH_KV_LIMIT)


def cases(quick=False):
    """Every attention.decode case, in row order (model, then B, then N)."""
    rows = []
    for hq, hkv, d, model in MODELS:
        for b in (QUICK_BATCHES if quick else BATCHES):
            for n in (QUICK_TOKENS if quick else TOKENS):
                case = Case(b, n, hq, hkv, d, model)
                if case.kv_bytes <= KV_LIMIT:
                    rows.append(case)
    return rows


class FlexProbe:
    """Records Inductor's FlexDecoding decision (the result of _use_flex_decoding) while a flex case compiles."""

    MODULES = ("torch._inductor.kernel.flex.flex_attention", "torch._inductor.kernel.flex.flex_decoding",
               "torch._inductor.kernel.flex_attention", "torch._inductor.kernel.flex_decoding")

    def __init__(self):
        self.decisions = []
        self.patched = []
        try:  # the usual import path (lowering registers the kernels), so that importing the flex modules first is safe
            importlib.import_module("torch._inductor.lowering")
        except Exception:  # noqa: BLE001
            pass
        for name in self.MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the layout of torch._inductor changes between releases
                continue
            fn = getattr(module, "_use_flex_decoding", None)
            if callable(fn) and not getattr(fn, "_peer_probe", False):
                setattr(module, "_use_flex_decoding", self._wrap(fn))
                self.patched.append(name)

    def _wrap(self, fn):
        def probe(*args, **kwargs):
            out = fn(*args, **kwargs)
            try:
                self.decisions.append(bool(out))
            except Exception:  # noqa: BLE001 - a symbolic answer: record "unknown"
                self.decisions.append(None)
            return out
        probe._peer_probe = True
        return probe


class Peer(GpuTimer):
    """The attention backends' rows; event(), measure_copy() and time() come from peerlib.timing.GpuTimer."""

    def __init__(self, torch, quick):
        self.quick = quick
        torch.manual_seed(1234)
        super().__init__(torch)
        self.flex = None
        self.probe = None

    # ------------------------------------------------------------------ helpers
    def randn(self, *shape):
        return self.torch.randn(*shape, dtype=self.torch.bfloat16, device=self.dev)

    def tensors(self, case, sets):
        return [(self.randn(case.b, case.hq, 1, case.d), self.randn(case.b, case.hkv, case.n, case.d),
                 self.randn(case.b, case.hkv, case.n, case.d)) for _ in range(sets)]

    def reference(self, q, k, v):
        """float32 attention of sequence 0: (Hq, D)."""
        torch = self.torch
        hq, d, hkv = q.shape[1], q.shape[3], k.shape[1]
        qf = q[0, :, 0, :].float().view(hkv, hq // hkv, d)
        s = torch.einsum("hgd,hnd->hgn", qf, k[0].float()) / math.sqrt(d)
        o = torch.einsum("hgn,hnd->hgd", torch.softmax(s, dim=-1), v[0].float())
        return o.reshape(hq, d)

    def check(self, out, ref):
        """None when the output of sequence 0 matches the reference, else a note."""
        o = out[0, :, 0, :].float()
        err = (o - ref).abs().max().item()
        scale = max(ref.abs().max().item(), 1e-6)
        if math.isfinite(err) and 100.0 * err / scale <= CHECK_PERCENT:
            return None
        return (f"output check failed: max |o - float32 reference| = {err:.3g} on sequence 0 "
                f"({100.0 * err / scale:.1f} % of max |reference|)")

    # ------------------------------------------------------------------ flex setup
    def flex_setup(self):
        """Compiles flex_attention once (one graph per shape follows); returns (flex, create_block_mask, mask_mod)."""
        if self.flex is not None:
            return self.flex
        torch = self.torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        try:
            from torch.nn.attention.flex_attention import noop_mask
        except ImportError:
            def noop_mask(b, h, q_idx, kv_idx):
                return kv_idx >= 0
        dynamo = importlib.import_module("torch._dynamo.config")
        # One graph per case: lift Dynamo's per-function recompile limits (default 8) well above the case count, and
        # make hitting them an error rather than a silent fall-back to eager (unfused) flex_attention.
        for names, floor in ((("recompile_limit", "cache_size_limit"), 1024),
                             (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 4096)):
            for name in names:
                if hasattr(dynamo, name):
                    setattr(dynamo, name, max(int(getattr(dynamo, name)), floor))
                    break
        if hasattr(dynamo, "fail_on_recompile_limit_hit"):
            dynamo.fail_on_recompile_limit_hit = True
        # Lower every graph in this process (no FX-graph / AOT cache hits), so that the FlexDecoding choice is seen.
        inductor = importlib.import_module("torch._inductor.config")
        if hasattr(inductor, "fx_graph_cache"):
            inductor.fx_graph_cache = False
        try:
            functorch = importlib.import_module("torch._functorch.config")
            if hasattr(functorch, "enable_autograd_cache"):
                functorch.enable_autograd_cache = False
        except Exception:  # noqa: BLE001
            pass
        self.probe = FlexProbe()
        self.flex = (torch.compile(flex_attention, dynamic=False), create_block_mask, noop_mask)
        return self.flex

    def graph_breaks(self):
        try:
            from torch._dynamo.utils import counters
            return sum(counters["graph_break"].values())
        except Exception:  # noqa: BLE001
            return 0

    # ------------------------------------------------------------------ one backend on one case
    def sdpa_row(self, backend, data, ref, sets, wanted):
        """(seconds, samples, k, notes) for one pinned SDPA backend; raises when the backend refuses the call."""
        torch = self.torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        member = dict(SDPA_BACKENDS)[backend]
        if not hasattr(SDPBackend, member):
            raise RuntimeError(f"this torch has no SDPBackend.{member}")

        def call(i):
            q, k, v = data[i]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, enable_gqa=True)

        with sdpa_kernel([getattr(SDPBackend, member)]):
            notes = [self.check(call(0), ref)]
            torch.cuda.synchronize()
            seconds, samples, k, note = self.time(call, sets, wanted)
        return seconds, samples, k, notes + [note]

    def flex_row(self, case, data, ref, sets, wanted, caught):
        torch = self.torch
        flex, create_block_mask, mask_mod = self.flex_setup()
        block_mask = create_block_mask(mask_mod, case.b, None, 1, case.n, device=self.dev)

        def call(i):
            q, k, v = data[i]
            return flex(q, k, v, block_mask=block_mask, enable_gqa=True)

        self.probe.decisions.clear()
        breaks = self.graph_breaks()
        t0 = time.perf_counter()
        out = call(0)  # compiles this shape
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        notes = [self.check(out, ref)]
        del out
        seconds, samples, k, note = self.time(call, sets, wanted)
        notes.append(note)
        ratio = case.hq // case.hkv
        decisions = list(self.probe.decisions)
        if not self.probe.patched:
            notes.append("FlexDecoding choice not observed: torch._inductor has no _use_flex_decoding where expected")
        elif not decisions:
            notes.append("FlexDecoding choice not observed: no graph was lowered for this shape (cached graph?)")
        elif False in decisions:
            why = (f"Hq/Hkv = {ratio} is not a power of two" if ratio & (ratio - 1)
                   else "q_len < 128, static B and Hq, one block-mask head and a power-of-two Hq/Hkv all hold here, "
                        "so the reason is in this torch's _use_flex_decoding")
            notes.append(f"fell back to the generic flex_attention kernel (one block per query head), not FlexDecoding: {why}")
        elif None in decisions:
            notes.append("FlexDecoding choice not observed: _use_flex_decoding gave an answer that is not a plain bool")
        added = self.graph_breaks() - breaks
        if added:
            notes.append(f"Dynamo graph break(s) while compiling ({added}): part of flex_attention ran outside the graph")
        for w in caught:
            text = str(w.message)
            if "without torch.compile" in text or "unfused" in text:
                notes.append("flex_attention ran unfused (eager): " + first_line(text, 200))
                break
        print(f"    flex {case.shape}: first call (compile) {compile_s:.1f} s, FlexDecoding chosen: "
              f"{decisions if decisions else 'not observed'}", flush=True)
        return seconds, samples, k, notes


def run_case(peer, case, backends, results, wanted):
    """Times `backends` on one case (one set of tensors shared by them) and adds their rows to `results`."""
    torch = peer.torch
    sets = buffer_sets(case.moved, peer.l2)
    data = ref = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = peer.tensors(case, sets)
            ref = peer.reference(*data[0])
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - one case failing must not stop the others
        message = "allocating the case failed: " + describe_error(e, caught)
        data = ref = None
        gc.collect()
        torch.cuda.empty_cache()
        for backend in backends:
            results.add((case, backend), error_row(case, backend, sets, message, peer.copy_gbs))
            print(f"  {backend} {case.op} {case.shape}: error - {message}", flush=True)
        return
    for backend in backends:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if backend == FLEX:
                    seconds, samples, k, notes = peer.flex_row(case, data, ref, sets, wanted, caught)
                else:
                    seconds, samples, k, notes = peer.sdpa_row(backend, data, ref, sets, wanted)
                row = timed_row(case, backend, seconds, samples, k, sets, notes, peer.copy_gbs, GOAL_PERCENT)
            except Exception as e:  # noqa: BLE001 - a backend that raises gets an error row
                row = error_row(case, backend, sets, describe_error(e, caught), peer.copy_gbs)
        gc.collect()
        torch.cuda.empty_cache()
        results.add((case, backend), row)
        if "error" in row:
            print(f"  {backend} {case.op} {case.shape}: error - {row['error']}", flush=True)
        else:
            pct_text = f"{math.floor(row['pctOfBandwidth'] * 10) / 10:.1f}"
            print(f"  {backend} {case.op} {case.shape}: {row['us']:.1f} us, {row['gbps']:.1f} GB/s, {pct_text} %"
                  + (f" - {row['note']}" if "note" in row else ""), flush=True)
    del data, ref
    gc.collect()
    torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results JSON (KvCheck row format) to this file")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and samples (smoke run)")
    parser.add_argument("--op", help="only ops whose name starts with this (e.g. attention.decode)")
    parser.add_argument("--backend", help=f"only these peer backends, comma-separated (of {', '.join(BACKENDS)})")
    parser.add_argument("--list", action="store_true",
                        help="print every case (backend, op, shape, bytes) and exit; diff with `KvCheck bench --list`")
    args = parser.parse_args()
    selected = [c for c in cases(args.quick) if not args.op or c.op.startswith(args.op)]
    if args.list:
        for case in selected:
            print(f"cuda\t{case.op}\t{case.shape}\t{case.moved}")
        return 0
    wanted_backends = BACKENDS
    if args.backend:
        wanted_backends = tuple(b.strip() for b in args.backend.split(",") if b.strip())
        unknown = [b for b in wanted_backends if b not in BACKENDS]
        if unknown:
            print(f"attention_torch: unknown backend(s) {', '.join(unknown)}; known: {', '.join(BACKENDS)}", file=sys.stderr)
            return 2

    torch = load_torch("attention_torch")
    if torch is None:
        return 2

    peer = Peer(torch, args.quick)
    runs = 10 if args.quick else 20
    copy_gbs, copy_bytes = peer.measure_copy(runs)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    print(f"device: {peer.name}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {cudnn}), "
          f"L2 {peer.l2 / MIB:.1f} MiB")
    print(f"copy bandwidth: {copy_gbs:.1f} GB/s (dst.copy_(src), {copy_bytes / MIB:.0f} MiB, median of {runs})")

    header = {
        "device": peer.name, "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
        "bandwidthGBs": round(copy_gbs, 2),
        "bandwidthKind": f"dst.copy_(src), {copy_bytes // MIB} MiB buffers, median of {runs}",
        "quick": args.quick,
    }
    order = {}
    for ci, case in enumerate(selected):
        for bi, backend in enumerate(case.backends()):
            order[(case, backend)] = (ci, bi)
    results = Results(args.out, header, order)
    results.write(False)

    wanted = 10 if args.quick else 30
    sdpa = [name for name, _ in SDPA_BACKENDS if name in wanted_backends]
    for case in selected:  # SDPA first: cheap, no compile
        backends = [b for b in case.backends() if b in sdpa]
        if backends:
            run_case(peer, case, backends, results, wanted)
    if FLEX in wanted_backends:
        for case in selected:
            run_case(peer, case, [FLEX], results, wanted)

    results.write(True)
    if args.out:
        print(f"wrote {args.out}")
    return 0 if all("error" not in row for row in results.ordered()) else 3


if __name__ == "__main__":
    sys.exit(main())
