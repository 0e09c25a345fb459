// proto/convert.h: the one mapping between vdm.v1 messages and library
// types. Every enum value of the proto maps to the library's table and back,
// so a sampler added to one and not the other fails here.
#include "proto/convert.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "google/protobuf/descriptor.h"
#include "model/vdm/image_io.h"

namespace vdm {
namespace {

using ::testing::HasSubstr;

TEST(ConvertTest, EverySamplerMapsBothWays) {
  const auto* e = v1::Sampler_descriptor();
  int mapped = 0;
  for (int i = 0; i < e->value_count(); ++i) {
    const auto value = static_cast<v1::Sampler>(e->value(i)->number());
    if (value == v1::SAMPLER_UNSPECIFIED) continue;
    absl::StatusOr<SamplerType> type = SamplerFromProto(value);
    ASSERT_TRUE(type.ok()) << e->value(i)->name();
    EXPECT_EQ(SamplerToProto(*type), value);
    ++mapped;
  }
  EXPECT_EQ(mapped, static_cast<int>(AllSamplerTypes().size()));
  for (SamplerType t : AllSamplerTypes()) {
    EXPECT_NE(SamplerToProto(t), v1::SAMPLER_UNSPECIFIED) << SamplerName(t);
    EXPECT_EQ(*ParseSamplerType(SamplerName(t)), t);
  }
  EXPECT_EQ(*SamplerFromProto(v1::SAMPLER_UNSPECIFIED), SamplerType::kDdim);
  const absl::StatusOr<SamplerType> bad =
      SamplerFromProto(static_cast<v1::Sampler>(99));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("sampler"));
}

TEST(ConvertTest, EveryTimeGridMapsBothWays) {
  const auto* e = v1::TimeGrid_descriptor();
  int mapped = 0;
  for (int i = 0; i < e->value_count(); ++i) {
    const auto value = static_cast<v1::TimeGrid>(e->value(i)->number());
    if (value == v1::TIME_GRID_UNSPECIFIED) continue;
    absl::StatusOr<TimeGrid> grid = TimeGridFromProto(value);
    ASSERT_TRUE(grid.ok()) << e->value(i)->name();
    EXPECT_EQ(TimeGridToProto(*grid), value);
    ++mapped;
  }
  EXPECT_EQ(mapped, static_cast<int>(AllTimeGrids().size()));
  EXPECT_FALSE(TimeGridFromProto(static_cast<v1::TimeGrid>(7)).ok());
}

TEST(ConvertTest, EveryScoreMethodMapsBothWays) {
  const auto* e = v1::ScoreMethod_descriptor();
  for (int i = 0; i < e->value_count(); ++i) {
    const auto value = static_cast<v1::ScoreMethod>(e->value(i)->number());
    absl::StatusOr<ScoreMethod> method = ScoreMethodFromProto(value);
    ASSERT_TRUE(method.ok()) << e->value(i)->name();
    EXPECT_EQ(ScoreMethodToProto(*method),
              value == v1::SCORE_METHOD_UNSPECIFIED ? v1::SCORE_METHOD_ELBO
                                                    : value);
  }
  EXPECT_EQ(*ScoreMethodFromProto(v1::SCORE_METHOD_UNSPECIFIED),
            ScoreMethod::kElbo);
  EXPECT_EQ(*ScoreMethodFromProto(v1::SCORE_METHOD_ODE), ScoreMethod::kOde);
  absl::StatusOr<ScoreMethod> bad =
      ScoreMethodFromProto(static_cast<v1::ScoreMethod>(9));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("method"), std::string::npos);
}

TEST(ConvertTest, NamesAreCaseInsensitiveAndErrorsListTheChoices) {
  EXPECT_EQ(*ParseSamplerType("HEUN"), SamplerType::kHeun);
  const auto bad = ParseSamplerType("euler");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("dpm_solver_2m"));
  EXPECT_EQ(SamplerNameList("|"), "ddim|ddpm|euler_maruyama|heun|dpm_solver_2m");
}

