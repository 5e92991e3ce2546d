#include "core/dtype.h"

#include <cmath>
#include <limits>

#include "core/error.h"

namespace switchyard {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::bf16: return 2;
    case DType::f16: return 2;
    case DType::fp8_e4m3: return 1;
    case DType::i32: return 4;
    case DType::i64: return 8;
    case DType::u8: return 1;
  }
  SY_THROW(InvalidArgument, "unknown dtype code ", static_cast<int>(t));
}

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
    case DType::fp8_e4m3: return "fp8_e4m3";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
    case DType::u8: return "u8";
  }
  return "unknown";
}

std::optional<DType> parse_dtype(std::string_view name) {
  struct Alias { std::string_view name; DType type; };
  static constexpr Alias aliases[] = {
      {"f32", DType::f32},   {"float", DType::f32},   {"float32", DType::f32},
      {"f64", DType::f64},   {"double", DType::f64},  {"float64", DType::f64},
      {"bf16", DType::bf16}, {"bfloat16", DType::bf16},
      {"f16", DType::f16},   {"half", DType::f16},    {"float16", DType::f16},
      {"fp8_e4m3", DType::fp8_e4m3}, {"fp8", DType::fp8_e4m3}, {"e4m3", DType::fp8_e4m3},
      {"i32", DType::i32},   {"int32", DType::i32},   {"int", DType::i32},
      {"i64", DType::i64},   {"int64", DType::i64},
      {"u8", DType::u8},     {"uint8", DType::u8},
  };
  for (const auto& a : aliases)
    if (a.name == name) return a.type;
  return std::nullopt;
}

bool is_floating(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::bf16 || t == DType::f16 ||
         t == DType::fp8_e4m3;
}

