"""python3 -m vdm_client: a small command line over vdm_client.Client.

    python3 -m vdm_client --target=HOST:PORT sample --num=4 --steps=10 --seed=1 --out=grid.png
    python3 -m vdm_client --target=HOST:PORT score a.png b.npy [--csv=scores.csv]
        [--method=elbo|ode [--ode_steps=N | --ode_rtol=R --ode_atol=A
        --ode_max_evaluations=E] [--trace_samples=M]
        [--dequantization=gaussian|uniform]]
    python3 -m vdm_client --target=HOST:PORT encode --image=x.png [--steps=S]
        [--time_grid=G] [--label=L] [--out=latent.npy]   (float32 (n, C, H, W))
    python3 -m vdm_client --target=HOST:PORT decode --latent=latent.npy
        [--steps=S] [--time_grid=G] [--label=L] [--out=x.png] [--out_dir=DIR]
    python3 -m vdm_client --target=HOST:PORT interpolate --image=a.png
        --image2=b.png [--num=8] [--steps=S] [--out=row.png] [--out_dir=DIR]
    python3 -m vdm_client --target=HOST:PORT info
    python3 -m vdm_client --target=HOST:PORT health     (exit 0 only when SERVING)

Exit status: 0 success, 1 failure (an RPC or file error, or not SERVING),
2 bad usage. PNG files need PIL (python3-pil); without it `sample`, `decode`
and `interpolate` write .npy and `score`, `encode` and `interpolate` read
.npy only. encode/decode/interpolate are DDIM with eta 0: decode with the
steps, time grid and label the latents were encoded with.
"""

import argparse
import os
import sys
import time

import numpy as np

from vdm_client.client import (SAMPLERS, SCORE_METHODS, TIME_GRIDS, Client,
                               VdmError, _PILImage, _pil_to_array, make_grid,
                               slerp, write_csv)

OK, FAILED, USAGE = 0, 1, 2


class FileError(Exception):
    """An input file that is missing, unreadable or of the wrong shape: exit
    status 1 (FAILED), as vdm-client's file errors."""


