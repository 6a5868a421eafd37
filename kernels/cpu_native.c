/* The CPU path's fp32 kernels: y = x W^T with few rows in x (a decode step's tokens, or its tokens
 * per expert), the routed experts of a decode step, and the absorbed MLA decode over the paged
 * latent cache; at the end, the thread pool they split their work with. Built by
 * kernels/cpu_native.py with the system's C compiler and called through ctypes.
 *
 * Why not MKL: for a few rows its sgemm reads the weights and then computes, without overlap
 * (measured: 4 ms + 0.6 ms per row per 32 MB of weights). Here each block of 4 weight rows is read
 * once from memory and used for every row of x while it sits in L1, so the read is the whole cost.
 * AVX2+FMA when the CPU has it (chosen at run time), plain C otherwise. Sums run in a different
 * order from MKL's: results agree to fp32 rounding, not bit for bit.
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* y[m * ldy + n] = sum_k x[m * K + k] * w[n * K + k], for m < M, n < N */
static void linear_plain(const float *x, int M, int K, const float *w, int N, float *y, int ldy) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float s = 0.f;
            for (int k = 0; k < K; k++) s += x[(size_t)m * K + k] * w[(size_t)n * K + k];
            y[(size_t)m * ldy + n] = s;
        }
}

/* four 8-lane sums -> one 4-lane vector of their totals, in order */
__attribute__((target("avx2,fma"))) static inline __m128 sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

