#include "server/server.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <torch/script.h>

#include <algorithm>
#include <filesystem>
#include <future>
#include <map>
#include <vector>

#include <glog/logging.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "model/vdm/calibration_file.h"
#include "model/vdm/cpus.h"
#include "model/vdm/feature_model.h"
#include "model/vdm/image_io.h"
#include "model/vdm/status_macros.h"
#include "model/vdm/torchscript_model.h"
#include "server/tasks.h"

namespace vdm {
namespace {

constexpr char kServiceName[] = "vdm.v1.VdmService";
constexpr char kVersion[] = "0.2.0";

// Describes the loaded model for GetModelInfo and the anomaly score.
absl::StatusOr<ModelDescription> Describe(TorchScriptModel& model,
                                          const std::string& device) {
  ModelDescription d;
  d.shape = model.shape();
  d.num_classes = model.num_classes();
  d.prediction = model.prediction();
  d.metadata = model.metadata();
  d.path = model.path();
  d.device = device;
  VDM_ASSIGN_OR_RETURN(GammaValues g,
                       model.Gamma(torch::tensor({0.0f, 1.0f})));
  d.gamma_min = g.gamma[0].item<float>();
  d.gamma_max = g.gamma[1].item<float>();
  return d;
}

// The calibration file (calibration_file.h: the anomaly calibration and the
// time proposal): `path`, or beside the model (<model>.calibration.json)
// when `path` is empty and that file exists; "none" = neither.
absl::StatusOr<CalibrationFile> LoadCalibration(const std::string& path,
                                                const std::string& model_path) {
  std::string file = path;
  if (file == "none") return CalibrationFile();
  if (file.empty()) {
    file = model_path + ".calibration.json";
    std::error_code ignored;
    if (!std::filesystem::exists(file, ignored)) return CalibrationFile();
  }
  absl::StatusOr<CalibrationFile> c = ReadCalibrationFile(file);
  if (!c.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--calibration ", c.status().message()));
  }
  if (c->anomaly) {
    LOG(INFO) << "vdm-server: anomaly calibration " << file << " ("
              << c->anomaly->size() << " images, K = "
              << c->anomaly->setup().timesteps << ")";
  }
  if (c->time_proposal) {
    LOG(INFO) << "vdm-server: time proposal " << file << " ("
              << c->time_proposal->bins() << " bins, largest weight "
              << c->time_proposal->MaxWeight() << ")";
  }
  for (const std::string& why : c->skipped) {
    LOG(WARNING) << "vdm-server: calibration " << file << ": skipped " << why;
  }
  return c;
}

// The feature network of the thorough level: `path`, or beside the model
// (<model>.features.pt) when `path` is empty and that file exists; "none" =
// none. It must take the model's images.
absl::StatusOr<std::shared_ptr<const FeatureModel>> LoadFeatureModel(
    const std::string& path, const std::string& model_path,
    const ImageShape& shape) {
  std::string file = path;
  if (file == "none") return std::shared_ptr<const FeatureModel>();
  if (file.empty()) {
    file = model_path + ".features.pt";
    std::error_code ignored;
    if (!std::filesystem::exists(file, ignored)) {
      return std::shared_ptr<const FeatureModel>();
    }
  }
  absl::StatusOr<std::unique_ptr<FeatureModel>> loaded = FeatureModel::Load(file);
  if (!loaded.ok()) {
    return absl::Status(loaded.status().code(),
                        absl::StrCat("--feature_model: ", loaded.status().message()));
  }
  const ImageShape s = (*loaded)->shape();
  if (s.channels != shape.channels || s.height != shape.height ||
      s.width != shape.width) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--feature_model: ", file, " takes ", s.channels, "x", s.height, "x",
        s.width, " images, the model ", shape.channels, "x", shape.height, "x",
        shape.width));
  }
  return std::shared_ptr<const FeatureModel>(*std::move(loaded));
}

