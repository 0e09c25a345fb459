// vdm-client: a command-line client for vdm-serve (sample, score, info,
// health). Exit status: 0 success, 1 failure (RPC or file error, or a server
// that is not SERVING), 2 bad usage.
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "model/vdm/sampler_config.h"

namespace {
// Columns of the library's sampler table, for the help texts below.
bool IsMultistep(const vdm::SamplerTraits& t) { return t.multistep; }
bool TakesEta(const vdm::SamplerTraits& t) { return t.takes_eta; }
}  // namespace

ABSL_FLAG(std::string, target, "localhost:50051", "Server address HOST:PORT.");
ABSL_FLAG(double, timeout_s, 600.0, "Deadline of each RPC, in seconds.");
ABSL_FLAG(std::string, token, "",
          "Bearer token sent as 'authorization' metadata (if the server "
          "requires one).");
ABSL_FLAG(std::string, lb_policy, "pick_first",
          "pick_first (one connection) or round_robin (spread calls over "
          "every address the target resolves to, e.g. "
          "dns:///vdm-headless.NS.svc.cluster.local:50051 or "
          "ipv4:127.0.0.1:5001,127.0.0.1:5002).");
ABSL_FLAG(int, max_attempts, 3,
          "Attempts per RPC (1..5): a call that fails with UNAVAILABLE before "
          "any response is retried with backoff, on another replica under "
          "round_robin. 1 = no retries.");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA to verify the server with: talk TLS (empty = plaintext).");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM client certificate for mTLS (with --tls_key and --tls_ca).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert.");
ABSL_FLAG(std::string, tls_server_name, "",
          "name to check the server's certificate against (default: the "
          "target's host).");
// sample
ABSL_FLAG(std::string, model, "",
          "The model every request runs on (a server with "
          "--model_repository); empty = the server's default.");
ABSL_FLAG(std::optional<int64_t>, model_version, std::nullopt,
          "The version of --model; unset = the one the server serves.");
ABSL_FLAG(int, num, 16, "sample: number of images.");
ABSL_FLAG(std::string, sampler, "ddim",
          absl::StrCat("sample: the sampler: ", vdm::SamplerNameList(", "),
                       "."));
ABSL_FLAG(std::string, time_grid, "uniform_t",
          "sample: the time grid (the names are listed in the usage).");
ABSL_FLAG(int, steps, 50, "sample: number of sampling steps.");
ABSL_FLAG(double, eta, 0.0,
          absl::StrCat("sample: eta in [0, 1] of ",
                       vdm::SamplerNameList(", ", TakesEta),
                       " (0 = deterministic)."));
ABSL_FLAG(std::optional<double>, guidance, std::nullopt,
          "sample: classifier-free guidance scale, needs --label (0 = "
          "unconditional, 1 = plain conditional, the default).");
ABSL_FLAG(int, label, -1,
          "sample/score: class label; -1 = none (unconditional).");
ABSL_FLAG(std::optional<uint64_t>, seed, std::nullopt,
          "sample/score: random seed; unset = chosen by the server.");
ABSL_FLAG(int, negative_label, -1,
          "sample/edit/inpaint: negative-label guidance away from this class "
          "(needs --guidance other than 1); -1 = none.");
ABSL_FLAG(std::string, image, "", "edit/inpaint: the PNG image to edit.");
ABSL_FLAG(std::optional<double>, strength, std::nullopt,
          "edit: image-to-image strength in (0, 1]: the noise variance "
          "fraction sigma^2 the image is taken to before sampling back "
          "(small keeps it, 1 = from pure noise; equal steps change the "
          "image about evenly); default 0.5 unless --strength_t is given.");
ABSL_FLAG(std::optional<double>, strength_t, std::nullopt,
          "edit: the start as the time t in (0, 1] instead (the old meaning "
          "of --strength: this model's t below about 0.5 adds almost no "
          "noise); not with --strength.");
ABSL_FLAG(std::string, mask, "",
          "inpaint: gray PNG of the image's size, white = known pixels.");
ABSL_FLAG(int, resample_rounds, 0,
          absl::StrCat("inpaint: RePaint resampling rounds per step (0..10; "
                       "each costs the step's evaluations again; not with ",
                       vdm::SamplerNameList(", ", IsMultistep),
                       ")."));
