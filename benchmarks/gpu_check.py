"""The first thing to run on a machine with a GPU: every speed and memory number we cannot measure on CPU.

    bash benchmarks/gpu_check.sh                       # on a CUDA machine: SD-v1 size, random weights
    bash benchmarks/gpu_check.sh --device cpu --tiny   # the same steps, tiny, on CPU (CI runs this)

No download: the SD-v1 layout (``configs/stable-diffusion/v1-inference.yaml``) with random weights. Steps,
each in its own process (one that fails is reported and the others still run):

1. ``unet-fp16`` / ``unet-bf16``: UNet forward and forward+backward, ours vs diffusers' ``UNet2DConditionModel``,
   same weights, batch 8 (``bench_unet.py``);
2. ``generate``: images/s at 512², fp16, batch 8, DDIM 50 and DPM-Solver++(2M) 20, ours vs diffusers'
   pipeline (``bench_generate.py``);
3. ``anchor-batch``: one anchor-generation batch of 8 at 512² at the paper's setting (DDIM 200, eta 1, CFG 6),
   then 20 steps of cross-attn ablation training at batch 4 with peak memory (``bench_train.py``);
4. ``discover``: ConceptPrune's discovery on 2 prompt pairs (``bench_discover.py``);
5. ``attack-step``: one optimisation step of UnlearnDiffAtk, P4D-N, P4D-K and P4D-N with one teacher call per
   step (the original's way), 512², fp32, with peak memory (``bench_attack_step.py``);
6. ``noise-original``: ``--noise original``'s start noise (``runtime.generate.start_noise``) against the draw
   of the diffusers originals (``torch.manual_seed(seed)``, then ``randn`` on CUDA in fp16, and diffusers'
   ``randn_tensor`` where installed), exact; on CPU, that the option is refused;
7. ``ddp``: with two GPUs or more, ``train.py -t --gpus 0,1`` on a random SD-v1 checkpoint in the real
   ``sd-v1-4.ckpt`` layout: anchor images from two processes, then 2 DDP training steps.

Prints one table and writes every step's JSON to ``--out`` (default ``gpu_check.json``). Not yet run on a GPU: an
estimate is 7-10 minutes on one H100/H200.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def steps(device: str, tiny: bool, n_gpus: int, tmp: Path) -> list[tuple[str, list[str], Path | None]]:
    """(name, command, JSON file it writes) of every step."""
    py = sys.executable
    j = lambda name: tmp / f"{name}.json"  # noqa: E731
    out = []
    if tiny:  # one thread: tiny ops on shared cores slow down many-fold from OpenMP spinning
        unet = ["--configs", "tiny", "--batch", "2", "--size", "16", "--repeats", "1", "--warmup", "0",
                "--threads", "1", "--mem-from-timing-run"]
        gen = ["--model", "toy", "--batch", "2", "--sampler", "ddim-2,dpmpp_2m-2", "--repeats", "1", "--threads", "1"]
        train = ["--model", "tiny", "--train-batch", "2", "--gen-batch", "2", "--gen-steps", "2", "--repeats", "2"]
        disc = ["--model", "toy", "--pairs", "2", "--steps", "2", "--threads", "1"]
        toy = REPO / "assets" / "toyworld" / "ldm"
        attack = ["--config", toy / "ldm.yaml", "--weights", toy / "toyworld-ldm.safetensors", "--size", "32",
                  "--steps", "2", "--threads", "1"]
    else:
        unet = ["--configs", "full", "--batch", "8"]
        gen = ["--model", "sd", "--dtype", "fp16", "--size", "512", "--batch", "8", "--sampler",
               "ddim-50,dpmpp_2m-20", "--repeats", "2"]
        train = ["--model", "sd", "--train-batch", "4", "--gen-batch", "8", "--gen-steps", "200", "--repeats", "20"]
        disc = ["--model", "sd", "--pairs", "2", "--steps", "50"]
        attack = ["--size", "512", "--steps", "5"]
    dev = ["--device", device]
    dtypes = ["fp16", "bf16"] if device == "cuda" else ["fp16"]  # the CPU runs fp32 either way
    for dt in dtypes:
        name = f"unet-{dt}" if device == "cuda" else "unet"
        out.append((name, [py, BENCH / "bench_unet.py", *dev, *unet, "--dtype", dt, "--json", j(name)], j(name)))
    out.append(("generate", [py, BENCH / "bench_generate.py", *dev, *gen, "--json", j("generate")], j("generate")))
    out.append(("anchor-batch+train", [py, BENCH / "bench_train.py", *dev, *train, "--json", j("train")], j("train")))
    out.append(("discover", [py, BENCH / "bench_discover.py", *dev, *disc, "--json", j("discover")], j("discover")))
    out.append(("attack-step", [py, BENCH / "bench_attack_step.py", *dev, *attack, "--json", j("attack")],
                j("attack")))
    out.append(("noise-original", [py, BENCH / "gpu_check.py", "--noise-worker", *dev, "--out", j("noise")],
                j("noise")))
    if n_gpus > 1 or (device == "cpu" and tiny):  # the CPU dry run takes the same path with two CPU processes
        out.append(("ddp", [py, BENCH / "gpu_check.py", "--ddp-worker", *dev, *(["--tiny"] if tiny else []),
                            "--out", j("ddp")], j("ddp")))
    return out


def noise_worker(device: str, out: Path) -> None:
    """``--noise original`` against the originals' draw (CUDA), or its refusal (CPU); exits non-zero on a mismatch."""
    import torch

    sys.path.insert(0, str(REPO))
    from runtime.generate import check_noise, start_noise

    if device != "cuda":
        try:
            check_noise("original", ["cpu"])
        except ValueError as e:
            out.write_text(json.dumps({"refused_on_cpu": True, "message": str(e)}, indent=1) + "\n")
            return
        raise SystemExit("--noise original was not refused on CPU")
    shape, result = (4, 64, 64), {"seeds": [0, 1, 42, 2**31 - 1]}
    for seed in result["seeds"]:
        torch.manual_seed(seed)  # the originals: global seed, then the pipeline's generator-less draw
        theirs = torch.randn((1, *shape), device="cuda", dtype=torch.float16)[0].float()
        ours = start_noise(shape, seed, "cuda", "original")
        if not torch.equal(ours, theirs):
            raise SystemExit(f"seed {seed}: --noise original differs from torch.manual_seed + randn (cuda, fp16)")
        try:
            from diffusers.utils.torch_utils import randn_tensor
        except ImportError:
            result["diffusers_randn_tensor"] = "not installed"
            continue
        torch.manual_seed(seed)
        d = randn_tensor((1, *shape), generator=None, device=torch.device("cuda"), dtype=torch.float16)[0].float()
        if not torch.equal(ours, d):
            raise SystemExit(f"seed {seed}: --noise original differs from diffusers' randn_tensor")
        result["diffusers_randn_tensor"] = "equal"
    result["equal"] = True
    out.write_text(json.dumps(result, indent=1) + "\n")


