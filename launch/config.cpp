#include "launch/config.h"

#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <sstream>
#include <cctype>
#include <charconv>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <variant>

#include "core/error.h"
#include "core/untrusted.h"

namespace switchyard {
namespace {

constexpr int64_t kNoMax = std::numeric_limits<int64_t>::max();

enum class ValueType { integer, number, size, boolean, string, choice, choice_list, dtype };

using Value = std::variant<int64_t, double, bool, std::string, std::vector<std::string>, DType>;

// One entry per dotted key. Sections ("comm", "bench") are the prefixes of the keys.
struct Field {
  std::string key;
  ValueType type;
  std::string doc;
  int64_t min = 0;  // integer, size
  int64_t max = kNoMax;
  double number_min = 0, number_max = 0;  // number
  std::vector<std::string> choices;  // choice, choice_list
  // string only: an extra check, and what it expects (replaces "a string").
  std::function<bool(const std::string&)> check;
  std::string expected;
  std::function<void(JobConfig&, const Value&)> set;
  std::function<std::string(const JobConfig&)> show;  // as written in YAML
};

// Where each key was last set, for cross-key errors.
// The keys of moe.strategy = fixed's plan (under auto the planner chooses them).
constexpr const char* kFixedPlanKeys[] = {"moe.r", "moe.overlap_degree", "moe.a2a", "moe.exchange"};
bool fixed_plan_key(const std::string& key) {
  for (const char* k : kFixedPlanKeys)
    if (key == k) return true;
  return false;
}

struct Origins {
  std::map<std::string, std::pair<int, std::string>> by_key;  // key -> (sequence, where)
  int next = 0;
  void note(const std::string& key, const std::string& where) { by_key[key] = {next++, where}; }
};

// ---- value formatting ----------------------------------------------------------

std::string join(const std::vector<std::string>& items, const char* sep = ", ") {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

std::string show_size(int64_t bytes) {
  static constexpr std::pair<int64_t, char> units[] = {{int64_t{1} << 30, 'G'}, {int64_t{1} << 20, 'M'}, {int64_t{1} << 10, 'K'}};
  for (auto [unit, suffix] : units)
    if (bytes != 0 && bytes % unit == 0) return std::to_string(bytes / unit) + suffix;
  return std::to_string(bytes);
}

std::string show_string(const std::string& s) {
  if (s.empty()) return "\"\"";
  YAML::Emitter out;
  out << s;
  return out.c_str();
}

std::string show_list(const std::vector<std::string>& items) { return "[" + join(items) + "]"; }

std::string dtype_choices() {
  std::vector<std::string> names;
  for (DType t : kAllDTypes) names.emplace_back(dtype_name(t));
  return join(names);
}

std::string type_name(const Field& f) {
  switch (f.type) {
    case ValueType::integer: return "int";
    case ValueType::number: return "number";
    case ValueType::size: return "size";
    case ValueType::boolean: return "bool";
    case ValueType::string: return "string";
    case ValueType::choice: return "enum";
    case ValueType::choice_list: return "enum list";
    case ValueType::dtype: return "dtype";
  }
  return "?";
}

// Fields stored as int have max = kIntMax; the docs say ">= min", errors add the bound.
constexpr int64_t kIntMax = std::numeric_limits<int>::max();

std::string range_text(const Field& f) {
  auto shown = [&](int64_t v) { return f.type == ValueType::size ? show_size(v) : std::to_string(v); };
  if (f.max == kNoMax || f.max == kIntMax) return ">= " + shown(f.min);
  return "[" + shown(f.min) + ", " + shown(f.max) + "]";
}

std::string show_number(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

std::string number_range_text(const Field& f) {
  return "[" + show_number(f.number_min) + ", " + show_number(f.number_max) + "]";
}

std::string allowed_text(const Field& f) {
  switch (f.type) {
    case ValueType::integer:
    case ValueType::size: return range_text(f);
    case ValueType::number: return number_range_text(f);
    case ValueType::boolean: return "true, false";
    case ValueType::string: return f.expected;
    case ValueType::choice:
    case ValueType::choice_list: return join(f.choices);
    case ValueType::dtype: return dtype_choices() + " (or an alias: float, half, bfloat16, ...)";
  }
  return "";
}

// What an error says was expected.
std::string expected_text(const Field& f) {
  switch (f.type) {
    case ValueType::integer: {
      if (f.max == kNoMax) return "an integer >= " + std::to_string(f.min);
      if (f.max == kIntMax) return "an integer >= " + std::to_string(f.min) + " (at most " + std::to_string(kIntMax) + ")";
      return "an integer in " + range_text(f);
    }
    case ValueType::number: return "a number in " + number_range_text(f);
    case ValueType::size:
      return "a size in bytes " + range_text(f) + " with an optional binary suffix K, M or G (e.g. 65536, 64K, 1M)";
    case ValueType::boolean: return "true or false";
    case ValueType::string: return f.expected.empty() ? "a string" : f.expected;
    case ValueType::choice: return "one of " + join(f.choices);
    case ValueType::choice_list: return "one of " + join(f.choices) + ", or a list of them";
    case ValueType::dtype: return "a dtype: " + dtype_choices() + " (or an alias such as float, half, bfloat16)";
  }
  return "?";
}

// ---- the schema table ----------------------------------------------------------

// Accessors are capture-free lambdas, so one helper serves int and int64_t members.
template <typename T>
using Ref = T& (*)(JobConfig&);

Field base(std::string key, ValueType type, std::string doc) {
  Field f;
  f.key = std::move(key);
  f.type = type;
  f.doc = std::move(doc);
  return f;
}

template <typename T>
std::function<std::string(const JobConfig&)> shower(Ref<T> ref, std::string (*fmt)(const T&)) {
  // The accessor takes a mutable JobConfig only so one function serves set and show; show reads.
  return [ref, fmt](const JobConfig& c) { return fmt(ref(const_cast<JobConfig&>(c))); };
}

template <typename T>
Field integer(std::string key, int64_t min, int64_t max, Ref<T> ref, std::string doc) {
  Field f = base(std::move(key), ValueType::integer, std::move(doc));
  f.min = min;
  f.max = max;
  f.set = [ref](JobConfig& c, const Value& v) { ref(c) = static_cast<T>(std::get<int64_t>(v)); };
  f.show = shower<T>(ref, [](const T& v) { return std::to_string(v); });
  return f;
}

Field number(std::string key, double min, double max, Ref<double> ref, std::string doc) {
  Field f = base(std::move(key), ValueType::number, std::move(doc));
  f.number_min = min;
  f.number_max = max;
  f.set = [ref](JobConfig& c, const Value& v) { ref(c) = std::get<double>(v); };
  f.show = shower<double>(ref, [](const double& v) { return show_number(v); });
  return f;
}

Field size(std::string key, int64_t min, Ref<int64_t> ref, std::string doc) {
  Field f = base(std::move(key), ValueType::size, std::move(doc));
  f.min = min;
  f.set = [ref](JobConfig& c, const Value& v) { ref(c) = std::get<int64_t>(v); };
  f.show = shower<int64_t>(ref, [](const int64_t& v) { return show_size(v); });
  return f;
}

Field boolean(std::string key, Ref<bool> ref, std::string doc) {
  Field f = base(std::move(key), ValueType::boolean, std::move(doc));
  f.set = [ref](JobConfig& c, const Value& v) { ref(c) = std::get<bool>(v); };
  f.show = shower<bool>(ref, [](const bool& v) { return std::string(v ? "true" : "false"); });
  return f;
}

Field string(std::string key, Ref<std::string> ref, std::string doc,
             std::function<bool(const std::string&)> check = {}, std::string expected = {}) {
  Field f = base(std::move(key), ValueType::string, std::move(doc));
  f.check = std::move(check);
  f.expected = std::move(expected);
  f.set = [ref](JobConfig& c, const Value& v) { ref(c) = std::get<std::string>(v); };
  f.show = shower<std::string>(ref, [](const std::string& v) { return show_string(v); });
  return f;
}

Field choice(std::string key, std::vector<std::string> choices, Ref<std::string> ref, std::string doc) {
  Field f = base(std::move(key), ValueType::choice, std::move(doc));
  f.choices = std::move(choices);
  f.set = [ref](JobConfig& c, const Value& v) { ref(c) = std::get<std::string>(v); };
  f.show = shower<std::string>(ref, [](const std::string& v) { return v; });
  return f;
}

Field choice_list(std::string key, std::vector<std::string> choices, Ref<std::vector<std::string>> ref,
                  std::string doc) {
  Field f = base(std::move(key), ValueType::choice_list, std::move(doc));
  f.choices = std::move(choices);
  f.set = [ref](JobConfig& c, const Value& v) { ref(c) = std::get<std::vector<std::string>>(v); };
  f.show = shower<std::vector<std::string>>(ref, [](const std::vector<std::string>& v) { return show_list(v); });
  return f;
}

Field dtype(std::string key, Ref<DType> ref, std::string doc) {
  Field f = base(std::move(key), ValueType::dtype, std::move(doc));
  f.set = [ref](JobConfig& c, const Value& v) { ref(c) = std::get<DType>(v); };
  f.show = shower<DType>(ref, [](const DType& v) { return std::string(dtype_name(v)); });
  return f;
}

// "warn" or "warn,comm=debug": the SWITCHYARD_LOG_LEVEL syntax (core/logging.h).
bool is_log_spec(const std::string& spec) {
  static const std::set<std::string> levels = {"trace", "debug", "info", "warn", "error", "off"};
  std::stringstream in(spec);
  std::string item;
  int items = 0;
  while (std::getline(in, item, ',')) {
    ++items;
    const auto eq = item.find('=');
    if (eq == 0) return false;
    if (!levels.count(eq == std::string::npos ? item : item.substr(eq + 1))) return false;
  }
  return items > 0 && spec.back() != ',';
}

// The schema. Order here is the order of the docs and of config_to_yaml.
const std::vector<Field>& fields() {
  static const std::vector<Field> table = {
      choice("job", {"comm-bench", "moe-train", "moe-lm-train", "serve"}, +[](JobConfig& c) -> std::string& { return c.job; },
             "What `switchyard run` does. comm-bench: sweep collectives over message sizes, "
             "nccl-tests style (time, algbw, busbw, #wrong). moe-train: train an MoE layer (moe.*) on a "
             "synthetic regression task (train.*): a fixed teacher MoE makes the targets. moe-lm-train: train the "
             "byte-level MoE language model (lm.*, its FFNs moe.*) on the fortunes corpus with AdamW, held-out "
             "loss against the unigram baseline, sharded checkpoints and resume (train.*). serve: decode a stream "
             "of requests (serve.*) with the model (model.*), continuous batching; TTFT, TPOT, tokens/s."),
      choice("comm.backend", {"auto", "threads", "mpi", "ucx", "fake"},
             +[](JobConfig& c) -> std::string& { return c.comm.backend; },
             "Communicator backend. auto: the launcher's (mpi under mpirun, ucx under `switchyard launch` or "
             "torchrun), else comm.ranks threads; threads: ranks are threads of one process (refused under a "
             "launcher, where each process would run its own job); mpi: one rank per process under mpirun; ucx: one "
             "rank per process under `switchyard launch` (UCX tagged messages, bootstrapped through the TCP store); "
             "fake: no traffic (logic at scale)."),
      integer<int>("comm.ranks", 1, 4096, +[](JobConfig& c) -> int& { return c.comm.ranks; },
                   "Number of ranks for the threads and fake backends (mpi takes the world size from mpirun)."),
      integer<int64_t>("comm.timeout_ms", 1, kNoMax, +[](JobConfig& c) -> int64_t& { return c.comm.timeout_ms; },
                       "Timeout of one communication op in milliseconds."),
      choice_list("bench.ops", {"allreduce", "reduce_scatter", "allgather", "alltoall", "broadcast", "sendrecv"},
                  +[](JobConfig& c) -> std::vector<std::string>& { return c.bench.ops; },
                  "Collectives to sweep, in order: a list, or a single name."),
      size("bench.min_bytes", 0, +[](JobConfig& c) -> int64_t& { return c.bench.min_bytes; },
           "Smallest message size in bytes (per rank buffer); must be <= bench.max_bytes."),
      size("bench.max_bytes", 0, +[](JobConfig& c) -> int64_t& { return c.bench.max_bytes; },
           "Largest message size in bytes."),
      integer<int64_t>("bench.step_factor", 2, kNoMax,
                       +[](JobConfig& c) -> int64_t& { return c.bench.step_factor; },
                       "Each size is the previous one times this factor."),
      integer<int>("bench.iters", 1, kIntMax, +[](JobConfig& c) -> int& { return c.bench.iters; },
                   "Timed iterations per size."),
      integer<int>("bench.warmup", 0, kIntMax, +[](JobConfig& c) -> int& { return c.bench.warmup; },
                   "Untimed iterations per size before the timed ones."),
      dtype("bench.dtype", +[](JobConfig& c) -> DType& { return c.bench.dtype; }, "Element type of the buffers."),
      choice("bench.redop", {"sum", "max", "min"}, +[](JobConfig& c) -> std::string& { return c.bench.redop; },
             "Reduction of allreduce and reduce_scatter."),
      choice("bench.algorithm", {"auto", "native", "generic"},
             +[](JobConfig& c) -> std::string& { return c.bench.algorithm; },
             "Implementation: the backend's own collective (native), comm/algorithms over its send/recv "
             "(generic), or the backend's choice (auto)."),
      integer<int>("bench.root", 0, kIntMax, +[](JobConfig& c) -> int& { return c.bench.root; },
                   "Root rank of broadcast; must be below the world size (checked at run time)."),
      boolean("bench.check", +[](JobConfig& c) -> bool& { return c.bench.check; },
              "Check every result against its closed form and report #wrong."),
      string("bench.csv", +[](JobConfig& c) -> std::string& { return c.bench.csv; },
             "Also write the results to this CSV file (rank 0); empty = no CSV."),
      integer<int64_t>("moe.model_dim", 1, kNoMax, +[](JobConfig& c) -> int64_t& { return c.moe.model_dim; },
                       "Model (token) dimension M."),
      integer<int64_t>("moe.hidden_dim", 1, kNoMax, +[](JobConfig& c) -> int64_t& { return c.moe.hidden_dim; },
                       "Hidden dimension H of each expert's FFN."),
      integer<int>("moe.experts", 1, kIntMax, +[](JobConfig& c) -> int& { return c.moe.experts; },
                   "Global number of experts; a multiple of the number of ranks, or of moe.expert_parallel_size when "
                   "set (checked at run time)."),
      integer<int>("moe.top_k", 1, kIntMax, +[](JobConfig& c) -> int& { return c.moe.top_k; },
                   "Experts per token; at most moe.experts (checked at run time)."),
      number("moe.capacity_factor", -1e6, 1e6, +[](JobConfig& c) -> double& { return c.moe.capacity_factor; },
             "> 0: capacity k*ceil(cf*T/E) per expert (extra tokens dropped); 0: dropless; < 0: dropless capped at |cf|."),
      choice("moe.capacity_rounding", {"switchyard", "tutel"},
             +[](JobConfig& c) -> std::string& { return c.moe.capacity_rounding; },
             "How moe.capacity_factor becomes slots per expert: switchyard k*ceil(cf*T/E); tutel k*floor(cf*ceil(T/E)) "
             "(Tutel's rule, so the same factor drops the same tokens)."),
      choice("moe.balance_loss", {"all_choices", "top1"}, +[](JobConfig& c) -> std::string& { return c.moe.balance_loss; },
             "Load-balancing loss E * sum_e f_e * P_e (P_e: mean normalised score of e); f_e is the share of all "
             "T*k choices that went to e (all_choices) or of tokens whose first choice is e (top1: GShard's form, "
             "Tutel's)."),
      choice("moe.exchange", {"padded", "dropless"}, +[](JobConfig& c) -> std::string& { return c.moe.exchange; },
             "How rows travel in the fixed plan; never changes the result. padded: all-to-all of [E, C, M] buffers "
             "(Tutel); dropless: all-to-all-v of only the routed rows (DeepEP). Whether tokens drop is "
             "moe.capacity_factor's business (0: none)."),
      choice("moe.strategy", {"auto", "fixed"}, +[](JobConfig& c) -> std::string& { return c.moe.strategy; },
             "auto: the planner picks each batch's execution plan (r, d, a2a, exchange) from a calibrated cost model "
             "refined by measured timings; fixed: moe.r, moe.overlap_degree, moe.a2a and moe.exchange."),
      integer<int>("moe.r", 0, kIntMax, +[](JobConfig& c) -> int& { return c.moe.r; },
                   "Sharding degree of the fixed plan: 0 data parallel, 1 expert parallel, r > 1 expert+tensor "
                   "parallel; 0 or a divisor of ranks/experts (checked at run time)."),
      integer<int>("moe.overlap_degree", 1, 64, +[](JobConfig& c) -> int& { return c.moe.overlap_degree; },
                   "Pipelining degree of the fixed plan: chunks whose all-to-all overlaps the previous chunk's experts."),
      choice("moe.a2a", {"flat", "2dh"}, +[](JobConfig& c) -> std::string& { return c.moe.a2a; },
             "All-to-all of the fixed plan: flat, or 2dh (inside nodes, then across; needs moe.nodes > 1)."),
      integer<int>("moe.nodes", 0, kIntMax, +[](JobConfig& c) -> int& { return c.moe.nodes; },
                   "Nodes the ranks form for 2dh (blocks of ranks); 0: as the runtime found them."),
      integer<int>("moe.expert_parallel_size", 0, kIntMax,
                   +[](JobConfig& c) -> int& { return c.moe.expert_parallel_size; },
                   "Expert data parallelism (Megatron's expert_model_parallel_size): expert groups of this many "
                   "consecutive ranks, each holding every expert once, tokens exchanged inside their group, expert "
                   "gradients summed over the groups; must divide the ranks and moe.experts. 0: one group, the world."),
      integer<int>("moe.redundant_experts", 0, kIntMax, +[](JobConfig& c) -> int& { return c.moe.redundant_experts; },
                   "Extra expert replicas placed by EPLB (moe.experts + this many physical experts, a multiple of "
                   "the ranks); 0: none. Not with moe.expert_parallel_size."),
      integer<int>("moe.rebalance_every", 0, kIntMax, +[](JobConfig& c) -> int& { return c.moe.rebalance_every; },
                   "Re-place the redundant experts every this many steps from the expert loads measured since the "
                   "last placement (EPLB, then migrate; logged with the rank load before); 0: never."),
      choice("moe.replica_choice", {"in_turn", "nearest"}, +[](JobConfig& c) -> std::string& { return c.moe.replica_choice; },
             "Which replica of a redundant expert a routed choice uses: in_turn (every replica takes every n-th "
             "choice: exact shares) or nearest (the source's own rank's replicas first, then its node's, then any, "
             "each replica still expecting an equal share). Not with moe.expert_parallel_size."),
      choice("moe.device", {"cpu", "cuda"}, +[](JobConfig& c) -> std::string& { return c.moe.device; },
             "Where the moe-train job's layer runs: cpu, or cuda (each rank's GPU through the CUDA ops; the expert "
             "group over nccl when ranks are processes, else staged over the threads). Fails with 'built without "
             "CUDA' or 'no CUDA device' when the GPU cannot be used; the other jobs take cpu only."),
      choice("moe.activation", {"relu", "gelu", "swiglu"},
             +[](JobConfig& c) -> std::string& { return c.moe.activation; }, "Expert activation."),
      choice("moe.gate", {"softmax", "sigmoid_bias"}, +[](JobConfig& c) -> std::string& { return c.moe.gate; },
             "softmax: top-k of softmax probabilities; sigmoid_bias: sigmoid scores (DeepSeek-V3 style)."),
      integer<int>("moe.expert_groups", 1, kIntMax, +[](JobConfig& c) -> int& { return c.moe.expert_groups; },
                   "Group-limited routing (DeepSeek-V3's n_group): the experts in this many consecutive groups, each "
                   "token choosing among its moe.topk_groups best; must divide moe.experts. 1: plain top-k."),
      integer<int>("moe.topk_groups", 1, kIntMax, +[](JobConfig& c) -> int& { return c.moe.topk_groups; },
                   "Group-limited routing (topk_group): the groups a token chooses its experts from; at most "
                   "moe.expert_groups, holding at least moe.top_k experts."),
      choice("moe.eplb_policy", {"global", "hierarchical"}, +[](JobConfig& c) -> std::string& { return c.moe.eplb_policy; },
             "How EPLB places the redundant experts: global (any expert on any rank's spare slots) or hierarchical "
             "(moe.expert_groups packed onto the nodes, replicas inside each node; needs the groups a multiple of "
             "the nodes)."),
      integer<int>("train.steps", 1, kIntMax, +[](JobConfig& c) -> int& { return c.train.steps; },
                   "Training steps."),
      integer<int64_t>("train.tokens_per_rank", 0, kNoMax,
                       +[](JobConfig& c) -> int64_t& { return c.train.tokens_per_rank; }, "Tokens per rank per step."),
      number("train.lr", 0.0, 1e3, +[](JobConfig& c) -> double& { return c.train.lr; }, "Learning rate (moe-train: SGD; moe-lm-train: AdamW's peak)."),
      number("train.balance_coef", 0.0, 1e3, +[](JobConfig& c) -> double& { return c.train.balance_coef; },
             "Weight of the load-balancing loss."),
      number("train.z_coef", 0.0, 1e3, +[](JobConfig& c) -> double& { return c.train.z_coef; },
             "Weight of the router z-loss."),
      number("train.bias_rate", 0.0, 1e3, +[](JobConfig& c) -> double& { return c.train.bias_rate; },
             "sigmoid_bias gate: after each step raise the selection bias of under-used experts by this much "
             "and lower the over-used (DeepSeek-V3's auxiliary-loss-free balancing)."),
      integer<int>("train.log_every", 1, kIntMax, +[](JobConfig& c) -> int& { return c.train.log_every; },
                   "Print the loss every this many steps."),
      integer<int64_t>("train.seed", 0, kNoMax, +[](JobConfig& c) -> int64_t& { return c.train.seed; },
                       "Seed of the weights, the teacher and the data."),
      integer<int64_t>("train.warmup", 0, kNoMax, +[](JobConfig& c) -> int64_t& { return c.train.warmup; },
                       "moe-lm-train: linear learning-rate warm-up steps, then cosine decay to train.min_lr_ratio."),
      number("train.min_lr_ratio", 0.0, 1.0, +[](JobConfig& c) -> double& { return c.train.min_lr_ratio; },
             "moe-lm-train: the cosine decay ends at train.lr times this."),
      number("train.clip", 0.0, 1e9, +[](JobConfig& c) -> double& { return c.train.clip; },
             "moe-lm-train: clip the global gradient L2 norm (experts summed over the ranks) to this; 0: no clipping."),
      number("train.weight_decay", 0.0, 1e3, +[](JobConfig& c) -> double& { return c.train.weight_decay; },
             "moe-lm-train: AdamW's decoupled weight decay."),
      dtype("train.dtype", +[](JobConfig& c) -> DType& { return c.train.dtype; },
            "moe-lm-train: the experts' GEMMs, f32 or bf16 (bf16 operands, fp32 accumulation and master weights; the "
            "dense layers stay f32)."),
      string("train.checkpoint", +[](JobConfig& c) -> std::string& { return c.train.checkpoint; },
             "moe-lm-train: directory of the sharded checkpoint (generations, manifest written last), written every "
             "train.checkpoint_every steps and at the end; `switchyard generate --model DIR` reads it. Empty: none."),
      integer<int>("train.checkpoint_every", 0, kIntMax, +[](JobConfig& c) -> int& { return c.train.checkpoint_every; },
                   "moe-lm-train: also save every this many steps; 0: only at the end."),
      boolean("train.resume", +[](JobConfig& c) -> bool& { return c.train.resume; },
              "moe-lm-train: continue from train.checkpoint when it holds a checkpoint (weights, AdamW moments, step, "
              "data position; saved at any world size), else start fresh."),
      integer<int>("train.stop_after", 0, kIntMax, +[](JobConfig& c) -> int& { return c.train.stop_after; },
                   "moe-lm-train: end this run after this many steps, evaluated and checkpointed, though the "
                   "learning-rate schedule spans train.steps (time-limited allocations; continue with train.resume); "
                   "0: run to train.steps."),
      integer<int>("lm.layers", 1, 1024, +[](JobConfig& c) -> int& { return c.lm.layers; },
                   "moe-lm-train: decoder layers (attention, then an MoE FFN of moe.*)."),
      integer<int>("lm.heads", 1, 1024, +[](JobConfig& c) -> int& { return c.lm.heads; },
                   "moe-lm-train: attention heads; moe.model_dim / lm.heads must be even."),
      integer<int>("lm.seq", 2, 65536, +[](JobConfig& c) -> int& { return c.lm.seq; },
                   "moe-lm-train: bytes per training sequence (the model's max_seq)."),
      integer<int>("lm.batch", 1, kIntMax, +[](JobConfig& c) -> int& { return c.lm.batch; },
                   "moe-lm-train: sequences per step over all ranks (split as evenly as the ranks allow)."),
      string("lm.corpus", +[](JobConfig& c) -> std::string& { return c.lm.corpus; },
             "moe-lm-train: folder of fortune files (Debian's fortunes package); every 10th fortune is held out."),
      integer<int>("lm.eval_every", 1, kIntMax, +[](JobConfig& c) -> int& { return c.lm.eval_every; },
                   "moe-lm-train: print the held-out loss every this many steps, and at the end."),
      integer<int>("lm.eval_sequences", 1, kIntMax, +[](JobConfig& c) -> int& { return c.lm.eval_sequences; },
                   "moe-lm-train: held-out windows of lm.seq bytes per evaluation."),
      integer<int>("lm.probe_plans", 0, 64, +[](JobConfig& c) -> int& { return c.lm.probe_plans; },
                   "moe-lm-train with moe.strategy auto: first run every candidate plan fixed this many steps each "
                   "(timed), so the plan lines compare auto with the best fixed plan of the same run; 0: no probe."),
      string("model.path", +[](JobConfig& c) -> std::string& { return c.model.path; },
             "Folder of the decoder model (config.json, model.safetensors), relative to the working directory."),
      choice("model.attention", {"replicated", "dp", "tp"}, +[](JobConfig& c) -> std::string& { return c.model.attention; },
             "How attention runs over the ranks (the experts always span them all). replicated: every rank the same "
             "sequences; dp: each rank its own sequences and KV, the MoE all-to-all takes every rank's tokens; tp: "
             "heads split over groups of model.tp ranks (Megatron; the output projection reduce-scattered over the "
             "rows, each rank the MoE layers on its row slice), data-parallel across the groups."),
      integer<int>("model.tp", 1, 4096, +[](JobConfig& c) -> int& { return c.model.tp; },
                   "Ranks per tensor-parallel attention group (dividing the world and the model's heads); 1 unless "
                   "model.attention = tp."),
      string("model.afd", +[](JobConfig& c) -> std::string& { return c.model.afd; },
             "Attention-FFN disaggregation as A:F (Step-3, MegaScale-Infer): the first A ranks run data-parallel "
             "attention with the KV, the router and the combine, and hold no experts; the other F ranks hold the "
             "experts (E / F each) and no attention; A + F = the ranks. Or rank lists, [0,2]:[1,3] (attention ranks, "
             "then FFN ranks; quoted in YAML: \"[1]:[0]\"). Empty: every rank both.",
             [](const std::string& v) {
               const size_t c = v.find(':');
               return v.empty() || (c != std::string::npos && c > 0 && c + 1 < v.size() &&
                                    v.find_first_not_of("0123456789:,[]") == std::string::npos &&
                                    v.find(':', c + 1) == std::string::npos);
             },
             "A:F, two rank counts (e.g. 2:2), rank lists ([0,2]:[1,3]), or empty"),
      integer<int>("model.microbatches", 0, 64, +[](JobConfig& c) -> int& { return c.model.microbatches; },
                   "With model.afd: micro-batches per step ping-ponged between the attention and FFN ranks (the FFN "
                   "ranks compute micro-batch i while the attention ranks run i + 1); 0: each step from the measured "
                   "times, m >= 2 (1 + Tc / max(Ta, Te)); 1 otherwise."),
      choice("model.dispatch_dtype", {"f32", "bf16", "fp8"},
             +[](JobConfig& c) -> std::string& { return c.model.dispatch_dtype; },
             "What the MoE layers' exchanges carry to the experts: f32 (exact), bf16 (half the bytes) or fp8 (e4m3 "
             "with an f32 scale per 128 columns, as DeepEP and Step-3 send them); with model.afd the "
             "attention-to-FFN transfer."),
      choice("model.combine_dtype", {"f32", "bf16"}, +[](JobConfig& c) -> std::string& { return c.model.combine_dtype; },
             "What the experts' results come back in: f32 (exact) or bf16."),
      integer<int>("model.threads", 0, 4096, +[](JobConfig& c) -> int& { return c.model.threads; },
                   "GEMM (OpenMP) threads per rank; 0: the node's cores over its ranks."),
      integer<int>("model.redundant_experts", 0, 1 << 20, +[](JobConfig& c) -> int& { return c.model.redundant_experts; },
                   "Extra expert replicas (DeepSeek's EPLB): from the first rebalance on, the MoE layers hold "
                   "experts + this many physical experts (a multiple of the ranks), re-placed every "
                   "model.rebalance_every serving steps from the loads routed since; outputs do not change."),
      integer<int>("model.rebalance_every", 0, kIntMax, +[](JobConfig& c) -> int& { return c.model.rebalance_every; },
                   "Serving steps between re-placements of the redundant experts; 0: never."),
      string("model.affinity", +[](JobConfig& c) -> std::string& { return c.model.affinity; },
             "Speculative MoE: token-expert affinity tables (switchyard affinity build --ranks = the ranks), relative "
             "to the working directory. Each MoE layer's experts are placed as the tables group them (outputs do not "
             "change); model.specmoe and serve.scheduler = affinity predict from them. Empty: none."),
      choice("model.specmoe", {"off", "on", "auto"}, +[](JobConfig& c) -> std::string& { return c.model.specmoe; },
             "Speculative token shuffling with model.affinity (model.attention = tp): on moves each layer's tokens to "
             "the ranks the tables predict inside the attention's reduce-scatter (outputs do not change); auto does "
             "so per batch and layer when the planner prices the all-to-all saved above the shuffle's host cost."),
      integer<int>("serve.requests", 1, kIntMax, +[](JobConfig& c) -> int& { return c.serve.requests; },
                   "Requests to serve."),
      number("serve.rate", 0.0, 1e9, +[](JobConfig& c) -> double& { return c.serve.rate; },
             "Arrivals per second (Poisson); 0: every request at once."),
      integer<int>("serve.prompt_tokens", 1, kIntMax, +[](JobConfig& c) -> int& { return c.serve.prompt_tokens; },
                   "Prompt lengths are drawn from prompt_tokens/2 .. 3*prompt_tokens/2."),
      integer<int>("serve.new_tokens", 1, kIntMax, +[](JobConfig& c) -> int& { return c.serve.new_tokens; },
                   "Output lengths are drawn from new_tokens/2 .. 3*new_tokens/2."),
      integer<int>("serve.max_batch", 1, kIntMax, +[](JobConfig& c) -> int& { return c.serve.max_batch; },
                   "Sequences in flight per rank; waiting requests join as others finish."),
      integer<int64_t>("serve.kv_budget", 0, kNoMax, +[](JobConfig& c) -> int64_t& { return c.serve.kv_budget; },
                       "KV positions a rank may hold (prompt + new tokens reserved per request); admission waits "
                       "when full; 0: unlimited."),
      integer<int>("serve.prefill_chunk", 0, kIntMax, +[](JobConfig& c) -> int& { return c.serve.prefill_chunk; },
                   "Prompt tokens a rank prefills per step (chunked prefill, so a long prompt does not stall the "
                   "others' decode steps); 0: whole prompts."),
      integer<int64_t>("serve.seed", 0, kNoMax, +[](JobConfig& c) -> int64_t& { return c.serve.seed; },
                       "Seed of the request lengths and arrival times."),
      choice("serve.scheduler", {"round_robin", "affinity"}, +[](JobConfig& c) -> std::string& { return c.serve.scheduler; },
             "Which data-parallel rank takes each request: round_robin, or affinity (the rank whose experts its "
             "prompt's tokens use most by model.affinity, every W consecutive requests on all W ranks, sticky for "
             "the whole decode; needs model.attention = dp)."),
      string("serve.csv", +[](JobConfig& c) -> std::string& { return c.serve.csv; },
             "Also write a row per request (rank, lengths, arrival, TTFT, TPOT) to this CSV file; empty = none."),
      string("log.level", +[](JobConfig& c) -> std::string& { return c.log_level; },
             "Log level, as SWITCHYARD_LOG_LEVEL: trace, debug, info, warn, error or off; "
             "per subsystem as 'warn,comm=debug'.",
             is_log_spec, "a log level (trace, debug, info, warn, error, off), optionally per subsystem as 'warn,comm=debug'"),
  };
  return table;
}

// Rules across keys, checked once after the file and all overrides.
struct CrossCheck {
  std::vector<std::string> keys;
  std::string rule;
  std::function<bool(const JobConfig&)> holds;
};

const std::vector<CrossCheck>& cross_checks() {
  static const std::vector<CrossCheck> table = {
      {{"bench.min_bytes", "bench.max_bytes"}, "bench.min_bytes <= bench.max_bytes",
       [](const JobConfig& c) { return c.bench.min_bytes <= c.bench.max_bytes; }},
      {{"model.attention", "model.tp"}, "model.tp = 1 unless model.attention = tp",
       [](const JobConfig& c) { return c.model.tp == 1 || c.model.attention == "tp"; }},
      {{"model.afd", "model.microbatches"}, "model.microbatches = 1 unless model.afd is set",
       [](const JobConfig& c) { return c.model.microbatches == 1 || !c.model.afd.empty(); }},
      {{"model.afd", "model.attention"}, "model.attention = replicated (the default) or dp when model.afd is set",
       [](const JobConfig& c) { return c.model.afd.empty() || c.model.attention != "tp"; }},
      {{"model.redundant_experts", "model.rebalance_every"},
       "model.redundant_experts > 0 exactly when model.rebalance_every > 0",
       [](const JobConfig& c) { return (c.model.redundant_experts > 0) == (c.model.rebalance_every > 0); }},
      {{"model.afd", "model.redundant_experts"}, "model.redundant_experts = 0 when model.afd is set (rebalancing a "
       "disaggregated model's experts is not built)",
       [](const JobConfig& c) { return c.model.afd.empty() || c.model.redundant_experts == 0; }},
  };
  return table;
}

const Field* find_field(const std::string& key) {
  for (const auto& f : fields())
    if (f.key == key) return &f;
  return nullptr;
}

// The keys directly under a section ("" = top level), in table order.
std::vector<std::string> children_of(const std::string& section) {
  std::vector<std::string> out;
  const std::string prefix = section.empty() ? "" : section + ".";
  for (const auto& f : fields()) {
    if (f.key.compare(0, prefix.size(), prefix) != 0 || f.key.size() == prefix.size()) continue;
    std::string child = f.key.substr(prefix.size());
    child = child.substr(0, child.find('.'));
    if (std::find(out.begin(), out.end(), child) == out.end()) out.push_back(child);
  }
  return out;
}

bool is_section(const std::string& path) { return path.empty() || !children_of(path).empty(); }

// ---- parsing one node -----------------------------------------------------------

// Where a node came from: "file:line:col", or the --set override.
struct Source {
  std::string name;      // file name, or "--set k=v"
  bool override_ = false;
  std::string at(const YAML::Mark& mark) const {
    if (override_ || mark.is_null()) return name;
    return name + ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1);
  }
};

std::string describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Map: return "a map";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Null: return "an empty value";
    default: {  // quoted, at most 80 characters of it: a value may be megabytes long
      const std::string& v = node.Scalar();
      return "'" + (v.size() > 80 ? v.substr(0, 80) + "...' (" + std::to_string(v.size()) + " characters)" : v + "'");
    }
  }
}

[[noreturn]] void fail(const std::string& where, const std::string& key, const std::string& got,
                       const std::string& expected) {
  SY_THROW(ConfigError, where, ": ", key, ": got ", got, ", expected ", expected);
}

std::optional<int64_t> parse_int(std::string_view s) {
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  int64_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || end != s.data() + s.size()) return std::nullopt;
  return v;
}

