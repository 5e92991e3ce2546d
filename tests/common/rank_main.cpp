// main() of the multi-rank test binaries: GoogleTest on every rank of the
// harness's world (thread-ranks, mpirun or `switchyard launch`).
#include <gtest/gtest.h>

#include "tests/common/rank_harness.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  switchyard::testing::init_rank_harness(argc, argv);
  const int result = RUN_ALL_TESTS();
  switchyard::testing::shutdown_rank_harness();
  return result;
}
