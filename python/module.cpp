// The Python extension module switchyard._switchyard: the runtime's world,
// communicator collectives and the MoE layer, with tensors passed zero-copy
// through DLPack (any object with __dlpack__, e.g. a torch tensor, or a
// "dltensor" capsule). No libtorch headers: switchyard/torch.py builds the
// torch.nn.Module and autograd.Function on top of this.
#include <dlpack/dlpack.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "core/config.h"
#include "core/dlpack.h"
#include "core/error.h"
#include "kernels/gemm.h"
#include "moe/moe_layer.h"
#include "moe/planner.h"
#include "parallel/checkpoint.h"
#include "parallel/runtime.h"
#if SWITCHYARD_HAS_MPI
#include "comm/backends/mpi/mpi_backend.h"
#endif

namespace py = pybind11;
using namespace switchyard;

namespace {

// Ops take views of these (they wait before returning): a tensor that Python
// owns must never be released on an executor thread, where its deleter would
// wait for the GIL that the main thread may hold.
// A tensor from an object with __dlpack__ (consumed as the protocol says: the
// capsule is renamed "used_dltensor") or from a "dltensor" capsule.
Tensor tensor_from(const py::object& obj, const char* what) {
  py::object capsule = py::hasattr(obj, "__dlpack__") ? obj.attr("__dlpack__")() : obj;
  PyObject* cap = capsule.ptr();
  if (!PyCapsule_IsValid(cap, "dltensor"))
    SY_THROW(InvalidArgument, what, ": expected a tensor with __dlpack__ (e.g. torch.Tensor) or an unused DLPack capsule");
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
  PyCapsule_SetName(cap, "used_dltensor");
  return from_dlpack(managed);
}

void delete_unused_capsule(PyObject* cap) {
  if (PyCapsule_IsValid(cap, "dltensor")) {
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    if (managed && managed->deleter) managed->deleter(managed);
  }
}

// A "dltensor" capsule sharing t's storage (torch.from_dlpack takes it zero-copy).
py::capsule capsule_of(const Tensor& t) { return py::capsule(to_dlpack(t), "dltensor", &delete_unused_capsule); }

ReduceOp reduce_op_of(const std::string& name) {
  if (name == "sum") return ReduceOp::sum;
  if (name == "max") return ReduceOp::max;
  if (name == "min") return ReduceOp::min;
  SY_THROW(InvalidArgument, "op = '", name, "', expected sum, max or min");
}

GateKind gate_of(const std::string& name) {
  if (name == "softmax") return GateKind::softmax;
  if (name == "sigmoid_bias") return GateKind::sigmoid_bias;
  SY_THROW(InvalidArgument, "gate = '", name, "', expected softmax or sigmoid_bias");
}

DType compute_of(const std::string& name) {
  if (name == "f32") return DType::f32;
  if (name == "bf16") return DType::bf16;
  SY_THROW(InvalidArgument, "compute = '", name, "', expected f32 or bf16");
}

// The GEMM threads Switchyard's calls use (0: whatever OpenMP has, e.g.
// torch's setting). Set only around Switchyard's own calls, so torch's thread
// settings stay the user's.
int g_gemm_threads = 0;

class GemmThreadScope {
 public:
  GemmThreadScope() : saved_(kernels::cpu::gemm_threads()) {
    if (g_gemm_threads > 0 && g_gemm_threads != saved_) kernels::cpu::set_gemm_threads(g_gemm_threads);
  }
  ~GemmThreadScope() {
    if (g_gemm_threads > 0 && g_gemm_threads != saved_) kernels::cpu::set_gemm_threads(saved_);
  }
  GemmThreadScope(const GemmThreadScope&) = delete;
  GemmThreadScope& operator=(const GemmThreadScope&) = delete;

