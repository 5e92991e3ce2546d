"""The committed tiny language models: their files load, the model definition
(examples/tiny_lm/tinylm.py) reproduces the committed reference logits from
the committed weights, and the routing trace is well formed."""
import json
import os
import sys
import unittest

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

here = os.path.dirname(os.path.abspath(__file__))
tiny = os.path.join(here, "..", "..", "examples", "tiny_lm")
sys.path.insert(0, tiny)


@unittest.skipIf(torch is None, "python3-torch is absent: the tiny-LM checks are skipped")
class TinyLMFilesTest(unittest.TestCase):
    def test_reference_logits_reproduce(self):
        import switchyard
        import tinylm
        comm = switchyard.world().communicator
        for name in ("base", "draft"):
            cfg = json.load(open(os.path.join(tiny, name, "config.json")))
            model = tinylm.TinyLM(cfg, comm, seed=0)
            tinylm.load_into(model, tinylm.load_safetensors(os.path.join(tiny, name, "model.safetensors")), comm)
            ref = tinylm.load_safetensors(os.path.join(tiny, name, "reference_logits.safetensors"))
            self.assertEqual(bytes(ref["prompt"].tolist()), tinylm.PROMPT)
            with torch.no_grad():
                logits, _ = model(ref["prompt"].long().view(1, -1))
            err = float((logits[0] - ref["logits"]).norm() / ref["logits"].norm())
            self.assertLess(err, 1e-5, f"{name}: logits differ from the reference by {err:.2e}")
            log = json.load(open(os.path.join(tiny, name, "train_log.json")))
            self.assertLess(log["heldout_bf16_nats_per_byte"], 0.75 * log["unigram_nats_per_byte"], name)

    def test_trace_is_well_formed(self):
        import tinylm
        for name, layers in (("base", 8), ("draft", 6)):
            t = tinylm.load_safetensors(os.path.join(tiny, "trace", f"{name}_heldout.safetensors"))
            n = t["tokens"].numel()
            self.assertGreater(n, 1000)
            for i in range(layers):
                e, w = t[f"layer{i}.experts"], t[f"layer{i}.weights"]
                self.assertEqual(tuple(e.shape), (n, 2))
                self.assertTrue(bool(((e >= 0) & (e < 8)).all()))
                self.assertTrue(bool((e[:, 0] != e[:, 1]).all()))
                self.assertTrue(bool((w[:, 0] >= w[:, 1]).all()))  # best first


if __name__ == "__main__":
    unittest.main()
