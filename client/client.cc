#include "client/client.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>
#include <system_error>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/text_format.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace client {
namespace {

double SecondsSince(absl::Time start) {
  return absl::ToDoubleSeconds(absl::Now() - start);
}

// Prefixes a status's message, keeping its code.
absl::Status Annotate(const absl::Status& status, absl::string_view prefix) {
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

namespace pb = google::protobuf;

// One CSV column of a score message: a field, or one element of a repeated
// field (the rules above ImageScore in proto/vdm/v1/vdm.proto).
struct ScoreColumn {
  std::string name;
  const pb::FieldDescriptor* field;
  int element;  // the position in a repeated field; -1 for a singular one
  const std::string& group() const {
    return field->options().GetExtension(vdm::v1::csv_group);
  }
};

// The columns of messages of `type`, in declaration order.
std::vector<ScoreColumn> ScoreColumns(const pb::Descriptor& type) {
  std::vector<ScoreColumn> columns;
  for (int i = 0; i < type.field_count(); ++i) {
    const pb::FieldDescriptor* field = type.field(i);
    // Numbers and bools only: bytes, strings and messages are not columns.
    if (field->cpp_type() == pb::FieldDescriptor::CPPTYPE_STRING ||
        field->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      continue;
    }
    if (!field->is_repeated()) {
      columns.push_back({field->name(), field, -1});
      continue;
    }
    // 0 (unset) for the per-pixel maps: no columns.
    const int width = field->options().GetExtension(vdm::v1::csv_columns);
    for (int k = 0; k < width; ++k) {
      columns.push_back({absl::StrCat(field->name(), "_", k), field, k});
    }
  }
  return columns;
}

// The csv_groups of which `score` has a field set (ListFields: present, or
// non-zero / non-empty without explicit presence), and "" (the ungrouped
// columns, always shown).
std::set<std::string> GroupsSet(const pb::Message& score) {
  std::vector<const pb::FieldDescriptor*> fields;
  score.GetReflection()->ListFields(score, &fields);
  std::set<std::string> groups = {""};
  for (const pb::FieldDescriptor* field : fields) {
    groups.insert(field->options().GetExtension(vdm::v1::csv_group));
  }
  return groups;
}

// A column's cell: empty for an unset optional field or past the end of a
// repeated one; floating point as %.6f, integers and enums in decimal,
// bools as 0 or 1.
std::string Cell(const pb::Message& score, const ScoreColumn& column) {
  const pb::Reflection& r = *score.GetReflection();
  const pb::FieldDescriptor* f = column.field;
  const int k = column.element;
  if (k >= 0 ? k >= r.FieldSize(score, f)
             : f->has_presence() && !r.HasField(score, f)) {
    return "";
  }
  // The value by the field's getters, singular or repeated.
  const auto get = [&](auto single, auto repeated) {
    return k < 0 ? (r.*single)(score, f) : (r.*repeated)(score, f, k);
  };
  switch (f->cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_DOUBLE:
      return absl::StrFormat(
          "%.6f", get(&pb::Reflection::GetDouble,
                      &pb::Reflection::GetRepeatedDouble));
    case pb::FieldDescriptor::CPPTYPE_FLOAT:
      return absl::StrFormat("%.6f", get(&pb::Reflection::GetFloat,
                                         &pb::Reflection::GetRepeatedFloat));
    case pb::FieldDescriptor::CPPTYPE_INT32:
      return absl::StrCat(get(&pb::Reflection::GetInt32,
                              &pb::Reflection::GetRepeatedInt32));
    case pb::FieldDescriptor::CPPTYPE_INT64:
      return absl::StrCat(get(&pb::Reflection::GetInt64,
                              &pb::Reflection::GetRepeatedInt64));
    case pb::FieldDescriptor::CPPTYPE_UINT32:
      return absl::StrCat(get(&pb::Reflection::GetUInt32,
                              &pb::Reflection::GetRepeatedUInt32));
    case pb::FieldDescriptor::CPPTYPE_UINT64:
      return absl::StrCat(get(&pb::Reflection::GetUInt64,
                              &pb::Reflection::GetRepeatedUInt64));
    case pb::FieldDescriptor::CPPTYPE_ENUM:
      return absl::StrCat(get(&pb::Reflection::GetEnumValue,
                              &pb::Reflection::GetRepeatedEnumValue));
    case pb::FieldDescriptor::CPPTYPE_BOOL:
      return get(&pb::Reflection::GetBool, &pb::Reflection::GetRepeatedBool)
                 ? "1"
                 : "0";
    default:  // strings and messages are not columns (ScoreColumns)
      return "";
  }
}

}  // namespace

absl::Status ToAbslStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      status.error_message());
}