// "65536", "64K", "64KiB", "1M", "2G" (binary multiples).
std::optional<int64_t> parse_size(std::string_view s) {
  int64_t unit = 1;
  for (auto [suffix, mult] : {std::pair{"KiB", int64_t{1} << 10}, {"MiB", int64_t{1} << 20}, {"GiB", int64_t{1} << 30},
                              {"K", int64_t{1} << 10}, {"M", int64_t{1} << 20}, {"G", int64_t{1} << 30}}) {
    const std::string_view sv(suffix);
    if (s.size() > sv.size() && s.substr(s.size() - sv.size()) == sv) {
      unit = mult;
      s.remove_suffix(sv.size());
      break;
    }
  }
  auto v = parse_int(s);
  if (!v || *v < 0 || *v > std::numeric_limits<int64_t>::max() / unit) return std::nullopt;
  return *v * unit;
}

std::optional<bool> parse_bool(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return std::tolower(ch); });
  if (s == "true" || s == "yes" || s == "on") return true;
  if (s == "false" || s == "no" || s == "off") return false;
  return std::nullopt;
}

// Validates a leaf node against its field; `where` already names the node's position.
Value parse_value(const Field& f, const YAML::Node& node, const Source& src, const YAML::Mark& fallback) {
  const bool null = node.IsNull();
  // An empty value's mark points past it, at the next token: name its key instead.
  const std::string where = src.at(node.Mark().is_null() || (null && !fallback.is_null()) ? fallback : node.Mark());
  if (f.type == ValueType::choice_list && node.IsSequence()) {
    std::vector<std::string> out;
    for (size_t i = 0; i < node.size(); ++i) {
      const YAML::Node item = node[i];
      const std::string item_key = f.key + "[" + std::to_string(i) + "]";
      if (!item.IsScalar()) fail(src.at(item.Mark()), item_key, describe(item), "one of " + join(f.choices));
      if (std::find(f.choices.begin(), f.choices.end(), item.Scalar()) == f.choices.end())
        fail(src.at(item.Mark()), item_key, describe(item), "one of " + join(f.choices));
      out.push_back(item.Scalar());
    }
    if (out.empty()) fail(where, f.key, "an empty list", expected_text(f));
    return out;
  }
  if (f.type == ValueType::string && null) return std::string();
  if (!node.IsScalar()) fail(where, f.key, describe(node), expected_text(f));
  const std::string& s = node.Scalar();
  switch (f.type) {
    case ValueType::integer: {
      auto v = parse_int(s);
      if (!v || *v < f.min || *v > f.max) fail(where, f.key, describe(node), expected_text(f));
      return *v;
    }
    case ValueType::number: {
      char* end = nullptr;
      const double v = s.empty() ? NAN : std::strtod(s.c_str(), &end);
      if (s.empty() || end != s.c_str() + s.size() || !std::isfinite(v) || v < f.number_min || v > f.number_max)
        fail(where, f.key, describe(node), expected_text(f));
      return v;
    }
    case ValueType::size: {
      auto v = parse_size(s);
      if (!v || *v < f.min || *v > f.max) fail(where, f.key, describe(node), expected_text(f));
      return *v;
    }
    case ValueType::boolean: {
      auto v = parse_bool(s);
      if (!v) fail(where, f.key, describe(node), expected_text(f));
      return *v;
    }
    case ValueType::string:
      if (f.check && !f.check(s)) fail(where, f.key, describe(node), expected_text(f));
      return s;
    case ValueType::choice:
      if (std::find(f.choices.begin(), f.choices.end(), s) == f.choices.end())
        fail(where, f.key, describe(node), expected_text(f));
      return s;
    case ValueType::choice_list:
      if (std::find(f.choices.begin(), f.choices.end(), s) == f.choices.end())
        fail(where, f.key, describe(node), expected_text(f));
      return std::vector<std::string>{s};
    case ValueType::dtype: {
      auto t = parse_dtype(s);
      if (!t) fail(where, f.key, describe(node), expected_text(f));
      return *t;
    }
  }
  fail(where, f.key, describe(node), expected_text(f));
}

