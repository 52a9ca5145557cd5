// kvk_emu_runtime.cpp — libkvk_emu.so, the runtime of the CPU emulator of the CUDA execution model.
//
// Build: g++ -std=c++17 -O2 -g -fPIC -shared -pthread -Wl,-soname,libkvk_emu.so -Wl,-z,nodelete
//            cuda/emulation/kvk_emu_runtime.cpp -o libkvk_emu.so
//        (-z nodelete: its signal handlers and worker threads must outlive any dlclose; -ldl is
//        implied by glibc >= 2.34, add it for older systems)
//
// Model
// - A launch runs gridDim blocks; blocks are taken one at a time by up to `hostThreads` worker OS
//   threads (a pool that lives for the process). The caller's thread only waits, so signal handling
//   and alternate stacks never touch threads the host (e.g. the .NET runtime) owns.
// - A block runs on one worker: each CUDA thread is a fiber with its own stack (64 KiB, env
//   KVK_EMU_STACK_KB) above a 1 MiB PROT_NONE guard gap. Fibers are run round-robin by a scheduler on the
//   worker's own stack; a fiber runs until it exits, waits at __syncthreads, or waits in a warp
//   collective. x86-64 switches with a hand-written register swap (no signal-mask syscall); other
//   targets use ucontext.
// - __syncthreads completes when every thread of the block has arrived. A warp collective completes
//   when every non-exited lane of its mask has arrived at the same collective with the same mask.
//   When no fiber can run and some have not exited, the block is deadlocked: the error says which
//   threads wait where and which have exited.
// - Device memory (kvk_emu_alloc) ends at a guard page and carries a canary in the padding; dynamic
//   shared memory ends at a guard page; fiber stacks sit above guard gaps. SIGSEGV/SIGBUS/SIGILL/
//   SIGFPE raised while a worker executes kernel code abandon the block (siglongjmp back to the
//   worker) and become the launch error; every other signal goes to the previously installed handler.
// - The first error of a launch wins; the other workers stop at their next scheduling point.
// - Launches are serialised by a process-wide mutex (each one already uses all workers).
#include "kvk_emu_abi.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <cxxabi.h>
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#if defined(__x86_64__) && !defined(KVK_EMU_USE_UCONTEXT)
#define KVK_EMU_ASM_SWITCH 1
#else
#define KVK_EMU_ASM_SWITCH 0
#endif

extern "C" {
__attribute__((visibility("default"))) __thread kvk_emu_state_t kvk_emu_state KVK_EMU_TLS_MODEL = {};   // a definition (braces), constant-initialised
}

// glibc's TLS accessor (what compiled code calls for general-dynamic TLS): gives this thread's copy
// of a module's TLS block, allocating it on first use.
extern "C" void* __tls_get_addr(void*);

#if KVK_EMU_ASM_SWITCH
// kvk_emu_ctx_switch(&save, to): push callee-saved registers + MXCSR, store rsp in
// *save, load `to` as rsp, pop the same. kvk_emu_ctx_start is the first "return address" of a new
// fiber: it calls r13(r12) = fiber_main(fiber) and never returns. The x87 control word is not
// switched (fldcw costs more than the rest of the switch; x86-64 kernel code does not change it).
extern "C" void kvk_emu_ctx_switch(void** save, void* to);
extern "C" void kvk_emu_ctx_start();
asm(R"ASM(
    .text
    .p2align 4
    .globl kvk_emu_ctx_switch
    .hidden kvk_emu_ctx_switch
    .type kvk_emu_ctx_switch, @function
kvk_emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size kvk_emu_ctx_switch, .-kvk_emu_ctx_switch

    .p2align 4
    .globl kvk_emu_ctx_start
    .hidden kvk_emu_ctx_start
    .type kvk_emu_ctx_start, @function
kvk_emu_ctx_start:
    .cfi_startproc
    .cfi_undefined rip
    movq %r12, %rdi
    callq *%r13
    ud2
    .cfi_endproc
    .size kvk_emu_ctx_start, .-kvk_emu_ctx_start
)ASM");
#endif

namespace {

constexpr int kMaxThreads = 1024;   // threads per block
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kMaxWorkers = 64;
constexpr unsigned char kCanary = 0xCD;
constexpr size_t kAltStackBytes = 256 * 1024;
constexpr int kStopMagic = 0x4b564b45;   // sigval of the watchdog's SIGSEGV ("KVKE")
// PROT_NONE gap below every fiber stack (address space only). 1 MiB rather than a page: a frame up to
// that size that skips the first page (kernels built without -fstack-clash-protection) still faults
// instead of writing into the next thread's stack.
constexpr size_t kStackGuardBytes = 1024 * 1024;
constexpr unsigned kStaticSharedLimit = 48 * 1024;
constexpr size_t kQuarantineMaxEntries = 4096;
constexpr size_t kQuarantineMaxBytes = size_t(4) << 30;   // address space only (PROT_NONE, no memory)

// ---- configuration ----------------------------------------------------------------------------------
struct Config {
    size_t page = 4096;
    size_t stackBytes = 64 * 1024;
    bool poison = true;
    unsigned char fill = 0xFF;
    bool staticCheck = true;
    double timeoutSeconds = 300;   // 0 = none
};
Config g_cfg;
std::once_flag g_initOnce;

size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

void init_config()
{
    g_cfg.page = (size_t)sysconf(_SC_PAGESIZE);
    if (const char* s = getenv("KVK_EMU_STACK_KB")) {
        long kb = strtol(s, nullptr, 10);
        if (kb >= 16 && kb <= 1024 * 1024) g_cfg.stackBytes = (size_t)kb * 1024;
    }
    g_cfg.stackBytes = round_up(g_cfg.stackBytes, g_cfg.page);
    if (const char* s = getenv("KVK_EMU_SHARED_FILL")) {
        if (!strcmp(s, "none") || !strcmp(s, "off")) g_cfg.poison = false;
        else g_cfg.fill = (unsigned char)strtol(s, nullptr, 0);
    }
    if (const char* s = getenv("KVK_EMU_STATIC_SHARED_CHECK")) g_cfg.staticCheck = strcmp(s, "0") != 0;
}

std::string vstrf(const char* fmt, va_list ap)
{
    char buf[1024];
    va_list aq;
    va_copy(aq, ap);
    int n = vsnprintf(buf, sizeof buf, fmt, aq);
    va_end(aq);
    if (n < (int)sizeof buf) return std::string(buf, n < 0 ? 0 : (size_t)n);
    std::string s((size_t)n + 1, '\0');
    vsnprintf(&s[0], s.size(), fmt, ap);
    s.resize((size_t)n);
    return s;
}

std::string strf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string strf(const char* fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    std::string s = vstrf(fmt, ap);
    va_end(ap);
    return s;
}

int finish(int code, const std::string& msg, char* error, int capacity)
{
    if (error && capacity > 0) {
        size_t n = std::min(msg.size(), (size_t)capacity - 1);
        memcpy(error, msg.data(), n);
        error[n] = '\0';
    }
    return code;
}

// Function (+offset) and library of a code address, for fault messages.
std::string symbolize(uintptr_t pc)
{
    Dl_info info;
    if (!pc || !dladdr((void*)pc, &info)) return strf("0x%lx", (unsigned long)pc);
    const char* lib = info.dli_fname ? strrchr(info.dli_fname, '/') : nullptr;
    lib = lib ? lib + 1 : (info.dli_fname ? info.dli_fname : "?");
    if (!info.dli_sname) return strf("0x%lx (%s)", (unsigned long)pc, lib);
    int status = 0;
    char* dem = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 && dem ? dem : info.dli_sname;
    free(dem);
    return strf("%s+0x%lx (%s)", name.c_str(), (unsigned long)(pc - (uintptr_t)info.dli_saddr), lib);
}

// ---- device memory registry --------------------------------------------------------------------------
struct Alloc {
    uintptr_t map = 0;      // mapping: [guard page][data pages][guard page]
    size_t mapLen = 0;
    uintptr_t ptr = 0;      // usable start; ptr + usable == start of the tail guard page
    size_t bytes = 0;       // requested
    size_t usable = 0;      // bytes rounded up to 16
    uint64_t serial = 0;
};

std::mutex g_regMu;
std::map<uintptr_t, Alloc> g_allocs;   // by mapping base
std::deque<Alloc> g_quarantine;
size_t g_quarantineBytes = 0;
uint64_t g_serial = 0;
int g_lastCode = 0;
std::string g_lastMsg;

void set_last_error_locked(int code, const std::string& msg)
{
    if (g_lastCode) return;
    g_lastCode = code;
    g_lastMsg = msg;
}

std::map<uintptr_t, Alloc>::iterator find_containing(uintptr_t a)
{
    auto it = g_allocs.upper_bound(a);
    if (it == g_allocs.begin()) return g_allocs.end();
    --it;
    return a < it->second.map + it->second.mapLen ? it : g_allocs.end();
}

std::string describe_alloc(const Alloc& a)
{
    return strf("allocation #%llu (0x%lx, %zu bytes)", (unsigned long long)a.serial, (unsigned long)a.ptr, a.bytes);
}

// Checks (and repairs) the canaries of one allocation. Returns a description of the damage or "".
std::string check_canary(const Alloc& a)
{
    std::string out;
    unsigned char* p = (unsigned char*)a.ptr;
    size_t first = SIZE_MAX, last = 0;
    for (size_t i = a.bytes; i < a.usable; ++i)
        if (p[i] != kCanary) { if (first == SIZE_MAX) first = i; last = i; }
    if (first != SIZE_MAX) {
        out = strf("a write past the end of %s: byte%s %zu..%zu after its end %s overwritten (the guard page "
                   "starts %zu bytes after the end, so this write did not fault)",
                   describe_alloc(a).c_str(), first == last ? "" : "s", first - a.bytes, last - a.bytes,
                   first == last ? "was" : "were", a.usable - a.bytes);
        memset(p + a.bytes, kCanary, a.usable - a.bytes);
    }
    unsigned char* head = (unsigned char*)(a.map + g_cfg.page);
    const size_t headLen = (size_t)(p - head);
    size_t hfirst = SIZE_MAX;
    for (size_t i = 0; i < headLen; ++i)
        if (head[i] != kCanary) { hfirst = i; break; }
    if (hfirst != SIZE_MAX) {
        if (!out.empty()) out += "; also ";
        out += strf("a write before the start of %s: %zu bytes before its start was overwritten",
                    describe_alloc(a).c_str(), headLen - hfirst);
        memset(head, kCanary, headLen);
    }
    return out;
}

// All live allocations; returns the first damage found (all are repaired).
std::string check_all_canaries()
{
    std::lock_guard<std::mutex> lk(g_regMu);
    std::string first;
    for (auto& kv : g_allocs) {
        std::string d = check_canary(kv.second);
        if (first.empty() && !d.empty()) first = d;
    }
    return first;
}

// ---- workers, fibers, blocks ---------------------------------------------------------------------------
enum FState : uint8_t { F_NEW, F_RUNNABLE, F_RUNNING, F_BAR, F_WARP, F_EXITED, F_ABORTED };

struct Fiber {
#if KVK_EMU_ASM_SWITCH
    void* sp;
#else
    ucontext_t uc;
#endif
    uint3 tid;
    unsigned rank, warp, lane;
    FState state;
    int stack;
    uint64_t in, out;   // warp collective operand / result
    int b, c;           // shuffle operands
    int wkind;          // pending warp collective (when state == F_WARP)
    unsigned wmask;
    int barResult;
    unsigned epoch;     // warp epoch at this lane's last completed collective / barrier (__activemask)
};

struct WarpOp {
    int kind;
    unsigned mask;
    unsigned arrived;
};

struct Warp {
    unsigned exists;   // lanes that exist in this block
    unsigned live;     // lanes that exist and have not exited
    int nops;
    WarpOp ops[32];
    unsigned epoch;           // collectives (and barriers) completed by this warp in the block
    unsigned exitEpoch[32];   // epoch at which each lane exited
};

struct LaunchCtx {
    kvk_emu_entry entry = nullptr;
    void** args = nullptr;
    std::string name;
    dim3 grid, block;
    unsigned nthreads = 0;
    unsigned dyn = 0;
    uint64_t nblocks = 0;
    size_t tlsModid = 0, tlsSize = 0;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> abort{false};
    std::mutex mu;
    int code = 0;
    std::string msg;
};

void record(LaunchCtx* L, int code, const char* msg)
{
    {
        std::lock_guard<std::mutex> lk(L->mu);
        if (!L->code) {
            L->code = code;
            L->msg = msg;
        }
    }
    L->abort.store(true, std::memory_order_relaxed);
}

struct Worker {
    int index = 0;
    pthread_t thread{};
    uint64_t seenGen = 0;
    void* altStack = nullptr;

