// One fuzz harness per parser of files Switchyard reads from users. Each
// defines LLVMFuzzerTestOneInput: the input goes to the parser, and a refusal
// is a switchyard::Error (a clear message naming the file and the field).
// Anything else escaping, a crash, unbounded memory or time is a bug. Built
// with libFuzzer (clang, ASan + UBSan: `make fuzz`) or with tests/fuzz/driver.cpp
// (any compiler: replays the corpus and saved crashers, then mutates for a
// few seconds; `make test`).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.h"

#define SWITCHYARD_FUZZ_HARNESS(body)                                          \
  extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {    \
    const std::string text(reinterpret_cast<const char*>(data), size);         \
    try {                                                                      \
      body;                                                                    \
    } catch (const switchyard::Error&) {                                       \
      /* a refusal with a message: what the parser must do with bad input */  \
    }                                                                          \
    return 0;                                                                  \
  }
