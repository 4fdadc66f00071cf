"""Training-engine benchmark: the Learner against a plain PyTorch loop on the same model and data, in one run.

1. overhead    Learner (fp32) vs a plain seed-style loop (fp32): time ratio, target <= 1.03.
2. cpu_fast    Learner with bf16 autocast + channels_last vs the plain fp32 loop on the CPU: speed-up, target >= 1.3x.
3. device_path (any device; `--device`) at a realistic size (default on CUDA: 8,192 + 1,024 images 1x150x150, ResNet-18,
               batch 128; on CPU: 1,536 + 192 images 1x64x64, batch 64) from a folder of .npy files, three ways:
               plain     a seed-style fp32 loop fed by a torch DataLoader reading files, D4 augmentation on the CPU;
               ordinary  the Learner with AMP + channels_last fed by `get_dataloaders(device_data="off")` (the demo before);
               resident  the Learner with AMP + channels_last (+ `--compile`) fed by `get_dataloaders(device_data="on")`:
                         the data held on the device, batches drawn and augmented there.
               Ratios resident/plain and resident/ordinary (target on CUDA >= 3x over plain); images/s of each.

Each timed run trains `--epochs` epochs and validates once per epoch (loss + ROC-AUC on all validation images), from
the same initial weights; runs alternate and the fastest of `--repeats` counts (wall-clock and process CPU time are both reported). Writes OUT/bench_train.json.

    python benchmarks/bench_train.py --out bench_results [--quick] [--device cuda] [--sections device_path]
"""
import argparse, json, os, shutil, sys, tempfile, time
from pathlib import Path
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from deeplense_nb.core import env_info, get_device, seed_everything
from deeplense_nb.data import FolderDataset, RandomD4, get_dataloaders, make_toy_dataset
from deeplense_nb.models import create_model
from deeplense_nb.training import Callback, Learner, roc_auc, accuracy
from deeplense_nb.callbacks import ChannelsLast, MixedPrecision, TorchCompile, cpu_bf16_supported


def make_data(n, in_chans, size, num_classes, seed=0):
    "Random images whose class shifts the mean a little (enough for a non-trivial AUC)."
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = torch.randn(n, in_chans, size, size, generator=g) + 0.2 * y[:, None, None, None].float()
    return x, y


def sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize(dev)


STEP_TIMES = {}  # variant -> seconds of every training iteration (batch fetch + forward/backward/step) of the last run

def plain_loop(model, tdl, vdl, *, epochs, lr, wd, dev, key="plain"):
    "A seed-style loop: fp32, batches moved to the device one by one, loss.item() per batch, AUC per epoch."
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    hist, steps = [], STEP_TIMES.setdefault(key, [])
    steps.clear()
    for _ in range(epochs):
        model.train(); tot, n = 0.0, 0
        t = time.perf_counter()
        for x, y in tdl:
            x, y = x.to(dev), y.to(dev)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward(); opt.step()
            tot += loss.item() * len(y); n += len(y)
            now = time.perf_counter(); steps.append(now - t); t = now
        model.eval(); probs, targs = [], []
        with torch.no_grad():
            for x, y in vdl:
                probs.append(torch.softmax(model(x.to(dev)), 1).cpu()); targs.append(y)
        p, t = torch.cat(probs).numpy(), torch.cat(targs).numpy()
        hist.append({"train_loss": tot / n, "roc_auc": roc_auc(p, t)})
    return hist


def compare(name, make_model, runs, *, repeats, dev, warmup=None, quiet=False):
    """Time each variant (fresh model, same initial weights) `repeats` times, alternating the order every repeat;
    keep the fastest wall and process-CPU time. `warmup(variant)` runs each once untimed first (lazy init, caches)."""
    init = make_model().state_dict()
    if warmup is not None:
        for k in runs:
            t0 = time.perf_counter(); m = make_model(); m.load_state_dict(init); warmup(k)(m.to(dev)); sync(dev)
            if not quiet: print(f"  [{name}] warm-up {k:>8}: wall {time.perf_counter() - t0:.3f}s", flush=True)
    wall = {k: float("inf") for k in runs}; cpu = dict(wall); result = {}; steps = {k: [] for k in runs}
    for r in range(repeats):
        for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            m = make_model(); m.load_state_dict(init); m.to(dev); sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            hist = runs[k](m); sync(dev)
            t, c = time.perf_counter() - t0, time.process_time() - c0
            wall[k], cpu[k] = min(wall[k], t), min(cpu[k], c); result[k] = hist; steps[k] += STEP_TIMES.get(k, [])
            if not quiet: print(f"  [{name}] repeat {r + 1}/{repeats} {k:>8}: wall {t:.3f}s cpu {c:.3f}s  final "
                  f"{({a: round(b, 4) for a, b in hist[-1].items()})}", flush=True)
    med = {k: {"median": float(np.median(v)), "p25": float(np.percentile(v, 25)), "min": float(np.min(v)), "n": len(v)}
           if v else None for k, v in steps.items()}
    return wall, cpu, result, med