    // fiber stacks: arena of kMaxThreads slots, each [1 MiB PROT_NONE guard][stack]; activated on demand
    uintptr_t arena = 0;
    size_t arenaLen = 0, slot = 0;
    int nActive = 0, nFree = 0;
    int freeList[kMaxThreads];

    // dynamic shared memory: [PROT_NONE ...][RW pages holding the data][guard page]
    uintptr_t dynRegion = 0;
    size_t dynRegionLen = 0;
    uintptr_t dynRw = 0, dynEnd = 0;   // first RW page; guard page start
    unsigned char* dynStart = nullptr;
    unsigned char* tlsBase = nullptr;  // static shared memory of the kernel's module on this thread

    // the block being run
    LaunchCtx* L = nullptr;
    uint3 blockIdx{};
    Fiber fibers[kMaxThreads];
    Warp warps[kMaxWarps];
    unsigned nwarps = 0;
    int runq[kMaxThreads];
    int qhead = 0, qcount = 0;
    int barWaiters[kMaxThreads];
    int live = 0;
    unsigned barArrived = 0, barPred = 0;
    bool blockFailed = false;
    Fiber* cur = nullptr;
#if KVK_EMU_ASM_SWITCH
    void* schedSp = nullptr;
#else
    ucontext_t schedUc;
#endif