std::string section_expected(const std::string& path) {
  return "a map with keys " + join(children_of(path));
}

std::string known_keys_text(const std::string& section) {
  return section.empty() ? "known top-level keys: " + join(children_of(""))
                         : "known keys under " + section + ": " + join(children_of(section));
}

// Applies `node` at dotted `path` ("" = the whole document): a leaf is parsed
// and set, a section must be a map whose keys are known.
void apply(JobConfig& cfg, const YAML::Node& node, const std::string& path, const Source& src,
           const YAML::Mark& fallback, Origins& origins) {
  const YAML::Mark mark = node.Mark().is_null() ? fallback : node.Mark();
  if (const Field* f = find_field(path)) {
    f->set(cfg, parse_value(*f, node, src, fallback));
    origins.note(path, src.at(mark));
    return;
  }
  if (node.IsNull()) return;  // "comm:" with nothing under it, or an empty file
  if (!node.IsMap()) {
    const std::string key = path.empty() ? "the top level" : path;
    fail(src.at(mark), key, describe(node), section_expected(path));
  }
  std::set<std::string> seen;
  for (const auto& kv : node) {
    const YAML::Node& key_node = kv.first;
    if (!key_node.IsScalar())
      SY_THROW(ConfigError, src.at(key_node.Mark()), ": ", path.empty() ? "the top level" : path,
               ": got ", describe(key_node), " as a key, expected one of ", join(children_of(path)));
    const std::string& name = key_node.Scalar();
    const std::string child = path.empty() ? name : path + "." + name;
    if (!find_field(child) && !is_section(child))
      SY_THROW(ConfigError, src.at(key_node.Mark()), ": unknown key '", child, "' (", known_keys_text(path), ")");
    if (!seen.insert(name).second)
      SY_THROW(ConfigError, src.at(key_node.Mark()), ": duplicate key '", child, "'");
    apply(cfg, kv.second, child, src, key_node.Mark(), origins);
  }
}

