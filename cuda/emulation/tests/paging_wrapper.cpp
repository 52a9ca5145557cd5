// Emulator build of cuda/paging/paging.cu, unchanged (VEC_BYTES / KV_LAYOUT_HND / PAGING_UNROLL come
// from -D flags, as for NVRTC).
#include "emulation/kvk_emulation.h"
#include "paging/paging.cu"

KVK_EMU_EXPORT(paging_append)
KVK_EMU_EXPORT(paging_gather)
KVK_EMU_EXPORT(paging_scatter)
KVK_EMU_EXPORT(paging_copy_pages)