    // faults: set by the signal handler, read after siglongjmp
    volatile sig_atomic_t inFiber = 0;
    sigjmp_buf jb;
    volatile sig_atomic_t stopRequested = 0;   // the launcher's watchdog interrupts a runaway fiber
    volatile int fSig = 0, fWrite = -1;
    volatile uintptr_t fAddr = 0, fPc = 0, fSp = 0;
    Fiber* volatile fFiber = nullptr;
};

Worker* g_workers[kMaxWorkers];
std::atomic<int> g_nworkers{0};

struct Pool {
    std::mutex mu;
    std::condition_variable cv, done;
    uint64_t gen = 0;
    LaunchCtx* L = nullptr;
    int active = 0, remaining = 0;
};
Pool* g_pool = new Pool;          // never destroyed: workers wait on it until the process ends
std::mutex* g_launchMu = new std::mutex;

void push(Worker* w, int i)
{
    w->runq[(w->qhead + w->qcount) % kMaxThreads] = i;
    ++w->qcount;
}

int pop(Worker* w)
{
    int i = w->runq[w->qhead];
    w->qhead = (w->qhead + 1) % kMaxThreads;
    --w->qcount;
    return i;
}

// ---- context switching ------------------------------------------------------------------------------
void fiber_main(Fiber* f);
bool hand_over_stack(Worker* w, Fiber* f);

#if KVK_EMU_ASM_SWITCH
void ctx_init(Worker*, Fiber* f, uintptr_t top)
{
    // Frame popped by kvk_emu_ctx_switch: [mxcsr|pad][r15][r14][r13][r12][rbx][rbp][ret]. After the
    // ret, rsp = top - 16 (16-byte aligned), as the SysV ABI wants before kvk_emu_ctx_start's call.
    uintptr_t* s = (uintptr_t*)((top & ~(uintptr_t)15) - 16 - 64);
    const uint32_t ctrl[2] = {0x1F80u, 0u};   // default MXCSR (round to nearest, exceptions masked), pad
    memcpy(s, ctrl, sizeof ctrl);
    s[1] = 0;
    s[2] = 0;
    s[3] = (uintptr_t)&fiber_main;   // r13
    s[4] = (uintptr_t)f;             // r12
    s[5] = 0;
    s[6] = 0;
    s[7] = (uintptr_t)&kvk_emu_ctx_start;
    f->sp = s;
}
inline void to_fiber(Worker* w, Fiber* f) { kvk_emu_ctx_switch(&w->schedSp, f->sp); }
inline void to_scheduler(Worker* w, Fiber* f) { kvk_emu_ctx_switch(&f->sp, w->schedSp); }
inline void fiber_to_fiber(Fiber* from, Fiber* to) { kvk_emu_ctx_switch(&from->sp, to->sp); }
#else
void uc_trampoline(unsigned hi, unsigned lo) { fiber_main((Fiber*)(((uintptr_t)hi << 32) | lo)); }
void ctx_init(Worker* w, Fiber* f, uintptr_t top)
{
    const uintptr_t lo = w->arena + (uintptr_t)f->stack * w->slot + kStackGuardBytes;   // above the guard
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = (void*)lo;
    f->uc.uc_stack.ss_size = top - lo;
    f->uc.uc_link = nullptr;
    makecontext(&f->uc, (void (*)())uc_trampoline, 2, (unsigned)((uintptr_t)f >> 32), (unsigned)(uintptr_t)f);
}
inline void to_fiber(Worker* w, Fiber* f) { swapcontext(&w->schedUc, &f->uc); }
inline void to_scheduler(Worker* w, Fiber* f) { swapcontext(&f->uc, &w->schedUc); }
inline void fiber_to_fiber(Fiber* from, Fiber* to) { swapcontext(&from->uc, &to->uc); }
#endif

[[noreturn]] void abandon_fiber(Worker* w, Fiber* f)
{
    f->state = F_ABORTED;
    to_scheduler(w, f);
    __builtin_trap();   // never resumed
}

void fiber_main(Fiber* f)
{
    Worker* w = (Worker*)kvk_emu_state.worker;
    // One fiber runs thread after thread on the same stack while the next queued thread has not
    // started yet (no context switch between them: barrier-free kernels cost one switch per block).
    for (;; f = w->cur) {
        try {
            w->L->entry(w->L->args);
        } catch (...) {
            char buf[512];
            snprintf(buf, sizeof buf, "kernel '%s', block (%u,%u,%u), thread (%u,%u,%u): a C++ exception escaped the kernel",
                     w->L->name.c_str(), w->blockIdx.x, w->blockIdx.y, w->blockIdx.z, f->tid.x, f->tid.y, f->tid.z);
            record(w->L, KVK_EMU_ERR_TRAP, buf);
            abandon_fiber(w, f);
        }
        f->state = F_EXITED;
        if (hand_over_stack(w, f)) continue;
        to_scheduler(w, f);   // the scheduler frees the stack and handles the exit
        __builtin_trap();     // never resumed
    }
}


// ---- fiber-side helpers ----------------------------------------------------------------------------------
Worker* current_worker(const char* what)
{
    Worker* w = (Worker*)kvk_emu_state.worker;
    if (!w || !w->inFiber || !w->cur) {
        fprintf(stderr, "kvk_emu: %s called outside a kernel launch\n", what);
        abort();
    }
    return w;
}

int where(char* buf, size_t cap, Worker* w, const Fiber* f)
{
    return snprintf(buf, cap, "kernel '%s', block (%u,%u,%u), thread (%u,%u,%u) (warp %u, lane %u)",
                    w->L->name.c_str(), w->blockIdx.x, w->blockIdx.y, w->blockIdx.z, f->tid.x, f->tid.y,
                    f->tid.z, f->warp, f->lane);
}

// Records an error for the current fiber and abandons the block. No heap object lives on the fiber
// stack across the switch (it is never unwound).
[[noreturn]] void fiber_failf(Worker* w, int code, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
[[noreturn]] void fiber_failf(Worker* w, int code, const char* fmt, ...)
{
    char buf[2048];
    int n = where(buf, sizeof buf, w, w->cur);
    if (n < 0 || n >= (int)sizeof buf - 2) n = 0;
    buf[n++] = ':';
    buf[n++] = ' ';
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf + n, sizeof buf - n, fmt, ap);
    va_end(ap);
    record(w->L, code, buf);
    abandon_fiber(w, w->cur);
}

const char* kind_name(int kind)
{
    static const char* const names[KVK_WOP_COUNT_] = {
        "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync", "__ballot_sync",
        "__any_sync", "__all_sync", "__syncwarp", "__match_any_sync", "__match_all_sync",
        "__reduce_add_sync", "__reduce_min_sync", "__reduce_max_sync", "__reduce_min_sync",
        "__reduce_max_sync", "__reduce_and_sync", "__reduce_or_sync", "__reduce_xor_sync"};
    return kind >= 0 && kind < KVK_WOP_COUNT_ ? names[kind] : "warp collective";
}

std::string lane_list(unsigned m)
{
    std::string s;
    for (int i = 0; i < 32;) {
        if (!(m >> i & 1u)) { ++i; continue; }
        int j = i;
        while (j + 1 < 32 && (m >> (j + 1) & 1u)) ++j;
        if (!s.empty()) s += ",";
        s += j == i ? strf("%d", i) : strf("%d-%d", i, j);
        i = j + 1;
    }
    return s.empty() ? "none" : s;
}

bool op_complete(const Warp& W, const WarpOp& op) { return (op.mask & W.live & ~op.arrived) == 0; }

// Completes op i of warp W: results into every participant, participants (but `caller`) runnable.
// Returns false after recording an error (a shuffle read from a lane that did not take part).
bool execute_op(Worker* w, Warp& W, int i, Fiber* caller)
{
    const WarpOp op = W.ops[i];
    W.ops[i] = W.ops[--W.nops];
    const unsigned warp = (unsigned)(&W - w->warps);
    Fiber* base = &w->fibers[warp * 32];
    const unsigned parts = op.arrived;
    switch (op.kind) {
    case KVK_WOP_SHFL_IDX:
    case KVK_WOP_SHFL_UP:
    case KVK_WOP_SHFL_DOWN:
    case KVK_WOP_SHFL_BFLY:
        for (unsigned l = 0; l < 32; ++l) {
            if (!(parts >> l & 1u)) continue;
            Fiber& f = base[l];
            // PTX shfl.sync (research/kernel_techniques.md §5.5)
            const unsigned c = (unsigned)f.c, segmask = (c >> 8) & 31u, cval = c & 31u;
            const unsigned minLane = l & segmask, maxLane = minLane | (cval & ~segmask), bval = (unsigned)f.b & 31u;
            int j;
            bool valid;
            switch (op.kind) {
            case KVK_WOP_SHFL_UP: j = (int)l - (int)bval; valid = j >= (int)maxLane; break;
            case KVK_WOP_SHFL_DOWN: j = (int)(l + bval); valid = j <= (int)maxLane; break;
            case KVK_WOP_SHFL_BFLY: j = (int)(l ^ bval); valid = j <= (int)maxLane; break;
            default: j = (int)(minLane | (bval & ~segmask)); valid = j <= (int)maxLane; break;
            }
            if (!valid) j = (int)l;
            if (!(parts >> j & 1u)) {
                char buf[2048];
                int n = where(buf, sizeof buf, w, &f);
                const char* why = !(W.exists >> j & 1u) ? "which does not exist (the block's last warp is partial)"
                                  : !(op.mask >> j & 1u) ? "which is not in the mask"
                                                         : "which has exited";
                snprintf(buf + n, sizeof buf - n,
                         ": %s(mask 0x%08x) reads lane %d, %s; the value is undefined on a GPU "
                         "(lanes that took part: %s)",
                         kind_name(op.kind), op.mask, j, why, lane_list(parts).c_str());
                record(w->L, KVK_EMU_ERR_WARP, buf);
                return false;
            }
            f.out = base[j].in;
        }
        break;
    case KVK_WOP_BALLOT:
    case KVK_WOP_ANY:
    case KVK_WOP_ALL: {
        unsigned r = 0;
        for (unsigned l = 0; l < 32; ++l)
            if ((parts >> l & 1u) && base[l].in) r |= 1u << l;
        const uint64_t v = op.kind == KVK_WOP_BALLOT ? r : op.kind == KVK_WOP_ANY ? (r != 0) : (r == parts);
        for (unsigned l = 0; l < 32; ++l)
            if (parts >> l & 1u) base[l].out = v;
        break;
    }
    case KVK_WOP_MATCH_ANY:
        for (unsigned l = 0; l < 32; ++l) {
            if (!(parts >> l & 1u)) continue;
            unsigned m = 0;
            for (unsigned k = 0; k < 32; ++k)
                if ((parts >> k & 1u) && base[k].in == base[l].in) m |= 1u << k;
            base[l].out = m;
        }
        break;
    case KVK_WOP_MATCH_ALL: {
        bool same = true;
        const uint64_t v0 = base[__builtin_ctz(parts)].in;
        for (unsigned l = 0; l < 32; ++l)
            if ((parts >> l & 1u) && base[l].in != v0) same = false;
        for (unsigned l = 0; l < 32; ++l)
            if (parts >> l & 1u) base[l].out = same ? ((uint64_t)1 << 32) | parts : 0;
        break;
    }
    case KVK_WOP_SYNCWARP:
        for (unsigned l = 0; l < 32; ++l)
            if (parts >> l & 1u) base[l].out = 0;
        break;
    default: {   // reductions over the 32-bit operands
        uint32_t r = 0;
        bool first = true;
        for (unsigned l = 0; l < 32; ++l) {
            if (!(parts >> l & 1u)) continue;
            const uint32_t v = (uint32_t)base[l].in;
            if (first) { r = v; first = false; continue; }
            switch (op.kind) {
            case KVK_WOP_REDUCE_ADD: r += v; break;
            case KVK_WOP_REDUCE_MIN_U: r = std::min(r, v); break;
            case KVK_WOP_REDUCE_MAX_U: r = std::max(r, v); break;
            case KVK_WOP_REDUCE_MIN_S: r = (uint32_t)std::min((int32_t)r, (int32_t)v); break;
            case KVK_WOP_REDUCE_MAX_S: r = (uint32_t)std::max((int32_t)r, (int32_t)v); break;
            case KVK_WOP_REDUCE_AND: r &= v; break;
            case KVK_WOP_REDUCE_OR: r |= v; break;
            default: r ^= v; break;
            }
        }
        for (unsigned l = 0; l < 32; ++l)
            if (parts >> l & 1u) base[l].out = r;
        break;
    }
    }
    ++W.epoch;
    for (unsigned l = 0; l < 32; ++l)
        if (parts >> l & 1u) base[l].epoch = W.epoch;
    for (unsigned l = 0; l < 32; ++l) {
        if (!(parts >> l & 1u) || &base[l] == caller) continue;
        base[l].state = F_RUNNABLE;
        push(w, (int)base[l].rank);
    }
    return true;
}

// A lane exited: collectives that were waiting only for it may now complete.
void lane_exited(Worker* w, Fiber* f)
{
    Warp& W = w->warps[f->warp];
    const unsigned bit = 1u << f->lane;
    W.live &= ~bit;
    W.exitEpoch[f->lane] = W.epoch;
    for (int i = 0; i < W.nops;) {
        if ((W.ops[i].mask & bit) && op_complete(W, W.ops[i])) {
            if (!execute_op(w, W, i, nullptr)) {
                w->blockFailed = true;
                return;
            }
            continue;   // slot i now holds another op
        }
        ++i;
    }
}

// Fiber f has just exited on its own stack. When the next queued thread has not started, the exit is
// handled here and that thread takes over f's stack (w->cur becomes it); fiber_main then runs it in
// place. Returns false when the scheduler must take over (the next thread already has a stack, the
// queue is empty, or the launch is stopping).
bool hand_over_stack(Worker* w, Fiber* f)
{
    if (!w->qcount || w->L->abort.load(std::memory_order_relaxed) || w->fibers[w->runq[w->qhead]].state != F_NEW)
        return false;
    --w->live;
    lane_exited(w, f);   // may complete collectives (runnable fibers go to the back of the queue)
    if (w->blockFailed) abandon_fiber(w, f);
    Fiber* next = &w->fibers[pop(w)];
    next->stack = f->stack;
    f->stack = -1;
    next->state = F_RUNNING;
    w->cur = next;
    kvk_emu_state.thread_idx = next->tid;
    return true;
}

// ---- deadlock report -----------------------------------------------------------------------------------
std::string rank_list(const std::vector<unsigned>& v)
{
    std::string s;
    int ranges = 0;
    for (size_t i = 0; i < v.size();) {
        size_t j = i;
        while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
        if (++ranges > 12) { s += ", ..."; break; }
        if (!s.empty()) s += ", ";
        s += j == i ? strf("%u", v[i]) : strf("%u-%u", v[i], v[j]);
        i = j + 1;
    }
    return s;
}

std::string fiber_place(const Fiber& g)
{
    switch (g.state) {
    case F_BAR: return "waiting at __syncthreads";
    case F_WARP: return strf("waiting in %s(mask 0x%08x)", kind_name(g.wkind), g.wmask);
    case F_EXITED: return "exited";
    default: return "running";
    }
}

std::string deadlock_message(Worker* w)
{
    LaunchCtx* L = w->L;
    const unsigned n = L->nthreads;
    std::vector<unsigned> bar, exited, inWarp;
    for (unsigned k = 0; k < n; ++k) {
        const FState s = w->fibers[k].state;
        if (s == F_BAR) bar.push_back(k);
        else if (s == F_EXITED) exited.push_back(k);
        else if (s == F_WARP) inWarp.push_back(k);
    }
    std::string s = strf("barrier deadlock in kernel '%s', block (%u,%u,%u) of grid (%u,%u,%u), blockDim (%u,%u,%u): "
                         "no thread can proceed. ",
                         L->name.c_str(), w->blockIdx.x, w->blockIdx.y, w->blockIdx.z, L->grid.x, L->grid.y,
                         L->grid.z, L->block.x, L->block.y, L->block.z);
    std::vector<std::string> parts;
    if (!bar.empty())
        parts.push_back(strf("%zu of %u threads wait at __syncthreads (threads %s)", bar.size(), n, rank_list(bar).c_str()));
    if (!exited.empty())
        parts.push_back(strf("%zu %s exited (threads %s)", exited.size(), exited.size() == 1 ? "has" : "have",
                             rank_list(exited).c_str()));
    for (unsigned wi = 0; wi < w->nwarps; ++wi) {
        const Warp& W = w->warps[wi];
        for (int i = 0; i < W.nops; ++i) {
            const WarpOp& op = W.ops[i];
            std::string p = strf("warp %u: lanes %s wait in %s(mask 0x%08x)", wi, lane_list(op.arrived).c_str(),
                                 kind_name(op.kind), op.mask);
            const unsigned missing = op.mask & W.live & ~op.arrived;
            std::map<std::string, unsigned> byPlace;
            for (unsigned l = 0; l < 32; ++l)
                if (missing >> l & 1u) byPlace[fiber_place(w->fibers[wi * 32 + l])] |= 1u << l;
            for (auto& kv : byPlace) p += strf("; its lanes %s are %s", lane_list(kv.second).c_str(), kv.first.c_str());
            parts.push_back(p);
        }
    }
    for (size_t i = 0; i < parts.size(); ++i) s += (i ? "; " : "") + parts[i];
    s += ". ";
    if (!bar.empty() && !exited.empty())
        s += "Every thread of the block must reach each __syncthreads(): threads that returned early or skipped "
             "the barrier in a divergent branch leave the others waiting (a hang or undefined behaviour on a GPU).";
    else if (!bar.empty() && !inWarp.empty())
        s += "A warp collective waits for lanes that wait at __syncthreads, which in turn waits for the lanes in "
             "the collective.";
    else if (!inWarp.empty())
        s += "Lanes of a mask wait in different warp collectives or with different masks (divergent warp-collective "
             "calls).";
    if (L->block.y > 1 || L->block.z > 1)
        s += " (Thread numbers are linear ranks x + blockDim.x * (y + blockDim.y * z).)";
    return s;
}

// ---- stacks and shared memory --------------------------------------------------------------------------
int take_stack(Worker* w)
{
    if (w->nFree) return w->freeList[--w->nFree];
    if (w->nActive == kMaxThreads) return -1;
    const int i = w->nActive;
    const uintptr_t lo = w->arena + (uintptr_t)i * w->slot + kStackGuardBytes;
    if (mprotect((void*)lo, g_cfg.stackBytes, PROT_READ | PROT_WRITE) != 0) return -1;
    ++w->nActive;
    return i;
}

// Stack tops are staggered by 128-byte steps: otherwise every fiber's hot frames sit at the same
// offset in a page and compete for the same few L1 sets (slots are a whole number of pages apart).
uintptr_t stack_top(Worker* w, int i) { return w->arena + (uintptr_t)(i + 1) * w->slot - (uintptr_t)(i & 31) * 128; }

bool prepare_dynamic_shared(Worker* w, unsigned dyn)
{
    const size_t page = g_cfg.page;
    const size_t need = round_up(std::max<size_t>(dyn, 1), page) + page;
    if (w->dynRegionLen < need) {
        if (w->dynRegion) munmap((void*)w->dynRegion, w->dynRegionLen);
        const size_t len = std::max(need, round_up(256 * 1024, page) + page);
        void* m = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) { w->dynRegion = 0; w->dynRegionLen = 0; return false; }
        w->dynRegion = (uintptr_t)m;
        w->dynRegionLen = len;
    } else if (mprotect((void*)w->dynRegion, w->dynRegionLen, PROT_NONE) != 0) {
        return false;
    }
    w->dynEnd = w->dynRegion + w->dynRegionLen - page;
    w->dynStart = (unsigned char*)(w->dynEnd - round_up(dyn, 16));
    w->dynRw = (uintptr_t)w->dynStart & ~(uintptr_t)(page - 1);
    if (dyn) {
        if (mprotect((void*)w->dynRw, w->dynEnd - w->dynRw, PROT_READ | PROT_WRITE) != 0) return false;
        memset((void*)w->dynRw, kCanary, (uintptr_t)w->dynStart - w->dynRw);
        memset(w->dynStart + dyn, kCanary, w->dynEnd - ((uintptr_t)w->dynStart + dyn));
    }
    kvk_emu_state.dynamic_shared = w->dynStart;
    return true;
}

