// Small synthetic datasets for the trainer's tests: IDX files and PNG
// folders of structured 28x28 images (a bright bar whose row is the label).
#ifndef VDM_TESTS_MODEL_TRAIN_TEST_DATA_H_
#define VDM_TESTS_MODEL_TRAIN_TEST_DATA_H_

#include <cstdint>
#include <string>
#include <vector>

#include "model/train/trainer.h"
#include "model/vdm/image_io.h"

namespace vdm::test_data {

// An IDX file of unsigned bytes, gzip-compressed when the name ends in .gz.
void WriteIdx(const std::string& path, const std::vector<int32_t>& dims,
              const std::vector<uint8_t>& data);

// Image i of a synthetic set: a bar at a row set by label (i % 10) on a
// dark noisy background, size x size gray.
Image8 SyntheticImage(int i, int size = 28);

// `n` synthetic images as <dir>/<split>-images-idx3-ubyte.gz and labels
// (i % 10 + label_offset) as <dir>/<split>-labels-idx1-ubyte.
void WriteSplit(const std::string& dir, const std::string& split, int n,
                int size = 28, int label_offset = 0);

// `n` synthetic images as PNGs: <dir>/<i % 10>/<i>.png when labeled, else
// <dir>/<i>.png.
void WritePngFolder(const std::string& dir, int n, bool labeled,
                    int size = 28);

// A fresh directory `<tmp>/vdm_<name>_<pid>` with `data/` holding 64
// training and 32 test images (IDX); removed by the destructor.
class TrainDir {
 public:
  explicit TrainDir(const std::string& name);
  ~TrainDir();
  std::string path() const { return dir_; }
  std::string data() const { return dir_ + "/data"; }
  std::string out() const { return dir_ + "/out.pt"; }

 private:
  std::string dir_;
};

// Options for a fast run of the tiny test model on a TrainDir: 4 steps at
// batch 8, validation and checkpoints every 2 steps, silent, no sample grid.
Trainer::Options SmallOptions(const TrainDir& dir);

// The tiny class-conditional test model (exported by make_test_models.py).
std::string TinyModel();

}  // namespace vdm::test_data

#endif  // VDM_TESTS_MODEL_TRAIN_TEST_DATA_H_
