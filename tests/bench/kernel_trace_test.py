#!/usr/bin/env python3
"""bench/kernel_trace.py on a synthetic timeline: spans, advances (PDL overlap counted once),
the gap between launches and the kernels outside graphs in it, warm-up launches skipped, and the
name shortening (namespaces and arguments dropped, template arguments kept)."""
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import kernel_trace  # noqa: E402

HEADER = "start_ns,end_ns,correlation_id,graph_id,graph_node_id,stream_id,grid,block,cluster,name\n"
GEMV = "_ZN4lorc7kernels10GemvKernelILi1ELi4EEEviPKf"  # lorc::kernels::GemvKernel<1, 4>(int, float const*)


def timeline(launches=10, warm_up_gap_ns=0):
    """Each launch of graph 7: a 10 us GEMV, an attention kernel starting 2 us before it ends
    (PDL) and ending 5 us after, a 3 us norm 0.5 us later; a 2 us sampler outside the graph
    1 us after the launch and the next launch 5 us after the norm."""
    lines, t = [HEADER], 1000
    for n in range(launches):
        corr = 100 + n
        a0, a1 = t, t + 10000
        b0, b1 = a1 - 2000, a1 + 5000
        c0, c1 = b1 + 500, b1 + 3500
        lines += [f"{a0},{a1},{corr},7,1,13,132,128,1,{GEMV}\n",
                  f"{b0},{b1},{corr},7,2,13,8,128,1,_Z6attendv\n",
                  f"{c0},{c1},{corr},7,3,13,1,128,1,_Z4normv\n",
                  f"{c1 + 1000},{c1 + 3000},{900 + n},0,0,13,1,256,1,_Z6samplev\n"]
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

    def test_short_names(self):
        s = kernel_trace.short_name
        self.assertEqual(s("void lorc::kernels::(anonymous namespace)::GemvKernel<1, 4, (Mode)0>(int, float const*)"),
                         "GemvKernel<1, 4, (Mode)0>")
        self.assertEqual(s("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_TNT"), "nvjet_sm90_tst_128x8_64x12_2x1_v_bz_TNT")
        self.assertEqual(s("void cub::DeviceReduce<a::b<int>>(x)"), "DeviceReduce<a::b<int>>")


if __name__ == "__main__":
    unittest.main()