// Canary around dynamic shared memory, after a block. Returns false after recording an error.
bool check_dynamic_canary(Worker* w)
{
    const unsigned dyn = w->L->dyn;
    const unsigned char* tail = w->dynStart + dyn;
    const size_t tailLen = w->dynEnd - (uintptr_t)tail;
    for (size_t i = 0; i < tailLen; ++i) {
        if (tail[i] == kCanary) continue;
        record(w->L, KVK_EMU_ERR_CORRUPTION,
               strf("memory corruption in kernel '%s', block (%u,%u,%u): a write %zu byte(s) past the end of the %u bytes "
                    "of dynamic shared memory (inside the padding before the guard page, so it did not fault)",
                    w->L->name.c_str(), w->blockIdx.x, w->blockIdx.y, w->blockIdx.z, i + 1, dyn).c_str());
        return false;
    }
    const unsigned char* head = (const unsigned char*)w->dynRw;
    const size_t headLen = (uintptr_t)w->dynStart - w->dynRw;
    for (size_t i = 0; i < headLen; ++i) {
        if (head[i] == kCanary) continue;
        record(w->L, KVK_EMU_ERR_CORRUPTION,
               strf("memory corruption in kernel '%s', block (%u,%u,%u): a write %zu bytes before the start of dynamic "
                    "shared memory",
                    w->L->name.c_str(), w->blockIdx.x, w->blockIdx.y, w->blockIdx.z, headLen - i).c_str());
        return false;
    }
    return true;
}

