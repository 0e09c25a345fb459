"""vdm_client: a Python client for vdm-serve (Variational Diffusion Models).

    import vdm_client
    client = vdm_client.Client("localhost:50051")
    images = client.sample(num_images=4, steps=10, seed=1)  # 4 numpy uint8 arrays
    images.seed                                             # the seed used
    rows = client.score(images, seed=1)                     # one dict per image
    rows[0]["bpd"]
    ode = client.score(images, method="ode")  # the ODE's bpd
    ode[0]["ode_function_evaluations"]          # what its adaptive solve used
    latents = client.encode(images, steps=50)               # float32 (C, H, W) each
    client.decode(latents, steps=50)                        # the images back

Built by CMake into <build>/python (PYTHONPATH=build/python /usr/bin/python3);
command line: python3 -m vdm_client --help.
"""

from vdm_client.client import (
    CSV_FIELDS,
    LLR_FIELDS,
    ODE_FIELDS,
    SAMPLERS,
    SCORE_METHODS,
    THOROUGH_FIELDS,
    TIME_GRIDS,
    Client,
    EncodeResult,
    Progress,
    SampleResult,
    ScoreResult,
    VdmError,
    make_grid,
    scores_to_csv,
    slerp,
    write_csv,
)

__all__ = [
    "CSV_FIELDS", "Client", "EncodeResult", "LLR_FIELDS", "ODE_FIELDS",
    "Progress", "SAMPLERS", "SCORE_METHODS", "SampleResult", "ScoreResult",
    "THOROUGH_FIELDS", "TIME_GRIDS", "VdmError", "make_grid", "scores_to_csv",
    "slerp",
    "write_csv",
]