absl::StatusOr<std::string> ServiceConfigJson(const ClientOptions& options) {
  if (options.lb_policy != "pick_first" && options.lb_policy != "round_robin") {
    return absl::InvalidArgumentError(absl::StrCat(
        "client: lb_policy must be pick_first or round_robin, got \"",
        options.lb_policy, "\""));
  }
  if (options.max_attempts < 1 || options.max_attempts > 5) {
    return absl::InvalidArgumentError(absl::StrCat(
        "client: max_attempts must be in 1..5, got ", options.max_attempts));
  }
  std::string config = absl::StrCat("{\"loadBalancingConfig\": [{\"",
                                    options.lb_policy, "\": {}}]");
  if (options.max_attempts > 1) {
    // gRPC retries a call only while no response has arrived; the wait
    // before retry n (n >= 1) is random in [0, min(0.2 s * 2^(n-1), 2 s)].
    absl::StrAppend(&config,
                    ", \"methodConfig\": [{\"name\": ["
                    "{\"service\": \"vdm.v1.VdmService\"}, "
                    "{\"service\": \"grpc.health.v1.Health\"}], "
                    "\"retryPolicy\": {\"maxAttempts\": ",
                    options.max_attempts,
                    ", \"initialBackoff\": \"0.2s\", \"maxBackoff\": \"2s\", "
                    "\"backoffMultiplier\": 2, "
                    "\"retryableStatusCodes\": [\"UNAVAILABLE\"]}}]");
  }
  absl::StrAppend(&config, "}");
  return config;
}

// ---- VdmClient
// ---------------------------------------------------------------

absl::StatusOr<std::unique_ptr<VdmClient>> VdmClient::Create(
    const ClientOptions& options) {
  if (options.target.empty()) {
    return absl::InvalidArgumentError("client: target is empty");
  }
  if (options.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("client: timeout must be positive");
  }
  VDM_ASSIGN_OR_RETURN(const std::string service_config,
                       ServiceConfigJson(options));
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  args.SetServiceConfigJSON(service_config);
  std::shared_ptr<grpc::ChannelCredentials> credentials =
      grpc::InsecureChannelCredentials();
  const bool has_cert = !options.tls_cert_file.empty();
  if (has_cert != !options.tls_key_file.empty()) {
    return absl::InvalidArgumentError(
        "client: --tls_cert and --tls_key go together");
  }
  if (!options.tls_ca_file.empty() || has_cert) {
    if (options.tls_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "client: a client certificate needs --tls_ca (the server's CA)");
    }
    grpc::SslCredentialsOptions ssl;
    VDM_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadFile(options.tls_ca_file));
    if (has_cert) {
      VDM_ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadFile(options.tls_cert_file));
      VDM_ASSIGN_OR_RETURN(ssl.pem_private_key, ReadFile(options.tls_key_file));
    }
    credentials = grpc::SslCredentials(ssl);
    if (!options.tls_server_name.empty()) {
      args.SetSslTargetNameOverride(options.tls_server_name);
    }
  }
  std::shared_ptr<grpc::Channel> channel = grpc::CreateCustomChannel(
      options.target, credentials, args);
  return std::make_unique<VdmClient>(std::move(channel), options);
}

VdmClient::VdmClient(std::shared_ptr<grpc::Channel> channel,
                     const ClientOptions& options)
    : options_(options),
      channel_(std::move(channel)),
      stub_(vdm::v1::VdmService::NewStub(channel_)),
      health_stub_(grpc::health::v1::Health::NewStub(channel_)) {}

void VdmClient::Prepare(grpc::ClientContext* context) const {
  context->set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  if (!options_.auth_token.empty()) {
    context->AddMetadata("authorization",
                         absl::StrCat("Bearer ", options_.auth_token));
  }
}

