// Dense fp64 linear algebra for the offline compressor: row-major matrices and thin wrappers over
// LAPACK's Fortran interface in OpenBLAS (dgesdd_, dpotrf_, dtrtrs_). The LAPACKE C headers are
// not installed on the build images, so the Fortran symbols are declared in linalg.cc; the
// row-major <-> column-major mapping is explained there.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace lorc::compress {

// Row-major fp64 matrix [rows, cols].
struct MatD {
  int64_t rows = 0, cols = 0;
  std::vector<double> v;
  MatD() = default;
  MatD(int64_t r, int64_t c) : rows(r), cols(c), v(static_cast<size_t>(r * c), 0.0) {}
  double& at(int64_t r, int64_t c) { return v[static_cast<size_t>(r * cols + c)]; }
  double at(int64_t r, int64_t c) const { return v[static_cast<size_t>(r * cols + c)]; }
};

// Thin SVD a = U diag(s) Vt with k = min(rows, cols): U [rows, k], s [k] descending, Vt [k, cols].
struct Svd {
  MatD u;
  std::vector<double> s;
  MatD vt;
};
// Internal on LAPACK failure (info named).
absl::StatusOr<Svd> ComputeSvd(const MatD& a);

// Lower-triangular L with c = L L^T (c symmetric positive definite [n, n]); the strict upper
// triangle of the result is zero. FailedPrecondition when c is not positive definite.
absl::StatusOr<MatD> CholeskyLower(const MatD& c);

// X = b L^-1 for lower-triangular l [n, n] and b [m, n] (so X L = b), through dtrtrs.
absl::StatusOr<MatD> RightSolveLower(const MatD& b, const MatD& l);

// a [m, k] * b [k, n] (cblas_dgemm).
MatD MatMul(const MatD& a, const MatD& b);

// a^T.
MatD Transpose(const MatD& a);

// Squared Frobenius norm.
double FrobeniusSq(const MatD& a);

}  // namespace lorc::compress
