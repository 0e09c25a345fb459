"""The vdm-serve client: a thin, Pythonic layer over the generated vdm.v1 stubs.

Images travel as IMAGE_FORMAT_RAW both ways (C x H x W planar bytes on the
wire) and are numpy uint8 arrays here: H x W for a one-channel model,
H x W x C otherwise. Every RPC failure is raised as VdmError; bad arguments
that are caught before anything is sent raise ValueError.
"""

import dataclasses
import functools
import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import grpc
import numpy as np

from google.protobuf import descriptor as _descriptor
from vdm.v1 import vdm_pb2, vdm_pb2_grpc
# The grpc.health.v1 stubs live inside this package so that they cannot
# shadow the `grpc` module (see client/python/CMakeLists.txt).
from vdm_client._health import health_pb2, health_pb2_grpc

try:  # optional: PIL images as input, PNG files in the CLI
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover - depends on the machine
    _PILImage = None

__all__ = [
    "CSV_FIELDS", "Client", "EncodeResult", "LLR_FIELDS", "ODE_FIELDS",
    "THOROUGH_FIELDS",
    "Progress", "SAMPLERS", "SCORE_METHODS", "SampleResult", "ScoreResult",
    "TIME_GRIDS", "VdmError", "make_grid", "scores_to_csv", "slerp",
    "write_csv",
]

_MASK64 = (1 << 64) - 1
# model/vdm/request.cc ChunkSeed: the golden-ratio stride between the seeds
# of consecutive ScoreBPD chunks, so that results match `vdm-client score`.
_CHUNK_SEED_STRIDE = 0x9E3779B97F4A7C15
_MAX_MESSAGE_BYTES = 256 << 20  # as the C++ client

_SCORE = vdm_pb2.ImageScore.DESCRIPTOR
_FD = _descriptor.FieldDescriptor


@functools.lru_cache(maxsize=None)
def _score_columns(descriptor) -> tuple:
    """The columns of score messages of type `descriptor`, in declaration
    order, as (name, field, element, group): the rules above ImageScore in
    proto/vdm/v1/vdm.proto, as client/client.cc ScoreColumns reads them.
    element is the position in a repeated field (None for a singular one),
    group the field's csv_group ("" for none)."""
    columns = []
    for field in descriptor.fields:
        # Numbers and bools only: bytes, strings and messages are not columns.
        if field.cpp_type in (_FD.CPPTYPE_STRING, _FD.CPPTYPE_MESSAGE):
            continue
        options = field.GetOptions().Extensions
        group = options[vdm_pb2.csv_group]
        if field.label != _FD.LABEL_REPEATED:
            columns.append((field.name, field, None, group))
        else:  # csv_columns 0 (unset) for the per-pixel maps: no columns
            columns += [(f"{field.name}_{k}", field, k, group)
                        for k in range(options[vdm_pb2.csv_columns])]
    return tuple(columns)


def _group_columns(group: str) -> tuple:
    return tuple(name for name, _, _, g in _score_columns(_SCORE) if g == group)


# The columns of `vdm-client score --csv`, which are also the keys of
# score()'s records (plus "anomaly_map" on request): index, then
# ImageScore's ungrouped columns (all read from vdm.proto).
CSV_FIELDS = ("index",) + _group_columns("")
# Added after CSV_FIELDS, and as keys of score()'s records, when the images
# were scored by the probability-flow ODE (score(method="ode")):
# ode_function_evaluations (per solve), ode_stderr_bpd (None unless
# trace_samples >= 2) and ode_error_bpd (None with RK4's ode_steps).
ODE_FIELDS = _group_columns("ode")
# Added after CSV_FIELDS (and after ODE_FIELDS when both are there), and as
# keys of score()'s records, when a server with a background model
# (vdm-server --background_model) returned them.
LLR_FIELDS = _group_columns("llr")
# Added likewise when the images were scored at anomaly_level="thorough"
# with its calibration: feature_distance, reconstruction_error and local_distance.
THOROUGH_FIELDS = _group_columns("thorough")


def _enum_names(enum, prefix: str) -> tuple:
    """The library's names of a proto enum: SAMPLER_DPM_SOLVER_2M -> dpm_solver_2m.

    The proto enums follow the one table of names (model/vdm/sampler_config.cc),
    so the names are derived from the generated descriptor, not listed here.
    """
    return tuple(key[len(prefix):].lower() for key, value in enum.items()
                 if value != 0)  # 0 is *_UNSPECIFIED


# Valid `sampler` and `time_grid` names, e.g. "ddim", "uniform_log_snr".
SAMPLERS = _enum_names(vdm_pb2.Sampler, "SAMPLER_")
TIME_GRIDS = _enum_names(vdm_pb2.TimeGrid, "TIME_GRID_")
# Valid score() methods: "elbo" (the variational bound) and "ode" (the
# likelihood by the probability-flow ODE, docs/likelihood.md).
SCORE_METHODS = _enum_names(vdm_pb2.ScoreMethod, "SCORE_METHOD_")


