//! Wan's samplers, as diffusers configures them from `scheduler_config.json`: UniPC multistep
//! (flow prediction, flow sigmas, B(h) solver, order 2) and flow-matching Euler with a static shift.
//!
//! Tensor math runs in f32; the per-step coefficients are computed in f64 from the f32 sigmas
//! (the reference computes them in f32; the difference is far below the trace tolerances).

use candle_core::{DType, Result, Tensor};
use serde::Deserialize;

use crate::error::CandiffError;

/// Training timesteps of every Wan scheduler.
const TRAIN_STEPS: usize = 1000;
/// diffusers starts UniPC's flow schedule just below sigma = 1.
const UNIPC_FIRST_SIGMA_OFFSET: f64 = 1e-6;

fn d_train() -> usize {
    TRAIN_STEPS
}
fn d_order() -> usize {
    2
}
fn d_true() -> bool {
    true
}

/// The fields of `scheduler_config.json` both samplers read.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(default = "d_train")]
    pub num_train_timesteps: usize,
    /// UniPC's shift.
    #[serde(default)]
    pub flow_shift: Option<f64>,
    /// FlowMatchEuler's shift.
    #[serde(default)]
    pub shift: Option<f64>,
    #[serde(default = "d_order")]
    pub solver_order: usize,
    #[serde(default)]
    pub solver_type: Option<String>,
    #[serde(default)]
    pub prediction_type: Option<String>,
    #[serde(default)]
    pub use_flow_sigmas: bool,
    #[serde(default = "d_true")]
    pub lower_order_final: bool,
    #[serde(default = "d_true")]
    pub predict_x0: bool,
    #[serde(default)]
    pub final_sigmas_type: Option<String>,
    #[serde(default)]
    pub disable_corrector: Vec<usize>,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
}

impl SchedulerConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        Ok(crate::error::read_json_config(path, "scheduler_config.json")?)
    }

    /// The configured shift (`flow_shift` for UniPC, `shift` for Euler).
    pub fn configured_shift(&self) -> f64 {
        match self.class_name.as_str() {
            "FlowMatchEulerDiscreteScheduler" => self.shift.unwrap_or(1.0),
            _ => self.flow_shift.unwrap_or(1.0),
        }
    }
}

fn unsupported(what: String) -> candle_core::Error {
    CandiffError::Unsupported(format!(
        "scheduler_config.json: {what}; candiff implements Wan's UniPC (flow prediction, flow sigmas, bh1/bh2) and static-shift flow-match Euler"
    ))
    .into()
}

fn shifted(shift: f64, s: f64) -> f64 {
    shift * s / (1.0 + (shift - 1.0) * s)
}

/// A sampler bound to one schedule; `step` is called once per timestep, in order.
pub enum Sampler {
    UniPc(UniPc),
    Euler(FlowEuler),
}

impl Sampler {
    /// Builds the sampler for `steps` steps; `shift` overrides the config's shift.
    pub fn new(cfg: &SchedulerConfig, steps: usize, shift: Option<f64>) -> Result<Self> {
        if steps == 0 {
            return Err(CandiffError::Unsupported("at least one sampling step is needed".into()).into());
        }
        if cfg.use_dynamic_shifting || cfg.use_karras_sigmas || cfg.use_exponential_sigmas || cfg.use_beta_sigmas {
            return Err(unsupported("dynamic shifting and karras/exponential/beta sigmas are not supported".into()));
        }
        let shift = shift.unwrap_or_else(|| cfg.configured_shift());
        match cfg.class_name.as_str() {
            "UniPCMultistepScheduler" => Ok(Self::UniPc(UniPc::new(cfg, steps, shift)?)),
            "FlowMatchEulerDiscreteScheduler" => Ok(Self::Euler(FlowEuler::new(cfg, steps, shift))),
            other => Err(unsupported(format!("scheduler class `{other}`"))),
        }
    }

    /// The timesteps the transformer sees.
    pub fn timesteps(&self) -> &[f32] {
        match self {
            Self::UniPc(s) => &s.timesteps,
            Self::Euler(s) => &s.timesteps,
        }
    }

    /// N + 1 sigmas, ending with 0.
    pub fn sigmas(&self) -> &[f32] {
        match self {
            Self::UniPc(s) => &s.sigmas,
            Self::Euler(s) => &s.sigmas,
        }
    }

