// Element types and conversions between them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace switchyard {

enum class DType : uint8_t { f32, f64, bf16, f16, fp8_e4m3, i32, i64, u8 };

inline constexpr DType kAllDTypes[] = {DType::f32,      DType::f64, DType::bf16, DType::f16,
                                       DType::fp8_e4m3, DType::i32, DType::i64,  DType::u8};

size_t dtype_size(DType t);
std::string_view dtype_name(DType t);  // "f32", "bf16", ...
std::optional<DType> parse_dtype(std::string_view name);  // accepts our names and "float", "half", ...
bool is_floating(DType t);

// bfloat16 bits; conversion from float rounds to nearest even and keeps NaN a NaN.
struct bf16 {
  uint16_t bits = 0;
  static bf16 from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      r.bits = static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      r.bits = static_cast<uint16_t>(u >> 16);
    }
    return r;
  }
  float to_float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

// IEEE half bits; round to nearest even, overflow to infinity, subnormals kept.
struct f16 {
  uint16_t bits = 0;
  static f16 from_float(float f);
  float to_float() const;
};

// OCP fp8 e4m3 ("fn": no infinities, max 448, NaN = S.1111.111); round to
// nearest even, values beyond 448 saturate to +-448 (as dispatch payloads want).
struct fp8_e4m3 {
  uint8_t bits = 0;
  static fp8_e4m3 from_float(float f);
  float to_float() const;
};

template <typename T>
struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::f32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::f64; };
template <> struct dtype_of<bf16> { static constexpr DType value = DType::bf16; };
template <> struct dtype_of<f16> { static constexpr DType value = DType::f16; };
template <> struct dtype_of<fp8_e4m3> { static constexpr DType value = DType::fp8_e4m3; };
template <> struct dtype_of<int32_t> { static constexpr DType value = DType::i32; };
template <> struct dtype_of<int64_t> { static constexpr DType value = DType::i64; };
template <> struct dtype_of<uint8_t> { static constexpr DType value = DType::u8; };
template <typename T>
inline constexpr DType dtype_v = dtype_of<T>::value;

// Element-wise conversion of n elements; through double for integers and f64,
// through float for the narrow floating types. Integer targets round toward zero
// and saturate.
void convert(const void* src, DType src_type, void* dst, DType dst_type, size_t n);

// One element as double (tests and checks).
double load_as_double(const void* base, DType t, size_t index);
void store_from_double(void* base, DType t, size_t index, double value);

}  // namespace switchyard
