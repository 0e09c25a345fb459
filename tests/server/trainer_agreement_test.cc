// The trainer's reported BPD (vdm-train's validation and test numbers) and
// the server's ScoreBPD are the same estimator: on the same model, images,
// K and seed, each image gets the same score from both, and the trainer's
// dataset mean is the mean of the server's scores.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "client/client.h"
#include "model/train/dataset.h"
#include "model/train/vlb.h"
#include "model/vdm/tensor_image.h"
#include "model/vdm/torchscript_model.h"
#include "server/server.h"

namespace vdm {
namespace {

std::string TinyPath() { return std::string(VDM_TEST_MODELS_DIR) + "/tiny.pt"; }

// n images with some structure (a gradient and a bright square).
Dataset Images(int n) {
  Dataset d;
  d.images = at::zeros({n, 1, 28, 28}, at::kByte);
  for (int i = 0; i < n; ++i) {
    d.images[i][0] = (at::arange(28 * 28, at::kLong).view({28, 28}) * (i + 1))
                         .remainder(256)
                         .to(at::kByte);
    d.images[i][0].narrow(0, 4 + i, 6).narrow(1, 10, 6).fill_(250);
  }
  d.labels = at::arange(n, at::kLong).remainder(10);
  return d;
}

TEST(TrainerAgreementTest, TrainerBpdEqualsServedScoresForTheSameSeeds) {
  constexpr int kImages = 5, kTimes = 8;
  constexpr uint64_t kSeed = 1234;
  const Dataset data = Images(kImages);

  // The trainer's evaluation, on the module as the trainer holds it.
  auto loaded = TorchScriptModel::Load({TinyPath()});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ModelInfo info{(*loaded)->shape(), (*loaded)->num_classes(),
                 (*loaded)->prediction(), torch::kCPU};
  EvalOptions eval;
  eval.times = kTimes;
  eval.seed = kSeed;
  eval.batch_rows = 16;  // a different batching from the server's
  at::Tensor per_image;
  auto trained = EvaluateBpd((*loaded)->module(), info, data, eval, &per_image);
  ASSERT_TRUE(trained.ok()) << trained.status();

  // The server's scores of the same images.
  VdmServer::Options options;
  options.model_path = TinyPath();
  options.address = "127.0.0.1:0";
  options.threads = 2;
  auto server = VdmServer::Create(options);
  ASSERT_TRUE(server.ok()) << server.status();
  client::VdmClient client(
      grpc::CreateChannel("127.0.0.1:" + std::to_string((*server)->port()),
                          grpc::InsecureChannelCredentials()),
      client::ClientOptions{});
  client::ScoreParams params;
  params.timesteps = kTimes;
  params.seed = kSeed;
  auto served = client.ScoreImages(client::RawInput(ToImages(data.images)),
                                   params);
  ASSERT_TRUE(served.ok()) << served.status();
  ASSERT_EQ(served->rows.size(), static_cast<size_t>(kImages));

  double mean = 0;
  for (int i = 0; i < kImages; ++i) {
    const double b = served->rows[i].score.bpd();
    EXPECT_NEAR(per_image[i].item<double>(), b, 1e-4) << "image " << i;
    mean += b / kImages;
  }
  EXPECT_NEAR(trained->bpd, mean, 1e-4);
  // A different seed gives a different estimate: the agreement is not an
  // accident of a constant.
  eval.seed = kSeed + 1;
  auto reseeded = EvaluateBpd((*loaded)->module(), info, data, eval);
  ASSERT_TRUE(reseeded.ok());
  EXPECT_GT(std::abs(reseeded->bpd - trained->bpd), 1e-4);
}

}  // namespace
}  // namespace vdm
