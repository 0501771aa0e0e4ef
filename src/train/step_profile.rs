//! Where a training step's time goes, per phase (`ROAD_STEP_PROFILE=1`).
use anyhow::Result;
use std::time::Instant;

/// `ROAD_STEP_PROFILE=1`: per step, seconds in the forward (to the loss), the backward and the
/// rest (gradient gathering, clipping, optimiser), each closed by a device synchronise, on
/// stderr. Off (no synchronise, nothing printed) otherwise. For finding where a device's step
/// time goes without a profiler.
pub struct StepProfile {
    on: bool,
    last: Instant,
    secs: [f64; 3],
}

impl StepProfile {
    pub fn from_env() -> Self {
        Self { on: std::env::var_os("ROAD_STEP_PROFILE").is_some_and(|v| v != "0"), last: Instant::now(), secs: [0.0; 3] }
    }

    pub fn start(&mut self) {
        self.last = Instant::now();
    }

    pub fn mark(&mut self, phase: usize, sync: Option<&candle_core::Device>) -> Result<()> {
        if self.on {
            if let Some(d) = sync {
                d.synchronize()?;
            }
            let now = Instant::now();
            self.secs[phase] += (now - self.last).as_secs_f64();
            self.last = now;
        }
        Ok(())
    }

    pub fn report(&mut self, step: usize) {
        if self.on {
            let [f, b, r] = self.secs;
            eprintln!("step-profile step {step}: forward {f:.4} s, backward {b:.4} s, rest {r:.4} s");
            self.secs = [0.0; 3];
        }
    }
}