// gRPC reports a bad certificate or key only as "cannot listen"; OpenSSL
// says which file is wrong.
absl::Status CheckKeyPair(const std::string& cert_pem,
                          const std::string& key_pem) {
  BIO* cert_bio = BIO_new_mem_buf(cert_pem.data(), static_cast<int>(cert_pem.size()));
  X509* cert = PEM_read_bio_X509(cert_bio, nullptr, nullptr, nullptr);
  BIO_free(cert_bio);
  BIO* key_bio = BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size()));
  EVP_PKEY* key = PEM_read_bio_PrivateKey(key_bio, nullptr, nullptr, nullptr);
  BIO_free(key_bio);
  absl::Status status;
  if (cert == nullptr) {
    status = absl::InvalidArgumentError(
        "--tls_cert: not a PEM certificate");
  } else if (key == nullptr) {
    status = absl::InvalidArgumentError(
        "--tls_key: not a PEM private key (or it is encrypted)");
  } else if (X509_check_private_key(cert, key) != 1) {
    status = absl::InvalidArgumentError(
        "--tls_key does not match --tls_cert (the key is not the "
        "certificate's)");
  }
  X509_free(cert);
  EVP_PKEY_free(key);
  ERR_clear_error();
  return status;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> Credentials(
    const VdmServer::Options& o) {
  if (o.tls_cert_file.empty() && o.tls_key_file.empty()) {
    if (!o.tls_client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "tls_client_ca needs tls_cert and tls_key");
    }
    return grpc::InsecureServerCredentials();
  }
  if (o.tls_cert_file.empty() || o.tls_key_file.empty()) {
    return absl::InvalidArgumentError("TLS needs both tls_cert and tls_key");
  }
  grpc::SslServerCredentialsOptions ssl;
  VDM_ASSIGN_OR_RETURN(std::string cert, ReadFile(o.tls_cert_file));
  VDM_ASSIGN_OR_RETURN(std::string key, ReadFile(o.tls_key_file));
  VDM_RETURN_IF_ERROR(CheckKeyPair(cert, key));
  ssl.pem_key_cert_pairs.push_back({key, cert});
  if (!o.tls_client_ca_file.empty()) {
    VDM_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadFile(o.tls_client_ca_file));
    ssl.client_certificate_request =
        GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

absl::StatusOr<std::string> ReadToken(const std::string& path) {
  if (path.empty()) return std::string();
  VDM_ASSIGN_OR_RETURN(std::string token, ReadFile(path));
  token = std::string(absl::StripAsciiWhitespace(token));
  if (token.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("auth_token_file '", path, "' is empty"));
  }
  return token;
}

// "--flag: value is out of range [lo, hi]" unless lo <= value <= hi.
absl::Status InRange(const char* flag, int64_t value, int64_t lo, int64_t hi) {
  if (value >= lo && value <= hi) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("--", flag, ": ", value, " is out of range [", lo, ", ", hi,
                   "]"));
}

absl::Status CheckAddress(const char* flag, const std::string& address) {
  if (absl::StartsWith(address, "unix:")) return absl::OkStatus();
  const size_t colon = address.rfind(':');
  const std::string host = colon == std::string::npos ? "" : address.substr(0, colon);
  const std::string port = colon == std::string::npos ? "" : address.substr(colon + 1);
  int value = -1;
  const bool bracketed = !host.empty() && host.front() == '[';
  if (host.empty() || port.empty() || !absl::SimpleAtoi(port, &value) ||
      value < 0 || value > 65535 ||
      (bracketed && host.back() != ']') ||
      (!bracketed && host.find(':') != std::string::npos)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--", flag, ": '", address,
        "' is not HOST:PORT with PORT in [0, 65535] (IPv6: [::1]:PORT)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateOptions(const VdmServer::Options& o) {
  constexpr int64_t kBig = int64_t{1} << 40;
  VDM_RETURN_IF_ERROR(CheckAddress("address", o.address));
  if (!o.metrics_address.empty()) {
    VDM_RETURN_IF_ERROR(CheckAddress("metrics_address", o.metrics_address));
  }
  if (o.devices.empty()) {
    return absl::InvalidArgumentError("--devices: at least one device is needed");
  }
  const bool automatic = o.devices == std::vector<std::string>{"auto"};
  for (const std::string& device : o.devices) {
    if (device == "auto" && !automatic) {
      return absl::InvalidArgumentError(
          "--devices: auto stands alone (it picks the CPU replicas itself)");
    }
    VDM_RETURN_IF_ERROR(
        ResolvePrecision(o.precision, automatic ? "cpu" : device).status());
  }
  VDM_RETURN_IF_ERROR(InRange("threads", o.threads, 0, 1024));
  VDM_RETURN_IF_ERROR(InRange("lone_threads", o.lone_threads, -1, 1024));
  if (o.score_precision != "fp32" && o.score_precision != "same") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--score_precision: \"", o.score_precision, "\" is not fp32 or same"));
  }
  VDM_RETURN_IF_ERROR(InRange("max_batch", o.engine.max_batch, 1, 1 << 16));
  VDM_RETURN_IF_ERROR(
      InRange("max_queued_rows", o.engine.max_queued_rows, 1, kBig));
  VDM_RETURN_IF_ERROR(InRange("max_images_per_request",
                              o.limits.max_images_per_request, 1, 1 << 16));
  VDM_RETURN_IF_ERROR(InRange("max_steps", o.limits.max_steps, 1, 1 << 20));
  VDM_RETURN_IF_ERROR(
      InRange("max_timesteps", o.limits.max_timesteps, 2, 1 << 16));
  VDM_RETURN_IF_ERROR(InRange("max_message_mb", o.max_message_mb, 1, 2047));
  VDM_RETURN_IF_ERROR(InRange("repository_poll_seconds",
                              o.repository_poll_seconds, 0, 86400));
  VDM_RETURN_IF_ERROR(
      InRange("max_loaded_models", o.max_loaded_models, 1, 1024));
  if (!o.default_model.empty() && !IsModelName(o.default_model)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--default_model: '", o.default_model,
        "' is not a model name (1-64 of [A-Za-z0-9_.-])"));
  }
  if (!o.model_repository.empty()) {
    std::error_code error;
    if (!std::filesystem::is_directory(o.model_repository, error)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--model_repository: '", o.model_repository,
          "' is not a directory (DIR/NAME/VERSION/model.pt)"));
    }
    if (!o.calibration_path.empty() || !o.background_model_path.empty() ||
        !o.feature_model_path.empty()) {
      return absl::InvalidArgumentError(
          "--calibration, --background_model and --feature_model are for "
          "--model; in a repository each version keeps its own beside its "
          "model.pt (model.pt.calibration.json, background.pt, "
          "model.pt.features.pt)");
    }
  } else if (!o.default_model.empty()) {
    return absl::InvalidArgumentError(
        "--default_model needs --model_repository");
  }
  return absl::OkStatus();
}