// Counts documents as the parser reads them. yaml-cpp 0.7's parser can hand
// out an empty document forever without advancing (a stray ',' at the top:
// upstream issue 1040), which made LoadAll allocate without bound; a document
// that starts where the previous one started is that case.
class DocumentCounter : public YAML::EventHandler {
 public:
  void OnDocumentStart(const YAML::Mark& mark) override {
    stuck = documents > 0 && mark.pos == last.pos;
    last = mark;
    ++documents;
  }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
  void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
  void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t, const std::string&) override {}
  void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
  void OnSequenceEnd() override {}
  void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
  void OnMapEnd() override {}
  int documents = 0;
  bool stuck = false;
  YAML::Mark last;
};

YAML::Node parse_yaml(const std::string& text, const std::string& source_name) {
  try {
    std::istringstream in(text);
    YAML::Parser parser(in);
    DocumentCounter counter;
    while (parser.HandleNextDocument(counter)) {
      const YAML::Mark& at = counter.last;
      if (counter.stuck) {
        const char c = at.pos >= 0 && static_cast<size_t>(at.pos) < text.size() ? text[static_cast<size_t>(at.pos)] : '?';
        SY_THROW(ConfigError, source_name, ":", at.line + 1, ":", at.column + 1, ": YAML syntax error: unexpected '",
                 std::string(1, c), "' (a flow indicator outside a [list] or {map})");
      }
      if (counter.documents > 1)
        SY_THROW(ConfigError, source_name, ":", at.line + 1, ": expected one YAML document, found a second one here");
    }
    return counter.documents == 0 ? YAML::Node() : YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    SY_THROW(ConfigError, source_name, ":", e.mark.line + 1, ":", e.mark.column + 1, ": YAML syntax error: ", e.msg);
  }
}

