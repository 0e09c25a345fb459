// The engine's tasks (server/task.h) for the service's jobs (server/jobs.h):
// each is a thin adapter over a library plan (model/vdm/rows.h, RowPlan)
// that hands the plan's rows out in chunks and delivers the result through
// the job's callback. Every task owns its random number generator, so its
// result does not depend on what else shares the batch. Torch-free to
// include; the tasks themselves live in tasks.cc.
#ifndef VDM_SERVER_TASKS_H_
#define VDM_SERVER_TASKS_H_

#include <memory>

#include "server/jobs.h"
#include "server/task.h"

namespace vdm {

// Sampling with any sampler, with classifier-free guidance and editing
// (SamplingPlan); `num_classes` is the model's (guidance doubles the rows).
std::unique_ptr<Task> MakeSampleTask(SampleJob job, int num_classes,
                                     SampleCallback done);

// DDIM inversion of images to their latents (EncodePlan); its rows share
// batches with sampling rows.
std::unique_ptr<Task> MakeEncodeTask(EncodeJob job, EncodeCallback done);

// Per-image BPD with K stratified diffusion times (LikelihoodPlan; with a
// background model on the worker also that model's BPD of the same rows),
// or with ScoreMethod::kOde by the probability-flow ODE (OdeLikelihoodPlan,
// rows that need VJPs).
std::unique_ptr<Task> MakeScoreTask(ScoreJob job, ScoreCallback done);

}  // namespace vdm

#endif  // VDM_SERVER_TASKS_H_
