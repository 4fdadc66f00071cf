"""Diffusion speed: ancestral DDPM with N steps vs DDIM with k steps for the same model and batch (one run), and
training steps/s of the `GaussianDiffusion` objective (forward + backward + AdamW step).

On CUDA the default is the real-size model (150x150, base width 64, channel mults 1-2-2-4, attention at the two
coarsest levels, T = 1000) at GPU scale: bf16 autocast, channels-last, training batch 256, DDIM sampling batch 512,
DDPM (the ratio only) at batch 16, `--compile` to add torch.compile (training and sampling). Goals on an H100:
training >= 1,000 img/s and DDIM-50 sampling >= 200 img/s (`goals` in the JSON). On CPU a small model (32x32, base
width 16) so that `make bench` stays short. Every setting can be overridden. Writes OUT/bench_diffusion.json.

    python benchmarks/bench_diffusion.py --out bench_results [--device cuda] [--compile] [--size 150] [--ddpm-steps 0]
"""
import argparse, copy, json, platform, time
from pathlib import Path
import torch
from deeplense_nb.core import get_device
from deeplense_nb.diffusion import GaussianDiffusion, UNet, UNetConfig


def sync(dev: torch.device):
    if dev.type == "cuda": torch.cuda.synchronize(dev)


def time_sampling(gd, dev, *, n, sampler, steps, amp, repeats, channels_last=None, compile=False) -> dict:
    kw = dict(batch_size=n, device=dev, amp=amp, progress=False, channels_last=channels_last, compile=compile)
    gd.sample(n, sampler=sampler, steps=min(steps, 3), seed=0, **kw)  # warm-up (and compilation)
    best = float("inf")
    for r in range(repeats):
        sync(dev); t0 = time.perf_counter()
        gd.sample(n, sampler=sampler, steps=steps, seed=r, **kw)
        sync(dev); best = min(best, time.perf_counter() - t0)
    return {"sampler": sampler, "steps": steps, "images": n, "seconds": best, "ms_per_step": 1e3 * best / steps,
            "images_per_s": n / best, "channels_last": channels_last, "compile": compile}


def forward_gflop(unet, in_chans, size) -> float:
    "GFLOP (2 per multiply-add) of one UNet forward pass on one image, counted by torch's FlopCounterMode on the CPU."
    from torch.utils.flop_counter import FlopCounterMode
    net = copy.deepcopy(unet).float().cpu().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc: net(torch.zeros(1, in_chans, size, size), torch.zeros(1))
    return fc.get_total_flops() / 1e9


