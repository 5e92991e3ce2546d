// safetensors files (the Hugging Face format): an 8-byte little-endian header
// length, a JSON header naming each tensor's dtype, shape and byte range, then
// the data. Used for layer weights and checkpoints (keyed by logical name).
// The reader trusts nothing in the header: lengths, offsets, dtypes, shapes,
// overlaps and holes are checked, and every error names the file and tensor.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace switchyard {

struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::f32;
  Shape shape;
  uint64_t begin = 0;  // byte range within the data section
  uint64_t end = 0;
};

class SafetensorsFile {
 public:
  // Maps the file read-only and validates the whole header. IoError when the
  // file cannot be read, InvalidArgument when its contents are malformed.
  static SafetensorsFile open(const std::string& path);
  // The same checks on bytes already in memory (`name` appears in errors).
  static SafetensorsFile parse(std::shared_ptr<const std::vector<uint8_t>> bytes, const std::string& name);

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& tensor) const;
  const SafetensorsEntry& entry(const std::string& tensor) const;
  // A fresh, 64-byte aligned copy of the tensor (file data need not be aligned).
  Tensor load(const std::string& tensor) const;
  // Load and check shape and dtype, naming what differs.
  Tensor load(const std::string& tensor, const Shape& expected_shape, DType expected_dtype) const;

 private:
  SafetensorsFile() = default;
  void parse_header(const uint8_t* base, uint64_t size);
  std::string path_;
  std::shared_ptr<const void> keep_alive_;  // the mapping or the byte vector
  const uint8_t* data_ = nullptr;           // start of the data section
  uint64_t data_size_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Writes tensors (contiguous host memory) in the given order, atomically
// and durably (a temporary file, fsynced, renamed into place, the directory
// fsynced). Names must be unique and non-empty.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, TensorView>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// fsync a file or directory (a directory: the names in it are durable).
void fsync_path(const std::string& path);

// The format's dtype names ("F32", "BF16", "F8_E4M3", ...).
std::string safetensors_dtype_name(DType t);

}  // namespace switchyard