class StepTimes(Callback):
    "Seconds of every training iteration, measured like the plain loop: from one batch's end to the next's."
    order = 10 ** 6
    def __init__(self, key): self.key = key
    def before_fit(self): self.steps = STEP_TIMES.setdefault(self.key, []); self.steps.clear()
    def before_train(self): self.t = time.perf_counter()
    def after_batch(self):
        if self.learn.training:
            now = time.perf_counter(); self.steps.append(now - self.t); self.t = now

def learner_run(tdl, vdl, *, epochs, lr, wd, dev, cbs=(), progress=False, key="learner"):
    def run(m):
        learn = Learner(m, tdl, vdl, loss_func=nn.CrossEntropyLoss(), lr=lr, wd=wd, metrics=[roc_auc], cbs=[*cbs, StepTimes(key)],
                        device=dev, progress=progress)
        learn.fit(epochs)
        return [{"train_loss": h["train_loss"], "roc_auc": h["roc_auc"]} for h in learn.history]
    return run


def dispatch_overhead(*, n_batches=200, epochs=3, repeats=7):
    "Fixed per-batch cost of the Learner (events, callbacks, bookkeeping): a tiny linear model, many batches, best of many runs."
    x, y = torch.randn(n_batches * 64, 16), torch.randint(0, 3, (n_batches * 64,))
    xv, yv = torch.randn(512, 16), torch.randint(0, 3, (512,))
    def loaders(): return (DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)),
                           DataLoader(TensorDataset(xv, yv), batch_size=128))
    def make(): seed_everything(0); return nn.Linear(16, 3)
    cpu = torch.device("cpu")
    runs = {"plain": lambda m: plain_loop(m, *loaders(), epochs=epochs, lr=1e-3, wd=1e-2, dev=cpu),
            "learner": lambda m: learner_run(*loaders(), epochs=epochs, lr=1e-3, wd=1e-2, dev=cpu)(m)}
    _, _, _, med = compare("dispatch", make, runs, repeats=repeats, dev=cpu, warmup=lambda k: runs[k], quiet=True)
    return {"plain_us_per_batch": 1e6 * med["plain"]["median"], "learner_us_per_batch": 1e6 * med["learner"]["median"],
            "overhead_us_per_batch": 1e6 * (med["learner"]["median"] - med["plain"]["median"]),
            "measure": "median training-iteration time, tiny Linear model"}


class CpuD4Loader:
    "The plain loop's data: a torch DataLoader reading one .npy file per item, a random D4 element per image on the CPU."
    def __init__(self, ds, bs, *, shuffle, aug, seed=0):
        self.dl = DataLoader(ds, batch_size=bs, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))
        self.aug = RandomD4(seed=seed) if aug else None
    def __len__(self): return len(self.dl)
    def __iter__(self):
        for x, y in self.dl: yield (self.aug(x) if self.aug is not None else x), y