ABSL_FLAG(std::string, image2, "",
          "interpolate: the second PNG image (--image is the first).");
ABSL_FLAG(std::string, latent, "",
          "decode: the .npy latents to decode (from encode).");
ABSL_FLAG(std::string, preview_dir, "",
          "sample/edit/inpaint: write the x_hat previews streamed while "
          "sampling as DIR/step_SSSS_NNN.png (every --preview_every steps).");
ABSL_FLAG(int, preview_every, 10, "sample: steps between previews.");
ABSL_FLAG(std::string, out, "samples.png", "sample: PNG grid of all images.");
ABSL_FLAG(std::string, out_dir, "",
          "sample: also write each image as DIR/sample_NNN.png.");
ABSL_FLAG(int, repeat, 1,
          "sample: send the request N times, one after another on one "
          "channel, print one line per request and write the files of the "
          "last one; exit 1 if any failed.");
// score
ABSL_FLAG(int, timesteps, 16, "score: K diffusion times per image.");
ABSL_FLAG(std::string, csv, "",
          "score: write per-image scores to this CSV (else print a table).");
ABSL_FLAG(std::string, idx, "", "score: IDX images file (gzip or plain).");
ABSL_FLAG(int64_t, limit, 0, "score: only the first N images of --idx.");
ABSL_FLAG(int, chunk, 100, "score: images per RPC.");
ABSL_FLAG(std::optional<double>, false_positive_rate, std::nullopt,
          "score: flag images (is_anomaly) at this false-positive rate, in "
          "(0, 0.5]; unset = the server's default, 0.01 (calibrated models).");
ABSL_FLAG(std::string, map_dir, "",
          "score: write each image's per-pixel anomaly heat map as "
          "DIR/map_NNNNN.png.");
ABSL_FLAG(bool, shared_noise, false,
          "score: same times and noise for every image (to rank images).");
ABSL_FLAG(std::string, method, "elbo",
          "score: elbo (the variational bound, default) or ode (the exact "
          "likelihood of the dequantized image by the probability-flow ODE).");
ABSL_FLAG(int, ode_steps, 0,
          "score --method=ode: 0 = the adaptive solver (the default); N = "
          "RK4 with N steps (4 N network evaluations).");
ABSL_FLAG(int, trace_samples, 0,
          "score --method=ode: independent solves per image; 2+ give a "
          "standard error. 0 = 1.");
ABSL_FLAG(double, ode_rtol, 0,
          "score --method=ode: the adaptive solver's relative tolerance; 0 = "
          "the server's default.");
ABSL_FLAG(double, ode_atol, 0,
          "score --method=ode: the adaptive solver's absolute tolerance; 0 = "
          "the server's default.");
ABSL_FLAG(int, ode_max_evaluations, 0,
          "score --method=ode: the adaptive solver's evaluations per solve at "
          "most; 0 = the server's default.");
ABSL_FLAG(std::string, time_sampling, "",
          "score (ELBO): uniform = uniform diffusion times even when the "
          "server has a time proposal; proposal = insist on it; empty = the "
          "server's proposal when it has one (info: time_proposal).");
ABSL_FLAG(std::string, anomaly_level, "",
          "score (ELBO): fast (the default) or thorough (reconstructions and "
          "the model's feature network; info: thorough_available and its "
          "evaluations per image).");
ABSL_FLAG(std::string, dequantization, "",
          "score --method=ode: gaussian (the VDM's own q(z_0 | x), the "
          "default) or uniform.");