absl::StatusOr<vdm::v1::ModelInfo> VdmClient::GetInfo() const {
  grpc::ClientContext context;
  Prepare(&context);
  vdm::v1::ModelInfoRequest request;
  Target(&request);
  vdm::v1::ModelInfo info;
  VDM_RETURN_IF_ERROR(
      ToAbslStatus(stub_->GetModelInfo(&context, request, &info)));
  return info;
}

absl::StatusOr<vdm::v1::ListModelsResponse> VdmClient::ListModels() const {
  grpc::ClientContext context;
  Prepare(&context);
  vdm::v1::ListModelsResponse list;
  VDM_RETURN_IF_ERROR(ToAbslStatus(
      stub_->ListModels(&context, vdm::v1::ListModelsRequest(), &list)));
  return list;
}

absl::StatusOr<ServingStatus> VdmClient::CheckHealth(
    const std::string& service) const {
  grpc::ClientContext context;
  Prepare(&context);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  VDM_RETURN_IF_ERROR(
      ToAbslStatus(health_stub_->Check(&context, request, &response)));
  return response.status();
}

namespace {

vdm::v1::SampleRequest SampleRequestOf(const SampleParams& params) {
  vdm::v1::SampleRequest request;
  request.set_num_images(params.num_images);
  request.set_sampler(params.sampler);
  request.set_time_grid(params.time_grid);
  request.set_steps(params.steps);
  request.set_eta(params.eta);
  if (params.guidance_scale.has_value()) {
    request.set_guidance_scale(*params.guidance_scale);
  }
  if (params.label.has_value()) request.set_label(*params.label);
  if (params.seed.has_value()) request.set_seed(*params.seed);
  request.set_format(params.format);
  if (params.negative_label) request.set_negative_label(*params.negative_label);
  if (!params.init_image_png.empty()) {
    request.mutable_init_image()->set_data(params.init_image_png);
  }
  if (params.strength) request.set_strength(*params.strength);
  if (params.strength_t) request.set_strength_t(*params.strength_t);
  if (!params.mask_png.empty()) request.mutable_mask()->set_data(params.mask_png);
  request.set_resample_rounds(params.resample_rounds);
  for (const Latent& z : params.latents) {
    LatentToProto(z.values, z.shape, request.add_latents());
  }
  return request;
}

// Decodes a SampleResponse into `result`.
absl::Status ReadSampleResponse(const vdm::v1::SampleResponse& response,
                                const SampleParams& params,
                                SampleResult* result) {
  if (response.images_size() != params.num_images) {
    return absl::InternalError(
        absl::StrFormat("Sample: asked for %d images, the server returned %d",
                        params.num_images, response.images_size()));
  }
  for (int i = 0; i < response.images_size(); ++i) {
    absl::StatusOr<Image8> image =
        ImageFromProto(response.images(i), params.format);
    if (!image.ok()) {
      return Annotate(image.status(), absl::StrCat("Sample: image ", i, ": "));
    }
    result->images.push_back(*std::move(image));
  }
  result->seed = response.seed();
  result->network_evaluations = response.network_evaluations();
  result->queue_seconds = response.queue_seconds();
  result->compute_seconds = response.compute_seconds();
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<EncodeResult> VdmClient::Encode(
    const std::vector<Image8>& images, const EncodeParams& params) const {
  vdm::v1::EncodeRequest request;
  Target(&request);
  request.set_format(vdm::v1::IMAGE_FORMAT_RAW);
  for (const Image8& image : images) {
    VDM_RETURN_IF_ERROR(
        ImageToProto(image, vdm::v1::IMAGE_FORMAT_RAW, request.add_images()));
  }
  request.set_steps(params.steps);
  request.set_time_grid(params.time_grid);
  if (params.label) request.set_label(*params.label);
  grpc::ClientContext context;
  Prepare(&context);
  const absl::Time start = absl::Now();
  vdm::v1::EncodeResponse response;
  VDM_RETURN_IF_ERROR(
      ToAbslStatus(stub_->Encode(&context, request, &response)));
  if (response.latents_size() != static_cast<int>(images.size())) {
    return absl::InternalError(absl::StrFormat(
        "Encode: sent %d images, the server returned %d latents",
        images.size(), response.latents_size()));
  }
  EncodeResult result;
  result.wall_seconds = SecondsSince(start);
  for (const vdm::v1::Latent& z : response.latents()) {
    Latent latent;
    latent.shape = {z.channels(), z.height(), z.width()};
    latent.values.assign(z.values().begin(), z.values().end());
    if (static_cast<int64_t>(latent.values.size()) != latent.shape.dims()) {
      return absl::InternalError("Encode: a latent does not match its shape");
    }
    result.latents.push_back(std::move(latent));
  }
  result.network_evaluations = response.network_evaluations();
  result.queue_seconds = response.queue_seconds();
  result.compute_seconds = response.compute_seconds();
  return result;
}

absl::StatusOr<SampleResult> VdmClient::Sample(
    const SampleParams& params) const {
  vdm::v1::SampleRequest request = SampleRequestOf(params);
  Target(&request);
  grpc::ClientContext context;
  Prepare(&context);
  const absl::Time start = absl::Now();
  vdm::v1::SampleResponse response;
  VDM_RETURN_IF_ERROR(
      ToAbslStatus(stub_->Sample(&context, request, &response)));
  SampleResult result;
  result.wall_seconds = SecondsSince(start);
  result.peer = context.peer();
  VDM_RETURN_IF_ERROR(ReadSampleResponse(response, params, &result));
  return result;
}

absl::StatusOr<SampleResult> VdmClient::SampleStream(
    const SampleParams& params, int preview_every,
    const SampleStreamProgress& progress) const {
  vdm::v1::SampleRequest request = SampleRequestOf(params);
  Target(&request);
  request.set_preview_every(preview_every);
  grpc::ClientContext context;
  Prepare(&context);
  const absl::Time start = absl::Now();
  std::unique_ptr<grpc::ClientReader<vdm::v1::SampleStreamResponse>> reader =
      stub_->SampleStream(&context, request);
  vdm::v1::SampleStreamResponse message;
  SampleResult result;
  bool have_result = false;
  absl::Status decoded;
  while (reader->Read(&message)) {
    if (message.has_result()) {
      decoded = ReadSampleResponse(message.result(), params, &result);
      have_result = true;
    } else if (progress) {
      std::vector<Image8> previews;
      for (const vdm::v1::Image& p : message.progress().previews()) {
        absl::StatusOr<Image8> image = ImageFromProto(p, params.format);
        if (image.ok()) previews.push_back(*std::move(image));
      }
      progress(message.progress().step(), message.progress().total_steps(),
               previews);
    }
  }
  VDM_RETURN_IF_ERROR(ToAbslStatus(reader->Finish()));
  VDM_RETURN_IF_ERROR(decoded);
  if (!have_result) {
    return absl::InternalError("SampleStream ended without a result");
  }
  result.wall_seconds = SecondsSince(start);
  result.peer = context.peer();
  return result;
}

absl::Status VdmClient::ScoreChunk(const ScoreInput& input,
                                   const ScoreParams& params, int64_t begin,
                                   int64_t end, std::optional<uint64_t> seed,
                                   vdm::v1::ScoreResponse* response) const {
  vdm::v1::ScoreRequest request;
  Target(&request);
  request.set_format(input.format);
  request.set_timesteps(params.timesteps);
  if (seed.has_value()) request.set_seed(*seed);
  if (params.label.has_value()) request.set_label(*params.label);
  request.set_shared_noise(params.shared_noise);
  if (params.false_positive_rate.has_value()) {
    request.set_false_positive_rate(*params.false_positive_rate);
  }
  request.set_anomaly_map(params.anomaly_map);
  request.set_method(params.method);
  request.set_ode_steps(params.ode_steps);
  request.set_trace_samples(params.trace_samples);
  request.set_ode_rtol(params.ode_rtol);
  request.set_ode_atol(params.ode_atol);
  request.set_ode_max_evaluations(params.ode_max_evaluations);
  request.set_dequantization(params.dequantization);
  request.set_time_sampling(params.time_sampling);
  request.set_anomaly_level(params.anomaly_level);
  for (int64_t i = begin; i < end; ++i) {
    *request.add_images() = input.images[static_cast<size_t>(i)];
  }
  grpc::ClientContext context;
  Prepare(&context);
  VDM_RETURN_IF_ERROR(
      ToAbslStatus(stub_->ScoreBPD(&context, request, response)));
  if (response->scores_size() != end - begin) {
    return absl::InternalError(absl::StrFormat(
        "ScoreBPD: sent %d images, the server returned %d scores", end - begin,
        response->scores_size()));
  }
  return absl::OkStatus();
}

absl::StatusOr<ScoreResult> VdmClient::ScoreImages(
    const ScoreInput& input, const ScoreParams& params,
    const ScoreProgress& progress) const {
  if (params.chunk_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ScoreImages: chunk_size must be positive, got ", params.chunk_size));
  }
  if (input.images.empty()) {
    return absl::InvalidArgumentError("ScoreImages: no images to score");
  }
  const int64_t total = static_cast<int64_t>(input.images.size());
  const absl::Time start = absl::Now();
  ScoreResult result;
  result.rows.reserve(input.images.size());
  std::optional<uint64_t> base = params.seed;
  for (int64_t begin = 0; begin < total; begin += params.chunk_size) {
    const int64_t end = std::min<int64_t>(total, begin + params.chunk_size);
    const int64_t chunk = begin / params.chunk_size;
    std::optional<uint64_t> seed = base;
    if (base.has_value() && !params.shared_noise) {
      seed = ChunkSeed(*base, chunk);
    }
    vdm::v1::ScoreResponse response;
    const absl::Status status =
        ScoreChunk(input, params, begin, end, seed, &response);
    if (!status.ok()) {
      if (total <= params.chunk_size) return status;
      return Annotate(status, absl::StrFormat("images %d..%d of %d: ", begin,
                                              end - 1, total));
    }
    if (!base.has_value()) base = response.seed();
    for (int64_t i = begin; i < end; ++i) {
      ScoreRow row;
      row.index = i;
      row.score = response.scores(static_cast<int>(i - begin));
      if (static_cast<size_t>(i) < input.names.size()) {
        row.name = input.names[static_cast<size_t>(i)];
      }
      result.rows.push_back(std::move(row));
    }
    result.network_evaluations += response.network_evaluations();
    ++result.chunks;
    if (progress) progress(end, total);
  }
  result.seed = *base;
  result.wall_seconds = SecondsSince(start);
  return result;
}

// ---- Helpers
// -----------------------------------------------------------------

absl::StatusOr<vdm::v1::Sampler> ParseSampler(absl::string_view name) {
  VDM_ASSIGN_OR_RETURN(SamplerType type, ParseSamplerType(std::string(name)));
  return SamplerToProto(type);
}

absl::StatusOr<vdm::v1::TimeGrid> ParseTimeGrid(absl::string_view name) {
  VDM_ASSIGN_OR_RETURN(TimeGrid grid, vdm::ParseTimeGrid(std::string(name)));
  return TimeGridToProto(grid);
}

std::string ServingStatusName(ServingStatus status) {
  return grpc::health::v1::HealthCheckResponse::ServingStatus_Name(status);
}

ScoreInput RawInput(const std::vector<Image8>& images) {
  ScoreInput input;
  input.format = vdm::v1::IMAGE_FORMAT_RAW;
  input.images.reserve(images.size());
  for (const Image8& image : images) {
    // Raw images cannot fail to encode.
    (void)ImageToProto(image, vdm::v1::IMAGE_FORMAT_RAW,
                       &input.images.emplace_back());
  }
  return input;
}

absl::StatusOr<ScoreInput> LoadPngFiles(const std::vector<std::string>& paths) {
  ScoreInput input;
  input.format = vdm::v1::IMAGE_FORMAT_PNG;
  for (const std::string& path : paths) {
    VDM_ASSIGN_OR_RETURN(std::string data, ReadFile(path));
    absl::StatusOr<Image8> image = DecodePng(data);
    if (!image.ok()) return Annotate(image.status(), absl::StrCat(path, ": "));
    vdm::v1::Image& proto = input.images.emplace_back();
    proto.set_channels(image->channels);
    proto.set_height(image->height);
    proto.set_width(image->width);
    proto.set_data(std::move(data));
    input.names.push_back(path);
  }
  return input;
}

absl::StatusOr<ScoreInput> LoadIdxImages(const std::string& path,
                                         int64_t limit) {
  VDM_ASSIGN_OR_RETURN(std::vector<Image8> images, ReadIdxImages(path, limit));
  return RawInput(images);
}

absl::Status WriteLatentsNpy(const std::vector<Latent>& latents,
                             const std::string& path) {
  if (latents.empty()) return absl::InvalidArgumentError("no latents to write");
  const ImageShape shape = latents[0].shape;
  std::string header = absl::StrFormat(
      "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d, %d, %d), }",
      latents.size(), shape.channels, shape.height, shape.width);
  // Magic (6) + version (2) + length (2) + header + '\n', padded to 64.
  const size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::string out("\x93NUMPY\x01\x00", 8);
  out.push_back(static_cast<char>(header.size() & 0xff));
  out.push_back(static_cast<char>(header.size() >> 8));
  out += header;
  for (const Latent& z : latents) {
    if (!(z.shape == shape) ||
        static_cast<int64_t>(z.values.size()) != shape.dims()) {
      return absl::InvalidArgumentError("latents of different shapes");
    }
    out.append(reinterpret_cast<const char*>(z.values.data()),
               z.values.size() * sizeof(float));  // little-endian hosts
  }
  return WriteFileAtomic(path, out);
}

absl::StatusOr<std::vector<Latent>> ReadLatentsNpy(const std::string& path) {
  VDM_ASSIGN_OR_RETURN(const std::string data, ReadFile(path));
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not a float32 (n, C, H, W) .npy file: ", why));
  };
  if (data.size() < 10 || data.compare(0, 6, "\x93NUMPY", 6) != 0) {
    return bad("no .npy magic");
  }
  if (data[6] != 1) return bad("only format version 1.0 is read");
  const size_t length = static_cast<uint8_t>(data[8]) |
                        (static_cast<size_t>(static_cast<uint8_t>(data[9])) << 8);
  if (data.size() < 10 + length) return bad("truncated header");
  const std::string header = data.substr(10, length);
  if (header.find("'descr': '<f4'") == std::string::npos ||
      header.find("'fortran_order': False") == std::string::npos) {
    return bad("dtype must be '<f4' in C order");
  }
  const size_t open = header.find("'shape': (");
  const size_t close = header.find(')', open);
  if (open == std::string::npos || close == std::string::npos) {
    return bad("no shape");
  }
  std::vector<int64_t> dims;
  for (absl::string_view part : absl::StrSplit(
           header.substr(open + 10, close - open - 10), ',', absl::SkipWhitespace())) {
    int64_t d = 0;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &d) || d < 1 ||
        d > (1 << 20)) {
      return bad("bad shape");
    }
    dims.push_back(d);
  }
  if (dims.size() != 4) return bad("the shape must have 4 dimensions");
  const ImageShape shape{static_cast<int>(dims[1]), static_cast<int>(dims[2]),
                         static_cast<int>(dims[3])};
  const size_t bytes = static_cast<size_t>(dims[0] * shape.dims()) * sizeof(float);
  if (data.size() != 10 + length + bytes) return bad("wrong data size");
  std::vector<Latent> latents(dims[0]);
  const char* p = data.data() + 10 + length;
  for (Latent& z : latents) {
    z.shape = shape;
    z.values.resize(shape.dims());
    std::memcpy(z.values.data(), p, z.values.size() * sizeof(float));
    p += z.values.size() * sizeof(float);
  }
  return latents;
}

