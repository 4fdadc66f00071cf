"""Fit speed: images/s of the smooth-lens fit (`lensfit.fit_smooth_lens`) and the vortex fit (`lensfit.fit_vortex`)
with the sim2real study's own settings, on a device, at one or more fit batch sizes; and what the default study's
fits then cost.

The settings (starts, steps, refine, crop; the vortex fit's angles, lengths, steps, refine) and the study's image
counts are read from the `parameters` cell of `nbs/experiments/sim2real.ipynb`, so the figures follow the notebook.
The images are simulated `model_i` images (the classes cycle). Every figure is the median of `--repeat` timed calls
after one warm-up call on a few images; the retry of failed searches (`retry_above`) is included, as in the study.
On a GPU `--cpu-n` images are also fitted on the CPU, for the ratio `cuda_over_cpu` (same settings, same images).
Writes JSON (`--out DIR/bench_fit.json`), each figure as soon as it is measured ("complete": true once all are).
Run: python benchmarks/bench_fit.py [--device cuda] [--n 64] [--batches 32,256] [--vortex-n 16] [--cpu-n 8]
"""
import argparse, json, platform, time
from pathlib import Path
import numpy as np
import torch
from deeplense_nb.core import get_device
from deeplense_nb.experiments import experiment_path, notebook_parameters
from deeplense_nb.lensfit import fit_smooth_lens, fit_vortex
from deeplense_nb.simulate import simulate_batch

def _sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize()

def _rate(fn, n, dev, repeat, warmup):
    "Median images/s of `repeat` timed calls of fn() (n images each), after one call of warmup()."
    warmup(); _sync(dev); rates = []
    for _ in range(repeat):
        t0 = time.perf_counter(); fn(); _sync(dev); rates.append(n / (time.perf_counter() - t0))
    return float(np.median(rates)), [round(r, 3) for r in rates]

def study_counts(s: dict) -> dict:
    "How many smooth and vortex fits the sim2real notebook makes with the parameters `s` (15 real images, as the shared samples)."
    n_real, vf = 15, s["n_vortex_fit"]
    return {"smooth": s["n_sim"] + n_real + (s["n_shift"] if s["shift_preset"] else 0),
            "vortex": (vf + max(3, vf // 3) + n_real + (max(3, vf // 3) if s["shift_preset"] else 0)) if vf else 0}

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_results", help="folder for bench_fit.json")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps")
    p.add_argument("--n", type=int, default=None, help="images per timed smooth fit (default: 512 on CUDA, 16 on CPU)")
    p.add_argument("--batches", default=None, help="fit batch sizes to time, comma-separated (default: 32,256,1024 on CUDA, 32 on CPU)")
    p.add_argument("--vortex-n", type=int, default=None, help="images per timed vortex fit (default: 256 on CUDA, 4 on CPU; 0: skip)")
    p.add_argument("--cpu-n", type=int, default=8, help="on a GPU: images also fitted on the CPU for the ratio (0: skip)")
    p.add_argument("--repeat", type=int, default=1, help="timed calls per figure (the median is kept)")
    a = p.parse_args()
    dev = get_device(a.device); cuda = dev.type == "cuda"
    n = a.n or (512 if cuda else 16); vn = a.vortex_n if a.vortex_n is not None else (256 if cuda else 4)
    batches = [int(b) for b in (a.batches or ("32,256,1024" if cuda else "32")).split(",")]
    s = notebook_parameters(experiment_path("sim2real"))
    fit_kw = dict(starts=s["fit_starts"], steps=s["fit_steps"], refine=s["fit_refine"], crop=s["fit_crop"])
    vortex_kw = dict(angles=s["vortex_angles"], lengths=tuple(s["vortex_lengths"]), steps=s["vortex_steps"],
                     refine=s["vortex_refine"], crop=s["fit_crop"])
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    res = dict(benchmark="fit", machine=platform.processor() or platform.machine(), torch_threads=torch.get_num_threads(),
               device=str(dev), n=n, vortex_n=vn, repeat=a.repeat, settings={"fit": fit_kw, "vortex": vortex_kw},
               study_fits=study_counts(s), complete=False)
    if cuda: res["gpu"] = torch.cuda.get_device_name(dev)
    def record(**kw):
        res.update(kw); (out / "bench_fit.json").write_text(json.dumps(res, indent=2) + "\n")
    x = simulate_batch(max(n, vn, a.cpu_n), preset=s["preset"], seed=1)[0].numpy()
    smooth, vortex = {}, {}
    vfits = fit_smooth_lens(x[:vn], device=dev, **fit_kw) if vn else None   # the vortex fits start from these (untimed)
    for b in batches:
        fit = lambda m: fit_smooth_lens(x[:m], device=dev, batch=b, **fit_kw)
        smooth[b] = _rate(lambda: fit(n), n, dev, a.repeat, warmup=lambda: fit(min(n, 4)))
        record(smooth_img_per_s={str(k): v[0] for k, v in smooth.items()}, smooth_rates={str(k): v[1] for k, v in smooth.items()})
        print(f"smooth fit, batch {b}: {smooth[b][0]:.2f} img/s")
        if vn:
            vfit = lambda m: fit_vortex(x[:m], vfits[:m], device=dev, batch=b, **vortex_kw)
            vortex[b] = _rate(lambda: vfit(vn), vn, dev, a.repeat, warmup=lambda: vfit(min(vn, 2)))
            record(vortex_img_per_s={str(k): v[0] for k, v in vortex.items()}, vortex_rates={str(k): v[1] for k, v in vortex.items()})
            print(f"vortex fit, batch {b}: {vortex[b][0]:.2f} img/s")
    best = max(batches, key=lambda b: smooth[b][0]); bv = max(vortex, key=lambda b: vortex[b][0]) if vortex else None
    c = res["study_fits"]
    record(best_batch={"smooth": best, "vortex": bv},
           study_fit_s_estimate=c["smooth"] / smooth[best][0] + (c["vortex"] / vortex[bv][0] if bv else 0))
    if cuda and a.cpu_n:   # the same settings and images on the CPU, at the CPU's default batch
        cpu = torch.device("cpu")
        r = _rate(lambda: fit_smooth_lens(x[:a.cpu_n], device=cpu, **fit_kw), a.cpu_n, cpu, 1, warmup=lambda: None)[0]
        record(cpu_smooth_img_per_s=r, cuda_over_cpu=smooth[best][0] / r)
    record(complete=True)
    print(json.dumps(res, indent=2))

if __name__ == "__main__":
    main()