def _seed(text: str) -> int:
    value = int(text, 0)
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2**64), got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    # The installed command (pip install ./client/python) or the module.
    installed = os.path.basename(sys.argv[0]) == "vdm-client-py"
    parser = argparse.ArgumentParser(
        prog="vdm-client-py" if installed else "python3 -m vdm_client",
        description="A command-line client for vdm-serve.")
    parser.add_argument("--target", default="localhost:50051",
                        help="server address HOST:PORT")
    parser.add_argument("--timeout_s", type=float, default=600.0,
                        help="deadline of each RPC, in seconds")
    parser.add_argument("--token", default=None,
                        help="bearer token (authorization metadata)")
    parser.add_argument("--tls_ca", default=None,
                        help="PEM CA of the server: talk TLS")
    parser.add_argument("--tls_cert", default=None,
                        help="PEM client certificate (mTLS, with --tls_key)")
    parser.add_argument("--tls_key", default=None, help="PEM key of --tls_cert")
    parser.add_argument("--tls_server_name", default=None,
                        help="name to check the server's certificate against")
    parser.add_argument("--model", default=None,
                        help="the model every request runs on (a server with "
                        "--model_repository); default: the server's default")
    parser.add_argument("--model_version", type=int, default=None,
                        help="the version of --model; default: the one served")
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample", help="draw images")
    sample.add_argument("--num", type=int, default=16, help="number of images")
    sample.add_argument("--steps", type=int, default=50)
    sample.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    sample.add_argument("--time_grid", default="uniform_t", choices=TIME_GRIDS)
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    sample.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (needs --label)")
    sample.add_argument("--label", type=int, default=None, help="class label")
    sample.add_argument("--seed", type=_seed, default=None)
    sample.add_argument("--out", default="samples.png",
                        help="grid of all images: .png (needs PIL) or .npy "
                        "(all images stacked); empty = none")

    score = commands.add_parser("score", help="bits per dimension of images")
    score.add_argument("files", nargs="+",
                       help=".png (needs PIL) or .npy files: one image of the "
                       "model's shape, or a stack N x shape")
    score.add_argument("--timesteps", type=int, default=16)
    score.add_argument("--seed", type=_seed, default=None)
    score.add_argument("--label", type=int, default=None)
    score.add_argument("--shared_noise", action="store_true")
    score.add_argument("--false_positive_rate", type=float, default=None)
    score.add_argument("--chunk", type=int, default=None,
                       help="images per request (default: the server's limit)")
    score.add_argument("--csv", default=None,
                       help="write the scores as CSV (else print a table)")
    score.add_argument("--time_sampling", default=None,
                       choices=("uniform", "proposal"),
                       help="ELBO times: the model's proposal when it has one "
                       "(default), or uniform")
    score.add_argument("--anomaly_level", default=None,
                       choices=("fast", "thorough"),
                       help="anomaly fields: fast (default) or thorough "
                       "(reconstructions and the feature network; info: "
                       "thorough_available)")
    score.add_argument("--method", default="elbo", choices=SCORE_METHODS,
                       help="elbo (the variational bound) or ode (a bound "
                       "through the probability-flow ODE's density, "
                       "docs/likelihood.md)")
    score.add_argument("--ode_steps", type=int, default=None,
                       help="--method=ode: RK4 with N steps (4 N network "
                       "evaluations); default the adaptive solver")
    score.add_argument("--trace_samples", type=int, default=None,
                       help="--method=ode: independent solves per image; 2+ "
                       "give a standard error. Default 1")
    score.add_argument("--ode_rtol", type=float, default=None,
                       help="--method=ode: the adaptive solver's relative "
                       "tolerance (default the server's)")
    score.add_argument("--ode_atol", type=float, default=None,
                       help="--method=ode: its absolute tolerance")
    score.add_argument("--ode_max_evaluations", type=int, default=None,
                       help="--method=ode: its evaluations per solve at most")
    score.add_argument("--dequantization", default=None,
                       choices=("gaussian", "uniform"),
                       help="--method=ode: gaussian (the VDM's own q(z_0|x), "
                       "the default) or uniform")

    def latent_flags(command, out, out_help):
        command.add_argument("--steps", type=int, default=50)
        command.add_argument("--time_grid", default="uniform_t",
                             choices=TIME_GRIDS)
        command.add_argument("--label", type=int, default=None,
                             help="class label (default: none)")
        command.add_argument("--out", default=out, help=out_help)

    encode = commands.add_parser(
        "encode", help="DDIM inversion: the latents of images (.npy)")
    encode.add_argument("--image", required=True,
                        help=".png (needs PIL) or .npy: one image of the "
                        "model's shape, or a stack N x shape")
    latent_flags(encode, "latent.npy",
                 "the latents as float32 .npy, shape (n, C, H, W)")
    decode = commands.add_parser(
        "decode", help="the images of latents (.npy from encode)")
    decode.add_argument("--latent", required=True,
                        help="float .npy of shape (n, C, H, W) or (C, H, W)")
    latent_flags(decode, "samples.png",
                 "grid of the images: .png (needs PIL) or .npy (stacked); "
                 "empty = none")
    decode.add_argument("--out_dir", default=None,
                        help="also write each image as DIR/sample_NNN.png")
    interpolate = commands.add_parser(
        "interpolate", help="images morphing from --image to --image2")
    interpolate.add_argument("--image", required=True,
                             help="the first image, .png or .npy")
    interpolate.add_argument("--image2", required=True,
                             help="the second image, .png or .npy")
    interpolate.add_argument("--num", type=int, default=8,
                             help="images on the path, >= 2 (the ends are "
                             "the two images' own)")
    latent_flags(interpolate, "samples.png",
                 "one row of the images: .png (needs PIL) or .npy "
                 "(stacked); empty = none")
    interpolate.add_argument("--out_dir", default=None,
                             help="also write each image as "
                             "DIR/sample_NNN.png")

    commands.add_parser("info", help="the served model and the server's limits")
    commands.add_parser("models", help="the model repository: every version "
                        "and its state")
    commands.add_parser("health", help="exit 0 only when SERVING")
    return parser


def _write_samples(images, out: str, columns=None) -> str:
    if out.endswith(".npy"):
        np.save(out, np.stack(images))
        return f"wrote {out} ({len(images)} images stacked)"
    if _PILImage is None:
        path = os.path.splitext(out)[0] + ".npy"
        np.save(path, np.stack(images))
        return f"wrote {path} (no PIL for PNG: python3-pil)"
    _PILImage.fromarray(make_grid(images, columns=columns)).save(out)
    return f"wrote {out}"


def _write_image_files(images, out_dir: str) -> str:
    """Each image as OUT_DIR/sample_NNN.png (.npy without PIL)."""
    os.makedirs(out_dir, exist_ok=True)
    ext = ".png" if _PILImage is not None else ".npy"
    for i, image in enumerate(images):
        path = os.path.join(out_dir, f"sample_{i:03d}{ext}")
        if _PILImage is not None:
            _PILImage.fromarray(image).save(path)
        else:
            np.save(path, image)
    return f"wrote {len(images)} images to {out_dir}/sample_NNN{ext}"


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except OSError:
        raise  # a missing or unreadable file: its own message
    except Exception as error:  # not a .npy file (ValueError, EOFError, ...)
        raise FileError(f"{path}: not a .npy file ({error})") from None


