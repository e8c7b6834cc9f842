/* A tiny persistent thread pool for our CPU kernels: `pool_run(fn, arg, nchunks, threads)` runs fn(arg, c) for every
 * chunk c = 0..nchunks-1 on the calling thread and up to threads - 1 workers, and returns when all chunks are done.
 *
 * Why not OpenMP: the engine sets OMP_WAIT_POLICY=passive for torch's sake (spinning OpenMP workers took the cores
 * from torch's next op), so an OpenMP region wakes its workers from sleep on every call: ~tens of us, as much as a
 * ~40 us GEMV. These workers spin (with `pause`) for up to POOL_SPIN_US after a job, so that the next call of a
 * decode step, and the first of the next step (the engine's host work between steps takes a few ms), finds them
 * awake; then they sleep on a condition variable until the next job: an idle engine costs no CPU.
 * Chunks are taken from a shared counter, so a worker that the OS has descheduled (a busy machine) delays nothing:
 * the caller takes the chunks it would have taken. The counter carries the job's generation in its high 32 bits; a
 * worker takes chunk i of job g only by a compare-and-swap from (g, i), so a late worker never runs a chunk of a
 * finished job, and reads fn / arg only for a job that cannot have finished. A worker descheduled in the middle of a
 * chunk does delay the caller (up to an OS time slice: milliseconds, for a ~40 us call); when the caller has waited
 * over POOL_STALL_US for an awake one, the next POOL_BACKOFF calls run on the caller alone (a machine busy with
 * other work gains nothing from a second thread), then threads are tried again.
 */
#ifndef PIPELINE_POOL_H
#define PIPELINE_POOL_H
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#define POOL_MAX 64
#ifndef POOL_SPIN_US
#define POOL_SPIN_US 300
#endif
#define POOL_STALL_US 200
#define POOL_BACKOFF 16

typedef void (*pool_fn)(void *arg, int chunk);

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int started;                 /* workers running */
    _Atomic uint64_t next;       /* gen << 32 | the next chunk to take */
    atomic_int done;             /* chunks finished in the current job */
    atomic_int sleepers;
    pool_fn fn;
    void *arg;
    int nchunks;
    int backoff;                 /* calls left on the caller alone after a stall */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static double pool_now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

/* Take and run chunks of job `gen` until none is left; returns how many this thread ran. */
static int pool_work(uint32_t gen) {
    int ran = 0;
    for (;;) {
        uint64_t cur = atomic_load_explicit(&pool.next, memory_order_acquire);
        if ((uint32_t)(cur >> 32) != gen) return ran;
        pool_fn fn = pool.fn;
        void *arg = pool.arg;
        int i = (int)(uint32_t)cur;
        if (i >= pool.nchunks) return ran;
        if (!atomic_compare_exchange_weak_explicit(&pool.next, &cur, cur + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        fn(arg, i);
        ran++;
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *pool_worker(void *unused) {
    (void)unused;
    uint32_t seen = (uint32_t)(atomic_load(&pool.next) >> 32);
    for (;;) {
        double t0 = pool_now_us();
        uint32_t g;
        int spins = 0;
        while ((g = (uint32_t)(atomic_load_explicit(&pool.next, memory_order_acquire) >> 32)) == seen) {
            _mm_pause();
            if (++spins % 256 == 0 && pool_now_us() - t0 > POOL_SPIN_US) {
                pthread_mutex_lock(&pool.mu);
                atomic_fetch_add(&pool.sleepers, 1);
                while ((g = (uint32_t)(atomic_load(&pool.next) >> 32)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.mu);
                break;
            }
        }
        seen = g;
        pool_work(g);
    }
    return NULL;
}

/* A forked child has none of the parent's workers, and may have copied the mutex held: start afresh there. */
static void pool_after_fork_child(void) {
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pool.started = 0;
    atomic_store(&pool.sleepers, 0);
    pool.backoff = 0;
}

/* Runs fn over nchunks chunks on up to `threads` threads; one caller at a time (the engine's step thread). */
static void pool_run(pool_fn fn, void *arg, int nchunks, int threads) {
    if (threads > POOL_MAX) threads = POOL_MAX;
    if (pool.backoff > 0) {
        pool.backoff--;
        threads = 1;
    }
    if (threads <= 1 || nchunks <= 1) {
        for (int i = 0; i < nchunks; i++) fn(arg, i);
        return;
    }
    static int atfork_set = 0;
    if (!atfork_set) atfork_set = pthread_atfork(NULL, NULL, pool_after_fork_child) == 0;
    while (pool.started < threads - 1) {              /* lazily start the workers */
        pthread_t th;
        if (pthread_create(&th, NULL, pool_worker, NULL) != 0) break;
        pthread_detach(th);
        pool.started++;
    }
    /* Close the last job before its fields change: a worker that loaded `next` for it (all its chunks taken, the index
     * at its nchunks) and then reads this job's larger nchunks would otherwise win its compare-exchange on the old
     * word, run a chunk of this job under the old generation and count it done twice, and this call could return
     * while a chunk still runs (a rare, load-dependent wrong token in the CPU decode tests). INT32_MAX >= any
     * nchunks, and + 1 cannot reach the generation bits: nothing takes it. */
    uint32_t old = (uint32_t)(atomic_load(&pool.next) >> 32);
    atomic_store(&pool.next, ((uint64_t)old << 32) | 0x7fffffffu);
    uint32_t gen = old + 1;
    pool.fn = fn;
    pool.arg = arg;
    pool.nchunks = nchunks;
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    pthread_mutex_lock(&pool.mu);
    atomic_store_explicit(&pool.next, (uint64_t)gen << 32, memory_order_release);
    int woke = atomic_load(&pool.sleepers) > 0;     /* a waking worker is late by design: not a stall */
    if (woke) pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    pool_work(gen);
    if (atomic_load_explicit(&pool.done, memory_order_acquire) < nchunks) {   /* a worker is finishing a chunk */
        double t0 = pool_now_us();
        while (atomic_load_explicit(&pool.done, memory_order_acquire) < nchunks) _mm_pause();
        if (!woke && pool_now_us() - t0 > POOL_STALL_US) pool.backoff = POOL_BACKOFF;
    }
}
#endif