void apply_override(JobConfig& cfg, const std::string& text, Origins& origins) {
  const Source src{"--set " + text, true};
  const auto eq = text.find('=');
  if (eq == std::string::npos)
    SY_THROW(ConfigError, src.name, ": expected dotted.key=value, e.g. --set comm.ranks=8");
  const std::string key = text.substr(0, eq);
  if (key.empty()) SY_THROW(ConfigError, src.name, ": missing key before '=', expected dotted.key=value");
  if (!find_field(key) && !is_section(key)) {
    const auto dot = key.rfind('.');
    std::string parent = dot == std::string::npos ? "" : key.substr(0, dot);
    while (!is_section(parent)) {  // name the deepest section that exists
      const auto d = parent.rfind('.');
      parent = d == std::string::npos ? "" : parent.substr(0, d);
    }
    SY_THROW(ConfigError, src.name, ": unknown key '", key, "' (", known_keys_text(parent), ")");
  }
  YAML::Node value;
  try {
    value = YAML::Load(text.substr(eq + 1));
  } catch (const YAML::ParserException& e) {
    SY_THROW(ConfigError, src.name, ": ", key, ": the value is not valid YAML (", e.msg, ")");
  }
  apply(cfg, value, key, src, YAML::Mark::null_mark(), origins);
}