// ---- running blocks ----------------------------------------------------------------------------------------
// Makes fiber f (state F_NEW) runnable on a stack; false when no stack can be mapped.
bool start_fiber(Worker* w, Fiber* f)
{
    const int s = take_stack(w);
    if (s < 0) {
        record(w->L, KVK_EMU_ERR_INTERNAL,
               strf("kernel '%s': cannot map a %zu KiB fiber stack (mprotect failed; too many mappings?)",
                    w->L->name.c_str(), g_cfg.stackBytes / 1024).c_str());
        return false;
    }
    f->stack = s;
    ctx_init(w, f, stack_top(w, s));
    return true;
}

// The current fiber f stops running (state already F_BAR, F_WARP or F_RUNNABLE). Switches straight
// to the next runnable fiber (one switch instead of two through the scheduler); returns when f is
// resumed. Falls back to the scheduler when nothing else can run or the launch is aborting.
void suspend(Worker* w, Fiber* f)
{
    if (f->state == F_RUNNABLE) push(w, (int)f->rank);
    if (w->qcount && !w->L->abort.load(std::memory_order_relaxed)) {
        Fiber* next = &w->fibers[pop(w)];
        if (next == f) {
            f->state = F_RUNNING;
            return;
        }
        if (next->state != F_NEW || start_fiber(w, next)) {
            next->state = F_RUNNING;
            w->cur = next;
            kvk_emu_state.thread_idx = next->tid;
            fiber_to_fiber(f, next);
            return;   // resumed by whoever switched back to f (it set w->cur and thread_idx)
        }
    }
    to_scheduler(w, f);
}

void run_block(Worker* w, uint64_t b)
{
    LaunchCtx* L = w->L;
    const uint64_t gx = L->grid.x, gxy = gx * L->grid.y;
    w->blockIdx = uint3{(unsigned)(b % gx), (unsigned)((b / gx) % L->grid.y), (unsigned)(b / gxy)};
    kvk_emu_state.block_idx = w->blockIdx;
    if (g_cfg.poison) {
        if (w->tlsBase) memset(w->tlsBase, g_cfg.fill, L->tlsSize);
        if (L->dyn) memset(w->dynStart, g_cfg.fill, L->dyn);
    }
    const unsigned n = L->nthreads;
    for (unsigned i = 0; i < n; ++i) {
        w->fibers[i].state = F_NEW;
        w->fibers[i].epoch = 0;
        w->runq[i] = (int)i;
    }
    w->qhead = 0;
    w->qcount = (int)n;
    w->live = (int)n;
    w->barArrived = w->barPred = 0;
    for (unsigned k = 0; k < w->nwarps; ++k) {
        w->warps[k].live = w->warps[k].exists;
        w->warps[k].nops = 0;
        w->warps[k].epoch = 0;
    }
    w->nFree = w->nActive;   // no fiber outlives its block
    for (int k = 0; k < w->nActive; ++k) w->freeList[k] = w->nActive - 1 - k;
    w->blockFailed = false;

    while (w->qcount) {
        if (L->abort.load(std::memory_order_relaxed)) return;
        Fiber* f = &w->fibers[pop(w)];
        if (f->state == F_NEW && !start_fiber(w, f)) return;
        f->state = F_RUNNING;
        w->cur = f;
        kvk_emu_state.thread_idx = f->tid;
        w->inFiber = 1;
        to_fiber(w, f);
        w->inFiber = 0;
        f = w->cur;   // fibers switch among themselves; this one came back to the scheduler
        switch (f->state) {
        case F_EXITED:
            w->freeList[w->nFree++] = f->stack;
            --w->live;
            lane_exited(w, f);
            if (w->blockFailed) return;
            break;
        case F_RUNNABLE: push(w, (int)f->rank); break;
        case F_ABORTED: return;
        default: break;   // waiting at a barrier or in a warp collective
        }
    }
    w->cur = nullptr;
    if (w->live) {
        record(L, KVK_EMU_ERR_DEADLOCK, deadlock_message(w).c_str());
        return;
    }
    if (L->dyn) check_dynamic_canary(w);
}

struct Query {
    uintptr_t addr;
    bool found = false, mainProgram = false;
    size_t modid = 0, tlsSize = 0;
};

int phdr_callback(struct dl_phdr_info* info, size_t, void* data)
{
    Query* q = (Query*)data;
    bool inside = false;
    const ElfW(Phdr)* tls = nullptr;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type == PT_LOAD) {
            const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
            if (q->addr >= lo && q->addr < lo + ph.p_memsz) inside = true;
        } else if (ph.p_type == PT_TLS) {
            tls = &ph;
        }
    }
    if (!inside) return 0;
    q->found = true;
    q->mainProgram = !info->dlpi_name || !info->dlpi_name[0];
    if (tls) {
        q->modid = info->dlpi_tls_modid;
        q->tlsSize = tls->p_memsz;
    }
    return 1;
}

// Describes a fault caught by the signal handler (called on the worker's own stack after siglongjmp).
void report_fault(Worker* w)
{
    LaunchCtx* L = w->L;
    Fiber* f = w->fFiber;
    char head[512];
    if (f) where(head, sizeof head, w, f);
    else snprintf(head, sizeof head, "kernel '%s', block (%u,%u,%u)", L->name.c_str(), w->blockIdx.x, w->blockIdx.y, w->blockIdx.z);
    const int sig = w->fSig;
    const uintptr_t a = w->fAddr;
    const std::string at = symbolize(w->fPc);
    const char* acc = w->fWrite == 1 ? "write to" : w->fWrite == 0 ? "read of" : "access to";
    int code = KVK_EMU_ERR_MEMORY;
    std::string d;
    // Where the faulting thread's stack pointer was: outside its own fiber stack means an overflow,
    // whatever the address (a frame larger than the stack skips the guard page unless the kernel was
    // compiled with -fstack-clash-protection).
    bool spOutside = false;
    if (f && f->stack >= 0 && w->fSp) {
        const uintptr_t lo = w->arena + (uintptr_t)f->stack * w->slot + kStackGuardBytes, hi = w->arena + (uintptr_t)(f->stack + 1) * w->slot;
        spOutside = w->fSp < lo || w->fSp > hi;
    }
    if (spOutside && (sig == SIGSEGV || sig == SIGBUS)) {
        code = KVK_EMU_ERR_STACK;
        d = strf("stack overflow in %s: the stack pointer (0x%lx) left the thread's %zu KiB fiber stack (fault address "
                 "0x%lx). Deep recursion or large local arrays; set KVK_EMU_STACK_KB to give every emulated thread a "
                 "larger stack (and compile kernels with -fstack-clash-protection: a frame larger than the 1 MiB guard "
                 "gap could otherwise reach another thread's stack)", at.c_str(), (unsigned long)w->fSp,
                 g_cfg.stackBytes / 1024, (unsigned long)a);
    } else if (sig == SIGILL) {
        code = KVK_EMU_ERR_TRAP;
        d = strf("executed a trap instruction in %s (__builtin_trap(): e.g. a host twin in cuda/common found a "
                 "misaligned access, which a GPU reports as a misaligned-address error)", at.c_str());
    } else if (sig == SIGFPE) {
        code = KVK_EMU_ERR_TRAP;
        d = strf("arithmetic exception in %s: integer division by zero or INT_MIN / -1 (a GPU returns an "
                 "unspecified value; the emulator reports it)", at.c_str());
    } else if (a >= w->arena && a < w->arena + w->arenaLen) {
        const size_t idx = (a - w->arena) / w->slot, off = (a - w->arena) % w->slot;
        code = KVK_EMU_ERR_STACK;
        if (off < kStackGuardBytes && f && (int)idx == f->stack)
            d = strf("stack overflow in %s: the thread needed more than its %zu KiB fiber stack (fault at 0x%lx in the "
                     "guard region below it). Deep recursion or large local arrays; set KVK_EMU_STACK_KB to give every "
                     "emulated thread a larger stack", at.c_str(), g_cfg.stackBytes / 1024, (unsigned long)a);
        else
            d = strf("%s address 0x%lx in %s: inside another emulated thread's stack or its guard page (a stack "
                     "overflow or a pointer to another thread's local variable)", acc, (unsigned long)a, at.c_str());
    } else if (w->dynRegion && a >= w->dynRegion && a < w->dynRegion + w->dynRegionLen) {
        const uintptr_t start = (uintptr_t)w->dynStart;
        if (L->dyn == 0)
            d = strf("%s dynamic shared memory in %s, but the launch has 0 bytes of it (dynamicSharedBytes = 0)", acc, at.c_str());
        else if (a >= start + L->dyn)
            d = strf("out-of-bounds %s dynamic shared memory in %s: address 0x%lx is %lu bytes past the end of the %u "
                     "bytes of dynamic shared memory (offset %lu)", acc, at.c_str(), (unsigned long)a,
                     (unsigned long)(a - (start + L->dyn)), L->dyn, (unsigned long)(a - start));
        else
            d = strf("out-of-bounds %s dynamic shared memory in %s: address 0x%lx is %lu bytes before its start",
                     acc, at.c_str(), (unsigned long)a, (unsigned long)(start - a));
    } else {
        std::lock_guard<std::mutex> lk(g_regMu);
        auto it = find_containing(a);
        if (it != g_allocs.end()) {
            const Alloc& al = it->second;
            if (a >= al.ptr + al.bytes)
                d = strf("out-of-bounds %s address 0x%lx in %s: %lu bytes past the end of %s (offset %lu from its start; "
                         "guard page)", acc, (unsigned long)a, at.c_str(), (unsigned long)(a - (al.ptr + al.bytes)),
                         describe_alloc(al).c_str(), (unsigned long)(a - al.ptr));
            else
                d = strf("out-of-bounds %s address 0x%lx in %s: %lu bytes before the start of %s (guard page)", acc,
                         (unsigned long)a, at.c_str(), (unsigned long)(al.ptr - a), describe_alloc(al).c_str());
        } else {
            const Alloc* freed = nullptr;
            for (const Alloc& q : g_quarantine)
                if (a >= q.map && a < q.map + q.mapLen) freed = &q;
            if (freed)
                d = strf("use after free: %s address 0x%lx in %s, inside %s, which was freed", acc, (unsigned long)a,
                         at.c_str(), describe_alloc(*freed).c_str());
            else if (a < 65536)
                d = strf("null pointer: %s address 0x%lx in %s", acc, (unsigned long)a, at.c_str());
            else {
                d = strf("invalid %s address 0x%lx in %s: not inside any emulated allocation (a wild pointer, a freed "
                         "allocation or host memory)", acc, (unsigned long)a, at.c_str());
                auto below = g_allocs.upper_bound(a);
                if (below != g_allocs.begin()) {
                    --below;
                    const Alloc& al = below->second;
                    d += strf("; the nearest allocation below it is %s, whose end is %lu bytes below the address",
                              describe_alloc(al).c_str(), (unsigned long)(a - (al.ptr + al.bytes)));
                }
            }
        }
    }
    record(L, code, (std::string(head) + ": " + d).c_str());
}

