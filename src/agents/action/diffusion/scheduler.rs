//! DDIM and Euler discrete schedulers as diffusers defines them (`scheduling_ddim.py` with
//! eta = 0, `scheduling_euler_discrete.py` with s_churn = 0; epsilon prediction), configured
//! from an export's `scheduler/scheduler_config.json`: small pure types, `set_timesteps(n)` then
//! `scale_model_input(sample, t)` and `step(eps, t, sample)` per timestep.
//!
//! ```text
//! betas (scaled_linear) = linspace(sqrt(beta_start), sqrt(beta_end), T)^2   (linear: linspace(beta_start, beta_end, T))
//! alphas_cumprod        = cumprod(1 - betas)                                  (f64)
//! timesteps (leading)   = arange(N)[::-1] * (T // N) + steps_offset
//! DDIM   x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t);  x' = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
//!        a_prev = alphas_cumprod[t - T//N], or (t - T//N < 0) 1 with set_alpha_to_one, else alphas_cumprod[0]
//! Euler  sigma(t) = sqrt((1 - a_t) / a_t), then 0;  init sigma = sqrt(max sigma^2 + 1)
//!        model input = x / sqrt(sigma_i^2 + 1);  x' = x + eps (sigma_{i+1} - sigma_i)
//! ```
//!
//! Step arithmetic is f64 on the f32 latents, rounded to f32 once per step, exactly as the
//! Python reference (`models/diffusion-reference/schedulers.py`) does.

use std::sync::Arc;

use anyhow::{bail, Context};
use serde_json::Value;

/// Which scheduler a bundle asks for (`scheduler` in `[action.tools.diffusion-inpaint]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Euler,
}

impl SchedulerKind {
    pub const ALL: &'static [SchedulerKind] = &[SchedulerKind::Ddim, SchedulerKind::Euler];

    pub fn parse(name: &str) -> anyhow::Result<SchedulerKind> {
        match name {
            "ddim" => Ok(SchedulerKind::Ddim),
            "euler" => Ok(SchedulerKind::Euler),
            other => bail!("unknown scheduler {other:?} (known: \"ddim\", \"euler\")"),
        }
    }

    /// The name in bundles and the `scheduler` label of the step metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
        }
    }
}

/// The training noise schedule of `scheduler_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSchedule {
    pub num_train_timesteps: usize,
    pub alphas_cumprod: Vec<f64>,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
}

