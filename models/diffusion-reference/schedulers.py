"""DDIM and Euler discrete schedules and steps, as diffusers defines them, in numpy.

Written from diffusers' `scheduling_ddim.py` and `scheduling_euler_discrete.py` (the
deterministic paths: DDIM with eta = 0, Euler with s_churn = 0) for epsilon prediction, the
"scaled_linear" or "linear" beta schedule and "leading" timestep spacing, configured from a
diffusers `scheduler_config.json`. Schedules are computed in f64; the latents stay f32 between
steps (each step computes in f64 and rounds once).

    betas (scaled_linear) = linspace(sqrt(beta_start), sqrt(beta_end), T)^2   (linear: linspace(beta_start, beta_end, T))
    alphas_cumprod        = cumprod(1 - betas)
    timesteps (leading)   = arange(N)[::-1] * (T // N) + steps_offset
    DDIM   init sigma 1;  model input = latents
           a_t = alphas_cumprod[t], a_prev = alphas_cumprod[t - T//N] (or alphas_cumprod[0] when
           t - T//N < 0 and set_alpha_to_one is false, else 1)
           x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t);  x' = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
    Euler  sigma(t) = sqrt((1 - a_t) / a_t), sigmas = [sigma(t) for t in timesteps] + [0]
           init sigma = sqrt(max(sigmas)^2 + 1);  model input = x / sqrt(sigma_i^2 + 1)
           x' = x + eps (sigma_{i+1} - sigma_i)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEDULERS = ("ddim", "euler")


class SchedulerConfigError(ValueError):
    """A scheduler_config.json value this implementation does not support."""


@dataclass(frozen=True)
class TrainSchedule:
    """The training noise schedule from scheduler_config.json."""

    num_train_timesteps: int
    alphas_cumprod: np.ndarray  # f64 [T]
    steps_offset: int
    set_alpha_to_one: bool

    @staticmethod
    def from_config(config: dict) -> "TrainSchedule":
        def get(key, default):
            value = config.get(key, default)
            return default if value is None else value

        if get("prediction_type", "epsilon") != "epsilon":
            raise SchedulerConfigError(f"prediction_type {config['prediction_type']!r} is not supported (only \"epsilon\")")
        if get("timestep_spacing", "leading") != "leading":
            raise SchedulerConfigError(f"timestep_spacing {config['timestep_spacing']!r} is not supported (only \"leading\")")
        if config.get("trained_betas") is not None:
            raise SchedulerConfigError("trained_betas is not supported")
        if get("clip_sample", False):
            raise SchedulerConfigError("clip_sample = true is not supported")
        if get("thresholding", False):
            raise SchedulerConfigError("thresholding = true is not supported")
        if get("rescale_betas_zero_snr", False):
            raise SchedulerConfigError("rescale_betas_zero_snr = true is not supported")
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if get(key, False):
                raise SchedulerConfigError(f"{key} = true is not supported")
        if get("interpolation_type", "linear") != "linear":
            raise SchedulerConfigError("interpolation_type other than \"linear\" is not supported")
        if get("final_sigmas_type", "zero") != "zero":
            raise SchedulerConfigError("final_sigmas_type other than \"zero\" is not supported")
        if get("timestep_type", "discrete") != "discrete":
            raise SchedulerConfigError("timestep_type other than \"discrete\" is not supported")

        T = int(get("num_train_timesteps", 1000))
        beta_start = float(get("beta_start", 0.0001))
        beta_end = float(get("beta_end", 0.02))
        schedule = get("beta_schedule", "linear")
        if schedule == "scaled_linear":
            betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
        elif schedule == "linear":
            betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
        else:
            raise SchedulerConfigError(f"beta_schedule {schedule!r} is not supported (scaled_linear, linear)")
        return TrainSchedule(
            num_train_timesteps=T,
            alphas_cumprod=np.cumprod(1.0 - betas),
            steps_offset=int(get("steps_offset", 0)),
            # diffusers' DDIMScheduler default is true; Stable Diffusion configs say false
            set_alpha_to_one=bool(get("set_alpha_to_one", True)),
        )

    def timesteps(self, steps: int) -> np.ndarray:
        """Leading spacing: int64 [steps], descending."""
        if not 1 <= steps <= self.num_train_timesteps:
            raise SchedulerConfigError(f"steps must be in 1..={self.num_train_timesteps}, got {steps}")
        ratio = self.num_train_timesteps // steps
        timesteps = (np.arange(steps, dtype=np.int64) * ratio)[::-1] + self.steps_offset
        if timesteps[0] >= self.num_train_timesteps:
            # e.g. 1000 steps with steps_offset 1 would start at t = 1000 (diffusers' DDIM fails there too)
            raise SchedulerConfigError(f"{steps} steps with steps_offset {self.steps_offset} start at timestep "
                                       f"{timesteps[0]}, past the {self.num_train_timesteps} training timesteps")
        return timesteps


class Ddim:
    """DDIM, eta = 0."""

    name = "ddim"

    def __init__(self, schedule: TrainSchedule, steps: int):
        self.schedule = schedule
        self.timesteps = schedule.timesteps(steps)
        self.ratio = schedule.num_train_timesteps // steps
        ac = schedule.alphas_cumprod
        final = 1.0 if schedule.set_alpha_to_one else float(ac[0])
        self.alpha_t = np.array([ac[t] for t in self.timesteps])
        self.alpha_prev = np.array([ac[t - self.ratio] if t - self.ratio >= 0 else final for t in self.timesteps])
        self.init_noise_sigma = 1.0

    def scale_model_input(self, latents: np.ndarray, i: int) -> np.ndarray:
        return latents

    def step(self, eps: np.ndarray, i: int, latents: np.ndarray) -> np.ndarray:
        a_t, a_prev = self.alpha_t[i], self.alpha_prev[i]
        x = latents.astype(np.float64)
        e = eps.astype(np.float64)
        x0 = (x - np.sqrt(1.0 - a_t) * e) / np.sqrt(a_t)
        return (np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * e).astype(np.float32)

    def describe(self) -> dict:
        return {"timesteps": self.timesteps.tolist(), "init_noise_sigma": self.init_noise_sigma,
                "alpha_prod_t": self.alpha_t.tolist(), "alpha_prod_t_prev": self.alpha_prev.tolist()}


class Euler:
    """Euler discrete, s_churn = 0."""

    name = "euler"

    def __init__(self, schedule: TrainSchedule, steps: int):
        self.schedule = schedule
        self.timesteps = schedule.timesteps(steps)
        ac = schedule.alphas_cumprod
        sig = np.sqrt((1.0 - ac) / ac)
        # np.interp at integer timesteps is the table value itself
        self.sigmas = np.concatenate([sig[self.timesteps], [0.0]])
        self.init_noise_sigma = float(np.sqrt(self.sigmas.max() ** 2 + 1.0))

    def scale_model_input(self, latents: np.ndarray, i: int) -> np.ndarray:
        s = self.sigmas[i]
        return (latents.astype(np.float64) / np.sqrt(s * s + 1.0)).astype(np.float32)

    def step(self, eps: np.ndarray, i: int, latents: np.ndarray) -> np.ndarray:
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return (latents.astype(np.float64) + eps.astype(np.float64) * dt).astype(np.float32)

    def describe(self) -> dict:
        return {"timesteps": self.timesteps.tolist(), "init_noise_sigma": self.init_noise_sigma,
                "sigmas": self.sigmas.tolist()}


def make(name: str, config: dict, steps: int):
    """The scheduler `name` ("ddim" | "euler") for `steps` steps, configured from scheduler_config.json."""
    schedule = TrainSchedule.from_config(config)
    if name == "ddim":
        return Ddim(schedule, steps)
    if name == "euler":
        return Euler(schedule, steps)
    raise SchedulerConfigError(f"unknown scheduler {name!r} (known: {', '.join(SCHEDULERS)})")
