"""Speed and peak memory of our SD-v1 UNet against diffusers' UNet2DConditionModel.

Both models run with the SAME weights: ours is built with a fixed seed (every parameter then
perturbed by 0.05 N(0, 1) so that zero-initialised layers are not zero) and its state_dict is
converted with diffusers' public converter
(``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``); the diffusers model is
built on the meta device and takes the converted tensors with ``load_state_dict(assign=True)``,
so only one copy of the weights is ever resident. Attention in both goes through
``F.scaled_dot_product_attention`` (diffusers' default ``AttnProcessor2_0``).

Configurations
  tiny  model_channels 32, channel_mult [1,2,4,4], attention_resolutions [4,2,1], num_res_blocks 2,
        num_heads 8, context_dim 64 (the SD-v1 shape, scaled down)
  full  the SD-v1 UNet: model_channels 320, channel_mult [1,2,4,4], attention_resolutions [4,2,1],
        num_res_blocks 2, num_heads 8, context_dim 768, legacy False (~860M parameters)
Inputs: latents [B, 4, S, S] (S = --size, default 64), context [B, 77, context_dim], random timesteps.

Modes
  fwd      forward under torch.no_grad()
  fwd+bwd  forward, loss = mean(out^2), backward (gradients set to None before each iteration, so the
           peak includes one set of parameter gradients: ~3.2 GiB for the full fp32 UNet)
Time: median (and min) of --repeats iterations after --warmup untimed iterations; --rounds R repeats
every measurement in R fresh processes, alternating which implementation goes first, and pools them.

Devices
  cpu   (default) fp32, batch 1, all cores (--threads to change).
  cuda  fp16 autocast (--dtype bf16: bf16), batch 8; timings synchronised; peak memory = torch.cuda.max_memory_allocated
        during the timed iterations minus the memory allocated after construction (weights + inputs).

Peak memory on CPU: every (implementation, config, mode) is measured in a fresh subprocess of its
own, separate from the timing subprocess: one forward (+backward) after construction, with glibc's
mmap threshold pinned (MALLOC_MMAP_THRESHOLD_=65536) so that every large tensor is its own mapping
and is returned to the kernel when freed; otherwise glibc's adaptive threshold keeps freed blocks
in the heap and the reading varies by +-100 MiB from run to run for the same code. Before the
iteration the process resets its kernel RSS high-water mark (writing "5" to /proc/self/clear_refs,
Linux >= 4.0) and reports VmHWM - VmRSS(baseline): the extra resident memory the computation needs
beyond weights and inputs. Where clear_refs is unavailable it falls back to ru_maxrss(after) -
ru_maxrss(after construction), which reads 0 when construction itself was the peak (method
"ru_maxrss"). --mem-from-timing-run skips the extra subprocess and reports the (noisier) peak of
the timing run under the default allocator instead. CUDA peaks come from the timing run.

Run (from the repository root, with the dev requirements installed):
  python benchmarks/bench_unet.py                                  # cpu, tiny + full, fwd and fwd+bwd
  python benchmarks/bench_unet.py --configs tiny --repeats 20
  python benchmarks/bench_unet.py --skip-backward-full --json out.json
  python benchmarks/bench_unet.py --device cuda                    # fp16 autocast, batch 8
"""  # noqa: E501 (--help text, kept as printed)
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = {
    "tiny": dict(model_channels=32, channel_mult=[1, 2, 4, 4], attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, num_heads=8, context_dim=64),
    "full": dict(model_channels=320, channel_mult=[1, 2, 4, 4], attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, num_heads=8, context_dim=768),
}
CONTEXT_LEN = 77
LDM_PREFIX = "model.diffusion_model."
MARK = "@@BENCH@@"


def unet_params(name: str, size: int) -> dict:
    c = CONFIGS[name]
    return dict(image_size=size, in_channels=4, out_channels=4, model_channels=c["model_channels"],
                num_res_blocks=c["num_res_blocks"], attention_resolutions=c["attention_resolutions"],
                channel_mult=c["channel_mult"], num_heads=c["num_heads"], use_spatial_transformer=True,
                transformer_depth=1, context_dim=c["context_dim"], legacy=False)


