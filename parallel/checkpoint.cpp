#include "parallel/checkpoint.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>
#include <zlib.h>

#include <cerrno>
#include <cstring>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <tuple>

#include "core/dtype.h"
#include "core/error.h"
#include "core/failpoint.h"
#include "core/untrusted.h"
#include "core/logging.h"

namespace switchyard {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

std::string shard_name(uint64_t generation, int rank, int world) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "g%06" PRIu64 ".rank%d-of-%d.safetensors", generation, rank, world);
  return buf;
}

// Size and CRC-32 of a file, read in pieces.
std::pair<uint64_t, uint32_t> file_crc(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) SY_THROW(IoError, "cannot read '", path, "'");
  std::vector<char> buf(1 << 20);
  uLong crc = crc32(0L, Z_NULL, 0);
  uint64_t bytes = 0;
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto n = in.gcount();
    if (n <= 0) break;
    crc = crc32(crc, reinterpret_cast<const Bytef*>(buf.data()), static_cast<uInt>(n));
    bytes += static_cast<uint64_t>(n);
  }
  return {bytes, static_cast<uint32_t>(crc)};
}


// The generation the directory's manifest names; 0 when it has none.
uint64_t current_generation(const std::string& dir) {
  const fs::path manifest = fs::path(dir) / "manifest.json";
  if (!fs::exists(manifest)) return 0;
  try {
    return json_integer<uint64_t>(
        parse_untrusted_json(read_untrusted_file(manifest.string()), manifest.string()).at("generation"), "generation");
  } catch (const std::exception& e) {
    SY_THROW(InvalidArgument, "checkpoint '", dir, "': manifest.json is unreadable (", e.what(),
             "); move it away to start a new checkpoint there");
  }
}

// One rank's shard of a generation: written (fsynced, renamed), then its size and CRC as on disk.
CheckpointShard write_shard(const std::string& dir, uint64_t generation, int rank, int world,
                            const std::vector<std::pair<std::string, TensorView>>& tensors) {
  CheckpointShard shard{shard_name(generation, rank, world), 0, 0};
  fs::create_directories(dir);
  save_safetensors((fs::path(dir) / shard.file).string(), tensors,
                   {{"format", kCheckpointFormat}, {"generation", std::to_string(generation)},
                    {"rank", std::to_string(rank)}, {"world_size", std::to_string(world)}});
  std::tie(shard.bytes, shard.crc32) = file_crc((fs::path(dir) / shard.file).string());
  return shard;
}

// The manifest of a complete generation, last: every shard must be there as listed (a directory every writer
// shares), then manifest.json replaces the old one atomically.
void publish(const std::string& dir, uint64_t generation, const std::vector<CheckpointShard>& shards,
             const std::map<std::string, std::string>& metadata) {
  for (size_t r = 0; r < shards.size(); ++r) {
    const fs::path shard = fs::path(dir) / shards[r].file;
    if (!fs::exists(shard) || fs::file_size(shard) != shards[r].bytes)
      SY_THROW(IoError, "rank ", r, "'s shard '", shard.string(), "' (", shards[r].bytes, " bytes) is ",
               fs::exists(shard) ? "another size" : "not there", " as the publishing rank sees the directory: a "
               "checkpoint directory must be on a filesystem every rank shares");
  }
  Json manifest = {{"format", kCheckpointFormat}, {"generation", generation}, {"world_size", shards.size()},
                   {"metadata", metadata}, {"shards", Json::array()}};
  for (const CheckpointShard& s : shards)
    manifest["shards"].push_back({{"file", s.file}, {"bytes", s.bytes}, {"crc32", s.crc32}});
  const std::string target = (fs::path(dir) / "manifest.json").string();
  const std::string tmp = target + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << manifest.dump(1) << "\n";
    out.flush();
    if (!out) SY_THROW(IoError, "cannot write '", tmp, "'");
  }
  fsync_path(tmp);
  failpoint("checkpoint.manifest_written");
  fs::rename(tmp, target);
  try {  // committed: the rename is the commit; a failed directory sync only weakens durability
    fsync_path(dir);
  } catch (const std::exception& e) {
    SY_LOG_WARN("checkpoint", "checkpoint '{}': generation {} is published, but syncing the directory failed: {}", dir,
                generation, e.what());
  }
}

