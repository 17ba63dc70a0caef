#!/usr/bin/env python3
"""bench/kernel_trace.py on a synthetic timeline: spans, advances (PDL overlap counted once),
the gap between launches and the kernels outside graphs in it, warm-up launches skipped, and the
name shortening (namespaces and arguments dropped, template arguments kept)."""
import os
import shutil
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import kernel_trace  # noqa: E402

HEADER = "start_ns,end_ns,correlation_id,graph_id,graph_node_id,stream_id,grid,block,cluster,device_id,name\n"
# Names as c++filt leaves them (unmangled), so that only test_demangled_names needs c++filt.
GEMV = "void lorc::kernels::GemvKernel<1, 4>(int, float const*)"


def timeline(launches=10, warm_up_gap_ns=0, device=0, corr_base=100):
    """Each launch of graph 7: a 10 us GEMV, an attention kernel starting 2 us before it ends
    (PDL) and ending 5 us after, a 3 us norm 0.5 us later; a 2 us sampler outside the graph
    1 us after the launch and the next launch 5 us after the norm."""
    lines, t = [HEADER], 1000
    for n in range(launches):
        corr = corr_base + n
        a0, a1 = t, t + 10000
        b0, b1 = a1 - 2000, a1 + 5000
        c0, c1 = b1 + 500, b1 + 3500
        lines += [f"{a0},{a1},{corr},7,1,13,132,128,1,{device},{GEMV}\n",
                  f"{b0},{b1},{corr},7,2,13,8,128,1,{device},attend\n",
                  f"{c0},{c1},{corr},7,3,13,1,128,1,{device},norm\n",
                  f"{c1 + 1000},{c1 + 3000},{corr + 800},0,0,13,1,256,1,{device},sample\n"]
        t = c1 + 5000 + (warm_up_gap_ns if n == 0 else 0)
    return "".join(lines)


class KernelTraceTest(unittest.TestCase):
    def analyze(self, text, skip):
        with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
            f.write(text)
        try:
            return kernel_trace.analyze(kernel_trace.load(f.name), skip)
        finally:
            os.unlink(f.name)

    def test_advances_add_up_to_the_span(self):
        (g,) = self.analyze(timeline(), skip=2)
        self.assertEqual(g["graph_id"], 7)
        self.assertEqual((g["launches"], g["kept"], g["kernels_per_launch"]), (10, 8, 3))
        self.assertAlmostEqual(g["span_us"], 18.5)
        adv = {k["name"]: k for k in g["kernels"]}
        self.assertAlmostEqual(adv["GemvKernel<1, 4>"]["adv_us"], 10.0)
        self.assertAlmostEqual(adv["attend"]["adv_us"], 5.0)   # not its 7 us duration
        self.assertAlmostEqual(adv["attend"]["dur_us"], 7.0)
        self.assertAlmostEqual(adv["norm"]["adv_us"], 3.5)     # its 0.5 us gap is its own
        self.assertAlmostEqual(sum(k["adv_us"] for k in g["kernels"]), g["span_us"])
        self.assertEqual([k["name"] for k in g["kernels"]], ["GemvKernel<1, 4>", "attend", "norm"])

    def test_between_launches_and_outside_kernels(self):
        (g,) = self.analyze(timeline(), skip=2)
        self.assertAlmostEqual(g["between_us"], 5.0)
        self.assertEqual(len(g["outside_between"]), 1)
        self.assertEqual(g["outside_between"][0]["name"], "sample")
        self.assertAlmostEqual(g["outside_between"][0]["dur_us"], 2.0)

    def test_skipped_launches_leave_the_means(self):
        # The first gap is 100 us longer: kept when nothing is skipped, gone with skip 1.
        (all_kept,) = self.analyze(timeline(warm_up_gap_ns=100000), skip=0)
        (skipped,) = self.analyze(timeline(warm_up_gap_ns=100000), skip=1)
        self.assertAlmostEqual(all_kept["between_us"], 5.0 + 100.0 / 9)
        self.assertAlmostEqual(skipped["between_us"], 5.0 + 100.0 / 9)  # the 2nd launch's gap is the long one
        (skip2,) = self.analyze(timeline(warm_up_gap_ns=100000), skip=2)
        self.assertAlmostEqual(skip2["between_us"], 5.0)

    def test_devices_apart(self):
        # A second device's launches, interleaved in time (offset 1 us, other correlation ids),
        # neither break the first device's gaps nor lend it their outside kernels.
        other = timeline(device=1, corr_base=5000).replace(HEADER, "")
        other = "".join(",".join([str(int(f[0]) + 1000), str(int(f[1]) + 1000)] + f[2:]) + "\n"
                        for f in (line.split(",", 2) for line in other.splitlines()))
        gs = self.analyze(timeline() + other, skip=2)
        self.assertEqual(sorted((g["device"], g["graph_id"]) for g in gs), [(0, 7), (1, 7)])
        for g in gs:
            self.assertAlmostEqual(g["span_us"], 18.5)
            self.assertAlmostEqual(g["between_us"], 5.0)
            self.assertEqual([(o["name"], o["n"]) for o in g["outside_between"]], [("sample", 1.0)])

    @unittest.skipUnless(shutil.which("c++filt"), "c++filt (binutils) not installed")
    def test_demangled_names(self):
        names = kernel_trace.demangle(["_ZN4lorc7kernels10GemvKernelILi1ELi4EEEviPKf", "nvjet_sm90_tst"])
        self.assertEqual(kernel_trace.short_name(names["_ZN4lorc7kernels10GemvKernelILi1ELi4EEEviPKf"]),
                         "GemvKernel<1, 4>")
        self.assertEqual(names["nvjet_sm90_tst"], "nvjet_sm90_tst")

    def test_bad_files_name_the_problem(self):
        for text, want in (("a,b\n1,2\n", "not a kernel_trace CSV"),
                           (HEADER + "1,x,3,4,5,6,7,8,9,0,foo\n", "line 2")):
            with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
                f.write(text)
            try:
                with self.assertRaisesRegex(ValueError, want):
                    kernel_trace.load(f.name)
            finally:
                os.unlink(f.name)

    def test_short_names(self):
        s = kernel_trace.short_name
        self.assertEqual(s("void lorc::kernels::(anonymous namespace)::GemvKernel<1, 4, (Mode)0>(int, float const*)"),
                         "GemvKernel<1, 4, (Mode)0>")
        self.assertEqual(s("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_TNT"), "nvjet_sm90_tst_128x8_64x12_2x1_v_bz_TNT")
        self.assertEqual(s("void cub::DeviceReduce<a::b<int>>(x)"), "DeviceReduce<a::b<int>>")
        self.assertEqual(s("foo<(int)3>"), "foo<(int)3>")  # no argument list: nothing cut


if __name__ == "__main__":
    unittest.main()
