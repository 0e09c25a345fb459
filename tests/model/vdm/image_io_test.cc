#include "model/vdm/image_io.h"

#include <unistd.h>
#include <zlib.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace vdm {
namespace {

using ::testing::HasSubstr;

constexpr char kFashionTestImages[] =
    "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz";
constexpr char kFashionTestLabels[] =
    "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz";

std::string TempPath(const std::string& name) {
  return absl::StrCat(::testing::TempDir(), "/image_io_test_", getpid(), "_",
                      name);
}

Image8 Pattern(int channels, int height, int width, int seed) {
  Image8 image{channels, height, width, {}};
  image.pixels.resize(static_cast<size_t>(channels) * height * width);
  for (size_t i = 0; i < image.pixels.size(); ++i) {
    image.pixels[i] = static_cast<uint8_t>((i * 37 + seed * 11) % 256);
  }
  return image;
}

// ---- PNG -------------------------------------------------------------------

TEST(PngTest, RoundTripsGray) {
  const Image8 image = Pattern(1, 7, 5, 1);
  absl::StatusOr<std::string> png = EncodePng(image);
  ASSERT_TRUE(png.ok()) << png.status();
  absl::StatusOr<Image8> back = DecodePng(*png);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->channels, 1);
  EXPECT_EQ(back->height, 7);
  EXPECT_EQ(back->width, 5);
  EXPECT_EQ(back->pixels, image.pixels);
}

TEST(PngTest, RoundTripsRgbInPlanarOrder) {
  Image8 image = Pattern(3, 4, 6, 2);
  image.pixels[0] = 200;         // red plane, pixel (0, 0)
  image.pixels[4 * 6] = 10;      // green plane, pixel (0, 0)
  image.pixels[2 * 4 * 6] = 99;  // blue plane, pixel (0, 0)
  absl::StatusOr<std::string> png = EncodePng(image);
  ASSERT_TRUE(png.ok()) << png.status();
  absl::StatusOr<Image8> back = DecodePng(*png);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->channels, 3);
  EXPECT_EQ(back->height, 4);
  EXPECT_EQ(back->width, 6);
  EXPECT_EQ(back->pixels, image.pixels);
}

TEST(PngTest, ConvertsChannelsOnRequest) {
  Image8 gray = Pattern(1, 2, 3, 3);
  absl::StatusOr<Image8> rgb = DecodePng(*EncodePng(gray), 3);
  ASSERT_TRUE(rgb.ok()) << rgb.status();
  ASSERT_EQ(rgb->channels, 3);
  for (int c = 0; c < 3; ++c) {
    EXPECT_EQ(std::vector<uint8_t>(rgb->pixels.begin() + c * 6,
                                   rgb->pixels.begin() + (c + 1) * 6),
              gray.pixels);
  }
  // A gray-valued RGB image stays the same value when converted to gray.
  absl::StatusOr<Image8> back = DecodePng(*EncodePng(*rgb), 1);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->channels, 1);
  EXPECT_EQ(back->pixels, gray.pixels);
}