TEST(ConvertTest, ImagesRoundTripInBothFormats) {
  const Image8 image{1, 3, 2, {0, 50, 100, 150, 200, 255}};
  for (v1::ImageFormat f : {v1::IMAGE_FORMAT_RAW, v1::IMAGE_FORMAT_PNG}) {
    v1::Image proto;
    ASSERT_TRUE(ImageToProto(image, f, &proto).ok());
    EXPECT_EQ(proto.height(), 3);
    const ImageShape shape = image.shape();
    for (const ImageShape* expect : {static_cast<const ImageShape*>(nullptr), &shape}) {
      absl::StatusOr<Image8> back = ImageFromProto(proto, f, expect);
      ASSERT_TRUE(back.ok()) << back.status();
      EXPECT_EQ(back->pixels, image.pixels);
      EXPECT_EQ(back->shape(), shape);
    }
  }
}

TEST(ConvertTest, ImagesThatContradictTheModelAreRefusedWithBothShapes) {
  const ImageShape model{1, 2, 2};
  v1::Image raw;
  raw.set_data(std::string(4, 'x'));
  EXPECT_TRUE(ImageFromProto(raw, v1::IMAGE_FORMAT_RAW, &model).ok())
      << "unset shape fields take the model's";
  raw.set_channels(4);
  raw.set_height(1);
  raw.set_width(1);
  auto contradicts = ImageFromProto(raw, v1::IMAGE_FORMAT_RAW, &model);
  ASSERT_FALSE(contradicts.ok());
  EXPECT_THAT(std::string(contradicts.status().message()), HasSubstr("4x1x1"));
  EXPECT_THAT(std::string(contradicts.status().message()), HasSubstr("1x2x2"));
  raw.clear_channels();
  raw.clear_height();
  raw.clear_width();
  raw.set_data("xyz");
  EXPECT_THAT(
      std::string(ImageFromProto(raw, v1::IMAGE_FORMAT_RAW, &model).status().message()),
      HasSubstr("3 bytes"));
  v1::Image png;
  ASSERT_TRUE(ImageToProto({1, 3, 3, std::vector<uint8_t>(9, 7)},
                           v1::IMAGE_FORMAT_PNG, &png)
                  .ok());
  auto wrong = ImageFromProto(png, v1::IMAGE_FORMAT_PNG, &model);
  ASSERT_FALSE(wrong.ok());
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr("3x3"));
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr("1x2x2"));
  png.set_data("not a png");
  EXPECT_THAT(std::string(ImageFromProto(png, v1::IMAGE_FORMAT_PNG, &model)
                              .status()
                              .message()),
              HasSubstr("PNG"));
}

TEST(ConvertTest, LatentsRoundTripAndBadOnesAreExplained) {
  const ImageShape shape{1, 2, 3};
  const std::vector<float> values = {0.5f, -1.0f, 2.0f, 0.0f, 3.25f, -0.125f};
  v1::Latent latent;
  LatentToProto(values, shape, &latent);
  EXPECT_EQ(latent.channels(), 1);
  EXPECT_EQ(latent.height(), 2);
  EXPECT_EQ(latent.width(), 3);
  EXPECT_EQ(LatentFromProto(latent, shape).value(), values);
  v1::Latent bare = latent;  // shape fields unset: only the count matters
  bare.clear_channels();
  bare.clear_height();
  bare.clear_width();
  EXPECT_EQ(LatentFromProto(bare, shape).value(), values);
  auto message = [&](const v1::Latent& z) {
    absl::StatusOr<std::vector<float>> r = LatentFromProto(z, shape);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    return std::string(r.status().message());
  };
  v1::Latent wrong_shape = latent;
  wrong_shape.set_width(2);
  EXPECT_THAT(message(wrong_shape), HasSubstr("1x2x2"));
  v1::Latent short_one = bare;
  short_one.mutable_values()->RemoveLast();
  EXPECT_THAT(message(short_one), HasSubstr("5 values"));
  v1::Latent nan = latent;
  nan.set_values(3, std::nanf(""));
  EXPECT_THAT(message(nan), HasSubstr("value 3"));
}

}  // namespace
}  // namespace vdm
