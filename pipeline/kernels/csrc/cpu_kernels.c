/* All our CPU kernels in one library (cpu_build.load("cpu_kernels")), so that they share one thread pool
 * (pool.h): a pool per library left two sets of workers spinning against each other on a small CPU. */
#include "linear_cpu.c"
#include "attn_cpu.c"

const char *cpu_kernels_isa(void) { return KERNEL_ISA; }