absl::StatusOr<std::vector<Latent>> SlerpPath(const Latent& a, const Latent& b,
                                              int num) {
  if (!(a.shape == b.shape) || a.values.size() != b.values.size()) {
    return absl::InvalidArgumentError("slerp: the latents differ in shape");
  }
  if (num < 2) return absl::InvalidArgumentError("slerp: num must be >= 2");
  double dot = 0, na = 0, nb = 0;
  for (size_t i = 0; i < a.values.size(); ++i) {
    dot += double{a.values[i]} * b.values[i];
    na += double{a.values[i]} * a.values[i];
    nb += double{b.values[i]} * b.values[i];
  }
  const double cosine =
      na > 0 && nb > 0 ? std::clamp(dot / std::sqrt(na * nb), -1.0, 1.0) : 1.0;
  const double theta = std::acos(cosine);
  std::vector<Latent> path;
  for (int k = 0; k < num; ++k) {
    const double t = static_cast<double>(k) / (num - 1);
    // Nearly parallel: linear interpolation is the limit.
    const double wa = theta < 1e-6 ? 1 - t : std::sin((1 - t) * theta) / std::sin(theta);
    const double wb = theta < 1e-6 ? t : std::sin(t * theta) / std::sin(theta);
    Latent z{a.shape, std::vector<float>(a.values.size())};
    for (size_t i = 0; i < z.values.size(); ++i) {
      z.values[i] = static_cast<float>(wa * a.values[i] + wb * b.values[i]);
    }
    path.push_back(std::move(z));
  }
  return path;
}