def _run_sample(client: Client, args) -> int:
    start = time.monotonic()
    images = client.sample(num_images=args.num, steps=args.steps,
                           sampler=args.sampler, eta=args.eta, label=args.label,
                           guidance=args.guidance, seed=args.seed,
                           time_grid=args.time_grid)
    print(f"images: {len(images)}\nseed: {images.seed}\n"
          f"network evaluations: {images.network_evaluations}\n"
          f"time: {time.monotonic() - start:.3f} s (server: queue "
          f"{images.queue_seconds:.3f} s, compute {images.compute_seconds:.3f} s)")
    if args.out:
        print(_write_samples(images, args.out))
    return OK


def _load_images(files, shape):
    """The images of .png and .npy files, with one name per image."""
    images, names = [], []
    for path in files:
        if path.endswith(".npy"):
            array = _load_npy(path)
            if array.dtype != np.uint8:
                raise FileError(f"{path}: dtype {array.dtype}, want uint8 "
                                "images (0..255)")
            if array.shape == shape:
                images.append(array)
                names.append(path)
            elif array.shape[1:] == shape:
                images.extend(array)
                names.extend(f"{path}[{i}]" for i in range(len(array)))
            else:
                raise FileError(f"{path}: shape {array.shape}, want {shape} "
                                f"or N x {shape} (the model's shape)")
        else:
            if _PILImage is None:
                raise FileError(f"{path}: reading images other than .npy "
                                "needs PIL (apt-get install python3-pil)")
            with _PILImage.open(path) as image:
                array = _pil_to_array(image)
            if array.shape != shape:
                raise FileError(f"{path}: shape {array.shape}, want {shape} "
                                "(the model's shape)")
            images.append(array)
            names.append(path)
    return images, names


def _check_readable(*paths) -> None:
    """Fails on a missing or unreadable input before any RPC is sent."""
    for path in paths:
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            raise FileError(f"{path}: cannot read: "
                            f"{error.strerror or error}") from None


def _image_shape(client: Client) -> tuple:
    """The model's image shape as the loaders want it: (H, W) or (H, W, C)."""
    info = client.info()
    c, h, w = info["image_channels"], info["image_height"], info["image_width"]
    return (h, w) if c == 1 else (h, w, c)


def _run_score(client: Client, args) -> int:
    ode = args.method == "ode"
    ode_flags = ("ode_steps", "trace_samples", "ode_rtol", "ode_atol",
                 "ode_max_evaluations", "dequantization")
    if not ode and any(getattr(args, f) is not None for f in ode_flags):
        raise ValueError(", ".join("--" + f for f in ode_flags) +
                         " need --method=ode")
    _check_readable(*args.files)
    images, names = _load_images(args.files, _image_shape(client))
    start = time.monotonic()
    rows = client.score(images, timesteps=args.timesteps, seed=args.seed,
                        label=args.label, shared_noise=args.shared_noise,
                        false_positive_rate=args.false_positive_rate,
                        chunk=args.chunk, method=args.method,
                        time_sampling=args.time_sampling,
                        anomaly_level=args.anomaly_level,
                        **{f: getattr(args, f) for f in ode_flags})
    seconds = time.monotonic() - start
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    elif ode:
        print(f"{'index':>7} {'bpd':>9} {'ode_stderr':>10} {'ode_error':>10} "
              f"{'evals':>6}  file")
        for row, name in zip(rows, names):
            cells = [f"{row[k]:10.4f}" if row[k] is not None else f"{'':10}"
                     for k in ("ode_stderr_bpd", "ode_error_bpd")]
            print(f"{row['index']:7d} {row['bpd']:9.4f} {' '.join(cells)} "
                  f"{row['ode_function_evaluations']:6d}  {name}")
    else:
        print(f"{'index':>7} {'bpd':>9} {'prior':>9} {'recon':>9} "
              f"{'diffusion':>9} {'stderr':>9}  file")
        for row, name in zip(rows, names):
            print(f"{row['index']:7d} {row['bpd']:9.4f} {row['prior_bpd']:9.4f} "
                  f"{row['recon_bpd']:9.4f} {row['diffusion_bpd']:9.4f} "
                  f"{row['stderr_bpd']:9.4f}  {name}")
    n = len(rows)
    print(f"images: {n}")
    keys = (("bpd",) if ode else
            ("bpd", "prior_bpd", "recon_bpd", "diffusion_bpd", "stderr_bpd"))
    for key in keys:
        label = key.replace("_bpd", " bpd")
        print(f"mean {label}: {sum(r[key] for r in rows) / n:.4f}")
    if ode:
        evals = sum(r["ode_function_evaluations"] for r in rows) / n
        print(f"mean ode function evaluations per solve: {evals:.1f}")
    print(f"seed: {rows.seed}\nnetwork evaluations: {rows.network_evaluations}\n"
          f"time: {seconds:.3f} s in {rows.chunks} chunk(s)")
    return OK