absl::StatusOr<VdmServer::Options> ResolveLayout(VdmServer::Options options,
                                                 int cpus) {
  VDM_RETURN_IF_ERROR(ValidateOptions(options));
  cpus = std::max(1, cpus);
  if (options.devices == std::vector<std::string>{"auto"}) {
    options.devices.assign(std::min(cpus, kMaxAutoCpuReplicas), "cpu");
  }
  if (options.threads == 0) {
    const int cpu_replicas = static_cast<int>(
        std::count(options.devices.begin(), options.devices.end(), "cpu"));
    options.threads = cpu_replicas > 0 ? std::max(1, cpus / cpu_replicas) : cpus;
  }
  if (options.lone_threads < 0) {
    const bool all_cpu =
        std::all_of(options.devices.begin(), options.devices.end(),
                    [](const std::string& d) { return d == "cpu"; });
    options.lone_threads = !options.lone_split && all_cpu &&
                                   options.devices.size() > 1 &&
                                   options.threads < cpus
                               ? cpus
                               : 0;
  }
  return options;
}

absl::StatusOr<std::shared_ptr<ServedModel>> VdmServer::LoadVersion(
    const VersionFiles& files, const Options& options) {
  std::vector<std::unique_ptr<Denoiser>> replicas;
  auto served = std::make_shared<ServedModel>();
  ModelDescription& description = served->description;
  int64_t bytes_per_replica = 0;
  // --precision=auto is measured on the first replica of each device and
  // its choice reused for the others there.
  std::map<std::string, Precision> measured;
  for (const std::string& device : options.devices) {
    TorchScriptModel::Options load;
    load.path = files.model_path;
    load.device = device;
    load.precision = options.precision;
    load.timing_rows = std::min(options.engine.max_batch, 32);
    load.fuse_norm_silu = options.fuse_norm_silu;
    if (auto it = measured.find(device); it != measured.end()) {
      load.precision = PrecisionName(it->second);
    }
    VDM_ASSIGN_OR_RETURN(std::unique_ptr<TorchScriptModel> model,
                         TorchScriptModel::Load(load));
    if (const auto& trial = model->precision_trial()) {
      measured[device] = trial->chosen;
      LOG(INFO) << "vdm-server: " << files.name << " version "
                << files.version << ": --precision=auto on " << device << ": "
                << trial->reason;
    }
    if (replicas.empty()) {
      if (options.fuse_norm_silu) {
        LOG(INFO) << "vdm-server: " << files.name << " version "
                  << files.version << ": fused " << model->fused_norm_silu()
                  << " group-norm + SiLU pairs";
      }
      VDM_ASSIGN_OR_RETURN(description, Describe(*model, device));
      description.precision = PrecisionName(model->precision());
      if (const auto& trial = model->precision_trial()) {
        description.precision_choice = trial->reason;
        description.fp32_rows_per_second = trial->fp32_rows_per_second;
        description.bf16_rows_per_second = trial->bf16_rows_per_second;
      }
      description.score_precision = options.score_precision == "fp32"
                                        ? std::string("fp32")
                                        : description.precision;
      description.replicas = static_cast<int>(options.devices.size());
      description.threads_per_replica = options.threads;
      for (const at::Tensor& p : model->module().parameters()) {
        description.parameters += p.numel();
        bytes_per_replica += p.numel() * static_cast<int64_t>(p.element_size());
      }
      for (const at::Tensor& b : model->module().buffers()) {
        bytes_per_replica += b.numel() * static_cast<int64_t>(b.element_size());
      }
    }
    replicas.push_back(std::move(model));
  }
  served->memory_bytes =
      bytes_per_replica * static_cast<int64_t>(replicas.size());
  std::vector<std::unique_ptr<Denoiser>> background;
  // Errors name the flag when the files came from flags.
  const std::string background_name = options.model_repository.empty()
                                          ? "--background_model"
                                          : "background model";
  if (!files.background_path.empty()) {
    for (size_t i = 0; i < options.devices.size(); ++i) {
      TorchScriptModel::Options load;
      load.path = files.background_path;
      load.device = options.devices[i];
      // Its rows are score rows: fp32 unless --score_precision=same, then
      // in the precision its replica resolved to.
      load.precision = PrecisionName(replicas[i]->precision());
      load.fuse_norm_silu = options.fuse_norm_silu;
      absl::StatusOr<std::unique_ptr<TorchScriptModel>> model =
          TorchScriptModel::Load(load);
      if (!model.ok()) {
        return absl::Status(model.status().code(),
                            absl::StrCat(background_name, ": ",
                                         model.status().message()));
      }
      const absl::Status fits = CheckBackgroundModel(*replicas[i], **model);
      if (!fits.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(background_name, " ", files.background_path,
                         " does not fit the model ", files.model_path, ": ",
                         fits.message()));
      }
      for (const at::Tensor& p : (*model)->module().parameters()) {
        served->memory_bytes += p.numel() * static_cast<int64_t>(p.element_size());
      }
      background.push_back(*std::move(model));
    }
    description.background_path = files.background_path;
    LOG(INFO) << "vdm-server: " << files.name << " version " << files.version
              << ": background model " << files.background_path
              << " (likelihood ratio)";
  }
  VDM_ASSIGN_OR_RETURN(const CalibrationFile calibration,
                       LoadCalibration(files.calibration_path,
                                       files.model_path));
  description.calibration = calibration.anomaly;
  description.time_proposal = calibration.time_proposal;
  VDM_ASSIGN_OR_RETURN(std::shared_ptr<const FeatureModel> features,
                       LoadFeatureModel(files.feature_model_path,
                                        files.model_path, description.shape));
  if (features != nullptr && calibration.thorough != nullptr &&
      features->dimension() != calibration.thorough->dimension()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "feature model ", features->path(), " gives ", features->dimension(),
        " features, but the calibration's anomaly.thorough section was fitted "
        "to ", calibration.thorough->dimension(), " (recalibrate with it)"));
  }
  if (features != nullptr && calibration.thorough != nullptr &&
      !features->has_local_features()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "feature model ", features->path(), " has no local_features(f), which "
        "the calibration's anomaly.thorough section needs (its local group; "
        "re-export it with model/net/classifier.py --reexport)"));
  }
  if (calibration.thorough != nullptr &&
      (calibration.thorough->reference()->channels() != description.shape.channels ||
       calibration.thorough->reference()->height() != description.shape.height ||
       calibration.thorough->reference()->width() != description.shape.width)) {
    return absl::InvalidArgumentError(
        "the calibration's anomaly.thorough reference images are not of the "
        "model's image shape (recalibrate)");
  }
  // Kept apart, so that a request for the level is told which is missing.
  description.feature_model = features;
  description.thorough = calibration.thorough;
  if (features != nullptr) description.feature_model_path = features->path();
  if (features != nullptr && calibration.thorough != nullptr) {
    LOG(INFO) << "vdm-server: " << files.name << " version " << files.version
              << ": thorough anomaly level (feature model " << features->path()
              << ", " << calibration.thorough->size() << " calibration images, "
              << calibration.thorough->setup().evaluations_per_image()
              << " evaluations per image)";
  } else if (features != nullptr || calibration.thorough != nullptr) {
    LOG(WARNING) << "vdm-server: " << files.name << " version "
                 << files.version << ": no thorough anomaly level: "
                 << (features == nullptr
                         ? "the calibration has anomaly.thorough but there is "
                           "no feature model"
                         : "there is a feature model but the calibration has "
                           "no anomaly.thorough section");
  }
  VDM_ASSIGN_OR_RETURN(served->engine_model,
                       EngineModel::Create(std::move(replicas),
                                           std::move(background)));
  return served;
}