 private:
  int saved_;
};

int gemm_threads_of(const py::object& value, int local_size) {
  if (value.is_none()) return 0;
  if (py::isinstance<py::str>(value)) {
    if (value.cast<std::string>() != "auto")
      SY_THROW(InvalidArgument, "gemm_threads = '", value.cast<std::string>(), "', expected None, 'auto' or a count >= 1");
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    return std::max(1, cores / std::max(1, local_size));
  }
  const int n = value.cast<int>();
  if (n < 1) SY_THROW(InvalidArgument, "gemm_threads = ", n, ", expected None, 'auto' or a count >= 1");
  return n;
}

// What init() made: the world and where this process sits.
struct World {
  std::shared_ptr<Communicator> comm;
  RankInfo info;
};

// The layer plus the planner that `plan="auto"` uses (made on first use: it calibrates).
struct Layer {
  std::unique_ptr<MoELayer> layer;
  std::unique_ptr<MoEPlanner> planner;
  int ranks_per_node = 0;
  ExecPlan last_plan;
};

ExecPlan plan_of(int r, int d, const std::string& a2a, const std::string& exchange) {
  ExecPlan p;
  p.r = r;
  p.d = d;
  p.a2a = parse_a2a_algorithm(a2a, "a2a");
  p.exchange = parse_exchange_mode(exchange, "exchange");
  return p;
}

// Tensors shaped like this rank's expert parameters (e.g. optimizer moments).
ExpertParams expert_params_of(Layer& L, const py::object& tensors) {
  ExpertParams& own = L.layer->params();
  if (tensors.is_none()) return own;
  const py::dict d = tensors.cast<py::dict>();
  ExpertParams p;
  auto take = [&](const char* name, const Tensor& like) {
    if (!d.contains(name)) SY_THROW(InvalidArgument, "expert tensors: no '", name, "'; expected w1, b1, w2 and b2");
    Tensor t = tensor_from(d[name], name);
    if (t.dtype() != DType::f32 || t.shape() != like.shape() || !t.view().is_contiguous() || !t.device().is_cpu())
      SY_THROW(InvalidArgument, "expert tensors: '", name, "' is ", dtype_name(t.dtype()), " ", shape_string(t.shape()),
               ", expected contiguous host f32 ", shape_string(like.shape()), " (this rank's ", name, ")");
    return t;
  };
  p.w1 = take("w1", own.w1);
  p.b1 = take("b1", own.b1);
  p.w2 = take("w2", own.w2);
  p.b2 = take("b2", own.b2);
  return p;
}

py::dict metadata_dict(const std::map<std::string, std::string>& m) {
  py::dict d;
  for (const auto& [k, v] : m) d[py::str(k)] = v;
  return d;
}

// One batch through the layer on a handle of its own, so its backward can run
// later, after other batches (no recompute, any number in flight).
py::tuple forward(Layer& L, const py::object& x_obj, std::optional<double> capacity_factor, std::optional<int> k,
                  const std::string& plan, int r, int d, const std::string& a2a, const std::string& exchange) {
  Tensor x = tensor_from(x_obj, "x");
  RoutingChoice routing = L.layer->routing_choice();
  if (capacity_factor) routing.capacity_factor = *capacity_factor;
  if (k) routing.k = *k;
  MoEHandle batch;
  {
    py::gil_scoped_release released;
    GemmThreadScope threads;
    if (plan == "auto") {
      if (!L.planner) {
        auto [device, link] = MoEPlanner::calibrate(*L.layer, L.ranks_per_node);
        L.planner = std::make_unique<MoEPlanner>(*L.layer, device, link);
      }
      batch = L.layer->plan(x, routing, *L.planner);
    } else if (plan == "fixed") {
      batch = L.layer->plan(x, routing, plan_of(r, d, a2a, exchange));
    } else {
      SY_THROW(InvalidArgument, "plan = '", plan, "', expected fixed (with r, d, a2a, exchange) or auto");
    }
    L.layer->forward(*batch);
  }
  L.last_plan = batch->plan().exec;
  const MoEForward& f = batch->result();
  return py::make_tuple(capsule_of(f.output), f.balance_loss, f.z_loss, f.dropped, batch);
}

}  // namespace

