// safetensors: round trips of every dtype and odd shapes, a hand-built file
// read without our writer, and malformed files rejected with clear errors.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstring>
#include <filesystem>

#include "core/rng.h"
#include "core/safetensors.h"

namespace switchyard {
namespace {

std::string temp_path(const std::string& stem) {
  return (std::filesystem::temp_directory_path() / (stem + "." + std::to_string(::getpid()) + ".safetensors")).string();
}

// A file as bytes: 8-byte little-endian header length, the header, the data.
std::shared_ptr<const std::vector<uint8_t>> file_bytes(const std::string& header, const std::vector<uint8_t>& data) {
  auto bytes = std::make_shared<std::vector<uint8_t>>();
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) bytes->push_back(static_cast<uint8_t>(n >> (8 * i)));
  bytes->insert(bytes->end(), header.begin(), header.end());
  bytes->insert(bytes->end(), data.begin(), data.end());
  return bytes;
}

void expect_rejected(const std::string& header, const std::vector<uint8_t>& data, const std::string& needle) {
  try {
    SafetensorsFile::parse(file_bytes(header, data), "bad.safetensors");
    ADD_FAILURE() << "accepted: " << header;
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
    EXPECT_NE(std::string(e.what()).find("bad.safetensors"), std::string::npos) << e.what();
  }
}

TEST(Safetensors, RoundTripsEveryDtypeOddShapesEmptyAndScalar) {
  Rng rng(fresh_seed());
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  std::vector<Tensor> kept;
  std::vector<std::pair<std::string, TensorView>> tensors;
  int i = 0;
  for (DType t : kAllDTypes) {
    Tensor x = Tensor::empty({3, static_cast<int64_t>(5 + i)}, t);
    rng.fill_uniform(x, is_floating(t) ? -2 : 0, is_floating(t) ? 2 : 100);
    kept.push_back(x);
    tensors.emplace_back("layer." + std::string(dtype_name(t)), x.view());
    ++i;
  }
  Tensor empty = Tensor::empty({0, 4}, DType::f32), scalar = Tensor::empty({}, DType::f64);
  scalar.data_as<double>()[0] = 3.25;
  kept.push_back(empty), kept.push_back(scalar);
  tensors.emplace_back("empty", empty.view());
  tensors.emplace_back("scalar", scalar.view());
  const std::string path = temp_path("roundtrip");
  save_safetensors(path, tensors, {{"format", "pt"}, {"step", "12"}});
  SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_EQ(f.entries().size(), tensors.size());
  EXPECT_EQ(f.metadata().at("step"), "12");
  for (const auto& [name, view] : tensors) {
    Tensor back = f.load(name);
    EXPECT_EQ(back.dtype(), view.dtype()) << name;
    EXPECT_EQ(back.shape(), view.shape()) << name;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(back.data()) % kHostAlignment, 0u);
    if (view.nbytes()) {
      EXPECT_EQ(std::memcmp(back.data(), view.data(), view.nbytes()), 0) << name;
    }
  }
  EXPECT_EQ(f.load("scalar").data_as<double>()[0], 3.25);
  EXPECT_THROW(f.load("layer.f32", {5, 3}, DType::f32), InvalidArgument);
  EXPECT_THROW(f.load("missing"), InvalidArgument);
  std::filesystem::remove(path);
}

TEST(Safetensors, ReadsAFileBuiltByHandInTheFormatsOwnLayout) {
  // Two tensors, out of offset order in the header, with trailing header padding.
  const std::string header =
      R"({"b":{"dtype":"I32","shape":[2],"data_offsets":[8,16]},"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},"__metadata__":{"who":"hand"}}   )";
  std::vector<uint8_t> data = {0x80, 0x3f, 0x00, 0x40, 0x40, 0x40, 0x80, 0xbf,  // bf16 1, 2, 3, -1
                               7, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff};               // i32 7, -2
  SafetensorsFile f = SafetensorsFile::parse(file_bytes(header, data), "hand.safetensors");
  Tensor a = f.load("a", {2, 2}, DType::bf16);
  EXPECT_EQ(a.data_as<bf16>()[0].to_float(), 1.0f);
  EXPECT_EQ(a.data_as<bf16>()[2].to_float(), 3.0f);
  EXPECT_EQ(a.data_as<bf16>()[3].to_float(), -1.0f);
  Tensor b = f.load("b");
  EXPECT_EQ(b.data_as<int32_t>()[1], -2);
  EXPECT_EQ(f.metadata().at("who"), "hand");
}

TEST(Safetensors, MalformedFilesAreRejectedNamingTheProblem) {
  const std::vector<uint8_t> eight(8, 0);
  try {
    SafetensorsFile::parse(std::make_shared<std::vector<uint8_t>>(4, 0), "bad.safetensors");
    ADD_FAILURE();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("only 4 bytes"), std::string::npos);
  }
  {
    auto bytes = std::make_shared<std::vector<uint8_t>>(8, 0xff);  // header length 2^64-1
    EXPECT_THROW(SafetensorsFile::parse(bytes, "bad.safetensors"), InvalidArgument);
  }
  {
    auto bytes = std::make_shared<std::vector<uint8_t>>(*file_bytes("{}", {}));
    (*bytes)[0] = 200;  // claims a longer header than the file holds
    EXPECT_THROW(SafetensorsFile::parse(bytes, "bad.safetensors"), InvalidArgument);
  }
  expect_rejected("[1,2]   ", {}, "does not start with a JSON object");
  expect_rejected("{\"a\":", {}, "not valid JSON");
  expect_rejected(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", eight, "tensor 'a': missing 'dtype'");
  expect_rejected(R"({"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}})", eight, "dtype 'C64' is not supported");
  expect_rejected(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight, "not a non-negative integer");
  expect_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", eight, "past the data section");
  expect_rejected(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight, "needs 12");
  expect_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", eight, "ends before it begins");
  expect_rejected(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}})",
                  eight, "overlaps");
  expect_rejected(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight, "belong to no tensor");
  expect_rejected(R"({"a":{"dtype":"U8","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}})", eight,
                  "overflows");
  expect_rejected(R"({"__metadata__":{"k":1}})", {}, "is not a string");
  EXPECT_THROW(SafetensorsFile::open("/nonexistent/x.safetensors"), IoError);
}

TEST(Safetensors, WriterRefusesDuplicateOrInvalidNames) {
  Tensor t = Tensor::zeros({2}, DType::f32);
  const std::string path = temp_path("dup");
  EXPECT_THROW(save_safetensors(path, {{"w", t.view()}, {"w", t.view()}}), InvalidArgument);
  EXPECT_THROW(save_safetensors(path, {{"", t.view()}}), InvalidArgument);
  EXPECT_THROW(save_safetensors(path, {{"__metadata__", t.view()}}), InvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(path));
}

}  // namespace
}  // namespace switchyard