int GridColumns(int n) {
  int columns = static_cast<int>(std::ceil(std::sqrt(static_cast<double>(n))));
  while (columns * columns < n) ++columns;  // guard against rounding
  return std::max(columns, 1);
}

absl::Status WriteSampleFiles(const SampleResult& result,
                              const std::string& grid_path,
                              const std::string& out_dir, int columns) {
  if (result.images.empty()) return absl::InvalidArgumentError("no images");
  if (!grid_path.empty()) {
    if (columns <= 0) columns = GridColumns(static_cast<int>(result.images.size()));
    VDM_ASSIGN_OR_RETURN(Image8 grid, MakeGrid(result.images, columns));
    VDM_ASSIGN_OR_RETURN(std::string png, EncodePng(grid));
    VDM_RETURN_IF_ERROR(WriteFileAtomic(grid_path, png));
  }
  if (out_dir.empty()) return absl::OkStatus();
  std::error_code error;
  std::filesystem::create_directories(out_dir, error);
  if (error) {
    return absl::UnavailableError(
        absl::StrCat(out_dir, ": cannot create directory: ", error.message()));
  }
  for (size_t i = 0; i < result.images.size(); ++i) {
    VDM_ASSIGN_OR_RETURN(std::string png, EncodePng(result.images[i]));
    VDM_RETURN_IF_ERROR(WriteFileAtomic(
        absl::StrFormat("%s/sample_%03d.png", out_dir, i), png));
  }
  return absl::OkStatus();
}

