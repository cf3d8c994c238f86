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
 * A NaN/inf reaches s2, where l2e_site_tap finds it and discards the micro-batch.
 */
#include <float.h>
#include <math.h>
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

/* The loop takes its arrays as restrict parameters: GCC relies on restrict there (with the
 * same pointers as restrict locals it versioned the loop with run-time alias checks, and a
 * Pythia-70M site took 3x as long). One row's stripe [c0, c1) per call. */
#define L2E_ROW(NAME, T, LOAD, STORE)                                                             \
    L2E_CLONES static void NAME(const T *restrict z, const T *restrict g, T *restrict out,       \
                                const float *restrict mean, const float *restrict bar,            \
                                float *restrict s1, float *restrict s2, float *restrict cnt,      \
                                int64_t c0, int64_t c1, float factor, float log_eps) {            \
        if (out) {                                                                                \
            for (int64_t j = c0; j < c1; ++j) {                                                   \
                const float d = LOAD(z[j]) - mean[j];                                             \
                const float d2 = d * d;                                                           \
                const float sel = d2 >= bar[j] ? 1.0f : 0.0f;                                     \
                s1[j] += d;                                                                       \
                s2[j] += d2;                                                                      \
                cnt[j] += sel;                                                                    \
                out[j] = STORE(LOAD(g[j]) + factor * ((d * sel) / (d2 + log_eps)));              \
            }                                                                                     \
        } else {                                                                                  \
            for (int64_t j = c0; j < c1; ++j) {                                                   \
                const float d = LOAD(z[j]) - mean[j];                                             \
                const float d2 = d * d;                                                           \
                s1[j] += d;                                                                       \
                s2[j] += d2;                                                                      \
                cnt[j] += d2 >= bar[j] ? 1.0f : 0.0f;                                             \
            }                                                                                     \
        }                                                                                         \
    }

#define L2E_SAME(x) (x)
L2E_ROW(l2e_row_f32, float, L2E_SAME, L2E_SAME)
L2E_ROW(l2e_row_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

/* A stripe's rows; padding rows add nothing and pass their gradient through. */
static void l2e_stripe(const l2e_job *job) {
    const int64_t n = job->n, c0 = job->col0, c1 = job->col1;
    const size_t size = job->dtype == L2E_BFLOAT16 ? 2 : 4;
    float *s1 = job->sums, *s2 = job->sums + n, *cnt = job->sums + 2 * n;
    for (int64_t t = 0; t < job->tokens; ++t) {
        const char *z = (const char *)job->z + (size_t)(t * n) * size;
        const char *g = job->grad ? (const char *)job->grad + (size_t)(t * n) * size : 0;
        char *out = job->out ? (char *)job->out + (size_t)(t * n) * size : 0;
        if (job->valid && !(job->valid[t] > 0.0f)) {
            if (out) memcpy(out + c0 * size, g + c0 * size, (size_t)(c1 - c0) * size);
            continue;
        }
        if (job->dtype == L2E_BFLOAT16)
            l2e_row_bf16((const uint16_t *)z, (const uint16_t *)g, (uint16_t *)out, job->mean, job->bar, s1, s2,
                         cnt, c0, c1, job->factor, job->log_eps);
        else
            l2e_row_f32((const float *)z, (const float *)g, (float *)out, job->mean, job->bar, s1, s2, cnt, c0, c1,
                        job->factor, job->log_eps);
    }
}

static void *l2e_run(void *arg) {
    l2e_stripe((const l2e_job *)arg);
    return 0;
}

static void l2e_stripes(l2e_job job, int threads) {
    enum { MAX_THREADS = 64 };
    l2e_job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    const int64_t n = job.n;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > (n + 15) / 16) threads = (int)((n + 15) / 16);
    if (threads < 1) threads = 1;
    const int64_t stripe = ((n + threads - 1) / threads + 15) / 16 * 16;
    for (int i = 0; i < threads; ++i) {
        jobs[i] = job;
        jobs[i].col0 = i * stripe < n ? i * stripe : n;
        jobs[i].col1 = (i + 1) * stripe < n ? (i + 1) * stripe : n;
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
}

/* One site's whole backward for one micro-batch (pooled statistics, threshold retrieval), as
 * tap.py's eager and fused paths compute it, in the same fp32 operations:
 *
 *     bar = (seen ? tau : inf) * max(var + eps * var_mean, FLT_MIN)     (var_mean: torch's)
 *     tokens = sum(valid) or the row count;  factor = (1 / max(tokens, 1)) * coef2 * loss_scale
 *     the loop above into sums [3N] (zeroed here)
 *     finite = every s2 finite: acc += (s1, s2, tokens, selected count), else acc.nonfinite += 1
 *
 * acc: the site's accumulator [s1 (N) | s2 (N) | tokens | selected | nonfinite]; bar [N] and
 * sums [3N]: scratch. out (NULL: no penalty is due) receives the outgoing gradient, exactly the
 * incoming one for a non-finite micro-batch. Returns 0, or -1 for an unknown dtype. */
int l2e_site_tap(int dtype, const void *z, const void *grad, void *out, const float *valid, const float *mean,
                 const float *var, float var_mean, int seen, float tau, float eps, float *acc, float *bar,
                 float *sums, int64_t tokens, int64_t n, float coef2, float loss_scale, float log_eps,
                 int threads) {
    if (dtype != L2E_FLOAT32 && dtype != L2E_BFLOAT16) return -1;
    const float compensation = eps * var_mean;
    const float gate = seen ? tau : INFINITY;
    for (int64_t j = 0; j < n; ++j) {
        float denom = var[j] + compensation;
        if (denom < FLT_MIN) denom = FLT_MIN; /* clamp_min: a NaN stays NaN */
        bar[j] = gate * denom;
    }
    float rows = 0.0f;
    if (valid) {
        for (int64_t t = 0; t < tokens; ++t) rows += valid[t];
    } else {
        rows = (float)tokens;
    }
    const float factor = (1.0f / (rows > 1.0f ? rows : 1.0f)) * coef2 * loss_scale;
    memset(sums, 0, (size_t)(3 * n) * sizeof(float));
    l2e_job job = {dtype, z, out ? grad : 0, out, valid, mean, bar, sums, tokens, n, 0, n, factor, log_eps};
    l2e_stripes(job, threads);
    int finite = 1;
    int64_t selected = 0;
    for (int64_t j = 0; j < n; ++j) {
        finite &= isfinite(sums[n + j]) != 0;
        selected += (int64_t)sums[2 * n + j];
    }
    if (!finite) {
        acc[2 * n + 2] += 1.0f;
        if (out) memcpy(out, grad, (size_t)(tokens * n) * (dtype == L2E_BFLOAT16 ? 2 : 4));
        return 0;
    }
    for (int64_t j = 0; j < 2 * n; ++j) acc[j] += sums[j];
    acc[2 * n] += rows;
    acc[2 * n + 1] += (float)selected;
    return 0;
}
