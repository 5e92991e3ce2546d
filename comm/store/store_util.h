// Helpers shared by the Store implementations.
#pragma once

#include <chrono>
#include <string>
#include <string_view>

#include "comm/store/store.h"

namespace switchyard::store_util {

// now + timeout, capped so that Milliseconds::max() cannot overflow.
std::chrono::steady_clock::time_point deadline_after(Store::Milliseconds timeout);
// Keys and values may hold any byte; error messages show non-printable ones as \xNN.
std::string printable(const std::string& bytes, size_t max_shown = 64);
// The integer an add() counter holds; InvalidArgument naming the store and key otherwise.
int64_t parse_counter(std::string_view store_name, const std::string& key, const Store::Bytes& value);

}  // namespace switchyard::store_util