def _load_one_image(path: str, shape: tuple) -> np.ndarray:
    images, _ = _load_images([path], shape)
    if len(images) != 1:
        raise FileError(f"{path}: {len(images)} images, want one")
    return images[0]


def _load_latents(path: str, shape: tuple) -> list:
    """The latents of a .npy file: float (n, C, H, W), or one (C, H, W)."""
    array = _load_npy(path)
    c = shape[2] if len(shape) == 3 else 1
    want = (c,) + shape[:2]
    given = array.shape
    if array.ndim == 3:
        array = array[np.newaxis]
    if (array.ndim != 4 or array.shape[1:] != want or array.shape[0] < 1
            or not np.issubdtype(array.dtype, np.floating)):
        raise FileError(f"{path}: {array.dtype} of shape {given}, want "
                        f"float latents of shape (n, {', '.join(map(str, want))})"
                        " (from encode)")
    return list(array.astype(np.float32))


def _print_decoded(images, args, columns=None) -> None:
    print(f"images: {len(images)}\n"
          f"network evaluations: {images.network_evaluations}\n"
          f"time: server queue {images.queue_seconds:.3f} s, compute "
          f"{images.compute_seconds:.3f} s")
    if args.out:
        print(_write_samples(images, args.out, columns))
    if args.out_dir:
        print(_write_image_files(images, args.out_dir))


def _run_encode(client: Client, args) -> int:
    _check_readable(args.image)
    images, _ = _load_images([args.image], _image_shape(client))
    latents = client.encode(images, steps=args.steps, label=args.label,
                            time_grid=args.time_grid)
    stacked = np.stack(latents).astype(np.float32)
    if args.out:
        with open(args.out, "wb") as f:  # the name as given, as vdm-client
            np.save(f, stacked)
    print(f"network evaluations: {latents.network_evaluations}\n"
          f"compute seconds: {latents.compute_seconds:.3f}")
    if args.out:
        print(f"wrote {args.out} (float32 .npy, shape {stacked.shape})")
    return OK


def _run_decode(client: Client, args) -> int:
    _check_readable(args.latent)
    latents = _load_latents(args.latent, _image_shape(client))
    images = client.decode(latents, steps=args.steps, label=args.label,
                           time_grid=args.time_grid)
    _print_decoded(images, args)
    return OK


def _run_interpolate(client: Client, args) -> int:
    if args.num < 2:
        raise ValueError(f"--num must be at least 2, got {args.num}")
    _check_readable(args.image, args.image2)
    shape = _image_shape(client)
    a = _load_one_image(args.image, shape)
    b = _load_one_image(args.image2, shape)
    encoded = client.encode([a, b], steps=args.steps, label=args.label,
                            time_grid=args.time_grid)
    images = client.decode(slerp(encoded[0], encoded[1], args.num),
                           steps=args.steps, label=args.label,
                           time_grid=args.time_grid)
    print(f"encode network evaluations: {encoded.network_evaluations}")
    _print_decoded(images, args, columns=len(images))  # one row
    return OK


def _run_info(client: Client, args) -> int:
    for key, value in client.info().items():
        print(f"{key}: {value}")
    return OK


def _run_models(client: Client, args) -> int:
    for m in client.list_models():
        cells = [m["name"], str(m["version"]), m["state"].lower(),
                 f"{m['memory_bytes'] / 2**20:.1f} MiB"]
        if m["is_default"]:
            cells.append("default")
        if m["error"]:
            cells.append(m["error"])
        print("\t".join(cells))
    return OK


def _run_health(client: Client, args) -> int:
    status = client.health()
    print(status)
    return OK if status == "SERVING" else FAILED


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls = {"ca": args.tls_ca, "cert": args.tls_cert, "key": args.tls_key,
               "server_name": args.tls_server_name}
    run = {"sample": _run_sample, "score": _run_score,
           "encode": _run_encode, "decode": _run_decode,
           "interpolate": _run_interpolate, "info": _run_info,
           "models": _run_models, "health": _run_health}[args.command]
    try:
        with Client(args.target, token=args.token, tls=tls,
                    timeout=args.timeout_s, model=args.model,
                    version=args.model_version) as client:
            return run(client, args)
    except VdmError as error:
        print(f"vdm_client: {error}", file=sys.stderr)
        return FAILED
    except (OSError, FileError) as error:
        print(f"vdm_client: {error}", file=sys.stderr)
        return FAILED
    except ValueError as error:
        print(f"vdm_client: {error}", file=sys.stderr)
        return USAGE


if __name__ == "__main__":
    sys.exit(main())
