/* The GPU bundle's libopenblas.so.0 (scripts/gpu/pack.sh): the device carry is limited to 64 MiB
 * with the tree, and Debian's OpenBLAS (kernels for every x86 CPU, plus libgfortran) takes 8 MB of
 * it compressed. On the GPU host the CPU backend only serves as the parity tests' reference, so
 * this stand-in answers OpenBLAS's own calls and lists Debian's netlib reference BLAS
 * (libblas.so.3, bundled next to it) as a dependency: the dynamic linker resolves cblas_sgemm,
 * cblas_dgemm and cblas_dsyrk there. Single-threaded; results are BLAS-exact up to summation order,
 * which the parity tests' tolerances allow (they compare against the CPU backend, not bit for
 * bit). Not used by any build or test on a build machine. */
int openblas_get_num_threads(void) { return 1; }
void openblas_set_num_threads(int n) { (void)n; }
char* openblas_get_config(void) {
  static char config[] = "netlib reference BLAS (lorcserve GPU bundle stand-in for OpenBLAS)";
  return config;
}