def _enum_value(enum, prefix: str, name, what: str) -> int:
    if isinstance(name, int) and not isinstance(name, bool):
        if name in enum.values():
            return name
    elif isinstance(name, str) and name.lower() in _enum_names(enum, prefix):
        return enum.Value(prefix + name.upper())
    raise ValueError(f"unknown {what} {name!r} (want one of "
                     f"{', '.join(_enum_names(enum, prefix))})")


def _int32(value, name: str) -> int:
    """An integer argument as sent in an int32 field; ValueError naming it."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if (number is None or isinstance(value, bool) or number != value
            or not -(1 << 31) <= number < 1 << 31):
        raise ValueError(f"{name} must be a 32-bit integer, got {value!r}")
    return number


class VdmError(Exception):
    """An RPC that failed.

    code: the grpc.StatusCode (INVALID_ARGUMENT names the field and its range,
    RESOURCE_EXHAUSTED means the queue is full now, UNAVAILABLE not ready or
    draining, UNAUTHENTICATED a missing or wrong token, ...).
    message: the server's message. request_id: the server's x-request-id
    (to quote in a bug report), when it sent one. context: where in a
    multi-request call it happened (e.g. "images 64..99 of 100"), or None.
    """

    def __init__(self, code: grpc.StatusCode, message: str,
                 request_id: Optional[str] = None,
                 context: Optional[str] = None):
        self.code = code
        self.message = message
        self.request_id = request_id
        self.context = context
        text = f"{code.name}: {message}"
        if context:
            text = f"{context}: {text}"
        super().__init__(text)

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError,
                       context: Optional[str] = None) -> "VdmError":
        code = error.code() if hasattr(error, "code") else None
        message = error.details() if hasattr(error, "details") else None
        request_id = None
        for getter in ("initial_metadata", "trailing_metadata"):
            try:
                for key, value in getattr(error, getter)() or ():
                    if key == "x-request-id":
                        request_id = value
            except Exception:  # not a grpc.Call: no metadata
                pass
        return cls(code or grpc.StatusCode.UNKNOWN, message or str(error),
                   request_id, context)


@dataclasses.dataclass
class Progress:
    """A SampleStream progress event: `step` of `total_steps` done, and the
    predicted final images x_hat when a preview was due (else empty)."""
    step: int
    total_steps: int
    previews: List[np.ndarray] = dataclasses.field(default_factory=list)

    def __repr__(self) -> str:
        return (f"Progress(step={self.step}, total_steps={self.total_steps}, "
                f"previews={len(self.previews)})")


class SampleResult(list):
    """The images of a Sample call, a list of numpy uint8 arrays (H x W, or
    H x W x C), with what the server reported: `seed` (the seed used; pass it
    back to reproduce the images), `network_evaluations`, `queue_seconds`,
    `compute_seconds`, and `model` and `model_version`: the model version
    that computed them."""

    def __init__(self, images=(), seed: int = 0, network_evaluations: int = 0,
                 queue_seconds: float = 0.0, compute_seconds: float = 0.0):
        super().__init__(images)
        self.seed = seed
        self.network_evaluations = network_evaluations
        self.queue_seconds = queue_seconds
        self.compute_seconds = compute_seconds
        self.model, self.model_version = "", 0

    def __repr__(self) -> str:
        shape = self[0].shape if self else ()
        return (f"SampleResult({len(self)} images of shape {shape}, "
                f"seed={self.seed}, "
                f"network_evaluations={self.network_evaluations})")


class EncodeResult(list):
    """The latents of an encode call, a list of numpy float32 arrays of shape
    (C, H, W), one per image, with `network_evaluations` (images x steps),
    `queue_seconds` and `compute_seconds`. np.stack(result) gives (n, C, H, W).
    """

    def __init__(self, latents=(), network_evaluations: int = 0,
                 queue_seconds: float = 0.0, compute_seconds: float = 0.0):
        super().__init__(latents)
        self.network_evaluations = network_evaluations
        self.queue_seconds = queue_seconds
        self.compute_seconds = compute_seconds

    def __repr__(self) -> str:
        shape = self[0].shape if self else ()
        return (f"EncodeResult({len(self)} latents of shape {shape}, "
                f"network_evaluations={self.network_evaluations})")


def slerp(a, b, num: int) -> List[np.ndarray]:
    """`num` >= 2 latents on the great circle from a (first) to b (last),
    evenly in angle, as `vdm-client interpolate` does (client/client.cc
    SlerpPath): a Gaussian latent's norm concentrates, so a straight line
    would leave the shell the model was trained on."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"slerp: shapes {a.shape} and {b.shape} differ")
    if int(num) < 2:
        raise ValueError(f"slerp: num must be >= 2, got {num}")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cosine = float(np.dot(a.ravel(), b.ravel()) / (na * nb)) if na and nb else 1.0
    theta = math.acos(min(1.0, max(-1.0, cosine)))
    path = []
    for k in range(int(num)):
        t = k / (int(num) - 1)
        if theta < 1e-6:
            wa, wb = 1 - t, t
        else:
            wa = math.sin((1 - t) * theta) / math.sin(theta)
            wb = math.sin(t * theta) / math.sin(theta)
        path.append((wa * a + wb * b).astype(np.float32))
    return path


