#include "tests/model/train/test_data.h"

#include <zlib.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <unistd.h>

namespace vdm::test_data {

void WriteIdx(const std::string& path, const std::vector<int32_t>& dims,
              const std::vector<uint8_t>& data) {
  std::string bytes = {0, 0, 0x08, static_cast<char>(dims.size())};
  for (int32_t d : dims) {
    for (int shift = 24; shift >= 0; shift -= 8) {
      bytes.push_back(static_cast<char>((d >> shift) & 0xff));
    }
  }
  bytes.append(data.begin(), data.end());
  if (path.size() > 3 && path.substr(path.size() - 3) == ".gz") {
    gzFile f = gzopen(path.c_str(), "wb");
    if (f == nullptr) throw std::runtime_error("gzopen " + path);
    gzwrite(f, bytes.data(), bytes.size());
    gzclose(f);
  } else {
    std::ofstream(path, std::ios::binary) << bytes;
  }
}

Image8 SyntheticImage(int i, int size) {
  std::mt19937 rng(i * 7919 + size);
  std::uniform_int_distribution<int> noise(0, 40);
  Image8 image{1, size, size, std::vector<uint8_t>(size * size)};
  const int bar = 2 + 2 * (i % 10);
  for (int y = 0; y < size; ++y) {
    for (int x = 0; x < size; ++x) {
      const bool on = std::abs(y - bar) <= 1 && x > 3 && x < size - 4;
      image.pixels[y * size + x] =
          static_cast<uint8_t>(on ? 220 + noise(rng) / 2 : noise(rng));
    }
  }
  return image;
}

void WriteSplit(const std::string& dir, const std::string& split, int n,
                int size, int label_offset) {
  std::vector<uint8_t> images;
  std::vector<uint8_t> labels(n);
  for (int i = 0; i < n; ++i) {
    labels[i] = static_cast<uint8_t>(i % 10 + label_offset);
    const Image8 image = SyntheticImage(i, size);
    images.insert(images.end(), image.pixels.begin(), image.pixels.end());
  }
  WriteIdx(dir + "/" + split + "-images-idx3-ubyte.gz", {n, size, size},
           images);
  WriteIdx(dir + "/" + split + "-labels-idx1-ubyte", {n}, labels);
}

void WritePngFolder(const std::string& dir, int n, bool labeled, int size) {
  for (int i = 0; i < n; ++i) {
    std::filesystem::path folder(dir);
    if (labeled) folder /= std::to_string(i % 10);
    std::filesystem::create_directories(folder);
    auto png = EncodePng(SyntheticImage(i, size));
    if (!png.ok()) throw std::runtime_error("EncodePng");
    std::ofstream(folder / (std::to_string(i) + ".png"), std::ios::binary)
        << *png;
  }
}

TrainDir::TrainDir(const std::string& name) {
  dir_ = (std::filesystem::temp_directory_path() /
          ("vdm_" + name + "_" + std::to_string(::getpid())))
             .string();
  std::filesystem::remove_all(dir_);
  std::filesystem::create_directories(data());
  WriteSplit(data(), "train", 64);
  WriteSplit(data(), "t10k", 32);
}

TrainDir::~TrainDir() { std::filesystem::remove_all(dir_); }

std::string TinyModel() {
  return std::string(VDM_TEST_MODELS_DIR) + "/tiny.pt";
}

Trainer::Options SmallOptions(const TrainDir& dir) {
  Trainer::Options o;
  o.data_dir = dir.data();
  o.init_path = TinyModel();
  o.out_path = dir.out();
  o.steps = 4;
  o.batch_size = 8;
  o.warmup_steps = 2;
  o.eval_every = 2;
  o.eval_images = 16;
  o.test_images = 32;
  o.eval_times = 2;
  o.eval_batch = 32;
  o.eval_conditional = true;
  o.checkpoint_every = 2;
  o.log_every = 2;
  o.log = nullptr;
  o.samples_per_class = 0;
  return o;
}

}  // namespace vdm::test_data