absl::StatusOr<SampleResult> SampleToFiles(const VdmClient& client,
                                           const SampleParams& params,
                                           const std::string& grid_path,
                                           const std::string& out_dir) {
  VDM_ASSIGN_OR_RETURN(SampleResult result, client.Sample(params));
  VDM_RETURN_IF_ERROR(WriteSampleFiles(result, grid_path, out_dir));
  return result;
}

std::string FormatSampleSummary(const SampleResult& result) {
  return absl::StrFormat(
      "images: %d\nseed: %d\nnetwork evaluations: %d\n"
      "time: %.3f s (server: queue %.3f s, compute %.3f s)\npeer: %s\n",
      result.images.size(), result.seed, result.network_evaluations,
      result.wall_seconds, result.queue_seconds, result.compute_seconds,
      result.peer);
}

std::string FormatScoresCsv(const std::vector<ScoreRow>& rows) {
  std::vector<IndexedScore> scores;
  for (const ScoreRow& row : rows) scores.emplace_back(row.index, &row.score);
  return FormatScoreMessagesCsv(*vdm::v1::ImageScore::descriptor(), scores);
}

std::string FormatScoreMessagesCsv(const pb::Descriptor& type,
                                   const std::vector<IndexedScore>& rows) {
  // Each row's groups; a group's columns are shown when a row has it.
  std::vector<std::set<std::string>> groups;
  std::set<std::string> shown = {""};  // the ungrouped ones, even with no rows
  for (const IndexedScore& row : rows) {
    groups.push_back(GroupsSet(*row.second));
    shown.insert(groups.back().begin(), groups.back().end());
  }
  std::vector<ScoreColumn> columns;
  std::string csv = "index";
  for (ScoreColumn& column : ScoreColumns(type)) {
    if (shown.count(column.group()) == 0) continue;
    absl::StrAppend(&csv, ",", column.name);
    columns.push_back(std::move(column));
  }
  csv += "\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    absl::StrAppend(&csv, rows[i].first);
    for (const ScoreColumn& column : columns) {
      // A row without the column's group leaves it empty.
      const bool has = groups[i].count(column.group()) > 0;
      absl::StrAppend(&csv, ",", has ? Cell(*rows[i].second, column) : "");
    }
    csv += "\n";
  }
  return csv;
}