def _latent_to_proto(latent, index: int):
    array = np.asarray(latent, dtype=np.float32)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3:
        raise ValueError(f"latent {index}: shape {array.shape}, want (C, H, W)")
    c, h, w = array.shape
    return vdm_pb2.Latent(values=array.ravel().tolist(), channels=c, height=h,
                          width=w)


def _mask_to_proto(mask):
    """A mask (bool, or uint8 with >= 128 = known; H x W) as a RAW gray image."""
    array = np.asarray(mask)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.ndim != 2:
        raise ValueError(f"mask: shape {array.shape}, want H x W")
    return _image_to_proto(array, 0)


class ScoreResult(list):
    """The records of a score call, one dict per image in input order (keys
    CSV_FIELDS, plus ODE_FIELDS with method="ode", LLR_FIELDS with a
    background model and "anomaly_map" when asked), with `seed` (the base seed;
    chunk c > 0 used the C++ client's ChunkSeed of it), `network_evaluations`,
    `chunks` (requests sent) and `batch_p_values` (one per chunk, None when
    the server sent none)."""

    def __init__(self, rows=(), seed: int = 0, network_evaluations: int = 0,
                 chunks: int = 0, batch_p_values=()):
        super().__init__(rows)
        self.seed = seed
        self.network_evaluations = network_evaluations
        self.chunks = chunks
        self.batch_p_values = list(batch_p_values)
        # (model, version) that computed each chunk, in order.
        self.model_versions = []

    def __repr__(self) -> str:
        return (f"ScoreResult({len(self)} images, seed={self.seed}, "
                f"chunks={self.chunks})")


def _chunk_seed(base: int, chunk: int) -> int:
    return (base + chunk * _CHUNK_SEED_STRIDE) & _MASK64


def _check_seed(seed) -> Optional[int]:
    if seed is None:
        return None
    seed = int(seed)
    if not 0 <= seed <= _MASK64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def _image_from_proto(image) -> np.ndarray:
    c, h, w = image.channels, image.height, image.width
    pixels = np.frombuffer(image.data, dtype=np.uint8)
    if c <= 0 or h <= 0 or w <= 0 or pixels.size != c * h * w:
        raise VdmError(grpc.StatusCode.INTERNAL,
                       f"the server sent a raw image of {pixels.size} bytes "
                       f"for {c}x{h}x{w}")
    planes = pixels.reshape(c, h, w)
    if c == 1:
        return planes[0].copy()
    return np.ascontiguousarray(planes.transpose(1, 2, 0))


def _pil_to_array(image) -> np.ndarray:
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("L" if image.mode in ("1", "I", "I;16", "F", "LA")
                              else "RGB")
    return np.asarray(image)


def _as_array(image, index: int) -> np.ndarray:
    if _PILImage is not None and isinstance(image, _PILImage.Image):
        image = _pil_to_array(image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image {index}: dtype {array.dtype}, want uint8 "
                         "(values 0..255)")
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"image {index}: shape {array.shape}, want H x W or "
                         "H x W x C")
    return array


def _image_to_proto(image, index: int):
    """An image (numpy H x W [x C] uint8 or PIL) as a RAW vdm.v1.Image."""
    array = _as_array(image, index)
    h, w, c = array.shape
    data = np.ascontiguousarray(array.transpose(2, 0, 1)).tobytes()
    return vdm_pb2.Image(data=data, channels=c, height=h, width=w)


