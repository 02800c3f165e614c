#!/usr/bin/env python3
"""Compare schedulers.py with diffusers' own DDIMScheduler and EulerDiscreteScheduler.

One-off (diffusers needs torch, which the project's environment does not carry):

    python3 -m venv /tmp/sdv && /tmp/sdv/bin/pip install -r models/diffusion-reference/requirements-verify.txt
    OMP_NUM_THREADS=1 /tmp/sdv/bin/python models/diffusion-reference/verify_schedulers.py

For the bundle's scheduler_config.json and several step counts it compares the timesteps
(exactly), alphas_cumprod, DDIM's alpha_prod_t / alpha_prod_t_prev, Euler's sigmas and
init_noise_sigma (relative 1e-6, sigmas 1e-5: diffusers computes the betas in float32, and
sigma = sqrt((1 - a) / a) amplifies that where 1 - a is small), and 50 random
trajectories of step() and scale_model_input() (1e-5 relative to max(1, |latents|); random
noise predictions let Euler's latents grow to tens).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import schedulers  # noqa: E402


def close(a, b, rel=1e-6, what=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))
    assert a.shape == b.shape and err <= rel, f"{what}: relative error {err}"
    return err


def main() -> int:
    torch.set_num_threads(1)
    with open(os.path.join(HERE, "sd-inpaint", "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    worst = {}
    rng = np.random.default_rng(0)
    for steps in (1, 7, 20, 30, 50, 500):
        ours_d = schedulers.make("ddim", config, steps)
        ref_d = DDIMScheduler.from_config(config)
        ref_d.set_timesteps(steps)
        assert ours_d.timesteps.tolist() == ref_d.timesteps.tolist(), f"ddim timesteps at {steps}"
        worst["alphas_cumprod"] = close(ours_d.schedule.alphas_cumprod, ref_d.alphas_cumprod.numpy(), what="alphas_cumprod")
        ours_e = schedulers.make("euler", config, steps)
        ref_e = EulerDiscreteScheduler.from_config(config)
        ref_e.set_timesteps(steps)
        assert ours_e.timesteps.tolist() == ref_e.timesteps.numpy().astype(np.int64).tolist(), f"euler timesteps at {steps}"
        worst["sigmas"] = max(worst.get("sigmas", 0), close(ours_e.sigmas[:-1], ref_e.sigmas.numpy()[:-1], rel=1e-5, what="sigmas"))
        assert ours_e.sigmas[-1] == 0.0 == float(ref_e.sigmas[-1])
        worst["init_noise_sigma"] = close(ours_e.init_noise_sigma, float(ref_e.init_noise_sigma), what="init sigma")
        assert ours_d.init_noise_sigma == ref_d.init_noise_sigma == 1.0

        for _ in range(50 if steps <= 50 else 2):
            x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
            xd, xe = x.copy(), (x * ours_e.init_noise_sigma).astype(np.float32)
            td, te = torch.from_numpy(xd.copy()), torch.from_numpy(xe.copy())
            ref_d.set_timesteps(steps)
            ref_e.set_timesteps(steps)
            for i in range(steps):
                eps = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
                xd = ours_d.step(eps, i, xd)
                td = ref_d.step(torch.from_numpy(eps), ref_d.timesteps[i], td).prev_sample
                scaled = ours_e.scale_model_input(xe, i)
                scaled_ref = ref_e.scale_model_input(te, ref_e.timesteps[i])
                err = np.max(np.abs(scaled - scaled_ref.numpy())) / max(1.0, float(np.max(np.abs(scaled))))
                assert err <= 1e-5, f"euler scale_model_input: {err}"
                xe = ours_e.step(eps, i, xe)
                te = ref_e.step(torch.from_numpy(eps), ref_e.timesteps[i], te).prev_sample
            scale = max(1.0, float(np.max(np.abs(xe))))
            worst["ddim_step"] = max(worst.get("ddim_step", 0),
                                     float(np.max(np.abs(xd - td.numpy()))) / max(1.0, float(np.max(np.abs(xd)))))
            worst["euler_step"] = max(worst.get("euler_step", 0), float(np.max(np.abs(xe - te.numpy()))) / scale)
        print(f"ok   steps={steps}: timesteps {ours_d.timesteps[:3].tolist()}..{ours_d.timesteps[-1]}, "
              f"euler init sigma {ours_e.init_noise_sigma:.6f}")
    try:
        schedulers.make("ddim", config, 1000)
        raise AssertionError("1000 steps with steps_offset 1 must be refused")
    except schedulers.SchedulerConfigError as e:
        print(f"ok   refused: {e}")
    assert worst["ddim_step"] <= 1e-5 and worst["euler_step"] <= 1e-5, worst
    print("worst differences:", {k: f"{v:.2e}" for k, v in worst.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
