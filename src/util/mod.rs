//! Small shared utilities.
pub mod rng;