absl::Status WriteAnomalyMaps(const std::vector<ScoreRow>& rows,
                              const std::string& dir) {
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot create ", dir, ": ", error.message()));
  }
  for (const ScoreRow& row : rows) {
    if (row.score.anomaly_map_png().empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat("image ", row.index, " has no anomaly map"));
    }
    VDM_RETURN_IF_ERROR(
        WriteFileAtomic(absl::StrFormat("%s/map_%05d.png", dir, row.index),
                        row.score.anomaly_map_png()));
  }
  return absl::OkStatus();
}

absl::Status WriteScoresCsv(const std::vector<ScoreRow>& rows,
                            const std::string& path) {
  return WriteFileAtomic(path, FormatScoresCsv(rows));
}

std::string FormatScoresTable(const std::vector<ScoreRow>& rows) {
  std::string table = absl::StrFormat("%7s %9s %9s %9s %9s %9s", "index", "bpd",
                                      "prior", "recon", "diffusion", "stderr");
  const bool named =
      std::any_of(rows.begin(), rows.end(),
                  [](const ScoreRow& r) { return !r.name.empty(); });
  absl::StrAppend(&table, named ? "  file\n" : "\n");
  for (const ScoreRow& row : rows) {
    absl::StrAppendFormat(&table, "%7d %9.4f %9.4f %9.4f %9.4f %9.4f",
                          row.index, row.score.bpd(), row.score.prior_bpd(),
                          row.score.recon_bpd(), row.score.diffusion_bpd(),
                          row.score.stderr_bpd());
    absl::StrAppend(&table, named ? "  " : "", row.name, "\n");
  }
  return table;
}

