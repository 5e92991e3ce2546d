#include "parallel/checkpoint.h"

#include <zlib.h>

#include <cinttypes>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>

#include "core/dtype.h"
#include "core/error.h"

namespace switchyard {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

std::string shard_name(uint64_t generation, int rank, int world) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "g%06" PRIu64 ".rank%d-of-%d.safetensors", generation, rank, world);
  return buf;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) SY_THROW(IoError, "cannot read '", path, "'");
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

uint32_t crc_of(const std::string& bytes) {
  uLong crc = crc32(0L, Z_NULL, 0);
  // zlib takes uInt lengths: feed large files in pieces.
  for (size_t at = 0; at < bytes.size(); at += 1u << 30) {
    const size_t n = std::min<size_t>(bytes.size() - at, 1u << 30);
    crc = crc32(crc, reinterpret_cast<const Bytef*>(bytes.data() + at), static_cast<uInt>(n));
  }
  return static_cast<uint32_t>(crc);
}

// The generation the directory's manifest names; 0 when it has none.
uint64_t current_generation(const std::string& dir) {
  const fs::path manifest = fs::path(dir) / "manifest.json";
  if (!fs::exists(manifest)) return 0;
  try {
    return Json::parse(read_file(manifest.string())).at("generation").get<uint64_t>();
  } catch (const std::exception& e) {
    SY_THROW(InvalidArgument, "checkpoint '", dir, "': manifest.json is unreadable (", e.what(),
             "); move it away to start a new checkpoint there");
  }
}

}  // namespace

uint64_t save_checkpoint(Communicator& world, const std::string& dir,
                         const std::vector<std::pair<std::string, TensorView>>& tensors,
                         const std::map<std::string, std::string>& metadata) {
  const int rank = world.rank(), W = world.size();
  // Rank 0 decides the generation; a failure there must reach every rank, not leave them waiting.
  double agreed[2] = {0, 0};  // generation, error
  std::string error;
  if (rank == 0) {
    try {
      fs::create_directories(dir);
      agreed[0] = static_cast<double>(current_generation(dir) + 1);
    } catch (const std::exception& e) {
      error = e.what();
      agreed[1] = 1;
    }
  }
  world.broadcast(TensorView(agreed, DType::f64, {2}), 0).wait();
  if (agreed[1] != 0)
    SY_THROW(IoError, "checkpoint '", dir, "': ",
             rank == 0 ? error : std::string("rank 0 could not start a new generation (see its error)"));
  const auto generation = static_cast<uint64_t>(agreed[0]);
  const std::string file = shard_name(generation, rank, W);
  const std::string path = (fs::path(dir) / file).string();
  // Each rank's shard, then its size and checksum to rank 0. A rank that fails
  // here reports -1, so the manifest is not written and every rank throws.
  double mine[2] = {-1, 0};
  std::string write_error;
  try {
    fs::create_directories(dir);
    std::map<std::string, std::string> meta = {{"format", kCheckpointFormat},
                                               {"generation", std::to_string(generation)},
                                               {"rank", std::to_string(rank)},
                                               {"world_size", std::to_string(W)}};
    save_safetensors(path, tensors, meta);
    const std::string bytes = read_file(path);  // what is on disk, not what we meant to write
    mine[0] = static_cast<double>(bytes.size());
    mine[1] = static_cast<double>(crc_of(bytes));
  } catch (const std::exception& e) {
    write_error = e.what();
  }
  std::vector<double> all(static_cast<size_t>(2 * W));
  world.allgather(TensorView(mine, DType::f64, {2}), TensorView(all.data(), DType::f64, {2 * W})).wait();
  for (int r = 0; r < W; ++r)
    if (all[static_cast<size_t>(2 * r)] < 0)
      SY_THROW(IoError, "checkpoint '", dir, "': rank ", r, " could not write its shard of generation ", generation,
               r == rank ? ": " + write_error : std::string(" (see its error)"),
               "; the previous generation stays the checkpoint");
  if (rank == 0) {
    Json manifest = {{"format", kCheckpointFormat}, {"generation", generation}, {"world_size", W},
                     {"metadata", metadata}, {"shards", Json::array()}};
    for (int r = 0; r < W; ++r)
      manifest["shards"].push_back({{"file", shard_name(generation, r, W)},
                                    {"bytes", static_cast<uint64_t>(all[static_cast<size_t>(2 * r)])},
                                    {"crc32", static_cast<uint32_t>(all[static_cast<size_t>(2 * r + 1)])}});
    const std::string target = (fs::path(dir) / "manifest.json").string();
    const std::string tmp = target + ".tmp";
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << manifest.dump(1) << "\n";
      out.flush();
      if (!out) SY_THROW(IoError, "checkpoint '", dir, "': cannot write '", tmp, "'");
    }
    fsync_path(tmp);
    fs::rename(tmp, target);
    fsync_path(dir);
    // The new generation is complete: older shards (and strays of saves that never finished) go.
    const std::regex shard_pattern(R"(g(\d+)\.rank\d+-of-\d+\.safetensors(\.tmp\..*)?)");
    for (const auto& entry : fs::directory_iterator(dir)) {
      std::smatch m;
      const std::string name = entry.path().filename().string();
      // Every rank renamed its temporary file before reporting, so any left is a stray.
      if (std::regex_match(name, m, shard_pattern) && (std::stoull(m[1].str()) != generation || m[2].matched))
        fs::remove(entry.path());
    }
  }
  world.barrier().wait();  // nobody reads the directory before the manifest is in place
  return generation;
}

