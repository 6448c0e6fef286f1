/*
 * C kernels of the NeuRLP solver (torchmech.mnn): the banded Cholesky of method="native", whole batch at once,
 * and the implicit backward's input gradients (tm_objective_grads, at the end).
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
 * Row i of the Cholesky factor, in place in the group's band A (rows above it already factorised): L[i, k] =
 * (M[i, k] - sum_p L[i, p] L[k, p]) / L[k, k] for k = i - kd .. i - 1, then the pivot L_ii^2, its square root and
 * inverse (Iv). mp: the lanes' smallest pivots so far (NaN sticks).
 */
static inline void chol_row(double *restrict A, double *restrict Iv, int64_t i, int64_t kd, double *mp) {
    const int64_t w = (kd + 1) * V, d0 = i < kd ? i : kd;
    double *restrict ri = A + i * w;
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
            pack_row(A + i * w, g, lanes, t, c, n, nblk, blk, str, s, sstr);
            chol_row(A, Iv, i, kd, mp);
        }
        for (int v = 0; v < V; v++) minpiv[g * V + v] = mp[v];
    }
}

/*
 * The normal equations A^T W A z = A^T W y of a problem without the slack, assembled straight into the lane
 * layout: ab (G, N, kd + 1, V) receives the lower band of M (unscaled; kd = 3 n - 1 with central rows and
 * T >= 3, else 2 n - 1), b (B, T, n) contiguous the right-hand side A^T W y. Inputs as for tm_objective_grads
 * (dims, in = {c, rhs, init, h, we, wi, ws, C}, st = strides {c: 5, rhs: 3, init: 4, h: 2, we, wi, ws}).
 * Every row of A adds w^2 a a^T over its few non-zeros: equation rows at one grid point, initial rows on the
 * diagonal, per variable the 2 (K - 1) Taylor rows of an interval (their Gram w^2 hp hp^T (C^T C)) and the central
 * row across three points. Padding lanes get the identity.
 */