def make_grid(images: Sequence[np.ndarray], columns: Optional[int] = None,
              pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tiles equally shaped images into one array, as `vdm-client sample`
    does: ceil(sqrt(n)) columns and a `pad`-pixel border of `pad_value`."""
    if not images:
        raise ValueError("make_grid: no images")
    arrays = [_as_array(image, i) for i, image in enumerate(images)]
    h, w, c = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != (h, w, c):
            raise ValueError(f"make_grid: image {i} is {a.shape}, image 0 is "
                             f"{(h, w, c)}")
    n = len(arrays)
    if columns is None:
        columns = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
    rows = (n + columns - 1) // columns
    grid = np.full((rows * h + (rows + 1) * pad, columns * w + (columns + 1) * pad,
                    c), pad_value, dtype=np.uint8)
    for i, a in enumerate(arrays):
        top = pad + (i // columns) * (h + pad)
        left = pad + (i % columns) * (w + pad)
        grid[top:top + h, left:left + w] = a
    return grid[:, :, 0] if c == 1 else grid


def scores_to_csv(rows: Sequence[Dict[str, Any]], descriptor=_SCORE) -> str:
    """score()'s records as the CSV of `vdm-client score --csv`: the same
    columns and number format, by the rules above ImageScore in vdm.proto:
    CSV_FIELDS (empty p_value / is_anomaly when None), then ODE_FIELDS when
    a record has one of them that is not None (records scored by the ODE),
    then LLR_FIELDS likewise (a server with a background model).
    `descriptor`: the message type the records came from (a variant of
    ImageScore in a test)."""
    columns = _score_columns(descriptor)
    shown = {""} | {group for name, _, _, group in columns
                    if any(row.get(name) is not None for row in rows)}
    columns = [c for c in columns if c[3] in shown]
    lines = [",".join(["index"] + [name for name, _, _, _ in columns])]
    for row in rows:
        cells = [_cell(row.get("index"), _FD.CPPTYPE_INT64)]
        cells += [_cell(row.get(name), field.cpp_type)
                  for name, field, _, _ in columns]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def _cell(value, cpp_type: int) -> str:
    """A CSV cell by its field's kind, as client/client.cc writes it:
    floating point as %.6f, integers and enums in decimal, bools as 0 or 1,
    None as empty."""
    if value is None:
        return ""
    if cpp_type in (_FD.CPPTYPE_DOUBLE, _FD.CPPTYPE_FLOAT):
        return f"{float(value):.6f}"
    if cpp_type == _FD.CPPTYPE_BOOL:
        return "1" if value else "0"
    return str(int(value))


def _record(score, index: int) -> Dict[str, Any]:
    """A score message as a record: "index", then its columns by the rules
    above ImageScore in vdm.proto (None for an unset optional field or past
    the end of a repeated one; no keys for a group the message has no field
    of set)."""
    groups = {""} | {field.GetOptions().Extensions[vdm_pb2.csv_group]
                     for field, _ in score.ListFields()}
    row = {"index": index}
    for name, field, element, group in _score_columns(score.DESCRIPTOR):
        if group not in groups:
            continue
        value = getattr(score, field.name)
        if element is not None:
            value = value[element] if element < len(value) else None
        elif field.has_presence and not score.HasField(field.name):
            value = None
        row[name] = value
    return row


def _anomaly_map(score, index: int, image) -> np.ndarray:
    """The record's "anomaly_map": float32 H x W, bits per pixel."""
    values = np.asarray(score.anomaly_map, dtype=np.float32)
    if values.size != image.height * image.width:
        raise VdmError(grpc.StatusCode.INTERNAL,
                       f"image {index}: anomaly map of {values.size} "
                       f"values for {image.height}x{image.width}")
    return values.reshape(image.height, image.width)


def write_csv(rows: Sequence[Dict[str, Any]], path: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(scores_to_csv(rows))


def _tls_get(tls, name: str):
    if isinstance(tls, dict):
        return tls.get(name)
    return getattr(tls, name, None)


def _read(path: Optional[str]) -> Optional[bytes]:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


class Client:
    """A connection to a vdm-server.

    target: HOST:PORT (any gRPC target string). token: a bearer token, sent
    as `authorization: Bearer <token>` on every call. tls: None for
    plaintext, or a dict (or object with attributes) with `ca` (PEM file of
    the server's CA; None = the system roots), `cert` and `key` (PEM files:
    mTLS) and optionally `server_name` (the name to check the certificate
    against); True = TLS with the system roots. timeout: deadline of each RPC
    in seconds. options: extra gRPC channel options [(key, value), ...].
    model, version: the model version every request runs on, on a server
    with a model repository (None = the server's default model, and the
    version it serves).

    Use it as a context manager, or call close(), to close the channel.
    """

    def __init__(self, target: str, token: Optional[str] = None, tls=None,
                 timeout: float = 600.0, options: Sequence = (),
                 model: Optional[str] = None, version: Optional[int] = None):
        if not target:
            raise ValueError("target is empty")
        if version is not None and not model:
            raise ValueError("version needs model")
        self.model = model or ""
        self.version = None if version is None else int(version)
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.target = target
        self.timeout = float(timeout)
        self._metadata = ((("authorization", f"Bearer {token}"),) if token
                          else ())
        channel_options = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ]
        if tls is None or tls is False:
            channel_options += list(options)
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            if tls is True:
                tls = {}
            cert, key = _tls_get(tls, "cert"), _tls_get(tls, "key")
            if bool(cert) != bool(key):
                raise ValueError("tls: cert and key go together")
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(_tls_get(tls, "ca")),
                private_key=_read(key), certificate_chain=_read(cert))
            server_name = _tls_get(tls, "server_name")
            if server_name:
                channel_options.append(("grpc.ssl_target_name_override",
                                        server_name))
            channel_options += list(options)
            self._channel = grpc.secure_channel(target, credentials,
                                                options=channel_options)
        self._stub = vdm_pb2_grpc.VdmServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # ---- plumbing

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    def _call(self, method, request, timeout: Optional[float] = None,
              context: Optional[str] = None):
        fields = request.DESCRIPTOR.fields_by_name
        if self.model and "model" in fields:
            request.model = self.model
        if self.version is not None and "version" in fields:
            request.version = self.version
        try:
            return method(request, timeout=timeout or self.timeout,
                          metadata=self._metadata)
        except grpc.RpcError as error:
            raise VdmError.from_rpc_error(error, context) from None

    # ---- the RPCs

    def info(self) -> Dict[str, Any]:
        """GetModelInfo as a dict of every ModelInfo field (image_channels,
        image_height, image_width, num_classes, max_images_per_request, ...)."""
        info = self._call(self._stub.GetModelInfo, vdm_pb2.ModelInfoRequest())
        return {field.name: getattr(info, field.name)
                for field in info.DESCRIPTOR.fields}

    def list_models(self) -> List[Dict[str, Any]]:
        """ListModels: one dict per model version the server knows (name,
        version, state "LOADING" / "READY" / "FAILED" / "UNLOADING", error,
        memory_bytes, is_default), sorted by name and version."""
        response = self._call(self._stub.ListModels, vdm_pb2.ListModelsRequest())
        states = vdm_pb2.ModelVersionStatus.State
        return [{"name": m.name, "version": m.version,
                 "state": states.Name(m.state), "error": m.error,
                 "memory_bytes": m.memory_bytes, "is_default": m.is_default}
                for m in response.models]

    def health(self, service: str = "", timeout: Optional[float] = None) -> str:
        """The standard health check: "SERVING", "NOT_SERVING", ... (raises
        VdmError, e.g. UNAVAILABLE, when the server cannot be reached)."""
        response = self._call(self._health.Check,
                              health_pb2.HealthCheckRequest(service=service),
                              timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _sample_request(self, num_images, steps, sampler, eta, label, guidance,
                        seed, time_grid, preview_every=0, negative_label=None,
                        init_image=None, strength=None, mask=None,
                        resample_rounds=0, latents=None, strength_t=None):
        request = vdm_pb2.SampleRequest(
            num_images=int(num_images), steps=int(steps),
            sampler=_enum_value(vdm_pb2.Sampler, "SAMPLER_", sampler, "sampler"),
            time_grid=_enum_value(vdm_pb2.TimeGrid, "TIME_GRID_", time_grid,
                                  "time_grid"),
            eta=float(eta), format=vdm_pb2.IMAGE_FORMAT_RAW,
            preview_every=int(preview_every))
        if label is not None:
            request.label = int(label)
        if guidance is not None:
            request.guidance_scale = float(guidance)
        seed = _check_seed(seed)
        if seed is not None:
            request.seed = seed
        if negative_label is not None:
            request.negative_label = int(negative_label)
        if init_image is not None:
            request.init_image.CopyFrom(_image_to_proto(init_image, 0))
        if strength is not None:
            request.strength = float(strength)
        if strength_t is not None:
            request.strength_t = float(strength_t)
        if mask is not None:
            request.mask.CopyFrom(_mask_to_proto(mask))
        request.resample_rounds = int(resample_rounds)
        if latents is not None:
            request.latents.extend(_latent_to_proto(z, i)
                                   for i, z in enumerate(latents))
        return request

    @staticmethod
    def _sample_result(response, num_images: int) -> SampleResult:
        if len(response.images) != num_images:
            raise VdmError(grpc.StatusCode.INTERNAL,
                           f"asked for {num_images} images, the server "
                           f"returned {len(response.images)}")
        result = SampleResult([_image_from_proto(i) for i in response.images],
                              seed=response.seed,
                              network_evaluations=response.network_evaluations,
                              queue_seconds=response.queue_seconds,
                              compute_seconds=response.compute_seconds)
        result.model, result.model_version = (response.model,
                                              response.model_version)
        return result

    def sample(self, num_images: int = 1, steps: int = 50,
               sampler: Union[str, int] = "ddim", eta: float = 0.0,
               label: Optional[int] = None, guidance: Optional[float] = None,
               seed: Optional[int] = None,
               time_grid: Union[str, int] = "uniform_t",
               negative_label: Optional[int] = None) -> SampleResult:
        """Draws `num_images` images: a SampleResult, a list of numpy uint8
        arrays of the model's shape with `.seed` (the seed used) and
        `.network_evaluations`.

        sampler: one of SAMPLERS ("ddim", "ddpm", "euler_maruyama", "heun",
        "dpm_solver_2m"); eta: DDIM's, in [0, 1]; label: a class (None =
        unconditional); guidance: classifier-free guidance scale in [0, 20]
        (needs a label or a negative_label; None = 1, plain conditional);
        seed: None = chosen by the server; time_grid: one of TIME_GRIDS;
        negative_label: guide away from this class (needs guidance != 1).
        """
        request = self._sample_request(num_images, steps, sampler, eta, label,
                                       guidance, seed, time_grid,
                                       negative_label=negative_label)
        response = self._call(self._stub.Sample, request)
        return self._sample_result(response, request.num_images)

    def edit(self, image, strength: Optional[float] = None,
             num_images: int = 1,
             steps: int = 50, sampler: Union[str, int] = "ddim",
             eta: float = 0.0, label: Optional[int] = None,
             guidance: Optional[float] = None,
             negative_label: Optional[int] = None, seed: Optional[int] = None,
             time_grid: Union[str, int] = "uniform_t",
             strength_t: Optional[float] = None) -> SampleResult:
        """Image-to-image (SDEdit): `image` (numpy uint8 of the model's shape,
        or PIL) noised until the noise variance fraction sigma^2(t) equals
        `strength` in (0, 1] and sampled back, with `steps` steps over that
        shorter interval (the evaluations follow the steps as in sample()).
        Small strength keeps the image, equal steps of it change the image
        about evenly, 1 = from pure noise; a label and guidance steer it.
        `strength_t` instead gives the start as the time t itself (the old
        meaning of strength); exactly one of the two (else ValueError).
        Returns a SampleResult like sample()."""
        if (strength is None) == (strength_t is None):
            raise ValueError("edit: give exactly one of strength (noise "
                             "variance fraction) and strength_t (time), got "
                             f"strength={strength}, strength_t={strength_t}")
        request = self._sample_request(num_images, steps, sampler, eta, label,
                                       guidance, seed, time_grid,
                                       negative_label=negative_label,
                                       init_image=image, strength=strength,
                                       strength_t=strength_t)
        response = self._call(self._stub.Sample, request)
        return self._sample_result(response, request.num_images)

    def inpaint(self, image, mask, num_images: int = 1, steps: int = 50,
                sampler: Union[str, int] = "ddim", eta: float = 0.0,
                label: Optional[int] = None, guidance: Optional[float] = None,
                negative_label: Optional[int] = None,
                seed: Optional[int] = None,
                time_grid: Union[str, int] = "uniform_t",
                resample_rounds: int = 0) -> SampleResult:
        """Inpainting: the results equal `image` exactly where `mask` (H x W,
        bool or uint8 with >= 128 = known) is set and are sampled to fit
        elsewhere. resample_rounds (0..10): RePaint's resampling, each round
        redoing every step once more (the evaluations grow by that factor;
        not with dpm_solver_2m). Returns a SampleResult like sample()."""
        request = self._sample_request(num_images, steps, sampler, eta, label,
                                       guidance, seed, time_grid,
                                       negative_label=negative_label,
                                       init_image=image, mask=mask,
                                       resample_rounds=resample_rounds)
        response = self._call(self._stub.Sample, request)
        return self._sample_result(response, request.num_images)

    def encode(self, images: Sequence, steps: int = 50,
               label: Optional[int] = None,
               time_grid: Union[str, int] = "uniform_t") -> EncodeResult:
        """DDIM inversion: each image's latent at t = 1, an EncodeResult of
        numpy float32 (C, H, W) arrays (steps network evaluations per image).
        decode() with the same steps, time_grid and label gives the images
        back, up to an error that shrinks with the steps."""
        protos = [_image_to_proto(image, i) for i, image in enumerate(images)]
        if not protos:
            raise ValueError("encode: no images")
        request = vdm_pb2.EncodeRequest(
            images=protos, format=vdm_pb2.IMAGE_FORMAT_RAW, steps=int(steps),
            time_grid=_enum_value(vdm_pb2.TimeGrid, "TIME_GRID_", time_grid,
                                  "time_grid"))
        if label is not None:
            request.label = int(label)
        response = self._call(self._stub.Encode, request)
        if len(response.latents) != len(protos):
            raise VdmError(grpc.StatusCode.INTERNAL,
                           f"sent {len(protos)} images, the server returned "
                           f"{len(response.latents)} latents")
        latents = [np.asarray(z.values, dtype=np.float32).reshape(
            z.channels, z.height, z.width) for z in response.latents]
        return EncodeResult(latents, response.network_evaluations,
                            response.queue_seconds, response.compute_seconds)

    def decode(self, latents, steps: int = 50, label: Optional[int] = None,
               guidance: Optional[float] = None,
               time_grid: Union[str, int] = "uniform_t") -> SampleResult:
        """The images of `latents` (a sequence of (C, H, W) float arrays, or
        one (n, C, H, W) array): deterministic DDIM (eta 0) from each latent,
        steps network evaluations per latent. Use encode()'s steps, time_grid
        and label to get its images back."""
        latents = list(latents)
        if not latents:
            raise ValueError("decode: no latents")
        request = self._sample_request(0, steps, "ddim", 0.0, label, guidance,
                                       None, time_grid, latents=latents)
        response = self._call(self._stub.Sample, request)
        return self._sample_result(response, len(latents))

    def interpolate(self, a, b, num: int = 8, steps: int = 50,
                    label: Optional[int] = None,
                    time_grid: Union[str, int] = "uniform_t") -> SampleResult:
        """`num` images morphing from image a to image b: both encoded, their
        latents slerped at `num` points (the ends are a's and b's own), then
        decoded. Costs (2 + num) x steps network evaluations; the result's
        network_evaluations counts both calls."""
        encoded = self.encode([a, b], steps=steps, label=label,
                              time_grid=time_grid)
        images = self.decode(slerp(encoded[0], encoded[1], num), steps=steps,
                             label=label, time_grid=time_grid)
        images.network_evaluations += encoded.network_evaluations
        return images

    def sample_stream(self, num_images: int = 1, steps: int = 50,
                      sampler: Union[str, int] = "ddim", eta: float = 0.0,
                      label: Optional[int] = None,
                      guidance: Optional[float] = None,
                      seed: Optional[int] = None,
                      time_grid: Union[str, int] = "uniform_t",
                      preview_every: int = 0
                      ) -> Iterator[Union[Progress, SampleResult]]:
        """sample() with progress: an iterator of Progress events and, last,
        the SampleResult. Progress comes after every step, in order; when the
        reader is slower than the sampler the server keeps only the newest
        waiting one, so steps can skip but always increase, the last one is
        total_steps, and previews (x_hat every `preview_every` steps) are
        never dropped. Leaving the loop early (or close() on the iterator)
        cancels the call, and the server stops the work.

            for event in client.sample_stream(num_images=4, steps=50):
                if isinstance(event, vdm_client.Progress):
                    print(f"{event.step}/{event.total_steps}")
                else:
                    images = event
        """
        # Built here, not in the generator, so bad arguments raise at once.
        request = self._sample_request(num_images, steps, sampler, eta, label,
                                       guidance, seed, time_grid, preview_every)
        try:
            call = self._stub.SampleStream(request, timeout=self.timeout,
                                           metadata=self._metadata)
        except grpc.RpcError as error:
            raise VdmError.from_rpc_error(error) from None
        return self._stream_events(call, request.num_images)

    def _stream_events(self, call, num_images: int):
        try:
            for message in call:
                event = message.WhichOneof("event")
                if event == "progress":
                    p = message.progress
                    yield Progress(p.step, p.total_steps,
                                   [_image_from_proto(i) for i in p.previews])
                elif event == "result":
                    yield self._sample_result(message.result, num_images)
        except grpc.RpcError as error:
            raise VdmError.from_rpc_error(error) from None
        finally:
            call.cancel()  # a no-op once the call has finished

    def score(self, images: Sequence, timesteps: int = 16,
              seed: Optional[int] = None, label: Optional[int] = None,
              shared_noise: bool = False,
              false_positive_rate: Optional[float] = None,
              anomaly_map: bool = False,
              chunk: Optional[int] = None,
              method: Union[str, int] = "elbo",
              ode_steps: Optional[int] = None,
              trace_samples: Optional[int] = None,
              ode_rtol: Optional[float] = None,
              ode_atol: Optional[float] = None,
              ode_max_evaluations: Optional[int] = None,
              dequantization: Union[str, int, None] = None,
              time_sampling: Union[str, int, None] = None,
              anomaly_level: Union[str, int, None] = None) -> ScoreResult:
        """Bits per dimension and anomaly scores of `images` (numpy uint8
        H x W or H x W x C arrays, or PIL images): a ScoreResult, one dict per
        image with the keys of CSV_FIELDS (p_value and is_anomaly are None
        unless the model is calibrated for this setup) and, with
        anomaly_map=True, "anomaly_map" (numpy float32 H x W, bits per pixel).

        method: one of SCORE_METHODS (or the vdm.v1.ScoreMethod value):
        "elbo" (the default), the variational bound with K = timesteps;
        "ode", a bound on the discrete likelihood through the
        probability-flow ODE's density (docs/likelihood.md): "bpd" is the
        ODE's, the ELBO-only keys are 0 or None, and the records get
        ODE_FIELDS: "ode_function_evaluations" (the network evaluations a
        solve used), "ode_stderr_bpd" (the standard error over the solves;
        None unless trace_samples >= 2) and "ode_error_bpd" (the adaptive
        solver's error estimate; None with RK4). timesteps, shared_noise,
        false_positive_rate and anomaly_map are then ignored by the server.
        The ODE options apply only with method="ode" (else ValueError):
        ode_steps None or 0 = the adaptive solver (Dormand-Prince) with
        ode_rtol / ode_atol in [1e-7, 0.1] and at most ode_max_evaluations
        in [13, 4000] per solve (None = the server's defaults); ode_steps
        N in [1, 1000] = RK4 with 4 N evaluations; trace_samples in [1, 64]
        independent solves per image (None = 1); dequantization "gaussian"
        (None, the default) or "uniform" (or the vdm.v1.Dequantization
        value). Each evaluation is a forward and a vector-Jacobian product
        per solve; out-of-range values come back as VdmError
        INVALID_ARGUMENT naming the field.

        time_sampling (ELBO only): None (the model's time proposal when its
        calibration file has one, else uniform), "uniform" or "proposal"
        (refused when the model has none), or the vdm.v1.TimeSampling value
        (docs/performance.md, "Importance-sampled times").

        anomaly_level (ELBO only): None or "fast" (the ELBO's own features)
        or "thorough" (also one-step reconstructions and the model's feature
        network, at info()["thorough_evaluations_per_image"] evaluations per
        image; refused with FAILED_PRECONDITION unless
        info()["thorough_available"]); the records then get THOROUGH_FIELDS
        and, with anomaly_map=True, the local match map (where the image
        differs from the training images most like it).

        The images go in requests of `chunk` images (default: the server's
        max_images_per_request). With a seed, chunk c > 0 uses the seed
        (seed + c * 0x9E3779B97F4A7C15) mod 2**64 (the same seed for every
        chunk with shared_noise), as `vdm-client score` does, so the results
        match it; without one, chunk 0's server-chosen seed is the base.
        """
        method = _enum_value(vdm_pb2.ScoreMethod, "SCORE_METHOD_", method,
                             "method")
        ode = {"ode_steps": ode_steps, "trace_samples": trace_samples,
               "ode_max_evaluations": ode_max_evaluations}
        for name, value in ode.items():
            ode[name] = 0 if value is None else _int32(value, name)
        for name, value in (("ode_rtol", ode_rtol), ("ode_atol", ode_atol)):
            ode[name] = 0.0 if value is None else float(value)
        ode["dequantization"] = (
            0 if dequantization is None else
            _enum_value(vdm_pb2.Dequantization, "DEQUANTIZATION_",
                        dequantization, "dequantization"))
        for name, value in ode.items():
            if value != 0 and method != vdm_pb2.SCORE_METHOD_ODE:
                raise ValueError(f"{name} needs method='ode'")
        ode["time_sampling"] = (
            0 if time_sampling is None else
            _enum_value(vdm_pb2.TimeSampling, "TIME_SAMPLING_", time_sampling,
                        "time_sampling"))
        ode["anomaly_level"] = (
            0 if anomaly_level is None else
            _enum_value(vdm_pb2.AnomalyLevel, "ANOMALY_LEVEL_", anomaly_level,
                        "anomaly_level"))
        protos = [_image_to_proto(image, i) for i, image in enumerate(images)]
        if not protos:
            raise ValueError("score: no images")
        total = len(protos)
        if chunk is None:
            limit = self.info()["max_images_per_request"]
            chunk = limit if limit > 0 else total
        elif int(chunk) < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        chunk = int(chunk)
        base = _check_seed(seed)
        result = ScoreResult()
        for c, begin in enumerate(range(0, total, chunk)):
            end = min(total, begin + chunk)
            request = vdm_pb2.ScoreRequest(
                images=protos[begin:end], format=vdm_pb2.IMAGE_FORMAT_RAW,
                timesteps=int(timesteps), shared_noise=bool(shared_noise),
                anomaly_map=bool(anomaly_map), method=method,
                **ode)
            if base is not None:
                request.seed = base if shared_noise else _chunk_seed(base, c)
            if label is not None:
                request.label = int(label)
            if false_positive_rate is not None:
                request.false_positive_rate = float(false_positive_rate)
            where = (f"images {begin}..{end - 1} of {total}" if total > chunk
                     else None)
            response = self._call(self._stub.ScoreBPD, request, context=where)
            if len(response.scores) != end - begin:
                raise VdmError(grpc.StatusCode.INTERNAL,
                               f"sent {end - begin} images, the server "
                               f"returned {len(response.scores)} scores",
                               context=where)
            if base is None:
                base = response.seed
            for i, score in zip(range(begin, end), response.scores):
                row = _record(score, i)
                if anomaly_map:
                    row["anomaly_map"] = _anomaly_map(score, i, protos[i])
                result.append(row)
            result.network_evaluations += response.network_evaluations
            result.chunks += 1
            result.model_versions.append((response.model,
                                          response.model_version))
            result.batch_p_values.append(
                response.batch_p_value if response.HasField("batch_p_value")
                else None)
        result.seed = base
        return result