impl TrainSchedule {
    /// Reads a diffusers scheduler config; values this implementation cannot follow are
    /// refused, naming the key.
    pub fn from_config(config: &Value) -> anyhow::Result<TrainSchedule> {
        let Value::Object(map) = config else {
            bail!("the scheduler config is not a JSON object");
        };
        // diffusers treats a null like an absent key.
        let get = |key: &str| map.get(key).filter(|v| !v.is_null());
        let text = |key: &str, default: &'static str| -> anyhow::Result<String> {
            match get(key) {
                None => Ok(default.to_string()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => bail!("{key} must be a string, got {other}"),
            }
        };
        let flag = |key: &str, default: bool| -> anyhow::Result<bool> {
            match get(key) {
                None => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => bail!("{key} must be true or false, got {other}"),
            }
        };
        let number = |key: &str, default: f64| -> anyhow::Result<f64> {
            match get(key) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .with_context(|| format!("{key} must be a number, got {v}")),
            }
        };
        let count = |key: &str, default: u64| -> anyhow::Result<usize> {
            match get(key) {
                None => Ok(default as usize),
                Some(v) => v
                    .as_u64()
                    .map(|n| n as usize)
                    .with_context(|| format!("{key} must be a non-negative integer, got {v}")),
            }
        };
        let only = |key: &str, default: &'static str, supported: &str| -> anyhow::Result<()> {
            let value = text(key, default)?;
            if value != supported {
                bail!("{key} {value:?} is not supported (only {supported:?})");
            }
            Ok(())
        };
        // v_prediction (SD 2's 768 px models) and sample prediction need other step formulas.
        only("prediction_type", "epsilon", "epsilon")?;
        // diffusers' DDIM default; note its Euler default would be "linspace".
        only("timestep_spacing", "leading", "leading")?;
        only("interpolation_type", "linear", "linear")?;
        only("final_sigmas_type", "zero", "zero")?;
        only("timestep_type", "discrete", "discrete")?;
        if get("trained_betas").is_some() {
            bail!("trained_betas is not supported");
        }
        for key in [
            "clip_sample",
            "thresholding",
            "rescale_betas_zero_snr",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
        ] {
            if flag(key, false)? {
                bail!("{key} = true is not supported");
            }
        }
        let t = count("num_train_timesteps", 1000)?;
        if t < 2 {
            bail!("num_train_timesteps must be at least 2, got {t}");
        }
        let beta_start = number("beta_start", 0.0001)?;
        let beta_end = number("beta_end", 0.02)?;
        let betas = match text("beta_schedule", "linear")?.as_str() {
            "scaled_linear" => linspace(beta_start.powf(0.5), beta_end.powf(0.5), t)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            "linear" => linspace(beta_start, beta_end, t),
            other => {
                bail!("beta_schedule {other:?} is not supported (\"scaled_linear\", \"linear\")")
            }
        };
        if betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            bail!("beta_start and beta_end must give betas in [0, 1)");
        }
        let mut product = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                product *= 1.0 - b;
                product
            })
            .collect();
        Ok(TrainSchedule {
            num_train_timesteps: t,
            alphas_cumprod,
            steps_offset: count("steps_offset", 0)?,
            // diffusers' DDIMScheduler default; Stable Diffusion's configs say false.
            set_alpha_to_one: flag("set_alpha_to_one", true)?,
        })
    }

    /// Leading spacing: `steps` timesteps, descending. Refuses counts whose first timestep
    /// would be past the training schedule (e.g. 1000 steps with steps_offset 1).
    pub fn timesteps(&self, steps: usize) -> anyhow::Result<Vec<usize>> {
        let t = self.num_train_timesteps;
        if !(1..=t).contains(&steps) {
            bail!("steps must be in 1..={t}, got {steps}");
        }
        let ratio = t / steps;
        let first = (steps - 1) * ratio + self.steps_offset;
        if first >= t {
            bail!(
                "{steps} steps with steps_offset {} start at timestep {first}, past the {t} \
                 training timesteps",
                self.steps_offset
            );
        }
        Ok((0..steps)
            .rev()
            .map(|i| i * ratio + self.steps_offset)
            .collect())
    }
}

/// numpy's `linspace(start, stop, n)`: `i * step + start`, the last value exactly `stop`.
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    if let Some(last) = v.last_mut() {
        *last = stop;
    }
    v
}

/// DDIM, eta = 0.
#[derive(Debug, Clone)]
pub struct Ddim {
    train: Arc<TrainSchedule>,
    timesteps: Vec<usize>,
    ratio: usize,
}

impl Ddim {
    pub fn new(train: Arc<TrainSchedule>) -> Ddim {
        Ddim {
            train,
            timesteps: Vec::new(),
            ratio: 0,
        }
    }

    pub fn set_timesteps(&mut self, steps: usize) -> anyhow::Result<()> {
        self.timesteps = self.train.timesteps(steps)?;
        self.ratio = self.train.num_train_timesteps / steps;
        Ok(())
    }

    /// `(a_t, a_prev)` of timestep `t`.
    pub fn alphas(&self, t: usize) -> anyhow::Result<(f64, f64)> {
        let ac = &self.train.alphas_cumprod;
        let a_t = *ac
            .get(t)
            .with_context(|| format!("timestep {t} is past the schedule"))?;
        let a_prev = match t.checked_sub(self.ratio) {
            Some(prev) => ac[prev],
            None if self.train.set_alpha_to_one => 1.0,
            None => ac[0],
        };
        Ok((a_t, a_prev))
    }

    pub fn step(&self, eps: &[f32], t: usize, sample: &[f32]) -> anyhow::Result<Vec<f32>> {
        let (a_t, a_prev) = self.alphas(t)?;
        let (c_eps, s_t) = ((1.0 - a_t).sqrt(), a_t.sqrt());
        let (s_prev, c_prev) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
        Ok(zip(eps, sample)?
            .map(|(e, x)| {
                let (e, x) = (f64::from(e), f64::from(x));
                let x0 = (x - c_eps * e) / s_t;
                (s_prev * x0 + c_prev * e) as f32
            })
            .collect())
    }
}

/// Euler discrete, s_churn = 0.
#[derive(Debug, Clone)]
pub struct Euler {
    train: Arc<TrainSchedule>,
    timesteps: Vec<usize>,
    /// One per timestep, then 0.
    sigmas: Vec<f64>,
}

