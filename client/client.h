// A small client library for vdm-serve over the generated gRPC stubs: sample
// images, score images in bits per dimension (in chunks, so any number of
// images fits under the message limits), read the model's info and check
// health; plus the helpers that write what comes back (PNG files, CSV,
// tables). Used by the vdm-client binary and by the service tests.
//
// Every call returns absl::Status; an RPC failure keeps the server's gRPC
// code and message.
#ifndef VDM_CLIENT_CLIENT_H_
#define VDM_CLIENT_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "model/vdm/image_io.h"
#include "model/vdm/request.h"
#include "proto/convert.h"
#include "vdm/v1/vdm.grpc.pb.h"

namespace vdm {
namespace client {

// Turns a grpc::Status into an absl::Status with the same code and message.
absl::Status ToAbslStatus(const grpc::Status& status);

// Connection settings.
struct ClientOptions {
  // The server, as HOST:PORT (any gRPC target string).
  std::string target = "localhost:50051";
  // Deadline of each RPC (each chunk of a chunked score has its own).
  absl::Duration timeout = absl::Seconds(600);
  // When non-empty, sent with every RPC as "authorization: Bearer <token>".
  std::string auth_token;
  // Largest response accepted (sampled images come back in one message).
  int max_receive_message_bytes = 256 << 20;
  // Load-balancing policy over the addresses the target resolves to:
  // "pick_first" (gRPC's default: one connection to one address) or
  // "round_robin" (a connection to every address, calls spread over them;
  // use it with a target that resolves to every replica, e.g.
  // dns:///vdm-headless.NAMESPACE.svc.cluster.local:50051 or
  // ipv4:127.0.0.1:5001,127.0.0.1:5002).
  std::string lb_policy = "pick_first";
  // Attempts per RPC, 1 to 5: a call that fails with UNAVAILABLE (replica
  // gone, shutting down or not ready) before any response arrived is tried
  // again, on another replica under round_robin, with exponential backoff.
  // Every vdm.v1 and health RPC is free of side effects, so retrying is
  // safe. 1 = no retries.
  int max_attempts = 1;
  // TLS: PEM files. tls_ca set = TLS, verifying the server against that CA
  // (the server's certificate must name the target's host). tls_cert and
  // tls_key (both or neither) = a client certificate for mTLS. All empty =
  // plaintext.
  std::string tls_ca_file, tls_cert_file, tls_key_file;
  // Overrides the name checked against the server's certificate (e.g. when
  // the target is an IP address); empty = the target's host.
  std::string tls_server_name;
  // The model version every request runs on (vdm-server
  // --model_repository): empty = the server's default model; unset = the
  // version it serves.
  std::string model;
  std::optional<int64_t> model_version;
};

// The gRPC service config (JSON) for options.lb_policy and
// options.max_attempts; fails on an unknown policy or an attempt count
// outside 1..5.
absl::StatusOr<std::string> ServiceConfigJson(const ClientOptions& options);

// A latent z_1 of one image (Encode's output; Sample decodes it).
struct Latent {
  ImageShape shape;
  std::vector<float> values;  // C x H x W, row-major
};

// What to sample; mirrors vdm.v1.SampleRequest.
struct SampleParams {
  int num_images = 1;
  vdm::v1::Sampler sampler = vdm::v1::SAMPLER_DDIM;
  vdm::v1::TimeGrid time_grid = vdm::v1::TIME_GRID_UNIFORM_T;
  int steps = 0;     // 0 = the server's default (50)
  float eta = 0.0f;  // DDIM only, in [0, 1]
  // Classifier-free guidance scale (needs a label); unset = the server's
  // default (1, plain conditional).
  std::optional<float> guidance_scale;
  std::optional<int> label;      // unset = unconditional
  std::optional<uint64_t> seed;  // unset = chosen by the server
  // Wire format of the returned images; both are decoded into Image8.
  vdm::v1::ImageFormat format = vdm::v1::IMAGE_FORMAT_RAW;
  std::optional<int> negative_label;  // negative-label guidance
  // Editing: the image to edit as PNG bytes, the SDEdit strength (the noise
  // variance fraction sigma^2 of the start; or strength_t, the time t) and
  // the inpainting mask as PNG bytes (white = known).
  std::string init_image_png;
  std::optional<float> strength;
  std::optional<float> strength_t;
  std::string mask_png;
  int resample_rounds = 0;  // RePaint resampling (inpainting), 0..10
  // Decoding: one image per latent (set num_images to latents.size(); the
  // sampler must be DDIM with eta 0).
  std::vector<Latent> latents;
};

// How to encode; mirrors vdm.v1.EncodeRequest. Decode with the same steps,
// time grid and label.
struct EncodeParams {
  int steps = 0;  // 0 = the server's default (50)
  vdm::v1::TimeGrid time_grid = vdm::v1::TIME_GRID_UNIFORM_T;
  std::optional<int> label;
};

struct EncodeResult {
  std::vector<Latent> latents;  // one per image, in order
  int64_t network_evaluations = 0;
  double queue_seconds = 0.0, compute_seconds = 0.0, wall_seconds = 0.0;
};

// What came back from Sample.
struct SampleResult {
  std::vector<Image8> images;
  uint64_t seed = 0;  // the seed actually used: pass it back to reproduce
  int64_t network_evaluations = 0;
  double queue_seconds = 0.0;    // server: waiting before the first forward
  double compute_seconds = 0.0;  // server: first to last forward
  double wall_seconds = 0.0;     // client: the whole round trip
  std::string peer;  // the replica that answered (last attempt), e.g.
                     // "ipv4:127.0.0.1:50051"
};

// Images to score, all in one wire format: PNG files as they are, or raw
// pixels with their shape set.
struct ScoreInput {
  vdm::v1::ImageFormat format = vdm::v1::IMAGE_FORMAT_RAW;
  std::vector<vdm::v1::Image> images;
  std::vector<std::string> names;  // optional, one per image (file names)
};

// How to score; mirrors vdm.v1.ScoreRequest, plus the chunk size.
struct ScoreParams {
  int timesteps = 0;             // K; 0 = the server's default (16)
  std::optional<uint64_t> seed;  // unset = chosen by the server (chunk 0)
  std::optional<int> label;      // unset = "no label"
  bool shared_noise = false;     // common random numbers across all images
  int chunk_size = 100;          // images per RPC
  std::optional<float> false_positive_rate;  // unset = the server's (0.01)
  bool anomaly_map = false;      // also the per-pixel maps
  // SCORE_METHOD_ODE: the probability-flow ODE likelihood; 0 and
  // UNSPECIFIED = the server's defaults (the adaptive solver, 1 solve per
  // image, Gaussian dequantization). vdm.proto ScoreRequest says what each
  // means.
  vdm::v1::ScoreMethod method = vdm::v1::SCORE_METHOD_UNSPECIFIED;
  int ode_steps = 0;
  int trace_samples = 0;
  double ode_rtol = 0;
  double ode_atol = 0;
  int ode_max_evaluations = 0;
  vdm::v1::Dequantization dequantization = vdm::v1::DEQUANTIZATION_UNSPECIFIED;
  // ELBO: the server's time proposal when it has one (UNSPECIFIED), or
  // uniform times, or insist on the proposal.
  vdm::v1::TimeSampling time_sampling = vdm::v1::TIME_SAMPLING_UNSPECIFIED;
  // FAST (UNSPECIFIED) or THOROUGH (info: thorough_available).
  vdm::v1::AnomalyLevel anomaly_level = vdm::v1::ANOMALY_LEVEL_UNSPECIFIED;
};

// One scored image. `index` is its position in the ScoreInput.
struct ScoreRow {
  int64_t index = 0;
  std::string name;            // from ScoreInput::names, or empty
  vdm::v1::ImageScore score;   // as the server sent it
};

// What came back from ScoreImages, over all chunks.
struct ScoreResult {
  std::vector<ScoreRow> rows;  // one per input image, in input order
  uint64_t seed = 0;           // base seed: pass it back to reproduce
  int64_t network_evaluations = 0;
  int chunks = 0;
  double wall_seconds = 0.0;
};

// Called after each sampling step: steps done, total steps, previews.
using SampleStreamProgress = std::function<void(
    int step, int total_steps, const std::vector<Image8>& previews)>;

// Called after each chunk with the images scored so far and the total.
using ScoreProgress = std::function<void(int64_t done, int64_t total)>;

using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

// A connection to one vdm-serve target.
// Thread-safe: const after construction; the stubs and channel may be used
// from many threads at once.
class VdmClient {
 public:
  // Connects (lazily) to options.target with insecure credentials, the load
  // balancing and retries of ServiceConfigJson(options). Fails on an empty
  // target, a non-positive timeout or a bad lb_policy/max_attempts.
  static absl::StatusOr<std::unique_ptr<VdmClient>> Create(
      const ClientOptions& options);

