"""Training-image generation: DDIM, eta 1, CFG 6, one PNG per prompt entry.

``sampler="dpmpp_2m"`` (DPM-Solver++(2M), ``ldm/models/diffusion/dpmpp.py``) is our addition for cheaper
anchors: 20 steps are a tenth of DDIM-200's UNet calls (measured on the toy world:
docs/guides/cheaper-anchors.md); the default stays the paper's DDIM 200 steps, eta 1. ``sampler="lms"``
(diffusers' ``LMSDiscreteScheduler``, ``ldm/models/diffusion/lms.py``) is UnlearnDiffAtk's.

``generate_images(model_factory, prompts, outdir, sampling)`` (``sampling``: a :class:`Sampling`) writes

    outdir/samples/00000.png ...   8-bit PNG of clamp((decode(z) + 1) / 2, 0, 1)
    outdir/images.txt              one image path per line, RELATIVE TO ``outdir`` (``samples/00000.png``)
    outdir/caption.txt             the prompt of the image on the same line
    outdir/plan.json               the prompts and sampling settings the folder was made with

Differences from the reference, on purpose:

* ``images.txt`` paths are relative to the folder that holds ``images.txt`` (the reference wrote
  them relative to the working directory, e.g. ``data/cat_gen/samples/00000.png``, which breaks when
  the folder or the working directory moves). ``ablation.data.read_image_list`` resolves them.
* Noise is seeded per IMAGE, not per process: image ``i`` draws its start noise and then, step by
  step, its eta noise from one CPU ``torch.Generator`` seeded ``seed + i`` (the draws are moved to the
  sampling device). The reference calls ``seed_everything(42)`` once in every GPU process, so its
  images depend on the number of GPUs and the batch split. Here the images are a function of
  (prompt, seed + index, settings, batch size): a rerun or a resumed run with the same ``batch_size``
  is bit-identical to an uninterrupted one, on any number of devices of one kind. Another
  ``batch_size`` gives the same images up to float rounding, not bit for bit: CPU (and GPU) kernels
  pick their blocking by batch shape, which moves activations by ~1e-5 relative and, after the
  uint8 truncation, some pixels by one 1/255 step (seen: 8 of 12 anchor images with batch 4 vs 2;
  ``tests/test_generate.py`` asserts at most one step).
* Resumable and safe to interrupt: every PNG is written under a temporary name and ``os.replace``d;
  on restart, batches whose images all exist and pass ``PIL.Image.verify()`` are skipped and only
  missing or damaged images are (re)written. ``images.txt``/``caption.txt`` are written (atomically)
  only once every image exists; if they exist and match the plan, the call does nothing.
* A folder made from a different plan (other prompts or sampling settings) raises
  ``GenerationPlanError`` instead of silently mixing two data sets.
* Pixels are converted like the reference (``(255 * x).astype(uint8)``, i.e. truncated) by default;
  ``Sampling(pixels="round")`` rounds like diffusers' ``numpy_to_pil`` (``(x * 255).round()``), the rule of the
  diffusers-based originals (benchmark.py sets it).
* ``Sampling(noise="original")`` draws image ``i``'s start noise as the diffusers-based originals do after
  ``torch.manual_seed(seed_i)``: ``randn`` of one image on the CUDA device in fp16 (``prepare_latents`` with no
  generator); see :func:`start_noise`. It needs CUDA devices (:func:`check_noise`).
"""
from __future__ import annotations

import gc
import json
import os
import pickle
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpmpp import DPMPP2MSampler
from ldm.models.diffusion.lms import LMSSampler
from ldm.models.diffusion.plms import PLMSSampler
from runtime.cli import RunError, guidance_problem, image_side_problem, run_error_status, seed_problem
from runtime.files import (
    WriteError,
    image_is_complete,
    read_json,
    read_text_lines,
    save_png_atomic,
    temp_in_use,
    write_text_atomic,
)

__all__ = ["Sampling", "generate_images", "validate_generation_args", "check_prompts", "check_devices",
           "GenerationPlanError", "NonFiniteSampleError", "PLAN_FILE", "SAMPLERS", "PRECISIONS", "plan_dict",
           "plan_diff", "latent_shape", "Runner", "NOISES", "PIXELS", "start_noise", "to_uint8", "check_noise",
           "sample_conditioned"]

