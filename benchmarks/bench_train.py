"""Training-engine benchmark: the Learner against a plain PyTorch loop on the same model and data, in one run.

1. overhead    Learner (fp32) vs a plain seed-style loop (fp32): time ratio, target <= 1.03.
2. cpu_fast    Learner with bf16 autocast + channels_last vs the plain fp32 loop on the CPU: speed-up, target >= 1.3x.
3. gpu_fast    (CUDA only) Learner with AMP + channels_last + GPU-resident data vs the plain loop that feeds CPU batches
               from a DataLoader in fp32: speed-up, target >= 3x.

Each timed run trains `--epochs` epochs and validates once per epoch (loss + ROC-AUC on all validation images), from
the same initial weights; runs alternate and the fastest of `--repeats` counts (wall-clock and process CPU time are both reported). Writes OUT/bench_train.json.

    python benchmarks/bench_train.py --out bench_results [--quick]
"""
import argparse, json, os, sys, time
from pathlib import Path
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from deeplense_nb.core import env_info, seed_everything
from deeplense_nb.models import create_model
from deeplense_nb.training import Callback, Learner, roc_auc, accuracy
from deeplense_nb.callbacks import ChannelsLast, MixedPrecision, cpu_bf16_supported


def make_data(n, in_chans, size, num_classes, seed=0):
    "Random images whose class shifts the mean a little (enough for a non-trivial AUC)."
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = torch.randn(n, in_chans, size, size, generator=g) + 0.2 * y[:, None, None, None].float()
    return x, y


class DeviceBatches:
    "GPU-resident data: the whole set lives on the device; each epoch a device-side permutation picks the batches."
    def __init__(self, x, y, batch_size, *, shuffle, seed=0):
        self.x, self.y, self.bs, self.shuffle = x, y, batch_size, shuffle
        self.g = torch.Generator(device=x.device).manual_seed(seed)
    def __len__(self): return (len(self.x) + self.bs - 1) // self.bs
    def __iter__(self):
        n = len(self.x)
        idx = torch.randperm(n, device=self.x.device, generator=self.g) if self.shuffle else torch.arange(n, device=self.x.device)
        for i in range(0, n, self.bs):
            j = idx[i:i + self.bs]
            yield self.x[j], self.y[j]


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
        for k in runs: m = make_model(); m.load_state_dict(init); warmup(k)(m.to(dev)); sync(dev)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for bench_train.json")
    p.add_argument("--quick", action="store_true", help="smaller data and fewer repeats (a smoke run)")
    p.add_argument("--model", default="resnet20", help="registered model for the CPU comparisons (default: resnet20)")
    p.add_argument("--gpu-model", default="resnet18", help="registered model for the GPU comparison (default: resnet18)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default: 5, quick: 2)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per timed run (default: 1)")
    a = p.parse_args(argv)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    repeats = a.repeats or (2 if a.quick else 5)
    lr, wd, E = 1e-3, 1e-2, a.epochs
    res = {"env": env_info("cpu"), "settings": {"quick": a.quick, "repeats": repeats, "epochs": E, "model": a.model,
                                                 "threads": torch.get_num_threads()}}
    cpu = torch.device("cpu")

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

    # --- GPU: AMP + channels_last + GPU-resident data vs the plain loop ----------------------------------------------
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        n, size, bs = (1024, 64, 64) if a.quick else (8192, 150, 128)
        x, y = make_data(n, 1, size, 3); xv, yv = make_data(n // 8, 1, size, 3, seed=1)
        xg, yg, xvg, yvg = x.to(dev), y.to(dev), xv.to(dev), yv.to(dev)
        def make_gpu_model():
            seed_everything(0); return create_model(a.gpu_model, in_chans=1, num_classes=3)
        def cpu_loaders():
            return (DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(0)),
                    DataLoader(TensorDataset(xv, yv), batch_size=2 * bs))
        def gpu_loaders(): return DeviceBatches(xg, yg, bs, shuffle=True), DeviceBatches(xvg, yvg, 2 * bs, shuffle=False)
        print(f"GPU: {a.gpu_model}, {n} images 1x{size}x{size}, batch {bs}, {E} epochs ({torch.cuda.get_device_name(dev)})", flush=True)
        def gpu_variants(epochs):
            return {"plain": lambda m: plain_loop(m, *cpu_loaders(), epochs=epochs, lr=lr, wd=wd, dev=dev),
                    "fast": lambda m: learner_run(*gpu_loaders(), epochs=epochs, lr=lr, wd=wd, dev=dev, key="fast",
                                                  cbs=[MixedPrecision("auto"), ChannelsLast()])(m)}
        best, _, hist, _ = compare("gpu", make_gpu_model, gpu_variants(E), repeats=repeats, dev=dev, warmup=lambda k: gpu_variants(1)[k])
        speedup = best["plain"] / best["fast"]
        res["gpu_fast"] = {"plain_s": best["plain"], "fast_s": best["fast"], "speedup": speedup, "target_speedup_min": 3.0,
                           "meets_target": speedup >= 3.0, "gpu": torch.cuda.get_device_name(dev), "model": a.gpu_model,
                           "images": n, "img_size": size, "batch_size": bs,
                           "fast_path": "AMP (bf16/fp16) + channels_last + GPU-resident data",
                           "final_roc_auc": {k: v[-1]["roc_auc"] for k, v in hist.items()}}
        print(f"gpu fast path: {speedup:.2f}x", flush=True)
    else:
        res["gpu_fast"] = {"skipped": "CUDA is not available on this machine"}

    f = out / "bench_train.json"
    f.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
