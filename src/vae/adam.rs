//! Our own Adam (Kingma & Ba, 2015), because tch's optimizer state can't be
//! saved: here the moments and the step count are plain tensors that travel
//! with the weights, so a resumed run takes the very same next step as an
//! uninterrupted one.
//!
//! The arithmetic is `torch.optim.Adam`'s (single-tensor, no weight decay,
//! no amsgrad), up to float rounding. This module knows nothing of files or the model's layout.

use crate::vae::weights::NamedTensors;
use anyhow::{bail, Context, Result};
use tch::{nn::VarStore, Device, Kind, Tensor};

/// Hyper-parameters; the defaults are the paper's and PyTorch's. The
/// daemon's are its config's `[train]` section (`config::Config::adam`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// The peak learning rate; `schedule` scales it at each step.
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub schedule: Schedule,
    /// `WarmupCosine`: steps of linear warmup from 0 to `learning_rate`, ...
    pub warmup_steps: u64,
    /// ... then steps of half a cosine down to `min_learning_rate`, flat
    /// after that (a continuous trainer has no last step).
    pub decay_steps: u64,
    pub min_learning_rate: f64,
}

/// The World Models paper's Adam (1e-4 throughout); the daemon's recipe is
/// `[train]` in config/default.toml.
impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            learning_rate: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            decay_steps: 0,
            min_learning_rate: 0.0,
        }
    }
}

/// How the learning rate moves with the step count, which is part of the
/// optimizer state: a resumed run (or a rollback) picks the schedule up
/// where that checkpoint left it. Written as the config's `[train]
/// lr_schedule`: `constant` or `warmup_cosine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// The World Models recipe: `learning_rate` throughout.
    #[default]
    Constant,
    /// A linear warmup, then half a cosine down to `min_learning_rate`
    /// (`AdamConfig`'s `warmup_steps`, `decay_steps`).
    WarmupCosine,
}