void run_launch(Worker* w, LaunchCtx* L)
{
    w->L = L;
    w->cur = nullptr;
    kvk_emu_state.worker = w;
    kvk_emu_state.block_dim = L->block;
    kvk_emu_state.grid_dim = L->grid;
    const unsigned n = L->nthreads;
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = w->fibers[i];
        f.rank = i;
        f.tid = uint3{i % L->block.x, (i / L->block.x) % L->block.y, i / (L->block.x * L->block.y)};
        f.warp = i / 32;
        f.lane = i % 32;
        f.stack = -1;
    }
    w->nwarps = (n + 31) / 32;
    for (unsigned k = 0; k < w->nwarps; ++k) {
        const unsigned lanes = std::min(32u, n - k * 32);
        w->warps[k].exists = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
    }
    if (!prepare_dynamic_shared(w, L->dyn)) {
        record(L, KVK_EMU_ERR_INTERNAL, strf("kernel '%s': cannot map %u bytes of dynamic shared memory",
                                             L->name.c_str(), L->dyn).c_str());
        return;
    }
    w->tlsBase = nullptr;
    if (L->tlsSize) {
        struct { unsigned long module, offset; } ti = {L->tlsModid, 0};
        w->tlsBase = (unsigned char*)__tls_get_addr(&ti);
    }
    if (sigsetjmp(w->jb, 1) != 0) {
        w->inFiber = 0;
        if (w->fSig) report_fault(w);   // fSig == 0: stopped by the watchdog (error already recorded)
        w->cur = nullptr;
        return;
    }
    for (;;) {
        if (L->abort.load(std::memory_order_relaxed)) break;
        const uint64_t b = L->next.fetch_add(1, std::memory_order_relaxed);
        if (b >= L->nblocks) break;
        run_block(w, b);
    }
    w->cur = nullptr;
}

// ---- signals --------------------------------------------------------------------------------------------
const int kSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE};
struct sigaction g_prev[65];

void chain(int sig, siginfo_t* si, void* ctx)
{
    const struct sigaction& p = g_prev[sig];
    if (p.sa_flags & SA_SIGINFO) {
        if (p.sa_sigaction) {
            p.sa_sigaction(sig, si, ctx);
            return;
        }
    } else if (p.sa_handler != SIG_DFL && p.sa_handler != SIG_IGN) {
        p.sa_handler(sig);
        return;
    }
    // Default action: restore it; a synchronous fault re-executes and now gets it, a sent signal is re-raised.
    signal(sig, SIG_DFL);
    if (si->si_code <= 0) raise(sig);
}

void on_signal(int sig, siginfo_t* si, void* ctx)
{
    const int n = g_nworkers.load(std::memory_order_acquire);
    const pthread_t self = pthread_self();
    for (int i = 0; i < n; ++i) {
        Worker* w = g_workers[i];
        if (!w || !pthread_equal(w->thread, self)) continue;
        if (si->si_code == SI_QUEUE && si->si_pid == getpid() && si->si_value.sival_int == kStopMagic) {
            // The watchdog's interrupt (recognisable even if it arrives late): leave the fiber if one runs
            // and the stop is still wanted; otherwise ignore it (the scheduler stops by itself).
            if (!w->inFiber || !w->stopRequested) return;
            w->fSig = 0;
            siglongjmp(w->jb, 1);
        }
        if (!w->inFiber) break;
        // This thread was executing kernel code: abandon the block.
        w->fSig = sig;
        w->fAddr = (uintptr_t)si->si_addr;
        w->fWrite = -1;
        w->fPc = 0;
        w->fSp = 0;
#if defined(__x86_64__)
        const ucontext_t* uc = (const ucontext_t*)ctx;
        w->fPc = (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];
        w->fSp = (uintptr_t)uc->uc_mcontext.gregs[REG_RSP];
        if (sig == SIGSEGV) w->fWrite = (uc->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#elif defined(__aarch64__)
        w->fPc = (uintptr_t)((const ucontext_t*)ctx)->uc_mcontext.pc;
        w->fSp = (uintptr_t)((const ucontext_t*)ctx)->uc_mcontext.sp;
#endif
        w->fFiber = w->cur;
        siglongjmp(w->jb, 1);
    }
    chain(sig, si, ctx);
}

// Installs the handlers, or re-installs them if someone replaced them (chaining to the replacement).
void install_handlers()
{
    for (int sig : kSignals) {
        struct sigaction cur;
        if (sigaction(sig, nullptr, &cur) != 0) continue;
        if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_signal) continue;
        g_prev[sig] = cur;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_signal;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(sig, &sa, nullptr);
    }
}

void worker_main(Worker* w)
{
    w->thread = pthread_self();
    char name[16];
    snprintf(name, sizeof name, "kvk_emu_%d", w->index);
    pthread_setname_np(w->thread, name);
    // Asynchronous signals go to the host's threads, never to workers.
    sigset_t set;
    sigfillset(&set);
    for (int sig : kSignals) sigdelset(&set, sig);
    sigdelset(&set, SIGTRAP);
    sigdelset(&set, SIGABRT);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    stack_t ss;
    ss.ss_sp = w->altStack;
    ss.ss_size = kAltStackBytes;
    ss.ss_flags = 0;
    sigaltstack(&ss, nullptr);
    kvk_emu_state.worker = w;
    Pool* P = g_pool;
    for (;;) {
        LaunchCtx* L;
        {
            std::unique_lock<std::mutex> lk(P->mu);
            P->cv.wait(lk, [&] { return P->gen != w->seenGen; });
            w->seenGen = P->gen;
            if (w->index >= P->active) continue;
            L = P->L;
        }
        run_launch(w, L);
        {
            std::lock_guard<std::mutex> lk(P->mu);
            if (--P->remaining == 0) P->done.notify_all();
        }
    }
}

