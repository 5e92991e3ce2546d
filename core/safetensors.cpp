#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/failpoint.h"
#include "core/untrusted.h"

namespace switchyard {
namespace {

using Json = nlohmann::json;

// Larger headers are refused (the reference implementation's limit is 100 MB).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

constexpr std::pair<const char*, DType> kDTypeNames[] = {
    {"F32", DType::f32}, {"F64", DType::f64}, {"BF16", DType::bf16}, {"F16", DType::f16},
    {"F8_E4M3", DType::fp8_e4m3}, {"I32", DType::i32}, {"I64", DType::i64}, {"U8", DType::u8}};

std::string known_dtype_names() {
  std::string out;
  for (const auto& [name, t] : kDTypeNames) out += (out.empty() ? "" : ", ") + std::string(name);
  return out;
}

uint64_t read_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

struct Mapping {
  void* address = nullptr;
  size_t length = 0;
  ~Mapping() {
    if (address && address != MAP_FAILED) munmap(address, length);
  }
};

}  // namespace

std::string safetensors_dtype_name(DType t) {
  for (const auto& [name, type] : kDTypeNames)
    if (type == t) return name;
  SY_THROW(NotSupported, "dtype ", dtype_name(t), " has no safetensors name");
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  // O_NONBLOCK: a FIFO must not wait for a writer; anything but a regular file is refused below.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) SY_THROW(IoError, "safetensors file '", path, "': cannot open: ", std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    SY_THROW(IoError, "safetensors file '", path, "': cannot stat: ", std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    SY_THROW(IoError, "safetensors file '", path, "': not a regular file");
  }
  auto mapping = std::make_shared<Mapping>();
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size > 0) {
    mapping->length = static_cast<size_t>(size);
    mapping->address = mmap(nullptr, mapping->length, PROT_READ, MAP_PRIVATE, fd, 0);
  }
  const int map_errno = errno;
  ::close(fd);
  if (size > 0 && mapping->address == MAP_FAILED)
    SY_THROW(IoError, "safetensors file '", path, "': cannot map ", size, " bytes: ", std::strerror(map_errno));
  SafetensorsFile f;
  f.path_ = path;
  f.keep_alive_ = mapping;
  f.parse_header(static_cast<const uint8_t*>(mapping->address), size);
  return f;
}

SafetensorsFile SafetensorsFile::parse(std::shared_ptr<const std::vector<uint8_t>> bytes, const std::string& name) {
  SY_CHECK(bytes != nullptr, "parse needs bytes");
  SafetensorsFile f;
  f.path_ = name;
  f.parse_header(bytes->data(), bytes->size());
  f.keep_alive_ = std::move(bytes);
  return f;
}

void SafetensorsFile::parse_header(const uint8_t* base, uint64_t size) {
  auto fail = [&](auto&&... parts) -> void {
    SY_THROW(InvalidArgument, "safetensors file '", path_, "': ", parts...);
  };
  if (size < 8) fail("only ", size, " bytes; expected at least the 8-byte header length");
  const uint64_t header_len = read_le64(base);
  if (header_len > kMaxHeaderBytes) fail("header length ", header_len, " exceeds the limit of ", kMaxHeaderBytes, " bytes");
  if (header_len > size - 8)
    fail("header length ", header_len, " runs past the end of the file (", size - 8, " bytes after the length)");
  const char* header = reinterpret_cast<const char*>(base + 8);
  if (header_len == 0 || header[0] != '{') fail("header does not start with a JSON object");
  Json json;
  try {
    json = parse_untrusted_json(std::string_view(header, header_len), "header");
  } catch (const InvalidArgument& e) {
    fail(e.what());
  }
  if (!json.is_object()) fail("header is not a JSON object");
  data_ = base + 8 + header_len;
  data_size_ = size - 8 - header_len;

  for (auto it = json.begin(); it != json.end(); ++it) {
    const std::string& key = it.key();
    const Json& v = it.value();
    if (key == "__metadata__") {
      if (!v.is_object()) fail("__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) fail("__metadata__ value of '", m.key(), "' is not a string");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    auto bad = [&](auto&&... parts) { fail("tensor '", key, "': ", parts...); };
    if (!v.is_object()) bad("entry is not an object");
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!v.contains(field)) bad("missing '", field, "'");
    SafetensorsEntry e;
    e.name = key;
    if (!v["dtype"].is_string()) bad("dtype is not a string");
    const std::string dtype = v["dtype"].get<std::string>();
    bool known = false;
    for (const auto& [name, t] : kDTypeNames)
      if (dtype == name) e.dtype = t, known = true;
    if (!known) bad("dtype '", dtype, "' is not supported (expected one of ", known_dtype_names(), ")");
    if (!v["shape"].is_array()) bad("shape is not an array");
    uint64_t numel = 1;
    for (const Json& d : v["shape"]) {
      if (!d.is_number_unsigned()) bad("shape ", json_excerpt(v["shape"]), " has an entry that is not a non-negative integer");
      const uint64_t dim = d.get<uint64_t>();
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / dim))
        bad("shape ", json_excerpt(v["shape"]), " overflows");
      numel *= dim;
      e.shape.push_back(static_cast<int64_t>(dim));
    }
    const Json& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      bad("data_offsets ", json_excerpt(off), " is not [begin, end] with non-negative integers");
    e.begin = off[0].get<uint64_t>();
    e.end = off[1].get<uint64_t>();
    if (e.begin > e.end) bad("data_offsets [", e.begin, ", ", e.end, "] ends before it begins");
    if (e.end > data_size_) bad("data_offsets end ", e.end, " is past the data section (", data_size_, " bytes)");
    const uint64_t esize = dtype_size(e.dtype);
    if (numel > std::numeric_limits<uint64_t>::max() / esize) bad("shape ", json_excerpt(v["shape"]), " overflows");
    if (e.end - e.begin != numel * esize)
      bad("data_offsets cover ", e.end - e.begin, " bytes but shape ", shape_string(e.shape), " of ", dtype,
          " needs ", numel * esize);
    index_[key] = entries_.size();
    entries_.push_back(std::move(e));
  }

  // The data section must be covered exactly once: no overlaps, no holes.
  std::vector<const SafetensorsEntry*> by_offset;
  for (const auto& e : entries_) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t covered = 0;
  for (const SafetensorsEntry* e : by_offset) {
    if (e->begin < covered) fail("tensor '", e->name, "' [", e->begin, ", ", e->end, ") overlaps an earlier tensor");
    if (e->begin > covered) fail("bytes [", covered, ", ", e->begin, ") of the data section belong to no tensor");
    covered = e->end;
  }
  if (covered != data_size_) fail("bytes [", covered, ", ", data_size_, ") at the end of the file belong to no tensor");
}