impl AdamConfig {
    /// The learning rate's multiplier at step `t` (the first step is 1).
    pub fn factor(&self, t: u64) -> f64 {
        let (warmup_steps, decay_steps) = (self.warmup_steps, self.decay_steps);
        match self.schedule {
            Schedule::Constant => 1.0,
            Schedule::WarmupCosine if t <= warmup_steps => t as f64 / warmup_steps as f64,
            Schedule::WarmupCosine => {
                let floor = self.min_learning_rate / self.learning_rate;
                let progress = ((t - warmup_steps) as f64 / decay_steps.max(1) as f64).min(1.0);
                floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// Name of the step-count tensor in [`Adam::state`].
const STEP_TENSOR: &str = "step";

/// Adam over every trainable variable of a VarStore.
///
/// The parameters live in one flat buffer: [`Adam::new`] moves each
/// variable's data into a view of it (the model keeps its tensors, names
/// and shapes), and the moments are flat too, so an update is a handful of
/// element-wise kernels for the whole model instead of a handful per
/// parameter (18 of them): on a GPU, launches rather than arithmetic bound
/// a small model's step.
pub struct Adam {
    pub config: AdamConfig,
    /// Parameters in name order (views into `flat`), with their offsets.
    params: Vec<Param>,
    /// Every parameter, end to end, in name order.
    flat: Tensor,
    /// First and second moments, laid out as `flat`.
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Completed steps, as an int64 scalar on the CPU.
    step: Tensor,
}

struct Param {
    name: String,
    tensor: Tensor,
    offset: i64,
}

impl Param {
    /// This parameter's slice of a flat buffer laid out as [`Adam::flat`].
    fn view_of(&self, flat: &Tensor) -> Tensor {
        flat.narrow(0, self.offset, self.tensor.numel() as i64)
            .view(self.tensor.size().as_slice())
    }
}

/// Optimizer state read and checked by [`Adam::read_state`], not yet applied.
pub struct State {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
}

impl Adam {
    /// Zero moments, and the VarStore's trainable variables moved into one
    /// flat buffer (their values unchanged).
    pub fn new(vs: &VarStore, config: AdamConfig) -> Adam {
        let mut variables: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        let flat = tch::no_grad(|| {
            Tensor::cat(
                &variables
                    .iter()
                    .map(|(_, t)| t.detach().reshape(-1))
                    .collect::<Vec<_>>(),
                0,
            )
        });
        let mut offset = 0;
        let params = variables
            .into_iter()
            .map(|(name, tensor)| {
                let param = Param { name, tensor, offset };
                offset += param.tensor.numel() as i64;
                param
            })
            .collect::<Vec<_>>();
        for param in &params {
            // The variable (shared with the model's layers) now reads and
            // writes its slice of `flat`; autograd still sees a leaf.
            param.tensor.shallow_clone().set_data(&param.view_of(&flat));
        }
        Adam {
            config,
            exp_avg: flat.zeros_like(),
            exp_avg_sq: flat.zeros_like(),
            flat,
            params,
            step: Tensor::from(0i64),
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> i64 {
        self.step.int64_value(&[])
    }

    /// One update down the gradient of `loss`. The gradients come straight
    /// from autograd (`run_backward`), never accumulated into `.grad`, and
    /// are joined into one flat gradient (one copy) for the update.
    pub fn minimize(&mut self, loss: &Tensor) {
        let params: Vec<&Tensor> = self.params.iter().map(|p| &p.tensor).collect();
        let grads = Tensor::run_backward(&[loss], &params, false, false);
        let AdamConfig {
            learning_rate,
            beta1,
            beta2,
            eps,
            ..
        } = self.config;
        self.step += 1;
        let t = self.steps();
        let learning_rate = learning_rate * self.config.factor(t as u64);
        let bias_correction1 = 1.0 - beta1.powi(t as i32);
        let bias_correction2_sqrt = (1.0 - beta2.powi(t as i32)).sqrt();
        // p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps), with sqrt(bc2)
        // moved into the step size: one kernel fewer.
        let step_size = learning_rate * bias_correction2_sqrt / bias_correction1;
        tch::no_grad(|| {
            let grad = Tensor::cat(&grads.iter().map(|g| g.reshape(-1)).collect::<Vec<_>>(), 0);
            // m = beta1 m + (1 - beta1) g ; v = beta2 v + (1 - beta2) g^2
            let _ = self.exp_avg.lerp_(&grad, 1.0 - beta1);
            let _ = self.exp_avg_sq.lerp_(&grad.square(), 1.0 - beta2);
            let denom = self.exp_avg_sq.sqrt().g_add_scalar_(eps * bias_correction2_sqrt);
            let _ = self.flat.addcdiv_(&(&self.exp_avg * -step_size), &denom);
        });
    }

    /// The state to save: `exp_avg.<param>`, `exp_avg_sq.<param>`, `step`
    /// (one tensor per parameter, as before the buffer was flat).
    pub fn state(&self) -> NamedTensors {
        let mut named = Vec::with_capacity(2 * self.params.len() + 1);
        for param in &self.params {
            named.push((format!("exp_avg.{}", param.name), param.view_of(&self.exp_avg)));
            named.push((format!("exp_avg_sq.{}", param.name), param.view_of(&self.exp_avg_sq)));
        }
        named.push((STEP_TENSOR.to_string(), self.step.shallow_clone()));
        named
    }

    /// Reads a state saved by [`Adam::state`] for the same model, strictly
    /// (every tensor there with the right shape), without applying it.
    pub fn read_state(&self, named: &[(String, Tensor)], origin: &str) -> Result<State> {
        let find = |key: &str| -> Result<&Tensor> {
            named
                .iter()
                .find(|(n, _)| n == key)
                .map(|(_, t)| t)
                .with_context(|| format!("{origin}: optimizer state lacks tensor {key}"))
        };
        let step = find(STEP_TENSOR)?;
        if step.kind() != Kind::Int64 || step.numel() != 1 {
            bail!("{origin}: optimizer tensor step must be one int64");
        }
        let (exp_avg, exp_avg_sq) = (self.flat.zeros_like(), self.flat.zeros_like());
        for param in &self.params {
            for (key, flat) in [("exp_avg", &exp_avg), ("exp_avg_sq", &exp_avg_sq)] {
                let t = find(&format!("{key}.{}", param.name))?;
                if t.size() != param.tensor.size() || t.kind() != Kind::Float {
                    bail!(
                        "{origin}: optimizer tensor {key}.{} has shape {:?} {:?}, expected {:?} Float",
                        param.name,
                        t.size(),
                        t.kind(),
                        param.tensor.size()
                    );
                }
                param.view_of(flat).copy_(t);
            }
        }
        if named.len() != 2 * self.params.len() + 1 {
            bail!(
                "{origin}: optimizer state has {} tensors, expected {}",
                named.len(),
                2 * self.params.len() + 1
            );
        }
        Ok(State {
            exp_avg,
            exp_avg_sq,
            step: step.to_device(Device::Cpu).reshape([] as [i64; 0]).copy(),
        })
    }

    /// Applies a state from [`Adam::read_state`].
    pub fn set_state(&mut self, state: State) {
        State {
            exp_avg: self.exp_avg,
            exp_avg_sq: self.exp_avg_sq,
            step: self.step,
        } = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Warmup climbs linearly to the peak, the cosine comes down to the
    /// floor over its steps and stays there; constant is 1 throughout.
    #[test]
    fn schedules_scale_the_learning_rate_by_step() {
        let s = AdamConfig {
            learning_rate: 1.0,
            schedule: Schedule::WarmupCosine,
            warmup_steps: 10,
            decay_steps: 100,
            min_learning_rate: 0.1,
            ..Default::default()
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(s.factor(1), 0.1) && close(s.factor(5), 0.5) && close(s.factor(10), 1.0));
        assert!(close(s.factor(60), 0.55), "halfway down: {}", s.factor(60));
        assert!(close(s.factor(110), 0.1) && close(s.factor(10_000), 0.1));
        assert!(
            (1..200).all(|t| s.factor(t + 1) <= s.factor(t) || t < 10),
            "the decay only goes down"
        );
        assert!(close(AdamConfig::default().factor(12_345), 1.0));
    }

    /// A quadratic bowl: Adam's first step moves each coordinate by ~lr
    /// against the gradient's sign, as the formula says.
    #[test]
    fn first_step_moves_by_learning_rate() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[3], tch::nn::Init::Const(1.0));
        let mut adam = Adam::new(
            &vs,
            AdamConfig {
                learning_rate: 0.1,
                ..Default::default()
            },
        );
        let target = Tensor::from_slice(&[0.0f32, 2.0, 1.0]);
        adam.minimize(&(&w - &target).square().sum(Kind::Float));
        let got: Vec<f32> = Vec::try_from(&w).unwrap();
        // grad = 2(w - t) = [2, -2, 0]: moves -0.1, +0.1, and 0 (0 / (0 + eps)).
        assert!(
            (got[0] - 0.9).abs() < 1e-6 && (got[1] - 1.1).abs() < 1e-6 && (got[2] - 1.0).abs() < 1e-6,
            "{got:?}"
        );
        assert_eq!(adam.steps(), 1);
    }

    #[test]
    fn state_round_trips_and_rejects_mismatch() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[2], tch::nn::Init::Const(1.0));
        let mut adam = Adam::new(&vs, AdamConfig::default());
        adam.minimize(&w.square().sum(Kind::Float));
        let state = adam.state();
        let mut fresh = Adam::new(&vs, AdamConfig::default());
        let read = fresh.read_state(&state, "test").unwrap();
        fresh.set_state(read);
        assert_eq!(fresh.steps(), 1);
        let bad: NamedTensors = state.into_iter().filter(|(n, _)| n != "exp_avg.w").collect();
        let err = fresh.read_state(&bad, "ckpt").err().unwrap().to_string();
        assert!(err.contains("exp_avg.w"), "{err}");
    }
}