bool ensure_workers(int n)
{
    while (g_nworkers.load() < n) {
        const int k = g_nworkers.load();
        Worker* w = new (std::nothrow) Worker();
        if (!w) return false;
        w->index = k;
        w->slot = g_cfg.stackBytes + kStackGuardBytes;
        w->arenaLen = w->slot * kMaxThreads;
        void* arena = mmap(nullptr, w->arenaLen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        void* alt = mmap(nullptr, kAltStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (arena == MAP_FAILED || alt == MAP_FAILED) {
            if (arena != MAP_FAILED) munmap(arena, w->arenaLen);
            if (alt != MAP_FAILED) munmap(alt, kAltStackBytes);
            delete w;
            return false;
        }
        w->arena = (uintptr_t)arena;
        w->altStack = alt;
        {
            std::lock_guard<std::mutex> lk(g_pool->mu);
            w->seenGen = g_pool->gen;
        }
        g_workers[k] = w;
        std::thread(worker_main, w).detach();
        g_nworkers.store(k + 1, std::memory_order_release);
    }
    return true;
}

}  // namespace

// ==== exported ABI ===========================================================================================
extern "C" {

__attribute__((visibility("default"))) int kvk_emu_version(void) { return KVK_EMU_ABI_VERSION; }

__attribute__((visibility("default"))) void* kvk_emu_alloc(size_t bytes)
{
    std::call_once(g_initOnce, init_config);
    const size_t page = g_cfg.page;
    if (bytes > ((size_t)1 << 46)) {
        std::lock_guard<std::mutex> lk(g_regMu);
        set_last_error_locked(KVK_EMU_ERR_MEMORY, strf("kvk_emu_alloc(%zu): size too large", bytes));
        return nullptr;
    }
    const size_t usable = round_up(bytes, 16);
    const size_t dataLen = round_up(usable, page);
    const size_t mapLen = page + dataLen + page;
    void* m = mmap(nullptr, mapLen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED || (dataLen && mprotect((char*)m + page, dataLen, PROT_READ | PROT_WRITE) != 0)) {
        if (m != MAP_FAILED) munmap(m, mapLen);
        std::lock_guard<std::mutex> lk(g_regMu);
        set_last_error_locked(KVK_EMU_ERR_MEMORY, strf("kvk_emu_alloc(%zu): out of memory", bytes));
        return nullptr;
    }
    Alloc a;
    a.map = (uintptr_t)m;
    a.mapLen = mapLen;
    a.ptr = a.map + page + dataLen - usable;
    a.bytes = bytes;
    a.usable = usable;
    memset((void*)(a.map + page), kCanary, a.ptr - (a.map + page));
    memset((void*)(a.ptr + bytes), kCanary, usable - bytes);
    std::lock_guard<std::mutex> lk(g_regMu);
    a.serial = ++g_serial;
    g_allocs[a.map] = a;
    return (void*)a.ptr;
}

__attribute__((visibility("default"))) void kvk_emu_free(void* p)
{
    if (!p) return;
    std::call_once(g_initOnce, init_config);
    std::lock_guard<std::mutex> lk(g_regMu);
    auto it = find_containing((uintptr_t)p);
    if (it == g_allocs.end() || it->second.ptr != (uintptr_t)p) {
        std::string why = "it is not the start of a live allocation";
        for (const Alloc& q : g_quarantine)
            if ((uintptr_t)p == q.ptr) why = "double free of " + describe_alloc(q);
        set_last_error_locked(KVK_EMU_ERR_FREE, strf("kvk_emu_free(0x%lx): %s", (unsigned long)p, why.c_str()));
        return;
    }
    const Alloc a = it->second;
    const std::string damage = check_canary(a);
    if (!damage.empty()) set_last_error_locked(KVK_EMU_ERR_CORRUPTION, "memory corruption found by kvk_emu_free: " + damage);
    g_allocs.erase(it);
    // Quarantine: keep the address range reserved (PROT_NONE, its memory released) so that a use
    // after free faults instead of reading a recycled mapping.
    if (mmap((void*)a.map, a.mapLen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) == MAP_FAILED) {
        munmap((void*)a.map, a.mapLen);
        return;
    }
    g_quarantine.push_back(a);
    g_quarantineBytes += a.mapLen;
    while (g_quarantine.size() > kQuarantineMaxEntries || g_quarantineBytes > kQuarantineMaxBytes) {
        const Alloc& q = g_quarantine.front();
        munmap((void*)q.map, q.mapLen);
        g_quarantineBytes -= q.mapLen;
        g_quarantine.pop_front();
    }
}

__attribute__((visibility("default"))) int kvk_emu_last_error(char* error, int errorCapacity)
{
    std::lock_guard<std::mutex> lk(g_regMu);
    const int code = g_lastCode;
    finish(code, g_lastMsg, error, errorCapacity);
    g_lastCode = 0;
    g_lastMsg.clear();
    return code;
}

__attribute__((visibility("default"))) int kvk_emu_check_memory(char* error, int errorCapacity)
{
    std::call_once(g_initOnce, init_config);
    const std::string d = check_all_canaries();
    if (d.empty()) return finish(KVK_EMU_OK, "", error, errorCapacity);
    return finish(KVK_EMU_ERR_CORRUPTION, "memory corruption: " + d, error, errorCapacity);
}

__attribute__((visibility("default"))) int kvk_emu_launch(
    kvk_emu_entry entry, void** args, const char* kernelName, unsigned gridX, unsigned gridY, unsigned gridZ,
    unsigned blockX, unsigned blockY, unsigned blockZ, unsigned dynamicSharedBytes, unsigned maxSharedBytes,
    int hostThreads, char* error, int errorCapacity)
{
    std::call_once(g_initOnce, init_config);
    finish(KVK_EMU_OK, "", error, errorCapacity);
    const std::string name = kernelName && kernelName[0] ? kernelName : "(unnamed)";
    if (!entry) return finish(KVK_EMU_ERR_CONFIG, "kvk_emu_launch: null entry point for kernel '" + name + "'", error, errorCapacity);
    const uint64_t threads = (uint64_t)blockX * blockY * blockZ;
    if (!gridX || !gridY || !gridZ || !blockX || !blockY || !blockZ || blockX > 1024 || blockY > 1024 || blockZ > 64 ||
        threads > (uint64_t)kMaxThreads || gridX > 0x7fffffffu || gridY > 65535 || gridZ > 65535)
        return finish(KVK_EMU_ERR_CONFIG,
                      strf("invalid launch configuration for kernel '%s': grid (%u,%u,%u), block (%u,%u,%u) (limits: "
                           "block x,y <= 1024, z <= 64, x*y*z <= 1024; grid x < 2^31, y,z <= 65535; none zero)",
                           name.c_str(), gridX, gridY, gridZ, blockX, blockY, blockZ),
                      error, errorCapacity);
    const unsigned maxShared = maxSharedBytes ? maxSharedBytes : kStaticSharedLimit;
    Query q;
    q.addr = (uintptr_t)entry;
    dl_iterate_phdr(phdr_callback, &q);
    // Static shared memory = the kernel library's TLS segment (only __shared__ variables live there).
    // Kernels in the main program are not poisoned/checked: its TLS holds the program's own variables.
    const size_t staticShared = q.found && !q.mainProgram ? q.tlsSize : 0;
    if (g_cfg.staticCheck && staticShared > kStaticSharedLimit)
        return finish(KVK_EMU_ERR_SHARED,
                      strf("kernel '%s': %zu bytes of static shared memory in its library exceed the 48 KiB a GPU "
                           "allows for static __shared__ variables", name.c_str(), staticShared),
                      error, errorCapacity);
    if (dynamicSharedBytes > maxShared)
        return finish(KVK_EMU_ERR_SHARED,
                      strf("kernel '%s': %u bytes of dynamic shared memory exceed the limit of %u bytes (maxSharedBytes); "
                           "a GPU refuses this launch", name.c_str(), dynamicSharedBytes, maxShared),
                      error, errorCapacity);
    if (g_cfg.staticCheck && staticShared + dynamicSharedBytes > maxShared)
        return finish(KVK_EMU_ERR_SHARED,
                      strf("kernel '%s': %zu bytes of static shared memory (all __shared__ variables of its library) + "
                           "%u bytes of dynamic shared memory exceed the limit of %u bytes (maxSharedBytes)",
                           name.c_str(), staticShared, dynamicSharedBytes, maxShared),
                      error, errorCapacity);

    std::lock_guard<std::mutex> launchLock(*g_launchMu);
    install_handlers();
    {
        const char* t = getenv("KVK_EMU_TIMEOUT_S");   // read per launch
        g_cfg.timeoutSeconds = t ? strtod(t, nullptr) : 300.0;
    }
    LaunchCtx L;
    L.entry = entry;
    L.args = args;
    L.name = name;
    L.grid = dim3(gridX, gridY, gridZ);
    L.block = dim3(blockX, blockY, blockZ);
    L.nthreads = (unsigned)threads;
    L.dyn = dynamicSharedBytes;
    L.nblocks = (uint64_t)gridX * gridY * gridZ;
    L.tlsModid = staticShared ? q.modid : 0;
    L.tlsSize = staticShared;
    int hw = hostThreads > 0 ? hostThreads : (int)std::thread::hardware_concurrency();
    hw = std::max(1, std::min(hw, kMaxWorkers));
    const int nw = (int)std::min<uint64_t>((uint64_t)hw, L.nblocks);
    if (!ensure_workers(nw))
        return finish(KVK_EMU_ERR_INTERNAL, "kvk_emu_launch: cannot create worker threads (out of memory)", error, errorCapacity);
    Pool* P = g_pool;
    {
        std::lock_guard<std::mutex> lk(P->mu);
        P->L = &L;
        P->active = nw;
        P->remaining = nw;
        ++P->gen;
    }
    P->cv.notify_all();
    {
        std::unique_lock<std::mutex> lk(P->mu);
        const auto start = std::chrono::steady_clock::now();
        bool timedOut = false;
        while (!P->done.wait_for(lk, std::chrono::milliseconds(timedOut ? 200 : 1000), [&] { return P->remaining == 0; })) {
            if (g_cfg.timeoutSeconds <= 0) continue;
            if (!timedOut && std::chrono::steady_clock::now() - start < std::chrono::duration<double>(g_cfg.timeoutSeconds)) continue;
            if (!timedOut) {
                timedOut = true;
                std::string where;
                for (int i = 0; i < nw; ++i) {
                    Worker* w = g_workers[i];
                    Fiber* f = w->cur;
                    if (w->inFiber && f)
                        where += strf("%sblock (%u,%u,%u) thread (%u,%u,%u)", where.empty() ? "" : ", ", w->blockIdx.x,
                                      w->blockIdx.y, w->blockIdx.z, f->tid.x, f->tid.y, f->tid.z);
                }
                record(&L, KVK_EMU_ERR_TIMEOUT,
                       strf("kernel '%s' did not finish within %g s (KVK_EMU_TIMEOUT_S): an infinite loop, or a spin-wait "
                            "on another thread of the same block (emulated threads are fibers that are not preempted: "
                            "a waiting loop must call __nanosleep or __syncwarp/__syncthreads to let others run)%s%s",
                            name.c_str(), g_cfg.timeoutSeconds, where.empty() ? "" : "; running: ", where.c_str()).c_str());
            }
            // Interrupt every worker still inside a fiber (again until all have stopped: a signal that
            // arrives between two fibers is ignored, and the abort flag stops the scheduler).
            for (int i = 0; i < nw; ++i) {
                g_workers[i]->stopRequested = 1;
                union sigval v;
                v.sival_int = kStopMagic;
                pthread_sigqueue(g_workers[i]->thread, SIGSEGV, v);
            }
        }
        P->L = nullptr;
        for (int i = 0; i < nw; ++i) g_workers[i]->stopRequested = 0;
    }
    if (!L.code) {
        const std::string d = check_all_canaries();
        if (!d.empty())
            return finish(KVK_EMU_ERR_CORRUPTION, "memory corruption found after kernel '" + name + "': " + d +
                          " (the kernel, or host code since the previous check, wrote out of bounds)", error, errorCapacity);
    }
    return finish(L.code, L.msg, error, errorCapacity);
}

// ---- hooks called from kernel code --------------------------------------------------------------------------
__attribute__((visibility("default"))) int kvk_emu_syncthreads_op(int op, int pred)
{
    Worker* w = current_worker("__syncthreads");
    Fiber* f = w->cur;
    ++w->barArrived;
    w->barPred += pred != 0;
    const unsigned n = w->L->nthreads;
    if (w->barArrived == n) {
        const unsigned count = w->barPred;
        const int result = op == 0 ? (int)count : op == 1 ? (count == n) : (count != 0);
        const unsigned waiting = w->barArrived - 1;   // every thread but this one
        w->barArrived = w->barPred = 0;
        for (unsigned k = 0; k < w->nwarps; ++k) ++w->warps[k].epoch;   // the block converged here
        f->epoch = w->warps[f->warp].epoch;
        for (unsigned k = 0; k < waiting; ++k) {
            Fiber& g = w->fibers[w->barWaiters[k]];
            g.epoch = w->warps[g.warp].epoch;
            g.barResult = result;
            g.state = F_RUNNABLE;
            push(w, (int)g.rank);
        }
        return result;
    }
    w->barWaiters[w->barArrived - 1] = (int)f->rank;
    f->state = F_BAR;
    suspend(w, f);
    return f->barResult;
}

__attribute__((visibility("default"))) uint64_t kvk_emu_warp_op(int kind, unsigned mask, uint64_t value, int b, int c)
{
    Worker* w = current_worker(kind_name(kind));
    Fiber* f = w->cur;
    const unsigned bit = 1u << f->lane;
    if (!(mask & bit))
        fiber_failf(w, KVK_EMU_ERR_WARP,
                    "%s with mask 0x%08x, which does not contain the calling lane %u (undefined on a GPU: the executing "
                    "lane must be in the mask)", kind_name(kind), mask, f->lane);
    Warp& W = w->warps[f->warp];
    int i = 0;
    while (i < W.nops && W.ops[i].mask != mask) ++i;
    if (i < W.nops) {
        if (W.ops[i].kind != kind) {
            char lanes[160];   // no heap object may live on a fiber stack that is abandoned
            {
                const std::string l = lane_list(W.ops[i].arrived);
                snprintf(lanes, sizeof lanes, "%s", l.c_str());
            }
            fiber_failf(w, KVK_EMU_ERR_DEADLOCK,
                        "divergent warp collective: this lane calls %s(mask 0x%08x) while lanes %s of the same mask wait "
                        "in %s; every non-exited lane of a mask must execute the same collective (a hang or undefined "
                        "behaviour on a GPU)", kind_name(kind), mask, lanes, kind_name(W.ops[i].kind));
        }
    } else {
        W.ops[W.nops++] = WarpOp{kind, mask, 0};
    }
    f->in = value;
    f->b = b;
    f->c = c;
    f->wkind = kind;
    f->wmask = mask;
    W.ops[i].arrived |= bit;
    if (op_complete(W, W.ops[i])) {
        if (!execute_op(w, W, i, f)) abandon_fiber(w, f);
        return f->out;
    }
    f->state = F_WARP;
    suspend(w, f);
    return f->out;
}

__attribute__((visibility("default"))) unsigned kvk_emu_activemask(void)
{
    // A fiber cannot know which lanes a GPU would run converged with it. Deterministic answer: the
    // lanes that had not exited when this lane's last warp collective or barrier completed (all
    // lanes before the first one), whatever order the fibers ran in since.
    Worker* w = current_worker("__activemask");
    const Fiber* f = w->cur;
    const Warp& W = w->warps[f->warp];
    unsigned m = W.live;
    for (unsigned l = 0; l < 32; ++l)
        if ((W.exists & ~W.live) >> l & 1u && W.exitEpoch[l] >= f->epoch) m |= 1u << l;
    return m;
}

__attribute__((visibility("default"))) void kvk_emu_yield(void)
{
    Worker* w = current_worker("__nanosleep");
    Fiber* f = w->cur;
    f->state = F_RUNNABLE;
    suspend(w, f);
}

__attribute__((visibility("default"))) void kvk_emu_trap(const char* what)
{
    Worker* w = (Worker*)kvk_emu_state.worker;
    if (!w || !w->inFiber || !w->cur) {
        fprintf(stderr, "kvk_emu: %s outside a kernel launch\n", what);
        abort();
    }
    fiber_failf(w, KVK_EMU_ERR_TRAP, "%s", what);
}

__attribute__((visibility("default"))) void kvk_emu_assert_fail(const char* expr, const char* file, int line, const char* func)
{
    Worker* w = (Worker*)kvk_emu_state.worker;
    if (!w || !w->inFiber || !w->cur) {
        fprintf(stderr, "%s:%d: %s: Assertion `%s' failed.\n", file, line, func, expr);
        abort();
    }
    fiber_failf(w, KVK_EMU_ERR_TRAP, "%s:%d: %s: Assertion `%s` failed.", file, line, func, expr);
}

__attribute__((visibility("default"))) void kvk_emu_fail(int code, const char* message)
{
    Worker* w = (Worker*)kvk_emu_state.worker;
    if (!w || !w->inFiber || !w->cur) {
        fprintf(stderr, "kvk_emu: %s (outside a kernel launch)\n", message);
        abort();
    }
    fiber_failf(w, code, "%s", message);
}

__attribute__((visibility("default"))) void kvk_emu_misaligned(const void* p, unsigned alignment, const char* what)
{
    char buf[256];
    snprintf(buf, sizeof buf, "misaligned address 0x%lx for %s (needs %u-byte alignment)", (unsigned long)(uintptr_t)p,
             what, alignment);
    kvk_emu_fail(KVK_EMU_ERR_TRAP, buf);
}

}  // extern "C"