namespace {

using vdm::client::VdmClient;

constexpr int kOk = 0;
constexpr int kFailed = 1;
constexpr int kUsage = 2;

constexpr char kUsageText[] = R"(a command-line client for vdm-serve.

Usage:
  vdm-client [--target=HOST:PORT] sample [--num=N] [--sampler=SAMPLERS]
      [--time_grid=GRIDS] [--steps=S] [--eta=E]
      [--guidance=G] [--label=L] [--seed=S]
      [--out=grid.png] [--out_dir=DIR] [--repeat=N]
  vdm-client [--target=HOST:PORT] sample ... --negative_label=L --guidance=G
  vdm-client [--target=HOST:PORT] edit --image=X.png [--strength=0.5 | --strength_t=T]
      [--label=L --guidance=G] [--num=N] [--out=grid.png] [--out_dir=DIR]
  vdm-client [--target=HOST:PORT] inpaint --image=X.png --mask=M.png (white = known)
      [--label=L --guidance=G] [--num=N] [--out=grid.png] [--out_dir=DIR]
  vdm-client [--target=HOST:PORT] inpaint ... --resample_rounds=R (RePaint)
  vdm-client [--target=HOST:PORT] encode --image=X.png [--steps=S]
      [--time_grid=GRIDS] [--label=L] [--out=latent.npy]   (S evaluations)
  vdm-client [--target=HOST:PORT] decode --latent=latent.npy [--steps=S]
      [--time_grid=GRIDS] [--label=L] [--out=x.png]   (S per latent)
  vdm-client [--target=HOST:PORT] interpolate --image=A.png --image2=B.png
      [--num=8] [--steps=S] [--out=grid.png]   (2 S + num S evaluations)
      (encode/decode/interpolate: DDIM with eta 0; decode with the steps,
      grid and label the latents were encoded with)
  vdm-client [--target=HOST:PORT] score [--timesteps=K] [--seed=S] [--label=L]
      [--shared_noise] [--chunk=N] [--csv=OUT.csv] [--false_positive_rate=F]
      [--time_sampling=uniform|proposal] [--anomaly_level=fast|thorough]
      [--method=elbo|ode [--ode_steps=N | --ode_rtol=R --ode_atol=A
                         --ode_max_evaluations=E] [--trace_samples=M]
                         [--dequantization=gaussian|uniform]]
      [--map_dir=DIR] (--idx=FILE [--limit=N] | FILE.png ...)
  vdm-client [--target=HOST:PORT] [--model=NAME [--model_version=V]] info
  vdm-client [--target=HOST:PORT] models   (the repository: name, version,
      state, memory, default, error)
  vdm-client [--target=HOST:PORT] health     (exit 0 only when SERVING)

Every command takes --model (and --model_version): the model it runs on, on
a server with a model repository (empty = the server's default model);
--timeout_s (deadline of each RPC), --token,
--tls_ca [--tls_cert --tls_key] [--tls_server_name] (TLS, mTLS),
--lb_policy=pick_first|round_robin and --max_attempts=N (retries on
UNAVAILABLE; default 3). To balance over several replicas, give a target that
resolves to all of them with --lb_policy=round_robin, e.g.
  --target=dns:///vdm-headless.NAMESPACE.svc.cluster.local:50051
  --target=ipv4:127.0.0.1:5001,127.0.0.1:5002,127.0.0.1:5003
Run with --helpfull for every flag.)";

// kUsageText with the sampler and grid names of the library's table.
std::string UsageText() {
  return absl::StrReplaceAll(kUsageText,
                             {{"SAMPLERS", vdm::SamplerNameList("|")},
                              {"GRIDS", vdm::TimeGridNameList("|")}});
}

int Usage(const std::string& problem) {
  std::cerr << "vdm-client: " << problem << "\n\nvdm-client: " << UsageText()
            << "\n";
  return kUsage;
}

int Fail(const absl::Status& status) {
  std::cerr << "vdm-client: " << status << "\n";
  return kFailed;
}

std::optional<int> LabelFlag() {
  const int label = absl::GetFlag(FLAGS_label);
  if (label < 0) return std::nullopt;
  return label;
}

// --repeat: `repeat` Sample calls in sequence, one line each; writes the
// files of the last successful one. Fails if any call failed.
absl::StatusOr<vdm::client::SampleResult> SampleRepeatedly(
    const VdmClient& client, const vdm::client::SampleParams& params,
    int repeat, const std::string& out, const std::string& out_dir) {
  std::optional<vdm::client::SampleResult> last;
  absl::Status first_error;
  int succeeded = 0;
  for (int i = 1; i <= repeat; ++i) {
    absl::StatusOr<vdm::client::SampleResult> result = client.Sample(params);
    if (result.ok()) {
      ++succeeded;
      std::cout << absl::StrFormat("request %d/%d: OK peer=%s seed=%d %.3f s\n",
                                   i, repeat, result->peer, result->seed,
                                   result->wall_seconds)
                << std::flush;
      last = *std::move(result);
    } else {
      std::cout << absl::StrFormat("request %d/%d: %s\n", i, repeat,
                                   result.status().ToString())
                << std::flush;
      if (first_error.ok()) first_error = result.status();
    }
  }
  std::cout << absl::StrFormat("repeat: %d/%d requests succeeded\n", succeeded,
                               repeat);
  if (!first_error.ok()) return first_error;
  absl::Status written = vdm::client::WriteSampleFiles(*last, out, out_dir);
  if (!written.ok()) return written;
  return *std::move(last);
}

// One request through SampleStream, showing progress on stderr: a bar
// redrawn in place on a terminal, a line every 10% otherwise; previews go to
// --preview_dir.
absl::StatusOr<vdm::client::SampleResult> SampleWithProgress(
    const VdmClient& client, const vdm::client::SampleParams& params,
    const std::string& out, const std::string& out_dir) {
  const bool tty = isatty(STDERR_FILENO) != 0;
  const std::string preview_dir = absl::GetFlag(FLAGS_preview_dir);
  const int every = preview_dir.empty() ? 0 : absl::GetFlag(FLAGS_preview_every);
  if (!preview_dir.empty()) {
    std::error_code ignored;
    std::filesystem::create_directories(preview_dir, ignored);
  }
  const absl::Time start = absl::Now();
  int last_decile = -1;
  absl::Status preview_error;
  auto progress = [&](int step, int total,
                      const std::vector<vdm::Image8>& previews) {
    const double elapsed = absl::ToDoubleSeconds(absl::Now() - start);
    const double rate = elapsed > 0 ? step / elapsed : 0;
    const double eta = rate > 0 ? (total - step) / rate : 0;
    if (tty) {
      const int width = 30, filled = total > 0 ? width * step / total : 0;
      std::cerr << absl::StrFormat(
          "\rsample: [%s%s] %d/%d steps, %.1f steps/s, ETA %.0f s ",
          std::string(filled, '#'), std::string(width - filled, '.'), step,
          total, rate, eta);
      if (step == total) std::cerr << "\n";
    } else if (total > 0 && 10 * step / total > last_decile) {
      last_decile = 10 * step / total;
      std::cerr << absl::StrFormat(
          "sample: %d/%d steps, %.1f steps/s, ETA %.0f s\n", step, total, rate,
          eta);
    }
    for (size_t i = 0; i < previews.size() && preview_error.ok(); ++i) {
      absl::StatusOr<std::string> png = vdm::EncodePng(previews[i]);
      preview_error = png.ok() ? vdm::WriteFileAtomic(
                                     absl::StrFormat("%s/step_%04d_%03d.png",
                                                     preview_dir, step, i),
                                     *png)
                               : png.status();
    }
  };
  absl::StatusOr<vdm::client::SampleResult> result =
      client.SampleStream(params, every, progress);
  if (!result.ok()) return result;
  if (!preview_error.ok()) return preview_error;
  const absl::Status written =
      vdm::client::WriteSampleFiles(*result, out, out_dir);
  if (!written.ok()) return written;
  return result;
}

// sample, edit (image-to-image) and inpaint share everything but the edit.
int RunSample(const VdmClient& client, const std::string& command) {
  absl::StatusOr<vdm::v1::Sampler> sampler =
      vdm::client::ParseSampler(absl::GetFlag(FLAGS_sampler));
  if (!sampler.ok()) return Usage(std::string(sampler.status().message()));
  if (absl::GetFlag(FLAGS_num) < 1) return Usage("--num must be at least 1");
  vdm::client::SampleParams params;
  params.num_images = absl::GetFlag(FLAGS_num);
  params.sampler = *sampler;
  absl::StatusOr<vdm::v1::TimeGrid> grid =
      vdm::client::ParseTimeGrid(absl::GetFlag(FLAGS_time_grid));
  if (!grid.ok()) return Usage(std::string(grid.status().message()));
  params.time_grid = *grid;
  params.steps = absl::GetFlag(FLAGS_steps);
  params.eta = static_cast<float>(absl::GetFlag(FLAGS_eta));
  if (const std::optional<double> guidance = absl::GetFlag(FLAGS_guidance)) {
    params.guidance_scale = static_cast<float>(*guidance);
  }
  params.label = LabelFlag();
  params.seed = absl::GetFlag(FLAGS_seed);
  if (absl::GetFlag(FLAGS_negative_label) >= 0) {
    params.negative_label = absl::GetFlag(FLAGS_negative_label);
  }
  if (command == "edit" || command == "inpaint") {
    if (absl::GetFlag(FLAGS_image).empty()) return Usage(command + " needs --image");
    absl::StatusOr<std::string> image = vdm::ReadFile(absl::GetFlag(FLAGS_image));
    if (!image.ok()) return Fail(image.status());
    params.init_image_png = *std::move(image);
    if (command == "edit") {
      // Both given: both sent, and the server names strength_t.
      const std::optional<double> strength = absl::GetFlag(FLAGS_strength);
      const std::optional<double> strength_t = absl::GetFlag(FLAGS_strength_t);
      if (strength || !strength_t) {
        params.strength = static_cast<float>(strength.value_or(0.5));
      }
      if (strength_t) params.strength_t = static_cast<float>(*strength_t);
    } else {
      if (absl::GetFlag(FLAGS_mask).empty()) return Usage("inpaint needs --mask");
      absl::StatusOr<std::string> mask = vdm::ReadFile(absl::GetFlag(FLAGS_mask));
      if (!mask.ok()) return Fail(mask.status());
      params.mask_png = *std::move(mask);
      params.resample_rounds = absl::GetFlag(FLAGS_resample_rounds);
    }
  }
  const std::string out = absl::GetFlag(FLAGS_out);
  const std::string out_dir = absl::GetFlag(FLAGS_out_dir);
  const int repeat = absl::GetFlag(FLAGS_repeat);
  if (repeat < 1) return Usage("--repeat must be at least 1");
  absl::StatusOr<vdm::client::SampleResult> result =
      repeat == 1 ? SampleWithProgress(client, params, out, out_dir)
                  : SampleRepeatedly(client, params, repeat, out, out_dir);
  if (!result.ok()) return Fail(result.status());
  std::cout << vdm::client::FormatSampleSummary(*result);
  const int columns = vdm::client::GridColumns(params.num_images);
  if (!out.empty()) {
    std::cout << absl::StrFormat("wrote %s (grid of %d columns)\n", out,
                                 columns);
  }
  if (!out_dir.empty()) {
    std::cout << absl::StrFormat("wrote %d images to %s/sample_NNN.png\n",
                                 result->images.size(), out_dir);
  }
  return kOk;
}

// A PNG file as an image.
absl::StatusOr<vdm::Image8> ReadPng(const std::string& path) {
  absl::StatusOr<std::string> png = vdm::ReadFile(path);
  if (!png.ok()) return png.status();
  absl::StatusOr<vdm::Image8> image = vdm::DecodePng(*png);
  if (!image.ok()) {
    return absl::Status(image.status().code(),
                        absl::StrCat(path, ": ", image.status().message()));
  }
  return image;
}

vdm::client::EncodeParams EncodeParamsFromFlags(vdm::v1::TimeGrid grid) {
  vdm::client::EncodeParams params;
  params.steps = absl::GetFlag(FLAGS_steps);
  params.time_grid = grid;
  params.label = LabelFlag();
  return params;
}

// Decoding: DDIM, eta 0, the flags' steps, grid and label.
vdm::client::SampleParams DecodeParamsFromFlags(
    vdm::v1::TimeGrid grid, std::vector<vdm::client::Latent> latents) {
  vdm::client::SampleParams params;
  params.sampler = vdm::v1::SAMPLER_DDIM;
  params.time_grid = grid;
  params.steps = absl::GetFlag(FLAGS_steps);
  params.label = LabelFlag();
  params.num_images = static_cast<int>(latents.size());
  params.latents = std::move(latents);
  return params;
}

// encode, decode and interpolate.
int RunLatent(const VdmClient& client, const std::string& command) {
  absl::StatusOr<vdm::v1::TimeGrid> grid =
      vdm::client::ParseTimeGrid(absl::GetFlag(FLAGS_time_grid));
  if (!grid.ok()) return Usage(std::string(grid.status().message()));
  std::string out = absl::GetFlag(FLAGS_out);
  if (command == "encode") {
    if (absl::GetFlag(FLAGS_image).empty()) return Usage("encode needs --image");
    if (out == "samples.png") out = "latent.npy";  // --out's default
    absl::StatusOr<vdm::Image8> image = ReadPng(absl::GetFlag(FLAGS_image));
    if (!image.ok()) return Fail(image.status());
    absl::StatusOr<vdm::client::EncodeResult> encoded =
        client.Encode({*image}, EncodeParamsFromFlags(*grid));
    if (!encoded.ok()) return Fail(encoded.status());
    const absl::Status written =
        vdm::client::WriteLatentsNpy(encoded->latents, out);
    if (!written.ok()) return Fail(written);
    std::cout << absl::StrFormat(
        "network_evaluations: %d\ncompute_seconds: %.3f\nwrote %s (float32 "
        ".npy, shape (1, %d, %d, %d))\n",
        encoded->network_evaluations, encoded->compute_seconds, out,
        encoded->latents[0].shape.channels, encoded->latents[0].shape.height,
        encoded->latents[0].shape.width);
    return kOk;
  }
  std::vector<vdm::client::Latent> latents;
  int64_t encode_evaluations = 0;
  if (command == "decode") {
    if (absl::GetFlag(FLAGS_latent).empty()) return Usage("decode needs --latent");
    absl::StatusOr<std::vector<vdm::client::Latent>> read =
        vdm::client::ReadLatentsNpy(absl::GetFlag(FLAGS_latent));
    if (!read.ok()) return Fail(read.status());
    latents = *std::move(read);
  } else {  // interpolate
    if (absl::GetFlag(FLAGS_image).empty() || absl::GetFlag(FLAGS_image2).empty()) {
      return Usage("interpolate needs --image and --image2");
    }
    if (absl::GetFlag(FLAGS_num) < 2) return Usage("interpolate needs --num >= 2");
    absl::StatusOr<vdm::Image8> a = ReadPng(absl::GetFlag(FLAGS_image));
    if (!a.ok()) return Fail(a.status());
    absl::StatusOr<vdm::Image8> b = ReadPng(absl::GetFlag(FLAGS_image2));
    if (!b.ok()) return Fail(b.status());
    absl::StatusOr<vdm::client::EncodeResult> encoded =
        client.Encode({*a, *b}, EncodeParamsFromFlags(*grid));
    if (!encoded.ok()) return Fail(encoded.status());
    encode_evaluations = encoded->network_evaluations;
    absl::StatusOr<std::vector<vdm::client::Latent>> path =
        vdm::client::SlerpPath(encoded->latents[0], encoded->latents[1],
                               absl::GetFlag(FLAGS_num));
    if (!path.ok()) return Fail(path.status());
    latents = *std::move(path);
  }
  const int n = static_cast<int>(latents.size());
  absl::StatusOr<vdm::client::SampleResult> decoded =
      client.Sample(DecodeParamsFromFlags(*grid, std::move(latents)));
  if (!decoded.ok()) return Fail(decoded.status());
  const std::string out_dir = absl::GetFlag(FLAGS_out_dir);
  const absl::Status written = vdm::client::WriteSampleFiles(
      *decoded, out, out_dir, command == "interpolate" ? n : 0);
  if (!written.ok()) return Fail(written);
  if (encode_evaluations > 0) {
    std::cout << "encode network_evaluations: " << encode_evaluations << "\n";
  }
  std::cout << vdm::client::FormatSampleSummary(*decoded);
  if (!out.empty()) std::cout << "wrote " << out << " (" << n << " images)\n";
  return kOk;
}

// The images named on the command line: --idx, or PNG files.
absl::StatusOr<vdm::client::ScoreInput> LoadScoreInput(
    const std::vector<std::string>& files) {
  const std::string idx = absl::GetFlag(FLAGS_idx);
  if (!idx.empty()) {
    return vdm::client::LoadIdxImages(idx, absl::GetFlag(FLAGS_limit));
  }
  return vdm::client::LoadPngFiles(files);
}

// Lowers --chunk to the server's per-request image limit when it is larger
// (saying so when that splits the images into more requests).
absl::StatusOr<int> ChunkSize(const VdmClient& client, int64_t total) {
  const int chunk = absl::GetFlag(FLAGS_chunk);
  absl::StatusOr<vdm::v1::ModelInfo> info = client.GetInfo();
  if (!info.ok()) return info.status();
  const int max_images = info->max_images_per_request();
  if (max_images <= 0 || chunk <= max_images) return chunk;
  if (total > max_images) {
    std::cerr << absl::StrFormat(
        "vdm-client: --chunk=%d is above the server's limit of %d images per "
        "request; using %d\n",
        chunk, max_images, max_images);
  }
  return max_images;
}

int RunScore(const VdmClient& client, const std::vector<std::string>& files) {
  const bool has_idx = !absl::GetFlag(FLAGS_idx).empty();
  if (!has_idx && files.empty()) {
    return Usage("score needs --idx=FILE or PNG files");
  }
  if (has_idx && !files.empty()) {
    return Usage("score takes --idx=FILE or PNG files, not both");
  }
  if (!has_idx && absl::GetFlag(FLAGS_limit) != 0) {
    return Usage("--limit applies to --idx only");
  }
  if (absl::GetFlag(FLAGS_limit) < 0) return Usage("--limit must be >= 0");
  if (absl::GetFlag(FLAGS_chunk) < 1) return Usage("--chunk must be >= 1");
  absl::StatusOr<vdm::client::ScoreInput> input = LoadScoreInput(files);
  if (!input.ok()) return Fail(input.status());
  vdm::client::ScoreParams params;
  params.timesteps = absl::GetFlag(FLAGS_timesteps);
  params.seed = absl::GetFlag(FLAGS_seed);
  params.label = LabelFlag();
  params.shared_noise = absl::GetFlag(FLAGS_shared_noise);
  const std::string method = absl::GetFlag(FLAGS_method);
  if (method == "ode") {
    params.method = vdm::v1::SCORE_METHOD_ODE;
    params.ode_steps = absl::GetFlag(FLAGS_ode_steps);
    params.trace_samples = absl::GetFlag(FLAGS_trace_samples);
    params.ode_rtol = absl::GetFlag(FLAGS_ode_rtol);
    params.ode_atol = absl::GetFlag(FLAGS_ode_atol);
    params.ode_max_evaluations = absl::GetFlag(FLAGS_ode_max_evaluations);
    const std::string deq = absl::GetFlag(FLAGS_dequantization);
    if (deq == "gaussian") {
      params.dequantization = vdm::v1::DEQUANTIZATION_GAUSSIAN;
    } else if (deq == "uniform") {
      params.dequantization = vdm::v1::DEQUANTIZATION_UNIFORM;
    } else if (!deq.empty()) {
      return Usage("--dequantization must be gaussian or uniform");
    }
  } else if (method != "elbo") {
    return Usage("--method must be elbo or ode");
  } else if (absl::GetFlag(FLAGS_ode_steps) != 0 ||
             absl::GetFlag(FLAGS_trace_samples) != 0 ||
             absl::GetFlag(FLAGS_ode_rtol) != 0 ||
             absl::GetFlag(FLAGS_ode_atol) != 0 ||
             absl::GetFlag(FLAGS_ode_max_evaluations) != 0 ||
             !absl::GetFlag(FLAGS_dequantization).empty()) {
    return Usage(
        "--ode_steps, --trace_samples, --ode_rtol, --ode_atol, "
        "--ode_max_evaluations and --dequantization need --method=ode");
  }
  if (const std::string ts = absl::GetFlag(FLAGS_time_sampling); ts == "uniform") {
    params.time_sampling = vdm::v1::TIME_SAMPLING_UNIFORM;
  } else if (ts == "proposal") {
    params.time_sampling = vdm::v1::TIME_SAMPLING_PROPOSAL;
  } else if (!ts.empty()) {
    return Usage("--time_sampling must be uniform or proposal");
  }
  if (const std::string level = absl::GetFlag(FLAGS_anomaly_level);
      level == "thorough") {
    params.anomaly_level = vdm::v1::ANOMALY_LEVEL_THOROUGH;
  } else if (level == "fast") {
    params.anomaly_level = vdm::v1::ANOMALY_LEVEL_FAST;
  } else if (!level.empty()) {
    return Usage("--anomaly_level must be fast or thorough");
  }
  if (const auto fpr = absl::GetFlag(FLAGS_false_positive_rate)) {
    params.false_positive_rate = static_cast<float>(*fpr);
  }
  const std::string map_dir = absl::GetFlag(FLAGS_map_dir);
  params.anomaly_map = !map_dir.empty();
  const int64_t total = static_cast<int64_t>(input->images.size());
  absl::StatusOr<int> chunk = ChunkSize(client, total);
  if (!chunk.ok()) return Fail(chunk.status());
  params.chunk_size = *chunk;

  const absl::Time start = absl::Now();
  vdm::client::ScoreProgress progress;
  if (total > params.chunk_size) {
    progress = [start](int64_t done, int64_t all) {
      std::cerr << absl::StrFormat(
          "score: %d/%d images (%.0f%%), %.1f s\n", done, all,
          100.0 * static_cast<double>(done) / static_cast<double>(all),
          absl::ToDoubleSeconds(absl::Now() - start));
    };
  }
  absl::StatusOr<vdm::client::ScoreResult> result =
      client.ScoreImages(*input, params, progress);
  if (!result.ok()) return Fail(result.status());
  const std::string csv = absl::GetFlag(FLAGS_csv);
  if (csv.empty()) {
    std::cout << vdm::client::FormatScoresTable(result->rows) << "\n";
  } else {
    const absl::Status written = vdm::client::WriteScoresCsv(result->rows, csv);
    if (!written.ok()) return Fail(written);
    std::cout << "wrote " << csv << "\n";
  }
  if (!map_dir.empty()) {
    const absl::Status maps = vdm::client::WriteAnomalyMaps(result->rows, map_dir);
    if (!maps.ok()) return Fail(maps);
    std::cout << "wrote " << result->rows.size() << " anomaly maps to "
              << map_dir << "\n";
  }
  std::cout << vdm::client::FormatScoresSummary(*result);
  return kOk;
}

int RunInfo(const VdmClient& client) {
  absl::StatusOr<vdm::v1::ModelInfo> info = client.GetInfo();
  if (!info.ok()) return Fail(info.status());
  std::cout << vdm::client::FormatModelInfo(*info);
  return kOk;
}

int RunModels(const VdmClient& client) {
  absl::StatusOr<vdm::v1::ListModelsResponse> list = client.ListModels();
  if (!list.ok()) return Fail(list.status());
  std::cout << vdm::client::FormatModelList(*list);
  return kOk;
}

int RunHealth(const VdmClient& client) {
  absl::StatusOr<vdm::client::ServingStatus> status = client.CheckHealth();
  if (!status.ok()) return Fail(status.status());
  std::cout << vdm::client::ServingStatusName(*status) << "\n";
  return *status == grpc::health::v1::HealthCheckResponse::SERVING ? kOk
                                                                   : kFailed;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(UsageText());
  const std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() < 2) return Usage("missing command");
  const std::string command = positional[1];
  const std::vector<std::string> args(positional.begin() + 2, positional.end());
  if (command != "sample" && command != "edit" && command != "inpaint" &&
      command != "encode" && command != "decode" &&
      command != "interpolate" && command != "score" && command != "info" &&
      command != "models" && command != "health") {
    return Usage(absl::StrCat("unknown command \"", command, "\""));
  }
  if (command != "score" && !args.empty()) {
    return Usage(
        absl::StrCat(command, " takes no arguments, got \"", args[0], "\""));
  }
  const double timeout_s = absl::GetFlag(FLAGS_timeout_s);
  if (!(timeout_s > 0)) return Usage("--timeout_s must be positive");

  vdm::client::ClientOptions options;
  options.target = absl::GetFlag(FLAGS_target);
  options.timeout = absl::Seconds(timeout_s);
  options.auth_token = absl::GetFlag(FLAGS_token);
  options.tls_ca_file = absl::GetFlag(FLAGS_tls_ca);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls_server_name = absl::GetFlag(FLAGS_tls_server_name);
  options.lb_policy = absl::GetFlag(FLAGS_lb_policy);
  options.max_attempts = absl::GetFlag(FLAGS_max_attempts);
  options.model = absl::GetFlag(FLAGS_model);
  options.model_version = absl::GetFlag(FLAGS_model_version);
  absl::StatusOr<std::unique_ptr<VdmClient>> client =
      VdmClient::Create(options);
  if (!client.ok()) return Usage(std::string(client.status().message()));

  if (command == "sample" || command == "edit" || command == "inpaint") {
    return RunSample(**client, command);
  }
  if (command == "encode" || command == "decode" || command == "interpolate") {
    return RunLatent(**client, command);
  }
  if (command == "score") return RunScore(**client, args);
  if (command == "info") return RunInfo(**client);
  if (command == "models") return RunModels(**client);
  return RunHealth(**client);
}
