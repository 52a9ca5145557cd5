"""GPU timing shared by the PyTorch peers (bench/peers/*_torch.py); mirrors KvCheck's GpuTimer.

Importing this module does not import torch (the peers' --list modes run without it): `GpuTimer` takes the torch
module as an argument.

Copy bandwidth (`GpuTimer.measure_copy(runs)`): dst.copy_(src) on 1 GiB uint8 buffers (512 MiB when less than 6 GiB
of device memory is free), 3 warm-up copies, then the median of `runs` copies each timed with a pair of CUDA events;
GB/s counts the bytes read and written (2 * buffer bytes). It is the 100 % of a row's "pctOfBandwidth".

Buffer sets (`buffer_sets(moved, l2)`): one set when a call moves >= 256 MiB and >= 2x L2, else enough sets (2 to 64)
for >= 4x L2, so that rotating over them keeps a call's data out of L2.

Timing (`GpuTimer.time(call, sets, wanted)`, as KvCheck's GpuTimer): warm-up (max(3, sets) calls, so every buffer
set is touched); a sample is a pair of CUDA events around K back-to-back calls (K so a sample lasts >= 200 us, at most
64), rotating over buffer sets (call(i) runs on set i); each batch of samples is preceded by device copies of a
256 MiB primer buffer long enough for the host to enqueue the batch; samples the GPU reached before the host had
enqueued them (with a 20 us margin) are dropped, and so is the first sample of every batch (it pays for the primer's
dirty L2 lines); batches repeat (at most 6; the primer's length doubles after a batch in which the GPU caught up
with the host) until `wanted` clean samples are in. The result is the median of the clean samples; if too few remain
(none, or fewer than min(wanted, half of all samples)), the median of all samples, and the row is marked
launch-bound. The peers ask for 30 samples (10 with --quick). measure_copy() must have run first (the primer's
length comes from the copy bandwidth).
"""

import math
import statistics
import sys
import time

MIB = 1 << 20
GOAL_BYTES = 256 * MIB


def load_torch(script):
    """The torch module when PyTorch and a CUDA device are present; else prints why (as `script`) and returns None."""
    try:
        import torch
    except ImportError as e:
        print(f"{script}: PyTorch is not installed ({e})", file=sys.stderr)
        return None
    if not torch.cuda.is_available():
        print(f"{script}: torch.cuda.is_available() is False; nothing to time", file=sys.stderr)
        return None
    return torch


def buffer_sets(moved, l2):
    if moved >= max(GOAL_BYTES, 2 * l2):
        return 1
    return int(min(64, max(2, math.ceil(4.0 * l2 / max(moved, 1)))))


class GpuTimer:
    """Device properties (name, L2), the primer buffers, the copy-bandwidth probe and the timing loop of a peer."""

    def __init__(self, torch):
        self.torch = torch
        self.dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(0)
        self.l2 = int(getattr(props, "L2_cache_size", 0) or 50 * MIB)
        self.name = props.name
        self.primer_src = torch.empty(256 * MIB, dtype=torch.uint8, device=self.dev).fill_(0x3C)
        self.primer_dst = torch.empty_like(self.primer_src).fill_(0xC3)
        self.copy_gbs = None

    def event(self):
        return self.torch.cuda.Event(enable_timing=True)

    # ------------------------------------------------------------------ bandwidth
    def measure_copy(self, runs):
        """(GB/s, buffer bytes) of dst.copy_(src); sets self.copy_gbs, which time() needs. See the module docstring."""
        torch = self.torch
        free, _ = torch.cuda.mem_get_info()
        nbytes = (1 << 30) if free >= (6 << 30) else (512 * MIB)
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.dev).fill_(0xA5)
        dst = torch.empty_like(src).fill_(0x5A)
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize()
        starts = [self.event() for _ in range(runs)]
        ends = [self.event() for _ in range(runs)]
        for i in range(runs):
            starts[i].record()
            dst.copy_(src)
            ends[i].record()
        torch.cuda.synchronize()
        seconds = statistics.median(starts[i].elapsed_time(ends[i]) / 1e3 for i in range(runs))
        del src, dst
        torch.cuda.empty_cache()
        self.copy_gbs = 2.0 * nbytes / seconds / 1e9
        return self.copy_gbs, nbytes

    # ------------------------------------------------------------------ timing (mirrors KvCheck's GpuTimer)
    def time(self, call, sets, wanted):
        """(seconds per call, samples used, K calls per sample, None or a launch-bound note); see the module doc."""
        torch = self.torch
        counter = 0
        for _ in range(max(3, sets)):
            call(counter % sets)
            counter += 1
        torch.cuda.synchronize()
        a, b = self.event(), self.event()
        a.record()
        t0 = time.perf_counter()
        for _ in range(5):
            call(counter % sets)
            counter += 1
        enqueue = (time.perf_counter() - t0) / 5
        b.record()
        b.synchronize()
        per_call = a.elapsed_time(b) / 1e3 / 5
        k = int(min(64, max(1, math.ceil(200e-6 / max(per_call, 1e-7)))))
        per_batch = max(2, 480 // (k + 2))
        primer_copy = 2.0 * self.primer_src.numel() / (self.copy_gbs * 1e9)
        clean, everything = [], []
        factor, batches = 1.5, 0
        while len(clean) < wanted and batches < 6:
            batches += 1
            samples = max(2, min(per_batch, wanted - len(clean) + 1))
            starts = [self.event() for _ in range(samples)]
            ends = [self.event() for _ in range(samples)]
            primer_start = self.event()
            host_estimate = samples * (k * enqueue + 6e-6) + 50e-6
            copies = int(min(256, max(1, math.ceil(factor * host_estimate / primer_copy))))
            t0 = time.perf_counter()
            primer_start.record()
            for _ in range(copies):
                self.primer_dst.copy_(self.primer_src)
            host_done = []
            for j in range(samples):
                starts[j].record()
                for _ in range(k):
                    call(counter % sets)
                    counter += 1
                ends[j].record()
                host_done.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            starved = False
            for j in range(1, samples):  # sample 0 pays for the primer's dirty L2 lines
                seconds = starts[j].elapsed_time(ends[j]) / 1e3 / k
                gpu_start = primer_start.elapsed_time(starts[j]) / 1e3
                everything.append(seconds)
                if gpu_start >= host_done[j] + 20e-6:
                    clean.append(seconds)
                else:
                    starved = True
            if starved:
                factor *= 2
        if clean and len(clean) >= min(wanted, len(everything) // 2):
            return statistics.median(clean), len(clean), k, None
        note = f"launch-bound: the GPU waited for the host in {len(everything) - len(clean)} of {len(everything)} samples"
        return statistics.median(everything), len(everything), k, note
