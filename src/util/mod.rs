//! Small shared helpers: seeded RNG, run directories and timestamps.
pub mod rng;
pub mod rundir;
