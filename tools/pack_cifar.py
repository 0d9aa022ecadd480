"""Losslessly pack CIFAR-10 python batches small enough to carry to a remote GPU machine, and unpack.

MED (LOCO-I) prediction per plane, green-decorrelated residuals, then LZMA: ~1.7x smaller than gzip.
    python tools/pack_cifar.py pack SRC_BATCH_DIR OUT_DIR BATCH...
    python tools/pack_cifar.py unpack PACK_DIR... --out DEST_BATCH_DIR
"""
import argparse
import lzma
import pickle
import shutil
from pathlib import Path

import numpy as np


def predict(img: np.ndarray) -> np.ndarray:
    a = np.zeros_like(img); a[..., 1:] = img[..., :-1]
    b = np.zeros_like(img); b[..., 1:, :] = img[..., :-1, :]
    c = np.zeros_like(img); c[..., 1:, 1:] = img[..., :-1, :-1]
    hi, lo = np.maximum(a, b), np.minimum(a, b)
    return np.where(c >= hi, lo, np.where(c <= lo, hi, a + b - c))


def encode(data: np.ndarray) -> bytes:
    img = data.reshape(-1, 3, 32, 32).astype(np.int16)
    res = img - predict(img)
    res[:, 0] -= res[:, 1]
    res[:, 2] -= res[:, 1]
    return lzma.compress(res.astype(np.uint8).tobytes(), preset=9)


def decode(blob: bytes, n: int) -> np.ndarray:
    res = np.frombuffer(lzma.decompress(blob), dtype=np.uint8).reshape(n, 3, 32, 32).astype(np.int16)
    res = ((res + 128) % 256) - 128
    res[:, 0] += res[:, 1]
    res[:, 2] += res[:, 1]
    img = np.zeros((n, 3, 32, 32), dtype=np.int16)
    for y in range(32):  # raster order: each pixel's predictor needs its left/up/up-left neighbours
        for x in range(32):
            a = img[:, :, y, x - 1] if x else 0 * img[:, :, 0, 0]
            b = img[:, :, y - 1, x] if y else 0 * img[:, :, 0, 0]
            c = img[:, :, y - 1, x - 1] if x and y else 0 * img[:, :, 0, 0]
            hi, lo = np.maximum(a, b), np.minimum(a, b)
            p = np.where(c >= hi, lo, np.where(c <= lo, hi, a + b - c))
            img[:, :, y, x] = (p + res[:, :, y, x]) % 256
    return img.astype(np.uint8).reshape(n, 3072)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["pack", "unpack"])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.mode == "pack":
        src, out, names = Path(args.paths[0]), Path(args.paths[1]), args.paths[2:]
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            batch = pickle.load(open(src / name, "rb"), encoding="latin1")
            data = np.asarray(batch["data"], dtype=np.uint8)
            (out / f"{name}.lz").write_bytes(encode(data))
            np.save(out / f"{name}.labels.npy", np.asarray(batch["labels"], dtype=np.int64))
            assert np.array_equal(decode((out / f"{name}.lz").read_bytes(), len(data)), data)
            print(name, (out / f"{name}.lz").stat().st_size)
    else:
        dest = Path(args.out)
        dest.mkdir(parents=True, exist_ok=True)
        for folder in map(Path, args.paths):
            for lz in sorted(folder.glob("*.lz")):
                name = lz.name[:-3]
                labels = np.load(folder / f"{name}.labels.npy")
                data = decode(lz.read_bytes(), len(labels))
                with open(dest / name, "wb") as fh:
                    pickle.dump({"data": data, "labels": labels.tolist(), "batch_label": name}, fh, protocol=2)
            for meta in folder.glob("batches.meta"):
                shutil.copy(meta, dest / "batches.meta")


if __name__ == "__main__":
    main()
