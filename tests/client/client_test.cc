// The score CSV of client/client.h: its columns come from the ImageScore
// descriptor by the rules above ImageScore in proto/vdm/v1/vdm.proto, so a
// message with an extra field gets the extra column with no client change.
#include "client/client.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/descriptor.pb.h"
#include "google/protobuf/dynamic_message.h"
#include "vdm/v1/vdm.pb.h"

namespace vdm {
namespace client {
namespace {

namespace pb = google::protobuf;
using ::testing::ElementsAre;

constexpr char kHeader[] =
    "index,bpd,prior_bpd,recon_bpd,diffusion_bpd,stderr_bpd,complexity_bpd,"
    "band_bpd_0,band_bpd_1,band_bpd_2,band_bpd_3,anomaly_score,p_value,"
    "is_anomaly";

ScoreRow Row(int64_t index, double bpd) {
  ScoreRow row;
  row.index = index;
  row.score.set_bpd(bpd);
  row.score.set_prior_bpd(0.25);
  row.score.set_recon_bpd(0.5);
  row.score.set_diffusion_bpd(bpd - 0.75);
  row.score.set_stderr_bpd(0.125);
  row.score.set_complexity_bpd(3);
  for (double band : {1.0, 2.0, 3.0, 4.0}) row.score.add_band_bpd(band);
  row.score.set_anomaly_score(bpd - 3);
  return row;
}

std::vector<std::string> Lines(const std::string& csv) {
  return absl::StrSplit(absl::StripSuffix(csv, "\n"), '\n');
}

TEST(ScoresCsvTest, UncalibratedRowsHaveEmptyOptionalCells) {
  EXPECT_THAT(Lines(FormatScoresCsv({Row(0, 10), Row(7, 1.0 / 3)})),
              ElementsAre(kHeader,
                          "0,10.000000,0.250000,0.500000,9.250000,0.125000,"
                          "3.000000,1.000000,2.000000,3.000000,4.000000,"
                          "7.000000,,",
                          "7,0.333333,0.250000,0.500000,-0.416667,0.125000,"
                          "3.000000,1.000000,2.000000,3.000000,4.000000,"
                          "-2.666667,,"));
  EXPECT_EQ(FormatScoresCsv({}), std::string(kHeader) + "\n");
}

TEST(ScoresCsvTest, CalibratedFieldsBandPaddingAndTheMapsSkipped) {
  ScoreRow row = Row(1, 10);
  row.score.set_p_value(0.5);
  row.score.set_is_anomaly(false);
  row.score.mutable_band_bpd()->Truncate(2);
  row.score.add_anomaly_map(9.0f);
  row.score.set_anomaly_map_png("\x89PNG");
  EXPECT_THAT(Lines(FormatScoresCsv({row})),
              ElementsAre(kHeader,
                          "1,10.000000,0.250000,0.500000,9.250000,0.125000,"
                          "3.000000,1.000000,2.000000,,,7.000000,0.500000,0"));
}

TEST(ScoresCsvTest, GroupsShowWhenARowHasThemInDeclarationOrder) {
  ScoreRow ode = Row(0, 2);
  ode.score.set_ode_function_evaluations(8);
  ScoreRow llr = Row(1, 3);
  llr.score.set_llr(0.5);
  llr.score.set_background_bpd(2.5);
  const std::vector<std::string> lines =
      Lines(FormatScoresCsv({ode, llr, Row(2, 4)}));
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_EQ(lines[0], std::string(kHeader) +
                          ",ode_function_evaluations,ode_stderr_bpd,"
                          "ode_error_bpd,llr,background_bpd");
  // A row without a group leaves its cells empty; an unset optional too.
  EXPECT_THAT(lines[1], ::testing::EndsWith(",,,8,,,,"));
  EXPECT_THAT(lines[2], ::testing::EndsWith(",,,,,,0.500000,2.500000"));
  EXPECT_THAT(lines[3], ::testing::EndsWith(",,,,,,,"));
  // Only the ODE group: its columns and nothing of the llr's.
  EXPECT_EQ(Lines(FormatScoresCsv({ode}))[0],
            std::string(kHeader) +
                ",ode_function_evaluations,ode_stderr_bpd,ode_error_bpd");
}

// ImageScore as a change to vdm.proto would leave it: its own fields, copied
// from its descriptor (so this follows the proto), plus extras of each kind.
class ExtraFieldsTest : public ::testing::Test {
 protected:
  ExtraFieldsTest() : factory_(&pool_) {
    // vdm.proto and its import first, then the new file over them.
    for (const pb::FileDescriptor* dependency :
         {pb::FieldOptions::descriptor()->file(),
          v1::ImageScore::descriptor()->file()}) {
      pb::FileDescriptorProto copy;
      dependency->CopyTo(&copy);
      EXPECT_NE(pool_.BuildFile(copy), nullptr) << copy.name();
    }
    pb::FileDescriptorProto file;
    file.set_name("score_extra.proto");
    file.set_package("vdm.test");
    file.set_syntax("proto3");
    file.add_dependency(v1::ImageScore::descriptor()->file()->name());
    pb::DescriptorProto* message = file.add_message_type();
    v1::ImageScore::descriptor()->CopyTo(message);
    message->set_name("ImageScoreExtra");
    const pb::DescriptorProto original = *message;
    message->clear_field();
    for (const pb::FieldDescriptorProto& field : original.field()) {
      *message->add_field() = field;
      if (field.name() == "complexity_bpd") {  // optional double extra_bpd
        pb::FieldDescriptorProto* extra = Add(
            message, "extra_bpd", 100, pb::FieldDescriptorProto::TYPE_DOUBLE);
        extra->set_proto3_optional(true);
        extra->set_oneof_index(message->oneof_decl_size());
        message->add_oneof_decl()->set_name("_extra_bpd");
      }
    }
    // repeated int64 extra_bins = 101 [(csv_columns) = 2];
    pb::FieldDescriptorProto* bins =
        Add(message, "extra_bins", 101, pb::FieldDescriptorProto::TYPE_INT64);
    bins->set_label(pb::FieldDescriptorProto::LABEL_REPEATED);
    bins->mutable_options()->SetExtension(v1::csv_columns, 2);
    // string extra_note = 102;  (not a column)
    Add(message, "extra_note", 102, pb::FieldDescriptorProto::TYPE_STRING);
    // bool extra_flag = 103 [(csv_group) = "extra"];
    Add(message, "extra_flag", 103, pb::FieldDescriptorProto::TYPE_BOOL)
        ->mutable_options()
        ->SetExtension(v1::csv_group, "extra");
    const pb::FileDescriptor* built = pool_.BuildFile(file);
    EXPECT_NE(built, nullptr);
    if (built != nullptr) type_ = built->message_type(0);
  }