absl::StatusOr<std::unique_ptr<VdmServer>> VdmServer::Create(
    const Options& requested) {
  const CpuCount cpus = AvailableCpus();
  VDM_ASSIGN_OR_RETURN(const Options options,
                       ResolveLayout(requested, cpus.cpus));
  LOG(INFO) << "vdm-server: " << options.devices.size() << " replica"
            << (options.devices.size() == 1 ? "" : "s") << " ("
            << absl::StrJoin(options.devices, ",") << "), " << options.threads
            << " intra-op thread" << (options.threads == 1 ? "" : "s")
            << " each"
            << (options.lone_split && options.devices.size() > 1
                    ? ", a replica alone busy splits its passes across all"
                : options.lone_threads > options.threads
                    ? absl::StrCat(", ", options.lone_threads,
                                   " when one replica alone is busy")
                    : "")
            << "; " << cpus.Describe();
  SetTorchThreads(options.threads);
  std::unique_ptr<VdmServer> server(new VdmServer());
  server->metrics_ = std::make_unique<Metrics>();
  if (!options.metrics_address.empty()) {
    VDM_RETURN_IF_ERROR(server->metrics_->Expose(options.metrics_address));
  }
  Engine::Options engine_options = options.engine;
  engine_options.score_fp32 = options.score_precision == "fp32";
  engine_options.threads = options.threads;
  engine_options.lone_threads = options.lone_threads;
  engine_options.lone_split = options.lone_split;
  server->observers_ = std::make_unique<ObserverPair>(server->metrics_.get(),
                                                      options.observer);
  engine_options.observer = server->observers_.get();
  VDM_ASSIGN_OR_RETURN(
      server->engine_,
      Engine::Create(engine_options, static_cast<int>(options.devices.size())));

  ModelRepository::Options repository;
  repository.root = options.model_repository;
  repository.default_model = options.default_model;
  repository.max_loaded_models = options.max_loaded_models;
  if (repository.root.empty()) {
    repository.single.name =
        std::filesystem::path(options.model_path).stem().string();
    if (!IsModelName(repository.single.name)) repository.single.name = "model";
    repository.single.version = 1;
    repository.single.model_path = options.model_path;
    repository.single.calibration_path = options.calibration_path;
    repository.single.background_path = options.background_model_path;
    repository.single.feature_model_path = options.feature_model_path;
  }
  VdmServer* raw = server.get();
  Metrics* metrics = server->metrics_.get();
  server->repository_ = std::make_unique<ModelRepository>(
      repository,
      [raw, options](const VersionFiles& files) {
        return raw->LoadVersion(files, options);
      },
      [raw](const ServedModel& model) { return raw->WarmUp(model); },
      [metrics](const std::vector<VersionStatus>& list) {
        std::vector<Metrics::ModelVersion> versions;
        for (const VersionStatus& v : list) {
          versions.push_back({v.name, v.version, VersionStateName(v.state),
                              v.memory_bytes});
        }
        metrics->SetModelVersions(versions);
      });
  // Every model must load at start-up (as Triton's --exit-on-error): a
  // server that starts without one would answer its callers NOT_FOUND.
  if (absl::Status loaded = server->repository_->Sync(); !loaded.ok()) {
    return loaded;
  }
  VDM_ASSIGN_OR_RETURN(
      std::shared_ptr<const ServedModel> first,
      server->repository_->Resolve(server->repository_->default_model(),
                                   std::nullopt));
  server->metrics_->SetBuildInfo(
      kVersion,
      repository.root.empty() ? options.model_path : repository.root,
      first->description.prediction, first->description.parameters,
      first->description.precision);
  server->metrics_->SetPrecisionRates(first->description.fp32_rows_per_second,
                                      first->description.bf16_rows_per_second);
  VdmServiceImpl::Options limits = options.limits;
  limits.max_request_rows = options.engine.max_queued_rows;
  VDM_ASSIGN_OR_RETURN(limits.auth_token, ReadToken(options.auth_token_file));
  server->service_ = std::make_unique<VdmServiceImpl>(
      limits, server->repository_.get(), server->engine_.get(),
      server->metrics_.get());
  VDM_RETURN_IF_ERROR(server->Listen(options));
  server->SetServing(true);
  if (!repository.root.empty()) {
    const int seconds = options.repository_poll_seconds;
    server->poller_ = std::thread([raw, seconds] { raw->PollRepository(seconds); });
  }
  return server;
}

