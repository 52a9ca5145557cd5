// emu_test.cpp — self-contained test of the CPU emulator through its C ABI, the way the C# side uses it:
// kernel libraries are dlopen'ed, entry points looked up by name, arguments passed as void*[] and
// launched with kvk_emu_launch; memory comes from kvk_emu_alloc.
//
// The runtime itself is dlopen'ed too (the program does not link it), as .NET loads it: this is the
// setting where libkvk_emu.so's initial-exec TLS must come from glibc's static-TLS surplus.
//
// usage: emu_test <libkvk_emu.so> <emu_test_kernels.so> <paging_nhd16.so> <paging_hnd8.so>
// Exit status 0 when every check passes; prints one line per check and timings.
#include "../kvk_emu_abi.h"

#include <dlfcn.h>
#include <setjmp.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

// The runtime's entry points, resolved with dlsym (the names below stand for these pointers).
namespace rt {
decltype(&::kvk_emu_alloc) alloc;
decltype(&::kvk_emu_free) free_;
decltype(&::kvk_emu_launch) launch;
decltype(&::kvk_emu_last_error) last_error;
decltype(&::kvk_emu_check_memory) check_memory;
decltype(&::kvk_emu_version) version;
}  // namespace rt
#define kvk_emu_alloc rt::alloc
#define kvk_emu_free rt::free_
#define kvk_emu_launch rt::launch
#define kvk_emu_last_error rt::last_error
#define kvk_emu_check_memory rt::check_memory
#define kvk_emu_version rt::version

