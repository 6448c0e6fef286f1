/*
 * Banded Cholesky of the NeuRLP normal matrix for a whole batch at once (torchmech.mnn, method="native").
 *
 * Compiled by torchmech/mnn/linalg/native.py with the system's C compiler at first use; plain C99, no Python
 * or torch headers, called through ctypes with raw pointers.
 *
 * Layout: the samples of the batch are lanes, in groups of V. Group g holds lanes g*V .. g*V+V-1, and its
 * lower band is ab[((g*N + i)*(kd + 1) + d)*V + v] = M[i, i - d] of lane g*V + v, for rows i < N and
 * 0 <= d <= kd. Every scalar step of the factorisation or the substitutions then works on V lanes at once,
 * which the compiler turns into vector instructions, and each group is one contiguous stream. Lanes past the
 * batch are padded with the identity.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define V 8

/*
 * Row i = t n + c of the lower band of the Jacobi-scaled matrix S M S, for the lanes of group g, into
 * A[d*V + v] (d = 0 .. kd). blk[k] (k < nblk) holds the blocks M[t, t+k] (T - k of them per sample); entry
 * (b, t, a, c) of blk[k] is at b*str[4k] + t*str[4k+1] + a*str[4k+2] + c*str[4k+3], and s's entry (b, t, a) at
 * b*sstr[0] + t*sstr[1] + a*sstr[2] (strides in elements, so broadcast or transposed views need no copy).
 * Entries outside the matrix or between steps nblk or more apart are zeros; padding lanes hold the identity.
 */
static void pack_row(double *restrict A, int64_t g, int64_t lanes, int64_t t, int64_t c, int64_t n, int64_t nblk,
                     const double *const *blk, const int64_t *str, const double *s, const int64_t *sstr) {
    const int64_t kd = nblk * n - 1, sb = sstr[0];
    const double *si = s + t * sstr[1] + c * sstr[2];
    /* column j = i - d walks back from i: step tj, entry a within the step (no divisions) */
    for (int64_t d = 0, tj = t, a = c; d <= kd; d++, A += V, tj -= (a == 0), a = a ? a - 1 : n - 1) {
        const int64_t k = t - tj;
        if (tj < 0 || k >= nblk) {
            for (int v = 0; v < V; v++) A[v] = 0.0;
            continue;
        }
        /* M[j, i] = blk[k][tj][a][c] (row j's block is the upper one): S M S entry s_j m s_i */
        const double *M = blk[k] + tj * str[4 * k + 1] + a * str[4 * k + 2] + c * str[4 * k + 3];
        const double *sj = s + tj * sstr[1] + a * sstr[2];
        const int64_t mb = str[4 * k];
        int64_t v = 0;
        for (; v < lanes; v++) {
            const int64_t b = g * V + v;
            A[v] = sj[b * sb] * M[b * mb] * si[b * sb];
        }
        for (; v < V; v++) A[v] = d == 0 ? 1.0 : 0.0;
    }
}

/*
 * The Cholesky factor L of S M S for B samples of T steps with n unknowns each (blocks as in pack_row):
 * ab (G, N, kd + 1, V) receives the lower band of L (kd = nblk n - 1), inv (G, N, V) 1 / L[i, i], and
 * minpiv[lane] the smallest pivot L_ii^2 of the lane (NaN if a pivot was NaN; a non-positive pivot leaves NaN or
 * infinite entries behind it, which the caller's check of minpiv catches first). Each row of M is gathered
 * right before it is factorised (row-oriented Cholesky reads only the kd rows above), so the band is written
 * once instead of being packed in one pass and factorised in another.
 */