  static pb::FieldDescriptorProto* Add(pb::DescriptorProto* message,
                                       const std::string& name, int number,
                                       pb::FieldDescriptorProto::Type type) {
    pb::FieldDescriptorProto* field = message->add_field();
    field->set_name(name);
    field->set_number(number);
    field->set_type(type);
    field->set_label(pb::FieldDescriptorProto::LABEL_OPTIONAL);
    return field;
  }

  // An ImageScoreExtra with `row`'s ImageScore fields (the same numbers).
  std::unique_ptr<pb::Message> Extra(const ScoreRow& row) {
    std::unique_ptr<pb::Message> message(factory_.GetPrototype(type_)->New());
    EXPECT_TRUE(message->ParseFromString(row.score.SerializeAsString()));
    return message;
  }

  const pb::FieldDescriptor* Field(const std::string& name) const {
    return type_->FindFieldByName(name);
  }

  pb::DescriptorPool pool_;
  pb::DynamicMessageFactory factory_;
  const pb::Descriptor* type_ = nullptr;
};

TEST_F(ExtraFieldsTest, ReachTheCsvByTheRules) {
  ASSERT_NE(type_, nullptr);
  std::unique_ptr<pb::Message> plain = Extra(Row(0, 10));
  std::unique_ptr<pb::Message> full = Extra(Row(1, 10));
  const pb::Reflection& r = *full->GetReflection();
  r.SetDouble(full.get(), Field("extra_bpd"), 0.5);
  r.AddInt64(full.get(), Field("extra_bins"), -3);
  r.SetString(full.get(), Field("extra_note"), "a,b");
  const std::string without_group =
      FormatScoreMessagesCsv(*type_, {{0, plain.get()}, {1, full.get()}});
  EXPECT_THAT(
      Lines(without_group),
      ElementsAre("index,bpd,prior_bpd,recon_bpd,diffusion_bpd,stderr_bpd,"
                  "complexity_bpd,extra_bpd,band_bpd_0,band_bpd_1,band_bpd_2,"
                  "band_bpd_3,anomaly_score,p_value,is_anomaly,extra_bins_0,"
                  "extra_bins_1",
                  "0,10.000000,0.250000,0.500000,9.250000,0.125000,3.000000,,"
                  "1.000000,2.000000,3.000000,4.000000,7.000000,,,,",
                  "1,10.000000,0.250000,0.500000,9.250000,0.125000,3.000000,"
                  "0.500000,1.000000,2.000000,3.000000,4.000000,7.000000,,,"
                  "-3,"));
  // The group's column once a row has its field set (true: non-default).
  r.SetBool(full.get(), Field("extra_flag"), true);
  const std::vector<std::string> lines = Lines(
      FormatScoreMessagesCsv(*type_, {{0, plain.get()}, {1, full.get()}}));
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_THAT(lines[0], ::testing::EndsWith(",extra_bins_1,extra_flag"));
  EXPECT_THAT(lines[1], ::testing::EndsWith(",,,,"));
  EXPECT_THAT(lines[2], ::testing::EndsWith(",-3,,1"));
}

}  // namespace
}  // namespace client
}  // namespace vdm
