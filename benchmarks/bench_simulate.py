"""Simulator speed: images/s for Model I (all three classes) and lens finding, against lenstronomy in the same run.

lenstronomy is the engine DeepLenseSim used to make the real Task I data; the comparison renders the same physics
(SIE + external shear, 25 point-mass subhalos or a 100-point vortex, elliptical Sersic source, Gaussian PSF,
Poisson noise) at the same size with both codes. Writes JSON (`--out DIR/bench_simulate.json`).
Run: python benchmarks/bench_simulate.py [--n 240] [--device cuda]
"""
import argparse, json, math, platform, time
from pathlib import Path
import numpy as np
import torch
from deeplense_nb.simulate import (get_preset, sample_truth, image_rng, render, CLASSES_T1, LensFindingPreset,
                                   sample_lens_finding, render_lens_finding)

def bench_ours(n, device, batch=120):
    p = get_preset("model_i")
    truth = [sample_truth(p, CLASSES_T1[i % 3], image_rng(0, "bench", i)) for i in range(n)]
    render(truth[:6], p, device=device)  # warm-up
    if device.startswith("cuda"): torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in range(0, n, batch): render(truth[b:b + batch], p, device=device)
    if device.startswith("cuda"): torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), truth

def bench_lens_finding(n, device):
    p = LensFindingPreset()
    ts = [sample_lens_finding(p, i % 2 == 0, image_rng(0, "bench", i)) for i in range(n)]
    t0 = time.perf_counter()
    for t in ts: render_lens_finding(t, p, device=device)
    return n / (time.perf_counter() - t0)

def bench_lenstronomy(truth, n):
    "The same Model I images rendered by lenstronomy's ImageModel, the way DeepLenseSim does."
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.ImSim.image_model import ImageModel
    import lenstronomy.Util.param_util as pu
    from deeplense_nb.simulate import _theta_E_pm
    p = get_preset("model_i")
    data = ImageData(image_data=np.zeros((p.npix, p.npix)), background_rms=0.0, exposure_time=1.0,
                     ra_at_xy_0=-(p.npix - 1) / 2 * p.pixel_scale, dec_at_xy_0=-(p.npix - 1) / 2 * p.pixel_scale,
                     transform_pix2angle=np.eye(2) * p.pixel_scale)
    psf = PSF(psf_type="GAUSSIAN", fwhm=p.psf_fwhm, pixel_size=p.pixel_scale, truncation=4)
    src = LightModel(["SERSIC_ELLIPSE"])
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for t in truth[:n]:
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
    return n / (time.perf_counter() - t0)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=240, help="Model I images to render")
    ap.add_argument("--n-lenstronomy", type=int, default=60, help="images for lenstronomy (slower)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench_results")
    a = ap.parse_args()
    res = dict(benchmark="simulate", machine=platform.processor() or platform.machine(), torch_threads=torch.get_num_threads(),
               device=a.device, n=a.n)
    res["model_i_img_per_s"], truth = bench_ours(a.n, a.device)
    res["lens_finding_img_per_s"] = bench_lens_finding(max(a.n // 2, 20), a.device)
    if torch.cuda.is_available() and a.device == "cpu":
        res["model_i_img_per_s_cuda"], _ = bench_ours(a.n * 4, "cuda")
        res["gpu"] = torch.cuda.get_device_name(0)
    try:
        import lenstronomy
        res["lenstronomy_version"] = lenstronomy.__version__
        res["lenstronomy_model_i_img_per_s"] = bench_lenstronomy(truth, min(a.n_lenstronomy, a.n))
        res["speedup_vs_lenstronomy"] = res["model_i_img_per_s"] / res["lenstronomy_model_i_img_per_s"]
    except ImportError:
        res["lenstronomy_version"] = None
        res["note"] = "lenstronomy not installed (pip install 'deeplense-nb[bench]'): no comparison"
    res["full_task1_minutes_estimate"] = 37_500 / res["model_i_img_per_s"] / 60
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    (out / "bench_simulate.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))

if __name__ == "__main__":
    main()