void tm_band_factor(int64_t B, int64_t T, int64_t n, int64_t nblk, const double *const *blk, const int64_t *str,
                    const double *s, const int64_t *sstr, double *ab, double *inv, double *minpiv) {
    const int64_t kd = nblk * n - 1, N = T * n, G = (B + V - 1) / V, w = (kd + 1) * V;
    for (int64_t g = 0; g < G; g++) {
        const int64_t lanes = B - g * V < V ? B - g * V : V;
        double *restrict A = ab + g * N * w;
        double *restrict Iv = inv + g * N * V;
        double mp[V];
        for (int v = 0; v < V; v++) mp[v] = INFINITY;
        for (int64_t i = 0, t = 0, c = 0; i < N; i++, t += (c == n - 1), c = (c == n - 1) ? 0 : c + 1) {
            const int64_t d0 = i < kd ? i : kd;
            double *restrict ri = A + i * w;
            pack_row(ri, g, lanes, t, c, n, nblk, blk, str, s, sstr);
            /* L[i, k] = (M[i, k] - sum_p L[i, p] L[k, p]) / L[k, k], for k = i - d0 .. i - 1 */
            for (int64_t d = d0; d >= 1; d--) {
                const int64_t k = i - d;
                const double *restrict rk = A + k * w;
                double acc[V];
                for (int v = 0; v < V; v++) acc[v] = ri[d * V + v];
                for (int64_t p = i - d0; p < k; p++) {
                    const double *restrict x = ri + (i - p) * V;
                    const double *restrict y = rk + (k - p) * V;
                    for (int v = 0; v < V; v++) acc[v] -= x[v] * y[v];
                }
                for (int v = 0; v < V; v++) ri[d * V + v] = acc[v] * Iv[k * V + v];
            }
            double acc[V];
            for (int v = 0; v < V; v++) acc[v] = ri[v];
            for (int64_t p = i - d0; p < i; p++) {
                const double *restrict x = ri + (i - p) * V;
                for (int v = 0; v < V; v++) acc[v] -= x[v] * x[v];
            }
            for (int v = 0; v < V; v++) {
                const double piv = acc[v];
                mp[v] = (piv < mp[v] || piv != piv) ? piv : mp[v];
                const double r = sqrt(piv);
                ri[v] = r;
                Iv[i * V + v] = 1.0 / r;
            }
        }
        for (int v = 0; v < V; v++) minpiv[g * V + v] = mp[v];
    }
}

/*
 * x = M^{-1} r for the factor of tm_band_factor. r is (B, N, c) with strides rstr (elements), out is (B, N, c)
 * contiguous (it may be r itself when r is contiguous); work holds N*c*V doubles.
 */
void tm_band_solve(const double *ab, const double *inv, int64_t B, int64_t N, int64_t kd, int64_t c,
                   const double *r, const int64_t *rstr, double *out, double *work) {
    const int64_t w = (kd + 1) * V, cv = c * V, G = (B + V - 1) / V;
    for (int64_t g = 0; g < G; g++) {
        const double *restrict A = ab + g * N * w;
        const double *restrict Iv = inv + g * N * V;
        double *restrict X = work;
        const int64_t lanes = B - g * V < V ? B - g * V : V;
        if (lanes < V) memset(X, 0, (size_t)(N * cv) * sizeof(double));
        for (int64_t v = 0; v < lanes; v++) {
            const double *rb = r + (g * V + v) * rstr[0];
            for (int64_t i = 0; i < N; i++)
                for (int64_t j = 0; j < c; j++) X[i * cv + j * V + v] = rb[i * rstr[1] + j * rstr[2]];
        }
        for (int64_t i = 0; i < N; i++) { /* L y = r */
            const int64_t d0 = i < kd ? i : kd;
            const double *restrict ri = A + i * w;
            for (int64_t j = 0; j < c; j++) {
                double acc[V];
                for (int v = 0; v < V; v++) acc[v] = X[i * cv + j * V + v];
                for (int64_t d = 1; d <= d0; d++) {
                    const double *restrict l = ri + d * V;
                    const double *restrict y = X + (i - d) * cv + j * V;
                    for (int v = 0; v < V; v++) acc[v] -= l[v] * y[v];
                }
                for (int v = 0; v < V; v++) X[i * cv + j * V + v] = acc[v] * Iv[i * V + v];
            }
        }
        for (int64_t i = N - 1; i >= 0; i--) { /* L^T x = y */
            const int64_t q1 = i + kd < N - 1 ? i + kd : N - 1;
            for (int64_t j = 0; j < c; j++) {
                double acc[V];
                for (int v = 0; v < V; v++) acc[v] = X[i * cv + j * V + v];
                for (int64_t q = i + 1; q <= q1; q++) {
                    const double *restrict l = A + q * w + (q - i) * V;
                    const double *restrict x = X + q * cv + j * V;
                    for (int v = 0; v < V; v++) acc[v] -= l[v] * x[v];
                }
                for (int v = 0; v < V; v++) X[i * cv + j * V + v] = acc[v] * Iv[i * V + v];
            }
        }
        for (int64_t v = 0; v < lanes; v++) {
            double *ob = out + (g * V + v) * N * c;
            for (int64_t i = 0; i < N; i++)
                for (int64_t j = 0; j < c; j++) ob[i * c + j] = X[i * cv + j * V + v];
        }
    }
}