// After a commit: older generations and strays of saves that never finished go. Best effort: the save has
// committed, a file left behind costs only disk.
void remove_older(const std::string& dir, uint64_t generation) {
  try {
    const std::regex shard_pattern(R"(g(\d+)\.rank\d+-of-\d+\.safetensors(\.tmp\..*)?)");
    for (const auto& entry : fs::directory_iterator(dir)) {
      std::smatch m;
      const std::string name = entry.path().filename().string();
      // Every writer renamed its temporary file before the manifest was written, so any left is a stray.
      if (std::regex_match(name, m, shard_pattern) && (std::stoull(m[1].str()) < generation || m[2].matched))
        fs::remove(entry.path());
    }
  } catch (const std::exception& e) {
    SY_LOG_WARN("checkpoint", "checkpoint '{}': generation {} is saved, but removing older files failed: {}", dir,
                generation, e.what());
  }
}

}  // namespace

void agree_on_success(Communicator& world, const std::string& dir, const std::string& my_error, const std::string& step) {
  std::vector<double> failed(static_cast<size_t>(world.size()), 0.0);
  failed[static_cast<size_t>(world.rank())] = my_error.empty() ? 0.0 : 1.0;
  world.allreduce(TensorView(failed.data(), DType::f64, {world.size()}),
                  TensorView(failed.data(), DType::f64, {world.size()}), {.op = ReduceOp::max}).wait();
  for (int r = 0; r < world.size(); ++r)
    if (failed[static_cast<size_t>(r)] != 0)
      SY_THROW(IoError, "checkpoint '", dir, "': rank ", r, " failed to ", step,
               r == world.rank() ? ": " + my_error : std::string(" (see its error)"),
               step.starts_with("load") ? std::string() : std::string("; the previous generation stays the checkpoint"));
}

namespace {

// Rank 0 holds DIR/.lock (flock) from choosing the generation until the
// manifest is in place, so two jobs saving into one directory fail instead
// of interleaving their shards.
class DirectoryLock {
 public:
  explicit DirectoryLock(const std::string& dir) {
    const std::string path = (fs::path(dir) / ".lock").string();
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) SY_THROW(IoError, "cannot open '", path, "': ", std::strerror(errno));
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      ::close(fd_);
      SY_THROW(IoError, "another process is saving into this directory (it holds '", path, "')");
    }
  }
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;
  ~DirectoryLock() {
    ::flock(fd_, LOCK_UN);
    ::close(fd_);
  }

 private:
  int fd_ = -1;
};

}  // namespace

