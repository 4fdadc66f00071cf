"""Simulator speed: images/s for Model I (all three classes) and lens finding, batched engine vs per-image vs lenstronomy.

Three engines in the same run, end to end (drawing the parameters, rendering, noise, min-max): the batched engine
(`simbatch.simulate_images`, counter-based randomness), the per-image reference (`simulate.sample_truth` +
`simulate.render`) and lenstronomy (when installed). Every figure is the median of `--repeat` timed calls after a
warm-up; batched vs per-image compare whole pipelines (drawing included), ours vs lenstronomy compare rendering from
the same drawn parameters (noise and min-max included). Ratios go into the JSON. `--train-model` also times training
steps of a classifier on the same images, so the JSON says whether the simulator can feed training
(`sim_over_train` >= 2 means a fresh-simulation stream keeps the model busy less than half the time).

lenstronomy is the engine DeepLenseSim used to make the real Task I data; the comparison renders the same physics
(SIE + external shear, 25 point-mass subhalos or a 100-point vortex, elliptical Sersic source, the preset's PSF (a Gaussian core + wing for model_i),
Poisson noise) at the same size with both codes; `batched_over_lenstronomy` is the median ratio of rounds that time one
batched call and one lenstronomy call back to back (max(--repeat, 3) rounds). Writes JSON (`--out DIR/bench_simulate.json`).
Run: python benchmarks/bench_simulate.py [--n 768] [--n-per-image N] [--batch B] [--device cuda] [--repeat 3] [--train-model resnet18]
Every figure is written to the JSON as soon as it is measured ("complete": true once all are).
"""
import argparse, json, math, platform, time
from pathlib import Path
import numpy as np
import torch
from deeplense_nb.simulate import (get_preset, sample_truth, image_rng, render, CLASSES_T1, LensFindingPreset,
                                   sample_lens_finding, render_lens_finding)
from deeplense_nb.simbatch import simulate_images, sim_batch_size

def _sync(device):
    if str(device).startswith("cuda"): torch.cuda.synchronize()

def _best_rate(fn, n, device, repeat, warmup=None):
    "Median images/s of `repeat` timed calls of fn() (which makes n images), after one warm-up call (of `warmup` if given)."
    (warmup or fn)(); _sync(device); rates = []
    for _ in range(repeat):
        t0 = time.perf_counter(); fn(); _sync(device); rates.append(n / (time.perf_counter() - t0))
    return float(np.median(rates)), [round(r, 2) for r in rates]

def bench_batched(n, device, repeat, preset="model_i", batch=128):
    return _best_rate(lambda: simulate_images(n, preset, seed=0, split="bench", device=device, batch_size=batch), n, device, repeat)

def bench_per_image(n, device, repeat, batch=120):
    "The per-image reference end to end: numpy draws per image, batched render, per-image numpy Poisson noise."
    p = get_preset("model_i")
    def run():
        truth = [sample_truth(p, CLASSES_T1[i % 3], image_rng(0, "bench", CLASSES_T1[i % 3], i)) for i in range(n)]
        for b in range(0, n, batch): render(truth[b:b + batch], p, device=device)
    return _best_rate(run, n, device, repeat)

def bench_train(model_name, device, repeat, batch=32, steps=4):
    "Training images/s of a classifier (forward, backward, AdamW step) on 150 x 150 single-band batches."
    from deeplense_nb.models import create_model
    net = create_model(model_name, in_chans=1, num_classes=3).to(device); opt = torch.optim.AdamW(net.parameters(), 1e-3)
    x, y = torch.rand(batch, 1, 150, 150, device=device), torch.arange(batch, device=device) % 3
    def run():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(net(x), y); opt.zero_grad(); loss.backward(); opt.step()
    return _best_rate(run, batch * steps, device, repeat)

def bench_render(n, device, repeat, batch=120):
    "Our per-image renderer from drawn truth (noise and min-max included, drawing excluded): like for like with lenstronomy."
    p = get_preset("model_i")
    truth = [sample_truth(p, CLASSES_T1[i % 3], image_rng(0, "bench", CLASSES_T1[i % 3], i)) for i in range(n)]
    run = lambda: [render(truth[b:b + batch], p, device=device) for b in range(0, n, batch)]
    return (*_best_rate(run, n, device, repeat), truth)

def bench_lens_finding_per_image(n, device, repeat):
    "The per-image lens-finding reference end to end (numpy draws, then one render per image), like the batched figure."
    p = LensFindingPreset()
    def run():
        for i in range(n): render_lens_finding(sample_lens_finding(p, i % 2 == 0, image_rng(0, "bench", i)), p, device=device)
    return _best_rate(run, n, device, repeat)