void check_cross_rules(const JobConfig& cfg, const std::string& source, const Origins& origins) {
  for (const auto& rule : cross_checks()) {
    if (rule.holds(cfg)) continue;
    // Point at the key set last: that is the one the user most likely wants to see.
    std::string where = source;
    int latest = -1;
    std::vector<std::string> values;
    for (const auto& key : rule.keys) {
      const auto it = origins.by_key.find(key);
      const std::string from = it == origins.by_key.end() ? "default" : it->second.second;
      if (it != origins.by_key.end() && it->second.first > latest) {
        latest = it->second.first;
        where = it->second.second;
      }
      values.push_back(key + " = " + find_field(key)->show(cfg) + " (" + from + ")");
    }
    SY_THROW(ConfigError, where, ": expected ", rule.rule, ", got ", join(values, " and "));
  }
}

JobConfig load(const std::string& text, const std::string& source_name, const std::vector<std::string>& overrides) {
  JobConfig cfg;
  cfg.source = source_name;
  Origins origins;
  const YAML::Node root = parse_yaml(text, source_name);
  apply(cfg, root, "", Source{source_name}, YAML::Mark::null_mark(), origins);
  for (const auto& o : overrides) apply_override(cfg, o, origins);
  check_cross_rules(cfg, source_name, origins);
  // A fixed-plan key under strategy auto would be silently ignored: the planner chooses those per batch.
  if (cfg.moe.strategy == "auto")
    for (const char* key : kFixedPlanKeys) {
      const auto it = origins.by_key.find(key);
      if (it == origins.by_key.end()) continue;
      const auto strategy = origins.by_key.find("moe.strategy");
      SY_THROW(ConfigError, it->second.second, ": ", key, " = ", find_field(key)->show(cfg), " fixes the plan, but "
               "moe.strategy = auto (", strategy == origins.by_key.end() ? "the default" : strategy->second.second,
               ") lets the planner choose it per batch; expected moe.strategy: fixed with it, or no fixed-plan keys");
    }
  for (const auto& [key, at] : origins.by_key) cfg.origin[key] = at.second;
  return cfg;
}

