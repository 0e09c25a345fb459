#!/usr/bin/env python3
"""Writes the fuzzers' seed corpora into tests/fuzz/corpus/<target>/.

Run once by hand (the files are checked in): python3 tests/fuzz/make_corpus.py
PNGs and IDX files are written with zlib by hand, requests with
`protoc --encode` from text format. The whole corpus stays a few KB.
"""
import gzip
import os
import struct
import subprocess
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CORPUS = os.path.join(HERE, "corpus")


def png(width, height, color_type, rows, bit_depth=8, interlace=0, extra=()):
    """A PNG from already-filtered scanlines (filter byte + pixels each)."""
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(
            ">I", zlib.crc32(body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0,
                       interlace)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    for kind, data in extra:
        out += chunk(kind, data)
    out += chunk(b"IDAT", zlib.compress(b"".join(rows), 9)) + chunk(b"IEND", b"")
    return out


def gradient(width, height, channels, filt=0):
    return [bytes([filt]) + bytes((x * 7 + y * 13 + c * 50) % 256
                                  for x in range(width) for c in range(channels))
            for y in range(height)]


def idx(dims, data):
    return struct.pack(">BBBB", 0, 0, 8, len(dims)) + b"".join(
        struct.pack(">I", d) for d in dims) + bytes(data)


def protoc_encode(message, text):
    return subprocess.run(
        ["protoc", "--proto_path=" + os.path.join(ROOT, "proto"),
         "--encode=vdm.v1." + message, "vdm/v1/vdm.proto"],
        input=text.encode(), stdout=subprocess.PIPE, check=True).stdout


def text_bytes(data):
    return '"' + "".join("\\%03o" % b for b in data) + '"'


def write(target, name, data):
    os.makedirs(os.path.join(CORPUS, target), exist_ok=True)
    with open(os.path.join(CORPUS, target, name), "wb") as f:
        f.write(data)


def main():
    gray28 = png(28, 28, 0, gradient(28, 28, 1))
    pngs = {
        "gray-28x28.png": gray28,
        "rgb-8x8.png": png(8, 8, 2, gradient(8, 8, 3, filt=1)),
        "gray-4x3-paeth.png": png(4, 3, 0, gradient(4, 3, 1, filt=4)),
        "gray-1bit-8x2.png": png(8, 2, 0, [b"\x00\xa5", b"\x00\x5a"],
                                 bit_depth=1),
        "rgba-3x2.png": png(3, 2, 6, gradient(3, 2, 4, filt=2)),
        "gray16-2x2.png": png(2, 2, 0, gradient(2, 2, 2), bit_depth=16),
        "palette-trns-2x2.png": png(
            2, 2, 3, [b"\x00\x00\x01", b"\x00\x01\x00"],
            extra=((b"PLTE", b"\xff\x00\x00\x00\xff\x00"), (b"tRNS", b"\x80"))),
        "rgb-interlaced-5x5.png": None,  # filled below
    }
    # Adam7: 7 passes of (filter byte + pixels) rows for a 5x5 RGB image.
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
              (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    rows = []
    for x0, y0, dx, dy in passes:
        w = len(range(x0, 5, dx))
        h = len(range(y0, 5, dy))
        if w and h:
            rows += [b"\x00" + bytes((i * 31 + j) % 256 for i in range(w * 3))
                     for j in range(h)]
    pngs["rgb-interlaced-5x5.png"] = png(5, 5, 2, rows, interlace=1)
    for name, data in pngs.items():
        write("png_fuzzer", name, data)

    images = idx([3, 4, 5], range(60))
    write("idx_fuzzer", "images-3x4x5.idx", images)
    write("idx_fuzzer", "images-3x4x5.idx.gz", gzip.compress(images, mtime=0))
    write("idx_fuzzer", "labels-6.idx", idx([6], [0, 1, 2, 7, 8, 9]))
    write("idx_fuzzer", "empty-0x28x28.idx", idx([0, 28, 28], []))
    write("idx_fuzzer", "truncated-2x2x2.idx", idx([2, 2, 2], range(5)))

    raw = bytes((i * 3) % 256 for i in range(784))
    requests = {
        "sample-ddim.bin": ("SampleRequest",
                            "num_images: 4 sampler: SAMPLER_DDIM steps: 50 "
                            "eta: 0.5 seed: 7"),
        "sample-guided.bin": ("SampleRequest",
                              "num_images: 2 sampler: SAMPLER_HEUN steps: 20 "
                              "guidance_scale: 3 label: 7 format: IMAGE_FORMAT_RAW "
                              "preview_every: 5 time_grid: TIME_GRID_UNIFORM_LOG_SNR"),
        "sample-dpm.bin": ("SampleRequest",
                           "num_images: 64 sampler: SAMPLER_DPM_SOLVER_2M "
                           "steps: 1000"),
        "score-png.bin": ("ScoreRequest",
                          "images { data: %s } timesteps: 16 seed: 1 label: 3"
                          % text_bytes(gray28)),
        "score-raw.bin": ("ScoreRequest",
                          "images { data: %s channels: 1 height: 28 width: 28 } "
                          "images { data: %s } format: IMAGE_FORMAT_RAW "
                          "timesteps: 2 shared_noise: true"
                          % (text_bytes(raw), text_bytes(raw))),
        "image-raw-rgb.bin": ("Image",
                              "data: %s channels: 3 height: 8 width: 8"
                              % text_bytes(bytes(range(192)))),
        "image-png.bin": ("Image", "data: %s" % text_bytes(pngs["rgb-8x8.png"])),
    }
    for name, (message, text) in requests.items():
        write("validation_fuzzer", name, protoc_encode(message, text))

    metadata = {
        "fmnist.json": '{"dataset": {"name": "fashion-mnist", "train_images": '
                       '60000}, "steps": 20000, "test_bpd": 3.25, '
                       '"test": {"bpd": 3.25, "prior_bpd": 0.001}, '
                       '"training": {"trainer": "vdm-train", "steps": 300}, '
                       '"training_history": [{"steps": 100}]}',
        "classes.json": '{"classes": ["T-shirt/top", "Trouser", "Pullover", '
                        '"Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", '
                        '"Ankle boot"], "test_accuracy": 0.91}',
        "minimal.json": '{"test_bpd": 1e2, "steps": -3}',
        "not-object.json": '[1, 2.5e-3, "x\\u00e9", null, true, false]',
        "empty.json": '',
    }
    for name, text in metadata.items():
        write("metadata_fuzzer", name, text.encode())


if __name__ == "__main__":
    main()