namespace {

int g_failures = 0, g_checks = 0;

void check(bool ok, const std::string& what)
{
    ++g_checks;
    if (!ok) ++g_failures;
    printf("%s  %s\n", ok ? "ok  " : "FAIL", what.c_str());
    fflush(stdout);
}

struct Lib {
    void* h = nullptr;
    std::string path;
    explicit Lib(const char* p) : path(p)
    {
        h = dlopen(p, RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            fprintf(stderr, "dlopen %s: %s\n", p, dlerror());
            exit(2);
        }
    }
    kvk_emu_entry entry(const char* name) const
    {
        std::string s = std::string("kvk_emu_entry_") + name;
        void* f = dlsym(h, s.c_str());
        if (!f) {
            fprintf(stderr, "%s: no %s\n", path.c_str(), s.c_str());
            exit(2);
        }
        return (kvk_emu_entry)f;
    }
};

struct Launch {
    unsigned gx = 1, gy = 1, gz = 1, bx = 32, by = 1, bz = 1, dyn = 0, maxShared = 0;
    int threads = 0;
};

std::string g_err;

int launch(const Lib& lib, const char* name, const Launch& c, std::vector<void*> args)
{
    char err[4096];
    const int rc = kvk_emu_launch(lib.entry(name), args.data(), name, c.gx, c.gy, c.gz, c.bx, c.by, c.bz, c.dyn,
                                  c.maxShared, c.threads, err, sizeof err);
    g_err = err;
    return rc;
}

template <typename T>
T* dalloc(size_t n)
{
    return static_cast<T*>(kvk_emu_alloc(n * sizeof(T)));
}

bool contains(const std::string& s, const char* sub) { return s.find(sub) != std::string::npos; }

// Expect `rc == code` and every phrase in the message; prints the message so the report shows it.
void expect_error(int rc, int code, const std::string& what, std::initializer_list<const char*> phrases)
{
    bool ok = rc == code;
    for (const char* p : phrases) ok = ok && contains(g_err, p);
    check(ok, what + " -> error " + std::to_string(rc));
    printf("        \"%s\"\n", g_err.c_str());
}

double seconds_since(std::chrono::steady_clock::time_point t0)
{
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// CUDA programming guide semantics of the shuffles (written independently of the PTX formulas the
// emulator uses).
int ref_shuffle(const std::vector<int>& in, int rank, int mode, int b, int width)
{
    const int lane = rank & 31, warpBase = rank - lane;
    const int seg = lane & ~(width - 1);
    int src = lane;
    switch (mode) {
    case 0: src = seg + (b & (width - 1)); break;                               // srcLane modulo width
    case 1: src = lane - b; if (src < seg) src = lane; break;                   // below the segment: own
    case 2: src = lane + b; if (src >= seg + width) src = lane; break;          // past the segment: own
    default: src = lane ^ b; if (src >= seg + width) src = lane; break;         // later segment: own
    }
    return in[warpBase + src];
}

// ---- correctness -----------------------------------------------------------------------------------------
void test_basics(const Lib& k)
{
    // grid-stride copy, several OS-thread counts
    const long long n = 100003;
    float* in = dalloc<float>(n);
    float* out = dalloc<float>(n);
    for (long long i = 0; i < n; ++i) in[i] = (float)(i % 1000) * 0.25f;
    for (int threads : {1, 2, 8}) {
        for (long long i = 0; i < n; ++i) out[i] = NAN;
        Launch c;
        c.gx = 37;
        c.bx = 128;
        c.threads = threads;
        long long nn = n;
        int rc = launch(k, "t_copy", c, {&in, &out, &nn});
        bool ok = rc == 0;
        for (long long i = 0; i < n && ok; ++i) ok = out[i] == 2.0f * in[i] + 1.0f;
        check(ok, "grid-stride copy, 37 x 128 threads over 100003 elements, hostThreads=" + std::to_string(threads) + (rc ? " " + g_err : ""));
    }
    kvk_emu_free(in);
    kvk_emu_free(out);

    // block reduction with static shared memory + __syncthreads
    {
        const int nn = 50000, blocks = 40;
        float* x = dalloc<float>(nn);
        float* sums = dalloc<float>(blocks);
        for (int i = 0; i < nn; ++i) x[i] = (float)(i % 7);
        Launch c;
        c.gx = blocks;
        c.bx = 256;
        int nv = nn;
        int rc = launch(k, "t_block_reduce", c, {&x, &sums, &nv});
        bool ok = rc == 0;
        for (int b = 0; b < blocks && ok; ++b) {
            double ref = 0;
            for (int i = b * 256; i < nn; i += blocks * 256)
                for (int t = 0; t < 256 && i + t < nn; ++t) ref += x[i + t];
            ok = sums[b] == (float)ref;
        }
        check(ok, "block reduction (static __shared__ + __syncthreads), 40 blocks x 256" + (rc ? " " + g_err : std::string()));
        kvk_emu_free(x);
        kvk_emu_free(sums);
    }

    // static shared memory is refilled with 0xFF for every block
    {
        unsigned* o = dalloc<unsigned>(64);
        Launch c;
        c.gx = 64;
        c.bx = 32;
        c.threads = 2;
        int rc = launch(k, "t_shared_fill", c, {&o});
        bool ok = rc == 0;
        for (int b = 0; b < 64 && ok; ++b) ok = o[b] == 0xFFFFFFFFu;
        check(ok, "static __shared__ starts as 0xFF in every block (undefined on a GPU; never the previous block's data)");
        c.dyn = 40;
        rc = launch(k, "t_dynamic_fill", c, {&o});
        ok = rc == 0;
        for (int b = 0; b < 64 && ok; ++b) ok = o[b] == 0xFFFFFFFFu;
        check(ok, "dynamic shared memory starts as 0xFF in every block");
        kvk_emu_free(o);
    }

    // dynamic shared memory
    {
        const int nn = 1000, bs = 96;
        int* x = dalloc<int>(nn);
        int* y = dalloc<int>(nn);
        for (int i = 0; i < nn; ++i) x[i] = i * 3 + 1;
        Launch c;
        c.gx = (nn + bs - 1) / bs;
        c.bx = bs;
        c.dyn = bs * sizeof(int);
        int nv = nn;
        int rc = launch(k, "t_dynamic_shared", c, {&x, &y, &nv});
        bool ok = rc == 0;
        for (int i = 0; i < nn && ok; ++i) {
            const int blk = i / bs, t = i % bs, j = blk * bs + (bs - 1 - t);
            ok = y[i] == (j < nn ? x[j] : -1);
        }
        check(ok, "dynamic shared memory (KVK_DYNAMIC_SHARED), 11 blocks x 96, reversal" + (rc ? " " + g_err : std::string()));
        kvk_emu_free(x);
        kvk_emu_free(y);
    }

    // a template kernel exported with KVK_EMU_EXPORT_AS
    {
        int* o = dalloc<int>(40);
        Launch c;
        c.bx = 40;
        int rc = launch(k, "t_template_3", c, {&o});
        bool ok = rc == 0;
        for (int i = 0; i < 40 && ok; ++i) ok = o[i] == 3 * i;
        check(ok, "KVK_EMU_EXPORT_AS(t_template_3, t_template<3>)");
        kvk_emu_free(o);
    }

    // 3-D blocks and grids
    {
        Launch c;
        c.gx = 3; c.gy = 2; c.gz = 2; c.bx = 8; c.by = 4; c.bz = 2;
        const unsigned total = 12 * 64;
        unsigned* o = dalloc<unsigned>(total);
        int rc = launch(k, "t_dims", c, {&o});
        bool ok = rc == 0;
        for (unsigned g = 0; g < total && ok; ++g) {
            const unsigned block = g / 64, r = g % 64;
            const unsigned tx = r % 8, ty = (r / 8) % 4, tz = r / 32, bx = block % 3, by = (block / 3) % 2, bz = block / 6;
            ok = o[g] == (tx | ty << 4 | tz << 8 | bx << 12 | by << 16 | bz << 20);
        }
        check(ok, "threadIdx/blockIdx/blockDim/gridDim with 3-D block (8,4,2) and grid (3,2,2)");
        kvk_emu_free(o);
    }
}

void test_warp(const Lib& k)
{
    const int n = 64;   // two warps
    int* in = dalloc<int>(n);
    int* out = dalloc<int>(n);
    std::vector<int> hin(n);
    for (int i = 0; i < n; ++i) hin[i] = in[i] = 1000 + i * 7;
    int bad = 0, cases = 0;
    std::string firstBad;
    const char* modes[] = {"idx", "up", "down", "xor"};
    for (int mode = 0; mode < 4; ++mode)
        for (int width : {32, 16, 8, 4, 2, 1})
            for (int b : {0, 1, 2, 3, 5, 7, 8, 15, 16, 17, 31, -1, 35}) {
                if (mode != 0 && (b < 0 || b > 31)) continue;   // only idx takes out-of-range lanes here
                Launch c;
                c.bx = n;
                int m = mode, bb = b, w = width;
                int rc = launch(k, "t_shuffle", c, {&in, &out, &m, &bb, &w});
                ++cases;
                for (int r = 0; r < n; ++r)
                    if (rc != 0 || out[r] != ref_shuffle(hin, r, mode, b, width)) {
                        if (!bad++) firstBad = std::string(modes[mode]) + " width " + std::to_string(width) + " b " + std::to_string(b) + " " + g_err;
                        break;
                    }
            }
    check(bad == 0, "shuffles idx/up/down/xor x width 32,16,8,4,2,1 x lane/delta incl. out of range (" +
                        std::to_string(cases) + " launches) match the CUDA-guide reference" + (bad ? ": " + firstBad : ""));
    kvk_emu_free(in);
    kvk_emu_free(out);

    {
        long long* x = dalloc<long long>(32);
        long long* y = dalloc<long long>(128);
        for (int i = 0; i < 32; ++i) x[i] = (long long)i * 123456789LL - 5000000000LL;
        Launch c;
        int rc = launch(k, "t_shuffle_types", c, {&x, &y});
        bool ok = rc == 0;
        for (int r = 0; r < 32 && ok; ++r) {
            const long long v = x[(r + 5) & 31];
            ok = y[4 * r + 0] == (long long)((float)v * 0.5f * 2.0f) && y[4 * r + 1] == v * 1000003LL &&
                 y[4 * r + 2] == (long long)((double)v * 0.25 * 4.0) && y[4 * r + 3] == (long long)((unsigned)v ^ 0x80000000u);
        }
        check(ok, "__shfl_sync of float, long long, double, unsigned moves all bits");
        kvk_emu_free(x);
        kvk_emu_free(y);
    }

    {
        const int nt = 64;
        int* p = dalloc<int>(nt);
        unsigned* o = dalloc<unsigned>(3 * nt);
        unsigned* o2 = dalloc<unsigned>(nt);
        for (int i = 0; i < nt; ++i) p[i] = i < 32 ? (i % 3 == 0) : 1;   // warp 1: all true
        Launch c;
        c.bx = nt;
        int rc = launch(k, "t_vote", c, {&p, &o, &o2});
        bool ok = rc == 0;
        for (int r = 0; r < nt && ok; ++r) {
            unsigned ballot = 0, half = 0;
            const int w0 = r & ~31;
            for (int l = 0; l < 32; ++l) {
                if (p[w0 + l]) ballot |= 1u << l;
                if (p[w0 + l] && (l & 1) == (r & 1)) half |= 1u << l;
            }
            ok = o[3 * r] == ballot && o[3 * r + 1] == (ballot != 0) && o[3 * r + 2] == (ballot == 0xffffffffu) && o2[r] == half;
        }
        check(ok, "__ballot_sync/__any_sync/__all_sync, and even/odd lanes voting with disjoint masks in divergent branches");
        kvk_emu_free(p);
        kvk_emu_free(o);
        kvk_emu_free(o2);
    }

    {
        const int blocks = 5, bs = 96;
        int* p = dalloc<int>(blocks * bs);
        int* o = dalloc<int>(blocks * 3);
        for (int i = 0; i < blocks * bs; ++i) p[i] = (i / bs == 1) ? 1 : (i / bs == 2 ? 0 : (i % 5 == 0));
        Launch c;
        c.gx = blocks;
        c.bx = bs;
        int rc = launch(k, "t_sync_count", c, {&p, &o});
        bool ok = rc == 0;
        for (int b = 0; b < blocks && ok; ++b) {
            int cnt = 0;
            for (int t = 0; t < bs; ++t) cnt += p[b * bs + t] != 0;
            ok = o[3 * b] == cnt && o[3 * b + 1] == (cnt == bs) && o[3 * b + 2] == (cnt != 0);
        }
        check(ok, "__syncthreads_count/_and/_or");
        kvk_emu_free(p);
        kvk_emu_free(o);
    }

    {
        const int nw = 4096;   // 128 blocks x 1024 threads = 4096 warps
        float* x = dalloc<float>(nw * 32);
        float* s = dalloc<float>(nw);
        for (int i = 0; i < nw * 32; ++i) x[i] = (float)((i * 37) % 101);
        Launch c;
        c.gx = 128;
        c.bx = 1024;
        int rc = launch(k, "t_warp_reduce", c, {&x, &s});
        bool ok = rc == 0;
        for (int w = 0; w < nw && ok; ++w) {
            float ref = 0;
            for (int l = 0; l < 32; ++l) ref += x[w * 32 + l];
            ok = s[w] == ref;   // integers: exact in any order
        }
        check(ok, "warp reduction with __shfl_xor_sync, 128 blocks x 1024 threads");
        kvk_emu_free(x);
        kvk_emu_free(s);
    }

    {
        int* x = dalloc<int>(32);
        unsigned* o = dalloc<unsigned>(128);
        int sum = 0, mx = -1000;
        for (int i = 0; i < 32; ++i) { x[i] = (i * 11) % 17 - 5; sum += x[i]; mx = x[i] > mx ? x[i] : mx; }
        Launch c;
        int rc = launch(k, "t_warp_misc", c, {&x, &o});
        bool ok = rc == 0;
        for (int r = 0; r < 32 && ok; ++r) {
            unsigned m = 0;
            for (int l = 0; l < 32; ++l)
                if ((x[l] & 3) == (x[r] & 3)) m |= 1u << l;
            ok = o[4 * r] == (unsigned)sum && o[4 * r + 1] == (unsigned)mx && o[4 * r + 2] == m && o[4 * r + 3] == 0xffffffffu;
        }
        check(ok, "__reduce_add_sync, __reduce_max_sync (signed), __match_any_sync, __syncwarp, __activemask");
        kvk_emu_free(x);
        kvk_emu_free(o);
    }

    {
        int* o = dalloc<int>(64);
        for (int i = 0; i < 64; ++i) o[i] = -7;
        Launch c;
        c.bx = 64;
        int rc = launch(k, "t_shfl_exited_unread", c, {&o});
        bool ok = rc == 0;
        for (int i = 0; i < 64 && ok; ++i) ok = (i & 31) == 31 ? o[i] == -7 : o[i] == (i & ~31);
        check(ok, "a lane of the mask exited but nobody reads it: legal (CUDA: all non-exited lanes of the mask) and works" + (rc ? " " + g_err : std::string()));
        kvk_emu_free(o);
    }
}

void test_atomics(const Lib& k)
{
    unsigned long long* counter = dalloc<unsigned long long>(1);
    unsigned* hist = dalloc<unsigned>(16);
    float* fsum = dalloc<float>(1);
    int* imax = dalloc<int>(1);
    int* imin = dalloc<int>(1);
    unsigned* bits = dalloc<unsigned>(1);
    double* dsum = dalloc<double>(1);
    *counter = 0;
    *fsum = 0;
    *imax = -1;
    *imin = 1;
    *bits = 0;
    *dsum = 0;
    for (int i = 0; i < 16; ++i) hist[i] = 0;
    const int n = 1 << 20;
    Launch c;
    c.gx = 300;
    c.bx = 256;
    c.threads = 8;
    int nn = n;
    int rc = launch(k, "t_atomics", c, {&counter, &hist, &fsum, &imax, &imin, &bits, &dsum, &nn});
    bool ok = rc == 0 && *counter == (unsigned long long)n && *fsum == (float)n && *imax == n - 1 && *imin == -(n - 1) &&
              *bits == 0xffffffffu && *dsum == n * 0.5;
    for (int i = 0; i < 16; ++i) ok = ok && hist[i] == (unsigned)(n / 16);
    check(ok, "atomicAdd (ull, unsigned, float, double), atomicMax/Min/Or from 300 blocks on 8 OS threads: exact counts (" +
                  std::to_string(*counter) + ")");
    for (void* p : {(void*)counter, (void*)hist, (void*)fsum, (void*)imax, (void*)imin, (void*)bits, (void*)dsum}) kvk_emu_free(p);
}

void test_intrinsics(const Lib& k)
{
    unsigned* o = dalloc<unsigned>(16);
    Launch c;
    int rc = launch(k, "t_intrinsics", c, {&o});
    const unsigned expect[16] = {
        0x55114400u,          // __byte_perm: selectors 0,4,1,5 -> bytes 0x00,0x44,0x11,0x55
        17u,                  // popc
        15u,                  // clz(0x10000)
        17u,                  // ffs(0x10000)
        0x80000000u,          // brev(1)
        0xFFFFFFFEu,          // umulhi
        (unsigned)(-3 * -8388607),   // mul24
        2u, (unsigned)-4,     // float2int_rn ties to even
        0x7FFFFFFFu,          // float2int_rz saturates
        1u,                   // saturatef(-1) = +0 (bits 0), saturatef(2) = 1
        0x00000003u,          // funnelshift_l
        20u,                  // dp4a: 1+2+3+4+10
        6u,                   // max(3,7) + min(-1,2)
        0u,                   // __fdividef(1, 1e38) = 0 (2^126 < |y| < 2^128)
        0x3f800000u};         // __expf(0) = 1
    bool ok = rc == 0;
    std::string bad;
    for (int i = 0; i < 16; ++i)
        if (o[i] != expect[i]) { ok = false; bad += " [" + std::to_string(i) + "]=" + std::to_string(o[i]); }
    check(ok, "integer/float intrinsics follow the CUDA math API" + bad);
    kvk_emu_free(o);
}

// ---- faults ---------------------------------------------------------------------------------------------------
void test_faults(const Lib& k)
{
    char msg[2048];
    // OOB write one element past a page-multiple allocation -> guard page
    {
        float* p = dalloc<float>(1024);
        Launch c;
        c.gx = 4;
        c.bx = 64;
        int n = 1024;
        int rc = launch(k, "f_oob_write", c, {&p, &n});
        expect_error(rc, KVK_EMU_ERR_MEMORY, "OOB write 1 element past a 4096-byte allocation (guard page)",
                     {"f_oob_write", "block (0,0,0)", "thread (0,0,0)", "0 bytes past the end", "4096 bytes", "write"});
        kvk_emu_free(p);
    }
    // one byte past a size that is not a multiple of 16 -> canary, reported after the launch
    {
        unsigned char* p = dalloc<unsigned char>(100);
        Launch c;
        c.gx = 2;
        c.bx = 32;
        int n = 100;
        int rc = launch(k, "f_oob_byte", c, {&p, &n});
        expect_error(rc, KVK_EMU_ERR_CORRUPTION, "OOB write 1 byte past a 100-byte allocation (canary)",
                     {"f_oob_byte", "100 bytes", "byte 0..0 after its end"});
        kvk_emu_free(p);
        check(kvk_emu_last_error(msg, sizeof msg) == 0, "the damaged canary was repaired after being reported (free is clean)");
    }
    // OOB read past the end
    {
        float* p = dalloc<float>(1000);
        float* o = dalloc<float>(1);
        Launch c;
        c.gx = 8;
        c.bx = 128;
        int n = 1000;
        int rc = launch(k, "f_oob_read", c, {&p, &o, &n});
        expect_error(rc, KVK_EMU_ERR_MEMORY, "OOB read 1 element past a 4000-byte allocation (guard page)",
                     {"f_oob_read", "block (7,0,0)", "thread (104,0,0)", "read", "0 bytes past the end", "4000 bytes"});
        kvk_emu_free(p);
        kvk_emu_free(o);
    }
    // missing __syncthreads in a divergent branch
    {
        float* o = dalloc<float>(64);
        Launch c;
        c.gx = 3;
        c.bx = 64;
        c.threads = 1;
        int rc = launch(k, "f_missing_sync", c, {&o});
        expect_error(rc, KVK_EMU_ERR_DEADLOCK, "__syncthreads skipped by half the block (divergent branch)",
                     {"barrier deadlock in kernel 'f_missing_sync'", "block (0,0,0)", "32 of 64 threads wait at __syncthreads (threads 0-31)",
                      "32 have exited (threads 32-63)"});
        kvk_emu_free(o);
    }
    // __shfl_xor_sync reading a lane that exited
    {
        int* o = dalloc<int>(32);
        Launch c;
        int rc = launch(k, "f_shfl_exited", c, {&o});
        expect_error(rc, KVK_EMU_ERR_WARP, "__shfl_xor_sync reads a lane that exited",
                     {"f_shfl_exited", "thread (30,0,0)", "reads lane 31, which has exited"});
        kvk_emu_free(o);
    }
    // dynamic shared memory above maxSharedBytes
    {
        int* x = dalloc<int>(64);
        int* y = dalloc<int>(64);
        Launch c;
        c.bx = 64;
        c.dyn = 64 * 1024;
        c.maxShared = 48 * 1024;
        int nv = 64;
        int rc = launch(k, "t_dynamic_shared", c, {&x, &y, &nv});
        expect_error(rc, KVK_EMU_ERR_SHARED, "dynamic shared memory of 64 KiB with maxSharedBytes = 48 KiB",
                     {"t_dynamic_shared", "65536 bytes of dynamic shared memory exceed the limit of 49152"});
        c.maxShared = 227 * 1024;
        rc = launch(k, "t_dynamic_shared", c, {&x, &y, &nv});
        check(rc == 0, "the same launch with maxSharedBytes = 227 KiB (H100 opt-in) runs" + (rc ? " " + g_err : std::string()));
        kvk_emu_free(x);
        kvk_emu_free(y);
    }
    // stack overflow in a fiber
    {
        int* o = dalloc<int>(2);
        Launch c;
        c.gx = 2;
        c.bx = 32;
        int depth = 100000;
        int rc = launch(k, "f_stack_overflow", c, {&o, &depth});
        expect_error(rc, KVK_EMU_ERR_STACK, "deep recursion overflows the fiber stack",
                     {"f_stack_overflow", "thread (5,0,0)", "stack overflow", "KVK_EMU_STACK_KB"});
        kvk_emu_free(o);
    }
    {
        int* o = dalloc<int>(64);
        Launch c;
        c.bx = 64;
        int i = 39999;
        int rc = launch(k, "f_big_frame", c, {&o, &i});
        expect_error(rc, KVK_EMU_ERR_STACK, "a 160 KB local array in a 64 KiB fiber stack", {"f_big_frame", "stack overflow"});
        kvk_emu_free(o);
    }
    // more faults
    {
        Launch c;
        c.bx = 64;
        c.dyn = 256;
        int n = 64;
        int rc = launch(k, "f_dynamic_oob", c, {&n});
        expect_error(rc, KVK_EMU_ERR_MEMORY, "dynamic shared memory: write one element past dynamicSharedBytes",
                     {"f_dynamic_oob", "0 bytes past the end of the 256 bytes of dynamic shared memory"});
    }
    {
        int* p = nullptr;
        Launch c;
        int rc = launch(k, "f_null", c, {&p});
        expect_error(rc, KVK_EMU_ERR_MEMORY, "null pointer store", {"f_null", "null pointer", "0xc"});
    }
    {
        float* p = dalloc<float>(16);
        kvk_emu_free(p);
        Launch c;
        int rc = launch(k, "f_write_one", c, {&p});
        expect_error(rc, KVK_EMU_ERR_MEMORY, "use after free", {"use after free", "64 bytes", "which was freed"});
    }
    {
        int* o = dalloc<int>(32);
        Launch c;
        int rc = launch(k, "f_mask_without_self", c, {&o});
        expect_error(rc, KVK_EMU_ERR_WARP, "__shfl_sync with a mask that lacks the calling lane", {"does not contain the calling lane"});
        rc = launch(k, "f_divergent_collectives", c, {&o});
        expect_error(rc, KVK_EMU_ERR_DEADLOCK, "lanes of one mask in __shfl_sync and __ballot_sync", {"divergent warp collective"});
        c.bx = 64;
        int* o64 = dalloc<int>(64);
        rc = launch(k, "f_warp_vs_block", c, {&o64});
        expect_error(rc, KVK_EMU_ERR_DEADLOCK, "half a warp in __syncwarp, the other half at __syncthreads",
                     {"barrier deadlock", "__syncwarp(mask 0xffffffff)", "waiting at __syncthreads"});
        rc = launch(k, "f_assert", c, {&o64});
        expect_error(rc, KVK_EMU_ERR_TRAP, "assert() in a kernel", {"thread (40,0,0)", "Assertion `threadIdx.x < 40` failed"});
        kvk_emu_free(o);
        kvk_emu_free(o64);
    }
    {
        unsigned char* p = dalloc<unsigned char>(64);
        unsigned char* o = dalloc<unsigned char>(16);
        Launch c;
        int rc = launch(k, "f_misaligned", c, {&p, &o});
        expect_error(rc, KVK_EMU_ERR_TRAP, "misaligned 16-byte load through the cuda/common host twin",
                     {"f_misaligned", "misaligned address", "needs 16-byte alignment"});
        rc = launch(k, "f_misaligned_atomic", c, {&p});
        expect_error(rc, KVK_EMU_ERR_TRAP, "misaligned atomicAdd", {"misaligned address", "atomicAdd"});
        int* io = dalloc<int>(1);
        int d = 0;
        rc = launch(k, "f_div_zero", c, {&io, &d});
        expect_error(rc, KVK_EMU_ERR_TRAP, "integer division by zero", {"thread (2,0,0)", "division by zero"});
        kvk_emu_free(p);
        kvk_emu_free(o);
        kvk_emu_free(io);
    }
    // configuration errors
    {
        Launch c;
        c.bx = 2048;
        float* p = nullptr;
        int rc = launch(k, "f_write_one", c, {&p});
        expect_error(rc, KVK_EMU_ERR_CONFIG, "block of 2048 threads", {"invalid launch configuration"});
    }
    // host-side canary damage found by kvk_emu_free
    {
        unsigned char* p = dalloc<unsigned char>(37);
        p[37] = 1;
        p[40] = 2;
        kvk_emu_free(p);
        const int code = kvk_emu_last_error(msg, sizeof msg);
        g_err = msg;
        expect_error(code, KVK_EMU_ERR_CORRUPTION, "host write past a 37-byte allocation, found by kvk_emu_free",
                     {"kvk_emu_free", "bytes 0..3 after its end were overwritten"});
        kvk_emu_free(p);
        const int code2 = kvk_emu_last_error(msg, sizeof msg);
        g_err = msg;
        expect_error(code2, KVK_EMU_ERR_FREE, "double free", {"double free"});
    }
    // zero-byte allocation: legal, any access faults
    {
        float* p = dalloc<float>(0);
        Launch c;
        int rc = launch(k, "f_write_one", c, {&p});
        expect_error(rc, KVK_EMU_ERR_MEMORY, "write to a 0-byte allocation", {"0 bytes past the end", "0 bytes)"});
        kvk_emu_free(p);
        check(kvk_emu_last_error(msg, sizeof msg) == 0, "kvk_emu_alloc(0) / kvk_emu_free are clean");
    }
    // a spin-wait on another thread: fine with __nanosleep, a timeout error without
    {
        int* flag = dalloc<int>(1);
        int* o = dalloc<int>(1);
        *flag = 0;
        Launch c;
        int rc = launch(k, "t_spin_nanosleep", c, {&flag, &o});
        check(rc == 0 && *o == 7, "a spin-wait with __nanosleep lets the other fibers run" + (rc ? " " + g_err : std::string()));
        *flag = 0;
        setenv("KVK_EMU_TIMEOUT_S", "2", 1);   // read by each launch
        const auto t0 = std::chrono::steady_clock::now();
        rc = launch(k, "f_spin", c, {&flag});
        unsetenv("KVK_EMU_TIMEOUT_S");
        expect_error(rc, KVK_EMU_ERR_TIMEOUT, "a spin-wait without __nanosleep (KVK_EMU_TIMEOUT_S=2)",
                     {"f_spin", "did not finish within 2 s", "running: block (0,0,0) thread (0,0,0)"});
        printf("        (returned after %.1f s)\n", seconds_since(t0));
        kvk_emu_free(flag);
        kvk_emu_free(o);
    }
    // the emulator is still healthy after all of that
    {
        const long long n = 4096;
        float* in = dalloc<float>(n);
        float* out = dalloc<float>(n);
        for (long long i = 0; i < n; ++i) in[i] = (float)i;
        Launch c;
        c.gx = 16;
        c.bx = 256;
        long long nn = n;
        int rc = launch(k, "t_copy", c, {&in, &out, &nn});
        bool ok = rc == 0;
        for (long long i = 0; i < n && ok; ++i) ok = out[i] == 2.0f * i + 1.0f;
        check(ok, "after the planted faults, a normal launch still runs correctly");
        kvk_emu_free(in);
        kvk_emu_free(out);
    }
}

// ---- paging.cu, unchanged, against a naive reference ---------------------------------------------------------
struct PagingCase {
    int hnd, vec;
};

void test_paging(const Lib& lib, PagingCase pc)
{
    std::mt19937 rng(1234 + pc.hnd * 7 + pc.vec);
    const int Hkv = 3, rowBytes = 48, pageSize = 5, numPages = 23, batch = 3, maxPagesPerSeq = 6;
    const int maxTokens = maxPagesPerSeq * pageSize - 2;   // 28
    const long long tokenBytes = (long long)Hkv * rowBytes, pageBytes = pageSize * tokenBytes, poolBytes = numPages * pageBytes;
    auto slotOffset = [&](int page, int off, int h) -> long long {
        return pc.hnd ? page * pageBytes + (long long)h * pageSize * rowBytes + (long long)off * rowBytes
                      : page * pageBytes + (long long)off * tokenBytes + (long long)h * rowBytes;
    };
    const std::string tag = std::string(pc.hnd ? "HND" : "NHD") + ", VEC_BYTES=" + std::to_string(pc.vec);

    unsigned char* kPool = dalloc<unsigned char>(poolBytes);
    unsigned char* vPool = dalloc<unsigned char>(poolBytes);
    std::vector<unsigned char> refK(poolBytes), refV(poolBytes);
    for (long long i = 0; i < poolBytes; ++i) refK[i] = kPool[i] = (unsigned char)rng(), refV[i] = vPool[i] = (unsigned char)rng();

    // append: 19 tokens, a key stride wider than a token, some padding slots
    const int numTokens = 19;
    const long long keyStride = tokenBytes + 16, valueStride = tokenBytes;
    unsigned char* key = dalloc<unsigned char>(numTokens * keyStride);
    unsigned char* value = dalloc<unsigned char>(numTokens * valueStride);
    int* slots = dalloc<int>(numTokens);
    for (long long i = 0; i < numTokens * keyStride; ++i) key[i] = (unsigned char)rng();
    for (long long i = 0; i < numTokens * valueStride; ++i) value[i] = (unsigned char)rng();
    std::vector<int> perm(numPages * pageSize);
    for (int i = 0; i < (int)perm.size(); ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int t = 0; t < numTokens; ++t) slots[t] = t % 6 == 4 ? -1 : perm[t];
    for (int t = 0; t < numTokens; ++t) {
        if (slots[t] < 0) continue;
        for (int h = 0; h < Hkv; ++h) {
            const long long d = slotOffset(slots[t] / pageSize, slots[t] % pageSize, h);
            memcpy(&refK[d], key + t * keyStride + h * rowBytes, rowBytes);
            memcpy(&refV[d], value + t * valueStride + h * rowBytes, rowBytes);
        }
    }
    Launch c;
    c.gx = 3;
    c.bx = 64;
    int nT = numTokens, nH = Hkv, ps = pageSize, rb = rowBytes;
    long long ks = keyStride, vs = valueStride;
    int rc = launch(lib, "paging_append", c, {&key, &value, &slots, &kPool, &vPool, &nT, &nH, &ps, &rb, &ks, &vs});
    check(rc == 0 && !memcmp(kPool, refK.data(), poolBytes) && !memcmp(vPool, refV.data(), poolBytes),
          "paging_append (" + tag + ") matches the reference" + (rc ? " " + g_err : std::string()));

    // gather with zero fill, block table with random pages, lengths incl. 0 and over the table
    int* table = dalloc<int>(batch * maxPagesPerSeq);
    int* lens = dalloc<int>(batch);
    for (int i = 0; i < batch * maxPagesPerSeq; ++i) table[i] = (int)(rng() % numPages);
    lens[0] = 13;
    lens[1] = 0;
    lens[2] = 1000;   // clamped to maxTokens
    const long long outBytes = (long long)batch * maxTokens * tokenBytes;
    unsigned char* kOut = dalloc<unsigned char>(outBytes);
    unsigned char* vOut = dalloc<unsigned char>(outBytes);
    memset(kOut, 0xAB, outBytes);
    memset(vOut, 0xAB, outBytes);
    std::vector<unsigned char> gk(outBytes, 0), gv(outBytes, 0);
    for (int b = 0; b < batch; ++b) {
        const int len = std::min(std::max(lens[b], 0), maxTokens);
        for (int n = 0; n < len; ++n)
            for (int h = 0; h < Hkv; ++h) {
                const long long s = slotOffset(table[b * maxPagesPerSeq + n / pageSize], n % pageSize, h);
                const long long d = ((long long)b * maxTokens + n) * tokenBytes + h * rowBytes;
                memcpy(&gk[d], &refK[s], rowBytes);
                memcpy(&gv[d], &refV[s], rowBytes);
            }
    }
    Launch g;
    g.gx = 2;
    g.gy = 2;
    g.bx = 96;
    int nb = batch, mpp = maxPagesPerSeq, mt = maxTokens, zf = 1;
    rc = launch(lib, "paging_gather", g, {&kPool, &vPool, &table, &lens, &kOut, &vOut, &nb, &mpp, &mt, &nH, &ps, &rb, &zf});
    check(rc == 0 && !memcmp(kOut, gk.data(), outBytes) && !memcmp(vOut, gv.data(), outBytes),
          "paging_gather (" + tag + ", zero fill, clamped lengths) matches the reference" + (rc ? " " + g_err : std::string()));

    // scatter back into fresh pools with distinct pages, then compare rows
    std::vector<int> pages(numPages);
    for (int i = 0; i < numPages; ++i) pages[i] = i;
    std::shuffle(pages.begin(), pages.end(), rng);
    for (int i = 0; i < batch * maxPagesPerSeq && i < numPages; ++i) table[i] = pages[i];
    memset(kPool, 0, poolBytes);
    memset(vPool, 0, poolBytes);
    rc = launch(lib, "paging_scatter", g, {&kOut, &vOut, &table, &lens, &kPool, &vPool, &nb, &mpp, &mt, &nH, &ps, &rb});
    bool ok = rc == 0;
    for (int b = 0; b < batch && ok; ++b) {
        const int len = std::min(std::max(lens[b], 0), maxTokens);
        for (int n = 0; n < len && ok; ++n)
            for (int h = 0; h < Hkv && ok; ++h) {
                const long long s = ((long long)b * maxTokens + n) * tokenBytes + h * rowBytes;
                const long long d = slotOffset(table[b * maxPagesPerSeq + n / pageSize], n % pageSize, h);
                ok = !memcmp(kPool + d, kOut + s, rowBytes) && !memcmp(vPool + d, vOut + s, rowBytes);
            }
    }
    check(ok, "paging_scatter (" + tag + ") puts every row where the block table says" + (rc ? " " + g_err : std::string()));

    // copy_pages, with a skipped pair
    std::vector<unsigned char> ck(kPool, kPool + poolBytes), cv(vPool, vPool + poolBytes);
    int* pairs = dalloc<int>(8);
    const int hp[8] = {0, 20, 3, 21, -1, 22, 5, 19};
    for (int i = 0; i < 8; ++i) pairs[i] = hp[i];
    for (int p = 0; p < 4; ++p) {
        if (hp[2 * p] < 0 || hp[2 * p + 1] < 0) continue;
        memcpy(&ck[hp[2 * p + 1] * pageBytes], &ck[hp[2 * p] * pageBytes], pageBytes);
        memcpy(&cv[hp[2 * p + 1] * pageBytes], &cv[hp[2 * p] * pageBytes], pageBytes);
    }
    Launch cp;
    cp.gx = 1;
    cp.gy = 3;
    cp.bx = 32;
    int np = 4;
    long long pb = pageBytes;
    rc = launch(lib, "paging_copy_pages", cp, {&kPool, &vPool, &pairs, &np, &pb});
    check(rc == 0 && !memcmp(kPool, ck.data(), poolBytes) && !memcmp(vPool, cv.data(), poolBytes),
          "paging_copy_pages (" + tag + ") matches the reference" + (rc ? " " + g_err : std::string()));

    // the real kernel, pushed out of bounds by a bad slot: caught as an error
    slots[0] = numPages * pageSize;   // one page past the pool
    rc = launch(lib, "paging_append", c, {&key, &value, &slots, &kPool, &vPool, &nT, &nH, &ps, &rb, &ks, &vs});
    expect_error(rc, KVK_EMU_ERR_MEMORY, "paging_append (" + tag + ") with a slot one page past the pool",
                 {"paging_append", "bytes past the end of allocation"});

    for (void* p : {(void*)kPool, (void*)vPool, (void*)key, (void*)value, (void*)slots, (void*)table, (void*)lens,
                    (void*)kOut, (void*)vOut, (void*)pairs})
        kvk_emu_free(p);
    char msg[1024];
    check(kvk_emu_last_error(msg, sizeof msg) == 0, "paging (" + tag + "): no canary damage at free");
}

// ---- host-side robustness -----------------------------------------------------------------------------------
// Launches from several host threads at once (test runners run tests in parallel): each must get
// its own correct result.
void test_concurrent_launches(const Lib& k)
{
    const int nThreads = 4, reps = 25;
    int bad[nThreads] = {0};
    std::vector<std::thread> ts;
    for (int t = 0; t < nThreads; ++t)
        ts.emplace_back([&, t] {
            const long long n = 5000 + 777 * t;
            float* in = dalloc<float>(n);
            float* out = dalloc<float>(n);
            for (int r = 0; r < reps; ++r) {
                for (long long i = 0; i < n; ++i) { in[i] = (float)(i + r + 100 * t); out[i] = NAN; }
                char err[512];
                long long nn = n;
                void* args[] = {&in, &out, &nn};
                int rc = kvk_emu_launch(k.entry("t_copy"), args, "t_copy", 7 + t, 1, 1, 64, 1, 1, 0, 0, 2, err, sizeof err);
                for (long long i = 0; i < n; ++i)
                    if (rc || out[i] != 2.0f * in[i] + 1.0f) { ++bad[t]; break; }
            }
            kvk_emu_free(in);
            kvk_emu_free(out);
        });
    for (auto& th : ts) th.join();
    int total = 0;
    for (int t = 0; t < nThreads; ++t) total += bad[t];
    check(total == 0, "4 host threads x 25 concurrent launches each get their own correct results");
}

// A SIGSEGV handler installed before the emulator's (as the .NET runtime's is) still receives the
// faults that are not the emulator's.
sigjmp_buf g_hostJump;
volatile sig_atomic_t g_hostHandlerRan = 0;
void host_segv_handler(int, siginfo_t*, void*)
{
    g_hostHandlerRan = 1;
    siglongjmp(g_hostJump, 1);
}

void install_host_handler()
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = host_segv_handler;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, nullptr);
}

