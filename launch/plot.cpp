#include "launch/plot.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>

namespace switchyard {

void plot_png(const std::string& png, const std::string& body) {
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) {
    std::printf("# gnuplot not found: no plot (install gnuplot-nox; the CSV has the data)\n");
    return;
  }
  const std::string script = png + ".gp";
  {
    std::ofstream gp(script);
    gp << "set terminal pngcairo size 900,600\nset output '" << png << "'\n" << body;
  }
  const std::string cmd = "gnuplot '" + script + "'";
  if (std::system(cmd.c_str()) != 0) {
    std::printf("# gnuplot failed on %s; the CSV has the data\n", script.c_str());
    return;
  }
  std::printf("# wrote %s\n", png.c_str());
}

}  // namespace switchyard