// Markdown table cells must not contain '|'.
std::string md_cell(std::string s) {
  for (size_t at = 0; (at = s.find('|', at)) != std::string::npos; at += 2) s.replace(at, 1, "\\|");
  return s;
}

}  // namespace

JobConfig load_config_file(const std::string& path, const std::vector<std::string>& overrides) {
  std::string text;
  try {
    // A directory, a FIFO or a huge file is refused, not run as the default job or waited on.
    text = read_untrusted_file(path);
  } catch (const IoError& e) {
    SY_THROW(ConfigError, "config file ", e.what());
  }
  return load(text, path, overrides);
}

JobConfig load_config_string(const std::string& yaml_text, const std::string& source_name,
                             const std::vector<std::string>& overrides) {
  return load(yaml_text, source_name, overrides);
}

std::vector<ConfigKeyDoc> config_schema() {
  const JobConfig defaults;
  std::vector<ConfigKeyDoc> out;
  for (const auto& f : fields()) out.push_back({f.key, type_name(f), f.show(defaults), allowed_text(f), f.doc});
  return out;
}

std::string config_schema_markdown() {
  std::ostringstream md;
  md << "| key | type | default | allowed | description |\n";
  md << "|---|---|---|---|---|\n";
  for (const auto& row : config_schema())
    md << "| `" << row.key << "` | " << row.type << " | `" << md_cell(row.default_value) << "` | "
       << md_cell(row.allowed) << " | " << md_cell(row.doc) << " |\n";
  md << "\nSizes take an optional binary suffix: K = 1024, M = 1024², G = 1024³ (KiB, MiB, GiB also accepted).\n";
  for (const auto& rule : cross_checks()) md << "Checked after all overrides: " << rule.rule << ".\n";
  return md.str();
}

std::string config_to_yaml(const JobConfig& config) {
  YAML::Node root(YAML::NodeType::Map);
  for (const auto& f : fields()) {
    if (config.moe.strategy == "auto" && fixed_plan_key(f.key)) continue;  // the planner's, not the config's
    // Walk (creating) the sections of the dotted key, then set the leaf from its YAML text.
    std::vector<std::string> parts;
    std::stringstream in(f.key);
    for (std::string part; std::getline(in, part, '.');) parts.push_back(part);
    std::vector<YAML::Node> chain{root};
    for (size_t i = 0; i + 1 < parts.size(); ++i) chain.push_back(chain.back()[parts[i]]);
    chain.back()[parts.back()] = YAML::Load(f.show(config));
  }
  YAML::Emitter out;
  out << root;
  return std::string(out.c_str()) + "\n";
}

}  // namespace switchyard