def ddp_worker(device: str, tiny: bool, out: Path) -> None:
    """train.py -t on two devices (two GPUs, or two CPU processes for the dry run): wall time, one run folder."""
    sys.path.insert(0, str(BENCH))
    from sd_size_e2e import make_base

    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        if tiny:
            sys.path.insert(0, str(REPO))
            from ldm.checkpoint import save_state_dict
            from ldm.util import instantiate_from_config, load_model_config

            config, size = REPO / "configs/tiny/v1-tiny.yaml", 16
            save_state_dict(instantiate_from_config(load_model_config(config)).state_dict(), w / "base.ckpt")
        else:
            config, size = REPO / "configs/stable-diffusion/v1-inference.yaml", 512
            make_base(w / "base.ckpt")
        (w / "p.txt").write_text("a painting of a harbour\na portrait of a fisherman\n")
        gpus = "0,1" if device == "cuda" else "cpu:2"
        cmd = [sys.executable, REPO / "train.py", "-t", "--gpus", gpus, "--concept_type", "style", "--caption_target",
               "van gogh", "--prompts", w / "p.txt", "--train_size", "4", "--n_samples", "2", "--model_config", config,
               "-rc", w / "base.ckpt", "--root", w / "data", "--logdir", w / "logs", f"data.size={size}",
               "generation.steps=10", "training.max_steps=2", "training.batch_size=1", "training.num_workers=0",
               "logging.image_every=0"]
        t = time.perf_counter()
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"train.py --gpus {gpus} failed:\n{(r.stdout + r.stderr)[-4000:]}")
        runs = list((w / "logs").iterdir())
        deltas = list(runs[0].glob("checkpoints/delta_step_*"))
        result = {"gpus": gpus, "wall_s": round(time.perf_counter() - t, 1), "run_folders": len(runs),
                  "deltas": [p.name for p in deltas], "size": size}
        if len(runs) != 1 or not deltas:
            raise SystemExit(f"expected one run folder with a delta, got {result}")
        out.write_text(json.dumps(result, indent=1) + "\n")