  // Uses an existing channel (e.g. an in-process server's);
  // options.target and max_receive_message_bytes are not used.
  VdmClient(std::shared_ptr<grpc::Channel> channel,
            const ClientOptions& options);

  // GetModelInfo of options.model (and model_version).
  absl::StatusOr<vdm::v1::ModelInfo> GetInfo() const;
  // ListModels: every model version the server knows, with its state.
  absl::StatusOr<vdm::v1::ListModelsResponse> ListModels() const;

  // grpc.health.v1.Health/Check of `service` ("" = the whole server).
  absl::StatusOr<ServingStatus> CheckHealth(
      const std::string& service = "") const;

  // Sample; checks that the right number of images came back and decodes
  // them.
  absl::StatusOr<SampleResult> Sample(const SampleParams& params) const;

  // The same through SampleStream: `progress` (when set) gets every step
  // as it completes, with x_hat previews every `preview_every` steps.
  absl::StatusOr<SampleResult> SampleStream(
      const SampleParams& params, int preview_every,
      const SampleStreamProgress& progress) const;

  // Encode: the latents of `images` (sent raw), checked to be one per image.
  absl::StatusOr<EncodeResult> Encode(const std::vector<Image8>& images,
                                      const EncodeParams& params) const;

  // ScoreBPD over `input` in chunks of params.chunk_size images, one RPC per
  // chunk, in order; stops at the first failed chunk (its error names the
  // images). Seeds: chunk 0 uses params.seed (or the server's choice); chunk
  // c then uses ChunkSeed(base, c), or `base` itself when shared_noise is set
  // so the common random numbers hold across chunks. Re-running with
  // seed = result.seed and the same chunk size reproduces the scores.
  absl::StatusOr<ScoreResult> ScoreImages(
      const ScoreInput& input, const ScoreParams& params,
      const ScoreProgress& progress = nullptr) const;

