// The per-row paged attention of paged_attention.cpp, written once over a vector type and included
// twice there: in namespace avx2 (8 FP32 lanes, the file's -mavx2 -mfma) and in namespace avx512 (16
// lanes, under `#pragma GCC target`, called only where the CPU has AVX-512F). The including
// namespace defines V, kLanes and vload / vzero / vset1 / vfma / vmul / vsum / vstore (FP32 values,
// or BF16 ones widened exactly on load); kChunk, exp8 and the includes come from the including file.
// Per (query, key) and per output column, one accumulator and the same sequence of operations
// whatever the blocking and the thread split; the two widths sum a dot product in a different
// order, so their results differ by rounding only.
//
// Shapes: H heads, R kv_lora_rank, W = R + P cache width, Q = T * H queries of a row, n keys of a chunk.

// s[i * K + u] = q_i . key_u (W wide) for N <= 4 queries against K <= 2 key rows, each key vector
// loaded once for all N queries and each query vector once for the K keys
template <int N, int K, typename T>
inline void dots(const float* const* q, const T* const* k, int64_t W, float* const* s) {
  V acc[N][K];
  for (int i = 0; i < N; ++i)
    for (int u = 0; u < K; ++u) acc[i][u] = vzero();
  int64_t c = 0;
  for (; c + kLanes <= W; c += kLanes) {
    V kv[K];
    for (int u = 0; u < K; ++u) kv[u] = vload(k[u] + c);
    for (int i = 0; i < N; ++i) {
      const V qv = vload(q[i] + c);
      for (int u = 0; u < K; ++u) acc[i][u] = vfma(qv, kv[u], acc[i][u]);
    }
  }
  for (int i = 0; i < N; ++i)
    for (int u = 0; u < K; ++u) {
      float r = vsum(acc[i][u]);
      for (int64_t cc = c; cc < W; ++cc) r += q[i][cc] * dsv3::load1(k[u] + cc);
      *s[i * K + u] = r;
    }
}

