// PNG plots through gnuplot, for benchmarks whose results a person would
// rather look at: the CSV is always written; the plot is skipped, saying why,
// when gnuplot is missing or fails.
#pragma once

#include <string>

namespace switchyard {

// Writes PNG.gp (a pngcairo terminal, output PNG, then `body`) and runs
// gnuplot on it; prints "# wrote PNG" or why no plot was made.
void plot_png(const std::string& png, const std::string& body);

}  // namespace switchyard