def diffusers_config(p: dict) -> dict:
    n = len(p["channel_mult"])
    attn = [2 ** i in set(p["attention_resolutions"]) for i in range(n)]
    assert all(attn[:-1]), "only attention at all levels or at all but the deepest level is mapped here"
    chans = [p["model_channels"] * m for m in p["channel_mult"]]
    heads = ([p["num_heads"]] * n if p.get("num_head_channels", -1) == -1
             else [c // p["num_head_channels"] for c in chans])
    return dict(sample_size=p["image_size"], in_channels=p["in_channels"], out_channels=p["out_channels"],
                down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                mid_block_type="UNetMidBlock2DCrossAttn",
                up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
                block_out_channels=chans, layers_per_block=p["num_res_blocks"],
                transformer_layers_per_block=p["transformer_depth"], cross_attention_dim=p["context_dim"],
                attention_head_dim=heads,  # diffusers' SD1 naming quirk: number of heads per level
                norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
                downsample_padding=1, use_linear_projection=False, upcast_attention=False)


# ----------------------------------------------------------------------------- memory helpers
def status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kb() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


class CpuPeak:
    """Extra peak RSS (MiB) of the code run between start() and stop()."""

    def start(self):
        gc.collect()
        self.method = "ru_maxrss"
        self.base = _maxrss_kb()
        rss = status_kb("VmRSS")
        if rss is not None:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                if status_kb("VmHWM") <= rss + 1024:
                    self.method, self.base = "VmHWM", rss
            except OSError:
                pass

    def stop(self) -> float:
        peak = status_kb("VmHWM") if self.method == "VmHWM" else _maxrss_kb()
        return max(peak - self.base, 0) / 1024


# ----------------------------------------------------------------------------- worker
def build(impl: str, p: dict, device):
    import torch

    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    ours = UNetModel(**p).eval()
    with torch.no_grad():  # zero-initialised output layers would make every output 0 and the check vacuous
        for prm in ours.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    if impl == "ours":
        return ours.to(device)
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sd = ours.state_dict()
    converted = convert_ldm_unet_checkpoint({LDM_PREFIX + k: v for k, v in sd.items()},
                                            {"layers_per_block": p["num_res_blocks"]})
    assert len(converted) == len(sd)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**diffusers_config(p))
    ref.load_state_dict(converted, strict=True, assign=True)
    del ours, sd, converted
    return ref.eval().to(device)


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    p = unet_params(args.config, args.size)
    t_build = time.perf_counter()
    model = build(args.impl, p, device)
    t_build = time.perf_counter() - t_build
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(args.batch, 4, args.size, args.size, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    ctx = torch.randn(args.batch, CONTEXT_LEN, p["context_dim"], generator=g).to(device)

    if args.impl == "ours":
        def call():
            return model(x, timesteps=t, context=ctx)
    else:
        def call():
            return model(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

    cuda = device.type == "cuda"
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    autocast = torch.autocast("cuda", dtype=half) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        if args.mode == "fwd":
            with torch.no_grad(), autocast:
                return call()
        for prm in model.parameters():
            prm.grad = None
        with autocast:
            out = call()
        out.float().square().mean().backward()
        return out

    def sync():
        if cuda:
            torch.cuda.synchronize()

    gc.collect()
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        meter = CpuPeak()
        meter.start()
    out = None
    for _ in range(args.warmup):
        out = step()
    sync()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = step()
        sync()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak_mib, method = (torch.cuda.max_memory_allocated() - base) / 2 ** 20, "cuda.max_memory_allocated"
    else:
        peak_mib, method = meter.stop(), meter.method
    if args.out_file:
        torch.save(out.detach().float().cpu(), args.out_file)
    return dict(impl=args.impl, config=args.config, mode=args.mode, device=args.device, batch=args.batch,
                size=args.size, threads=args.threads, build_s=t_build, times_s=times,
                median_s=statistics.median(times), min_s=min(times), peak_mib=peak_mib, mem_method=method,
                n_params=sum(q.numel() for q in model.parameters()))


# ----------------------------------------------------------------------------- driver
def run_one(args, impl, config, mode, out_file, memory_only=False) -> dict:
    repeats = args.repeats if args.repeats is not None else (10 if config == "tiny" else 3)
    warmup = args.warmup
    env = dict(os.environ)
    if memory_only:
        repeats, warmup = 1, 0
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--impl", impl, "--configs", config,
           "--mode", mode, "--device", args.device, "--batch", str(args.batch), "--size", str(args.size),
           "--threads", str(args.threads), "--warmup", str(warmup), "--repeats", str(repeats),
           "--dtype", args.dtype, "--out-file", out_file or ""]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            r = json.loads(line[len(MARK):])
            if memory_only:
                r["mem_method"] += "+mmap_threshold"
            return r
    raise RuntimeError(f"worker {impl}/{config}/{mode} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")


def measure(args, impl, config, mode, out_file) -> dict:
    r = run_one(args, impl, config, mode, out_file)
    r["peak_mib_timing_run"] = r["peak_mib"]
    if args.device == "cpu" and not args.mem_from_timing_run:
        m = run_one(args, impl, config, mode, None, memory_only=True)
        r["peak_mib"], r["mem_method"] = m["peak_mib"], m["mem_method"]
    return r


def fmt_table(rows: list[dict]) -> str:
    head = ["config", "mode", "ours ms", "diffusers ms", "ours/diff", "min ours/diff", "ours MiB", "diffusers MiB",
            "ours/diff", "max|Δout|"]
    lines = [head]
    for r in rows:
        o, d = r["ours"], r["diffusers"]
        lines.append([r["config"], r["mode"], f"{o['median_s'] * 1e3:.1f}", f"{d['median_s'] * 1e3:.1f}",
                      f"{o['median_s'] / d['median_s']:.2f}", f"{o['min_s'] / d['min_s']:.2f}",
                      f"{o['peak_mib']:.0f}", f"{d['peak_mib']:.0f}",
                      f"{o['peak_mib'] / d['peak_mib']:.2f}" if d["peak_mib"] > 0 else "n/a",
                      "" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.1e}"])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--configs", default="tiny,full", help="comma-separated subset of: " + ",".join(CONFIGS))
    ap.add_argument("--batch", type=int, default=None, help="default 1 on cpu, 8 on cuda")
    ap.add_argument("--size", type=int, default=64, help="latent height = width (default 64)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all usable cores)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="timed iterations (default 10 tiny, 3 full)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="fresh-process rounds per measurement, alternating ours/diffusers order (noisy machines)")
    ap.add_argument("--skip-backward", action="store_true", help="forward only, every config")
    ap.add_argument("--skip-backward-full", action="store_true", help="no fwd+bwd for the full SD-v1 UNet")
    ap.add_argument("--mem-from-timing-run", action="store_true",
                    help="cpu: no separate memory subprocess; report the timing run's peak RSS (default allocator)")
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="autocast dtype on cuda (cpu: fp32)")
    # internal: one measurement in this (fresh) process
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["fwd", "fwd+bwd"], help=argparse.SUPPRESS)
    ap.add_argument("--out-file", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.batch is None:
        args.batch = 8 if args.device == "cuda" else 1

    if args.worker:
        args.config = args.configs
        print(MARK + json.dumps(worker(args)), flush=True)
        return

    import torch
    try:
        import diffusers
    except ImportError as e:
        sys.exit(f"diffusers is needed for the comparison (pip install -r requirements-dev.txt): {e}")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown config {c!r}")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}, "
          f"device {args.device}, threads {args.threads}, batch {args.batch}, latents {args.size}x{args.size}, "
          f"{args.dtype + ' autocast' if args.device == 'cuda' else 'fp32'}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            modes = ["fwd"]
            if not args.skip_backward and not (config == "full" and args.skip_backward_full):
                modes.append("fwd+bwd")
            for mode in modes:
                row = dict(config=config, mode=mode)
                outs = {}
                for rnd in range(args.rounds):
                    # alternate the order so that slow drifts of a shared machine hit both sides alike
                    for impl in ("ours", "diffusers") if rnd % 2 == 0 else ("diffusers", "ours"):
                        out_file = os.path.join(tmp, f"{impl}.pt") if mode == "fwd" else None
                        r = measure(args, impl, config, mode, out_file)
                        print(f"  {config:5s} {mode:8s} {impl:9s} median {r['median_s'] * 1e3:9.1f} ms "
                              f"(min {r['min_s'] * 1e3:.1f}, n={len(r['times_s'])})  peak +{r['peak_mib']:.0f} MiB "
                              f"[{r['mem_method']}]  build {r['build_s']:.1f} s", flush=True)
                        if out_file:
                            outs[impl] = torch.load(out_file)
                        if impl in row:  # merge rounds: all timings, the largest peak
                            prev = row[impl]
                            prev["times_s"] += r["times_s"]
                            prev["peak_mib"] = max(prev["peak_mib"], r["peak_mib"])
                            prev["peak_mib_timing_run"] = max(prev["peak_mib_timing_run"], r["peak_mib_timing_run"])
                            prev["median_s"] = statistics.median(prev["times_s"])
                            prev["min_s"] = min(prev["times_s"])
                        else:
                            row[impl] = r
                if outs:
                    row["max_abs_diff"] = (outs["ours"] - outs["diffusers"]).abs().max().item()
                rows.append(row)
    print()
    print(fmt_table(rows))
    print("\nms: median forward (+backward) time (min ours/diff: ratio of the fastest runs, steadier on a shared "
          "machine); MiB: peak memory above weights+inputs; ratios < 1 favour ours; max|Δout|: forward outputs, "
          "same weights and inputs.")
    if args.json:
        meta = dict(torch=torch.__version__, diffusers=diffusers.__version__, device=args.device, dtype=args.dtype,
                    threads=args.threads, batch=args.batch, size=args.size, platform=platform.platform())
        Path(args.json).write_text(json.dumps(dict(meta=meta, results=rows), indent=2))


if __name__ == "__main__":
    main()