uint64_t save_checkpoint(Communicator& world, const std::string& dir,
                         const std::vector<std::pair<std::string, TensorView>>& tensors,
                         const std::map<std::string, std::string>& metadata,
                         const std::map<std::string, std::string>& side_files) {
  const int rank = world.rank(), W = world.size();
  // Rank 0 locks the directory and decides the generation.
  std::unique_ptr<DirectoryLock> lock;
  double generation_value = 0;
  std::string error;
  if (rank == 0) {
    try {
      // Readers refuse manifests over kMaxTextFileBytes: metadata that would make one is refused here, first.
      size_t meta_bytes = 0;
      for (const auto& [k, v] : metadata) meta_bytes += k.size() + v.size();
      if (meta_bytes > kMaxTextFileBytes / 2)
        SY_THROW(InvalidArgument, "checkpoint '", dir, "': ", meta_bytes, " bytes of metadata; at most ",
                 kMaxTextFileBytes / 2, " fit in a manifest (store large data as tensors)");
      fs::create_directories(dir);
      lock = std::make_unique<DirectoryLock>(dir);
      generation_value = static_cast<double>(current_generation(dir) + 1);
      failpoint("checkpoint.locked");
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  agree_on_success(world, dir, error, "start a new generation");
  world.broadcast(TensorView(&generation_value, DType::f64, {1}), 0).wait();
  const auto generation = static_cast<uint64_t>(generation_value);
  // Each rank's shard, then its size and checksum to rank 0.
  double mine[2] = {0, 0};
  error.clear();
  try {
    const CheckpointShard shard = write_shard(dir, generation, rank, W, tensors);
    failpoint("checkpoint.shard_saved");
    mine[0] = static_cast<double>(shard.bytes);
    mine[1] = static_cast<double>(shard.crc32);
  } catch (const std::exception& e) {
    error = e.what();
  }
  agree_on_success(world, dir, error, "write its shard of generation " + std::to_string(generation));
  std::vector<double> all(static_cast<size_t>(2 * W));
  world.allgather(TensorView(mine, DType::f64, {2}), TensorView(all.data(), DType::f64, {2 * W})).wait();
  error.clear();
  if (rank == 0) {
    try {
      std::vector<CheckpointShard> shards;
      for (int r = 0; r < W; ++r)
        shards.push_back({shard_name(generation, r, W), static_cast<uint64_t>(all[static_cast<size_t>(2 * r)]),
                          static_cast<uint32_t>(all[static_cast<size_t>(2 * r + 1)])});
      publish(dir, generation, shards, metadata);
      failpoint("checkpoint.published");
      for (const auto& [name, text] : side_files) {  // still under the lock, after the commit
        const std::string path = (fs::path(dir) / name).string(), tmp = path + ".tmp";
        {
          std::ofstream out(tmp, std::ios::trunc);
          out << text;
          out.flush();
          if (!out) SY_THROW(IoError, "generation ", generation, " is published, but '", tmp, "' cannot be written");
        }
        fsync_path(tmp);
        fs::rename(tmp, path);
      }
    } catch (const std::exception& e) {
      error = e.what();
    }
    if (error.empty()) {
      failpoint("checkpoint.side_files_written");
      remove_older(dir, generation);
    }
  }
  agree_on_success(world, dir, error, "publish generation " + std::to_string(generation));
  return generation;
}

bool Checkpoint::exists(const std::string& dir) { return fs::exists(fs::path(dir) / "manifest.json"); }

CheckpointManifest parse_checkpoint_manifest(const std::string& text, const std::string& dir) {
  CheckpointManifest c;
  Json m;
  try {
    m = parse_untrusted_json(text, dir + "/manifest.json");
    if (m.at("format").get<std::string>() != kCheckpointFormat)
      SY_THROW(InvalidArgument, "format '", m.at("format").get<std::string>(), "', expected ", kCheckpointFormat);
    c.generation = json_integer<uint64_t>(m.at("generation"), "generation");
    c.world_size = json_integer<int>(m.at("world_size"), "world_size");
    if (c.world_size < 1 || c.world_size > (1 << 20))
      SY_THROW(InvalidArgument, "world_size = ", c.world_size, ", expected 1..", 1 << 20);
    for (const auto& [k, v] : m.at("metadata").items()) c.metadata[k] = v.get<std::string>();
    for (const Json& s : m.at("shards")) {
      const std::string file = s.at("file").get<std::string>();
      // A shard is a file in this directory: no path may lead out of it.
      if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..")
        SY_THROW(InvalidArgument, "shard file '", file, "' is not a file name in the checkpoint directory");
      c.shards.push_back({file, json_integer<uint64_t>(s.at("bytes"), "bytes"),
                          json_integer<uint32_t>(s.at("crc32"), "crc32")});
    }
  } catch (const std::exception& e) {
    SY_THROW(InvalidArgument, "checkpoint '", dir, "': manifest.json is malformed: ", e.what());
  }
  if (static_cast<int>(c.shards.size()) != c.world_size)
    SY_THROW(InvalidArgument, "checkpoint '", dir, "': the manifest lists ", c.shards.size(), " shards for world size ",
             c.world_size);
  return c;
}

Checkpoint Checkpoint::open(const std::string& dir) {
  const fs::path manifest_path = fs::path(dir) / "manifest.json";
  if (!fs::exists(manifest_path))
    SY_THROW(IoError, "checkpoint '", dir, "': no manifest.json there (not a checkpoint directory, or no save has "
             "completed)");
  Checkpoint c;
  c.dir_ = dir;
  CheckpointManifest m = parse_checkpoint_manifest(read_untrusted_file(manifest_path.string()), dir);
  c.generation_ = m.generation;
  c.world_size_ = m.world_size;
  c.metadata_ = std::move(m.metadata);
  c.shards_ = std::move(m.shards);
  for (const CheckpointShard& s : c.shards_) {
    const fs::path p = fs::path(dir) / s.file;
    if (!fs::exists(p))
      SY_THROW(InvalidArgument, "checkpoint '", dir, "' generation ", c.generation_, ": shard '", s.file,
               "' is missing");
    const auto [bytes, crc] = file_crc(p.string());
    if (bytes != s.bytes || crc != s.crc32)
      SY_THROW(InvalidArgument, "checkpoint '", dir, "' generation ", c.generation_, ": shard '", s.file, "' is torn (",
               bytes, " bytes, CRC-32 ", crc, "; the manifest says ", s.bytes, " bytes, CRC-32 ", s.crc32, ")");
    c.files_.push_back(SafetensorsFile::open(p.string()));  // mapped, not copied
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
  convert(t.data(), DType::bf16, out.data(), DType::f32, static_cast<size_t>(t.numel()));  // exact widening
  return out;
}

int checkpoint_expert_of(const std::string& tensor) {
  static const std::regex pattern(R"((^|.*\.)experts\.(\d+)\..*)");
  std::smatch m;
  return std::regex_match(tensor, m, pattern) ? std::stoi(m[2].str()) : -1;
}

ReshardReport reshard_checkpoint(const std::string& source_dir, const std::string& target_dir, int ranks) {
  if (ranks < 1) SY_THROW(InvalidArgument, "reshard: ranks = ", ranks, ", expected >= 1");
  const Checkpoint source = Checkpoint::open(source_dir);
  int experts = 0;
  for (const std::string& name : source.names()) experts = std::max(experts, checkpoint_expert_of(name) + 1);
  if (experts > 0 && experts % ranks != 0 && ranks % experts != 0)
    SY_THROW(InvalidArgument, "reshard: ", experts, " experts cannot be laid out over ", ranks,
             " ranks (expected a rank count dividing the expert count, or a multiple of it)");
  // Where a layer of `ranks` ranks stores expert e (identity placement; a sliced expert: its first slice's rank).
  auto owner = [&](int e) { return experts >= ranks ? e / (experts / ranks) : e * (ranks / experts); };
  std::vector<std::vector<std::string>> names(static_cast<size_t>(ranks));
  for (const std::string& name : source.names()) {
    const int e = checkpoint_expert_of(name);
    names[static_cast<size_t>(e < 0 ? 0 : owner(e))].push_back(name);
  }
  fs::create_directories(target_dir);
  DirectoryLock lock(target_dir);
  const uint64_t generation = current_generation(target_dir) + 1;
  std::vector<CheckpointShard> shards;
  for (int r = 0; r < ranks; ++r) {
    std::vector<Tensor> keep;
    std::vector<std::pair<std::string, TensorView>> tensors;
    for (const std::string& name : names[static_cast<size_t>(r)]) {
      keep.push_back(source.load(name));
      tensors.emplace_back(name, keep.back().view());
    }
    shards.push_back(write_shard(target_dir, generation, r, ranks, tensors));
  }
  publish(target_dir, generation, shards, source.metadata());
  remove_older(target_dir, generation);
  return {experts, source.world_size(), ranks};
}

Tensor Checkpoint::load(const std::string& tensor) const {
  const auto it = where_.find(tensor);
  if (it == where_.end())
    SY_THROW(InvalidArgument, "checkpoint '", dir_, "' generation ", generation_, ": no tensor '", tensor, "'");
  return files_[it->second].load(tensor);
}

}  // namespace switchyard
