// YAML job configuration: shipped presets, defaults, overrides, and errors that
// name file:line:col, the key, the value and what was expected.
#include "launch/config.h"

#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "launch/cluster_presets.h"
#include "launch/jobs.h"

#ifndef SWITCHYARD_SOURCE_DIR
#error "SWITCHYARD_SOURCE_DIR must name the source tree (the build defines it)"
#endif

namespace switchyard {
namespace {

std::string source_path(const std::string& relative) { return std::string(SWITCHYARD_SOURCE_DIR) + "/" + relative; }
std::string bad_config(const std::string& name) { return source_path("tests/configs/" + name); }

// Runs `load`, expects a ConfigError and returns its message.
template <typename Load>
std::string config_error(Load&& load) {
  try {
    load();
  } catch (const ConfigError& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected ConfigError, got another exception: " << e.what();
    return {};
  }
  ADD_FAILURE() << "expected ConfigError, nothing was thrown";
  return {};
}

// Loads tests/configs/<name>, expects a ConfigError at "<name>:<line>:" whose
// message contains every one of `parts`.
void expect_file_error(const std::string& name, int line, const std::vector<std::string>& parts) {
  SCOPED_TRACE(name);
  const std::string msg = config_error([&] { load_config_file(bad_config(name)); });
  EXPECT_NE(msg.find(name + ":" + std::to_string(line) + ":"), std::string::npos)
      << "no " << name << ":" << line << ": in: " << msg;
  for (const auto& part : parts) EXPECT_NE(msg.find(part), std::string::npos) << "no '" << part << "' in: " << msg;
}

TEST(Config, DefaultsMatchTheStructs) {
  const JobConfig c = load_config_string("", "<defaults>");
  EXPECT_EQ(c.job, "comm-bench");
  EXPECT_EQ(c.comm.backend, "auto");
  EXPECT_EQ(c.comm.ranks, 4);
  EXPECT_EQ(c.comm.timeout_ms, 30000);
  EXPECT_EQ(c.bench.ops, std::vector<std::string>{"alltoall"});
  EXPECT_EQ(c.bench.min_bytes, 65536);
  EXPECT_EQ(c.bench.max_bytes, 67108864);
  EXPECT_EQ(c.bench.step_factor, 2);
  EXPECT_EQ(c.bench.iters, 20);
  EXPECT_EQ(c.bench.warmup, 5);
  EXPECT_EQ(c.bench.dtype, DType::f32);
  EXPECT_EQ(c.bench.redop, "sum");
  EXPECT_EQ(c.bench.root, 0);
  EXPECT_TRUE(c.bench.check);
  EXPECT_EQ(c.bench.csv, "");
  EXPECT_EQ(c.log_level, "warn");
  EXPECT_EQ(c.source, "<defaults>");
  EXPECT_EQ(JobConfig{}.source, "<defaults>");
}

TEST(Config, EmptyFileIsAllDefaults) {
  const JobConfig c = load_config_file(bad_config("empty.yaml"));
  EXPECT_EQ(c.comm.ranks, 4);
  EXPECT_EQ(c.bench.max_bytes, 67108864);
  EXPECT_EQ(c.source, bad_config("empty.yaml"));
  EXPECT_EQ(load_config_string("comm:\nbench:\n", "x.yaml").comm.backend, "auto");
}

TEST(Config, LoadsQuickstart) {
  const JobConfig c = load_config_file(source_path("configs/comm-bench.yaml"));
  EXPECT_EQ(c.job, "comm-bench");
  EXPECT_EQ(c.comm.backend, "auto");
  EXPECT_EQ(c.comm.ranks, 4);
  EXPECT_EQ(c.bench.ops, (std::vector<std::string>{"alltoall", "allreduce"}));
  EXPECT_EQ(c.bench.min_bytes, 64 << 10);
  EXPECT_EQ(c.bench.max_bytes, 4 << 20);
  EXPECT_LE(c.bench.iters, 10);
  EXPECT_TRUE(c.bench.check);
  EXPECT_EQ(c.source, source_path("configs/comm-bench.yaml"));
}

TEST(Config, LoadsCpuMpi) {
  const JobConfig c = load_config_file(source_path("configs/comm-bench-mpi.yaml"));
  EXPECT_EQ(c.comm.backend, "mpi");
  EXPECT_EQ(c.bench.ops, std::vector<std::string>{"alltoall"});  // written as a single string
  EXPECT_EQ(c.bench.min_bytes, 64 << 10);
  EXPECT_EQ(c.bench.max_bytes, int64_t{64} << 20);
}

TEST(Config, SizeSuffixes) {
  auto max_bytes = [](const std::string& v) {
    return load_config_string("bench:\n  min_bytes: 0\n  max_bytes: " + v + "\n", "s.yaml").bench.max_bytes;
  };
  EXPECT_EQ(max_bytes("65536"), 65536);
  EXPECT_EQ(max_bytes("0"), 0);
  EXPECT_EQ(max_bytes("64K"), 65536);
  EXPECT_EQ(max_bytes("1M"), 1 << 20);
  EXPECT_EQ(max_bytes("3G"), int64_t{3} << 30);
  EXPECT_EQ(max_bytes("2MiB"), 2 << 20);
  EXPECT_EQ(max_bytes("1000"), 1000);
  for (const std::string bad : {"64KB", "1.5M", "-1", "K", "M1", "1T", "9999999999G", "sixty"}) {
    const std::string msg = config_error([&] { max_bytes(bad); });
    EXPECT_NE(msg.find("s.yaml:3:14: bench.max_bytes: got '" + bad + "', expected a size"), std::string::npos) << msg;
  }
}

TEST(Config, OpsAsListOrSingleString) {
  EXPECT_EQ(load_config_string("bench:\n  ops: allgather\n", "o.yaml").bench.ops,
            std::vector<std::string>{"allgather"});
  EXPECT_EQ(load_config_string("bench:\n  ops:\n    - sendrecv\n    - broadcast\n", "o.yaml").bench.ops,
            (std::vector<std::string>{"sendrecv", "broadcast"}));
  const std::string msg = config_error([] { load_config_string("bench:\n  ops: all\n", "o.yaml"); });
  EXPECT_NE(msg.find("o.yaml:2:8: bench.ops: got 'all', expected one of allreduce"), std::string::npos) << msg;
  const std::string empty = config_error([] { load_config_string("bench:\n  ops: []\n", "o.yaml"); });
  EXPECT_NE(empty.find("bench.ops: got an empty list"), std::string::npos) << empty;
}

TEST(Config, EveryTypeParses) {
  const JobConfig c = load_config_string(
      "comm:\n  backend: fake\n  ranks: 4096\n  timeout_ms: 1\n"
      "bench:\n  dtype: bfloat16\n  redop: max\n  root: 3\n  check: false\n  csv: out/a.csv\n"
      "  step_factor: 4\n  iters: 1\n  warmup: 0\n"
      "log:\n  level: info,comm=debug\n",
      "t.yaml");
  EXPECT_EQ(c.comm.backend, "fake");
  EXPECT_EQ(c.comm.ranks, 4096);
  EXPECT_EQ(c.comm.timeout_ms, 1);
  EXPECT_EQ(c.bench.dtype, DType::bf16);
  EXPECT_EQ(c.bench.redop, "max");
  EXPECT_EQ(c.bench.root, 3);
  EXPECT_FALSE(c.bench.check);
  EXPECT_EQ(c.bench.csv, "out/a.csv");
  EXPECT_EQ(c.bench.step_factor, 4);
  EXPECT_EQ(c.bench.iters, 1);
  EXPECT_EQ(c.bench.warmup, 0);
  EXPECT_EQ(c.log_level, "info,comm=debug");
}

TEST(Config, BadFilesNameFileLineKeyValueAndExpectation) {
  expect_file_error("bad_unknown_key.yaml", 4,
                    {":4:3: unknown key 'comm.bakend'", "known keys under comm: backend, ranks, timeout_ms"});
  expect_file_error("bad_unknown_section.yaml", 3,
                    {":3:1: unknown key 'benchmark'", "known top-level keys: job, comm, bench, moe, train, lm, model, serve, log"});
  expect_file_error("bad_type.yaml", 4, {":4:10: comm.ranks: got 'four', expected an integer in [1, 4096]"});
  expect_file_error("bad_range.yaml", 4, {":4:16: bench.step_factor: got '1', expected an integer >= 2"});
  expect_file_error("bad_enum.yaml", 7, {":7:12: comm.backend: got 'mpii', expected one of auto, threads, mpi, ucx, fake"});
  expect_file_error("bad_syntax.yaml", 4, {"YAML syntax error", "end of sequence flow not found"});
  expect_file_error("bad_kind.yaml", 4, {"comm.backend: got a map, expected one of auto, threads, mpi, ucx, fake"});
  expect_file_error("bad_kind_section.yaml", 3, {":3:8: bench: got 'fast', expected a map with keys ops, min_bytes"});
  expect_file_error("bad_op.yaml", 3, {":3:19: bench.ops[1]: got 'all_to_all', expected one of allreduce"});
  expect_file_error("bad_size.yaml", 3, {":3:14: bench.min_bytes: got '64KB', expected a size in bytes"});
  expect_file_error("bad_min_max.yaml", 4,
                    {"expected bench.min_bytes <= bench.max_bytes", "bench.min_bytes = 1M (", "bad_min_max.yaml:3:14)",
                     "bench.max_bytes = 64K ("});
  expect_file_error("bad_dtype.yaml", 3, {":3:10: bench.dtype: got 'float128', expected a dtype: f32"});
  expect_file_error("bad_bool.yaml", 3, {":3:10: bench.check: got 'maybe', expected true or false"});
  expect_file_error("bad_duplicate.yaml", 4, {":4:3: duplicate key 'comm.ranks'"});
  expect_file_error("bad_top_level.yaml", 2, {"got a list, expected a map with keys job, comm, bench, moe, train, lm, model, serve, log"});
}

TEST(Config, MoreValueErrors) {
  auto error_of = [](const std::string& text) { return config_error([&] { load_config_string(text, "v.yaml"); }); };
  EXPECT_NE(error_of("comm:\n  ranks: 0\n").find("v.yaml:2:10: comm.ranks: got '0', expected an integer in [1, 4096]"),
            std::string::npos);
  EXPECT_NE(error_of("comm:\n  ranks: 4097\n").find("got '4097'"), std::string::npos);
  EXPECT_NE(error_of("comm:\n  ranks: 2.5\n").find("got '2.5'"), std::string::npos);
  // An empty value is reported at its key.
  EXPECT_NE(error_of("comm:\n  ranks:\n").find("v.yaml:2:3: comm.ranks: got an empty value"), std::string::npos);
  EXPECT_NE(error_of("bench:\n  iters: [1]\n").find("bench.iters: got a list, expected an integer >= 1"),
            std::string::npos);
  EXPECT_NE(error_of("bench:\n  warmup: -1\n").find("bench.warmup: got '-1'"), std::string::npos);
  EXPECT_NE(error_of("bench:\n  redop: prod\n").find("bench.redop: got 'prod', expected one of sum, max, min"),
            std::string::npos);
  EXPECT_NE(error_of("comm:\n  timeout_ms: 0\n").find("comm.timeout_ms: got '0', expected an integer >= 1"),
            std::string::npos);
  EXPECT_NE(error_of("job: train\n").find("v.yaml:1:6: job: got 'train', expected one of comm-bench"),
            std::string::npos);
  EXPECT_NE(error_of("log:\n  level: loud\n").find("log.level: got 'loud', expected a log level"), std::string::npos);
  EXPECT_NE(error_of("log: warn\n").find("log: got 'warn', expected a map with keys level"), std::string::npos);
  EXPECT_NE(error_of("a: 1\n---\nb: 2\n").find("expected one YAML document"), std::string::npos);
}

TEST(Config, MissingFileNamesThePath) {
  const std::string path = source_path("tests/configs/no_such_file.yaml");
  const std::string msg = config_error([&] { load_config_file(path); });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
}

TEST(Config, OverridesApplyInOrderAfterTheFile) {
  const JobConfig c = load_config_file(source_path("configs/comm-bench.yaml"),
                                       {"comm.ranks=8", "bench.ops=[alltoall,allreduce,broadcast]", "bench.max_bytes=1M",
                                        "bench.dtype=bf16", "bench.check=false", "bench.csv=out.csv", "comm.ranks=2",
                                        "log.level=debug"});
  EXPECT_EQ(c.comm.ranks, 2);  // the last one wins
  EXPECT_EQ(c.bench.ops, (std::vector<std::string>{"alltoall", "allreduce", "broadcast"}));
  EXPECT_EQ(c.bench.max_bytes, 1 << 20);
  EXPECT_EQ(c.bench.dtype, DType::bf16);
  EXPECT_FALSE(c.bench.check);
  EXPECT_EQ(c.bench.csv, "out.csv");
  EXPECT_EQ(c.log_level, "debug");
  EXPECT_EQ(c.comm.backend, "auto");  // untouched keys keep the file's values
}

TEST(Config, OverridesWithoutAFile) {
  const JobConfig c = load_config_string("", "<defaults>", {"bench.ops=sendrecv", "bench.csv=", "comm={backend: fake, ranks: 1024}"});
  EXPECT_EQ(c.bench.ops, std::vector<std::string>{"sendrecv"});
  EXPECT_EQ(c.bench.csv, "");
  EXPECT_EQ(c.comm.backend, "fake");
  EXPECT_EQ(c.comm.ranks, 1024);
}

TEST(Config, BadOverridesNameTheOverride) {
  auto error_of = [](const std::string& o) { return config_error([&] { load_config_string("", "<defaults>", {o}); }); };
  EXPECT_NE(error_of("comm.ranks=0").find("--set comm.ranks=0: comm.ranks: got '0', expected an integer in [1, 4096]"),
            std::string::npos);
  EXPECT_NE(error_of("comm.ranks").find("--set comm.ranks: expected dotted.key=value"), std::string::npos);
  EXPECT_NE(error_of("=4").find("--set =4: missing key"), std::string::npos);
  EXPECT_NE(error_of("comm.bakend=mpi").find("--set comm.bakend=mpi: unknown key 'comm.bakend' (known keys under comm: "
                                             "backend, ranks, timeout_ms)"),
            std::string::npos);
  EXPECT_NE(error_of("benchx.iters=3").find("unknown key 'benchx.iters' (known top-level keys: job, comm, bench, moe, train, lm, model, serve, log)"),
            std::string::npos);
  EXPECT_NE(error_of("bench.ops=[alltoall,bogus]").find("bench.ops[1]: got 'bogus'"), std::string::npos);
  EXPECT_NE(error_of("bench.ops=[alltoall").find("--set bench.ops=[alltoall: bench.ops: the value is not valid YAML"),
            std::string::npos);
  EXPECT_NE(error_of("comm=mpi").find("--set comm=mpi: comm: got 'mpi', expected a map with keys backend"),
            std::string::npos);
  EXPECT_NE(error_of("bench.min_bytes=1G").find("--set bench.min_bytes=1G: expected bench.min_bytes <= bench.max_bytes"),
            std::string::npos);
}

TEST(Config, MinMaxCheckedAfterAllOverrides) {
  // min > max in between is fine when the last override fixes it.
  const JobConfig c = load_config_file(source_path("configs/comm-bench.yaml"), {"bench.min_bytes=8M", "bench.max_bytes=16M"});
  EXPECT_EQ(c.bench.min_bytes, 8 << 20);
  EXPECT_EQ(c.bench.max_bytes, 16 << 20);
  // The file's max and an override's min clash: the message names both origins.
  const std::string msg = config_error(
      [] { load_config_file(source_path("configs/comm-bench.yaml"), {"bench.min_bytes=8M"}); });
  EXPECT_NE(msg.find("--set bench.min_bytes=8M: expected bench.min_bytes <= bench.max_bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find("bench.max_bytes = 4M (" + source_path("configs/comm-bench.yaml") + ":"), std::string::npos) << msg;
}

TEST(Config, DumpLoadsBackToTheSameConfig) {
  const JobConfig a = load_config_file(source_path("configs/comm-bench.yaml"), {"bench.csv=a b.csv", "bench.dtype=half"});
  const JobConfig b = load_config_string(config_to_yaml(a), "dump");
  EXPECT_EQ(b.bench.ops, a.bench.ops);
  EXPECT_EQ(b.bench.min_bytes, a.bench.min_bytes);
  EXPECT_EQ(b.bench.max_bytes, a.bench.max_bytes);
  EXPECT_EQ(b.bench.dtype, DType::f16);
  EXPECT_EQ(b.bench.csv, "a b.csv");
  EXPECT_EQ(b.comm.ranks, a.comm.ranks);
  EXPECT_EQ(b.log_level, a.log_level);
}

TEST(Config, SchemaDocumentsEveryKey) {
  const std::string md = config_schema_markdown();
  for (const char* key : {"job", "comm.backend", "comm.ranks", "comm.timeout_ms", "bench.ops", "bench.min_bytes",
                          "bench.max_bytes", "bench.step_factor", "bench.iters", "bench.warmup", "bench.dtype",
                          "bench.redop", "bench.algorithm", "bench.root", "bench.check", "bench.csv", "log.level"})
    EXPECT_NE(md.find(std::string("| `") + key + "` |"), std::string::npos) << key;
  EXPECT_NE(md.find("| `comm.ranks` | int | `4` | [1, 4096] |"), std::string::npos) << md;
  EXPECT_NE(md.find("| `bench.min_bytes` | size | `64K` |"), std::string::npos) << md;
  const auto rows = config_schema();
  EXPECT_EQ(rows.size(), 87u);
  for (const auto& row : rows) EXPECT_FALSE(row.doc.empty()) << row.key;
}

TEST(Config, DocsShowTheCurrentSchema) {
  std::ifstream in(source_path("docs/config.md"));
  ASSERT_TRUE(in) << "cannot open docs/config.md";
  std::ostringstream text;
  text << in.rdbuf();
  EXPECT_NE(text.str().find(config_schema_markdown()), std::string::npos)
      << "docs/config.md is out of date: paste config_schema_markdown() into its Keys section";
}

}  // namespace
}  // namespace switchyard

namespace switchyard {
namespace {

TEST(Config, TheTrainingPresetsLoad) {
  for (const char* preset : {"configs/moe-regression.yaml", "configs/cpu-mpi.yaml"}) {
    const JobConfig c = load_config_file(std::string(SWITCHYARD_SOURCE_DIR) + "/" + preset);
    EXPECT_EQ(c.job, "moe-train") << preset;
    EXPECT_EQ(c.moe.experts, 8) << preset;
    EXPECT_GT(c.train.lr, 0.0) << preset;
  }
  const JobConfig tuned = load_config_string(
      "job: moe-train\nmoe: {capacity_factor: -2.5, strategy: fixed, exchange: dropless}\n", "<inline>", {"train.lr=0.25"});
  EXPECT_DOUBLE_EQ(tuned.moe.capacity_factor, -2.5);
  EXPECT_EQ(tuned.moe.exchange, "dropless");
  EXPECT_DOUBLE_EQ(tuned.train.lr, 0.25);
  // A fixed-plan key under strategy auto is never silently ignored: an error at the key, naming the strategy's line.
  try {
    load_config_string("job: moe-train\nmoe:\n  strategy: auto\n  exchange: dropless\n", "auto.yaml");
    ADD_FAILURE() << "moe.exchange under moe.strategy = auto was accepted";
  } catch (const ConfigError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("auto.yaml:4:13: moe.exchange = dropless fixes the plan, but moe.strategy = auto (auto.yaml:3"),
              std::string::npos) << m;
  }
  const JobConfig quickstart = load_config_file(std::string(SWITCHYARD_SOURCE_DIR) + "/configs/quickstart.yaml");
  EXPECT_EQ(quickstart.job, "moe-lm-train");
  EXPECT_EQ(quickstart.moe.strategy, "auto");
  EXPECT_FALSE(quickstart.train.checkpoint.empty());
  EXPECT_THROW(load_config_file(std::string(SWITCHYARD_SOURCE_DIR) + "/configs/quickstart.yaml", {"moe.r=2"}),
               ConfigError);
  EXPECT_EQ(load_config_file(std::string(SWITCHYARD_SOURCE_DIR) + "/configs/quickstart.yaml",
                             {"moe.strategy=fixed", "moe.exchange=dropless"}).moe.exchange, "dropless");
}

// comm.backend auto follows the launcher; threads pinned under one is refused,
// naming the key's line and the variables found (each process would otherwise
// run its own job).
TEST(Config, BackendFollowsTheLauncherAndThreadsUnderALauncherIsRefused) {
  auto env = [](std::map<std::string, std::string> vars) {
    return EnvLookup([vars](const std::string& name) -> std::optional<std::string> {
      const auto it = vars.find(name);
      return it == vars.end() ? std::nullopt : std::optional<std::string>(it->second);
    });
  };
  const auto none = env({});
  const auto mpirun = env({{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"},
                           {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}});
  const auto torchrun = env({{"RANK", "0"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "0"}, {"LOCAL_WORLD_SIZE", "4"}});
  EXPECT_EQ(load_config_string("", "<defaults>").comm.backend, "auto");
  EXPECT_EQ(runtime_backend(load_config_string("", "<defaults>"), mpirun), "");
  const JobConfig pinned = load_config_string("job: comm-bench\ncomm:\n  backend: threads\n", "pinned.yaml");
  EXPECT_EQ(runtime_backend(pinned, none), "threads");
  for (const auto& launcher : {mpirun, torchrun}) {
    try {
      runtime_backend(pinned, launcher);
      ADD_FAILURE() << "threads under a launcher was accepted";
    } catch (const ConfigError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("pinned.yaml:3"), std::string::npos) << m;
      EXPECT_NE(m.find("comm.backend = threads"), std::string::npos) << m;
      EXPECT_NE(m.find("WORLD_SIZE"), std::string::npos) << m;
      EXPECT_NE(m.find("expected comm.backend: auto"), std::string::npos) << m;
    }
  }
  const JobConfig overridden = load_config_string("", "<defaults>", {"comm.backend=threads"});
  try {
    runtime_backend(overridden, mpirun);
    ADD_FAILURE() << "threads from --set under mpirun was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("comm.backend=threads"), std::string::npos) << e.what();
  }
  EXPECT_EQ(runtime_backend(load_config_string("", "<defaults>", {"comm.backend=mpi"}), mpirun), "mpi");
}

TEST(Config, ServePresetAndScheduleKeys) {
  const JobConfig c = load_config_file(std::string(SWITCHYARD_SOURCE_DIR) + "/configs/serve.yaml");
  EXPECT_EQ(c.job, "serve");
  EXPECT_EQ(c.model.attention, "dp");
  EXPECT_EQ(c.serve.requests, 64);
  auto error_of = [](const std::string& text, std::vector<std::string> overrides = {}) {
    try {
      load_config_string(text, "<inline>", overrides);
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error_of("job: serve\nmodel:\n  attention: sharded\n").find("<inline>:3:14: model.attention"),
            std::string::npos) << error_of("job: serve\nmodel:\n  attention: sharded\n");
  const std::string tp = error_of("job: serve\nmodel: {attention: dp, tp: 2}\n");
  EXPECT_NE(tp.find("model.tp = 1 unless model.attention = tp"), std::string::npos) << tp;
  EXPECT_NE(error_of("", {"serve.requests=0"}).find("serve.requests"), std::string::npos);
  EXPECT_NE(error_of("", {"serve.rate=-1"}).find("serve.rate"), std::string::npos);
}

}  // namespace
// Cluster presets: every shipped one loads with a NIC per GPU; a NIC count
// that does not divide the node is refused naming the key and the file.
TEST(Config, ClusterPresetsLoadAndSharedNicsAreChecked) {
  for (const std::string& name : cluster_preset_names()) {
    const ClusterModel m = load_cluster_preset(name);
    EXPECT_GE(m.link.ranks_per_nic, 1) << name;
    EXPECT_EQ(m.link.ranks_per_node % m.link.ranks_per_nic, 0) << name;
  }
  const std::string path = ::testing::TempDir() + "/shared_nic_preset.yaml";
  auto write = [&](int per_nic) {
    std::ofstream(path) << "name: t\nranks_per_node: 8\nranks_per_nic: " << per_nic
                        << "\ndevice: {gemm_tflops_f32_peak: 1, gemm_tflops_bf16_peak: 2, gemm_efficiency: 1, "
                           "memory_gbps_peak: 100, memory_efficiency: 1}\nlinks:\n"
                           "  intra: {latency_us: 1, bandwidth_gbps_peak: 100, efficiency: 1}\n"
                           "  inter: {latency_us: 5, bandwidth_gbps_peak: 10, efficiency: 1}\n";
  };
  write(2);
  EXPECT_EQ(load_cluster_preset(path).link.ranks_per_nic, 2);
  write(3);
  try {
    load_cluster_preset(path);
    FAIL() << "ranks_per_nic = 3 on 8 ranks per node was accepted";
  } catch (const ConfigError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("ranks_per_nic = 3"), std::string::npos) << what;
    EXPECT_NE(what.find(path), std::string::npos) << what;
  }
}

}  // namespace switchyard