// dots<4, 2> with its eight accumulators as named variables: the array form is written back to the
// stack on every step by GCC (8 stores per 8 FMAs, seen in perf annotate); the same operations per
// (query, key) as the template
template <typename T>
inline void dots42(const float* const* q, const T* const* k, int64_t W, float* const* s) {
  V a00 = vzero(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
  const float *q0 = q[0], *q1 = q[1], *q2 = q[2], *q3 = q[3];
  const T *k0 = k[0], *k1 = k[1];
  int64_t c = 0;
  for (; c + kLanes <= W; c += kLanes) {
    const V u = vload(k0 + c), v = vload(k1 + c);
    V x = vload(q0 + c);
    a00 = vfma(x, u, a00);
    a01 = vfma(x, v, a01);
    x = vload(q1 + c);
    a10 = vfma(x, u, a10);
    a11 = vfma(x, v, a11);
    x = vload(q2 + c);
    a20 = vfma(x, u, a20);
    a21 = vfma(x, v, a21);
    x = vload(q3 + c);
    a30 = vfma(x, u, a30);
    a31 = vfma(x, v, a31);
  }
  const V acc[8] = {a00, a01, a10, a11, a20, a21, a30, a31};
  for (int i = 0; i < 4; ++i)
    for (int u = 0; u < 2; ++u) {
      float r = vsum(acc[i * 2 + u]);
      for (int64_t cc = c; cc < W; ++cc) r += q[i][cc] * dsv3::load1(k[u] + cc);
      *s[i * 2 + u] = r;
    }
}

// the scores of queries i0 .. Q-1 against K key rows (chunk columns j .. j + K - 1), 4 queries at a time
template <int K, typename T>
inline void score_keys(const float* const* q, int64_t i0, int64_t Q, const T* const* k, int64_t W, float* sc,
                       int64_t j) {
  float* o[4 * K];
  int64_t i = i0;
  for (; i + 4 <= Q; i += 4) {
    for (int a = 0; a < 4; ++a)
      for (int u = 0; u < K; ++u) o[a * K + u] = sc + (i + a) * kChunk + j + u;
    if constexpr (K == 2)
      dots42(q + i, k, W, o);
    else
      dots<4, K>(q + i, k, W, o);
  }
  for (; i < Q; ++i) {
    for (int u = 0; u < K; ++u) o[u] = sc + i * kChunk + j + u;
    dots<1, K>(q + i, k, W, o);
  }
}

// o_i[0:R] = o_i * scale_i + sum_j p_i[j] k_j[0:R] over n keys, for N <= 2 queries: 4 vectors of
// columns at a time in registers, then one vector at a time, then scalars; each key tile loaded once
// for both queries
template <int N, typename T>
inline void accumulate(float* const* o, const float* scale, const float* const* p, const T* const* k, int64_t n,
                       int64_t R) {
  int64_t c = 0;
  for (; c + 4 * kLanes <= R; c += 4 * kLanes) {
    V a[N][4];
    for (int i = 0; i < N; ++i) {
      const V sc = vset1(scale[i]);
      for (int v = 0; v < 4; ++v) a[i][v] = vmul(vload(o[i] + c + kLanes * v), sc);
    }
    for (int64_t j = 0; j < n; ++j) {
      const V k0 = vload(k[j] + c), k1 = vload(k[j] + c + kLanes), k2 = vload(k[j] + c + 2 * kLanes),
              k3 = vload(k[j] + c + 3 * kLanes);
      for (int i = 0; i < N; ++i) {
        const V pj = vset1(p[i][j]);
        a[i][0] = vfma(pj, k0, a[i][0]);
        a[i][1] = vfma(pj, k1, a[i][1]);
        a[i][2] = vfma(pj, k2, a[i][2]);
        a[i][3] = vfma(pj, k3, a[i][3]);
      }
    }
    for (int i = 0; i < N; ++i)
      for (int v = 0; v < 4; ++v) vstore(o[i] + c + kLanes * v, a[i][v]);
  }
  for (; c + kLanes <= R; c += kLanes) {
    V a[N];
    for (int i = 0; i < N; ++i) a[i] = vmul(vload(o[i] + c), vset1(scale[i]));
    for (int64_t j = 0; j < n; ++j) {
      const V kj = vload(k[j] + c);
      for (int i = 0; i < N; ++i) a[i] = vfma(vset1(p[i][j]), kj, a[i]);
    }
    for (int i = 0; i < N; ++i) vstore(o[i] + c, a[i]);
  }
  for (; c < R; ++c)
    for (int i = 0; i < N; ++i) {
      float a = o[i][c] * scale[i];
      for (int64_t j = 0; j < n; ++j) a += p[i][j] * dsv3::load1(k[j] + c);
      o[i][c] = a;
    }
}

// one row b: its Q = T * H queries over its S = start + T keys
template <typename T>
void attend_row(const float* q, int64_t qs0, int64_t qs1, const T* pool, const T* fresh, const int64_t* table,
                int64_t block, int64_t start, int64_t Tn, int64_t H, int64_t W, int64_t R, float* out,
                std::vector<float>& work) {
  const int64_t Q = Tn * H, S = start + Tn;
  work.resize(Q * (kChunk + 2));
  float *sc = work.data(), *mx = sc + Q * kChunk, *sum = mx + Q;  // scores / probabilities per chunk
  std::fill(mx, mx + Q, -INFINITY);
  std::fill(sum, sum + Q, 0.f);
  std::fill(out, out + Q * R, 0.f);
  std::vector<const float*> qp(Q);
  std::vector<float*> op(Q);
  for (int64_t t = 0; t < Tn; ++t)
    for (int64_t h = 0; h < H; ++h) {
      qp[t * H + h] = q + t * qs0 + h * qs1;
      op[t * H + h] = out + (t * H + h) * R;
    }
  const T* keys[kChunk];
  float scale[2];
  auto key = [&](int64_t pos) {
    return pos < start ? pool + (table[pos / block] * block + pos % block) * W : fresh + (pos - start) * W;
  };
  for (int64_t j0 = 0; j0 < S; j0 += kChunk) {
    const int64_t n = std::min(kChunk, S - j0);
    for (int64_t j = 0; j < n; ++j) keys[j] = key(j0 + j);
    // the next chunk's keys into the cache while this one computes, one row per key scored (the
    // rows of scattered blocks: the hardware prefetcher starts over at every block, and a burst of
    // a whole chunk's lines at once overflows the miss buffers)
    const int64_t ahead = std::max<int64_t>(0, std::min(kChunk, S - j0 - kChunk));
    auto fetch = [&](int64_t j) {
      if (j >= ahead) return;
      const char* r = reinterpret_cast<const char*>(key(j0 + kChunk + j));
      for (int64_t b = 0; b < W * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(r + b, _MM_HINT_T1);
    };
    // scores: key j against every query that sees it (query t sees positions <= start + t); two
    // cached keys at a time (every query sees them), the new ones one by one
    int64_t j = 0;
    for (; j + 2 <= n && j0 + j + 1 < start; j += 2) {
      fetch(j);
      fetch(j + 1);
      score_keys<2>(qp.data(), 0, Q, keys + j, W, sc, j);
    }
    for (; j < n; ++j) {
      fetch(j);
      const int64_t t0 = std::max<int64_t>(0, j0 + j - start);  // the first token that sees it
      for (int64_t i = 0; i < t0 * H; ++i) sc[i * kChunk + j] = -INFINITY;
      score_keys<1>(qp.data(), t0 * H, Q, keys + j, W, sc, j);
    }
    // the online softmax step, then probabilities x latents, two queries at a time
    const int64_t n8 = (n + 7) & ~int64_t{7};
    for (int64_t i = 0; i < Q; i += 2) {
      const int nq = std::min<int64_t>(2, Q - i);
      const float* pr[2];
      float* o2[2];
      for (int u = 0; u < nq; ++u) {
        float* s = sc + (i + u) * kChunk;
        std::fill(s + n, s + n8, -INFINITY);
        float m = mx[i + u];
        for (int64_t c = 0; c < n; ++c) m = std::max(m, s[c]);
        if (m == -INFINITY) {  // no key of this chunk visible yet: nothing changes
          scale[u] = 1.f;
          std::fill(s, s + n, 0.f);
        } else {
          scale[u] = std::exp(mx[i + u] - m);  // 0 on the first chunk (mx = -inf)
          const __m256 mv = _mm256_set1_ps(m);
          for (int64_t c = 0; c < n8; c += 8) _mm256_storeu_ps(s + c, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + c), mv)));
          float add = 0.f;
          for (int64_t c = 0; c < n; ++c) add += s[c];
          sum[i + u] = sum[i + u] * scale[u] + add;
          mx[i + u] = m;
        }
        pr[u] = s;
        o2[u] = op[i + u];
      }
      if (nq == 2)
        accumulate<2>(o2, scale, pr, keys, n, R);
      else
        accumulate<1>(o2, scale, pr, keys, n, R);
    }
  }
  for (int64_t i = 0; i < Q; ++i) {
    const float inv = 1.f / sum[i];
    for (int64_t c = 0; c < R; ++c) op[i][c] *= inv;
  }
}