void test_signal_chaining()
{
    struct sigaction cur;
    sigaction(SIGSEGV, nullptr, &cur);
    const bool replaced = (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction != host_segv_handler;
    if (sigsetjmp(g_hostJump, 1) == 0) {
        volatile int* p = nullptr;
        *p = 42;   // a host fault on the main thread, outside any kernel
    }
    check(replaced && g_hostHandlerRan, "a host SIGSEGV outside kernels reaches the handler installed before the emulator's");
}

// ---- timings --------------------------------------------------------------------------------------------------
void timings(const Lib& k)
{
    printf("\ntimings (%u hardware threads):\n", std::thread::hardware_concurrency());
    const long long n = 1000 * 256;
    float* in = dalloc<float>(n);
    float* out = dalloc<float>(n);
    for (long long i = 0; i < n; ++i) in[i] = (float)i;
    for (int threads : {1, 0}) {
        Launch c;
        c.gx = 1000;
        c.bx = 256;
        c.threads = threads;
        long long nn = n;
        launch(k, "t_copy", c, {&in, &out, &nn});   // warm-up (worker creation, stacks)
        auto t0 = std::chrono::steady_clock::now();
        int rc = launch(k, "t_copy", c, {&in, &out, &nn});
        printf("  copy, 1000 blocks x 256 threads, no barriers, hostThreads=%d: %.1f ms (rc %d)\n", threads, 1e3 * seconds_since(t0), rc);
        float* sums = dalloc<float>(1000);
        int ni = (int)n;
        launch(k, "t_block_reduce", c, {&in, &sums, &ni});
        t0 = std::chrono::steady_clock::now();
        rc = launch(k, "t_block_reduce", c, {&in, &sums, &ni});
        printf("  block reduction, 1000 blocks x 256 threads, 9 __syncthreads each, hostThreads=%d: %.1f ms (rc %d)\n", threads,
               1e3 * seconds_since(t0), rc);
        kvk_emu_free(sums);
        float* ws = dalloc<float>(n / 32);
        t0 = std::chrono::steady_clock::now();
        rc = launch(k, "t_warp_reduce", c, {&in, &ws});
        printf("  warp reduction, 1000 blocks x 256 threads, 5 __shfl_xor_sync each, hostThreads=%d: %.1f ms (rc %d)\n", threads,
               1e3 * seconds_since(t0), rc);
        kvk_emu_free(ws);
    }
    kvk_emu_free(in);
    kvk_emu_free(out);
}

}  // namespace

