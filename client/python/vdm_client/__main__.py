"""python3 -m vdm_client: a small command line over vdm_client.Client.

    python3 -m vdm_client --target=HOST:PORT sample --num=4 --steps=10 --seed=1 --out=grid.png
    python3 -m vdm_client --target=HOST:PORT score a.png b.npy [--csv=scores.csv]
    python3 -m vdm_client --target=HOST:PORT info
    python3 -m vdm_client --target=HOST:PORT health     (exit 0 only when SERVING)

Exit status: 0 success, 1 failure (an RPC or file error, or not SERVING),
2 bad usage. PNG files need PIL (python3-pil); without it `sample` writes
.npy and `score` reads .npy only.
"""

import argparse
import os
import sys
import time

import numpy as np

from vdm_client.client import (SAMPLERS, TIME_GRIDS, Client, VdmError,
                               _PILImage, _pil_to_array, make_grid,
                               write_csv)

OK, FAILED, USAGE = 0, 1, 2


def _seed(text: str) -> int:
    value = int(text, 0)
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2**64), got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m vdm_client",
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

    commands.add_parser("info", help="the served model and the server's limits")
    commands.add_parser("health", help="exit 0 only when SERVING")
    return parser


def _write_samples(images, out: str) -> str:
    if out.endswith(".npy"):
        np.save(out, np.stack(images))
        return f"wrote {out} ({len(images)} images stacked)"
    if _PILImage is None:
        path = os.path.splitext(out)[0] + ".npy"
        np.save(path, np.stack(images))
        return f"wrote {path} (no PIL for PNG: python3-pil)"
    _PILImage.fromarray(make_grid(images)).save(out)
    return f"wrote {out}"


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
            array = np.load(path)
            if array.shape == shape:
                images.append(array)
                names.append(path)
            elif array.shape[1:] == shape:
                images.extend(array)
                names.extend(f"{path}[{i}]" for i in range(len(array)))
            else:
                raise ValueError(f"{path}: shape {array.shape}, want {shape} "
                                 f"or N x {shape} (the model's shape)")
        else:
            if _PILImage is None:
                raise ValueError(f"{path}: reading images other than .npy "
                                 "needs PIL (apt-get install python3-pil)")
            with _PILImage.open(path) as image:
                images.append(_pil_to_array(image))
            names.append(path)
    return images, names


def _run_score(client: Client, args) -> int:
    info = client.info()
    c, h, w = info["image_channels"], info["image_height"], info["image_width"]
    images, names = _load_images(args.files, (h, w) if c == 1 else (h, w, c))
    start = time.monotonic()
    rows = client.score(images, timesteps=args.timesteps, seed=args.seed,
                        label=args.label, shared_noise=args.shared_noise,
                        false_positive_rate=args.false_positive_rate,
                        chunk=args.chunk)
    seconds = time.monotonic() - start
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    else:
        print(f"{'index':>7} {'bpd':>9} {'prior':>9} {'recon':>9} "
              f"{'diffusion':>9} {'stderr':>9}  file")
        for row, name in zip(rows, names):
            print(f"{row['index']:7d} {row['bpd']:9.4f} {row['prior_bpd']:9.4f} "
                  f"{row['recon_bpd']:9.4f} {row['diffusion_bpd']:9.4f} "
                  f"{row['stderr_bpd']:9.4f}  {name}")
    n = len(rows)
    print(f"images: {n}")
    for key in ("bpd", "prior_bpd", "recon_bpd", "diffusion_bpd", "stderr_bpd"):
        label = key.replace("_bpd", " bpd")
        print(f"mean {label}: {sum(r[key] for r in rows) / n:.4f}")
    print(f"seed: {rows.seed}\nnetwork evaluations: {rows.network_evaluations}\n"
          f"time: {seconds:.3f} s in {rows.chunks} chunk(s)")
    return OK


def _run_info(client: Client, args) -> int:
    for key, value in client.info().items():
        print(f"{key}: {value}")
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
    run = {"sample": _run_sample, "score": _run_score, "info": _run_info,
           "health": _run_health}[args.command]
    try:
        with Client(args.target, token=args.token, tls=tls,
                    timeout=args.timeout_s) as client:
            return run(client, args)
    except VdmError as error:
        print(f"vdm_client: {error}", file=sys.stderr)
        return FAILED
    except OSError as error:
        print(f"vdm_client: {error}", file=sys.stderr)
        return FAILED
    except ValueError as error:
        print(f"vdm_client: {error}", file=sys.stderr)
        return USAGE


if __name__ == "__main__":
    sys.exit(main())