def _lenstronomy_images(truth):
    "The same Model I images rendered by lenstronomy's ImageModel, the way DeepLenseSim does."
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.ImSim.image_model import ImageModel
    import lenstronomy.Util.param_util as pu
    from deeplense_nb.physics import gaussian_psf
    from deeplense_nb.simulate import _theta_E_pm
    p = get_preset("model_i")
    data = ImageData(image_data=np.zeros((p.npix, p.npix)), background_rms=0.0, exposure_time=1.0,
                     ra_at_xy_0=-(p.npix - 1) / 2 * p.pixel_scale, dec_at_xy_0=-(p.npix - 1) / 2 * p.pixel_scale,
                     transform_pix2angle=np.eye(2) * p.pixel_scale)
    if p.psf_wing:   # the core + wings PSF as one pixel kernel
        size = gaussian_psf(p.psf_wing[1], p.pixel_scale).shape[-1]
        k = sum(w * gaussian_psf(f, p.pixel_scale, size=size, dtype=torch.float64) for w, f in ((1 - p.psf_wing[0], p.psf_fwhm), p.psf_wing))
        psf = PSF(psf_type="PIXEL", kernel_point_source=k.numpy())
    else: psf = PSF(psf_type="GAUSSIAN", fwhm=p.psf_fwhm, pixel_size=p.pixel_scale, truncation=4)
    src = LightModel(["SERSIC_ELLIPSE"])
    rng = np.random.default_rng(0)
    for t in truth:
        names = ["SIE", "SHEAR"]
        e1, e2 = pu.phi_q2_ellipticity(t["phi"], t["q"])
        kw = [dict(theta_E=t["theta_E"], e1=e1, e2=e2, center_x=t["x0"], center_y=t["y0"]), dict(gamma1=t["gamma1"], gamma2=t["gamma2"])]
        if "sub_mass" in t:
            for m, x, y in zip(t["sub_mass"], t["sub_x"], t["sub_y"]):
                names.append("POINT_MASS"); kw.append(dict(theta_E=_theta_E_pm(1.0, p.z_l, p.z_s) * math.sqrt(m), center_x=x, center_y=y))
        elif "vort_length" in t:
            r = np.linspace(-0.5, 0.5, p.vort_n) * t["vort_length"]
            te = _theta_E_pm(t["vort_mass"] / p.vort_n, p.z_l, p.z_s)
            for xi, yi in zip(r * math.cos(t["vort_angle"]), r * math.sin(t["vort_angle"])):
                names.append("POINT_MASS"); kw.append(dict(theta_E=te, center_x=xi, center_y=yi))
        se1, se2 = pu.phi_q2_ellipticity(t["src_phi"], t["src_q"])
        model = ImageModel(data, psf, lens_model_class=LensModel(names), source_model_class=src)
        img = model.image(kw, [dict(amp=1.0, R_sersic=t["src_R_e"], n_sersic=t["src_n"], e1=se1, e2=se2,
                                    center_x=t["src_x"], center_y=t["src_y"])])
        img = img / img.max() * t["peak_counts"] + p.sky_counts
        img = rng.poisson(np.clip(img, 0, None)); img = (img - img.min()) / (img.max() - img.min())