int main(int argc, char** argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s libkvk_emu.so emu_test_kernels.so paging_nhd16.so paging_hnd8.so\n", argv[0]);
        return 2;
    }
    install_host_handler();   // stands for the .NET runtime's handler, installed before ours
    {
        Lib runtime(argv[1]);
        rt::alloc = (decltype(rt::alloc))dlsym(runtime.h, "kvk_emu_alloc");
        rt::free_ = (decltype(rt::free_))dlsym(runtime.h, "kvk_emu_free");
        rt::launch = (decltype(rt::launch))dlsym(runtime.h, "kvk_emu_launch");
        rt::last_error = (decltype(rt::last_error))dlsym(runtime.h, "kvk_emu_last_error");
        rt::check_memory = (decltype(rt::check_memory))dlsym(runtime.h, "kvk_emu_check_memory");
        rt::version = (decltype(rt::version))dlsym(runtime.h, "kvk_emu_version");
        if (!rt::alloc || !rt::free_ || !rt::launch || !rt::last_error || !rt::check_memory || !rt::version) {
            fprintf(stderr, "libkvk_emu.so lacks an entry point\n");
            return 2;
        }
    }
    check(kvk_emu_version() == KVK_EMU_ABI_VERSION, "kvk_emu_version() == " + std::to_string(KVK_EMU_ABI_VERSION));
    // paging first: the worker threads exist before the test kernels (which have static shared
    // memory, i.e. TLS) are dlopen'ed, as when the host loads a new kernel library mid-run.
    Lib pagingNhd(argv[3]), pagingHnd(argv[4]);
    test_paging(pagingNhd, PagingCase{0, 16});
    test_paging(pagingHnd, PagingCase{1, 8});
    Lib kernels(argv[2]);
    {
        unsigned sizes[16];
        typedef int (*params_fn)(unsigned*, int);
        params_fn f = (params_fn)dlsym(pagingNhd.h, "kvk_emu_params_paging_append");
        const int np = f ? f(sizes, 16) : -1;
        check(np == 11 && sizes[0] == 8 && sizes[5] == 4 && sizes[9] == 8 && sizes[10] == 8,
              "kvk_emu_params_paging_append reports 11 parameters with their sizes");
    }
    test_basics(kernels);
    test_warp(kernels);
    test_atomics(kernels);
    test_intrinsics(kernels);
    test_faults(kernels);
    test_concurrent_launches(kernels);
    test_signal_chaining();
    {
        char msg[512];
        check(kvk_emu_check_memory(msg, sizeof msg) == 0, "kvk_emu_check_memory: no live allocation is damaged");
    }
    timings(kernels);
    printf("\n%d checks, %d failed\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