    /// One step: flow prediction `v` at the current timestep, sample `x` -> next sample (f32).
    pub fn step(&mut self, v: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (v, x) = (v.to_dtype(DType::F32)?, x.to_dtype(DType::F32)?);
        match self {
            Self::UniPc(s) => s.step(&v, &x),
            Self::Euler(s) => s.step(&v, &x),
        }
    }
}

/// Flow-matching Euler (`FlowMatchEulerDiscreteScheduler`, static shift).
pub struct FlowEuler {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    index: usize,
}

impl FlowEuler {
    fn new(cfg: &SchedulerConfig, steps: usize, shift: f64) -> Self {
        let n_train = cfg.num_train_timesteps as f32;
        // The training schedule (f32, already shifted) gives sigma_max/min; the inference
        // schedule spans them linearly in t and is shifted again (as the reference does).
        let shift32 = shift as f32;
        let train = |t: f32| {
            let s = t / n_train;
            shift32 * s / (1.0 + (shift32 - 1.0) * s)
        };
        let (sigma_max, sigma_min) = (train(n_train) as f64, train(1.0) as f64);
        let (t0, t1) = (sigma_max * n_train as f64, sigma_min * n_train as f64);
        let mut sigmas: Vec<f32> = (0..steps)
            .map(|i| {
                let t = if steps == 1 { t0 } else { t0 + (t1 - t0) * i as f64 / (steps - 1) as f64 };
                shifted(shift, t / n_train as f64) as f32
            })
            .collect();
        let timesteps = sigmas.iter().map(|s| s * n_train).collect();
        sigmas.push(0.0);
        Self { timesteps, sigmas, index: 0 }
    }

    fn step(&mut self, v: &Tensor, x: &Tensor) -> Result<Tensor> {
        let i = self.index;
        if i + 1 >= self.sigmas.len() {
            candle_core::bail!("flow-match Euler: step {} of a {}-step schedule", i + 1, self.timesteps.len());
        }
        self.index += 1;
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        x + (v * dt as f64)?
    }
}

/// UniPC multistep in the data-prediction form with flow sigmas (alpha = 1 - sigma).
pub struct UniPc {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    order: usize,
    bh2: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    /// Converted model outputs (x0 predictions) of the last `order` steps, oldest first.
    history: Vec<Tensor>,
    last_sample: Option<Tensor>,
    this_order: usize,
    lower_order_nums: usize,
    index: usize,
}

impl UniPc {
    fn new(cfg: &SchedulerConfig, steps: usize, shift: f64) -> Result<Self> {
        if cfg.prediction_type.as_deref().unwrap_or("epsilon") != "flow_prediction" || !cfg.use_flow_sigmas {
            return Err(unsupported(format!(
                "UniPC with prediction_type {:?}, use_flow_sigmas {}",
                cfg.prediction_type, cfg.use_flow_sigmas
            )));
        }
        if !cfg.predict_x0 || cfg.thresholding {
            return Err(unsupported("UniPC needs predict_x0 = true and thresholding = false".into()));
        }
        if cfg.final_sigmas_type.as_deref().unwrap_or("zero") != "zero" {
            return Err(unsupported(format!("final_sigmas_type {:?}", cfg.final_sigmas_type)));
        }
        let bh2 = match cfg.solver_type.as_deref().unwrap_or("bh2") {
            "bh2" => true,
            "bh1" => false,
            other => return Err(unsupported(format!("solver_type `{other}`"))),
        };
        if !(1..=2).contains(&cfg.solver_order) {
            return Err(unsupported(format!("solver_order {}", cfg.solver_order)));
        }
        let n = cfg.num_train_timesteps as f64;
        let mut sigmas: Vec<f32> = (0..steps)
            .map(|i| {
                // s runs over linspace(1, 1/n, steps + 1) without its last point.
                let s = 1.0 + (1.0 / n - 1.0) * i as f64 / steps as f64;
                let mut sigma = shifted(shift, s);
                if i == 0 {
                    sigma -= UNIPC_FIRST_SIGMA_OFFSET;
                }
                sigma
            })
            .map(|s| s as f32)
            .collect();
        // The transformer sees integer timesteps: truncation of sigma * 1000 (f64 before the
        // f32 cast of the sigmas, as numpy computes them).
        let timesteps = (0..steps)
            .map(|i| {
                let s = 1.0 + (1.0 / n - 1.0) * i as f64 / steps as f64;
                let mut sigma = shifted(shift, s);
                if i == 0 {
                    sigma -= UNIPC_FIRST_SIGMA_OFFSET;
                }
                (sigma * n).trunc() as f32
            })
            .collect();
        sigmas.push(0.0);
        Ok(Self {
            timesteps,
            sigmas,
            order: cfg.solver_order,
            bh2,
            lower_order_final: cfg.lower_order_final,
            disable_corrector: cfg.disable_corrector.clone(),
            history: Vec::new(),
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
            index: 0,
        })
    }