bool SafetensorsFile::contains(const std::string& tensor) const { return index_.count(tensor) != 0; }

const SafetensorsEntry& SafetensorsFile::entry(const std::string& tensor) const {
  auto it = index_.find(tensor);
  if (it == index_.end()) SY_THROW(InvalidArgument, "safetensors file '", path_, "' has no tensor '", tensor, "'");
  return entries_[it->second];
}

Tensor SafetensorsFile::load(const std::string& tensor) const {
  const SafetensorsEntry& e = entry(tensor);
  Tensor t = Tensor::empty(e.shape, e.dtype);
  if (e.end > e.begin) std::memcpy(t.data(), data_ + e.begin, e.end - e.begin);
  return t;
}

Tensor SafetensorsFile::load(const std::string& tensor, const Shape& expected_shape, DType expected_dtype) const {
  const SafetensorsEntry& e = entry(tensor);
  if (e.shape != expected_shape || e.dtype != expected_dtype)
    SY_THROW(InvalidArgument, "safetensors file '", path_, "': tensor '", tensor, "' is ", dtype_name(e.dtype), " ",
             shape_string(e.shape), ", expected ", dtype_name(expected_dtype), " ", shape_string(expected_shape));
  return load(tensor);
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, TensorView>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  Json header = Json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, view] : tensors) {
    if (name.empty() || name == "__metadata__")
      SY_THROW(InvalidArgument, "save_safetensors '", path, "': invalid tensor name '", name, "'");
    if (header.contains(name)) SY_THROW(InvalidArgument, "save_safetensors '", path, "': tensor '", name, "' given twice");
    if (!view.device().is_cpu() || !view.is_contiguous())
      SY_THROW(InvalidArgument, "save_safetensors '", path, "': tensor '", name, "' must be contiguous host memory");
    header[name] = {{"dtype", safetensors_dtype_name(view.dtype())},
                    {"shape", view.shape()},
                    {"data_offsets", {offset, offset + view.nbytes()}}};
    offset += view.nbytes();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) SY_THROW(IoError, "save_safetensors: cannot write '", tmp, "': ", std::strerror(errno));
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    bool first = true;
    for (const auto& [name, view] : tensors) {
      if (!first && failpoints_armed()) {
        out.flush();
        failpoint("safetensors.partly_written");  // a file torn after its first tensor
      }
      first = false;
      if (view.nbytes()) out.write(static_cast<const char*>(view.data()), static_cast<std::streamsize>(view.nbytes()));
    }
    out.flush();
    if (!out) SY_THROW(IoError, "save_safetensors: writing '", tmp, "' failed: ", std::strerror(errno));
  }
  fsync_path(tmp);  // on disk before it takes the name: a crash leaves the old file or the whole new one
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    SY_THROW(IoError, "save_safetensors: cannot rename '", tmp, "' to '", path, "': ", std::strerror(err));
  }
  fsync_path(std::filesystem::path(path).parent_path().empty() ? std::string(".")
                                                               : std::filesystem::path(path).parent_path().string());
}

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) SY_THROW(IoError, "cannot open '", path, "' to sync it: ", std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  // Some filesystems cannot sync a directory (EINVAL): the file itself was synced, which is what matters most.
  if (rc != 0 && !(err == EINVAL && std::filesystem::is_directory(path)))
    SY_THROW(IoError, "fsync of '", path, "' failed: ", std::strerror(err));
}

}  // namespace switchyard