TEST(PngTest, RejectsGarbageAndTruncatedData) {
  absl::StatusOr<Image8> garbage = DecodePng("this is not a png file");
  ASSERT_FALSE(garbage.ok());
  EXPECT_EQ(garbage.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(garbage.status().message(), HasSubstr("not a PNG"));

  EXPECT_FALSE(DecodePng("").ok());
  const std::string png = *EncodePng(Pattern(3, 16, 16, 4));
  absl::StatusOr<Image8> cut = DecodePng(png.substr(0, png.size() / 2));
  ASSERT_FALSE(cut.ok());
  EXPECT_THAT(cut.status().message(), HasSubstr("invalid PNG"));
  EXPECT_FALSE(DecodePng(png, 2).ok());
}

TEST(PngTest, RejectsBadImagesOnEncode) {
  EXPECT_FALSE(EncodePng(Pattern(2, 3, 3, 0)).ok());
  EXPECT_FALSE(EncodePng(Image8{1, 0, 3, {}}).ok());
  Image8 short_pixels = Pattern(1, 3, 3, 0);
  short_pixels.pixels.pop_back();
  absl::StatusOr<std::string> png = EncodePng(short_pixels);
  ASSERT_FALSE(png.ok());
  EXPECT_THAT(png.status().message(), HasSubstr("pixel bytes"));
}

// Builds a PNG file by hand (for layouts EncodePng does not write).
std::string PngChunk(const std::string& type, const std::string& data) {
  std::string out;
  const uint32_t length = static_cast<uint32_t>(data.size());
  for (int shift = 24; shift >= 0; shift -= 8) out += char(length >> shift);
  const std::string body = type + data;
  out += body;
  const uint32_t crc = static_cast<uint32_t>(
      crc32(0, reinterpret_cast<const Bytef*>(body.data()), body.size()));
  for (int shift = 24; shift >= 0; shift -= 8) out += char(crc >> shift);
  return out;
}

// `scanlines` holds each row's filter byte (0) followed by its bytes.
std::string HandMadePng(int width, int height, int bit_depth, int color_type,
                        const std::string& scanlines,
                        const std::string& extra_chunks = "") {
  std::string ihdr;
  for (uint32_t v : {uint32_t(width), uint32_t(height)}) {
    for (int shift = 24; shift >= 0; shift -= 8) ihdr += char(v >> shift);
  }
  ihdr += {char(bit_depth), char(color_type), 0, 0, 0};
  uLongf size = compressBound(scanlines.size());
  std::string idat(size, '\0');
  compress(reinterpret_cast<Bytef*>(idat.data()), &size,
           reinterpret_cast<const Bytef*>(scanlines.data()), scanlines.size());
  idat.resize(size);
  return std::string("\x89PNG\r\n\x1a\n", 8) + PngChunk("IHDR", ihdr) +
         extra_chunks + PngChunk("IDAT", idat) + PngChunk("IEND", "");
}

TEST(PngTest, DecodesPaletteWithTransparency) {
  const std::string plte("\xff\x00\x00\x00\x80\x40", 6);  // red, dark green
  const std::string trns("\x00", 1);                      // red transparent
  const std::string png =
      HandMadePng(2, 1, 8, /*palette=*/3, std::string("\x00\x01\x00", 3),
                  PngChunk("PLTE", plte) + PngChunk("tRNS", trns));
  absl::StatusOr<Image8> image = DecodePng(png);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->channels, 3);
  EXPECT_EQ(image->pixels, (std::vector<uint8_t>{0, 255, 128, 0, 64, 0}));
}

TEST(PngTest, Decodes16BitGrayAlphaAndLowBitDepth) {
  // 16-bit gray with alpha, 2x1: values 0xffff and 0x0101, alpha dropped.
  const std::string gray_alpha16("\x00\xff\xff\x12\x34\x01\x01\xab\xcd", 9);
  absl::StatusOr<Image8> image =
      DecodePng(HandMadePng(2, 1, 16, /*gray_alpha=*/4, gray_alpha16));
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->channels, 1);
  EXPECT_EQ(image->pixels, (std::vector<uint8_t>{255, 1}));

  // 1-bit gray, 3x1: bits 101 -> 255, 0, 255.
  image =
      DecodePng(HandMadePng(3, 1, 1, /*gray=*/0, std::string("\x00\xa0", 2)));
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->pixels, (std::vector<uint8_t>{255, 0, 255}));

  // 8-bit RGBA, 1x1, to gray: white stays white.
  image = DecodePng(
      HandMadePng(1, 1, 8, /*rgba=*/6, std::string("\x00\xff\xff\xff\x10", 5)),
      1);
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->pixels, (std::vector<uint8_t>{255}));
}

// A decompression bomb: a valid header claiming 16384 x 16384 pixels (256
// MiB of gray) followed by only a few bytes of image data.
std::string BombPng() {
  return HandMadePng(16384, 16384, 8, /*gray=*/0, std::string(64, '\0'));
}