f16 f16::from_float(float value) {
  uint32_t x;
  std::memcpy(&x, &value, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  f16 r;
  if (abs > 0x7f800000u) {  // NaN
    r.bits = static_cast<uint16_t>(sign | 0x7e00u);
    return r;
  }
  if (abs >= 0x477ff000u) {  // rounds to >= 65520: infinity
    r.bits = static_cast<uint16_t>(sign | 0x7c00u);
    return r;
  }
  if (abs < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    // value * 2^24 gives the subnormal mantissa; nearbyint rounds to nearest even.
    float a;
    std::memcpy(&a, &abs, 4);
    const auto m = static_cast<uint32_t>(std::nearbyint(a * 16777216.0f));
    r.bits = static_cast<uint16_t>(sign | m);
    return r;
  }
  // Normal: rebias exponent (127 -> 15), round mantissa 23 -> 10 bits to nearest even.
  uint32_t h = abs - 0x38000000u;
  h += 0xfffu + ((h >> 13) & 1u);
  r.bits = static_cast<uint16_t>(sign | (h >> 13));
  return r;
}

float f16::to_float() const {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exp = (bits >> 10) & 0x1fu;
  const uint32_t man = bits & 0x3ffu;
  uint32_t out;
  if (exp == 0) {
    const float mag = std::ldexp(static_cast<float>(man), -24);
    float f = sign ? -mag : mag;
    return f;
  } else if (exp == 31) {
    out = sign | 0x7f800000u | (man << 13);
  } else {
    out = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

fp8_e4m3 fp8_e4m3::from_float(float value) {
  fp8_e4m3 r;
  if (std::isnan(value)) {
    r.bits = 0x7f;
    return r;
  }
  const uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  float a = std::fabs(value);
  if (a >= 448.0f) {
    r.bits = sign | 0x7e;  // saturate to 448
    return r;
  }
  if (a < std::ldexp(1.0f, -6)) {  // subnormal: step 2^-9
    const auto m = static_cast<uint32_t>(std::nearbyint(a * 512.0f));  // m may reach 8 = smallest normal
    r.bits = static_cast<uint8_t>(sign | m);
    return r;
  }
  int e;
  const float frac = std::frexp(a, &e);  // a = frac * 2^e, frac in [0.5, 1)
  // a = 1.m * 2^(e-1); mantissa with 3 bits: round (frac*16) to nearest even -> [8, 16]
  auto m = static_cast<uint32_t>(std::nearbyint(frac * 16.0f));
  int exp = e - 1 + 7;
  if (m == 16) {
    m = 8;
    ++exp;
  }
  uint32_t bits = (static_cast<uint32_t>(exp) << 3) | (m - 8);
  if (bits > 0x7e) bits = 0x7e;
  r.bits = static_cast<uint8_t>(sign | bits);
  return r;
}

float fp8_e4m3::to_float() const {
  const uint32_t exp = (bits >> 3) & 0xfu;
  const uint32_t man = bits & 0x7u;
  if (exp == 15 && man == 7) return std::numeric_limits<float>::quiet_NaN();
  float mag = exp == 0 ? std::ldexp(static_cast<float>(man), -9)
                       : std::ldexp(1.0f + static_cast<float>(man) / 8.0f, static_cast<int>(exp) - 7);
  return (bits & 0x80) ? -mag : mag;
}

namespace {

template <typename T>
double to_double(T v) {
  if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16> || std::is_same_v<T, fp8_e4m3>)
    return v.to_float();
  else
    return static_cast<double>(v);
}

template <typename T>
T from_double(double d) {
  if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16> || std::is_same_v<T, fp8_e4m3>) {
    return T::from_float(static_cast<float>(d));
  } else if constexpr (std::is_floating_point_v<T>) {
    return static_cast<T>(d);
  } else {
    if (std::isnan(d)) return T{0};
    constexpr double lo = static_cast<double>(std::numeric_limits<T>::lowest());
    constexpr double hi = static_cast<double>(std::numeric_limits<T>::max());
    if (d <= lo) return std::numeric_limits<T>::lowest();
    if (d >= hi) return std::numeric_limits<T>::max();
    return static_cast<T>(d);
  }
}

template <typename F>
decltype(auto) visit_dtype(DType t, F&& f) {
  switch (t) {
    case DType::f32: return f(float{});
    case DType::f64: return f(double{});
    case DType::bf16: return f(bf16{});
    case DType::f16: return f(f16{});
    case DType::fp8_e4m3: return f(fp8_e4m3{});
    case DType::i32: return f(int32_t{});
    case DType::i64: return f(int64_t{});
    case DType::u8: return f(uint8_t{});
  }
  SY_THROW(InvalidArgument, "unknown dtype code ", static_cast<int>(t));
}

}  // namespace

void convert(const void* src, DType src_type, void* dst, DType dst_type, size_t n) {
  if (src_type == dst_type) {
    std::memmove(dst, src, n * dtype_size(src_type));
    return;
  }
  // The two hot pairs directly (rounding to nearest even, exact widening); the rest through double.
  if (src_type == DType::f32 && dst_type == DType::bf16) {
    const auto* in = static_cast<const float*>(src);
    auto* out = static_cast<bf16*>(dst);
    for (size_t i = 0; i < n; ++i) out[i] = bf16::from_float(in[i]);
    return;
  }
  if (src_type == DType::bf16 && dst_type == DType::f32) {
    const auto* in = static_cast<const bf16*>(src);
    auto* out = static_cast<float*>(dst);
    for (size_t i = 0; i < n; ++i) out[i] = in[i].to_float();
    return;
  }
  visit_dtype(src_type, [&](auto s) {
    using S = decltype(s);
    visit_dtype(dst_type, [&](auto d) {
      using D = decltype(d);
      const S* in = static_cast<const S*>(src);
      D* out = static_cast<D*>(dst);
      for (size_t i = 0; i < n; ++i) out[i] = from_double<D>(to_double(in[i]));
    });
  });
}

double load_as_double(const void* base, DType t, size_t index) {
  return visit_dtype(t, [&](auto z) -> double {
    using T = decltype(z);
    return to_double(static_cast<const T*>(base)[index]);
  });
}

void store_from_double(void* base, DType t, size_t index, double value) {
  visit_dtype(t, [&](auto z) {
    using T = decltype(z);
    static_cast<T*>(base)[index] = from_double<T>(value);
  });
}

}  // namespace switchyard
