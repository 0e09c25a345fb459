// The model repository's rules on a temporary directory with a fake loader
// (no torch): which version serves, what a failed or refused version
// looks like, when a version is retried, unloaded and freed.
#include "server/model_repository.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace vdm {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// A repository directory under the test's temporary directory, and a loader
// that "loads" a version by reading its model.pt: a file starting with
// "broken" fails, anything else loads with num_classes = its length.
class ModelRepositoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::path(::testing::TempDir()) /
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  void TearDown() override { fs::remove_all(root_); }

  void Put(const std::string& name, const std::string& version,
           const std::string& content, bool calibration = false) {
    const fs::path dir = root_ / name / version;
    fs::create_directories(dir);
    std::ofstream(dir / "model.pt") << content;
    if (calibration) std::ofstream(dir / "model.pt.calibration.json") << "{}";
  }

  ModelRepository::Options Options(int max_loaded = 8) {
    ModelRepository::Options o;
    o.root = root_.string();
    o.max_loaded_models = max_loaded;
    return o;
  }

  std::unique_ptr<ModelRepository> Make(ModelRepository::Options o) {
    return std::make_unique<ModelRepository>(
        o,
        [this](const VersionFiles& f)
            -> absl::StatusOr<std::shared_ptr<ServedModel>> {
          ++loads_[absl::StrCat(f.name, "/", f.version)];
          calibrations_[f.name] = f.calibration_path;
          std::ifstream in(f.model_path);
          std::string content((std::istreambuf_iterator<char>(in)), {});
          if (absl::StartsWith(content, "broken")) {
            return absl::InvalidArgumentError("contract: " + content);
          }
          auto m = std::make_shared<ServedModel>();
          m->description.num_classes = static_cast<int>(content.size());
          m->memory_bytes = 1000;
          return m;
        },
        [this](const ServedModel& m) {
          ++warm_ups_[absl::StrCat(m.name, "/", m.version)];
          return absl::OkStatus();
        },
        [this](const std::vector<VersionStatus>& list) { told_ = list; });
  }

  static std::string States(const std::vector<VersionStatus>& list) {
    std::string out;
    for (const VersionStatus& v : list) {
      absl::StrAppend(&out, out.empty() ? "" : " ", v.name, "/", v.version, ":",
                      VersionStateName(v.state));
    }
    return out;
  }

  fs::path root_;
  std::map<std::string, int> loads_, warm_ups_;
  std::map<std::string, std::string> calibrations_;
  std::vector<VersionStatus> told_;
};

TEST_F(ModelRepositoryTest, EachModelServesItsNewestVersionAndIsRoutedByName) {
  Put("alpha", "1", "a1");
  Put("alpha", "10", "a10---", /*calibration=*/true);
  Put("alpha", "9", "a9");
  Put("beta", "3", "b3-");
  auto repo = Make(Options());
  ASSERT_TRUE(repo->Sync().ok());
  EXPECT_EQ(States(repo->List()), "alpha/10:ready beta/3:ready")
      << "10 is newer than 9 (numbers, not strings)";
  EXPECT_EQ(loads_["alpha/9"], 0) << "only the newest version is loaded";
  EXPECT_EQ(warm_ups_["alpha/10"], 1);
  EXPECT_THAT(calibrations_["alpha"], HasSubstr("alpha/10/model.pt.calibration.json"));
  EXPECT_EQ(calibrations_["beta"], "none") << "no calibration beside it";
  auto alpha = repo->Resolve("alpha", std::nullopt);
  ASSERT_TRUE(alpha.ok()) << alpha.status();
  EXPECT_EQ((*alpha)->version, 10);
  EXPECT_EQ((*alpha)->description.num_classes, 6);
  auto beta = repo->Resolve("beta", 3);
  ASSERT_TRUE(beta.ok()) << beta.status();
  EXPECT_EQ((*beta)->description.num_classes, 3);
  auto by_default = repo->Resolve("", std::nullopt);
  ASSERT_TRUE(by_default.ok());
  EXPECT_EQ((*by_default)->name, "alpha") << "the default is the first by name";
  EXPECT_TRUE(repo->List()[0].is_default);
  EXPECT_EQ(States(told_), States(repo->List())) << "the listener saw it";
}