void VdmServer::Reload() {
  absl::MutexLock lock(&poll_mu_);
  reload_requested_ = true;
}

void VdmServer::PollRepository(int seconds) {
  while (true) {
    {
      absl::MutexLock lock(&poll_mu_);
      auto woken = [this]() ABSL_SHARED_LOCKS_REQUIRED(poll_mu_) {
        return reload_requested_ || stop_polling_;
      };
      if (seconds > 0) {
        poll_mu_.AwaitWithTimeout(absl::Condition(&woken),
                                  absl::Seconds(seconds));
      } else {
        poll_mu_.Await(absl::Condition(&woken));
      }
      if (stop_polling_) return;
      reload_requested_ = false;
    }
    // Failures are logged, listed and counted by the repository; the
    // versions served keep serving.
    (void)repository_->Sync();
  }
}

absl::Status VdmServer::Listen(const Options& options) {
  VDM_ASSIGN_OR_RETURN(auto credentials, Credentials(options));
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.address, credentials, &port_);
  builder.SetMaxReceiveMessageSize(options.max_message_mb << 20);
  builder.SetMaxSendMessageSize(options.max_message_mb << 20);
  builder.RegisterService(service_.get());
  server_ = builder.BuildAndStart();
  if (!server_ || port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.address));
  }
  return absl::OkStatus();
}

