// avx512 W8A8 kernels (placeholder: forwards to scalar until the SIMD path lands).
#include "kernels/int8_mm.h"

namespace qtorch::cpu::int8mm::avx512 {

void quantize_rows(const void* x, DType xt, int64_t K, int64_t ldx, int64_t m0, int64_t m1,
                   float* scale, int8_t* q, int64_t ldq, uint8_t* ap) {
  scalar::quantize_rows(x, xt, K, ldx, m0, m1, scale, q, ldq, ap);
}
void pack_a(const int8_t* a, int64_t K, int64_t lda, int64_t m0, int64_t m1, uint8_t* ap) {
  scalar::pack_a(a, K, lda, m0, m1, ap);
}
void gemm(const uint8_t* ap, int64_t K, const uint8_t* bp, int64_t N, int64_t m0, int64_t m1,
          int64_t p0, int64_t p1, const Epilogue& ep) {
  scalar::gemm(ap, K, bp, N, m0, m1, p0, p1, ep);
}

}  // namespace qtorch::cpu::int8mm::avx512