    /// log-SNR of a flow sigma: ln(1 - sigma) - ln(sigma).
    fn lambda(&self, i: usize) -> f64 {
        let s = self.sigmas[i] as f64;
        (1.0 - s).ln() - s.ln()
    }

    /// (h, hh = -h, h*phi_1 = expm1(hh), B(h)).
    fn coefficients(&self, lambda_t: f64, lambda_s0: f64) -> (f64, f64, f64, f64) {
        let h = lambda_t - lambda_s0;
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        (h, hh, h_phi_1, b_h)
    }

    fn step(&mut self, v: &Tensor, x: &Tensor) -> Result<Tensor> {
        let i = self.index;
        let n = self.timesteps.len();
        if i >= n {
            candle_core::bail!("UniPC: step {} of a {n}-step schedule", i + 1);
        }
        let m = (x - (v * self.sigmas[i] as f64)?)?;
        let use_corrector = i > 0 && !self.disable_corrector.contains(&(i - 1)) && self.last_sample.is_some();
        let x = if use_corrector { self.correct(&m)? } else { x.clone() };

        self.history.push(m);
        if self.history.len() > self.order {
            self.history.remove(0);
        }
        let this_order = if self.lower_order_final { self.order.min(n - i) } else { self.order };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        self.last_sample = Some(x.clone());
        let prev = self.predict(&x)?;
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.order);
        self.index += 1;
        Ok(prev)
    }

    /// UniP: from sample `x` at sigma_i to sigma_{i+1}.
    fn predict(&self, x: &Tensor) -> Result<Tensor> {
        let i = self.index;
        let order = self.this_order;
        let m0 = &self.history[self.history.len() - 1];
        let (sigma_t, sigma_s0) = (self.sigmas[i + 1] as f64, self.sigmas[i] as f64);
        let alpha_t = 1.0 - sigma_t;
        let (h, _, h_phi_1, b_h) = self.coefficients(self.lambda(i + 1), self.lambda(i));
        let base = ((x * (sigma_t / sigma_s0))? - (m0 * (alpha_t * h_phi_1))?)?;
        if order < 2 {
            return Ok(base);
        }
        let m1 = &self.history[self.history.len() - 2];
        let rk = (self.lambda(i - 1) - self.lambda(i)) / h;
        let d1 = ((m1 - m0)? / rk)?;
        // Order 2 uses rho = 1/2 (the reference's simplified predictor).
        let rho = 0.5;
        base - (d1 * (alpha_t * b_h * rho))?
    }

    /// UniC: the corrected current sample, recomputed from `last_sample` (the input of the
    /// previous step) with the new x0 prediction `m_t`.
    fn correct(&self, m_t: &Tensor) -> Result<Tensor> {
        let i = self.index;
        let order = self.this_order;
        let x = self.last_sample.as_ref().expect("checked by the caller");
        let m0 = &self.history[self.history.len() - 1];
        let (sigma_t, sigma_s0) = (self.sigmas[i] as f64, self.sigmas[i - 1] as f64);
        let alpha_t = 1.0 - sigma_t;
        let (h, hh, h_phi_1, b_h) = self.coefficients(self.lambda(i), self.lambda(i - 1));
        let base = ((x * (sigma_t / sigma_s0))? - (m0 * (alpha_t * h_phi_1))?)?;
        let d1_t = (m_t - m0)?;
        if order < 2 {
            return base - (d1_t * (alpha_t * b_h * 0.5))?;
        }
        // Order 2: solve R rho = b with R = [[1, 1], [rk, 1]].
        let m1 = &self.history[self.history.len() - 2];
        let rk = (self.lambda(i - 2) - self.lambda(i - 1)) / h;
        let d1 = ((m1 - m0)? / rk)?;
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b1 = h_phi_k / b_h;
        h_phi_k = h_phi_k / hh - 0.5;
        let b2 = h_phi_k * 2.0 / b_h;
        let rho0 = (b1 - b2) / (1.0 - rk);
        let rho1 = b1 - rho0;
        let corr = ((d1 * rho0)? + (d1_t * rho1)?)?;
        base - (corr * (alpha_t * b_h))?
    }
}