def bench_vs_lenstronomy(n, nl, truth, device, rounds, batch):
    """`rounds` pairs (our batched engine on n images, then lenstronomy on the first nl truth dicts): each one's images/s and
    their ratio per pair, so a drift of the machine's speed during the run cancels (warm-up: one lenstronomy image)."""
    _lenstronomy_images(truth[:1]); pairs = []
    for _ in range(rounds):
        t0 = time.perf_counter(); simulate_images(n, "model_i", seed=0, split="bench", device=device, batch_size=batch); _sync(device)
        ours = n / (time.perf_counter() - t0)
        t0 = time.perf_counter(); _lenstronomy_images(truth[:nl]); pairs.append((ours, nl / (time.perf_counter() - t0)))
    return pairs

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=768, help="Model I images per timed call of the batched engine (default: three CPU batches, the steady state of simulating a set)")
    ap.add_argument("--n-per-image", type=int, default=240, help="images per timed call of the per-image reference and of the render-only figure")
    ap.add_argument("--batch", type=int, default=None, help="batched engine: images rendered at once (default: the library's, 32 on CPU, 2048 on CUDA)")
    ap.add_argument("--n-lenstronomy", type=int, default=60, help="images for lenstronomy (slower)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (cuda figures only when a GPU exists)")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions (medians reported)")
    ap.add_argument("--train-model", default="resnet18", help="classifier whose training speed is compared ('' to skip)")
    ap.add_argument("--train-batch", type=int, default=None, help="training batch of --train-model (default 32 on CPU, 128 on CUDA)")
    ap.add_argument("--out", default="bench_results")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available(): raise SystemExit("--device cuda: no GPU on this machine")
    batch, n1 = sim_batch_size(a.device, a.batch), a.n_per_image
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    res = dict(benchmark="simulate", machine=platform.processor() or platform.machine(), torch_threads=torch.get_num_threads(),
               device=a.device, n=a.n, n_per_image=n1, batch=batch, repeat=a.repeat, complete=False)
    if cuda: res["gpu"] = torch.cuda.get_device_name(0)
    def record(**kw):   # every figure is written as soon as it is measured: a run stopped by a timeout keeps what it has
        res.update(kw)
        (out / "bench_simulate.json").write_text(json.dumps(res, indent=2) + "\n")
        print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in kw.items() if not k.endswith("runs")), flush=True)
    t0 = time.perf_counter(); simulate_images(batch, "model_i", seed=0, split="first", device=a.device, batch_size=batch); _sync(a.device)
    record(first_batch_s=time.perf_counter() - t0)   # this process's first batch: one-off costs included (the CPU's compiled point-mass sum is built here)
    record(**dict(zip(("batched_model_i_img_per_s", "batched_model_i_runs"), bench_batched(a.n, a.device, a.repeat, batch=batch))))
    record(first_batch_overhead_s=res["first_batch_s"] - batch / res["batched_model_i_img_per_s"])   # what the first batch cost beyond a steady one
    # the same engine with the point masses summed by the torch loop instead of the fast path (CUDA: the fused Triton
    # kernel, CPU: the loop compiled by torch.compile); `*_point_masses` says whether the fast path ran (False: it failed)
    from deeplense_nb import physics
    switch = "FUSED_POINT_MASSES" if cuda else "COMPILED_POINT_MASSES"
    fast = getattr(physics, switch); record(**{switch.lower(): fast and (physics._HAS_TRITON or not cuda)})
    setattr(physics, switch, False)
    try: record(**dict(zip(("batched_torch_loop_img_per_s", "batched_torch_loop_runs"), bench_batched(a.n, a.device, a.repeat, batch=batch))))
    finally: setattr(physics, switch, fast)
    record(**{f"{switch.split('_')[0].lower()}_over_torch_loop": res["batched_model_i_img_per_s"] / res["batched_torch_loop_img_per_s"]})
    record(**dict(zip(("per_image_model_i_img_per_s", "per_image_model_i_runs"), bench_per_image(n1, a.device, a.repeat))))
    record(batched_over_per_image=res["batched_model_i_img_per_s"] / res["per_image_model_i_img_per_s"])
    rate, runs, truth = bench_render(n1, a.device, a.repeat)   # render only, from drawn truth
    record(model_i_img_per_s=rate, model_i_runs=runs)
    nl = max(n1 // 2, 20)
    record(batched_lens_finding_img_per_s=bench_batched(a.n, a.device, a.repeat, preset="lens_finding", batch=batch)[0])
    record(**dict(zip(("lens_finding_img_per_s", "lens_finding_runs"), bench_lens_finding_per_image(nl, a.device, a.repeat))))
    record(batched_over_per_image_lens_finding=res["batched_lens_finding_img_per_s"] / res["lens_finding_img_per_s"])
    if a.train_model:
        tb = a.train_batch or (128 if cuda else 32)
        record(train_model=a.train_model, train_batch=tb,
               **dict(zip(("train_img_per_s", "train_runs"), bench_train(a.train_model, a.device, a.repeat, batch=tb))))
        record(sim_over_train=res["batched_model_i_img_per_s"] / res["train_img_per_s"])
    try:
        import lenstronomy
        res["lenstronomy_version"] = lenstronomy.__version__
        pairs = bench_vs_lenstronomy(a.n, min(a.n_lenstronomy, n1), truth, a.device, max(a.repeat, 3), batch)
        r = float(np.median([l for _, l in pairs]))
        record(lenstronomy_model_i_img_per_s=r, lenstronomy_runs=[round(l, 2) for _, l in pairs], speedup_vs_lenstronomy=res["model_i_img_per_s"] / r,
               batched_over_lenstronomy=float(np.median([o / l for o, l in pairs])),   # the median of the paired ratios
               batched_over_lenstronomy_runs=[round(o / l, 3) for o, l in pairs], batched_paired_runs=[round(o, 2) for o, _ in pairs])
    except ImportError:
        res.update(lenstronomy_version=None, note="lenstronomy not installed (pip install 'deeplense-nb[bench]'): no comparison")
    record(full_task1_minutes_estimate=37_500 / res["batched_model_i_img_per_s"] / 60, complete=True)
    print(json.dumps(res, indent=2))

if __name__ == "__main__":
    main()
