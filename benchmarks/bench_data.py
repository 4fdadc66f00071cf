"""Data-loading throughput: per-file `np.load` (as in the public DeepLense notebooks) vs the packed store.

Writes N random float64 (1, 150, 150) files in the Task I layout to a temporary folder, then times one epoch
(batch 64, shuffled) through
  1. `seed`:   a Dataset whose __getitem__ does `torch.from_numpy(np.load(path))` + a DataLoader (batch 64), the
               pattern of the public DeepLense notebooks (batches converted with `.float()` as they do),
  2. `memmap`: `PackedDataset` (np.memmap) through `BatchLoader` (one fancy index per batch),
  3. `ram`:    the same store read into RAM (`in_memory=True`),
and writes images/s (the fastest of `--rounds` interleaved epochs per method), the ratios and the pack time to
OUT/bench_data.json.

    python benchmarks/bench_data.py --out bench_results [--n 3000] [--rounds 3]
"""
import argparse, json, os, platform, shutil, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deeplense_nb.data import BatchLoader, PackedDataset, pack


class SeedNpyDataset(Dataset):
    "The per-file pattern of the public DeepLense notebooks: one np.load per item."
    def __init__(self, files, labels): self.files, self.labels = files, labels
    def __len__(self): return len(self.files)
    def __getitem__(self, i): return torch.from_numpy(np.load(self.files[i])), self.labels[i]


def make_files(root: Path, n: int, seed: int = 0) -> tuple[list[Path], list[int]]:
    rng = np.random.default_rng(seed)
    files, labels = [], []
    per = [n // 3 + (i < n % 3) for i in range(3)]
    for label, (cls, k) in enumerate(zip(("no", "sphere", "vort"), per)):
        (root / "train" / cls).mkdir(parents=True)
        (root / "val" / cls).mkdir(parents=True)
        for i in range(1, k + 1):
            p = root / "train" / cls / f"{i}.npy"
            np.save(p, rng.random((1, 150, 150)))
            files.append(p); labels.append(label)
        np.save(root / "val" / cls / "1.npy", rng.random((1, 150, 150)))  # Task I needs a val split; not timed
    return files, labels


def epoch(loader, convert: bool) -> tuple[int, float]:
    "(images, seconds) of one pass over `loader`."
    n, t0 = 0, time.perf_counter()
    for x, y in loader:
        if convert: x = x.float()
        n += len(x)
    return n, time.perf_counter() - t0


def measure(loaders: dict, convert: dict, rounds: int) -> dict:
    "Images/s of every method, one epoch each per round, methods interleaved so that load changes hit all alike."
    rates = {k: [] for k in loaders}
    for r in range(rounds):
        for k, make in loaders.items():
            n, dt = epoch(make(r), convert[k])
            rates[k].append(n / dt)
    return rates


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_results", help="folder for bench_data.json")
    ap.add_argument("--n", type=int, default=3000, help="number of (1, 150, 150) float64 files")
    ap.add_argument("--batch-size", type=int, default=64, help="images per batch")
    ap.add_argument("--rounds", type=int, default=3, help="epochs per method, interleaved (the fastest of each is reported)")
    ap.add_argument("--tmp", default=None, help="where to write the temporary files (default: the system temp dir)")
    a = ap.parse_args(argv)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="dl_bench_data_", dir=a.tmp))
    try:
        root = tmp / "task1"
        t0 = time.perf_counter(); files, labels = make_files(root, a.n); t_write = time.perf_counter() - t0
        bs = a.batch_size

        seed_ds = SeedNpyDataset(files, labels)
        t0 = time.perf_counter(); res = pack(root, tmp / "task1.packed", progress=False); t_pack = time.perf_counter() - t0
        mm = PackedDataset(res, split="train")
        ram = PackedDataset(res, split="train", in_memory=True)
        assert len(mm) == len(ram) == len(seed_ds) == a.n
        loaders = {
            "seed": lambda r: DataLoader(seed_ds, batch_size=bs, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(r)),
            "memmap": lambda r: BatchLoader(mm, batch_size=bs, shuffle=True, seed=r),
            "ram": lambda r: BatchLoader(ram, batch_size=bs, shuffle=True, seed=r),
        }
        rates = measure(loaders, {"seed": True, "memmap": False, "ram": False}, a.rounds)
        best = {k: max(v) for k, v in rates.items()}
        r_seed, r_mm, r_ram = best["seed"], best["memmap"], best["ram"]

        result = {
            "benchmark": "data loading, one shuffled epoch, batch %d" % bs,
            "n_images": a.n, "image": [1, 150, 150], "source_dtype": "float64", "batch_size": bs, "rounds": a.rounds,
            "seed_npy_images_per_s": round(r_seed, 1),
            "packed_memmap_images_per_s": round(r_mm, 1),
            "packed_in_memory_images_per_s": round(r_ram, 1),
            "speedup_memmap": round(r_mm / r_seed, 2),
            "speedup_in_memory": round(r_ram / r_seed, 2),
            "target_speedup": 20.0,
            "all_rates_images_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
            "pack_seconds": round(t_pack, 3), "write_files_seconds": round(t_write, 3),
            "note": "files were just written, so all methods read from the page cache; first-epoch cold reads favour the store further",
            "env": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
        }
        (out / "bench_data.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("seed_npy_images_per_s", "packed_memmap_images_per_s",
                                                   "packed_in_memory_images_per_s", "speedup_memmap", "speedup_in_memory",
                                                   "pack_seconds")}, indent=2))
        print(f"wrote {out / 'bench_data.json'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
