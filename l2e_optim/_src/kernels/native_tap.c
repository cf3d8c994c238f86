/* The tap's backward for one site and micro-batch as one C loop (CPU): see native_tap.py.
 *
 * One pass over z and the incoming gradient (row-major [tokens, N], contiguous), writing the
 * outgoing gradient and adding the per-neuron sums. Per value, in fp32 and in this order (the
 * eager tap's math; no fused multiply-add, -ffp-contract=off):
 *
 *     d = z - mean;  d2 = d * d;  sel = d2 >= bar
 *     s1 += d;  s2 += d2;  count += sel
 *     out = grad + factor * ((sel ? d : 0) / (d2 + log_eps))
 *
 * Padding rows (valid <= 0) add nothing and pass their gradient through. Each thread owns a
 * stripe of neurons (columns) and adds its rows in order, so the sums are bit-identical for
 * every thread count and every instruction set the loop is cloned for (target_clones).
 * A NaN/inf reaches s2; the caller reads it there and discards the micro-batch.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define L2E_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define L2E_CLONES
#endif

enum { L2E_FLOAT32 = 0, L2E_BFLOAT16 = 1 };

typedef struct {
    int dtype;
    const void *z;
    const void *grad; /* NULL: statistics only */
    void *out;        /* NULL with grad */
    const float *valid; /* NULL: every row is a token */
    const float *mean;
    const float *bar;
    float *sums; /* [3N]: s1 | s2 | selected counts, added to */
    int64_t tokens, n, col0, col1;
    float factor, log_eps;
} l2e_job;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's cast */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define L2E_STRIPE(NAME, T, LOAD, STORE)                                                          \
    L2E_CLONES static void NAME(const l2e_job *job) {                                            \
        const int64_t n = job->n, c0 = job->col0, c1 = job->col1;                                 \
        const float *restrict mean = job->mean;                                                   \
        const float *restrict bar = job->bar;                                                     \
        float *restrict s1 = job->sums;                                                           \
        float *restrict s2 = job->sums + n;                                                       \
        float *restrict cnt = job->sums + 2 * n;                                                  \
        const float factor = job->factor, log_eps = job->log_eps;                                 \
        for (int64_t t = 0; t < job->tokens; ++t) {                                               \
            const T *restrict z = (const T *)job->z + t * n;                                      \
            const T *restrict g = job->grad ? (const T *)job->grad + t * n : 0;                   \
            T *restrict out = job->out ? (T *)job->out + t * n : 0;                               \
            if (job->valid && !(job->valid[t] > 0.0f)) {                                          \
                if (out) memcpy(out + c0, g + c0, (size_t)(c1 - c0) * sizeof(T));                 \
                continue;                                                                         \
            }                                                                                     \
            if (out) {                                                                            \
                for (int64_t j = c0; j < c1; ++j) {                                               \
                    const float d = LOAD(z[j]) - mean[j];                                         \
                    const float d2 = d * d;                                                       \
                    const float sel = d2 >= bar[j] ? 1.0f : 0.0f;                                 \
                    s1[j] += d;                                                                   \
                    s2[j] += d2;                                                                  \
                    cnt[j] += sel;                                                                \
                    out[j] = STORE(LOAD(g[j]) + factor * ((d * sel) / (d2 + log_eps)));          \
                }                                                                                 \
            } else {                                                                              \
                for (int64_t j = c0; j < c1; ++j) {                                               \
                    const float d = LOAD(z[j]) - mean[j];                                         \
                    const float d2 = d * d;                                                       \
                    s1[j] += d;                                                                   \
                    s2[j] += d2;                                                                  \
                    cnt[j] += d2 >= bar[j] ? 1.0f : 0.0f;                                         \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

#define L2E_SAME(x) (x)
L2E_STRIPE(l2e_stripe_f32, float, L2E_SAME, L2E_SAME)
L2E_STRIPE(l2e_stripe_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

static void *l2e_run(void *arg) {
    const l2e_job *job = (const l2e_job *)arg;
    if (job->dtype == L2E_BFLOAT16)
        l2e_stripe_bf16(job);
    else
        l2e_stripe_f32(job);
    return 0;
}

/* Returns 0, or -1 for an unknown dtype. threads > 1 splits the neurons into stripes of
 * multiples of 16 columns, one per thread (the calling thread takes the first). */
int l2e_tap(int dtype, const void *z, const void *grad, void *out, const float *valid, const float *mean,
            const float *bar, float *sums, int64_t tokens, int64_t n, float factor, float log_eps, int threads) {
    enum { MAX_THREADS = 64 };
    l2e_job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    if (dtype != L2E_FLOAT32 && dtype != L2E_BFLOAT16) return -1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > (n + 15) / 16) threads = (int)((n + 15) / 16);
    if (threads < 1) threads = 1;
    const int64_t stripe = ((n + threads - 1) / threads + 15) / 16 * 16;
    for (int i = 0; i < threads; ++i) {
        l2e_job job = {dtype, z, grad, out, valid, mean, bar, sums, tokens, n, 0, 0, factor, log_eps};
        job.col0 = i * stripe < n ? i * stripe : n;
        job.col1 = (i + 1) * stripe < n ? (i + 1) * stripe : n;
        jobs[i] = job;
        started[i] = 0;
    }
    for (int i = 1; i < threads; ++i) started[i] = pthread_create(&ids[i], 0, l2e_run, &jobs[i]) == 0;
    l2e_run(&jobs[0]);
    for (int i = 1; i < threads; ++i) {
        if (started[i])
            pthread_join(ids[i], 0);
        else
            l2e_run(&jobs[i]); /* no thread to be had: this one does the stripe */
    }
    return 0;
}