__attribute__((target("avx2,fma")))
static void linear_avx2(const float *x, int M, int K, const float *w, int N, float *y, int ldy) {
    const int K8 = K & ~7;
    int n = 0;
    for (; n + 4 <= N; n += 4) {
        const float *w0 = w + (size_t)n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        /* the next block's rows stream in while this one is used (the hardware prefetcher alone
           follows only a few streams) */
        if (n + 8 <= N)
            for (int k = 0; k < K; k += 16) {
                _mm_prefetch((const char *)(w3 + K + k), _MM_HINT_T0);
                _mm_prefetch((const char *)(w3 + 2 * K + k), _MM_HINT_T0);
                _mm_prefetch((const char *)(w3 + 3 * K + k), _MM_HINT_T0);
                _mm_prefetch((const char *)(w3 + 4 * K + k), _MM_HINT_T0);
            }
        int m = 0;
        for (; m + 3 <= M; m += 3) {   /* 3 rows of x x 4 rows of w: 12 accumulators */
            const float *xa = x + (size_t)m * K, *xb = xa + K, *xc = xb + K;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            __m256 c0 = a0, c1 = a0, c2 = a0, c3 = a0;
            for (int k = 0; k < K8; k += 8) {
                __m256 q0 = _mm256_loadu_ps(w0 + k), q1 = _mm256_loadu_ps(w1 + k);
                __m256 q2 = _mm256_loadu_ps(w2 + k), q3 = _mm256_loadu_ps(w3 + k);
                __m256 u = _mm256_loadu_ps(xa + k);
                a0 = _mm256_fmadd_ps(u, q0, a0); a1 = _mm256_fmadd_ps(u, q1, a1);
                a2 = _mm256_fmadd_ps(u, q2, a2); a3 = _mm256_fmadd_ps(u, q3, a3);
                u = _mm256_loadu_ps(xb + k);
                b0 = _mm256_fmadd_ps(u, q0, b0); b1 = _mm256_fmadd_ps(u, q1, b1);
                b2 = _mm256_fmadd_ps(u, q2, b2); b3 = _mm256_fmadd_ps(u, q3, b3);
                u = _mm256_loadu_ps(xc + k);
                c0 = _mm256_fmadd_ps(u, q0, c0); c1 = _mm256_fmadd_ps(u, q1, c1);
                c2 = _mm256_fmadd_ps(u, q2, c2); c3 = _mm256_fmadd_ps(u, q3, c3);
            }
            float t[3][4];
            _mm_storeu_ps(t[0], sum4(a0, a1, a2, a3)); _mm_storeu_ps(t[1], sum4(b0, b1, b2, b3));
            _mm_storeu_ps(t[2], sum4(c0, c1, c2, c3));
            for (int r = 0; r < 3; r++) {
                const float *xr = xa + (size_t)r * K;
                for (int k = K8; k < K; k++) {
                    t[r][0] += xr[k] * w0[k]; t[r][1] += xr[k] * w1[k]; t[r][2] += xr[k] * w2[k]; t[r][3] += xr[k] * w3[k];
                }
                for (int j = 0; j < 4; j++) y[(size_t)(m + r) * ldy + n + j] = t[r][j];
            }
        }
        for (; m + 2 <= M; m += 2) {   /* 2 rows of x x 4 rows of w: 8 accumulators */
            const float *xa = x + (size_t)m * K, *xb = xa + K;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (int k = 0; k < K8; k += 8) {
                __m256 u = _mm256_loadu_ps(xa + k), v = _mm256_loadu_ps(xb + k);
                __m256 q0 = _mm256_loadu_ps(w0 + k), q1 = _mm256_loadu_ps(w1 + k);
                __m256 q2 = _mm256_loadu_ps(w2 + k), q3 = _mm256_loadu_ps(w3 + k);
                a0 = _mm256_fmadd_ps(u, q0, a0); a1 = _mm256_fmadd_ps(u, q1, a1);
                a2 = _mm256_fmadd_ps(u, q2, a2); a3 = _mm256_fmadd_ps(u, q3, a3);
                b0 = _mm256_fmadd_ps(v, q0, b0); b1 = _mm256_fmadd_ps(v, q1, b1);
                b2 = _mm256_fmadd_ps(v, q2, b2); b3 = _mm256_fmadd_ps(v, q3, b3);
            }
            __m128 sa = sum4(a0, a1, a2, a3), sb = sum4(b0, b1, b2, b3);
            float ta[4], tb[4];
            _mm_storeu_ps(ta, sa); _mm_storeu_ps(tb, sb);
            for (int k = K8; k < K; k++) {
                ta[0] += xa[k] * w0[k]; ta[1] += xa[k] * w1[k]; ta[2] += xa[k] * w2[k]; ta[3] += xa[k] * w3[k];
                tb[0] += xb[k] * w0[k]; tb[1] += xb[k] * w1[k]; tb[2] += xb[k] * w2[k]; tb[3] += xb[k] * w3[k];
            }
            for (int j = 0; j < 4; j++) {
                y[(size_t)m * ldy + n + j] = ta[j];
                y[(size_t)(m + 1) * ldy + n + j] = tb[j];
            }
        }
        for (; m < M; m++) {
            const float *xa = x + (size_t)m * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int k = 0; k < K8; k += 8) {
                __m256 u = _mm256_loadu_ps(xa + k);
                a0 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w0 + k), a0);
                a1 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w1 + k), a1);
                a2 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w2 + k), a2);
                a3 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w3 + k), a3);
            }
            float ta[4];
            _mm_storeu_ps(ta, sum4(a0, a1, a2, a3));
            for (int k = K8; k < K; k++) {
                ta[0] += xa[k] * w0[k]; ta[1] += xa[k] * w1[k]; ta[2] += xa[k] * w2[k]; ta[3] += xa[k] * w3[k];
            }
            for (int j = 0; j < 4; j++) y[(size_t)m * ldy + n + j] = ta[j];
        }
    }
    if (n < N)   /* the last 1-3 weight rows */
        linear_plain(x, M, K, w + (size_t)n * K, N - n, y + n, ldy);
}

static int has_avx2 = -1;

static int avx2(void) {   /* asked once: the answer does not change */
    if (has_avx2 < 0) has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return has_avx2;
}

/* Many rows (prefill) go in chunks of about 192 kB of x, which stay in L2 while every weight block
 * passes over them: unchunked, each block of 4 weight rows would stream all of x from memory. */
static void linear(const float *x, int M, int K, const float *w, int N, float *y, int ldy) {
    const int vector = avx2();
    int chunk = 49152 / (K > 0 ? K : 1);
    chunk = chunk < 12 ? 12 : chunk - chunk % 3;
    for (int m = 0; m < M; m += chunk) {
        int rows = M - m < chunk ? M - m : chunk;
        if (vector) linear_avx2(x + (size_t)m * K, rows, K, w, N, y + (size_t)m * ldy, ldy);
        else linear_plain(x + (size_t)m * K, rows, K, w, N, y + (size_t)m * ldy, ldy);
    }
}