PLAN_FILE = "plan.json"
_PLAN_VERSION = 1  # bump if the noise layout or the pixel conversion changes
PRECISIONS = ("autocast", "full")
# ours: per-image CPU fp32 generator; original: the diffusers originals' CUDA fp16 draw (start_noise)
NOISES = ("ours", "original")
# truncate: the CompVis scripts' (255 * x).astype(uint8); round: diffusers' numpy_to_pil (x * 255).round()
PIXELS = ("truncate", "round")
# ddim: the paper's (default); plms: deterministic, eta 0; dpmpp_2m: DPM-Solver++(2M), deterministic, eta
# ignored, S steps = S UNet calls (ldm/models/diffusion/dpmpp.py); lms: diffusers' LMSDiscreteScheduler (order 4,
# fractional timesteps), deterministic, eta ignored, S steps = S UNet calls (ldm/models/diffusion/lms.py)
SAMPLERS = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpmpp_2m": DPMPP2MSampler, "lms": LMSSampler}
# the samplers that add no noise after the start, so that eta does not apply (left out of a folder's plan)
NO_ETA = ("dpmpp_2m", "lms")


class GenerationPlanError(RunError):
    """``outdir`` already holds images generated from a different plan (one line naming the folder and the remedy:
    a run that meets it mid-work exits with status 2, ``runtime.cli.exit_on_run_error``)."""


class NonFiniteSampleError(RunError):
    """A model sampled NaN/inf latents or pixels: its images would be black (and score as a perfect eraser), so the
    run stops and none of the batch's images is written."""