def device_path(a, dev: torch.device, *, repeats: int, epochs: int) -> dict:
    "Plain fp32 file-reading loop vs the ordinary Learner path vs the device-resident path, on `dev`, same model and data."
    cuda = dev.type == "cuda"
    n, size, bs = (a.n or (8192 if cuda else 1536)), (a.size or (150 if cuda else 64)), (a.batch or (128 if cuda else 64))
    if a.quick and not (a.n or a.size): n, size = (2048, 150) if cuda else (768, 64)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        t0 = time.perf_counter()
        root = make_toy_dataset(tmp / "toy", layout="task1", n_per_class=n // 3, n_val_per_class=max(1, n // 24), img_size=size)
        write_s = time.perf_counter() - t0
        ds = FolderDataset(root)
        tr, va = ds.take_split("train"), ds.take_split("val")
        if cuda: torch.backends.cudnn.benchmark = True
        amp = "auto" if cuda else ("bf16" if cpu_bf16_supported() else None)
        fast = lambda: [*([MixedPrecision(amp)] if amp else []), ChannelsLast(), *([TorchCompile()] if a.compile else [])]
        t0 = time.perf_counter(); ordinary = get_dataloaders(root, batch_size=bs, seed=0, device_data="off"); t_ord = time.perf_counter() - t0
        t0 = time.perf_counter(); resident = get_dataloaders(root, batch_size=bs, seed=0, device=dev, device_data="on"); sync(dev)
        t_res = time.perf_counter() - t0
        def make(): seed_everything(0); return create_model(a.gpu_model, in_chans=1, num_classes=3)
        print(f"device path: {a.gpu_model}, {len(tr)} + {len(va)} images 1x{size}x{size} (.npy files), batch {bs}, {epochs} epoch(s), "
              f"{dev} ({torch.cuda.get_device_name(dev) if cuda else f'{torch.get_num_threads()} threads'}); amp {amp}, "
              f"compile {a.compile}; loading onto the device took {t_res:.1f}s", flush=True)
        def variants(E):
            return {"plain": lambda m: plain_loop(m, CpuD4Loader(tr, bs, shuffle=True, aug=True), CpuD4Loader(va, 2 * bs, shuffle=False, aug=False),
                                                  epochs=E, lr=1e-3, wd=1e-2, dev=dev),
                    "ordinary": lambda m: learner_run(ordinary.train, ordinary.valid, epochs=E, lr=1e-3, wd=1e-2, dev=dev, cbs=fast(), key="ordinary")(m),
                    "resident": lambda m: learner_run(resident.train, resident.valid, epochs=E, lr=1e-3, wd=1e-2, dev=dev, cbs=fast(), key="resident")(m)}
        wall, cput, hist, med = compare("device", make, variants(epochs), repeats=repeats, dev=dev, warmup=lambda k: variants(1)[k])
    finally: shutil.rmtree(tmp, ignore_errors=True)
    ips = {k: epochs * len(tr) / wall[k] for k in wall}
    step_ips = {k: bs / med[k]["median"] for k in med if med[k]}
    res = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if cuda else None, "model": a.gpu_model,
           "train_images": len(tr), "valid_images": len(va), "img_size": size, "batch_size": bs, "epochs": epochs, "amp": amp,
           "compile": a.compile, "seconds": wall, "cpu_seconds": cput, "images_per_s": ips,
           "cpu_time_speedup_resident_vs_plain": cput["plain"] / cput["resident"], "train_step_images_per_s": step_ips,
           "speedup_resident_vs_plain": wall["plain"] / wall["resident"], "speedup_resident_vs_ordinary": wall["ordinary"] / wall["resident"],
           "step_speedup_resident_vs_plain": step_ips["resident"] / step_ips["plain"],
           "load_onto_device_s": t_res, "open_ordinary_s": t_ord, "write_files_s": write_s,
           "final_roc_auc": {k: v[-1]["roc_auc"] for k, v in hist.items()},
           "note": "seconds: fastest whole fit (train + one validation pass per epoch) of the repeats; images_per_s: training images / "
                   "that time; train_step_images_per_s: batch / median training-iteration time"}
    if cuda: res.update(target_speedup_min=3.0, meets_target=res["speedup_resident_vs_plain"] >= 3.0)
    print(f"device path: resident {ips['resident']:.0f} img/s, ordinary {ips['ordinary']:.0f}, plain {ips['plain']:.0f}: "
          f"{res['speedup_resident_vs_plain']:.2f}x over plain, {res['speedup_resident_vs_ordinary']:.2f}x over ordinary", flush=True)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for bench_train.json")
    p.add_argument("--quick", action="store_true", help="smaller data and fewer repeats (a smoke run)")
    p.add_argument("--model", default="resnet20", help="registered model for the CPU comparisons (default: resnet20)")
    p.add_argument("--gpu-model", default="resnet18", help="registered model for the GPU comparison (default: resnet18)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default: 5, quick: 2)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per timed run (default: 1)")
    p.add_argument("--device", default="auto", help="device of the device_path section: auto|cpu|cuda|cuda:N")
    p.add_argument("--sections", default="overhead,cpu_fast,device_path", help="comma-separated sections to run")
    p.add_argument("--n", type=int, default=None, help="device_path: training images (default 8192 on CUDA, 1536 on CPU)")
    p.add_argument("--size", type=int, default=None, help="device_path: image side (default 150 on CUDA, 64 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="device_path: batch size (default 128 on CUDA, 64 on CPU)")
    p.add_argument("--compile", action="store_true", help="device_path: torch.compile the model in the fast variants")
    a = p.parse_args(argv)
    sections = set(a.sections.split(","))
    bad = sections - {"overhead", "cpu_fast", "device_path"}
    if bad: p.error(f"unknown section(s) {sorted(bad)}; choose from overhead, cpu_fast, device_path")
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    repeats = a.repeats or (2 if a.quick else 5)
    lr, wd, E = 1e-3, 1e-2, a.epochs
    res = {"env": env_info("cpu"), "settings": {"quick": a.quick, "repeats": repeats, "epochs": E, "model": a.model,
                                                 "threads": torch.get_num_threads()}}
    cpu = torch.device("cpu")

    if sections & {"overhead", "cpu_fast"}:
        # --- CPU: same model and data for the overhead and the fast-path comparisons -----------------------------------
        n, size, bs = (64, 32, 32) if a.quick else (512, 40, 32)
        x, y = make_data(n, 1, size, 3)
        xv, yv = make_data(n // 4, 1, size, 3, seed=1)
        def loaders():
            g = torch.Generator().manual_seed(0)
            return (DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, generator=g),
                    DataLoader(TensorDataset(xv, yv), batch_size=2 * bs))
        def make_model():
            seed_everything(0); return create_model(a.model, in_chans=1, num_classes=3)
        print(f"CPU: {a.model}, {n} images 1x{size}x{size}, batch {bs}, {E} epochs, {torch.get_num_threads()} threads", flush=True)

        fast_cbs = lambda: [MixedPrecision("bf16"), ChannelsLast()]
        def variants(epochs):
            return {"plain": lambda m: plain_loop(m, *loaders(), epochs=epochs, lr=lr, wd=wd, dev=cpu),
                    "learner": lambda m: learner_run(*loaders(), epochs=epochs, lr=lr, wd=wd, dev=cpu)(m),
                    "fast": lambda m: learner_run(*loaders(), epochs=epochs, lr=lr, wd=wd, dev=cpu, cbs=fast_cbs(), key="fast")(m)}
        wall, cput, hist, med = compare("cpu", make_model, variants(E), repeats=repeats, dev=cpu, warmup=lambda k: variants(1)[k])
        auc = {k: v[-1]["roc_auc"] for k, v in hist.items()}
        ratio, cratio = wall["learner"] / wall["plain"], cput["learner"] / cput["plain"]
        res["overhead"] = {"plain_s": wall["plain"], "learner_s": wall["learner"], "ratio": ratio, "overhead_pct": 100 * (ratio - 1),
                           "plain_cpu_s": cput["plain"], "learner_cpu_s": cput["learner"], "cpu_time_ratio": cratio,
                           "target_ratio_max": 1.03, "meets_target": ratio <= 1.03, "final_roc_auc": {k: auc[k] for k in ("plain", "learner")},
                           "step_s": {k: med[k] for k in ("plain", "learner")},
                           "step_ratio": {q: med["learner"][q] / med["plain"][q] for q in ("median", "p25", "min")},
                           "note": "wall/cpu: fastest whole run of the repeats; step_*: statistics of every training iteration over all repeats "
                                   "(min/p25 are the most robust on a busy machine). Learner with its default Recorder, progress bars off"}
        print(f"overhead: Learner/plain = {ratio:.3f} wall ({100 * (ratio - 1):+.1f}%), {cratio:.3f} cpu time, "
              f"steps: {med['learner']['median'] / med['plain']['median']:.3f} median, {med['learner']['p25'] / med['plain']['p25']:.3f} p25, "
              f"{med['learner']['min'] / med['plain']['min']:.3f} min", flush=True)
        d = dispatch_overhead(n_batches=50 if a.quick else 200, repeats=3 if a.quick else 7)
        d["plain_s_per_batch_real_model"] = med["plain"]["median"]
        d["projected_overhead_pct"] = 100 * d["overhead_us_per_batch"] * 1e-6 / d["plain_s_per_batch_real_model"]
        res["overhead"]["dispatch"] = d
        print(f"dispatch: Learner costs {d['overhead_us_per_batch']:.0f} us more per batch than the plain loop "
              f"(tiny model: {d['plain_us_per_batch']:.0f} vs {d['learner_us_per_batch']:.0f} us); on {a.model} that is "
              f"{d['projected_overhead_pct']:.2f}% of a {1e3 * d['plain_s_per_batch_real_model']:.0f} ms batch", flush=True)
        bf16_native = cpu_bf16_supported()
        speedup, cspeed = wall["plain"] / wall["fast"], cput["plain"] / cput["fast"]
        res["cpu_fast"] = {"plain_s": wall["plain"], "fast_s": wall["fast"], "speedup": speedup, "cpu_time_speedup": cspeed,
                           "step_s": {k: med[k] for k in ("plain", "fast")},
                           "step_speedup": {q: med["plain"][q] / med["fast"][q] for q in ("median", "p25", "min")},
                           "target_speedup_min": 1.3, "meets_target": speedup >= 1.3, "cpu_native_bf16": bf16_native,
                           "fast_path": "Learner + bf16 autocast + channels_last", "final_roc_auc": {k: auc[k] for k in ("plain", "fast")}}
        print(f"cpu fast path (bf16 + channels_last, native bf16: {bf16_native}): {speedup:.2f}x wall, {cspeed:.2f}x cpu time, "
              f"steps: {med['plain']['median'] / med['fast']['median']:.2f}x median, {med['plain']['min'] / med['fast']['min']:.2f}x min", flush=True)

    # --- the device-resident path against the plain file-reading loop, at a realistic size --------------------------
    if "device_path" in sections:
        res["device_path"] = device_path(a, get_device(a.device), repeats=a.repeats or 2, epochs=E)

    f = out / "bench_train.json"
    f.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