TEST(PngTest, UntrustedPngOfAnotherShapeIsRefusedFromItsHeader) {
  const ImageShape model{1, 28, 28};
  // The error names the declared size: it was refused from the header, before
  // any pixel memory (a full decode of the truncated data would fail with
  // another message).
  absl::StatusOr<Image8> bomb = DecodePngAs(BombPng(), model);
  ASSERT_FALSE(bomb.ok());
  EXPECT_THAT(std::string(bomb.status().message()), HasSubstr("16384x16384"));
  EXPECT_THAT(std::string(bomb.status().message()),
              HasSubstr("the model expects 1x28x28"));
  // The general decoder refuses it from the header too (2^28 pixels).
  absl::StatusOr<Image8> general = DecodePng(BombPng());
  ASSERT_FALSE(general.ok());
  EXPECT_THAT(std::string(general.status().message()), HasSubstr("more than"));
  // An image of the right shape decodes.
  Image8 ok{1, 28, 28, std::vector<uint8_t>(28 * 28, 9)};
  absl::StatusOr<Image8> back = DecodePngAs(*EncodePng(ok), model);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->pixels, ok.pixels);
}

TEST(PngTest, UntrustedPngIsNotSilentlyConverted) {
  const ImageShape gray{1, 1, 1}, rgb{3, 1, 1};
  const std::string rgba =
      HandMadePng(1, 1, 8, /*rgba=*/6, std::string("\x00\xff\xff\xff\x10", 5));
  const std::string color =
      HandMadePng(1, 1, 8, /*rgb=*/2, std::string("\x00\xff\x00\x00", 4));
  const std::string g = HandMadePng(1, 1, 8, /*gray=*/0, std::string("\x00\x80", 2));
  EXPECT_THAT(std::string(DecodePngAs(rgba, gray).status().message()),
              HasSubstr("alpha"));
  EXPECT_THAT(std::string(DecodePngAs(color, gray).status().message()),
              HasSubstr("color"));
  // Lossless conversions are fine: gray to RGB, RGB as RGB.
  absl::StatusOr<Image8> expanded = DecodePngAs(g, rgb);
  ASSERT_TRUE(expanded.ok()) << expanded.status();
  EXPECT_EQ(expanded->pixels, (std::vector<uint8_t>{128, 128, 128}));
  EXPECT_TRUE(DecodePngAs(color, rgb).ok());
  EXPECT_FALSE(DecodePngAs("not a png", gray).ok());
}

// ---- Grid ------------------------------------------------------------------

TEST(GridTest, TilesImagesWithPadding) {
  std::vector<Image8> images;
  for (int i = 0; i < 5; ++i) {
    Image8 image{1, 3, 4, std::vector<uint8_t>(12, static_cast<uint8_t>(i))};
    images.push_back(image);
  }
  absl::StatusOr<Image8> grid = MakeGrid(images, 3, /*pad=*/2, 255);
  ASSERT_TRUE(grid.ok()) << grid.status();
  EXPECT_EQ(grid->channels, 1);
  EXPECT_EQ(grid->height, 2 * 3 + 3 * 2);  // 2 rows of 3, 3 pads
  EXPECT_EQ(grid->width, 3 * 4 + 4 * 2);   // 3 columns of 4, 4 pads
  auto at = [&](int y, int x) { return grid->pixels[y * grid->width + x]; };
  EXPECT_EQ(at(0, 0), 255);
  EXPECT_EQ(at(2, 2), 0);                    // image 0, top-left
  EXPECT_EQ(at(2 + 2, 2 + 3), 0);            // image 0, bottom-right
  EXPECT_EQ(at(2, 2 + 4 + 2), 1);            // image 1
  EXPECT_EQ(at(2 + 3 + 2, 2 + 4 + 2), 4);    // image 4: row 1, column 1
  EXPECT_EQ(at(2 + 3 + 2, 2 + 2 * 6), 255);  // empty sixth cell
  EXPECT_EQ(at(5, 2), 255);                  // pad between rows
}

TEST(GridTest, KeepsChannelsAndRejectsBadInput) {
  absl::StatusOr<Image8> grid =
      MakeGrid({Pattern(3, 2, 2, 0), Pattern(3, 2, 2, 1)}, 2, 0);
  ASSERT_TRUE(grid.ok()) << grid.status();
  EXPECT_EQ(grid->channels, 3);
  EXPECT_EQ(grid->height, 2);
  EXPECT_EQ(grid->width, 4);
  EXPECT_EQ(grid->pixels.size(), 3u * 2 * 4);

  EXPECT_FALSE(MakeGrid({}, 2).ok());
  EXPECT_FALSE(MakeGrid({Pattern(1, 2, 2, 0)}, 0).ok());
  absl::StatusOr<Image8> mixed =
      MakeGrid({Pattern(1, 2, 2, 0), Pattern(1, 3, 2, 0)}, 2);
  ASSERT_FALSE(mixed.ok());
  EXPECT_THAT(mixed.status().message(), HasSubstr("image 1"));
}