PYBIND11_MODULE(_switchyard, m) {
  m.doc() = "Switchyard: distributed mixture-of-experts runtime (C++), zero-copy through DLPack";
  // Translators run newest first: bases are registered before the types derived from them.
  py::register_exception<Error>(m, "Error", PyExc_RuntimeError);
  py::register_exception<IoError>(m, "IoError", PyExc_OSError);
  py::register_exception<TimeoutError>(m, "TimeoutError", PyExc_TimeoutError);
  py::register_exception<InvalidArgument>(m, "InvalidArgument", PyExc_ValueError);
  py::register_exception<ConfigError>(m, "ConfigError", PyExc_ValueError);
  py::register_exception<NotSupported>(m, "NotSupported", PyExc_NotImplementedError);

  py::class_<MoEBatch, std::shared_ptr<MoEBatch>>(m, "MoEBatch",
                                                  "One batch's handle: its plan, buffers and what backward needs.")
      .def_property_readonly("sequence", &MoEBatch::sequence)
      .def_property_readonly("plan", [](const MoEBatch& b) { return b.plan().exec.describe(); });

  py::class_<World>(m, "World")
      .def_property_readonly("rank", [](const World& w) { return w.info.rank; })
      .def_property_readonly("size", [](const World& w) { return w.info.world_size; })
      .def_property_readonly("local_rank", [](const World& w) { return w.info.local_rank; })
      .def_property_readonly("local_size", [](const World& w) { return w.info.local_size; })
      .def_property_readonly("launcher", [](const World& w) { return w.info.launcher; })
      .def_property_readonly("communicator", [](const World& w) { return w.comm; });

  m.def(
      "init",
      [](const std::string& backend, std::optional<double> timeout_s, const py::object& gemm_threads) {
        RuntimeOptions o;
        o.backend = backend;
        if (timeout_s) o.timeout = Milliseconds(static_cast<int64_t>(*timeout_s * 1000));
        ProcessWorld pw = connect_process_world(o);
        g_gemm_threads = gemm_threads_of(gemm_threads, pw.info.local_size);
        const int threads = g_gemm_threads > 0 ? g_gemm_threads : kernels::cpu::gemm_threads();
        kernels::cpu::warn_if_spinning(threads, pw.info.local_size);
        return World{pw.world, pw.info};
      },
      py::arg("backend") = "", py::arg("timeout_s") = py::none(), py::arg("gemm_threads") = py::none(),
      "This process's world: mpi under mpirun, ucx under `switchyard launch`/torchrun, else one rank. "
      "gemm_threads: None (Switchyard's GEMMs use OpenMP's threads as they are: torch.set_num_threads and "
      "OMP_NUM_THREADS decide), 'auto' (the node's cores over its ranks) or a count; set only around "
      "Switchyard's own calls, so torch's settings are never changed.");
  m.def(
      "set_gemm_threads",
      [](const py::object& threads) { g_gemm_threads = gemm_threads_of(threads, 1); }, py::arg("threads"),
      "The GEMM threads of Switchyard's calls: None (OpenMP's as they are) or a count.");
  m.def("gemm_threads", [] { return g_gemm_threads > 0 ? g_gemm_threads : kernels::cpu::gemm_threads(); },
        "The GEMM threads Switchyard's next call uses.");
  m.def(
      "save_checkpoint",
      [](Communicator& comm, const std::string& dir, const std::vector<std::pair<std::string, py::object>>& tensors,
         const std::map<std::string, std::string>& metadata) {
        std::vector<Tensor> keep;
        std::vector<std::pair<std::string, TensorView>> views;
        for (const auto& [name, obj] : tensors) {
          keep.push_back(tensor_from(obj, name.c_str()));
          if (!keep.back().view().is_contiguous() || !keep.back().device().is_cpu())
            SY_THROW(InvalidArgument, "save_checkpoint: tensor '", name, "' must be contiguous on the host");
          views.emplace_back(name, keep.back().view());
        }
        py::gil_scoped_release released;
        return save_checkpoint(comm, dir, views, metadata);
      },
      py::arg("group"), py::arg("dir"), py::arg("tensors"), py::arg("metadata") = std::map<std::string, std::string>{},
      "Collective: this rank's (name, tensor) pairs as its shard of a new generation of the checkpoint in dir "
      "(names unique over the ranks; metadata from rank 0). Returns the generation.");

  py::class_<Checkpoint>(m, "Checkpoint", "The complete generation a checkpoint directory's manifest names.")
      .def(py::init([](const std::string& dir) { return Checkpoint::open(dir); }), py::arg("dir"))
      .def_static("exists", &Checkpoint::exists, py::arg("dir"))
      .def_property_readonly("dir", &Checkpoint::dir)
      .def_property_readonly("generation", &Checkpoint::generation)
      .def_property_readonly("world_size", &Checkpoint::world_size)
      .def_property_readonly("metadata", [](const Checkpoint& c) { return metadata_dict(c.metadata()); })
      .def("names", &Checkpoint::names)
      .def("__contains__", &Checkpoint::contains)
      .def("load", [](const Checkpoint& c, const std::string& name) { return capsule_of(c.load(name)); },
           py::arg("name"), "A fresh copy of the tensor as stored (a DLPack capsule).");
  m.def(
      "finalize",
      [] {
#if SWITCHYARD_HAS_MPI
        finalize_mpi_now();
#endif
      },
      "Ends MPI if Switchyard started it (registered with atexit: Python may never destroy the world).");

  py::class_<Communicator, std::shared_ptr<Communicator>>(m, "Communicator")
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("size", &Communicator::size)
      .def_property_readonly("name", &Communicator::name)
      .def_property_readonly("backend", [](const Communicator& c) { return std::string(c.backend_name()); })
      .def(
          "allreduce",
          [](Communicator& c, const py::object& t, const std::string& op) {
            Tensor x = tensor_from(t, "tensor");
            py::gil_scoped_release released;
            c.allreduce(x.view(), x.view(), {.op = reduce_op_of(op)}).wait();
          },
          py::arg("tensor"), py::arg("op") = "sum", "In place.")
      .def(
          "allgather",
          [](Communicator& c, const py::object& in, const py::object& out) {
            Tensor i = tensor_from(in, "input"), o = tensor_from(out, "output");
            py::gil_scoped_release released;
            c.allgather(i.view(), o.view()).wait();
          },
          py::arg("input"), py::arg("output"))
      .def(
          "alltoall",
          [](Communicator& c, const py::object& in, const py::object& out) {
            Tensor i = tensor_from(in, "input"), o = tensor_from(out, "output");
            py::gil_scoped_release released;
            c.alltoall(i.view(), o.view()).wait();
          },
          py::arg("input"), py::arg("output"))
      .def(
          "alltoallv",
          [](Communicator& c, const py::object& in, std::vector<int64_t> send_counts, const py::object& out,
             std::vector<int64_t> recv_counts) {
            Tensor i = tensor_from(in, "input"), o = tensor_from(out, "output");
            py::gil_scoped_release released;
            c.alltoallv(i.view(), std::move(send_counts), o.view(), std::move(recv_counts)).wait();
          },
          py::arg("input"), py::arg("send_counts"), py::arg("output"), py::arg("recv_counts"))
      .def(
          "broadcast",
          [](Communicator& c, const py::object& t, int root) {
            Tensor x = tensor_from(t, "tensor");
            py::gil_scoped_release released;
            c.broadcast(x.view(), root).wait();
          },
          py::arg("tensor"), py::arg("root") = 0)
      .def("barrier", [](Communicator& c) {
        py::gil_scoped_release released;
        c.barrier().wait();
      })
      .def("split", [](Communicator& c, int color, int key) { return c.split(color, key); }, py::arg("color"),
           py::arg("key") = 0);

  py::class_<Layer>(m, "MoELayer")
      .def(py::init([](std::shared_ptr<Communicator> group, int64_t model_dim, int64_t hidden_dim, int experts, int k,
                       const std::string& activation, const std::string& gate, double capacity_factor,
                       bool renormalize, const std::string& compute, uint64_t seed, int ranks_per_node,
                       const std::string& capacity_rounding, const std::string& balance_loss) {
             MoEConfig c;
             c.model_dim = model_dim;
             c.hidden_dim = hidden_dim;
             const auto act = kernels::parse_activation(activation);
             if (!act) SY_THROW(InvalidArgument, "activation = '", activation, "', expected relu, gelu or swiglu");
             c.activation = *act;
             c.router.experts = experts;
             c.router.k = k;
             c.router.gate = gate_of(gate);
             c.router.capacity_factor = capacity_factor;
             c.router.renormalize = renormalize;
             c.router.capacity_rounding = parse_capacity_rounding(capacity_rounding, "capacity_rounding");
             c.router.balance_loss = parse_balance_loss(balance_loss, "balance_loss");
             c.compute = compute_of(compute);
             c.node_size = ranks_per_node;
             auto L = std::make_unique<Layer>();
             L->layer = std::make_unique<MoELayer>(c, std::move(group));
             L->layer->init_parameters(seed);
             L->ranks_per_node = ranks_per_node > 0 ? ranks_per_node : L->layer->group()->size();
             return L;
           }),
           py::arg("group"), py::arg("model_dim"), py::arg("hidden_dim"), py::arg("experts"), py::arg("k") = 2,
           py::arg("activation") = "gelu", py::arg("gate") = "softmax", py::arg("capacity_factor") = 1.0,
           py::arg("renormalize") = false, py::arg("compute") = "f32", py::arg("seed") = 0,
           py::arg("ranks_per_node") = 0, py::arg("capacity_rounding") = "switchyard",
           py::arg("balance_loss") = "all_choices")
      .def("forward", &forward, py::arg("x"), py::arg("capacity_factor") = py::none(), py::arg("k") = py::none(),
           py::arg("plan") = "fixed", py::arg("r") = 1, py::arg("d") = 1, py::arg("a2a") = "flat",
           py::arg("exchange") = "padded",
           "Returns (output capsule, balance loss, z loss, dropped choices on this rank, batch): the batch "
           "handle keeps what its backward needs until it is dropped.")
      .def(
          "backward",
          [](Layer& L, const std::shared_ptr<MoEBatch>& batch, const py::object& dout, double balance_coef,
             double z_coef, bool input_grad) -> py::object {
            if (!batch) SY_THROW(InvalidArgument, "backward: batch is None; pass the handle forward() returned");
            Tensor g = tensor_from(dout, "dout");
            Tensor dx;
            {
              py::gil_scoped_release released;
              GemmThreadScope threads;
              dx = L.layer->backward(*batch, g, balance_coef, z_coef, input_grad);
            }
            if (!input_grad) return py::none();
            return capsule_of(dx);
          },
          py::arg("batch"), py::arg("dout"), py::arg("balance_coef") = 0.0, py::arg("z_coef") = 0.0,
          py::arg("input_grad") = true,
          "Accumulates the parameter gradients of `batch` (grads()); returns dx as a capsule when input_grad.")
      .def("zero_grad", [](Layer& L) { L.layer->zero_grad(); })
      .def(
          "parameters_changed", [](Layer& L) { L.layer->parameters_changed(); },
          "The weights were written from outside (torch): bf16 compute makes its copies of them again.")
      .def("parameters",
           [](Layer& L) {
             ExpertParams& p = L.layer->params();
             py::dict d;
             d["gate.weight"] = capsule_of(L.layer->gate_weight());
             d["experts.w1"] = capsule_of(p.w1);
             d["experts.b1"] = capsule_of(p.b1);
             d["experts.w2"] = capsule_of(p.w2);
             d["experts.b2"] = capsule_of(p.b2);
             return d;
           },
           "The layer's own parameter tensors (capsules sharing their memory): gate [M, E]; this rank's experts "
           "w1 [L, M, H1], b1 [L, H1], w2 [L, H, M], b2 [L, M].")
      .def("grads",
           [](Layer& L) {
             ExpertParams& g = L.layer->expert_grads();
             py::dict d;
             d["gate.weight"] = capsule_of(L.layer->gate_grad());
             d["experts.w1"] = capsule_of(g.w1);
             d["experts.b1"] = capsule_of(g.b1);
             d["experts.w2"] = capsule_of(g.w2);
             d["experts.b2"] = capsule_of(g.b2);
             return d;
           })
      .def_property_readonly("local_experts",
                             [](Layer& L) { return L.layer->layout().slots(L.layer->group()->rank()); })
      .def_property_readonly("experts_here",
                             [](Layer& L) {
                               std::vector<int> e;
                               const int me = L.layer->group()->rank();
                               for (int s = 0; s < L.layer->layout().slots(me); ++s)
                                 e.push_back(L.layer->layout().expert_at(me, s));
                               return e;
                             })
      .def_property_readonly("last_plan", [](Layer& L) { return L.last_plan.describe(); })
      .def_property_readonly("group", [](Layer& L) { return L.layer->group(); })
      .def_property_readonly("slices", [](Layer& L) { return L.layer->layout().shards(); },
                             "S: how many ranks share each expert (1 unless there are fewer experts than ranks).")
      .def_property_readonly("slice", [](Layer& L) { return L.layer->layout().shard_of_rank(L.layer->group()->rank()); })
      .def(
          "logical_experts",
          [](Layer& L, const py::object& tensors, const std::string& prefix) {
            const ExpertParams p = expert_params_of(L, tensors);
            LogicalExpertTensors experts;
            {
              py::gil_scoped_release released;
              experts = L.layer->logical_expert_tensors(p, prefix);
            }
            py::list out;
            for (const auto& [name, view] : experts.tensors) {
              Tensor copy = Tensor::empty(view.shape(), DType::f32);
              std::memcpy(copy.data(), view.data(), copy.nbytes());
              out.append(py::make_tuple(name, capsule_of(copy)));
            }
            return out;
          },
          py::arg("tensors") = py::none(), py::arg("prefix") = "",
          "Copies of the whole logical experts this rank saves, as (prefix + 'experts.<e>.w1', capsule) pairs, "
          "from the layer's parameters or from tensors shaped like them (a dict w1, b1, w2, b2: e.g. optimizer "
          "moments). Collective over the slices when experts are sliced (slices > 1).")
      .def(
          "assign_logical",
          [](Layer& L, const py::function& get, const py::object& into) {
            ExpertParams p = expert_params_of(L, into);
            L.layer->assign_logical_experts(
                [&](int e, const char* name, const Shape& shape) {
                  Tensor t = tensor_from(get(e, std::string(name)), name);
                  if (t.dtype() != DType::f32 || t.shape() != shape || !t.view().is_contiguous())
                    SY_THROW(InvalidArgument, "expert ", e, " ", name, ": got ", dtype_name(t.dtype()), " ",
                             shape_string(t.shape()), ", expected contiguous f32 ", shape_string(shape));
                  return t;
                },
                p);
          },
          py::arg("get"), py::arg("into") = py::none(),
          "Fills this rank's expert slots (the layer's parameters, or the dict w1, b1, w2, b2 given) from whole "
          "logical experts: get(expert, name) returns expert's whole 'w1', 'b1', 'w2' or 'b2'.")
      .def(
          "save",
          [](Layer& L, const std::string& dir) {
            py::gil_scoped_release released;
            L.layer->save(dir);
          },
          py::arg("dir"), "Collective: the layer as a sharded checkpoint keyed by logical expert (any world size loads it).")
      .def(
          "load",
          [](Layer& L, const std::string& dir) {
            py::gil_scoped_release released;
            L.layer->load(dir);
          },
          py::arg("dir"), "Collective: this rank's experts and the gate from a checkpoint saved at any world size.")
      .def(
          "last_choices",
          [](Layer& L) {
            const Routing& r = L.layer->last_routing();
            if (!r.experts.defined()) SY_THROW(InvalidArgument, "last_choices: no forward has run yet");
            return py::make_tuple(capsule_of(r.experts.clone()), capsule_of(r.weights.clone()));
          },
          "Copies of the last forward's choices: experts [T, k] int32 (logical ids, best first) and weights [T, k].")
      .def_property_readonly("last_routing",
                             [](Layer& L) {
                               const DispatchPlan& p = L.layer->last_plan();
                               return py::make_tuple(p.tokens, p.k, p.capacity, p.dropped);
                             })
      .def(
          "time_cpp",
          [](Layer& L, const py::object& x_obj, const py::object& dout_obj, int iterations, const std::string& exchange) {
            // The same forward + backward calls as from Python, timed in C++ (the binding's overhead is the difference).
            Tensor x = tensor_from(x_obj, "x"), g = tensor_from(dout_obj, "dout");
            py::gil_scoped_release released;
            GemmThreadScope threads;
            const ExecPlan plan = plan_of(1, 1, "flat", exchange);
            const auto start = std::chrono::steady_clock::now();
            for (int i = 0; i < iterations; ++i) {
              L.layer->zero_grad();
              MoEForward f = L.layer->forward(x, L.layer->routing_choice(), plan);
              L.layer->backward(g, 0.01, 0.0, true);
            }
            return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iterations;
          },
          py::arg("x"), py::arg("dout"), py::arg("iterations") = 10, py::arg("exchange") = "padded",
          "Seconds per zero_grad + forward + backward, run in C++.");
}