def summary(name: str, data: dict) -> str:
    """One line of the table from a step's JSON."""
    if name.startswith("unet"):
        parts = []
        for r in data["results"]:
            o, d = r["ours"], r["diffusers"]
            parts.append(f"{r['config']} {r['mode']}: ours {o['median_s'] * 1e3:.1f} ms / diffusers "
                         f"{d['median_s'] * 1e3:.1f} ms, peak +{o['peak_mib']:.0f} / +{d['peak_mib']:.0f} MiB")
        return "; ".join(parts)
    if name == "generate":
        return "; ".join(f"{r['sampler']}-{r['steps']}: ours {r['ours']['images_per_s']:.2f} img/s, diffusers "
                         f"{r['diffusers']['images_per_s']:.2f} img/s" for r in data["results"])
    if name.startswith("anchor"):
        g, t = data["generation"], data["train"]
        return (f"anchor batch {g['batch']} x DDIM {g['ddim_steps']}: {g['median_s']:.1f} s "
                f"({g['images_per_s']:.2f} img/s, peak {g['peak_mib']:.0f} MiB); {t['steps']} training steps at "
                f"batch {t['batch']}: median {t['median_s']:.3f} s/step, peak {t['peak_mib']:.0f} MiB")
    if name == "discover":
        return (f"{data['pairs']} pairs, {data['unet_calls']} UNet calls: {data['discover_s']:.1f} s "
                f"(recording overhead {data['record_overhead_pct']:.0f}%), peak {data['peak_mib']:.0f} MiB")
    if name == "attack-step":
        return "; ".join(f"{r['name']} {r['step_s']:.3f} s/step" + (f", peak {r['peak_gib']} GiB" if "peak_gib" in r
                                                                      else "") for r in data["rows"])
    if name == "ddp":
        return (f"train.py --gpus {data['gpus']}: {data['wall_s']} s, {data['run_folders']} run folder, "
                f"{data['deltas']}")
    return ", ".join(f"{k} {v}" for k, v in data.items() if isinstance(v, (int, float, str)))[:300]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes (a dry run of every step)")
    p.add_argument("--out", default="gpu_check.json", help="all results as JSON")
    p.add_argument("--only", default=None, help="comma-separated step names (default: all)")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--noise-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here: run with --device cpu --tiny for the dry run")
    if args.noise_worker:
        noise_worker(args.device, Path(args.out))
        return 0
    if args.ddp_worker:
        ddp_worker(args.device, args.tiny, Path(args.out))
        return 0
    n_gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    info = {"torch": torch.__version__, "device": args.device, "tiny": args.tiny, "gpus": n_gpus,
            "gpu_name": torch.cuda.get_device_name(0) if n_gpus else None}
    print(f"gpu_check: {json.dumps(info)}", flush=True)
    results, failed = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd, js in steps(args.device, args.tiny, n_gpus, Path(tmp)):
            if args.only and name not in args.only.split(","):
                continue
            t = time.perf_counter()
            print(f"--- {name}: {' '.join(str(c) for c in cmd[1:])}", flush=True)
            r = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if r.returncode or js is None or not js.is_file():
                failed.append(name)
                results[name] = {"error": (r.stdout + r.stderr)[-3000:], "wall_s": round(wall, 1)}
                print(f"    FAILED after {wall:.0f} s:\n{(r.stdout + r.stderr)[-1500:]}", flush=True)
                continue
            results[name] = {"wall_s": round(wall, 1), **json.loads(js.read_text())}
            print(f"    done in {wall:.0f} s", flush=True)
    print(f"\n| step | wall | result ({'tiny, ' if args.tiny else ''}{args.device}) |\n|---|---|---|")
    for name, data in results.items():
        line = "FAILED (see JSON)" if "error" in data else summary(name, data)
        print(f"| {name} | {data['wall_s']:.0f} s | {line} |")
    Path(args.out).write_text(json.dumps({"info": info, "results": results}, indent=1) + "\n")
    print(f"\nJSON -> {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
