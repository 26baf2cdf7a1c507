"""Samplers of the 2D diffusers family: diffusers' own schedulers behind the
:class:`~diffugts.networks.backbones.base.Sampler` interface of pseudo-healthy synthesis."""

from __future__ import annotations

from diffugts.errors import ConfigError
from diffugts.networks.backbones.base import ScheduleSampler, grid_size

# Schedulers whose denoiser input is the unscaled latent and whose step only needs
# (model output, t, z_t): the ones :class:`NativeSampler` can drive. Euler / Heun / LMS
# scale the model input by sigma, which :meth:`Backbone.denoise` does not know about.
NATIVE_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
)


def scheduler_args(sched: dict) -> dict:
    return {k: v for k, v in sched.get("args", {}).items() if not k.startswith("_")}


class DDIMSampler(ScheduleSampler):
    """diffusers' DDIMScheduler (deterministic, eta = 0) over the betas the model was trained
    with (taken from the package's scheduler configuration, whatever its class)."""

    def __init__(self, sched: dict):
        from diffusers import DDIMScheduler

        # Latents are not images: never clip the predicted x0 to [-1, 1].
        self.s = DDIMScheduler.from_config({**scheduler_args(sched), "clip_sample": False})
        self.num_train_timesteps = int(self.s.config.num_train_timesteps)


class NativeSampler(DDIMSampler):
    """The scheduler the model folder ships (``sampler: native``), on its own timestep grid.

    Multistep solvers keep a history between steps: they are only right when called once per
    timestep, in order, so RePaint jumps (which revisit a timestep) are refused.
    """

    def __init__(self, sched: dict):
        import diffusers

        name = sched.get("class", "")
        if name not in NATIVE_SCHEDULERS:
            raise ConfigError(
                f"scheduler {name!r} is not supported for inpainting (supported: "
                f"{', '.join(NATIVE_SCHEDULERS)}); use the backbone's 'sampler': 'ddim'"
            )
        args = scheduler_args(sched)
        if "clip_sample" in args:
            args["clip_sample"] = False
        self.s = getattr(diffusers, name).from_config(args)
        self.num_train_timesteps = int(self.s.config.num_train_timesteps)
        self._expect: list[float] = []

    def timesteps(self, strength: float, steps: int) -> list[float]:
        self.s.set_timesteps(grid_size(self.num_train_timesteps, strength, steps))
        grid = [float(t) for t in self.s.timesteps]
        begin = next((i for i, t in enumerate(grid) if t <= strength * self.num_train_timesteps), len(grid) - 1)
        if hasattr(self.s, "set_begin_index"):
            self.s.set_begin_index(begin)
        self._expect = grid[begin:]
        return self._expect[:steps]

    def step(self, model_out, t, t_next, z_t):
        if not self._expect or abs(self._expect[0] - float(t)) > 1e-3:
            raise ConfigError(
                f"{type(self.s).__name__} steps through its timesteps once, in order; RePaint "
                "jumps need the backbone's 'sampler': 'ddim'"
            )
        self._expect.pop(0)
        return self.s.step(model_out, int(t), z_t).prev_sample