impl Euler {
    pub fn new(train: Arc<TrainSchedule>) -> Euler {
        Euler {
            train,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        }
    }

    pub fn set_timesteps(&mut self, steps: usize) -> anyhow::Result<()> {
        self.timesteps = self.train.timesteps(steps)?;
        let ac = &self.train.alphas_cumprod;
        // diffusers interpolates the sigma table at the timesteps: at integers, the value.
        self.sigmas = self
            .timesteps
            .iter()
            .map(|&t| ((1.0 - ac[t]) / ac[t]).sqrt())
            .chain([0.0])
            .collect();
        Ok(())
    }

    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    pub fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().copied().fold(0.0, f64::max);
        (max * max + 1.0).sqrt()
    }

    fn index(&self, t: usize) -> anyhow::Result<usize> {
        self.timesteps
            .iter()
            .position(|&x| x == t)
            .with_context(|| format!("timestep {t} is not in the schedule"))
    }

    pub fn scale_model_input(&self, sample: &[f32], t: usize) -> anyhow::Result<Vec<f32>> {
        let sigma = self.sigmas[self.index(t)?];
        let scale = (sigma * sigma + 1.0).sqrt();
        Ok(sample
            .iter()
            .map(|&x| (f64::from(x) / scale) as f32)
            .collect())
    }

    pub fn step(&self, eps: &[f32], t: usize, sample: &[f32]) -> anyhow::Result<Vec<f32>> {
        let i = self.index(t)?;
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        Ok(zip(eps, sample)?
            .map(|(e, x)| (f64::from(x) + f64::from(e) * dt) as f32)
            .collect())
    }
}

fn zip<'a>(
    eps: &'a [f32],
    sample: &'a [f32],
) -> anyhow::Result<impl Iterator<Item = (f32, f32)> + 'a> {
    if eps.len() != sample.len() {
        bail!(
            "the model output has {} values for {} latents",
            eps.len(),
            sample.len()
        );
    }
    Ok(eps.iter().copied().zip(sample.iter().copied()))
}

/// Either scheduler, configured and with its timesteps set.
#[derive(Debug, Clone)]
pub enum Scheduler {
    Ddim(Ddim),
    Euler(Euler),
}

impl Scheduler {
    /// A scheduler of `kind` for `steps` denoising steps.
    pub fn new(
        kind: SchedulerKind,
        train: Arc<TrainSchedule>,
        steps: usize,
    ) -> anyhow::Result<Scheduler> {
        Ok(match kind {
            SchedulerKind::Ddim => {
                let mut s = Ddim::new(train);
                s.set_timesteps(steps)?;
                Scheduler::Ddim(s)
            }
            SchedulerKind::Euler => {
                let mut s = Euler::new(train);
                s.set_timesteps(steps)?;
                Scheduler::Euler(s)
            }
        })
    }

    pub fn kind(&self) -> SchedulerKind {
        match self {
            Scheduler::Ddim(_) => SchedulerKind::Ddim,
            Scheduler::Euler(_) => SchedulerKind::Euler,
        }
    }

    /// The timesteps, in the order they are run (descending).
    pub fn timesteps(&self) -> &[usize] {
        match self {
            Scheduler::Ddim(s) => &s.timesteps,
            Scheduler::Euler(s) => &s.timesteps,
        }
    }

    /// What the initial noise is multiplied by.
    pub fn init_noise_sigma(&self) -> f64 {
        match self {
            Scheduler::Ddim(_) => 1.0,
            Scheduler::Euler(s) => s.init_noise_sigma(),
        }
    }

    /// The UNet's input at timestep `t`.
    pub fn scale_model_input(&self, sample: &[f32], t: usize) -> anyhow::Result<Vec<f32>> {
        match self {
            Scheduler::Ddim(_) => Ok(sample.to_vec()),
            Scheduler::Euler(s) => s.scale_model_input(sample, t),
        }
    }

    /// The latents after the step at timestep `t`, given the (guided) noise prediction.
    pub fn step(&self, eps: &[f32], t: usize, sample: &[f32]) -> anyhow::Result<Vec<f32>> {
        match self {
            Scheduler::Ddim(s) => s.step(eps, t, sample),
            Scheduler::Euler(s) => s.step(eps, t, sample),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Stable Diffusion 1.x/2.x's scheduler_config.json (as in the reference bundle).
    fn sd_config() -> Value {
        json!({
            "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000,
            "prediction_type": "epsilon", "set_alpha_to_one": false, "skip_prk_steps": true,
            "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": null
        })
    }

    fn sd() -> Arc<TrainSchedule> {
        Arc::new(TrainSchedule::from_config(&sd_config()).unwrap())
    }

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol * b.abs().max(1.0), "{a} vs {b}");
    }

