"""Hostile files through the real CLI: each must end with exit status 1 or 2
(never a signal), within a few seconds, under 200 MB of memory, with a
message naming the file and what is wrong. The inputs are those that crashed
or grew without bound before (a one-byte YAML config; JSON nested 80,000
deep in a safetensors shape and a config.json value, which crashed with a
stack overflow when the error message dumped it; a routing trace declaring
3e8 experts; out-of-range config.json numbers), plus directories and FIFOs
given as files.

usage: hostile_inputs.py SWITCHYARD_BINARY
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

switchyard = sys.argv[1]
work = tempfile.mkdtemp()
deep = "[" * 80000 + "]" * 80000  # where an error message dumped it, this deep overflowed the stack (exit 139)
failures = []
MAX_SECONDS = 5.0  # the target is 2 s; a loaded 2-core CI machine gets some slack
MAX_RSS_MB = 200


def path(*parts):
    return os.path.join(work, *parts)


def write(name, data):
    p = path(name)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return p


def safetensors(header_text, data=b""):
    raw = header_text.encode()
    return struct.pack("<Q", len(raw)) + raw + data


def trace(metadata, tokens=4, k=2):
    tok = struct.pack(f"<{tokens}i", *range(tokens))
    exp = struct.pack(f"<{tokens * k}i", *([0, 1] * tokens))
    header = {"__metadata__": {"format": "switchyard-routing-trace-v1", **metadata},
              "tokens": {"dtype": "I32", "shape": [tokens], "data_offsets": [0, len(tok)]},
              "layer0.experts": {"dtype": "I32", "shape": [tokens, k], "data_offsets": [len(tok), len(tok) + len(exp)]}}
    return safetensors(json.dumps(header), tok + exp)


good_config = json.load(open(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "tiny_lm", "base",
                                          "config.json")))


def model_dir(name, **changes):
    cfg = dict(good_config, **changes)
    write(f"{name}/config.json", json.dumps(cfg))
    write(f"{name}/model.safetensors", safetensors("{}"))  # the loader opens the weights first
    return path(name)


def deep_config_dir():
    d = model_dir("deepcfg")
    write("deepcfg/config.json", json.dumps(dict(good_config, vocab_size="X")).replace('"X"', deep))
    return d


def manifest_dir(name, text):
    write(f"{name}/manifest.json", text)
    return path(name)


def case(what, args, expect):
    start = time.monotonic()
    proc = subprocess.Popen([switchyard, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        failures.append(what)
        print(f"FAIL {what}: still running after 30 s")
        return
    seconds = time.monotonic() - start
    # The child's own peak memory: wait4 would need the pid before communicate reaped it, so
    # RUSAGE_CHILDREN's maximum over the children so far bounds it (each case is checked in turn).
    import resource
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    text = out.decode(errors="replace")
    code = proc.returncode
    problems = []
    if code not in (1, 2):
        problems.append(f"exit status {code}" + (" (a signal)" if code < 0 else ""))
    if seconds > MAX_SECONDS:
        problems.append(f"{seconds:.1f} s")
    if rss_mb > MAX_RSS_MB:
        problems.append(f"{rss_mb:.0f} MB")
    if expect not in text:
        problems.append(f"no '{expect}' in the message")
    last = text.strip().splitlines()[-1] if text.strip() else ""
    print(f"{'FAIL' if problems else 'ok  '} {what}: exit {code}, {seconds:.2f} s, peak <= {rss_mb:.0f} MB: "
          f"{last[:200]}" + (f"  [{'; '.join(problems)}]" if problems else ""))
    if problems:
        failures.append(what)


try:
    case("one-byte YAML config ','", ["run", "--config", write("comma.yaml", ",")], "YAML syntax error: unexpected ','")
    case("two YAML documents", ["run", "--config", write("two.yaml", "comm:\n  ranks: 2\n---\nx: 1\n")],
         "expected one YAML document")
    case("a directory as the config", ["run", "--config", work], "not a regular file")
    fifo = path("fifo.yaml")
    os.mkfifo(fifo)
    case("a FIFO nobody writes to as the config", ["run", "--config", fifo], "a pipe with nothing in it")
    case("safetensors header with a shape nested 80,000 deep (trace stats)",
         ["trace", "stats", write("deep.safetensors", safetensors('{"t":{"dtype":"F32","shape":' + deep +
                                                                  ',"data_offsets":[0,0]}}'))], "nested deeper than 64")
    case("a FIFO as a trace", ["trace", "stats", fifo], "not a regular file")
    # 12 MB of header, 3 million small values: its parsed form alone took about 450 MB.
    many = '{"__metadata__":{' + ",".join(f'"k{i}":"v"' for i in range(1500000)) + '}}'
    case("safetensors header of 3 million values (trace stats)",
         ["trace", "stats", write("many.safetensors", safetensors(many))], "JSON with more than 1048576 values")
    case("trace declaring 3e8 experts", ["trace", "stats", write("experts.safetensors", trace({"experts": "300000000"}))],
         "metadata experts = '300000000'")
    case("trace with layers = -3", ["trace", "stats", write("layers.safetensors", trace({"layers": "-3"}))],
         "metadata layers = '-3', expected an integer 1..65536")
    case("config.json with vocab_size nested 80,000 deep (generate)",
         ["generate", "--model", deep_config_dir(), "--prompt", "x"],
         "nested deeper than 64")
    case("config.json vocab_size 4294967552", ["generate", "--model", model_dir("vocab", vocab_size=4294967552),
                                              "--prompt", "x"], "vocab_size' = 4294967552 is out of range")
    case("config.json heads -4294967292", ["generate", "--model", model_dir("heads", heads=-4294967292),
                                          "--prompt", "x"], "heads' = -4294967292 is out of range")
    case("config.json d_model 1e20", ["generate", "--model", model_dir("float", d_model=1e20), "--prompt", "x"],
         "expected an integer")
    case("config.json norm_eps -1", ["generate", "--model", model_dir("eps", norm_eps=-1), "--prompt", "x"],
         "norm_eps = -1")
    case("config.json rope_theta 0", ["generate", "--model", model_dir("theta", rope_theta=0), "--prompt", "x"],
         "rope_theta = 0")
    case("checkpoint manifest nested 80,000 deep (ckpt reshard)",
         ["ckpt", "reshard", "--from", manifest_dir("deepckpt", '{"a":' + deep + "}"), "--to", path("out1"),
          "--ranks", "2"], "nested deeper than 64")
    case("checkpoint manifest naming a shard outside its directory",
         ["ckpt", "reshard", "--from", manifest_dir("escape", json.dumps(
             {"format": "switchyard-checkpoint-v1", "generation": 1, "world_size": 1, "metadata": {},
              "shards": [{"file": "../comma.yaml", "bytes": 1, "crc32": 0}]})), "--to", path("out2"), "--ranks", "2"],
         "not a file name in the checkpoint directory")
    case("generate --max_new_tokens 2147483647",
         ["generate", "--model", os.path.join(os.path.dirname(__file__), "..", "..", "examples", "tiny_lm", "base"),
          "--prompt", "x", "--max_new_tokens", "2147483647"], "exceed max_seq")
finally:
    shutil.rmtree(work, ignore_errors=True)
print(f"{len(failures)} of the cases failed" if failures else "every hostile input was refused cleanly")
sys.exit(1 if failures else 0)