std::string FormatScoresSummary(const ScoreResult& result) {
  const double n = static_cast<double>(result.rows.size());
  double bpd = 0, prior = 0, recon = 0, diffusion = 0, stderr_bpd = 0;
  for (const ScoreRow& row : result.rows) {
    bpd += row.score.bpd() / n;
    prior += row.score.prior_bpd() / n;
    recon += row.score.recon_bpd() / n;
    diffusion += row.score.diffusion_bpd() / n;
    stderr_bpd += row.score.stderr_bpd() / n;
  }
  double sum_sq = 0;
  for (const ScoreRow& row : result.rows) {
    const double d = row.score.bpd() - bpd;
    sum_sq += d * d;
  }
  const double sem = n > 1 ? std::sqrt(sum_sq / (n - 1) / n) : 0.0;
  return absl::StrFormat(
      "images: %d\nmean bpd: %.4f +- %.4f (standard error over images)\n"
      "mean prior bpd: %.4f\nmean recon bpd: %.4f\nmean diffusion bpd: %.4f\n"
      "mean stderr bpd: %.4f\nseed: %d\nnetwork evaluations: %d\n"
      "time: %.3f s in %d chunk(s)\n",
      result.rows.size(), bpd, sem, prior, recon, diffusion, stderr_bpd,
      result.seed, result.network_evaluations, result.wall_seconds,
      result.chunks);
}

std::string FormatModelInfo(const vdm::v1::ModelInfo& info) {
  namespace pb = google::protobuf;
  const pb::Descriptor* descriptor = info.GetDescriptor();
  const pb::Reflection* reflection = info.GetReflection();
  std::string out;
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const pb::FieldDescriptor* field = descriptor->field(i);
    std::string value;
    if (field->cpp_type() == pb::FieldDescriptor::CPPTYPE_STRING &&
        !field->is_repeated()) {
      value = reflection->GetString(info, field);
    } else {
      pb::TextFormat::PrintFieldValueToString(info, field, -1, &value);
    }
    absl::StrAppend(&out, field->name(), ": ", value, "\n");
  }
  return out;
}

std::string FormatModelList(const vdm::v1::ListModelsResponse& list) {
  std::string out;
  for (const vdm::v1::ModelVersionStatus& m : list.models()) {
    absl::StrAppendFormat(
        &out, "%s\t%d\t%s\t%.1f MiB%s%s\n", m.name(), m.version(),
        absl::AsciiStrToLower(vdm::v1::ModelVersionStatus::State_Name(m.state())),
        m.memory_bytes() / 1048576.0, m.is_default() ? "\tdefault" : "",
        m.error().empty() ? "" : absl::StrCat("\t", m.error()));
  }
  return out;
}

}  // namespace client
}  // namespace vdm