/* columns n_lo .. n_hi-1 of y [M, N] = x [M, K] @ w [N, K]^T, all contiguous */
static void linear_columns(const float *x, int M, int K, const float *w, int N, float *y, int n_lo, int n_hi) {
    linear(x, M, K, w + (size_t)n_lo * K, n_hi - n_lo, y + n_lo, N);
}

/* Experts e_lo .. e_hi-1 of a routed MoE over rows already sorted by expert: expert e owns rows
 * offsets[e] .. offsets[e+1]-1 of xs [rows, H] and writes the same rows of ys [rows, H].
 * w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I]: ys = (silu(x Wg^T) * (x Wu^T)) W2^T.
 * Returns 0, or -1 when scratch memory cannot be had. */
static int moe_experts(const float *xs, const int64_t *offsets, int e_lo, int e_hi,
                        const float *w13, const float *w2, int H, int I, float *ys) {
    int most = 0;
    for (int e = e_lo; e < e_hi; e++)
        if (offsets[e + 1] - offsets[e] > most) most = (int)(offsets[e + 1] - offsets[e]);
    if (most == 0) return 0;
    float *h = malloc(sizeof(float) * (size_t)most * 2 * I);
    if (!h) return -1;
    for (int e = e_lo; e < e_hi; e++) {
        int M = (int)(offsets[e + 1] - offsets[e]);
        if (M == 0) continue;
        const float *x = xs + (size_t)offsets[e] * H;
        linear(x, M, H, w13 + (size_t)e * 2 * I * H, 2 * I, h, 2 * I);
        for (int m = 0; m < M; m++) {   /* silu(gate) * up, into the gate half */
            float *g = h + (size_t)m * 2 * I;
            for (int i = 0; i < I; i++) g[i] = g[i] / (1.f + expf(-g[i])) * g[I + i];
        }
        /* the activations sit in the first half of each row of h: pack them to [M, I] */
        for (int m = 1; m < M; m++)
            for (int i = 0; i < I; i++) h[(size_t)m * I + i] = h[(size_t)m * 2 * I + i];
        linear(h, M, I, w2 + (size_t)e * H * I, H, ys + (size_t)offsets[e] * H, H);
    }
    free(h);
    return 0;
}

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) @ b [K, N] (row stride ldb), or y += that
 * when `add`: b's rows run along the sum (the values of attention). A block of 3 rows of x x 32
 * columns keeps 12 accumulators; each row of b is read once per block of rows of x, from cache
 * after the first. */