void tm_assemble(const int64_t *dims, const double *const *in, const int64_t *st, double *ab, double *bvec) {
    const int64_t B = dims[0], T = dims[1], E = dims[2], D = dims[3], K = dims[4], T0 = dims[5], K0 = dims[6];
    const int central = dims[7] && T >= 3;
    const double *c = in[0], *rhs = in[1], *init = in[2], *h = in[3], *we = in[4], *wi = in[5], *ws = in[6];
    const double *C = in[7];
    const int64_t *cs = st, *rs = st + 5, *is = st + 8, *hs = st + 12;
    const int64_t wes = st[14], wis = st[15], wss = st[16];
    const int64_t n = D * K, N = T * n, kd = (central ? 3 : 2) * n - 1, G = (B + V - 1) / V, R = 2 * (K - 1);
    double A[2 * K][2 * K];
    int64_t loc[2 * K]; /* a Taylor row's local unknown l -> its row offset from (t, d, 0) */
    for (int64_t l = 0; l < 2 * K; l++) loc[l] = l < K ? l : n + l - K;
    for (int64_t l1 = 0; l1 < 2 * K; l1++)
        for (int64_t l2 = 0; l2 < 2 * K; l2++) {
            double acc = 0.0;
            for (int64_t r = 0; r < R; r++) acc += C[r * 2 * K + l1] * C[r * 2 * K + l2];
            A[l1][l2] = acc;
        }
#define M_AT(i, j) (Ag + ((i) * (kd + 1) + (i) - (j)) * V) /* the V lanes of M[i, j], i >= j */
    /* group by group, grid point by grid point, the lanes innermost: every update is one vector operation, and
       the few band rows a grid point's rows touch stay in cache */
    double we2[V], wi2[V], ws2[V], hq[2 * K][V], av[n > 0 ? n : 1][V], y[V], val[3][V];
    for (int64_t g = 0; g < G; g++) {
        double *restrict Ag = ab + g * N * (kd + 1) * V;
        const int64_t lanes = B - g * V < V ? B - g * V : V;
        memset(Ag, 0, (size_t)(N * (kd + 1) * V) * sizeof(double));
        for (int64_t v = lanes; v < V; v++) /* padding lanes: the identity */
            for (int64_t i = 0; i < N; i++) M_AT(i, i)[v] = 1.0;
        for (int64_t v = 0; v < lanes; v++) {
            const int64_t bb = g * V + v;
            we2[v] = we[bb * wes] * we[bb * wes];
            wi2[v] = wi[bb * wis] * wi[bb * wis];
            ws2[v] = ws[bb * wss] * ws[bb * wss];
            for (int64_t i = 0; i < N; i++) bvec[bb * N + i] = 0.0;
        }
        for (int64_t v = lanes; v < V; v++) we2[v] = wi2[v] = ws2[v] = 0.0;
        for (int64_t t = 0; t < T; t++) {
            const int64_t base = t * n;
            for (int64_t e = 0; e < E; e++) {
                for (int64_t v = 0; v < V; v++) {
                    const int64_t bb = g * V + (v < lanes ? v : 0);
                    const double *ce = c + bb * cs[0] + t * cs[1] + e * cs[2];
                    for (int64_t d = 0; d < D; d++)
                        for (int64_t k = 0; k < K; k++) av[d * K + k][v] = ce[d * cs[3] + k * cs[4]];
                    y[v] = we2[v] * rhs[bb * rs[0] + t * rs[1] + e * rs[2]];
                }
                for (int64_t q1 = 0; q1 < n; q1++) {
                    for (int64_t q2 = 0; q2 <= q1; q2++) {
                        double *m = M_AT(base + q1, base + q2);
                        for (int v = 0; v < V; v++) m[v] += we2[v] * av[q1][v] * av[q2][v];
                    }
                    for (int64_t v = 0; v < lanes; v++) bvec[(g * V + v) * N + base + q1] += av[q1][v] * y[v];
                }
            }
            if (t < T0)
                for (int64_t d = 0; d < D; d++)
                    for (int64_t k = 0; k < K0; k++) {
                        double *m = M_AT(base + d * K + k, base + d * K + k);
                        for (int v = 0; v < V; v++) m[v] += wi2[v];
                        for (int64_t v = 0; v < lanes; v++) {
                            const int64_t bb = g * V + v;
                            bvec[bb * N + base + d * K + k] +=
                                wi2[v] * init[bb * is[0] + t * is[1] + d * is[2] + k * is[3]];
                        }
                    }
            if (t + 1 >= T) continue;
            for (int64_t v = 0; v < V; v++) {
                const double ht = h[(g * V + (v < lanes ? v : 0)) * hs[0] + t * hs[1]];
                double pw = 1.0;
                for (int64_t j = 0; j < K; j++, pw *= ht) hq[j][v] = hq[K + j][v] = pw;
            }
            for (int64_t d = 0; d < D; d++)
                for (int64_t l1 = 0; l1 < 2 * K; l1++) {
                    /* local index l: (t, d, l) for l < K, (t + 1, d, l - K) after: increasing global rows, so the
                       pairs on or below the diagonal are l2 <= l1 */
                    const int64_t i1 = base + d * K + loc[l1];
                    for (int64_t l2 = 0; l2 <= l1; l2++) {
                        double *m = M_AT(i1, base + d * K + loc[l2]);
                        const double a12 = A[l1][l2];
                        for (int v = 0; v < V; v++) m[v] += ws2[v] * hq[l1][v] * hq[l2][v] * a12;
                    }
                }
            if (!central || t + 2 >= T) continue;
            for (int64_t v = 0; v < V; v++) {
                const int64_t bb = g * V + (v < lanes ? v : 0);
                const double S = h[bb * hs[0] + t * hs[1]] + h[bb * hs[0] + (t + 1) * hs[1]];
                double lo = K == 2 ? 1.0 / S : 1.0;
                for (int64_t j = 3; j < K; j++) lo *= S;
                val[0][v] = lo;
                val[1][v] = lo * S;
                val[2][v] = -lo;
            }
            for (int64_t d = 0; d < D; d++) {
                const int64_t idx[3] = {base + d * K + K - 2, base + n + d * K + K - 1, base + 2 * n + d * K + K - 2};
                for (int p1 = 0; p1 < 3; p1++)
                    for (int p2 = 0; p2 <= p1; p2++) {
                        double *m = M_AT(idx[p1], idx[p2]);
                        for (int v = 0; v < V; v++) m[v] += ws2[v] * val[p1][v] * val[p2][v];
                    }
            }
        }
    }
#undef M_AT
}

/*
 * tm_band_factor for a band from tm_assemble: each row is scaled to the unit diagonal (s_i = M_ii^(-1/2), written
 * to s (B, N)) right before it is factorised, in place.
 */