def time_training(gd, dev, *, batch, size, steps, amp, channels_last=False, compile=False) -> dict:
    opt = torch.optim.AdamW(gd.parameters(), lr=1e-4, fused=dev.type == "cuda")
    x = torch.rand(batch, gd.in_chans, size, size, device=dev)
    if channels_last: gd.to(memory_format=torch.channels_last); x = x.contiguous(memory_format=torch.channels_last)
    fwd = torch.compile(gd) if compile else gd
    gd.train()
    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = fwd(x)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    for _ in range(3): step()  # warm-up
    sync(dev); t0 = time.perf_counter()
    for _ in range(steps): step()
    sync(dev); dt = time.perf_counter() - t0
    if channels_last: gd.to(memory_format=torch.contiguous_format)
    return {"batch": batch, "steps": steps, "seconds": dt, "steps_per_s": steps / dt, "images_per_s": steps * batch / dt,
            "amp_bf16": amp, "channels_last": channels_last, "compile": compile}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_results", help="folder for bench_diffusion.json")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps")
    p.add_argument("--size", type=int, default=None, help="image side (default: 150 on CUDA, 32 on CPU)")
    p.add_argument("--base-width", type=int, default=None, help="UNet base width (default: 64 on CUDA, 16 on CPU)")
    p.add_argument("--timesteps", type=int, default=None, help="diffusion steps T (default: 1000 on CUDA, 100 on CPU)")
    p.add_argument("--ddpm-steps", type=int, default=None, help="DDPM sampling steps N (default: T; 0: skip DDPM)")
    p.add_argument("--ddim-steps", type=int, default=None, help="DDIM sampling steps k (default: 50 on CUDA, 10 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="images per DDIM sampling batch (default: 512 on CUDA, 8 on CPU)")
    p.add_argument("--ddpm-batch", type=int, default=None, help="images per DDPM sampling batch (default: 16 on CUDA, 8 on CPU)")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default: 256 on CUDA, 16 on CPU)")
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps (default: 50 on CUDA, 10 on CPU)")
    p.add_argument("--repeats", type=int, default=2, help="sampling runs per sampler (the fastest is kept)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--no-channels-last", action="store_true", help="contiguous (NCHW) layout on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the network for training and sampling")
    p.add_argument("--patch", type=int, default=1, help="UNetConfig.patch: work on patch x patch pixel blocks (about patch^2 fewer FLOPs)")
    a = p.parse_args(argv)
    dev = get_device(a.device)
    cuda = dev.type == "cuda"
    size = a.size or (150 if cuda else 32)
    width = a.base_width or (64 if cuda else 16)
    T = a.timesteps or (1000 if cuda else 100)
    N, k = (T if a.ddpm_steps is None else a.ddpm_steps), a.ddim_steps or (50 if cuda else 10)
    batch, tbatch = a.batch or (512 if cuda else 8), a.train_batch or (256 if cuda else 16)
    pbatch = a.ddpm_batch or (16 if cuda else 8)
    cl = cuda and not a.no_channels_last
    tsteps = a.train_steps or (50 if cuda else 10)
    amp = cuda and not a.no_amp
    if cuda: torch.backends.cudnn.benchmark = True
    cfg = UNetConfig(base_width=width, channel_mults=(1, 2, 2, 4) if size >= 64 else (1, 2, 2),
                     attn_levels=(2, 3) if size >= 64 else (2,), patch=a.patch)
    torch.manual_seed(0)
    gd = GaussianDiffusion(UNet(cfg), image_size=size, timesteps=T, schedule="cosine", objective="v").to(dev)
    with torch.no_grad():  # zero-initialised output layers make sampling trivially cheap for some kernels; perturb
        for q in gd.parameters(): q.add_(0.01 * torch.randn_like(q))
    train = time_training(gd, dev, batch=tbatch, size=size, steps=tsteps, amp=amp, channels_last=cl, compile=a.compile)
    gd.eval()
    ddim = time_sampling(gd, dev, n=batch, sampler="ddim", steps=k, amp=amp, repeats=a.repeats, channels_last=cl, compile=a.compile)
    ddim_same = time_sampling(gd, dev, n=pbatch, sampler="ddim", steps=k, amp=amp, repeats=a.repeats, channels_last=cl) if N else None
    ddpm = time_sampling(gd, dev, n=pbatch, sampler="ddpm", steps=N, amp=amp, repeats=a.repeats, channels_last=cl) if N else None
    gf = forward_gflop(gd.unet, gd.in_chans, size)   # the compute each figure implies: TFLOP/s = forwards/s x GFLOP / 1e3
    train["tflops"] = 3 * gf * train["images_per_s"] / 1e3          # backward ~ 2 forwards
    for r in (ddim, ddim_same, ddpm):
        if r: r["tflops"] = gf * r["steps"] * r["images_per_s"] / 1e3   # one forward per step (unguided)
    res = {"benchmark": "diffusion", "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if cuda else None,
           "torch": torch.__version__, "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
           "model": {"unet": cfg.to_dict(), "image_size": size, "timesteps": T,
                     "params_M": sum(q.numel() for q in gd.parameters()) / 1e6, "gflop_per_forward": gf},
           "sampling": {"ddim": ddim, "ddpm": ddpm, "ddim_at_ddpm_batch": ddim_same,
                        "time_ratio_ddpm_over_ddim": ddpm["seconds"] / ddim_same["seconds"] if N else None,
                        "step_ratio": N / k if N else None},
           "training": train,
           "goals": {"training_images_per_s_min": 1000, "ddim50_images_per_s_min": 200, "on": "one H100 (CUDA figures only)",
                     "tflops_needed": {"training": 3 * gf * 1000 / 1e3, "ddim50": gf * 50 * 200 / 1e3},   # at this model and size
                     "training_met": train["images_per_s"] >= 1000 if cuda else None,
                     "ddim_met": (ddim["images_per_s"] >= 200 and k == 50) if cuda else None}}
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    (out / "bench_diffusion.json").write_text(json.dumps(res, indent=2) + "\n")
    if N: print(f"DDPM {N} steps: {ddpm['seconds']:.2f} s, DDIM {k} steps: {ddim_same['seconds']:.2f} s "
                f"(x{res['sampling']['time_ratio_ddpm_over_ddim']:.1f} faster, {N / k:.0f}x fewer steps) for {pbatch} images")
    print(f"{size}x{size} on {dev}: training {train['images_per_s']:.1f} img/s at batch {tbatch}; DDIM-{k} sampling "
          f"{ddim['images_per_s']:.1f} img/s at batch {batch} (channels_last {cl}, compile {a.compile}, bf16 {amp}, patch {a.patch})")
    print(f"wrote {out / 'bench_diffusion.json'}")
    return res


if __name__ == "__main__":
    main()
