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
pub use states::{last_token_states, last_token_states_with};
pub use swap::{pair_scores, pair_scores_with, swap_probe, swap_probe_with, PairScores, SwapCounts};

/// Hooks a fine-tune needs on every forward (LoReFT's interventions) for one call's prompts of
/// these unpadded lengths (left-padded to the longest). Weight adapters need none.
pub type PromptHooks<'a> = &'a dyn Fn(&[usize]) -> Box<dyn crate::model::Hooks>;
