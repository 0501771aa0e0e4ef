//! The magnitude-vs-angle probes of the RoAd pilot study (METHODS.md §3): how fine-tuning moves
//! last-token representations (ΔM, ΔD), classifier heads that see only the magnitude or only the
//! angle of a frozen representation, and an interventional probe that interchanges only one of
//! the two between a base and a counterfactual run.
pub mod delta;
pub mod heads;
pub mod states;
pub mod swap;

pub use delta::{delta, Stats};
pub use heads::{fit_head, HeadFit, HeadKind, HeadTrain, ProbeHead};
pub use states::last_token_states;
pub use swap::{pair_scores, swap_probe, PairScores, SwapCounts};