 private:
  // Sets the deadline and the credentials metadata.
  void Prepare(grpc::ClientContext* context) const;
  // Names options.model (and model_version) in a request.
  template <class Request>
  void Target(Request* request) const {
    if (!options_.model.empty()) request->set_model(options_.model);
    if (options_.model_version) request->set_version(*options_.model_version);
  }
  absl::Status ScoreChunk(const ScoreInput& input, const ScoreParams& params,
                          int64_t begin, int64_t end,
                          std::optional<uint64_t> seed,
                          vdm::v1::ScoreResponse* response) const;

  // Const after construction.
  const ClientOptions options_;
  const std::shared_ptr<grpc::Channel> channel_;
  const std::unique_ptr<vdm::v1::VdmService::Stub> stub_;
  const std::unique_ptr<grpc::health::v1::Health::Stub> health_stub_;
};

// A sampler or time grid by its library name (model/vdm/sampler_config.h:
// "ddim", "heun", ..., "uniform_t", "uniform_log_snr"; any case).
absl::StatusOr<vdm::v1::Sampler> ParseSampler(absl::string_view name);
absl::StatusOr<vdm::v1::TimeGrid> ParseTimeGrid(absl::string_view name);

// "SERVING", "NOT_SERVING", ...
std::string ServingStatusName(ServingStatus status);

// Raw wire images of `images`.
ScoreInput RawInput(const std::vector<Image8>& images);

// PNG files, sent as they are; each is decoded here first so that a bad file
// fails early with its name. Names are the paths.
absl::StatusOr<ScoreInput> LoadPngFiles(const std::vector<std::string>& paths);

// The first `limit` (0 = all) images of an IDX file, as raw images.
absl::StatusOr<ScoreInput> LoadIdxImages(const std::string& path,
                                         int64_t limit = 0);

// Latents as a NumPy .npy file: float32, shape (n, C, H, W), little-endian
// (np.load reads it). Reading accepts exactly that layout.
absl::Status WriteLatentsNpy(const std::vector<Latent>& latents,
                             const std::string& path);
absl::StatusOr<std::vector<Latent>> ReadLatentsNpy(const std::string& path);

// Spherical interpolation between two latents (the norm of a Gaussian latent
// concentrates, so straight lines would leave the shell): `num` >= 2 points
// from a (t = 0) to b (t = 1) evenly in t. Fails on different shapes.
absl::StatusOr<std::vector<Latent>> SlerpPath(const Latent& a, const Latent& b,
                                              int num);

// Columns of the sample grid: ceil(sqrt(n)).
int GridColumns(int n);

// Writes one PNG grid of all images to `grid_path` (unless empty) and, when
// `out_dir` is non-empty, one PNG per image: out_dir/sample_000.png, ...
// (creating out_dir if needed).
// `columns` 0 = GridColumns.
absl::Status WriteSampleFiles(const SampleResult& result,
                              const std::string& grid_path,
                              const std::string& out_dir, int columns = 0);

// Sample, then WriteSampleFiles.
absl::StatusOr<SampleResult> SampleToFiles(const VdmClient& client,
                                           const SampleParams& params,
                                           const std::string& grid_path,
                                           const std::string& out_dir);

// Seed, network evaluations and times, one per line.
std::string FormatSampleSummary(const SampleResult& result);

// The CSV of the rows' scores: a header, then one line per row. The columns
// are `index` and then those of vdm.v1.ImageScore, read from its descriptor
// by the rules above ImageScore in proto/vdm/v1/vdm.proto (today: bpd ..
// complexity_bpd, band_bpd_0..3, anomaly_score, p_value, is_anomaly, then
// the ODE's and the background model's columns when a row has them).
std::string FormatScoresCsv(const std::vector<ScoreRow>& rows);
// The same for messages of any type that follows those rules (ImageScore,
// or a variant of it in a test): one line per (index, message), all of
// type `type`.
using IndexedScore = std::pair<int64_t, const google::protobuf::Message*>;
std::string FormatScoreMessagesCsv(const google::protobuf::Descriptor& type,
                                   const std::vector<IndexedScore>& rows);
absl::Status WriteScoresCsv(const std::vector<ScoreRow>& rows,
                            const std::string& path);

// Writes each row's anomaly map PNG to dir/map_NNNNN.png (creating dir).
absl::Status WriteAnomalyMaps(const std::vector<ScoreRow>& rows,
                              const std::string& dir);

// An aligned table: index, bpd, prior, recon, diffusion, stderr (and the
// file name when there is one).
std::string FormatScoresTable(const std::vector<ScoreRow>& rows);

// Image count, mean BPD (with the standard error over images) and the mean
// of each part, the seed and the network evaluations.
std::string FormatScoresSummary(const ScoreResult& result);

// Every ModelInfo field as "name: value", one per line.
std::string FormatModelInfo(const vdm::v1::ModelInfo& info);
// One line per model version: name, version, state, MiB, default, error.
std::string FormatModelList(const vdm::v1::ListModelsResponse& list);

}  // namespace client
}  // namespace vdm

#endif  // VDM_CLIENT_CLIENT_H_