TEST_F(ModelRepositoryTest, UnknownModelsAndVersionsAreNotFoundSayingWhatServes) {
  Put("alpha", "2", "a2");
  auto repo = Make(Options());
  ASSERT_TRUE(repo->Sync().ok());
  auto none = repo->Resolve("gamma", std::nullopt);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(none.status().message()), HasSubstr("serving: alpha"));
  EXPECT_EQ(repo->Resolve("../alpha", std::nullopt).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(repo->Resolve(std::string(100, 'a'), std::nullopt).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(repo->Resolve("alpha", 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto old = repo->Resolve("alpha", 1);
  EXPECT_EQ(old.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(old.status().message()),
              HasSubstr("serving version 2"));
}

TEST_F(ModelRepositoryTest, ANewVersionSwapsInAndTheOldFinishesWhatItHolds) {
  Put("alpha", "1", "a1");
  auto repo = Make(Options());
  ASSERT_TRUE(repo->Sync().ok());
  std::shared_ptr<const ServedModel> in_flight = *repo->Resolve("alpha", {});
  Put("alpha", "2", "a2--");
  ASSERT_TRUE(repo->Sync().ok());
  EXPECT_EQ((*repo->Resolve("alpha", {}))->version, 2)
      << "new requests get the new version";
  EXPECT_EQ(in_flight->version, 1) << "a request in flight keeps its version";
  EXPECT_EQ(States(repo->List()), "alpha/1:unloading alpha/2:ready");
  std::weak_ptr<const ServedModel> old = in_flight;
  in_flight.reset();  // its last request is done
  EXPECT_TRUE(old.expired()) << "the repository holds no unloaded version";
  EXPECT_EQ(States(repo->List()), "alpha/2:ready");
  ASSERT_TRUE(repo->Sync().ok());
  EXPECT_EQ(loads_["alpha/2"], 1) << "a served version is not reloaded";
}

TEST_F(ModelRepositoryTest, ABrokenVersionIsRefusedAndTheOldKeepsServing) {
  Put("alpha", "1", "a1");
  auto repo = Make(Options());
  ASSERT_TRUE(repo->Sync().ok());
  Put("alpha", "2", "broken weights");
  const absl::Status synced = repo->Sync();
  EXPECT_EQ(synced.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(synced.message()), HasSubstr("alpha version 2"));
  EXPECT_EQ((*repo->Resolve("alpha", {}))->version, 1);
  const std::vector<VersionStatus> list = repo->List();
  EXPECT_EQ(States(list), "alpha/1:ready alpha/2:failed");
  EXPECT_THAT(list[1].error, HasSubstr("contract: broken weights"));
  EXPECT_EQ(warm_ups_["alpha/2"], 0) << "it never got a request";
  // Not retried on every poll, only once its model.pt changes.
  EXPECT_TRUE(repo->Sync().ok()) << "a known failure is not a new one";
  EXPECT_EQ(loads_["alpha/2"], 1);
  Put("alpha", "2", "fixed, and longer than before");
  ASSERT_TRUE(repo->Sync().ok());
  EXPECT_EQ(loads_["alpha/2"], 2);
  EXPECT_EQ((*repo->Resolve("alpha", {}))->version, 2);
}

TEST_F(ModelRepositoryTest, AModelWhoseOnlyVersionFailsIsAFailedPrecondition) {
  Put("alpha", "1", "broken");
  auto repo = Make(Options());
  EXPECT_FALSE(repo->Sync().ok());
  auto r = repo->Resolve("alpha", {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("contract: broken"));
}

TEST_F(ModelRepositoryTest, RemovingAVersionRollsBackAndRemovingTheModelUnloads) {
  Put("alpha", "1", "a1");
  Put("alpha", "2", "a2");
  Put("beta", "1", "b1");
  auto repo = Make(Options());
  ASSERT_TRUE(repo->Sync().ok());
  fs::remove_all(root_ / "alpha" / "2");
  fs::remove_all(root_ / "beta");
  ASSERT_TRUE(repo->Sync().ok());
  EXPECT_EQ((*repo->Resolve("alpha", {}))->version, 1);
  EXPECT_EQ(repo->Resolve("beta", {}).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(States(repo->List()), "alpha/1:ready");
}

TEST_F(ModelRepositoryTest, ModelsBeyondTheLimitAreRefusedUntilOneLeaves) {
  Put("alpha", "1", "a1");
  Put("beta", "1", "b1");
  Put("gamma", "1", "c1");
  auto repo = Make(Options(/*max_loaded=*/2));
  ASSERT_TRUE(repo->Sync().ok()) << "a refusal is a state, not a load error";
  const std::vector<VersionStatus> list = repo->List();
  EXPECT_EQ(States(list), "alpha/1:ready beta/1:ready gamma/1:failed");
  EXPECT_THAT(list[2].error, HasSubstr("--max_loaded_models=2"));
  EXPECT_EQ(loads_["gamma/1"], 0);
  Put("alpha", "2", "a2") ;
  ASSERT_TRUE(repo->Sync().ok());
  EXPECT_EQ((*repo->Resolve("alpha", {}))->version, 2)
      << "a new version of a served model does not count against the limit";
  fs::remove_all(root_ / "beta");
  ASSERT_TRUE(repo->Sync().ok());
  EXPECT_EQ(States(repo->List()), "alpha/2:ready gamma/1:ready");
}

TEST_F(ModelRepositoryTest, EntriesThatAreNotModelsOrVersionsAreIgnored) {
  Put("alpha", "1", "a1");
  Put("alpha", "latest", "x");  // not a number
  Put("alpha", "007", "x");     // not a canonical number
  Put("bad name!", "1", "x");
  fs::create_directories(root_ / "empty" / "1");  // no model.pt
  std::ofstream(root_ / "README") << "not a folder";
  auto repo = Make(Options());
  ASSERT_TRUE(repo->Sync().ok());
  EXPECT_EQ(States(repo->List()), "alpha/1:ready");
  EXPECT_TRUE(IsModelName("fmnist-v2.small_1"));
  EXPECT_FALSE(IsModelName(".hidden"));
  EXPECT_FALSE(IsModelName(std::string(65, 'a')));
  EXPECT_FALSE(IsModelName("a/b"));
}

TEST_F(ModelRepositoryTest, AnEmptyRepositoryIsAnErrorAtSync) {
  auto repo = Make(Options());
  const absl::Status s = repo->Sync();
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("holds no model"));
}

TEST_F(ModelRepositoryTest, ASingleModelIsARepositoryOfOne) {
  Put("ignored", "1", "x");
  ModelRepository::Options o;
  o.single = {"fmnist", 1, (root_ / "ignored" / "1" / "model.pt").string(),
              "", ""};
  auto repo = Make(o);
  ASSERT_TRUE(repo->Sync().ok());
  EXPECT_EQ(States(repo->List()), "fmnist/1:ready");
  EXPECT_EQ(repo->default_model(), "fmnist");
  ASSERT_TRUE(repo->Sync().ok());
  EXPECT_EQ(loads_["fmnist/1"], 1);
}

}  // namespace
}  // namespace vdm