void tm_band_factor_scaled(int64_t B, int64_t N, int64_t kd, double *ab, double *inv, double *s, double *minpiv) {
    const int64_t w = (kd + 1) * V, G = (B + V - 1) / V;
    double sc[V * (kd + 1)]; /* scales of rows i - kd .. i, a ring */
    /* (no restrict here: si and sj alias for d = 0, and chol_row reads row i through A after ri wrote it) */
    for (int64_t g = 0; g < G; g++) {
        const int64_t lanes = B - g * V < V ? B - g * V : V;
        double *A = ab + g * N * w;
        double *restrict Iv = inv + g * N * V;
        double mp[V];
        for (int v = 0; v < V; v++) mp[v] = INFINITY;
        for (int64_t i = 0; i < N; i++) {
            const int64_t d0 = i < kd ? i : kd;
            double *ri = A + i * w;
            double *si = sc + (i % (kd + 1)) * V;
            for (int v = 0; v < V; v++) si[v] = 1.0 / sqrt(ri[v]);
            for (int64_t d = 0; d <= d0; d++) {
                const double *sj = sc + ((i - d) % (kd + 1)) * V;
                for (int v = 0; v < V; v++) ri[d * V + v] *= si[v] * sj[v];
            }
            for (int64_t v = 0; v < lanes; v++) s[(g * V + v) * N + i] = si[v];
            chol_row(A, Iv, i, kd, mp);
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

/*
 * The gradients of -Phi, Phi = sum over rows of w^2 (a . lam)(a . u - y) - slack lam_eps (objective_cross in
 * system.py, written out there as objective_cross_grads, which this follows term by term), for every sample b:
 *
 *   dims = {B, T, E, D, K, T0, K0, central}
 *   in   = {lam, u (B, T, D, K) contiguous; c (B, T, E, D, K); rhs (B, T, E); init (B, T0, D, K0); h (B, T-1);
 *           we, wi, ws (B); le, e (B) or NULL without a slack; C (2(K-1), 2K) the Taylor constant, row-major}
 *   st   = element strides {c: 5, rhs: 3, init: 4, h: 2, we, wi, ws} (0 along broadcast axes)
 *   out  = {gc (B, T, E, D, K), grhs (B, T, E), ginit (B, T0, D, K0), gh (B, T-1), gwe, gwi, gws (B)},
 *          contiguous, each NULL when not wanted.
 *
 * Each grid point is visited once: its equation and initial rows, then the Taylor rows of the interval that
 * starts there and the central row centred on the next point, reading lam and u where they lie.
 */
void tm_objective_grads(const int64_t *dims, const double *const *in, const int64_t *st, double *const *out) {
    const int64_t B = dims[0], T = dims[1], E = dims[2], D = dims[3], K = dims[4], T0 = dims[5], K0 = dims[6];
    const int central = dims[7] && T >= 3;
    const double *lam = in[0], *u = in[1], *c = in[2], *rhs = in[3], *init = in[4], *h = in[5];
    const double *we = in[6], *wi = in[7], *ws = in[8], *le = in[9], *ep = in[10], *C = in[11];
    const int64_t *cs = st, *rs = st + 5, *is = st + 8, *hs = st + 12;
    const int64_t wes = st[14], wis = st[15], wss = st[16];
    double *gc = out[0], *grhs = out[1], *ginit = out[2], *gh = out[3], *gwe = out[4], *gwi = out[5], *gws = out[6];
    const int64_t R = 2 * (K - 1), n = D * K;
    double hp[K], dpow[K], xa[2 * K], xb[2 * K], ta[R > 0 ? R : 1], tb[R > 0 ? R : 1];
    for (int64_t b = 0; b < B; b++) {
        const double w_e = we[b * wes], w_i = wi[b * wis], w_s = ws[b * wss];
        const double we2 = w_e * w_e, wi2 = w_i * w_i, ws2 = w_s * w_s;
        const double lb = le ? le[b] : 0.0, eb_ = ep ? ep[b] : 0.0;
        double acc_e = 0.0, acc_i = 0.0, acc_s = 0.0;
        double *ghb = gh ? gh + b * (T - 1) : NULL;
        if (ghb)
            for (int64_t t = 0; t < T - 1; t++) ghb[t] = 0.0;
        for (int64_t t = 0; t < T; t++) {
            const double *lt = lam + (b * T + t) * n, *ut = u + (b * T + t) * n;
            /* equation rows */
            for (int64_t e = 0; e < E; e++) {
                const double *ce = c + b * cs[0] + t * cs[1] + e * cs[2];
                double ea = 0.0, eb = 0.0;
                for (int64_t d = 0; d < D; d++)
                    for (int64_t k = 0; k < K; k++) {
                        const double ck = ce[d * cs[3] + k * cs[4]];
                        ea += ck * lt[d * K + k];
                        eb += ck * ut[d * K + k];
                    }
                eb -= rhs[b * rs[0] + t * rs[1] + e * rs[2]];
                acc_e += ea * eb;
                if (gc) {
                    double *g = gc + ((b * T + t) * E + e) * n;
                    for (int64_t j = 0; j < n; j++) g[j] = -we2 * (lt[j] * eb + ea * ut[j]);
                }
                if (grhs) grhs[(b * T + t) * E + e] = we2 * ea;
            }
            /* initial rows */
            if (t < T0)
                for (int64_t d = 0; d < D; d++)
                    for (int64_t k = 0; k < K0; k++) {
                        const double la = lt[d * K + k];
                        acc_i += la * (ut[d * K + k] - init[b * is[0] + t * is[1] + d * is[2] + k * is[3]]);
                        if (ginit) ginit[((b * T0 + t) * D + d) * K0 + k] = wi2 * la;
                    }
            if (t + 1 >= T) continue;
            /* Taylor rows of interval t: C [hp x_t, hp x_{t+1}] (+ the slack) */
            const double ht = h[b * hs[0] + t * hs[1]];
            hp[0] = 1.0;
            dpow[0] = 0.0;
            for (int64_t j = 1; j < K; j++) {
                hp[j] = hp[j - 1] * ht;
                dpow[j] = (double)j * hp[j - 1];
            }
            const double *l1 = lt + n, *u1 = ut + n;
            double g_h = 0.0;
            for (int64_t d = 0; d < D; d++) {
                for (int64_t j = 0; j < K; j++) {
                    xa[j] = hp[j] * lt[d * K + j];
                    xa[K + j] = hp[j] * l1[d * K + j];
                    xb[j] = hp[j] * ut[d * K + j];
                    xb[K + j] = hp[j] * u1[d * K + j];
                }
                for (int64_t r = 0; r < R; r++) {
                    double sa = lb, sb = eb_;
                    for (int64_t j = 0; j < 2 * K; j++) {
                        sa += C[r * 2 * K + j] * xa[j];
                        sb += C[r * 2 * K + j] * xb[j];
                    }
                    ta[r] = sa;
                    tb[r] = sb;
                    acc_s += sa * sb;
                }
                if (ghb)
                    for (int64_t j = 1; j < K; j++) {
                        double g = 0.0;
                        for (int64_t r = 0; r < R; r++) {
                            const double c0 = C[r * 2 * K + j], c1 = C[r * 2 * K + K + j];
                            g += ta[r] * (c0 * ut[d * K + j] + c1 * u1[d * K + j])
                                 + tb[r] * (c0 * lt[d * K + j] + c1 * l1[d * K + j]);
                        }
                        g_h += g * dpow[j];
                    }
            }
            if (ghb) ghb[t] += ws2 * g_h;
            /* central row of t: lo (x_t[K-2] - x_{t+2}[K-2]) + hi x_{t+1}[K-1] - slack, S = h_t + h_{t+1} */
            if (!central || t + 2 >= T) continue;
            const double S = ht + h[b * hs[0] + (t + 1) * hs[1]];
            double lo = 1.0;
            if (K == 2) lo = 1.0 / S;
            for (int64_t j = 3; j < K; j++) lo *= S;
            const double hi = lo * S;
            const double *l2 = lt + 2 * n, *u2 = ut + 2 * n;
            double g_lo = 0.0, g_hi = 0.0;
            for (int64_t d = 0; d < D; d++) {
                const double da = lt[d * K + K - 2] - l2[d * K + K - 2], db = ut[d * K + K - 2] - u2[d * K + K - 2];
                const double ma = l1[d * K + K - 1], mb = u1[d * K + K - 1];
                const double ca = lo * da + hi * ma - lb, cb = lo * db + hi * mb - eb_;
                acc_s += ca * cb;
                g_lo += ca * db + cb * da;
                g_hi += ca * mb + cb * ma;
            }
            if (ghb) {
                const double gS = ws2 * (g_lo * ((double)(K - 3) * lo / S) + g_hi * ((double)(K - 2) * hi / S));
                ghb[t] += gS;
                ghb[t + 1] += gS;
            }
        }
        if (ghb)
            for (int64_t t = 0; t < T - 1; t++) ghb[t] = -ghb[t];
        if (gwe) gwe[b] = -2.0 * w_e * acc_e;
        if (gwi) gwi[b] = -2.0 * w_i * acc_i;
        if (gws) gws[b] = -2.0 * w_s * acc_s;
    }
}