__attribute__((target("avx2,fma"), always_inline))
static inline void matmul_kn_block(const float *x, int ldx, int R, int K, const float *b, int ldb, float *y,
                                   int ldy, int V, int add) {
    __m256 acc[3][4];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < V; j++) acc[r][j] = add ? _mm256_loadu_ps(y + (size_t)r * ldy + 8 * j) : _mm256_setzero_ps();
    for (int k = 0; k < K; k++) {
        __m256 bv[4];
        for (int j = 0; j < V; j++) bv[j] = _mm256_loadu_ps(b + (size_t)k * ldb + 8 * j);
        for (int r = 0; r < R; r++) {
            __m256 xr = _mm256_broadcast_ss(x + (size_t)r * ldx + k);
            for (int j = 0; j < V; j++) acc[r][j] = _mm256_fmadd_ps(xr, bv[j], acc[r][j]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < V; j++) _mm256_storeu_ps(y + (size_t)r * ldy + 8 * j, acc[r][j]);
}

static void matmul_kn_plain(const float *x, int ldx, int M, int K, const float *b, int ldb, int n0, int N,
                            float *y, int ldy, int add) {
    for (int m = 0; m < M; m++)
        for (int n = n0; n < N; n++) {
            float s = add ? y[(size_t)m * ldy + n] : 0.f;
            for (int k = 0; k < K; k++) s += x[(size_t)m * ldx + k] * b[(size_t)k * ldb + n];
            y[(size_t)m * ldy + n] = s;
        }
}

__attribute__((target("avx2,fma")))
static void matmul_kn_avx2(const float *x, int ldx, int M, int K, const float *b, int ldb, int N, float *y,
                           int ldy, int add) {
    const int N8 = N & ~7;
    for (int n = 0; n < N8; n += 32) {
        int V = (N8 - n) / 8 < 4 ? (N8 - n) / 8 : 4;
        for (int m = 0; m < M; m += 3) {
            int R = M - m < 3 ? M - m : 3;
            const float *xm = x + (size_t)m * ldx;
            float *ym = y + (size_t)m * ldy + n;
            /* constant block sizes for whole 32-column blocks, so the compiler unrolls them and
               keeps the accumulators in registers (with variable sizes they live in memory) */
            if (V == 4 && R == 3) matmul_kn_block(xm, ldx, 3, K, b + n, ldb, ym, ldy, 4, add);
            else if (V == 4 && R == 2) matmul_kn_block(xm, ldx, 2, K, b + n, ldb, ym, ldy, 4, add);
            else if (V == 4) matmul_kn_block(xm, ldx, 1, K, b + n, ldb, ym, ldy, 4, add);
            else matmul_kn_block(xm, ldx, R, K, b + n, ldb, ym, ldy, V, add);
        }
    }
    matmul_kn_plain(x, ldx, M, K, b, ldb, N8, N, y, ldy, add);
}

static void matmul_kn(const float *x, int ldx, int M, int K, const float *b, int ldb, int N, float *y, int ldy,
                      int add) {
    if (avx2()) matmul_kn_avx2(x, ldx, M, K, b, ldb, N, y, ldy, add);
    else matmul_kn_plain(x, ldx, M, K, b, ldb, 0, N, y, ldy, add);
}

/* Absorbed MLA decode of one query token: its H heads q [H, D] share one latent key/value head,
 * the first S rows of its sequence in the paged cache (pages of `page` rows of D = latent Dl +
 * rope columns; `blocks` lists the sequence's pages in order). out [H, Dl] = softmax(scale q
 * kv^T) kv[:, :Dl]. Runs of consecutive pages are read as one; two passes over the rows (scores,
 * then values), the second from cache. Returns 0, or -1 when scratch memory cannot be had. */
static int mla_decode(const float *q, int H, int D, const float *cache, const int32_t *blocks, int page,
                       int S, int Dl, float scale, float *out) {
    float *p = malloc(sizeof(float) * (size_t)H * (S > 0 ? S : 1));
    if (!p) return -1;
    for (int s0 = 0, i = 0; s0 < S;) {   /* scores, one run of consecutive pages at a time */
        int j = i + 1;
        while (j * page < S && blocks[j] == blocks[j - 1] + 1) j++;
        int rows = (j * page < S ? j * page : S) - s0;
        linear(q, H, D, cache + (size_t)blocks[i] * page * D, rows, p + s0, S);
        s0 += rows, i = j;
    }
    for (int h = 0; h < H; h++) {   /* softmax over the rows, in place */
        float *ph = p + (size_t)h * S, top = -INFINITY, sum = 0.f;
        for (int s = 0; s < S; s++) top = ph[s] * scale > top ? ph[s] * scale : top;
        for (int s = 0; s < S; s++) sum += (ph[s] = expf(ph[s] * scale - top));
        for (int s = 0; s < S; s++) ph[s] /= sum;
    }
    if (S == 0)
        for (size_t k = 0; k < (size_t)H * Dl; k++) out[k] = 0.f;
    for (int s0 = 0, i = 0; s0 < S;) {   /* values, the same runs, summed into out */
        int j = i + 1;
        while (j * page < S && blocks[j] == blocks[j - 1] + 1) j++;
        int rows = (j * page < S ? j * page : S) - s0;
        matmul_kn(p + s0, S, H, rows, cache + (size_t)blocks[i] * page * D, D, Dl, out, Dl, s0 > 0);
        s0 += rows, i = j;
    }
    free(p);
    return 0;
}

/* ---- threads ---------------------------------------------------------------------------------
 * The entry points below cut their work into a few parts per thread, which the caller and pool
 * workers claim one at a time. A worker spins for a while after its last part before it sleeps on
 * a futex, so the calls of one decode step (tens, ~0.1-1 ms apart) reach it in about a
 * microsecond; handing a part to a Python thread cost ~70 us a call. Parts are claimed, not
 * assigned: torch's OpenMP workers spin after their own regions too, and a worker of ours that
 * cannot get a core then simply claims nothing while the caller does the rest (assigned parts made
 * the caller wait for it: 2-thread decode 1.5x slower). Parts write disjoint outputs. One caller at
 * a time: a concurrent caller runs its work alone. A forked child makes its own workers. */
#define MAX_WORKERS 31
#define MAX_PARTS 128
#define SPIN_NS 300000L   /* about as long as OpenMP's default spin before sleeping */

typedef void (*part_fn)(const void *args, int lo, int hi);

static struct job {
    part_fn fn;
    const void *args;
    int parts, bounds[MAX_PARTS + 1];
    _Atomic uint64_t claim;   /* generation << 32 | next part: a stale worker cannot claim */
    atomic_int done;
} job;
static struct worker { atomic_int posted, sleeping; } workers[MAX_WORKERS];
static int started;                                  /* workers running in this process */
static uint32_t generation;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* claim and run parts of the current job until none is left */
static void run_claims(void) {
    uint64_t c = atomic_load(&job.claim);
    for (;;) {
        uint32_t i = (uint32_t)c;
        if (i >= (uint32_t)job.parts) return;
        if (!atomic_compare_exchange_weak(&job.claim, &c, c + 1)) continue;   /* c reloaded */
        job.fn(job.args, job.bounds[i], job.bounds[i + 1]);
        atomic_fetch_add(&job.done, 1);
        c = atomic_load(&job.claim);
    }
}

static void *worker_loop(void *arg) {
    struct worker *w = arg;
    int seen = 0;
    for (;;) {
        long t0 = now_ns();
        for (int spins = 1; atomic_load(&w->posted) == seen; spins++) {
            _mm_pause();
            if (spins % 256 == 0 && now_ns() - t0 > SPIN_NS) {
                atomic_store(&w->sleeping, 1);
                if (atomic_load(&w->posted) == seen)
                    syscall(SYS_futex, &w->posted, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
                atomic_store(&w->sleeping, 0);
                t0 = now_ns();
            }
        }
        seen = atomic_load(&w->posted);
        run_claims();
    }
    return NULL;
}

static void forget_workers(void) { started = 0; }   /* in a forked child: the threads are gone */

static void at_fork(void) { pthread_atfork(NULL, NULL, forget_workers); }

/* run fn over parts [bounds[i], bounds[i+1]), i < parts, on up to `threads` threads */
static void run_parts(part_fn fn, const void *args, const int *bounds, int parts, int threads) {
    pthread_once(&atfork_once, at_fork);
    if (threads > MAX_WORKERS + 1) threads = MAX_WORKERS + 1;
    if (threads < 2 || parts < 2 || pthread_mutex_trylock(&pool_lock) != 0) {
        fn(args, bounds[0], bounds[parts]);
        return;
    }
    for (; started < threads - 1; started++) {
        atomic_store(&workers[started].posted, 0);
        atomic_store(&workers[started].sleeping, 0);
        pthread_t t;
        if (pthread_create(&t, NULL, worker_loop, &workers[started]) != 0) break;
        pthread_detach(t);
    }
    /* closed first (no index is below any job's parts), so that a worker still holding the last
       job's claim word fails its exchange while the fields change */
    atomic_store(&job.claim, ((uint64_t)(generation + 1) << 32) | 0xffffffffu);
    job.fn = fn, job.args = args, job.parts = parts;
    for (int i = 0; i <= parts; i++) job.bounds[i] = bounds[i];
    atomic_store(&job.done, 0);
    atomic_store(&job.claim, (uint64_t)++generation << 32);
    for (int i = 0; i < started && i < threads - 1; i++) {
        atomic_fetch_add(&workers[i].posted, 1);
        if (atomic_load(&workers[i].sleeping))
            syscall(SYS_futex, &workers[i].posted, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    }
    run_claims();
    /* parts a worker claimed and is still running (yielding: it may share this core) */
    for (int spins = 1; atomic_load(&job.done) != parts; spins++)
        if (spins % 64 == 0) sched_yield(); else _mm_pause();
    pthread_mutex_unlock(&pool_lock);
}

/* boundaries of `parts` parts over n items: equal counts, or (cost given) equal summed cost */
static void split(int n, int parts, const int64_t *cost, int *bounds) {
    int64_t total = 0;
    if (cost)
        for (int i = 0; i < n; i++) total += cost[i];
    bounds[0] = 0;
    if (total <= 0) {
        for (int p = 1; p <= parts; p++) bounds[p] = (int)((int64_t)n * p / parts);
        return;
    }
    int64_t run = 0;
    int i = 0;
    for (int p = 1; p < parts; p++) {
        /* take the next item while that brings the running sum nearer to this part's share */
        while (i < n && (2 * run + cost[i]) * parts <= 2 * total * p) run += cost[i++];
        bounds[p] = i;
    }
    bounds[parts] = n;
}

/* a few parts per thread (claimed as threads come free), at most one per item */
static int parts_for(int threads, int n) {
    int parts = threads < 2 ? 1 : 4 * threads;
    if (parts > n) parts = n;
    if (parts > MAX_PARTS) parts = MAX_PARTS;
    return parts < 1 ? 1 : parts;
}

/* y [M, N] = x [M, K] @ w [N, K]^T, all contiguous; columns split in blocks of 4 */
struct linear_args { const float *x, *w; float *y; int M, K, N; };

static void linear_part(const void *a, int lo, int hi) {
    const struct linear_args *l = a;
    linear_columns(l->x, l->M, l->K, l->w, l->N, l->y, 4 * lo, 4 * hi < l->N ? 4 * hi : l->N);
}

void stagger_linear(const float *x, int M, int K, const float *w, int N, float *y, int threads) {
    struct linear_args a = {x, w, y, M, K, N};
    int blocks = (N + 3) / 4, parts = parts_for(threads, blocks), bounds[MAX_PARTS + 1];
    split(blocks, parts, NULL, bounds);
    run_parts(linear_part, &a, bounds, parts, threads);
}

/* the routed experts of rows sorted by expert (see moe_experts), experts split by their cost:
 * reading an expert's weights is worth about 6 rows of its math here, an expert with no rows 0 */
struct moe_args { const float *xs, *w13, *w2; const int64_t *offsets; float *ys; int H, I; atomic_int failed; };

static void moe_part(const void *a, int lo, int hi) {
    struct moe_args *m = (struct moe_args *)a;
    if (moe_experts(m->xs, m->offsets, lo, hi, m->w13, m->w2, m->H, m->I, m->ys)) atomic_store(&m->failed, 1);
}

int stagger_moe_experts(const float *xs, const int64_t *offsets, int E, const float *w13, const float *w2,
                        int H, int I, float *ys, int threads) {
    struct moe_args a = {xs, w13, w2, offsets, ys, H, I, 0};
    int64_t *cost = calloc(E > 0 ? E : 1, sizeof(int64_t));
    if (!cost) return -1;
    for (int e = 0; e < E; e++) {
        int64_t rows = offsets[e + 1] - offsets[e];
        cost[e] = rows ? 6 + rows : 0;
    }
    int parts = parts_for(threads, E), bounds[MAX_PARTS + 1];
    split(E, parts, cost, bounds);
    free(cost);
    run_parts(moe_part, &a, bounds, parts, threads);
    return atomic_load(&a.failed) ? -1 : 0;
}

/* Absorbed MLA decode of n query tokens: token i is row tok[i] of q [T, H, D] and out [T, H, Dl],
 * attends the first rows[i] rows of sequence seq[i], whose pages are row seq[i] of `tables`
 * (row stride ld). Tokens split over the threads by their context length. */
struct mla_args {
    const float *q, *cache; const int32_t *tables, *tok, *seq, *rows; float *out;
    int H, D, page, ld, Dl; float scale; atomic_int failed;
};

static void mla_part(const void *a, int lo, int hi) {
    struct mla_args *m = (struct mla_args *)a;
    for (int i = lo; i < hi; i++) {
        size_t t = (size_t)m->tok[i];
        if (mla_decode(m->q + t * m->H * m->D, m->H, m->D, m->cache, m->tables + (size_t)m->seq[i] * m->ld,
                       m->page, m->rows[i], m->Dl, m->scale, m->out + t * m->H * m->Dl))
            atomic_store(&m->failed, 1);
    }
}

int stagger_mla_decode(const float *q, int H, int D, const float *cache, int page, const int32_t *tables, int ld,
                       int n, const int32_t *tok, const int32_t *seq, const int32_t *rows, int Dl, float scale,
                       float *out, int threads) {
    struct mla_args a = {q, cache, tables, tok, seq, rows, out, H, D, page, ld, Dl, scale, 0};
    int64_t *cost = calloc(n > 0 ? n : 1, sizeof(int64_t));
    if (!cost) return -1;
    for (int i = 0; i < n; i++) cost[i] = rows[i];
    int parts = parts_for(threads, n), bounds[MAX_PARTS + 1];
    split(n, parts, cost, bounds);
    free(cost);
    run_parts(mla_part, &a, bounds, parts, threads);
    return atomic_load(&a.failed) ? -1 : 0;
}

/* RMSNorm of the rows of x [rows, n]: y = w * (x / sqrt(mean(x^2) + eps)), the order torch uses.
 * With res, a row is first replaced by x + res, written to sum (the decoder layer's residual
 * stream). Serial: a decode step's rows are a few microseconds of work, and torch's op cost
 * about 40-100 us a call here (several kernels and their dispatch). */
void stagger_rms_norm(const float *x, const float *res, float *sum, const float *w, int rows, int n, float eps,
                      float *y) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * n;
        float *yr = y + (size_t)r * n;
        if (res) {
            float *s = sum + (size_t)r * n;
            const float *rr = res + (size_t)r * n;
            for (int k = 0; k < n; k++) s[k] = xr[k] + rr[k];
            xr = s;
        }
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, ss = 0.f;
        int k = 0;
        for (; k + 8 <= n; k += 8)
            for (int j = 0; j < 8; j++) acc[j] += xr[k + j] * xr[k + j];
        for (; k < n; k++) ss += xr[k] * xr[k];
        for (int j = 0; j < 8; j++) ss += acc[j];
        float inv = 1.f / sqrtf(ss / (float)n + eps);
        for (k = 0; k < n; k++) yr[k] = w[k] * (xr[k] * inv);
    }
}

/* Per head h < H: y[t, h, :N] = x[t, h, :K] @ w[h]^T for t < T, w [H, N, K] contiguous; row t of
 * head h of x at x + t * ldx + h * hx, of y at y + t * ldy + h * hy. The absorbed MLA projections,
 * read from the query as it lies and written into the attention's input: no bmm (MKL's small-row
 * batched GEMM read the 1 MB of a layer's weights at half the memory's speed), no transposes, no
 * cat. x is packed per head first (the GEMM reads rows of K); heads split over the threads.
 * Returns 0, or -1 when scratch memory cannot be had. */
struct heads_args { const float *xp, *w; float *y; int T, K, N, ldy, hy; };

static void heads_part(const void *a, int lo, int hi) {
    const struct heads_args *l = a;
    for (int h = lo; h < hi; h++)
        linear(l->xp + (size_t)h * l->T * l->K, l->T, l->K, l->w + (size_t)h * l->N * l->K, l->N,
               l->y + (size_t)h * l->hy, l->ldy);
}

int stagger_linear_heads(const float *x, int T, int H, int K, int ldx, int hx, const float *w, int N, float *y,
                         int ldy, int hy, int threads) {
    float *xp = malloc((size_t)T * H * K * sizeof(float) + sizeof(float));
    if (!xp) return -1;
    for (int h = 0; h < H; h++)
        for (int t = 0; t < T; t++)
            memcpy(xp + ((size_t)h * T + t) * K, x + (size_t)t * ldx + (size_t)h * hx, (size_t)K * sizeof(float));
    struct heads_args a = {xp, w, y, T, K, N, ldy, hy};
    int parts = parts_for(threads, H), bounds[MAX_PARTS + 1];
    split(H, parts, NULL, bounds);
    run_parts(heads_part, &a, bounds, parts, threads);
    free(xp);
    return 0;
}