def _image_name(index: int) -> str:
    return f"{index:05d}.png"


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How the images of one folder are sampled: every setting that ``generate_images`` shares across its images.

    The defaults are the paper's anchor generation (DDIM 200 steps, eta 1, CFG 6, 512x512, seeds ``42 + i``).
    ``sampler``: ``"ddim"``, ``"plms"`` (deterministic: needs ``eta=0``), ``"dpmpp_2m"`` (DPM-Solver++(2M)) or
    ``"lms"`` (diffusers' LMS; the last two are deterministic, ``eta`` does not apply; ``steps`` UNet calls). ``scale``
    is the classifier-free guidance scale (1 skips the unconditional half). ``batch_size`` is the images per sampler
    call; ``seed`` seeds image ``i`` with ``seed + i`` (unless ``generate_images`` gets per-image ``seeds``).
    ``precision="autocast"`` samples under fp16 autocast on CUDA (nothing on CPU), ``"full"`` is fp32 everywhere.
    ``fixed_code`` starts every image from one noise seeded ``seed``. ``noise``: ``"ours"`` (per-image CPU fp32
    generator) or ``"original"`` (the diffusers originals' CUDA fp16 draw, :func:`start_noise`; CUDA devices only).
    ``pixels``: ``"truncate"`` (the CompVis scripts') or ``"round"`` (diffusers' ``numpy_to_pil``), :func:`to_uint8`.

    Constructing one checks nothing (a job builds it from its settings and checks it when it checks those):
    call :meth:`validate`. Grouped so that the jobs, the plan of a folder and the sampler loop read one value
    instead of the same nine parameters at every call.
    """

    sampler: str = "ddim"
    steps: int = 200
    eta: float = 1.0
    scale: float = 6.0
    height: int = 512
    width: int = 512
    batch_size: int = 10
    seed: int = 42
    precision: str = "autocast"
    fixed_code: bool = False
    noise: str = "ours"
    pixels: str = "truncate"

    def validate(self, num_timesteps: int = 1000) -> Sampling:
        """Check the settings before any model is built; returns ``self``.

        ``num_timesteps`` is the model's training T (1000 for SD v1): with ``ddim``/``plms``, ``steps`` must fit
        its DDIM grid; with ``dpmpp_2m`` any ``steps`` < T does, with ``lms`` any ``steps`` <= T. Raises
        ``ValueError`` naming the setting.
        """
        batch_size, steps, sampler, eta = self.batch_size, self.steps, self.sampler, self.eta
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if sampler == "plms" and eta != 0:
            raise ValueError(f"sampler 'plms' is deterministic: eta must be 0, got {eta}")
        c = num_timesteps // steps if steps <= num_timesteps else 0
        if sampler == "dpmpp_2m":
            if steps >= num_timesteps:
                raise ValueError(f"steps={steps}: dpmpp_2m steps on distinct training timesteps, at most "
                                 f"{num_timesteps - 1}")
        elif sampler == "lms":
            if steps > num_timesteps:
                raise ValueError(f"steps={steps}: lms steps on fractional timesteps in [0, {num_timesteps - 1}], at "
                                 f"most {num_timesteps}")
        elif c < 1 or (num_timesteps - 1) // c * c + 1 >= num_timesteps:
            ok = [s for s in (10, 20, 25, 50, 100, 200, 250, 500) if s <= num_timesteps]
            raise ValueError(f"steps={steps} does not fit the uniform DDIM grid range(0, {num_timesteps}, "
                             f"{num_timesteps}//steps) + 1 (the last timestep would be {num_timesteps}); "
                             f"use e.g. one of {ok}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        # the limits of runtime.cli, shared with the flags and the per-row settings of prompt files
        for name, v in (("height", self.height), ("width", self.width)):
            if image_side_problem(v):
                raise ValueError(f"{name} must be {image_side_problem(v)}, got {v!r}")
        if guidance_problem(self.scale):
            raise ValueError(f"scale must be {guidance_problem(self.scale)}, got {self.scale!r}")
        if seed_problem(self.seed):
            raise ValueError(f"seed must be {seed_problem(self.seed)}, got {self.seed!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {self.noise!r}")
        if self.pixels not in PIXELS:
            raise ValueError(f"pixels must be one of {PIXELS}, got {self.pixels!r}")
        return self


def check_prompts(prompts) -> list[str]:
    """``prompts`` as a list, once it is a non-empty list of single-line strings (one entry per image).
    Raises ``TypeError`` (a single string, a non-string entry) or ``ValueError`` (empty, a line break)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings (one entry per image), not a single string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: nothing to generate")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings; entry {bad[0]} is {type(prompts[bad[0]]).__name__}")
    multiline = [i for i, p in enumerate(prompts) if "\n" in p or "\r" in p]
    if multiline:
        raise ValueError(f"prompt {multiline[0]} contains a line break; caption.txt holds one prompt per line")
    return prompts


def check_devices(devices) -> tuple[str, ...]:
    """``devices`` (one device or a sequence of them) as a tuple of strings, once each parses and CUDA is
    there when named. Raises ``ValueError`` (empty, CUDA missing) or ``RuntimeError`` (a nonsense name)."""
    if isinstance(devices, (str, torch.device)):
        devices = (devices,)
    devices = tuple(str(d) for d in devices)
    if not devices:
        raise ValueError("devices is empty")
    for d in devices:
        dev = torch.device(d)  # raises on nonsense
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {d!r} requested but CUDA is not available")
    return devices


def validate_generation_args(prompts, sampling: Sampling, devices=("cpu",),
                             num_timesteps: int = 1000) -> tuple[list[str], tuple[str, ...]]:
    """Check the arguments of ``generate_images`` before any model is built: :func:`check_prompts`,
    :meth:`Sampling.validate` (``num_timesteps``: the model's training T), :func:`check_devices`, in that order.

    Returns ``(prompts as a list, devices as a tuple)``; raises ``ValueError``/``TypeError``.
    """
    prompts = check_prompts(prompts)
    sampling.validate(num_timesteps)
    devices = check_devices(devices)
    check_noise(sampling.noise, devices)
    return prompts, devices


def check_noise(noise: str, devices) -> None:
    """Raise ``ValueError`` (one line) when ``noise="original"`` is asked of a device that is not CUDA: the
    originals draw their start noise with the CUDA generator, which no other device can reproduce."""
    other = [str(d) for d in devices if torch.device(d).type != "cuda"]
    if noise == "original" and other:
        raise ValueError(f"--noise original draws the start noise on CUDA in fp16, as the diffusers originals do; "
                         f"device {other[0]} cannot reproduce it: use a CUDA device or --noise ours")


def start_noise(shape, seed: int, device, noise: str = "ours") -> torch.Tensor:
    """The start noise ``[C, H, W]`` (fp32, on ``device``) of one image seeded ``seed``.

    ``"ours"``: ``torch.randn`` from a CPU generator seeded ``seed`` (what :class:`Runner` draws first from each
    image's generator). ``"original"``: what ConceptPrune's scripts draw after ``torch.manual_seed(seed)`` for a
    one-image diffusers call: ``prepare_latents`` calls ``randn_tensor`` without a generator, i.e. ``torch.randn``
    of shape ``[1, C, H, W]`` on the CUDA device in the pipeline's fp16, from the CUDA generator (``manual_seed``
    seeds it; a fresh CUDA generator seeded ``seed`` has the same state), times the PNDM ``init_noise_sigma`` 1;
    returned as fp32 (exact). Needs ``device`` to be CUDA (:func:`check_noise`).
    """
    if noise == "original":
        check_noise(noise, (device,))
        g = torch.Generator(device=device).manual_seed(seed)
        return torch.randn((1, *shape), generator=g, device=device, dtype=torch.float16)[0].float()
    if noise != "ours":
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def to_uint8(x: np.ndarray, pixels: str = "truncate") -> np.ndarray:
    """uint8 pixels of float images ``x`` in [0, 1]: ``"truncate"`` ``(255 * x).astype(uint8)`` (the CompVis
    scripts') or ``"round"`` ``(x * 255).round()`` (diffusers' ``numpy_to_pil``; numpy rounds halves to even)."""
    if pixels == "round":
        return (x * 255).round().astype(np.uint8)
    if pixels != "truncate":
        raise ValueError(f"pixels must be one of {PIXELS}, got {pixels!r}")
    return (255.0 * x).astype(np.uint8)


def plan_dict(sampling: Sampling, prompts: list[str], seeds: list[int] | None = None) -> dict:
    """The ``plan.json`` of a folder of ``prompts`` sampled with ``sampling`` (and per-image ``seeds``).

    Only the settings that choose the images are in it (not ``batch_size`` or ``precision``), with the keys and
    their order of version-1 folders: ``sampler``, ``fixed_code``, ``pixels`` and ``seeds`` are added (and
    ``noise`` reworded) only when not the default, so that folders made before these settings existed still
    match their plan.
    """
    s = sampling
    plan = {"version": _PLAN_VERSION, "noise": "per-image CPU generator seeded seed+index",
            "steps": s.steps, "eta": float(s.eta), "scale": float(s.scale), "height": s.height, "width": s.width,
            "seed": s.seed, "n_images": len(prompts), "prompts": prompts}
    if s.sampler != "ddim":
        plan["sampler"] = s.sampler
    if s.sampler in NO_ETA:  # deterministic: eta does not apply
        plan["eta"] = None
    if s.fixed_code:
        plan["fixed_code"] = True
    if s.pixels != "truncate":
        plan["pixels"] = s.pixels
    if seeds is not None:
        plan["noise"] = "per-image CPU generator seeded seeds[index]"
        plan["seeds"] = seeds
    if s.noise == "original":
        plan["noise"] = ("per-image CUDA fp16 randn after manual_seed(" + ("seeds[index]" if seeds is not None
                                                                          else "seed+index") + ") (original)")
    return plan


def plan_diff(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _batches(n_images: int, batch_size: int) -> list[list[int]]:
    return [list(range(s, min(s + batch_size, n_images))) for s in range(0, n_images, batch_size)]


def _pending_batches(samples: Path, n_images: int, batch_size: int,
                     size: tuple[int, int]) -> list[tuple[int, list[int]]]:
    """(batch index, image indices to write) of every batch that has a missing or damaged image."""
    pending = []
    for k, idx in enumerate(_batches(n_images, batch_size)):
        todo = [i for i in idx if not image_is_complete(samples / _image_name(i), size)]
        if todo:
            pending.append((k, todo))
    return pending


# ---------------------------------------------------------------------------------------- sampling
def latent_shape(model, height: int, width: int) -> tuple[int, int, int]:
    try:
        f = 2 ** (model.first_stage_model.decoder.num_resolutions - 1)
    except AttributeError:
        f = 8
    if height % f or width % f:
        raise ValueError(f"height/width ({height}x{width}) must be multiples of the VAE factor {f}")
    return (model.channels, height // f, width // f)


@torch.no_grad()
def sample_conditioned(model, sampling: Sampling, c: torch.Tensor, uc: torch.Tensor | None, x_T: torch.Tensor,
                       generators: list[torch.Generator],
                       finite: Callable[[torch.Tensor, str], None] | None = None) -> np.ndarray:
    """The uint8 images [B, H, W, 3] that ``sampling``'s sampler makes from the text conditionings ``c``
    ([B, 77, D]; ``uc`` the unconditional ones, None when ``sampling.scale`` is 1) and start codes ``x_T``
    ([B, *latent_shape]); ``generators`` (one per image, already past ``x_T``) draw each image's eta noise.
    ``finite(tensor, what)`` vets the latents and the decoded images (raising on NaN/inf: clamping would make
    them black pixels). The sampling step of :class:`Runner`, shared with callers that make their own
    conditionings (the attack job's checks); runs under whatever autocast context the caller holds."""
    sampler = SAMPLERS[sampling.sampler](model)
    # the generators continue after x_T: each image's eta noise is its own stream
    z, _ = sampler.sample(
        S=sampling.steps, batch_size=c.shape[0], shape=tuple(x_T.shape[1:]), conditioning=c,
        unconditional_conditioning=uc, unconditional_guidance_scale=sampling.scale, eta=sampling.eta,
        x_T=x_T, generator=generators, verbose=False, progress=False)
    if finite is not None:
        finite(z, "latents")
    x = model.decode_first_stage(z)  # the whole batch in one decoder call
    if finite is not None:
        finite(x, "decoded images")
    x = ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return to_uint8(x.permute(0, 2, 3, 1).cpu().numpy(), sampling.pixels)


class Runner:
    """Everything a process needs to sample its batches (built once per process)."""

    def __init__(self, model_factory, device: str, prompts, samples: Path, sampling: Sampling, seeds=None,
                 model: str | None = None):
        self.device = torch.device(device)
        built = model_factory(self.device)
        self.model = built.to(self.device).eval()
        self.prompts, self.samples, self.sampling, self.seeds = prompts, samples, sampling, seeds
        self.label = model or f"the model of {samples.parent}"  # names the model in errors
        self.size = (sampling.width, sampling.height)
        self.shape = latent_shape(self.model, sampling.height, sampling.width)
        use_amp = sampling.precision == "autocast" and self.device.type == "cuda"
        self.amp = (lambda: torch.autocast("cuda", dtype=torch.float16)) if use_amp else nullcontext
        self._uc = {}

    def _uncond(self, n: int):
        if n not in self._uc:
            self._uc[n] = self.model.get_learned_conditioning([""] * n)
        return self._uc[n]

    @torch.no_grad()
    def sample_batch(self, indices: list[int]) -> np.ndarray:
        """The uint8 images [B, H, W, 3] of the whole batch ``indices`` (fixed noise per image)."""
        s = self.sampling
        gens = [torch.Generator().manual_seed(s.seed + i if self.seeds is None else self.seeds[i])
                for i in indices]
        if s.noise == "original":  # the originals' CUDA fp16 draw; eta noise stays per image on the CPU
            seeds = [s.seed] * len(indices) if s.fixed_code else [s.seed + i if self.seeds is None else self.seeds[i]
                                                                   for i in indices]
            x_T = torch.stack([start_noise(self.shape, k, self.device, "original") for k in seeds])
        elif s.fixed_code:  # one start code shared by every image (eta noise stays per image)
            x_T = torch.randn(self.shape, generator=torch.Generator().manual_seed(s.seed))
            x_T = x_T.expand(len(indices), *self.shape).to(self.device)
        else:
            x_T = torch.stack([torch.randn(self.shape, generator=g) for g in gens]).to(self.device)
        with self.amp():
            c = self.model.get_learned_conditioning([self.prompts[i] for i in indices])
            uc = self._uncond(len(indices)) if s.scale != 1.0 else None
            return sample_conditioned(self.model, s, c, uc, x_T, gens,
                                      finite=lambda t, what: self._check_finite(t, what, indices))

    def _check_finite(self, t: torch.Tensor, what: str, indices: list[int]) -> None:
        """Raise :class:`NonFiniteSampleError` if ``t`` holds NaN/inf (clamping would turn them into black
        pixels). One reduction per batch: nothing next to the sampler's steps."""
        if bool(torch.isfinite(t).all()):
            return
        bad = sorted({indices[i] for i in range((t.shape[0])) if not bool(torch.isfinite(t[i]).all())})
        amp = (" (sampled under fp16 autocast: full precision may avoid an overflow)"
               if self.sampling.precision == "autocast" and self.device.type == "cuda" else "")
        raise NonFiniteSampleError(
            f"{self.label}: sampling gave NaN or inf {what} for {len(bad)} of {len(indices)} images of the batch "
            f"(image {bad[0]} of {self.samples.parent}); its weights are broken or overflow{amp}. Stopped: no "
            f"image of this batch was written, and this model is not scored")

    def run_batch(self, indices: list[int], todo: list[int]) -> None:
        """Sample the whole batch ``indices`` and write the images in ``todo``."""
        todo = set(todo)
        arrays = self.sample_batch(indices)
        for row, i in enumerate(indices):
            if i in todo:
                save_png_atomic(arrays[row], self.samples / _image_name(i))

    def close(self):
        dev = self.device
        del self.model
        self._uc.clear()
        # the model sits in reference cycles: without a collection a caller that generates several folders
        # (evaluate.py) held every model it had loaded until the collector ran (13 GB at SD size, not 4.8)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _worker(rank: int, devices, jobs_by_rank, runner_args, desc, told=None):
    """Spawned process ``rank``: sample its batches ``jobs_by_rank[rank]`` on ``devices[rank]``. An error whose
    message says it all (``runtime.cli.run_error_status``: a broken model, a damaged record, a full disk) also
    goes to the queue ``told``, for the parent to raise as it is (:func:`_portable`)."""
    mine = jobs_by_rank[rank]
    if not mine:
        return
    device = devices[rank]
    if torch.device(device).type == "cuda" and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))  # default-device allocations land on this GPU too
    if torch.device(device).type == "cpu":  # several CPU workers: do not oversubscribe the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(devices)))
    try:
        runner = Runner(runner_args["model_factory"], device, **runner_args["kwargs"])
        with tqdm(total=sum(len(idx) for _, idx, _ in mine), desc=f"{desc} [{device}]", unit="img",
                  position=rank, dynamic_ncols=True) as bar:
            for _, indices, todo in mine:
                runner.run_batch(indices, todo)
                bar.update(len(indices))
        runner.close()
    except Exception as e:
        if told is not None and run_error_status(e) is not None:
            told.put(_portable(e))
        # torch.multiprocessing re-raises this in the parent with the full (chained) traceback.
        raise RuntimeError(f"generation worker {rank} on device {device} failed: {e!r}") from e


def _portable(e: Exception) -> Exception:
    """``e`` as it can cross to the parent process: itself where it survives pickling with its message and class,
    else the same message as a :class:`WriteError` (a full disk: exit status 1) or a :class:`RunError` (status 2,
    as for every other error of ``runtime.cli.run_error_status``), e.g. for an error class whose constructor
    takes other arguments than its message."""
    try:
        copy = pickle.loads(pickle.dumps(e))
        if type(copy) is type(e) and str(copy) == str(e):
            return copy
    except Exception:  # any failure to pickle or rebuild it: send its message instead
        pass
    if isinstance(e, WriteError):
        return WriteError(e.errno or 0, str(e))
    return RunError(str(e))


# ---------------------------------------------------------------------------------------- public API
def generate_images(model_factory: Callable[[torch.device], "torch.nn.Module"], prompts: list[str],
                    outdir: str | os.PathLike, sampling: Sampling, *, seeds: Sequence[int] | None = None,
                    devices: Sequence[str] | str = ("cpu",), desc: str = "generating",
                    shard: tuple[int, int] | None = None, model: str | None = None) -> Path:
    """Generate one image per entry of ``prompts`` into ``outdir`` with ``sampling``; returns ``outdir`` as a Path.

    ``prompts`` is the full per-image list (repeat a prompt n times for n images).
    ``model_factory(device) -> LatentDiffusion`` is called once per process that has work to do
    (never when everything already exists); with several ``devices`` it must be picklable (a
    module-level function or a ``functools.partial`` of one), since one process per device is
    spawned and batch ``k`` goes to device ``k % len(devices)``. ``sampling`` (a :class:`Sampling`, checked
    here) holds the sampler and its settings; with ``dpmpp_2m`` and ``lms`` its ``eta`` does not apply and is left
    out of the plan. See the module docstring for the folder layout, seeding and resume rules.

    ``shard=(rank, world)``: one of ``world`` processes started by an external launcher (torchrun, a cluster's)
    that all call this with the same arguments, in a process group joined with
    ``runtime.dist.init_from_launcher``. Batch ``k`` is made by rank ``k % world`` only (on this process's
    ``devices``), every rank waits for the others, rank 0 writes ``images.txt``/``caption.txt``, and all
    return once they exist: each image is made exactly once, seeded by its index as always.

    ``seeds``: one seed per image (same length as ``prompts``) instead of ``seed + index``, for benchmark
    prompt sets whose rows carry their own seed (image ``i`` then draws from a generator seeded ``seeds[i]``;
    ``sampling.seed`` is not used). The list is part of the plan.

    ``model`` names the model in errors (e.g. ``"--unet esd=esd.pt"``; default: "the model of ``outdir``"): a batch
    that samples NaN/inf stops the call with :class:`NonFiniteSampleError` before any of its images is written.

    Raises ``ValueError``/``TypeError`` (arguments, before any model is built), ``GenerationPlanError``,
    ``runtime.files.DamagedFileError`` (an unreadable ``plan.json``: never guessed, the folder is not resumed),
    :class:`NonFiniteSampleError`, ``ldm.checkpoint.CheckpointError`` (a model file found broken while loading) and
    ``runtime.files.WriteError`` (disk full); with several ``devices`` a worker's error of those classes
    (``runtime.cli.run_error_status``) reaches the caller as it is, with its one-line message.
    """
    prompts, devices = validate_generation_args(prompts, sampling, devices)
    if seeds is not None:
        seeds = [int(x) for x in seeds]
        if len(seeds) != len(prompts) or any(x < 0 or x >= 2 ** 63 for x in seeds):
            raise ValueError(f"seeds must hold one integer in [0, 2**63) per prompt ({len(prompts)}), "
                             f"got {len(seeds)} values")
        if sampling.fixed_code:
            raise ValueError("fixed_code shares one start code; it cannot be combined with per-image seeds")
    if sampling.sampler in NO_ETA:  # its sampler refuses an eta; the plan records none
        sampling = replace(sampling, eta=0.0)
    batch_size = sampling.batch_size
    outdir = Path(outdir)
    samples = outdir / "samples"
    names = [f"samples/{_image_name(i)}" for i in range(len(prompts))]
    plan = plan_dict(sampling, prompts, seeds)
    images_txt, caption_txt, plan_file = outdir / "images.txt", outdir / "caption.txt", outdir / PLAN_FILE

    # --- is this folder ours (same plan)?
    if plan_file.exists():
        old = read_json(plan_file, "the generation plan", f"delete the folder {outdir} to generate its images "
                                                            f"again, or use another outdir")
        diff = plan_diff(old, plan)
        if diff:
            raise GenerationPlanError(
                f"{outdir} was generated with a different plan (differs in: {', '.join(diff)}). "
                f"Refusing to mix two data sets: delete {outdir} or choose another outdir.")
    if caption_txt.exists() and read_text_lines(caption_txt) != prompts:
        raise GenerationPlanError(
            f"{caption_txt} lists other prompts than requested ({len(read_text_lines(caption_txt))} lines vs "
            f"{len(prompts)} prompts). Refusing to mix two data sets: delete {outdir} or choose another outdir.")
    if not plan_file.exists() and not caption_txt.exists() and samples.is_dir() and any(samples.glob("*.png")):
        raise GenerationPlanError(
            f"{samples} holds images but {outdir} has neither {PLAN_FILE} nor caption.txt, so their prompts "
            f"are unknown. Refusing to mix: delete {outdir} or choose another outdir.")

    size = (sampling.width, sampling.height)
    done_lists = (images_txt.exists() and caption_txt.exists() and read_text_lines(images_txt) == names)
    pending = _pending_batches(samples, len(prompts), batch_size, size)
    if done_lists and not pending and shard is None:  # (sharded: every rank still joins the barriers below)
        print(f"{outdir}: all {len(prompts)} images already generated; nothing to do")
        return outdir
    if shard is not None:
        rank, world = shard
        pending = [(k, todo) for k, todo in pending if k % world == rank]

    if pending and len(devices) > 1:
        try:
            pickle.dumps(model_factory)
        except Exception as e:
            raise TypeError(f"with several devices model_factory must be picklable (a module-level function "
                            f"or a functools.partial of one), got {model_factory!r}: {e}") from e

    samples.mkdir(parents=True, exist_ok=True)
    write_text_atomic(plan_file, json.dumps(plan, indent=1) + "\n")
    for stale in samples.glob(".*.tmp"):  # leftovers of a killed run (never a finished image)
        if temp_in_use(stale):  # another process writing in this folder right now
            continue
        owner = int(stale.name[1:6]) // batch_size % shard[1] if shard and stale.name[1:6].isdigit() else None
        if shard is None or owner == shard[0]:  # other ranks may be writing theirs right now
            stale.unlink(missing_ok=True)

    if pending:
        n_todo = sum(len(t) for _, t in pending)
        print(f"{outdir}: generating {n_todo} of {len(prompts)} images "
              f"({len(pending)} batches of <= {batch_size}) on {', '.join(devices)}"
              + (f" (rank {shard[0]} of {shard[1]})" if shard else ""))
        all_batches = _batches(len(prompts), batch_size)
        # (k, indices of the whole batch, indices to write); batch k goes to rank k % n.
        jobs = [(k, all_batches[k], todo) for k, todo in pending]
        kwargs = dict(prompts=prompts, samples=samples, sampling=sampling, seeds=seeds, model=model)
        if len(devices) == 1:
            runner = Runner(model_factory, devices[0], **kwargs)
            try:
                with tqdm(total=sum(len(b) for _, b, _ in jobs), desc=desc, unit="img", dynamic_ncols=True) as bar:
                    for _, indices, todo in jobs:
                        runner.run_batch(indices, todo)
                        bar.update(len(indices))
            finally:
                runner.close()
        else:
            import torch.multiprocessing as mp

            # batch k belongs to device k % n; devices left without work get no process
            by_rank = [[] for _ in devices]
            for job in jobs:
                by_rank[job[0] % len(devices)].append(job)
            active = [r for r in range(len(devices)) if by_rank[r]]
            told = mp.get_context("spawn").SimpleQueue()
            try:
                mp.start_processes(_worker, args=([devices[r] for r in active], [by_rank[r] for r in active],
                                                  {"model_factory": model_factory, "kwargs": kwargs}, desc, told),
                                   nprocs=len(active), join=True, start_method="spawn")
            except mp.ProcessRaisedException:
                if told.empty():
                    raise
                raise told.get() from None  # a worker's one-line error, as the one-process path raises it

    if shard is not None:
        from runtime.dist import barrier

        barrier()  # every rank's share is written
    missing = [n for n in names if not image_is_complete(outdir / n, size)]
    if missing:
        raise RuntimeError(f"{len(missing)} images still missing after generation, e.g. {outdir / missing[0]}")
    if shard is None or shard[0] == 0:
        write_text_atomic(caption_txt, "".join(p + "\n" for p in prompts))
        write_text_atomic(images_txt, "".join(n + "\n" for n in names))
    if shard is not None:
        barrier()  # the lists exist for every rank that reads them next
    return outdir

