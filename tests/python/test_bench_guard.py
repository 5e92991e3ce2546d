"""bench/python_binding.py's verdict: INCONCLUSIVE (not OK) when the machine
was too noisy or Python beat the C++ step it wraps (it once printed a
negative binding overhead as "OK")."""
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import python_binding  # noqa: E402


class BindingBenchmarkVerdict(unittest.TestCase):
    def test_a_quiet_run_within_the_limit_is_ok_and_beyond_it_over(self):
        self.assertEqual(python_binding.judge([0.0092] * 8, [0.009] * 8, 0.001), "OK")
        self.assertEqual(python_binding.judge([0.0120] * 8, [0.009] * 8, 0.001), "OVER")

    def test_python_faster_than_the_cpp_it_wraps_is_inconclusive(self):
        self.assertTrue(python_binding.judge([0.005] * 8, [0.009] * 8, 0.001).startswith("INCONCLUSIVE"))

    def test_a_noisy_baseline_is_inconclusive(self):
        noisy = [0.005, 0.005, 0.009, 0.009, 0.012, 0.012, 0.02, 0.02]
        self.assertTrue(python_binding.judge([0.009] * 8, noisy, 0.001).startswith("INCONCLUSIVE"))


if __name__ == "__main__":
    unittest.main()