    #[test]
    fn the_training_schedule_is_diffusers_scaled_linear() {
        let train = sd();
        assert_eq!(train.alphas_cumprod.len(), 1000);
        // Written out: beta_i = (sqrt(b0) + i (sqrt(b1) - sqrt(b0)) / 999)^2, a_t = prod (1 - beta_i).
        let beta = |i: usize| {
            let (s0, s1) = (0.00085f64.sqrt(), 0.012f64.sqrt());
            let s = s0 + i as f64 * (s1 - s0) / 999.0;
            s * s
        };
        let mut a = 1.0;
        for (i, got) in train.alphas_cumprod.iter().enumerate() {
            a *= 1.0 - beta(i);
            close(*got, a, 1e-12);
        }
        close(train.alphas_cumprod[0], 0.99915, 1e-12);
        close(train.alphas_cumprod[951], 0.0081550045674304, 1e-9);
        close(train.alphas_cumprod[999], 0.004660098513077238, 1e-9);
        assert_eq!(train.steps_offset, 1);
        assert!(!train.set_alpha_to_one);
    }

    #[test]
    fn leading_timesteps() {
        let train = sd();
        let twenty: Vec<usize> = (0..20).rev().map(|i| i * 50 + 1).collect();
        assert_eq!(train.timesteps(20).unwrap(), twenty);
        assert_eq!(twenty[0], 951);
        assert_eq!(
            train.timesteps(7).unwrap(),
            [853, 711, 569, 427, 285, 143, 1]
        );
        assert_eq!(train.timesteps(1).unwrap(), [1]);
        assert_eq!(train.timesteps(500).unwrap()[0], 999);
        let err = train.timesteps(1000).unwrap_err().to_string();
        assert!(err.contains("start at timestep 1000"), "{err}");
        assert!(train.timesteps(0).is_err());
    }

    #[test]
    fn ddim_steps_follow_the_formula() {
        let s = Scheduler::new(SchedulerKind::Ddim, sd(), 20).unwrap();
        assert_eq!(s.init_noise_sigma(), 1.0);
        let Scheduler::Ddim(ddim) = &s else {
            unreachable!()
        };
        let ac = &sd().alphas_cumprod;
        assert_eq!(ddim.alphas(951).unwrap(), (ac[951], ac[901]));
        // The last step has no previous timestep: alphas_cumprod[0] (set_alpha_to_one false).
        assert_eq!(ddim.alphas(1).unwrap(), (ac[1], ac[0]));
        let (x, eps) = ([0.5f32, -1.25, 2.0], [0.1f32, -0.3, 0.9]);
        let expect = |t: usize, a_prev: f64| -> Vec<f32> {
            let a_t = ac[t];
            x.iter()
                .zip(eps)
                .map(|(&x, e)| {
                    let x0 = (f64::from(x) - (1.0 - a_t).sqrt() * f64::from(e)) / a_t.sqrt();
                    (a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * f64::from(e)) as f32
                })
                .collect()
        };
        assert_eq!(s.step(&eps, 951, &x).unwrap(), expect(951, ac[901]));
        assert_eq!(s.step(&eps, 1, &x).unwrap(), expect(1, ac[0]));
        // Values of the verified Python schedules (within an f32 ulp).
        let first = s.step(&eps, 951, &x).unwrap();
        for (got, want) in first.iter().zip([0.62402165f32, -1.544_447, 2.340_014_2]) {
            assert!((got - want).abs() < 1e-6, "{first:?}");
        }
        assert_eq!(s.scale_model_input(&x, 951).unwrap(), x);
        // With set_alpha_to_one (diffusers' default) the last step lands on a = 1: x0 itself.
        let mut config = sd_config();
        config["set_alpha_to_one"] = Value::Null;
        let train = Arc::new(TrainSchedule::from_config(&config).unwrap());
        let s = Scheduler::new(SchedulerKind::Ddim, train, 20).unwrap();
        assert_eq!(s.step(&eps, 1, &x).unwrap(), expect(1, 1.0));
    }