VdmServer::~VdmServer() { Shutdown(absl::ZeroDuration()); }

// One small request per replica through the whole engine, so the first real
// caller does not pay for lazy initialisation. Submitted together, they go
// to different workers (each goes to the least loaded one; under load, a
// worker may get none).
absl::Status VdmServer::WarmUp(const ServedModel& model) {
  const int replicas = engine_->workers();
  std::vector<std::promise<absl::Status>> done(replicas);
  for (int i = 0; i < replicas; ++i) {
    SampleJob job;
    job.num_images = 1;
    job.sampler.steps = 2;
    VDM_RETURN_IF_ERROR(engine_->Submit(
        MakeSampleTask(job, model.description.num_classes,
                       [&done, i](absl::StatusOr<SampleResult> r) {
                         done[i].set_value(r.status());
                       }),
        RequestControl{}, model.engine_model));
  }
  for (auto& d : done) {
    const absl::Status status = d.get_future().get();
    if (!status.ok()) {
      return absl::Status(status.code(),
                          absl::StrCat("warm-up failed: ", status.message()));
    }
  }
  return absl::OkStatus();
}

void VdmServer::SetServing(bool serving) {
  if (metrics_) metrics_->SetReady(serving);
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus(serving);  // all services, "" included
  health->SetServingStatus(kServiceName, serving);
}

void VdmServer::StartDraining() {
  if (draining_.exchange(true)) return;
  if (server_) SetServing(false);
  if (service_) service_->StartDraining();
}

void VdmServer::Shutdown(absl::Duration grace) {
  if (shut_down_.exchange(true)) return;
  StartDraining();
  if (engine_) {
    // Wait for the in-flight calls until the grace period ends, checking
    // every 50 ms whether HurryShutdown cut it short.
    const absl::Time deadline = absl::Now() + grace;
    while (!hurry_ && absl::Now() < deadline) {
      if (engine_->WaitIdle(std::min(deadline, absl::Now() + absl::Milliseconds(50)))) {
        break;
      }
    }
    engine_->Stop();  // what is left fails with UNAVAILABLE
  }
  {
    absl::MutexLock lock(&poll_mu_);
    stop_polling_ = true;
  }
  if (poller_.joinable()) poller_.join();  // a load in progress fails now
  // Every call has finished by now; a short deadline covers stragglers.
  if (server_) server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(1)));
}

void VdmServer::Wait() {
  if (server_) server_->Wait();
}

}  // namespace vdm