// ---- IDX -------------------------------------------------------------------

std::string IdxBytes(uint8_t type, const std::vector<uint32_t>& dims,
                     const std::vector<uint8_t>& data) {
  std::string out = {0, 0, static_cast<char>(type),
                     static_cast<char>(dims.size())};
  for (uint32_t d : dims) {
    for (int shift = 24; shift >= 0; shift -= 8) out += char(d >> shift);
  }
  out.append(data.begin(), data.end());
  return out;
}

void WritePlain(const std::string& path, const std::string& bytes) {
  std::FILE* file = std::fopen(path.c_str(), "wb");
  ASSERT_NE(file, nullptr);
  ASSERT_EQ(std::fwrite(bytes.data(), 1, bytes.size(), file), bytes.size());
  std::fclose(file);
}

void WriteGzip(const std::string& path, const std::string& bytes) {
  gzFile file = gzopen(path.c_str(), "wb");
  ASSERT_NE(file, nullptr);
  ASSERT_EQ(gzwrite(file, bytes.data(), static_cast<unsigned>(bytes.size())),
            static_cast<int>(bytes.size()));
  ASSERT_EQ(gzclose(file), Z_OK);
}

std::vector<uint8_t> Ramp(size_t n) {
  std::vector<uint8_t> data(n);
  for (size_t i = 0; i < n; ++i) data[i] = static_cast<uint8_t>(i * 7);
  return data;
}

TEST(IdxTest, ReadsPlainAndGzipFiles) {
  const std::vector<uint8_t> data = Ramp(5 * 3 * 2);
  const std::string bytes = IdxBytes(0x08, {5, 3, 2}, data);
  const std::string plain = TempPath("plain.idx");
  const std::string gzip = TempPath("gzip.idx.gz");
  WritePlain(plain, bytes);
  WriteGzip(gzip, bytes);
  for (const std::string& path : {plain, gzip}) {
    absl::StatusOr<IdxArray> array = ReadIdx(path);
    ASSERT_TRUE(array.ok()) << array.status();
    EXPECT_EQ(array->dims, (std::vector<int64_t>{5, 3, 2}));
    EXPECT_EQ(array->data, data);

    absl::StatusOr<std::vector<Image8>> images = ReadIdxImages(path);
    ASSERT_TRUE(images.ok()) << images.status();
    ASSERT_EQ(images->size(), 5u);
    EXPECT_EQ((*images)[4].channels, 1);
    EXPECT_EQ((*images)[4].height, 3);
    EXPECT_EQ((*images)[4].width, 2);
    EXPECT_EQ((*images)[4].pixels,
              std::vector<uint8_t>(data.begin() + 24, data.end()));
  }
  std::remove(plain.c_str());
  std::remove(gzip.c_str());
}

TEST(IdxTest, ReadIdxImagesHonoursLimit) {
  const std::vector<uint8_t> data = Ramp(5 * 2 * 2);
  const std::string path = TempPath("limit.idx.gz");
  WriteGzip(path, IdxBytes(0x08, {5, 2, 2}, data));
  absl::StatusOr<std::vector<Image8>> two = ReadIdxImages(path, 2);
  ASSERT_TRUE(two.ok()) << two.status();
  ASSERT_EQ(two->size(), 2u);
  EXPECT_EQ((*two)[1].pixels,
            std::vector<uint8_t>(data.begin() + 4, data.begin() + 8));
  EXPECT_EQ(ReadIdxImages(path, 100)->size(), 5u);
  EXPECT_EQ(ReadIdxImages(path, 0)->size(), 5u);
  EXPECT_FALSE(ReadIdxImages(path, -1).ok());
  std::remove(path.c_str());
}