    #[test]
    fn euler_sigmas_scaling_and_steps_follow_the_formula() {
        let s = Scheduler::new(SchedulerKind::Euler, sd(), 20).unwrap();
        let Scheduler::Euler(euler) = &s else {
            unreachable!()
        };
        let ac = &sd().alphas_cumprod;
        let sigma = |t: usize| ((1.0 - ac[t]) / ac[t]).sqrt();
        assert_eq!(euler.sigmas().len(), 21);
        assert_eq!(euler.sigmas()[0], sigma(951));
        assert_eq!(euler.sigmas()[20], 0.0);
        // Verified against diffusers 0.42.1 (models/README.md): sigma_0 11.0283, init 11.0736.
        close(euler.sigmas()[0], 11.02833116477522, 1e-12);
        close(s.init_noise_sigma(), 11.073576128782985, 1e-12);
        let (x, eps) = ([0.5f32, -1.25, 2.0], [0.1f32, -0.3, 0.9]);
        let scaled = s.scale_model_input(&x, 951).unwrap();
        let k = (sigma(951).powi(2) + 1.0).sqrt();
        let want: Vec<f32> = x.iter().map(|&v| (f64::from(v) / k) as f32).collect();
        assert_eq!(scaled, want);
        let dt = sigma(901) - sigma(951);
        let want: Vec<f32> = x
            .iter()
            .zip(eps)
            .map(|(&v, e)| (f64::from(v) + f64::from(e) * dt) as f32)
            .collect();
        assert_eq!(s.step(&eps, 951, &x).unwrap(), want);
        // The last step goes to sigma 0.
        let last = s.step(&eps, 1, &x).unwrap();
        let want: Vec<f32> = x
            .iter()
            .zip(eps)
            .map(|(&v, e)| (f64::from(v) - f64::from(e) * sigma(1)) as f32)
            .collect();
        assert_eq!(last, want);
        assert!(
            s.step(&eps, 950, &x).is_err(),
            "not a timestep of the schedule"
        );
        assert!(s.step(&eps[..2], 951, &x).is_err(), "length mismatch");
    }

    #[test]
    fn unsupported_config_values_are_refused_naming_the_key() {
        let refused = |key: &str, value: Value, needle: &str| {
            let mut config = sd_config();
            config[key] = value;
            let err = TrainSchedule::from_config(&config).unwrap_err().to_string();
            assert!(err.contains(needle), "{key}: {err}");
        };
        refused("prediction_type", json!("v_prediction"), "prediction_type");
        refused("timestep_spacing", json!("trailing"), "timestep_spacing");
        refused("trained_betas", json!([0.1, 0.2]), "trained_betas");
        refused("clip_sample", json!(true), "clip_sample");
        refused("thresholding", json!(true), "thresholding");
        refused(
            "rescale_betas_zero_snr",
            json!(true),
            "rescale_betas_zero_snr",
        );
        refused("use_karras_sigmas", json!(true), "use_karras_sigmas");
        refused(
            "interpolation_type",
            json!("log_linear"),
            "interpolation_type",
        );
        refused("final_sigmas_type", json!("sigma_min"), "final_sigmas_type");
        refused("timestep_type", json!("continuous"), "timestep_type");
        refused("beta_schedule", json!("squaredcos_cap_v2"), "beta_schedule");
        refused("num_train_timesteps", json!(-5), "num_train_timesteps");
        refused("beta_start", json!("small"), "beta_start");
        // An absent spacing is diffusers' DDIM default, leading.
        let mut config = sd_config();
        config.as_object_mut().unwrap().remove("timestep_spacing");
        assert!(TrainSchedule::from_config(&config).is_ok());
        assert!(SchedulerKind::parse("pndm")
            .unwrap_err()
            .to_string()
            .contains("\"ddim\", \"euler\""));
    }

    #[test]
    fn linear_betas() {
        let mut config = sd_config();
        config["beta_schedule"] = json!("linear");
        let train = TrainSchedule::from_config(&config).unwrap();
        let mut a = 1.0;
        for i in 0..=500 {
            a *= 1.0 - (0.00085 + i as f64 * (0.012 - 0.00085) / 999.0);
        }
        close(train.alphas_cumprod[500], a, 1e-12);
        close(train.alphas_cumprod[500], 0.160771599870189, 1e-9);
    }
}