bool Checkpoint::exists(const std::string& dir) { return fs::exists(fs::path(dir) / "manifest.json"); }

Checkpoint Checkpoint::open(const std::string& dir) {
  const fs::path manifest_path = fs::path(dir) / "manifest.json";
  if (!fs::exists(manifest_path))
    SY_THROW(IoError, "checkpoint '", dir, "': no manifest.json there (not a checkpoint directory, or no save has "
             "completed)");
  Checkpoint c;
  c.dir_ = dir;
  Json m;
  try {
    m = Json::parse(read_file(manifest_path.string()));
    if (m.at("format").get<std::string>() != kCheckpointFormat)
      SY_THROW(InvalidArgument, "format '", m.at("format").get<std::string>(), "', expected ", kCheckpointFormat);
    c.generation_ = m.at("generation").get<uint64_t>();
    c.world_size_ = m.at("world_size").get<int>();
    for (const auto& [k, v] : m.at("metadata").items()) c.metadata_[k] = v.get<std::string>();
    for (const Json& s : m.at("shards"))
      c.shards_.push_back({s.at("file").get<std::string>(), s.at("bytes").get<uint64_t>(), s.at("crc32").get<uint32_t>()});
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    SY_THROW(InvalidArgument, "checkpoint '", dir, "': manifest.json is malformed: ", e.what());
  }
  if (static_cast<int>(c.shards_.size()) != c.world_size_)
    SY_THROW(InvalidArgument, "checkpoint '", dir, "': the manifest lists ", c.shards_.size(), " shards for world size ",
             c.world_size_);
  for (const CheckpointShard& s : c.shards_) {
    const fs::path p = fs::path(dir) / s.file;
    if (!fs::exists(p))
      SY_THROW(InvalidArgument, "checkpoint '", dir, "' generation ", c.generation_, ": shard '", s.file,
               "' is missing");
    auto bytes = std::make_shared<std::vector<uint8_t>>();
    {
      const std::string text = read_file(p.string());
      if (text.size() != s.bytes || crc_of(text) != s.crc32)
        SY_THROW(InvalidArgument, "checkpoint '", dir, "' generation ", c.generation_, ": shard '", s.file, "' is torn (",
                 text.size(), " bytes, CRC-32 ", crc_of(text), "; the manifest says ", s.bytes, " bytes, CRC-32 ",
                 s.crc32, ")");
      bytes->assign(text.begin(), text.end());
    }
    c.files_.push_back(SafetensorsFile::parse(bytes, p.string()));
    for (const SafetensorsEntry& e : c.files_.back().entries()) {
      if (c.where_.count(e.name))
        SY_THROW(InvalidArgument, "checkpoint '", dir, "': tensor '", e.name, "' is in two shards");
      c.where_[e.name] = c.files_.size() - 1;
    }
  }
  return c;
}

const std::string& Checkpoint::meta(const std::string& key) const {
  const auto it = metadata_.find(key);
  if (it == metadata_.end()) SY_THROW(InvalidArgument, "checkpoint '", dir_, "': metadata has no '", key, "'");
  return it->second;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [name, file] : where_) out.push_back(name);
  return out;
}

Tensor Checkpoint::load_f32(const std::string& tensor, const Shape& expected_shape) const {
  const auto it = where_.find(tensor);
  if (it == where_.end())
    SY_THROW(InvalidArgument, "checkpoint '", dir_, "' generation ", generation_, ": no tensor '", tensor, "'");
  const SafetensorsFile& f = files_[it->second];
  const SafetensorsEntry& e = f.entry(tensor);
  if (!expected_shape.empty() && e.shape != expected_shape)
    SY_THROW(InvalidArgument, "checkpoint '", dir_, "': tensor '", tensor, "' has shape ", shape_string(e.shape),
             ", expected ", shape_string(expected_shape));
  Tensor t = f.load(tensor);
  if (t.dtype() == DType::f32) return t;
  if (t.dtype() != DType::bf16)
    SY_THROW(InvalidArgument, "checkpoint '", dir_, "': tensor '", tensor, "' is ", dtype_name(t.dtype()),
             ", expected f32 or bf16");
  Tensor out = Tensor::empty(e.shape, DType::f32);
  const auto* in = static_cast<const bf16*>(t.data());
  for (int64_t i = 0; i < t.numel(); ++i) out.data_as<float>()[i] = in[i].to_float();
  return out;
}

}  // namespace switchyard