TEST(IdxTest, ErrorsNameTheFileAndTheProblem) {
  const std::string path = TempPath("bad.idx");
  auto expect_error = [&](const std::string& bytes, const std::string& what) {
    WritePlain(path, bytes);
    absl::StatusOr<IdxArray> array = ReadIdx(path);
    ASSERT_FALSE(array.ok()) << what;
    EXPECT_THAT(array.status().message(), HasSubstr(path));
    EXPECT_THAT(array.status().message(), HasSubstr(what));
  };
  expect_error("\x01\x02\x08\x01" + std::string(4, '\0'), "bad magic");
  expect_error(IdxBytes(0x0d, {2}, {0, 0, 0, 0, 0, 0, 0, 0}),
               "only unsigned byte");
  expect_error(IdxBytes(0x08, {4, 3}, Ramp(11)), "truncated");
  expect_error(std::string("\x00\x00\x08\x03\x00\x00\x00\x02", 8), "truncated");
  expect_error(std::string("\x00\x00", 2), "not an IDX file");

  // A gzip file cut short is truncated too.
  const std::string gz = TempPath("cut.idx.gz");
  WriteGzip(gz, IdxBytes(0x08, {100, 10, 10}, Ramp(10000)));
  absl::StatusOr<std::string> whole = ReadFile(gz);
  ASSERT_TRUE(whole.ok());
  WritePlain(gz, whole->substr(0, whole->size() / 2));
  absl::StatusOr<IdxArray> cut = ReadIdx(gz);
  ASSERT_FALSE(cut.ok());
  EXPECT_THAT(cut.status().message(), HasSubstr(gz));

  // Images need three dimensions.
  WritePlain(path, IdxBytes(0x08, {4}, Ramp(4)));
  absl::StatusOr<std::vector<Image8>> images = ReadIdxImages(path);
  ASSERT_FALSE(images.ok());
  EXPECT_THAT(images.status().message(), HasSubstr("3 dimensions"));
  std::remove(path.c_str());
  std::remove(gz.c_str());
}

TEST(IdxTest, MissingFileIsNotFound) {
  const std::string path = TempPath("does_not_exist.idx");
  absl::StatusOr<IdxArray> array = ReadIdx(path);
  ASSERT_FALSE(array.ok());
  EXPECT_EQ(array.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(array.status().message(), HasSubstr(path));
}

// The dataset is installed by scripts/install-deps.sh (dataset-fashion-mnist):
// its absence is a failure, not a skip.
TEST(IdxTest, ReadsFashionMnistTestSet) {
  absl::StatusOr<std::vector<Image8>> images =
      ReadIdxImages(kFashionTestImages);
  ASSERT_TRUE(images.ok()) << images.status()
                           << " (run scripts/install-deps.sh)";
  ASSERT_EQ(images->size(), 10000u);
  double sum = 0;
  for (const Image8& image : *images) {
    ASSERT_EQ(image.channels, 1);
    ASSERT_EQ(image.height, 28);
    ASSERT_EQ(image.width, 28);
    for (uint8_t p : image.pixels) sum += p;
  }
  const double mean = sum / (10000.0 * 28 * 28);
  EXPECT_GT(mean, 60.0);  // Fashion-MNIST's pixel mean is about 73
  EXPECT_LT(mean, 85.0);

  absl::StatusOr<IdxArray> labels = ReadIdx(kFashionTestLabels);
  ASSERT_TRUE(labels.ok()) << labels.status();
  EXPECT_EQ(labels->dims, (std::vector<int64_t>{10000}));
  for (uint8_t label : labels->data) ASSERT_LT(label, 10);
}

// ---- Files -----------------------------------------------------------------

TEST(FileTest, WritesAtomicallyAndReadsBack) {
  const std::string path = TempPath("atomic.bin");
  const std::string data("binary\0data\xff", 12);
  ASSERT_TRUE(WriteFileAtomic(path, data).ok());
  ASSERT_TRUE(WriteFileAtomic(path, data + data).ok());  // replaces
  absl::StatusOr<std::string> back = ReadFile(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, data + data);
  EXPECT_FALSE(std::filesystem::exists(absl::StrCat(path, ".tmp.", getpid())));
  std::remove(path.c_str());
}

TEST(FileTest, ReportsMissingFilesAndDirectories) {
  absl::StatusOr<std::string> missing = ReadFile(TempPath("missing.bin"));
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("missing.bin"));
  absl::Status status =
      WriteFileAtomic(TempPath("no_such_dir/file.bin"), "data");
  ASSERT_FALSE(status.ok());
  EXPECT_THAT(status.message(), HasSubstr("no_such_dir"));
}

}  // namespace
}  // namespace vdm
