#include "compress/linalg.h"

#include <cblas.h>

#include <algorithm>
#include <cstddef>

#include "absl/strings/str_cat.h"

// LAPACK's Fortran interface (OpenBLAS exports it); trailing size_t: the hidden lengths of the
// character arguments (gfortran ABI).
extern "C" {
void dgesdd_(const char* jobz, const int* m, const int* n, double* a, const int* lda, double* s,
             double* u, const int* ldu, double* vt, const int* ldvt, double* work,
             const int* lwork, int* iwork, int* info, size_t jobz_len);
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info,
             size_t uplo_len);
void dtrtrs_(const char* uplo, const char* trans, const char* diag, const int* n, const int* nrhs,
             const double* a, const int* lda, double* b, const int* ldb, int* info,
             size_t uplo_len, size_t trans_len, size_t diag_len);
}

namespace lorc::compress {

// A row-major [r, c] buffer is the column-major [c, r] matrix of its transpose. So LAPACK sees
// a^T: a^T = V S U^T, and with jobz = 'S' its "U" output (column-major [cols, k]) read row-major
// is Vt [k, cols], its "VT" output (column-major [k, rows]) read row-major is U [rows, k].
absl::StatusOr<Svd> ComputeSvd(const MatD& a) {
  const int m = static_cast<int>(a.cols), n = static_cast<int>(a.rows);
  const int k = std::min(m, n);
  std::vector<double> buf = a.v;
  Svd out;
  out.s.resize(static_cast<size_t>(k));
  out.vt = MatD(k, a.cols);
  out.u = MatD(a.rows, k);
  const int lda = m, ldu = m, ldvt = k;
  std::vector<int> iwork(static_cast<size_t>(8 * k));
  int info = 0, lwork = -1;
  double query = 0;
  dgesdd_("S", &m, &n, buf.data(), &lda, out.s.data(), out.vt.v.data(), &ldu, out.u.v.data(),
          &ldvt, &query, &lwork, iwork.data(), &info, 1);
  if (info != 0) return absl::InternalError(absl::StrCat("dgesdd workspace query: info ", info));
  lwork = static_cast<int>(query) + 1;
  std::vector<double> work(static_cast<size_t>(lwork));
  dgesdd_("S", &m, &n, buf.data(), &lda, out.s.data(), out.vt.v.data(), &ldu, out.u.v.data(),
          &ldvt, work.data(), &lwork, iwork.data(), &info, 1);
  if (info != 0) {
    return absl::InternalError(absl::StrCat("dgesdd on a ", a.rows, " x ", a.cols,
                                            " matrix: info ", info));
  }
  return out;
}

// c is symmetric, so its buffer is the same in both orders. dpotrf 'U' gives c = U^T U with U
// upper (column-major); read row-major that buffer is U^T = L, lower.
absl::StatusOr<MatD> CholeskyLower(const MatD& c) {
  MatD l = c;
  const int n = static_cast<int>(c.rows);
  int info = 0;
  dpotrf_("U", &n, l.v.data(), &n, &info, 1);
  if (info > 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Cholesky: the ", n, " x ", n, " matrix is not positive definite (leading minor ", info,
        ")"));
  }
  if (info < 0) return absl::InternalError(absl::StrCat("dpotrf: info ", info));
  for (int64_t i = 0; i < l.rows; ++i) {
    for (int64_t j = i + 1; j < l.cols; ++j) l.at(i, j) = 0;
  }
  return l;
}

// X L = b  <=>  L^T X^T = b^T. Column-major, the row-major buffer of l is L^T (upper) and that of
// b is b^T [n, m]; the solution overwrites it as X^T column-major = X row-major.
absl::StatusOr<MatD> RightSolveLower(const MatD& b, const MatD& l) {
  MatD x = b;
  const int n = static_cast<int>(l.rows), nrhs = static_cast<int>(b.rows);
  int info = 0;
  dtrtrs_("U", "N", "N", &n, &nrhs, l.v.data(), &n, x.v.data(), &n, &info, 1, 1, 1);
  if (info != 0) return absl::InternalError(absl::StrCat("dtrtrs: info ", info));
  return x;
}

MatD MatMul(const MatD& a, const MatD& b) {
  MatD c(a.rows, b.cols);
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(a.rows),
              static_cast<int>(b.cols), static_cast<int>(a.cols), 1.0, a.v.data(),
              static_cast<int>(a.cols), b.v.data(), static_cast<int>(b.cols), 0.0, c.v.data(),
              static_cast<int>(c.cols));
  return c;
}

MatD Transpose(const MatD& a) {
  MatD t(a.cols, a.rows);
  for (int64_t i = 0; i < a.rows; ++i) {
    for (int64_t j = 0; j < a.cols; ++j) t.at(j, i) = a.at(i, j);
  }
  return t;
}

double FrobeniusSq(const MatD& a) {
  double s = 0;
  for (double x : a.v) s += x * x;
  return s;
}

}  // namespace lorc::compress
